"""HF Trainer integration: :class:`PyflexCallback` drives a layer schedule and saves it with checkpoints.

    schedule = ImportanceSchedule(model)          # build before the Trainer creates its optimizer
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[PyflexCallback(schedule)])
    trainer.train()                               # or trainer.train(resume_from_checkpoint=True)

* ``on_train_begin``: attaches the Trainer's optimizer to the schedule (LIFT full mode frees state through it; the
  check that every schedulable parameter is in the optimizer runs here), gives a LIFT schedule built without
  ``total_steps`` the Trainer's ``max_steps``, and, when the run resumes
  (``state.global_step > 0``), loads the schedule state saved in that checkpoint.
* ``on_step_begin``: ``schedule.step(...)`` before the forward of every optimizer step. The callback cannot see
  the Trainer's batch, so IST draws its importance batches from ``importance_dataloader``, or else from a fresh
  iterator over the Trainer's train dataloader (a separate shuffled pass over the training set, as the official
  IST code does).
* ``on_save``: writes ``pyflex_schedule.pt`` (the schedule's ``state_dict()``) into ``checkpoint-<step>``.
* ``on_log``: adds ``pyflex/active_layers`` (count), ``pyflex/tau_sparsity`` (mean over τ-masked layers of the
  last forward) and ``pyflex/importance_<layer>`` (IST) to the logs.
"""
from __future__ import annotations

import os
from typing import Iterable, Optional

import torch
from transformers import TrainerCallback

SCHEDULE_FILE = "pyflex_schedule.pt"

__all__ = ["PyflexCallback", "SCHEDULE_FILE"]


class PyflexCallback(TrainerCallback):
    """Drive ``schedule`` from the HF Trainer.

    Args:
        schedule: an :class:`~pyflex.schedules.ImportanceSchedule` or :class:`~pyflex.schedules.LiftSchedule`.
        importance_dataloader: batches for IST's importance forwards (ignored by LIFT).
        resume_from: checkpoint directory to restore the schedule from; default: ``checkpoint-<global_step>`` under
            ``args.output_dir`` (or ``args.resume_from_checkpoint`` when it is a path).
    """

    def __init__(self, schedule, importance_dataloader: Optional[Iterable] = None, resume_from: Optional[str] = None):
        self.schedule = schedule
        self.importance_dataloader = importance_dataloader
        self.resume_from = resume_from
        self.resumed_from: Optional[str] = None

    # -- helpers ----------------------------------------------------------------------------------
    def _checkpoint_dir(self, args, state) -> Optional[str]:
        if self.resume_from:
            return self.resume_from
        candidates = []
        resume = getattr(args, "resume_from_checkpoint", None)
        if isinstance(resume, str) and resume:
            candidates.append(resume)
        candidates.append(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))
        for path in candidates:
            if os.path.isfile(os.path.join(path, SCHEDULE_FILE)):
                return path
        return None

    # -- events -----------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, optimizer=None, train_dataloader=None, **kwargs):
        if optimizer is not None:
            self.schedule.attach_optimizer(optimizer)
        if hasattr(self.schedule, "set_total_steps") and self.schedule.total_steps is None and state.global_step == 0:
            self.schedule.set_total_steps(int(state.max_steps))
        if hasattr(self.schedule, "importance_data") and self.schedule.importance_data is None:
            self.schedule.importance_data = self.importance_dataloader or train_dataloader
        if state.global_step > 0:
            path = self._checkpoint_dir(args, state)
            if path is None:
                raise RuntimeError(f"resuming at step {state.global_step} but no {SCHEDULE_FILE} was found in "
                                   f"{os.path.join(args.output_dir, f'checkpoint-{state.global_step}')}; pass "
                                   "PyflexCallback(..., resume_from=<checkpoint dir>) so the schedule continues exactly")
            self.schedule.load_state_dict(torch.load(os.path.join(path, SCHEDULE_FILE), weights_only=True))
            self.resumed_from = path
        return control

    def on_step_begin(self, args, state, control, **kwargs):
        self.schedule.step()
        return control

    def on_save(self, args, state, control, **kwargs):
        path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if getattr(state, "is_world_process_zero", True):
            os.makedirs(path, exist_ok=True)
            torch.save(self.schedule.state_dict(), os.path.join(path, SCHEDULE_FILE))
        return control

    def metrics(self) -> dict:
        """Numbers worth logging now."""
        out = {"pyflex/active_layers": float(len(self.schedule.active_layers))}
        sparsities = [v for v in self.schedule.registry.tau_sparsity().values() if v is not None]
        if sparsities:
            out["pyflex/tau_sparsity"] = sum(sparsities) / len(sparsities)
        importance = getattr(self.schedule, "importance", None)
        if isinstance(importance, torch.Tensor):
            for layer, value in zip(self.schedule.layers, importance.tolist()):
                out[f"pyflex/importance_{layer}"] = value
        return out

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None:
            return control
        extra = self.metrics()
        logs.update(extra)
        # The Trainer appended a copy of the logs to the history before calling back; keep both in step.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)
        return control
