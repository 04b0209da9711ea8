"""PyflexCallback with the HF Trainer: drives the schedule, saves it in checkpoints, resumes it exactly."""
import os

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

import pyflex
from pyflex.callbacks import SCHEDULE_FILE, PyflexCallback
from pyflex.schedules import ImportanceSchedule, LiftSchedule

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


def _run(tmp_path, make_schedule, max_steps=6, resume=None):
    model = tiny_llama(num_layers=4)
    pyflex.patch_model(model, r=4, alpha=8)
    schedule = make_schedule(model)
    recorder = Recorder(schedule)
    trainer = Trainer(model=model, args=_args(tmp_path, max_steps), train_dataset=ToyDataset(),
                      callbacks=[PyflexCallback(schedule), recorder])
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


def test_resume_without_schedule_file_is_an_error(tmp_path):
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
