"""PyflexCallback with the HF Trainer: drives the schedule, saves it in checkpoints, resumes it exactly."""
import os

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

import pyflex
from pyflex.integrations.trainer import SCHEDULE_FILE, TAU_OPTIMIZER_FILE, PyflexCallback
from pyflex.methods.ist import ImportanceSchedule
from pyflex.methods.lift import LiftSchedule

from _schedule_utils import make_batches, one_thread, tiny_llama  # noqa: F401

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]


class ToyDataset(torch.utils.data.Dataset):
    def __init__(self, n=24):
        self.rows = []
        for b in make_batches(n // 2, batch=2, seq=8):
            for i in range(2):
                self.rows.append({k: v[i] for k, v in b.items()})

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


class Recorder(TrainerCallback):
    """Runs after PyflexCallback's on_step_begin: records the active layers of each step."""

    def __init__(self, schedule):
        self.schedule, self.seen = schedule, []

    def on_step_begin(self, args, state, control, **kwargs):
        self.seen.append((state.global_step, tuple(self.schedule.active_layers),
                          tuple(pyflex.get_registry(kwargs["model"]).trainable_indices())))


def _args(out, max_steps):
    return TrainingArguments(output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=2, learning_rate=1e-2,
                             save_strategy="steps", save_steps=3, logging_steps=1, report_to=[], use_cpu=True,
                             dataloader_num_workers=0, seed=0, disable_tqdm=True)


def _run(tmp_path, make_schedule, max_steps=6, resume=None, resume_from=None):
    model = tiny_llama(num_layers=4)
    pyflex.patch_model(model, r=4, alpha=8)
    schedule = make_schedule(model)
    recorder = Recorder(schedule)
    trainer = Trainer(model=model, args=_args(tmp_path, max_steps), train_dataset=ToyDataset(),
                      callbacks=[PyflexCallback(schedule, resume_from=resume_from), recorder])
    with pyflex.use_backend("reference"):
        trainer.train(resume_from_checkpoint=resume)
    return trainer, schedule, recorder


def _fake_loss(model, batch):
    reg = pyflex.get_registry(model)
    return torch.tensor(1.0 + sum(0.1 * (i + 1) for i, h in enumerate(reg.layers) if h.response_scale != 1.0))


@pytest.mark.parametrize("kind", ["lift", "ist"])
def test_trainer_resume_reproduces_the_schedule(tmp_path, kind):
    def make(seed):
        if kind == "lift":
            # total_steps comes from the Trainer's max_steps
            return lambda m: LiftSchedule(m, order="random", policy="cyclic", seed=seed)
        return lambda m: ImportanceSchedule(m, n_u=2, t_c=2, loss_fn=_fake_loss, seed=seed)

    trainer, schedule, full = _run(tmp_path, make(11))
    assert len(full.seen) == 6
    if kind == "lift":
        assert schedule.total_steps == 6 and [a[0] for _, a, _ in full.seen] == schedule.sequence
    for _, active, trainable in full.seen:
        assert active == trainable and len(active) == (1 if kind == "lift" else 2)
    ckpt = tmp_path / "checkpoint-3"
    assert (ckpt / SCHEDULE_FILE).is_file()
    logged = [h for h in trainer.state.log_history if "pyflex/active_layers" in h]
    assert logged and logged[0]["pyflex/active_layers"] == (1.0 if kind == "lift" else 2.0)
    if kind == "ist":
        assert "pyflex/importance_0" in logged[-1] and len(schedule.history) == 2

    # resume from step 3 with a schedule built from another seed: the saved state must win
    _, resumed_schedule, resumed = _run(tmp_path, make(999), resume=str(ckpt))
    assert [s for s in resumed.seen] == full.seen[3:]
    if kind == "ist":
        assert torch.equal(resumed_schedule.scores, schedule.scores)


def test_ist_resume_under_trainer_is_bit_exact(tmp_path):
    """Stopped at step 3 and resumed, IST with the model's own loss and the callback's importance batches ends with
    the uninterrupted run's importance history, active sets and adapters, bit for bit. The importance batch of the
    update at step 4 is the second of the pass: the checkpoint must carry the importance iterator's position."""
    make = lambda seed: (lambda m: ImportanceSchedule(m, n_u=2, t_c=2, n_c=2, seed=seed))  # noqa: E731
    full_trainer, full, full_rec = _run(tmp_path / "full", make(5), max_steps=8)
    assert [h["step"] for h in full.history] == [2, 4, 6]
    saved = torch.load(tmp_path / "full" / "checkpoint-3" / SCHEDULE_FILE, weights_only=True)
    assert saved["importance_data"]["kind"] == "stateful" and saved["importance_data"]["state"]["position"] == 1

    ckpt = str(tmp_path / "full" / "checkpoint-3")  # another output_dir: the callback is told where to resume from
    resumed_trainer, resumed, resumed_rec = _run(tmp_path / "resumed", make(999), max_steps=8, resume=ckpt,
                                                 resume_from=ckpt)
    assert resumed_rec.seen == full_rec.seen[3:]
    assert resumed.history == full.history  # candidate sets, losses (floats), rewards, importance after each update
    assert torch.equal(resumed.scores, full.scores)
    want = pyflex.get_registry(full_trainer.model).named_adapter_parameters()
    got = pyflex.get_registry(resumed_trainer.model).named_adapter_parameters()
    assert want.keys() == got.keys() and all(torch.equal(got[n], want[n]) for n in want)


def test_lift_total_steps_other_than_max_steps_warns_and_is_kept(tmp_path):
    with pytest.warns(UserWarning, match="total_steps=4 but the Trainer runs max_steps=6"):
        _, schedule, rec = _run(tmp_path, lambda m: LiftSchedule(m, total_steps=4), max_steps=6)
    assert schedule.total_steps == 4 and schedule.step_count == 6
    assert [a[0] for _, a, _ in rec.seen] == [schedule.sequence[k % 4] for k in range(6)]  # wraps around


class StateRecorder(TrainerCallback):
    """After PyflexCallback's on_step_begin: the active block and the parameters holding optimizer state."""

    def __init__(self, schedule):
        self.schedule, self.seen = schedule, []

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        self.seen.append((self.schedule.active_layers[0], {id(p) for p in optimizer.optimizer.state}))


def test_lift_full_under_trainer_trains_blocks_and_frees_left_state(tmp_path):
    model = tiny_llama(num_layers=4)  # unpatched: full mode uses no adapters
    embed = model.model.embed_tokens.weight.detach().clone()
    schedule = LiftSchedule(model, target="full")
    recorder = StateRecorder(schedule)
    trainer = Trainer(model=model, args=_args(tmp_path, 8), train_dataset=ToyDataset(),
                      callbacks=[PyflexCallback(schedule), recorder])
    trainer.train()
    reg = pyflex.get_registry(model)
    assert [a for a, _ in recorder.seen] == [0, 0, 1, 1, 2, 2, 3, 3]
    for step, (active, with_state) in enumerate(recorder.seen):
        assert with_state <= {id(p) for p in reg[active].block.parameters()}, f"step {step}: a left block holds state"
    assert schedule.freed_state_count > 0
    assert torch.equal(model.model.embed_tokens.weight, embed)


def test_resume_without_schedule_file_is_an_error(tmp_path):
    with pytest.warns(UserWarning, match="is cut short"):
        _run(tmp_path, lambda m: LiftSchedule(m, total_steps=6), max_steps=3)
    os.remove(tmp_path / "checkpoint-3" / SCHEDULE_FILE)
    with pytest.raises(RuntimeError, match=SCHEDULE_FILE):
        _run(tmp_path, lambda m: LiftSchedule(m, total_steps=6), resume=str(tmp_path / "checkpoint-3"))


def test_ist_in_trainer_draws_importance_batches_from_the_training_data(tmp_path):
    trainer, schedule, rec = _run(tmp_path, lambda m: ImportanceSchedule(m, n_u=1, t_c=2, n_c=2), max_steps=5)
    assert len(schedule.history) == 2  # updates at steps 2 and 4, with the model's own loss
    assert all(0 < l < 20 for h in schedule.history for l in h["losses"])
    assert all(len(a) == 1 for _, a, _ in rec.seen)


def test_metrics_report_tau_sparsity_and_active_count():
    model = tiny_llama(num_layers=4)
    pyflex.patch_model(model, r=4, tau=True, tau0=0.5)  # a high threshold masks most tokens
    schedule = ImportanceSchedule(model, n_u=1)
    cb = PyflexCallback(schedule)
    schedule.step()
    with pyflex.use_backend("reference"), torch.no_grad():
        model(**make_batches(1)[0])
    metrics = cb.metrics()
    assert metrics["pyflex/active_layers"] == 1.0
    assert 0.5 < metrics["pyflex/tau_sparsity"] <= 1.0
    assert [metrics[f"pyflex/importance_{i}"] for i in range(4)] == [0.0] * 4


# -- τ and clipping under the Trainer -------------------------------------------------------------------------
class GradRecorder(TrainerCallback):
    """The gradients at its place in the callback chain, at every on_pre_optimizer_step, and each τ's λ term
    −λ·(active tokens of the forward) of PEFT_S eq. 14-17, which pyflex adds to τ.grad at the optimizer step."""

    def __init__(self):
        self.grads, self.lambda_terms = [], []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})
        layers = {n + ".tau": m for n, m in model.named_modules() if isinstance(m, pyflex.FlexLinear)}
        self.lambda_terms.append({n: -m.lam * float(m.last_mask.sum()) for n, m in layers.items()})


class TauRecorder(TrainerCallback):
    """Every τ after each optimizer step."""

    def __init__(self):
        self.values = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.values.append({n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(".tau")})


def _tau_trainer(out, max_steps, callbacks, resume=None, optimizers=(None, None), **kwargs):
    """A patched tiny Llama with τ (λ > 0) under the Trainer's own AdamW:
    lr 1e-2 with linear decay, betas (0.9, 0.999), weight decay 0.1 — all wrong for τ."""
    model = tiny_llama(num_layers=2)
    pyflex.patch_model(model, r=4, alpha=8, tau=True, lam=1e-3)
    with torch.no_grad():  # lora_B ≠ 0 from the start, so τ's gradient has its μ part at the first step too
        g = torch.Generator().manual_seed(1)
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    if callable(optimizers):
        optimizers = optimizers(model)
    args = TrainingArguments(output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=2,
                             learning_rate=1e-2, weight_decay=0.1, save_strategy="steps", save_steps=2, logging_steps=1,
                             report_to=[], use_cpu=True, dataloader_num_workers=0, seed=0, disable_tqdm=True, **kwargs)
    trainer = Trainer(model=model, args=args, train_dataset=ToyDataset(), callbacks=callbacks, optimizers=optimizers)
    with pyflex.use_backend("reference"):
        trainer.train(resume_from_checkpoint=resume)
    return trainer


def _adam(grads, lr, betas, eps):
    """Adam by hand in float64 on one scalar from τ0 = 0: the trajectory after each step (PEFT_S eq. 18-22 with
    τ.grad = −g)."""
    tau, m, v, out = 0.0, 0.0, 0.0, []
    for k, g in enumerate(grads, start=1):
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        tau -= lr * (m / (1 - betas[0] ** k)) / ((v / (1 - betas[1] ** k)) ** 0.5 + eps)
        out.append(tau)
    return out


def test_trainer_trains_tau_by_the_peft_s_adam_rule_and_resumes_it(tmp_path):
    raw, callback, taus = GradRecorder(), PyflexCallback(), TauRecorder()
    trainer = _tau_trainer(tmp_path, 4, [raw, callback, taus])
    model_taus = pyflex.tau_parameters(trainer.model)
    (group,) = callback.tau_optimizer.param_groups
    assert {id(p) for p in group["params"]} == {id(t) for t in model_taus} and len(model_taus) == 2 * 7
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (4e-5, (0.9, 0.98), 1e-8, 0.0)
    assert not {id(t) for t in model_taus} & {id(p) for p in trainer.optimizer.optimizer.state}  # never stepped there
    names = list(taus.values[0])
    assert len(names) == 14 and len(raw.grads) == 4
    for name in names:
        grads = [float(g[name]) + lam[name] for g, lam in zip(raw.grads, raw.lambda_terms)]  # μ part + λ part
        assert all(lam[name] < 0 for lam in raw.lambda_terms)
        want = _adam(grads, 4e-5, (0.9, 0.98), 1e-8)
        got = [float(v[name]) for v in taus.values]
        assert got == pytest.approx(want, rel=0, abs=1e-10), name

    # resumed from step 2, τ continues with its Adam state (pyflex_tau_optimizer.pt) to the same values
    assert (tmp_path / "checkpoint-2" / TAU_OPTIMIZER_FILE).is_file()
    resumed = TauRecorder()
    _tau_trainer(tmp_path, 4, [PyflexCallback(), resumed], resume=str(tmp_path / "checkpoint-2"))
    assert len(resumed.values) == 2
    assert all(torch.equal(resumed.values[-1][n], taus.values[-1][n]) for n in names)


def test_trainer_without_the_callback_refuses_to_train_tau_by_its_rule(tmp_path):
    with pytest.raises(RuntimeError, match="PyflexCallback"):
        _tau_trainer(tmp_path, 1, [])


def test_trainer_keeps_a_user_optimizer_with_the_tau_rule(tmp_path):
    callback, taus = PyflexCallback(), TauRecorder()
    make = lambda m: (torch.optim.AdamW(pyflex.tau_param_groups(m, lr=1e-2, tau_alpha=50.0)), None)  # noqa: E731
    _tau_trainer(tmp_path, 1, [callback, taus], optimizers=make, lr_scheduler_type="constant")
    assert callback.tau_optimizer is None
    assert all(float(v) == pytest.approx(50.0 * 4e-5, rel=1e-5) for v in taus.values[0].values())  # first Adam step: lr


def test_trainer_max_grad_norm_clips_adapters_only(tmp_path):
    runs = {}
    for max_norm in (1e-3, 0.0):
        raw, callback, clipped, taus = GradRecorder(), PyflexCallback(), GradRecorder(), TauRecorder()
        trainer = _tau_trainer(tmp_path / str(max_norm), 1, [raw, callback, clipped, taus], max_grad_norm=max_norm)
        runs[max_norm] = (trainer, raw.grads[0], clipped.grads[0], taus.values[0])
    trainer, raw, clipped, tau_clipped = runs[1e-3]
    _, raw_free, _, tau_free = runs[0.0]
    assert raw.keys() == raw_free.keys() and all(torch.equal(raw[n], raw_free[n]) for n in raw)
    adapters = [n for n in raw if not n.endswith(".tau")]
    assert len(adapters) == 2 * 7 * 2 and len(raw) == len(adapters) + 14
    # τ moved exactly as without clipping
    assert all(torch.equal(tau_clipped[n], tau_free[n]) for n in tau_free)
    # the adapters' gradients are torch's clip of the adapters' gradients alone
    want = {n: raw[n].clone() for n in adapters}
    params = []
    for n in adapters:
        params.append(torch.nn.Parameter(torch.zeros_like(want[n])))
        params[-1].grad = want[n]
    norm = torch.nn.utils.clip_grad_norm_(params, 1e-3)
    assert norm > 1e-3
    for n in adapters:
        assert torch.allclose(clipped[n], want[n], rtol=1e-6, atol=0), n
    assert trainer.state.log_history[0]["pyflex/grad_norm"] == pytest.approx(float(norm), rel=1e-6)
    assert trainer.args.max_grad_norm == 1e-3  # the Trainer's setting is back after training
