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


def _run(tmp_path, make_schedule, max_steps=6, resume=None, resume_from=None, trainer_cls=Trainer):
    model = tiny_llama(num_layers=4)
    pyflex.patch_model(model, r=4, alpha=8)
    schedule = make_schedule(model)
    recorder = Recorder(schedule)
    trainer = trainer_cls(model=model, args=_args(tmp_path, max_steps), train_dataset=ToyDataset(),
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
        assert "pyflex/importance/layer_0" in logged[-1] and len(schedule.history) == 2

    # resume from step 3 with a schedule built from another seed: the saved state must win
    _, resumed_schedule, resumed = _run(tmp_path, make(999), resume=str(ckpt))
    assert [s for s in resumed.seen] == full.seen[3:]
    if kind == "ist":
        assert torch.equal(resumed_schedule.scores, schedule.scores)


@pytest.mark.parametrize("trainer_cls", [Trainer, pyflex.Trainer], ids=["hf_trainer", "pyflex_trainer"])
def test_ist_resume_under_trainer_is_bit_exact(tmp_path, trainer_cls):
    """Stopped at step 3 and resumed, IST with the model's own loss and the callback's importance batches ends with
    the uninterrupted run's importance history, active sets and adapters, bit for bit. The importance batch of the
    update at step 4 is the second of the pass: the checkpoint must carry the importance iterator's position.
    The HF Trainer resumes from its full checkpoint, pyflex.Trainer from the adapter files alone."""
    make = lambda seed: (lambda m: ImportanceSchedule(m, n_u=2, t_c=2, n_c=2, seed=seed))  # noqa: E731
    full_trainer, full, full_rec = _run(tmp_path / "full", make(5), max_steps=8, trainer_cls=trainer_cls)
    has_weights = (tmp_path / "full" / "checkpoint-3" / "model.safetensors").is_file()
    assert has_weights == (trainer_cls is Trainer)
    assert [h["step"] for h in full.history] == [2, 4, 6]
    saved = torch.load(tmp_path / "full" / "checkpoint-3" / SCHEDULE_FILE, weights_only=True)
    assert saved["importance_data"]["kind"] == "stateful" and saved["importance_data"]["state"]["position"] == 1

    ckpt = str(tmp_path / "full" / "checkpoint-3")  # another output_dir: the callback is told where to resume from
    resumed_trainer, resumed, resumed_rec = _run(tmp_path / "resumed", make(999), max_steps=8, resume=ckpt,
                                                 resume_from=ckpt, trainer_cls=trainer_cls)
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
    assert [metrics[f"pyflex/importance/layer_{i}"] for i in range(4)] == [0.0] * 4


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


def _adam(grads, lrs, betas, eps):
    """Adam by hand in float64 on one scalar from τ0 = 0, with lr ``lrs[k]`` at step k: the trajectory after each
    step (PEFT_S eq. 18-22 with τ.grad = −g)."""
    tau, m, v, out = 0.0, 0.0, 0.0, []
    for k, (g, lr) in enumerate(zip(grads, lrs), start=1):
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        tau -= lr * (m / (1 - betas[0] ** k)) / ((v / (1 - betas[1] ** k)) ** 0.5 + eps)
        out.append(tau)
    return out


# τ's lr per step under _tau_trainer (lr 1e-2, linear decay to 0 over 4 steps): by default 0.4 × the Trainer's lr of
# that step; with the paper's α·s (tau_s=4e-5) a constant 4e-5.
_TAU_LRS = {"default": ({}, [0.4 * 1e-2 * (1 - k / 4) for k in range(4)]),
            "paper": ({"tau_s": 4e-5}, [4e-5] * 4)}


@pytest.mark.parametrize("tau_lr", sorted(_TAU_LRS))
def test_trainer_trains_tau_by_the_peft_s_adam_rule_and_resumes_it(tmp_path, tau_lr):
    kwargs, lrs = _TAU_LRS[tau_lr]
    raw, callback, taus = GradRecorder(), PyflexCallback(**kwargs), TauRecorder()
    trainer = _tau_trainer(tmp_path, 4, [raw, callback, taus])
    model_taus = pyflex.tau_parameters(trainer.model)
    (group,) = callback.tau_optimizer.param_groups
    assert {id(p) for p in group["params"]} == {id(t) for t in model_taus} and len(model_taus) == 2 * 7
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (lrs[-1], (0.9, 0.98), 1e-8, 0.0)
    assert not {id(t) for t in model_taus} & {id(p) for p in trainer.optimizer.optimizer.state}  # never stepped there
    names = list(taus.values[0])
    assert len(names) == 14 and len(raw.grads) == 4
    for name in names:
        grads = [float(g[name]) + lam[name] for g, lam in zip(raw.grads, raw.lambda_terms)]  # μ part + λ part
        assert all(lam[name] < 0 for lam in raw.lambda_terms)
        want = _adam(grads, lrs, (0.9, 0.98), 1e-8)
        got = [float(v[name]) for v in taus.values]
        assert got == pytest.approx(want, rel=1e-6, abs=1e-10), name

    # resumed from step 2, τ continues with its Adam state (pyflex_tau_optimizer.pt) to the same values
    assert (tmp_path / "checkpoint-2" / TAU_OPTIMIZER_FILE).is_file()
    resumed = TauRecorder()
    _tau_trainer(tmp_path, 4, [PyflexCallback(**kwargs), resumed], resume=str(tmp_path / "checkpoint-2"))
    assert len(resumed.values) == 2
    assert all(torch.equal(resumed.values[-1][n], taus.values[-1][n]) for n in names)


def test_callback_tau_lr_arguments_are_checked():
    assert PyflexCallback().tau_lr is None and PyflexCallback().tau_lr_ratio is None  # the model's default, later
    assert PyflexCallback(tau_alpha=100).tau_lr == pytest.approx(4e-3)
    assert PyflexCallback(tau_lr=1e-3).tau_lr == 1e-3 and PyflexCallback(tau_lr_ratio=2).tau_lr_ratio == 2
    with pytest.raises(ValueError, match="tau_lr=0.001, tau_s=4e-05"):
        PyflexCallback(tau_lr=1e-3, tau_s=4e-5)
    with pytest.raises(ValueError, match="tau_lr_ratio=-1"):
        PyflexCallback(tau_lr_ratio=-1)


def test_trainer_gives_target_sparsity_taus_twice_the_trainer_lr(tmp_path):
    """With target_sparsity the default τ lr is 2 × the Trainer's lr of the step (pyflex/lora/tau.py)."""
    model = tiny_llama(num_layers=2)
    pyflex.patch_model(model, r=4, alpha=8, tau=True, target_sparsity=0.5)
    callback = PyflexCallback()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, learning_rate=1e-2,
                             lr_scheduler_type="constant", save_strategy="no", report_to=[], use_cpu=True,
                             dataloader_num_workers=0, seed=0, disable_tqdm=True)
    taus = TauRecorder()
    Trainer(model=model, args=args, train_dataset=ToyDataset(), callbacks=[callback, taus]).train()
    assert callback.tau_lr_ratio == 2.0 and callback.tau_optimizer.param_groups[0]["lr"] == pytest.approx(2e-2)
    assert all(float(v) > 0 for v in taus.values[0].values())  # nothing masked at first: every τ went up


def test_one_callback_serves_two_trainers_in_turn(tmp_path):
    """A PyflexCallback reused for a second model builds its τ optimizer for that model's τs (it used to keep the
    first model's, so the second Trainer's AdamW met τs with gradients and raised)."""
    callback = PyflexCallback()
    for k, target in enumerate((None, 0.5)):
        model = tiny_llama(num_layers=2)
        pyflex.patch_model(model, r=4, alpha=8, tau=True, **({} if target is None else {"target_sparsity": target}))
        before = [t.detach().clone() for t in pyflex.tau_parameters(model)]
        _train(tmp_path / str(k), model, 2, trainer_cls=Trainer, callbacks=[callback], save_strategy="no")
        assert {id(p) for p in callback.tau_optimizer.param_groups[0]["params"]} == \
            {id(t) for t in pyflex.tau_parameters(model)}
        assert callback.tau_lr_ratio == (0.4 if target is None else 2.0)
        assert all(not torch.equal(a, b) for a, b in zip(before, pyflex.tau_parameters(model)))


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


# -- pyflex.Trainer: adapter-only checkpoints, exact resume, metrics in report_to -----------------------------
def _lora_model(tau=False, r=4):
    """A patched tiny Llama whose lora_B is away from zero (so the adapter changes the logits from the start)."""
    model = tiny_llama(num_layers=2)
    pyflex.patch_model(model, r=r, alpha=8, **(dict(tau=True, lam=1e-3) if tau else {}))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _train(out, model, max_steps, trainer_cls=pyflex.Trainer, resume=None, callbacks=None, **kwargs):
    settings = dict(output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=2, learning_rate=1e-2,
                    save_strategy="steps", save_steps=2, logging_steps=1, report_to=[], use_cpu=True,
                    dataloader_num_workers=0, seed=0, disable_tqdm=True)
    trainer = trainer_cls(model=model, args=TrainingArguments(**{**settings, **kwargs}), train_dataset=ToyDataset(),
                          callbacks=callbacks)
    with pyflex.use_backend("reference"):
        trainer.train(resume_from_checkpoint=resume)
    return trainer


def _adapters(model):
    return {n: p.detach().clone() for n, p in pyflex.get_registry(model).named_adapter_parameters().items()}


def _dir_bytes(path):
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def test_checkpoints_hold_the_adapter_not_the_base_and_save_model_loads_in_pyflex_and_peft(tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    trainer = _train(tmp_path / "pyflex", _lora_model(), 2)
    model = trainer.model
    ckpt = tmp_path / "pyflex" / "checkpoint-2"
    files = set(os.listdir(ckpt))
    assert {"pyflex_adapter.safetensors", "pyflex_config.json", "adapter_model.safetensors", "adapter_config.json",
            "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "training_args.bin"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin", "config.json"}
    adapters = _adapters(model)
    assert set(load_file(str(ckpt / "pyflex_adapter.safetensors"))) == set(adapters)  # no base tensor
    # the HF Trainer on the same patched model writes the frozen base again in every checkpoint
    _train(tmp_path / "hf", _lora_model(), 2, trainer_cls=Trainer)
    hf_ckpt = tmp_path / "hf" / "checkpoint-2"
    base_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n not in adapters)
    assert os.path.getsize(hf_ckpt / "model.safetensors") > base_bytes
    assert _dir_bytes(ckpt) < _dir_bytes(hf_ckpt)  # here the adapter is large next to the base; see README for sizes

    trainer.save_model(str(tmp_path / "final"))
    ids = make_batches(1, batch=2, seq=8)[0]["input_ids"]
    with pyflex.use_backend("reference"), torch.no_grad():
        want = model.eval()(input_ids=ids).logits
        got = pyflex.load_adapter(tiny_llama(num_layers=2).eval(), str(tmp_path / "final"))(input_ids=ids).logits
        assert torch.equal(got, want)
        peft_model = PeftModel.from_pretrained(tiny_llama(num_layers=2).eval(), str(tmp_path / "final"))
        torch.testing.assert_close(peft_model(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("resume_into", ["same_output_dir", "another_output_dir"])
def test_resume_from_an_adapter_checkpoint_is_bit_exact_with_tau(tmp_path, resume_into):
    """τ on: the Trainer's AdamW trains the LoRA, the default PyflexCallback trains τ by its rule; stopped at step 2
    of 5 and resumed from the adapter-only checkpoint, every adapter parameter ends as in the uninterrupted run —
    also when the resumed run writes to another output_dir (pyflex.Trainer tells its callback where the checkpoint
    is)."""
    full = _train(tmp_path, _lora_model(tau=True), 5)
    (callback,) = [cb for cb in full.callback_handler.callbacks if isinstance(cb, PyflexCallback)]
    assert callback.tau_optimizer is not None  # added by pyflex.Trainer, not by the test
    ckpt = tmp_path / "checkpoint-2"
    assert (ckpt / TAU_OPTIMIZER_FILE).is_file() and not (ckpt / "model.safetensors").exists()
    assert not (ckpt / "adapter_model.safetensors").exists()  # τ has no PEFT form
    want = _adapters(full.model)
    fresh = _lora_model(tau=True)
    before = _adapters(fresh)
    out = tmp_path if resume_into == "same_output_dir" else tmp_path / "elsewhere"
    resumed = _train(out, fresh, 5, resume=str(ckpt))
    (callback,) = [cb for cb in resumed.callback_handler.callbacks if isinstance(cb, PyflexCallback)]
    assert callback.resumed_from == str(ckpt)
    got = _adapters(resumed.model)
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)
    assert any(not torch.equal(got[n], before[n]) for n in want)
    losses = lambda t: [(h["step"], h["loss"]) for h in t.state.log_history if "loss" in h]  # noqa: E731
    assert losses(resumed) == losses(full)  # the steps after 2 were run again and gave the same losses


def test_resume_into_a_differently_patched_model_or_a_checkpoint_without_adapter_is_an_error(tmp_path):
    _train(tmp_path, _lora_model(), 2)
    with pytest.raises(ValueError, match=r"other settings.*\br: model 8, file 4"):
        _train(tmp_path, _lora_model(r=8), 4, resume=str(tmp_path / "checkpoint-2"))
    os.remove(tmp_path / "checkpoint-2" / "pyflex_adapter.safetensors")
    with pytest.raises(FileNotFoundError, match="pyflex_adapter.safetensors"):
        _train(tmp_path, _lora_model(), 4, resume=str(tmp_path / "checkpoint-2"))


def test_load_best_model_at_end_loads_the_best_adapter(tmp_path):
    # eval loss with "greater is better": the best checkpoint is the first one, not the last, so loading it shows
    args = dict(eval_strategy="steps", eval_steps=2, load_best_model_at_end=True, metric_for_best_model="loss",
                greater_is_better=True)
    model = _lora_model()
    trainer = pyflex.Trainer(model=model, args=TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2, learning_rate=1e-2,
        save_strategy="steps", save_steps=2, logging_steps=1, report_to=[], use_cpu=True, dataloader_num_workers=0,
        seed=0, disable_tqdm=True, **args), train_dataset=ToyDataset(), eval_dataset=ToyDataset(8))
    with pyflex.use_backend("reference"):
        trainer.train()
    from safetensors.torch import load_file
    best = trainer.state.best_model_checkpoint
    assert best is not None and best.endswith("checkpoint-2")
    saved = load_file(os.path.join(best, "pyflex_adapter.safetensors"))
    last = load_file(str(tmp_path / "checkpoint-4" / "pyflex_adapter.safetensors"))
    now = _adapters(model)
    assert all(torch.equal(now[n], saved[n]) for n in saved)
    assert any(not torch.equal(now[n], last[n]) for n in last)


class _Scalars:
    """Every scalar TensorBoard recorded under ``root``: tag → [(step, value)]."""

    def __init__(self, root):
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        self.values = {}
        for dirpath, _, files in os.walk(root):
            if any(f.startswith("events.out.tfevents") for f in files):
                acc = EventAccumulator(dirpath)
                acc.Reload()
                for tag in acc.Tags()["scalars"]:
                    self.values[tag] = [(e.step, e.value) for e in acc.Scalars(tag)]


@pytest.mark.parametrize("kind", ["ist", "lift"])
def test_pyflex_metrics_reach_tensorboard(tmp_path, kind):
    pytest.importorskip("tensorboard")
    model = tiny_llama(num_layers=4)
    pyflex.patch_model(model, r=4, alpha=8, tau=True)
    schedule = (ImportanceSchedule(model, n_u=2, t_c=2, n_c=2) if kind == "ist" else LiftSchedule(model))
    trainer = _train(tmp_path, model, 4, callbacks=[PyflexCallback(schedule)], report_to=["tensorboard"],
                     save_strategy="no")
    scalars = _Scalars(tmp_path).values
    layers = range(4)
    expected = {"train/pyflex/grad_norm", "train/pyflex/tau_sparsity", "train/pyflex/active_layers",
                "train/pyflex/schedule_step"}
    expected |= {f"train/pyflex/{group}/layer_{i}" for group in ("tau", "tau_sparsity", "active") for i in layers}
    if kind == "ist":
        expected |= {"train/pyflex/ist_rounds"} | {f"train/pyflex/importance/layer_{i}" for i in layers}
    else:
        expected |= {"train/pyflex/lift_block", "train/pyflex/lift_progress"}
    assert expected <= set(scalars), sorted(expected - set(scalars))
    history = {h["step"]: h for h in trainer.state.log_history if "loss" in h}
    assert sorted(history) == [1, 2, 3, 4]
    for tag in expected:  # the values TensorBoard holds are the logged ones, at their steps
        key = tag[len("train/"):]
        assert [s for s, _ in scalars[tag]] == [1, 2, 3, 4], tag
        assert [v for _, v in scalars[tag]] == pytest.approx([history[s][key] for s in (1, 2, 3, 4)], rel=1e-6), tag
    if kind == "lift":
        assert [v for _, v in scalars["train/pyflex/lift_block"]] == [0.0, 1.0, 2.0, 3.0]  # one block per step
        assert [v for _, v in scalars["train/pyflex/lift_progress"]] == [0.25, 0.5, 0.75, 1.0]
    else:
        assert [v for _, v in scalars["train/pyflex/ist_rounds"]] == [0.0, 0.0, 1.0, 1.0]  # a round before step 3
        assert any(v != 0.0 for i in layers for _, v in scalars[f"train/pyflex/importance/layer_{i}"])
        for step in (1, 2, 3, 4):
            assert sum(history[step][f"pyflex/active/layer_{i}"] for i in layers) == 2.0


def test_a_plain_trainer_keeps_the_metrics_in_its_log_history(tmp_path):
    """Without pyflex.Trainer the reporters run before the callback (transformers orders them first); the metrics
    still reach the log history."""
    model = _lora_model(tau=True)
    trainer = _train(tmp_path, model, 2, trainer_cls=Trainer, callbacks=[PyflexCallback()], save_strategy="no")
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2 and all("pyflex/tau/layer_1" in h and "pyflex/grad_norm" in h for h in logged)
    summary = trainer.state.log_history[-1]
    assert "train_runtime" in summary and not any(k.startswith("pyflex/") for k in summary)
