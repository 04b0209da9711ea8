"""HF Trainer integration: :class:`PyflexCallback` trains τ by PEFT_S's rule, keeps τ out of gradient clipping,
drives a layer schedule and saves all of it with checkpoints.

    schedule = ImportanceSchedule(model)          # optional; build before the Trainer creates its optimizer
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[PyflexCallback(schedule)])
    trainer.train()                               # or trainer.train(resume_from_checkpoint=True)

* τ (PEFT_S, eq. 18-22): the Trainer's own optimizer puts τ in its AdamW groups (its lr, betas (0.9, 0.999),
  weight decay, lr schedule). When a τ is not in an Adam group of τ alone with betas (0.9, 0.98) and no weight
  decay (what :func:`pyflex.tau_param_groups` builds; such a user optimizer, passed with ``optimizers=``, is left
  alone), the callback trains it itself: ``on_train_begin`` builds ``tau_optimizer``, ``torch.optim.Adam`` with
  betas (0.9, 0.98), no weight decay and τ's lr: by default 0.4 × the Trainer's current lr at every step (the
  paper's ratio of τ's step to the adapters' lr, following the Trainer's lr schedule as a ``tau_param_groups``
  group does), or a constant absolute lr when ``tau_lr`` or ``tau_alpha``/``tau_s`` is given (``tau_s=4e-5``: the
  paper's α·s exactly; eq. 22 has no schedule);
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
* Logs (:meth:`PyflexCallback.metrics`), added to every training log: ``pyflex/grad_norm``; with τ,
  ``pyflex/tau_sparsity`` (mean over τ-masked layers of the last forward) and per layer
  ``pyflex/tau_sparsity/layer_<i>`` and ``pyflex/tau/layer_<i>`` (mean τ of the layer's masked modules); with a
  schedule, ``pyflex/active_layers`` (count), ``pyflex/schedule_step`` and ``pyflex/active/layer_<i>`` (1 when layer
  i trains at this step), for IST ``pyflex/importance/layer_<i>`` and ``pyflex/ist_rounds`` (importance rounds done),
  for LIFT ``pyflex/lift_block`` (the active block) and ``pyflex/lift_progress`` (fraction of ``total_steps`` done).
  ``<i>`` is the registry's layer index, zero-padded to the width of the last one (``layer_07`` of 32 layers) so
  TensorBoard lists the layers in order.

Reaching ``report_to``: the Trainer calls its reporting callbacks (TensorBoard, W&B, ...) *before* the callbacks it
was given, so values a callback adds in ``on_log`` reach ``trainer.state.log_history`` but not the reporters.
:class:`Trainer` (this module; ``pyflex.Trainer``) adds them in ``Trainer.log`` before any callback runs, so they
reach every reporter; it also adds a ``PyflexCallback()`` to a patched model's Trainer that has none, and writes
adapter-only checkpoints (:mod:`pyflex.integrations.checkpoints`).
"""
from __future__ import annotations

import logging
import os
import warnings
from typing import Iterable, List, Optional, Tuple

import torch
import transformers
from transformers import TrainerCallback

from pyflex.integrations.checkpoints import has_checkpoint_adapter, load_checkpoint_adapter, save_checkpoint_adapter
from pyflex.lora import tau_lambda
from pyflex.lora.tau import TAU_BETAS, TAU_EPS, TAU_GROUP_NAME, is_tau_rule_group, resolve_tau_lr
from pyflex.methods.ist import ImportanceSchedule
from pyflex.methods.lift import LiftSchedule
from pyflex.model.optim import clip_grad_norm_, default_tau_lr_ratio, has_fsdp1, tau_parameters
from pyflex.model.patch import is_patched

SCHEDULE_FILE = "pyflex_schedule.pt"
TAU_OPTIMIZER_FILE = "pyflex_tau_optimizer.pt"
# What transformers' Trainer names these files (transformers.utils / transformers.trainer); spelled out here so this
# module does not depend on where a release keeps the constants.
_FULL_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                      "pytorch_model.bin.index.json")
_TRAINING_ARGS_FILE = "training_args.bin"

__all__ = ["PyflexCallback", "PyflexTrainerMixin", "Trainer", "SCHEDULE_FILE", "TAU_OPTIMIZER_FILE"]

logger = logging.getLogger(__name__)


class PyflexCallback(TrainerCallback):
    """Train τ by PEFT_S's rule, clip adapters only, and drive ``schedule`` from the HF Trainer.

    Args:
        schedule: an :class:`~pyflex.methods.ist.ImportanceSchedule` or :class:`~pyflex.methods.lift.LiftSchedule`, or
            None (a patched model without a schedule: τ and clipping only).
        importance_dataloader: batches for IST's importance forwards (ignored by LIFT).
        resume_from: checkpoint directory to restore from; default: ``checkpoint-<global_step>`` under
            ``args.output_dir`` (or ``args.resume_from_checkpoint`` when it is a path).
        tau_lr, tau_lr_ratio, tau_alpha, tau_s: τ's lr, one way at most (as :func:`pyflex.tau_param_groups`):
            default 0.4 × the Trainer's current lr (2 × with a target sparsity); ``tau_lr_ratio`` × that lr;
            ``tau_lr`` or α·s (constant).
        tau_betas, tau_eps: τ's Adam betas (PEFT_S's (0.9, 0.98)) and ε.

    Attributes:
        tau_optimizer: the Adam that trains τ (None when τ is off or the Trainer's optimizer already has the rule).
        max_grad_norm: the Trainer's ``max_grad_norm`` this callback applies (None when it does not clip).
        last_grad_norm: the adapters' gradient norm before the last clipping.
    """

    def __init__(self, schedule=None, importance_dataloader: Optional[Iterable] = None,
                 resume_from: Optional[str] = None, *, tau_lr: Optional[float] = None,
                 tau_lr_ratio: Optional[float] = None, tau_alpha: Optional[float] = None,
                 tau_s: Optional[float] = None, tau_betas: Tuple[float, float] = TAU_BETAS, tau_eps: float = TAU_EPS):
        # tau_lr: the absolute lr, or None when τ's lr is tau_lr_ratio × the Trainer's lr at each step
        # (tau_lr_ratio given, or the model's default, settled at each on_train_begin)
        self.tau_lr, _ = resolve_tau_lr(None, tau_lr, tau_alpha, tau_s, tau_lr_ratio)
        self._tau_lr_ratio_given = tau_lr_ratio
        self.tau_lr_ratio: Optional[float] = tau_lr_ratio
        self.schedule = schedule
        self.importance_dataloader = importance_dataloader
        self.resume_from = resume_from
        self.resumed_from: Optional[str] = None
        # the checkpoint pyflex.Trainer resumes from (train(resume_from_checkpoint=path)), told before on_train_begin
        self.trainer_checkpoint: Optional[str] = None
        self.tau_betas, self.tau_eps = tuple(tau_betas), tau_eps
        self.tau_optimizer: Optional[torch.optim.Adam] = None
        self._taus: List[torch.nn.Parameter] = []
        self._tau_grads: list = []
        self.max_grad_norm: Optional[float] = None
        self.last_grad_norm: Optional[torch.Tensor] = None
        self._registry = schedule.registry if schedule is not None else None
        self._logs_with_metrics = None  # the logs dict :meth:`add_metrics` already completed (see Trainer.log)

    # -- helpers ----------------------------------------------------------------------------------
    def _files(self) -> List[str]:
        """The files this callback needs in a checkpoint to resume exactly."""
        return ([SCHEDULE_FILE] if self.schedule is not None else []) + \
               ([TAU_OPTIMIZER_FILE] if self.tau_optimizer is not None else [])

    def _checkpoint_dir(self, args, state) -> Optional[str]:
        if self.resume_from:
            return self.resume_from
        candidates = [self.trainer_checkpoint] if self.trainer_checkpoint else []
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

    def _take_over_tau(self, args, model, optimizer) -> None:
        """Build ``tau_optimizer`` for every τ the Trainer's optimizer would train by another rule (or not at all)."""
        inner = getattr(optimizer, "optimizer", optimizer)
        ruled = {id(p) for g in (inner.param_groups if inner is not None else [])
                 if is_tau_rule_group(inner, g, self.tau_betas) for p in g["params"]}
        self._taus = [t for t in tau_parameters(model) if id(t) not in ruled]
        self.tau_optimizer = None
        if self._taus:
            if self.tau_lr is None:
                self.tau_lr_ratio = (self._tau_lr_ratio_given if self._tau_lr_ratio_given is not None
                                     else default_tau_lr_ratio(model))
            lr = self.tau_lr if self.tau_lr is not None else self.tau_lr_ratio * args.learning_rate
            self.tau_optimizer = torch.optim.Adam([{"params": self._taus, "name": TAU_GROUP_NAME}], lr=lr,
                                                  betas=self.tau_betas, eps=self.tau_eps, weight_decay=0.0)

    # -- events -----------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        if model is not None:
            from pyflex.model.patch import get_registry, is_patched
            if is_patched(model):
                self._registry = get_registry(model)
            self._take_over_clipping(args, model)
            # built anew for every run, as the Trainer builds its optimizer: a callback reused for another model or
            # another train() call must not keep the previous run's τs
            self._take_over_tau(args, model, optimizer)
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
            if self.tau_lr is None and optimizer is not None:  # the lr the Trainer's step just used
                for group in self.tau_optimizer.param_groups:
                    group["lr"] = self.tau_lr_ratio * optimizer.param_groups[0]["lr"]
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
        """Numbers worth logging now (the keys are listed in the module docstring). Reads τ and the masks of the
        last forward with one host sync each."""
        out = {}
        registry = self._registry
        schedule = self.schedule
        width = len(str(max(registry.num_layers - 1, 0))) if registry is not None else 1
        key = lambda group, i: f"pyflex/{group}/layer_{i:0{width}d}"  # noqa: E731
        if schedule is not None:
            active = set(schedule.active_layers)
            out["pyflex/active_layers"] = float(len(active))
            out["pyflex/schedule_step"] = float(schedule.step_count)
            for i in schedule.layers:
                out[key("active", i)] = float(i in active)
            if isinstance(schedule, LiftSchedule):
                if active:
                    out["pyflex/lift_block"] = float(schedule.active_layers[0])
                if schedule.total_steps:
                    out["pyflex/lift_progress"] = min(schedule.step_count, schedule.total_steps) / schedule.total_steps
            if isinstance(schedule, ImportanceSchedule):
                out["pyflex/ist_rounds"] = float(len(schedule.history))
                for i, value in zip(schedule.layers, schedule.importance.tolist()):
                    out[key("importance", i)] = value
        if registry is not None:
            sparsity = {i: v for i, v in registry.tau_sparsity().items() if v is not None}
            if sparsity:
                out["pyflex/tau_sparsity"] = sum(sparsity.values()) / len(sparsity)
                for i, value in sparsity.items():
                    out[key("tau_sparsity", i)] = value
            taus = [(h.index, m.tau) for h in registry.layers for m in h.adapters.values()
                    if isinstance(getattr(m, "tau", None), torch.nn.Parameter)]
            if taus:
                values = torch.stack([t.detach().float().reshape(()).to(taus[0][1].device) for _, t in taus]).tolist()
                per_layer: dict = {}
                for (i, _), value in zip(taus, values):
                    per_layer.setdefault(i, []).append(value)
                for i, layer_values in per_layer.items():
                    out[key("tau", i)] = sum(layer_values) / len(layer_values)
        if self.last_grad_norm is not None:
            out["pyflex/grad_norm"] = float(self.last_grad_norm)
        return out

    def add_metrics(self, logs: dict) -> None:
        """Put :meth:`metrics` into ``logs`` (what :class:`Trainer` does before its reporters see them)."""
        logs.update(self.metrics())
        self._logs_with_metrics = logs

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or logs is self._logs_with_metrics or not _is_training_log(logs):
            return control
        extra = self.metrics()
        logs.update(extra)
        # The Trainer appended a copy of the logs to the history before calling back; keep both in step.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)
        return control


def _is_training_log(logs: dict) -> bool:
    """A log of training steps (not evaluation or prediction metrics, nor the end-of-training summary)."""
    return "train_runtime" not in logs and not any(k.startswith(("eval_", "test_")) for k in logs)


# --------------------------------------------------------------------------------------------------
# The Trainer
# --------------------------------------------------------------------------------------------------
class PyflexTrainerMixin:
    """What a Trainer class needs for a pyflex-patched model; mixed in before ``transformers.Trainer`` or a subclass
    of it (TRL's trainers: :mod:`pyflex.integrations.trl`).

    * A patched model's Trainer gets a :class:`PyflexCallback` unless one is given (τ's rule, clipping; pass
      ``PyflexCallback(schedule)`` yourself to drive a schedule).
    * ``log``: the callbacks' metrics go into the logs before the reporting callbacks run (module docstring).
    * ``_save`` (checkpoints and ``save_model``): a patched model is written as its adapter only
      (:func:`pyflex.integrations.checkpoints.save_checkpoint_adapter`: pyflex files, PEFT files when PEFT can hold
      the adapter), plus the tokenizer and the training arguments as the Trainer writes them; no base weights.
    * ``_load_from_checkpoint`` (``train(resume_from_checkpoint=...)``) and ``_load_best_model``
      (``load_best_model_at_end``): into a patched model they load those adapter files, after checking that the
      checkpoint was saved with the model's settings. A checkpoint with full weights (a plain Trainer's) loads as
      the Trainer loads it. Under DeepSpeed and FSDP the Trainer's own sharded checkpoints are what resumes.

    A model that is not patched is left entirely to the Trainer.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._pyflex_attach_callback()

    def _pyflex_attach_callback(self) -> None:
        if is_patched(self.model) and not self._pyflex_callbacks():
            self.add_callback(PyflexCallback())

    def _pyflex_callbacks(self) -> List[PyflexCallback]:
        return [cb for cb in self.callback_handler.callbacks if isinstance(cb, PyflexCallback)]

    def _pyflex_owns_model_files(self) -> bool:
        return is_patched(self.model) and not (self.is_deepspeed_enabled or self.is_fsdp_enabled)

    def log(self, logs, *args, **kwargs):
        if _is_training_log(logs):
            for callback in self._pyflex_callbacks():
                callback.add_metrics(logs)
        return super().log(logs, *args, **kwargs)

    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[dict] = None) -> None:
        if not is_patched(self.model):
            return super()._save(output_dir, state_dict=state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return None
        os.makedirs(output_dir, exist_ok=True)
        written = save_checkpoint_adapter(self.model, output_dir, state_dict=state_dict)
        logger.info("pyflex: saved the adapter (%s) to %s", ", ".join(written), output_dir)
        tokenizer = self.processing_class
        if tokenizer is None:
            tokenizer = getattr(self.data_collator, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, _TRAINING_ARGS_FILE))
        return None

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        for callback in self._pyflex_callbacks():  # its schedule / τ-optimizer files are in the same checkpoint
            callback.trainer_checkpoint = resume_from_checkpoint
        target = self.model if model is None else model
        if not (self._pyflex_owns_model_files() and is_patched(target)):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        if not has_checkpoint_adapter(resume_from_checkpoint) and any(
                os.path.isfile(os.path.join(resume_from_checkpoint, f)) for f in _FULL_WEIGHT_FILES):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)  # a full checkpoint: adapter keys in it
        logger.info("pyflex: loading the adapter from %s", resume_from_checkpoint)
        load_checkpoint_adapter(target, resume_from_checkpoint)
        return None

    def _load_best_model(self) -> None:
        path = self.state.best_model_checkpoint
        if self._pyflex_owns_model_files() and path and has_checkpoint_adapter(path):
            logger.info("pyflex: loading the best adapter from %s (score: %s)", path, self.state.best_metric)
            load_checkpoint_adapter(self.model, path)
            return None
        return super()._load_best_model()


class Trainer(PyflexTrainerMixin, transformers.Trainer):
    """``transformers.Trainer`` for pyflex-patched models (:class:`PyflexTrainerMixin`): a :class:`PyflexCallback`
    by default, pyflex's metrics in every ``report_to`` integration, adapter-only checkpoints that resume exactly and
    that ``pyflex.load_adapter`` (and, τ off, ``peft.PeftModel.from_pretrained``) load. Same arguments as
    ``transformers.Trainer``."""
