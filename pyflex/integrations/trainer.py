"""HF Trainer integration: :class:`PyflexCallback` trains τ by PEFT_S's rule, keeps τ out of gradient clipping,
drives a layer schedule and saves all of it with checkpoints.

    schedule = ImportanceSchedule(model)          # optional; build before the Trainer creates its optimizer
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[PyflexCallback(schedule)])
    trainer.train()                               # or trainer.train(resume_from_checkpoint=True)

* τ (PEFT_S, eq. 18-22): the Trainer's own optimizer puts τ in its AdamW groups (its lr, betas (0.9, 0.999),
  weight decay, lr schedule). When a τ is not in an Adam group of τ alone with betas (0.9, 0.98) and no weight
  decay (what :func:`pyflex.tau_param_groups` builds; such a user optimizer, passed with ``optimizers=``, is left
  alone), the callback trains it itself: ``on_train_begin`` builds ``tau_optimizer``, ``torch.optim.Adam`` with
  lr = tau_alpha·tau_s, betas (0.9, 0.98), no weight decay and a constant lr (eq. 22 has no schedule);
  ``on_pre_optimizer_step`` takes τ's gradients away so the Trainer's optimizer skips τ (AdamW skips parameters
  without a gradient: no update, no decay, no state), and ``on_optimizer_step`` hands them back and steps
  ``tau_optimizer`` (unless the Trainer's step was skipped on an fp16 overflow). Without the callback, the first
  optimizer step that would move τ by another rule raises (:mod:`pyflex.lora.tau`).
* Clipping: τ's gradient is a sum over tokens and would dominate a global norm. ``on_train_begin`` takes the
  Trainer's ``args.max_grad_norm`` (restored in ``on_train_end``; checkpoints written meanwhile record 0) so the
  Trainer does not clip, and ``on_pre_optimizer_step`` clips with :func:`pyflex.clip_grad_norm_`: every trainable
  parameter except τ. The adapters' norm before clipping is logged as ``pyflex/grad_norm`` (the Trainer's
  ``grad_norm`` is then the unclipped norm of all gradients, τ's included). Under DeepSpeed (which clips inside its
  engine) and FSDP1 (flat sharded gradients) the Trainer keeps clipping, with a warning.
* ``on_train_begin`` also attaches the optimizers to the schedule (the check that every schedulable parameter is
  in them runs here), gives a LIFT schedule built without ``total_steps`` the Trainer's ``max_steps`` (a different
  ``total_steps`` is kept, with a warning), gives IST an :class:`~pyflex.methods.ist.ImportanceBatches` over the
  Trainer's training set (a separate shuffled pass, as the official IST code does, whose position is checkpointed)
  unless ``importance_dataloader`` is given, and, when the run resumes (``state.global_step > 0``), loads the
  schedule and ``tau_optimizer`` states saved in that checkpoint.
* ``on_step_begin``: ``schedule.step()`` before the forward of every optimizer step.
* ``on_save``: writes ``pyflex_schedule.pt`` (the schedule's ``state_dict()``) and ``pyflex_tau_optimizer.pt``
  into ``checkpoint-<step>``.
* ``on_log``: adds ``pyflex/active_layers`` (count), ``pyflex/tau_sparsity`` (mean over τ-masked layers of the
  last forward), ``pyflex/importance_<layer>`` (IST) and ``pyflex/grad_norm`` to the logs.
"""
from __future__ import annotations

import os
import warnings
from typing import Iterable, List, Optional, Tuple

import torch
from transformers import TrainerCallback

from pyflex.lora import tau_lambda
from pyflex.lora.tau import TAU_ALPHA, TAU_BETAS, TAU_EPS, TAU_GROUP_NAME, TAU_S, is_tau_rule_group
from pyflex.model.optim import clip_grad_norm_, has_fsdp1, tau_parameters

SCHEDULE_FILE = "pyflex_schedule.pt"
TAU_OPTIMIZER_FILE = "pyflex_tau_optimizer.pt"

__all__ = ["PyflexCallback", "SCHEDULE_FILE", "TAU_OPTIMIZER_FILE"]


class PyflexCallback(TrainerCallback):
    """Train τ by PEFT_S's rule, clip adapters only, and drive ``schedule`` from the HF Trainer.

    Args:
        schedule: an :class:`~pyflex.methods.ist.ImportanceSchedule` or :class:`~pyflex.methods.lift.LiftSchedule`, or
            None (a patched model without a schedule: τ and clipping only).
        importance_dataloader: batches for IST's importance forwards (ignored by LIFT).
        resume_from: checkpoint directory to restore from; default: ``checkpoint-<global_step>`` under
            ``args.output_dir`` (or ``args.resume_from_checkpoint`` when it is a path).
        tau_alpha, tau_s, tau_betas, tau_eps: τ's Adam rule (lr = tau_alpha·tau_s), PEFT_S's defaults.

    Attributes:
        tau_optimizer: the Adam that trains τ (None when τ is off or the Trainer's optimizer already has the rule).
        max_grad_norm: the Trainer's ``max_grad_norm`` this callback applies (None when it does not clip).
        last_grad_norm: the adapters' gradient norm before the last clipping.
    """

    def __init__(self, schedule=None, importance_dataloader: Optional[Iterable] = None,
                 resume_from: Optional[str] = None, *, tau_alpha: float = TAU_ALPHA, tau_s: float = TAU_S,
                 tau_betas: Tuple[float, float] = TAU_BETAS, tau_eps: float = TAU_EPS):
        for arg, value in (("tau_alpha", tau_alpha), ("tau_s", tau_s)):
            if not value > 0:
                raise ValueError(f"{arg}={value!r} is not allowed; it must be > 0")
        self.schedule = schedule
        self.importance_dataloader = importance_dataloader
        self.resume_from = resume_from
        self.resumed_from: Optional[str] = None
        self.tau_lr, self.tau_betas, self.tau_eps = tau_alpha * tau_s, tuple(tau_betas), tau_eps
        self.tau_optimizer: Optional[torch.optim.Adam] = None
        self._taus: List[torch.nn.Parameter] = []
        self._tau_grads: list = []
        self.max_grad_norm: Optional[float] = None
        self.last_grad_norm: Optional[torch.Tensor] = None
        self._registry = schedule.registry if schedule is not None else None

    # -- helpers ----------------------------------------------------------------------------------
    def _files(self) -> List[str]:
        """The files this callback needs in a checkpoint to resume exactly."""
        return ([SCHEDULE_FILE] if self.schedule is not None else []) + \
               ([TAU_OPTIMIZER_FILE] if self.tau_optimizer is not None else [])

    def _checkpoint_dir(self, args, state) -> Optional[str]:
        if self.resume_from:
            return self.resume_from
        candidates = []
        resume = getattr(args, "resume_from_checkpoint", None)
        if isinstance(resume, str) and resume:
            candidates.append(resume)
        candidates.append(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))
        for path in candidates:
            if all(os.path.isfile(os.path.join(path, f)) for f in self._files()):
                return path
        return None

    def _take_over_clipping(self, args, model) -> None:
        if not args.max_grad_norm or args.max_grad_norm <= 0:
            return
        if getattr(args, "deepspeed", None) or has_fsdp1(model):
            warnings.warn("PyflexCallback leaves gradient clipping to the Trainer under DeepSpeed or FSDP1, so τ's "
                          "gradient is inside its global norm; set max_grad_norm=0 to turn clipping off",
                          stacklevel=2)
            return
        self.max_grad_norm, args.max_grad_norm = float(args.max_grad_norm), 0.0

    def _take_over_tau(self, model, optimizer) -> None:
        """Build ``tau_optimizer`` for every τ the Trainer's optimizer would train by another rule (or not at all)."""
        inner = getattr(optimizer, "optimizer", optimizer)
        ruled = {id(p) for g in (inner.param_groups if inner is not None else [])
                 if is_tau_rule_group(inner, g, self.tau_betas) for p in g["params"]}
        self._taus = [t for t in tau_parameters(model) if id(t) not in ruled]
        if self._taus:
            self.tau_optimizer = torch.optim.Adam([{"params": self._taus, "name": TAU_GROUP_NAME}], lr=self.tau_lr,
                                                  betas=self.tau_betas, eps=self.tau_eps, weight_decay=0.0)

    # -- events -----------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        if model is not None:
            from pyflex.model.patch import get_registry, is_patched
            if is_patched(model):
                self._registry = get_registry(model)
            self._take_over_clipping(args, model)
            if self.tau_optimizer is None:
                self._take_over_tau(model, optimizer)
        schedule = self.schedule
        if schedule is not None:
            if optimizer is not None:
                schedule.attach_optimizer(optimizer, *([self.tau_optimizer] if self.tau_optimizer else []))
            if hasattr(schedule, "set_total_steps") and schedule.total_steps is None and state.global_step == 0:
                schedule.set_total_steps(int(state.max_steps))
            if hasattr(schedule, "importance_data") and schedule.importance_data is None:
                schedule.importance_data = (self.importance_dataloader
                                            or self._importance_batches(args, train_dataloader))
        if state.global_step > 0 and self._files():
            path = self._checkpoint_dir(args, state)
            if path is None:
                raise RuntimeError(f"resuming at step {state.global_step} but {' and '.join(self._files())} were not "
                                   f"found in {os.path.join(args.output_dir, f'checkpoint-{state.global_step}')}; "
                                   "pass PyflexCallback(..., resume_from=<checkpoint dir>) so the run continues "
                                   "exactly")
            if schedule is not None:
                schedule.load_state_dict(torch.load(os.path.join(path, SCHEDULE_FILE), weights_only=True))
            if self.tau_optimizer is not None:
                self.tau_optimizer.load_state_dict(torch.load(os.path.join(path, TAU_OPTIMIZER_FILE),
                                                              weights_only=True))
            self.resumed_from = path
        total = getattr(schedule, "total_steps", None)
        if total is not None and total != state.max_steps:
            warnings.warn(f"LiftSchedule has total_steps={total} but the Trainer runs max_steps={state.max_steps}: "
                          "the block sequence covers total_steps and "
                          + ("wraps around" if total < state.max_steps else "is cut short")
                          + "; build the schedule without total_steps to take the Trainer's", stacklevel=2)
        return control

    def _importance_batches(self, args, train_dataloader):
        from pyflex.methods.ist import ImportanceBatches

        dataset = getattr(train_dataloader, "dataset", None)
        if dataset is None or isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__len__"):
            raise ValueError("IST needs importance batches and the Trainer's training set is not map-style; pass "
                             "PyflexCallback(schedule, importance_dataloader=<iterable of batches>)")
        return ImportanceBatches(dataset, args.per_device_train_batch_size, train_dataloader.collate_fn,
                                 seed=self.schedule.seed)

    def on_step_begin(self, args, state, control, **kwargs):
        if self.schedule is not None:
            self.schedule.step()
        return control

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.max_grad_norm is not None:
            self.last_grad_norm = clip_grad_norm_(model, self.max_grad_norm)  # a tensor: read (synced) at log time
        if self.tau_optimizer is not None:
            # τ.grad holds the μ part; the λ part (pyflex.lora.tau_lambda) is added by an optimizer step pre-hook, which
            # would run for the Trainer's optimizer below, find τ.grad hidden and drop the count: add it now
            # (grads are unscaled here, and the hook sums the counts over ranks)
            tau_lambda.add_lambda_terms(self.tau_optimizer)
            # hidden from the Trainer's optimizer, which would apply its own lr, betas and weight decay
            self._tau_grads = [t.grad for t in self._taus]
            for t in self._taus:
                t.grad = None
        return control

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if self.tau_optimizer is not None:
            for t, g in zip(self._taus, self._tau_grads):
                t.grad = g
            self._tau_grads = []
            if not getattr(optimizer, "step_was_skipped", False):  # fp16: an overflow skips the whole step
                self.tau_optimizer.step()
            self.tau_optimizer.zero_grad(set_to_none=True)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self.max_grad_norm is not None:
            args.max_grad_norm, self.max_grad_norm = self.max_grad_norm, None
        return control

    def on_save(self, args, state, control, **kwargs):
        path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if getattr(state, "is_world_process_zero", True):
            os.makedirs(path, exist_ok=True)
            if self.schedule is not None:
                torch.save(self.schedule.state_dict(), os.path.join(path, SCHEDULE_FILE))
            if self.tau_optimizer is not None:
                torch.save(self.tau_optimizer.state_dict(), os.path.join(path, TAU_OPTIMIZER_FILE))
        return control

    def metrics(self) -> dict:
        """Numbers worth logging now."""
        out = {}
        if self.schedule is not None:
            out["pyflex/active_layers"] = float(len(self.schedule.active_layers))
        if self._registry is not None:
            sparsities = [v for v in self._registry.tau_sparsity().values() if v is not None]
            if sparsities:
                out["pyflex/tau_sparsity"] = sum(sparsities) / len(sparsities)
        importance = getattr(self.schedule, "importance", None)
        if isinstance(importance, torch.Tensor):
            for layer, value in zip(self.schedule.layers, importance.tolist()):
                out[f"pyflex/importance_{layer}"] = value
        if self.last_grad_norm is not None:
            out["pyflex/grad_norm"] = float(self.last_grad_norm)
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
