"""The one table of fine-tuning methods that ``python -m pyflex.demo`` and ``bench/profile_model.py`` run.

Each row says how a method turns a fresh (unpatched) model into something a plain training loop can step: how it
patches the model, which schedule (if any) picks the layers that train, and how its optimizer is built. Both tools
look methods up here by name, so a method added once is available to both:

    setup = METHODS["ist"].build(model, MethodOptions(r=8, alpha=16, lr=3e-3, total_steps=200))
    for batch in batches:
        loss = harness.train_step(setup, batch)      # schedule.step(batch) → forward → backward → optimizer

``setup.observe()`` reads, after a step, what the pictures show (τ sparsity per layer, the layers a schedule
trained, IST's importance); ``setup.summary()`` is the method's end-of-run report.

Aliases keep each tool's older names: the demo's ``lift`` and ``peft_lora`` are the profiler's ``lift_f2e`` and
``peft``; results are keyed by the name that was asked for.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

__all__ = ["TARGET_MODULES", "MethodOptions", "MethodSetup", "Method", "METHODS", "ALIASES", "DEMO_METHODS",
           "PROFILE_METHODS", "canonical_name", "method", "parse_methods", "missing_requirement", "adamw"]

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class MethodOptions:
    """The hyper-parameters every method's build reads (one run's shared settings).

    ``total_steps`` is the number of training steps the run will take (LIFT spreads its blocks over them).
    ``lam`` / ``tau_alpha`` left at None use pyflex's defaults (λ: ``pyflex.model.patch.DEFAULT_LAM``; τ lr:
    ``pyflex.tau_param_groups``'s, 0.4 × lr, 2 × lr with a target sparsity).
    """
    r: int = 8
    alpha: float = 16.0
    lr: float = 3e-3
    seed: int = 0
    total_steps: int = 200
    target_modules: Sequence[str] = TARGET_MODULES
    tau0: float = 0.0
    lam: Optional[float] = None
    tau_alpha: Optional[float] = None
    target_sparsity: float = 0.5          # pyflex_tau_target's fraction of tokens to mask


@dataclass
class MethodSetup:
    """What a build returns: the model to train (PEFT wraps it, so it may be a new object), its optimizer (None
    for the HF floor, which trains nothing), the layer schedule to step before each forward, and a note for the
    tables. ``tau`` says the model carries PEFT_S τ masks."""
    model: nn.Module
    optimizer: Optional[torch.optim.Optimizer]
    schedule: Optional[object] = None
    notes: str = ""
    tau: bool = False
    _params: List[nn.Parameter] = field(default_factory=list, repr=False)

    def __post_init__(self):
        if self.optimizer is not None:
            self._params = [p for group in self.optimizer.param_groups for p in group["params"]]

    def trainable_params(self) -> int:
        """Elements of every parameter the optimizer holds (over the run, for a schedule)."""
        return sum(p.numel() for p in self._params)

    def active_params(self) -> int:
        """Elements that train in the current step (a schedule freezes the others)."""
        return sum(p.numel() for p in self._params if p.requires_grad)

    def observe(self) -> dict:
        """What to record after a step: ``active_params``; with τ, ``tau_sparsity`` (layer index → sparsity of its
        τ-masked linears in the last forward, PEFT_S eq. 23); with a schedule, ``active_layers``; with IST,
        ``importance`` (one score per schedule layer, ``schedule.layers`` order)."""
        record = {"active_params": self.active_params()}
        if self.tau:
            from pyflex.model.patch import get_registry

            record["tau_sparsity"] = get_registry(self.model).tau_sparsity()
        if self.schedule is not None:
            record["active_layers"] = self.schedule.active_layers
            importance = _ist_importance(self.schedule)
            if importance is not None:
                record["importance"] = importance
        return record

    def summary(self) -> dict:
        """End-of-run extras: τ per layer (last forward), IST's scores, the LIFT blocks the run went through."""
        out = {}
        if self.tau:
            from pyflex.model.optim import tau_values
            from pyflex.model.patch import get_registry

            per_layer = {str(i): v for i, v in get_registry(self.model).tau_sparsity().items()}
            values = [v for v in per_layer.values() if v is not None]
            out.update(tau_sparsity_per_layer=per_layer,
                       tau_sparsity_mean=sum(values) / len(values) if values else None,
                       tau_values=dict(tau_values(self.model)))
        importance = _ist_importance(self.schedule)
        if importance is not None:
            out.update(ist_importance=importance, ist_layers=list(self.schedule.layers),
                       ist_updates=len(self.schedule.history))
        sequence = getattr(self.schedule, "sequence", None)
        if sequence is not None and _is_lift(self.schedule):
            out.update(lift_blocks_per_step=list(sequence[:self.schedule.step_count]), lift_total_steps=len(sequence))
        return out


def _ist_importance(schedule) -> Optional[List[float]]:
    if schedule is None:
        return None
    from pyflex.methods.ist import ImportanceSchedule

    if not isinstance(schedule, ImportanceSchedule):
        return None
    return [float(v) for v in schedule.importance.tolist()]


def _is_lift(schedule) -> bool:
    from pyflex.methods.lift import LiftSchedule

    return isinstance(schedule, LiftSchedule)


@dataclass(frozen=True)
class Method:
    """One row of the table. ``build(model, options)`` patches a fresh model and returns a :class:`MethodSetup`;
    calling the row does the same and also takes a config with a ``method_options()`` method (the demo's)."""
    name: str
    label: str                              # for tables and legends
    summary: str                            # what it does, one line
    build: Callable[[nn.Module, MethodOptions], MethodSetup]
    requires: Optional[str] = None          # an optional package; without it the method is skipped, not failed
    cuda_only: bool = False                 # left out of default runs without CUDA (naming it still runs it)
    trains: bool = True                     # False: the HF floor, which has no optimizer

    def __call__(self, model: nn.Module, options) -> MethodSetup:
        if not isinstance(options, MethodOptions):
            to_options = getattr(options, "method_options", None)
            if to_options is None:
                raise TypeError(f"options={type(options).__name__} is not a MethodOptions and has no "
                                "method_options() method")
            options = to_options()
        return self.build(model, options)


# --------------------------------------------------------------------------------------------------
# builders
# --------------------------------------------------------------------------------------------------
def _trainable(model: nn.Module) -> List[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def adamw(params: Iterable, options: MethodOptions) -> torch.optim.Optimizer:
    """AdamW, no weight decay; the fused CUDA implementation when the parameters are on CUDA (what a tuned user
    picks), foreach elsewhere."""
    params = list(params)
    fused = bool(params) and params[0].is_cuda
    return torch.optim.AdamW(params, lr=options.lr, weight_decay=0.0, fused=fused)


def _patch(model: nn.Module, options: MethodOptions, **kwargs) -> None:
    from pyflex.model.patch import patch_model

    patch_model(model, r=options.r, alpha=options.alpha, target_modules=list(options.target_modules), **kwargs)


def _span(indices) -> str:
    indices = list(indices)
    if not indices:
        return "none"
    return f"L{indices[0]}" if len(indices) == 1 else f"L{indices[0]}-{indices[-1]}"


def build_hf_floor(model, options: MethodOptions) -> MethodSetup:
    for p in model.parameters():
        p.requires_grad_(False)
    # A frozen model with inputs that need no grad would not run backward at all; making the embeddings' output
    # require grad makes backward traverse every layer (dX only), which is the floor any adapter method pays.
    model.get_input_embeddings().register_forward_hook(lambda module, inputs, output: output.requires_grad_(True))
    return MethodSetup(model, None, notes="no adapters, dX through every layer")


def _build_pyflex_lora(**patch_kwargs) -> Callable[[nn.Module, MethodOptions], MethodSetup]:
    def build(model, options: MethodOptions) -> MethodSetup:
        _patch(model, options, **patch_kwargs)
        notes = ", ".join(f"{k}={v}" for k, v in patch_kwargs.items())
        return MethodSetup(model, adamw(_trainable(model), options), notes=notes)
    return build


def build_pyflex_lora_fused(model, options: MethodOptions) -> MethodSetup:
    from pyflex.integrations.liger import fuse_model_ops, fused_ops

    fuse_model_ops(model)  # liger-kernel RMSNorm + SwiGLU + fused linear cross-entropy (no logits in training)
    _patch(model, options)
    fused = fused_ops(model)
    return MethodSetup(model, adamw(_trainable(model), options),
                       notes="fused " + ", ".join(k for k in ("rms_norm", "swiglu", "cross_entropy") if fused.get(k)))


def _build_pyflex_tau(target: bool):
    def build(model, options: MethodOptions) -> MethodSetup:
        from pyflex.model.optim import tau_param_groups

        if target:
            tau_kwargs, what = {"target_sparsity": options.target_sparsity}, f"target {options.target_sparsity:.0%}"
        else:
            tau_kwargs = {} if options.lam is None else {"lam": options.lam}
            what = "λ " + ("default" if options.lam is None else f"{options.lam:g}")
        _patch(model, options, tau=True, tau0=options.tau0, **tau_kwargs)
        group_kwargs = {} if options.tau_alpha is None else {"tau_alpha": options.tau_alpha}
        groups = tau_param_groups(model, lr=options.lr, weight_decay=0.0, **group_kwargs)
        return MethodSetup(model, torch.optim.AdamW(groups), tau=True,
                           notes=f"τ lr {groups[-1]['lr']:.1e}, {what}, τ0 {options.tau0:g}")
    return build


def build_ist(model, options: MethodOptions) -> MethodSetup:
    from pyflex.methods.ist import ImportanceSchedule

    _patch(model, options)
    schedule = ImportanceSchedule(model, seed=options.seed)  # paper mode: N_u = 25%, T_c = 10, N_c = 3, β = 0.25
    optimizer = adamw(schedule.trainable_parameters(), options)
    schedule.attach_optimizer(optimizer)
    return MethodSetup(model, optimizer, schedule,
                       notes=f"{schedule.n_u}/{len(schedule.layers)} layers per step, importance every "
                             f"{schedule.t_c} steps")


def _build_lift(order: str) -> Callable[[nn.Module, MethodOptions], MethodSetup]:
    def build(model, options: MethodOptions) -> MethodSetup:
        from pyflex.methods.lift import LiftSchedule
        from pyflex.model.patch import get_registry

        _patch(model, options)
        blocks = len(get_registry(model))
        # LIFT needs ⌊t/N⌋ ≥ 1 steps per block; a shorter run (a short profile) covers the first blocks of the order
        total = max(options.total_steps, blocks)
        schedule = LiftSchedule(model, total_steps=total, order=order, policy="grouped", target="lora",
                                seed=options.seed)
        optimizer = adamw(schedule.trainable_parameters(), options)
        schedule.attach_optimizer(optimizer)
        per_block = total // blocks
        return MethodSetup(model, optimizer, schedule,
                           notes=f"1 block at a time, {order}, {per_block} step{'s' if per_block > 1 else ''} each")
    return build


def _build_hlpt(variant: str) -> Callable[[nn.Module, MethodOptions], MethodSetup]:
    def build(model, options: MethodOptions) -> MethodSetup:
        from pyflex.methods.hlpt import apply_hlpt

        apply_hlpt(model, variant=variant, r=options.r, alpha=options.alpha)
        plan = model.pyflex_plan
        return MethodSetup(model, adamw(_trainable(model), options),
                           notes=f"LoRA {_span(plan.lora_layers)}, prefix {_span(plan.prefix_layers)}")
    return build


def _build_peft(bf16_adapters: bool) -> Callable[[nn.Module, MethodOptions], MethodSetup]:
    def build(model, options: MethodOptions) -> MethodSetup:
        from peft import LoraConfig, get_peft_model

        # transformers 5 warns from inside PEFT (is_gradient_checkpointing is deprecated); not the user's concern
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = get_peft_model(model, LoraConfig(r=options.r, lora_alpha=options.alpha, lora_dropout=0.0,
                                                 target_modules=list(options.target_modules)),
                               autocast_adapter_dtype=not bf16_adapters)
        # PEFT's init is pyflex's (A ~ kaiming_uniform(a=√5), B = 0), but PEFT draws A twice per module, so the same
        # seed gives other numbers. Redraw A in module order from the seed, as patch_model does: both runs then start
        # from identical adapters and their losses differ only by floating-point rounding.
        torch.manual_seed(options.seed)
        with torch.no_grad():
            for module in model.modules():
                lora_A = getattr(module, "lora_A", None)
                if isinstance(lora_A, nn.ModuleDict) and "default" in lora_A:
                    nn.init.kaiming_uniform_(lora_A["default"].weight, a=math.sqrt(5))
        dtypes = sorted({str(p.dtype).replace("torch.", "") for p in _trainable(model)})
        return MethodSetup(model, adamw(_trainable(model), options),
                           notes=f"HF PEFT, adapters {'/'.join(dtypes)}, lora_A drawn as pyflex_lora's")
    return build


# --------------------------------------------------------------------------------------------------
# the table
# --------------------------------------------------------------------------------------------------
def _rows(*methods: Method) -> Dict[str, Method]:
    return {m.name: m for m in methods}


METHODS: Dict[str, Method] = _rows(
    Method("hf_floor", "HF floor", "frozen model, no adapters, backward through every layer (the cost floor)",
           build_hf_floor, trains=False),
    Method("pyflex_lora", "pyflex LoRA", "pyflex.patch_model LoRA on q,k,v,o,gate,up,down (gated-MLP recompute on)",
           _build_pyflex_lora()),
    Method("pyflex_lora_norecompute", "pyflex LoRA, no recompute",
           "the same with patch_model(recompute_mlp=False): the MLP keeps what eager keeps",
           _build_pyflex_lora(recompute_mlp=False)),
    Method("pyflex_lora_fused", "pyflex LoRA + liger",
           "pyflex LoRA + pyflex.fuse_model_ops (liger-kernel RMSNorm, SwiGLU, fused linear CE)",
           build_pyflex_lora_fused, requires="liger_kernel", cuda_only=True),
    Method("pyflex_tau", "pyflex LoRA + τ", "pyflex LoRA + the PEFT_S τ mask (trainable τ per layer, "
           "pyflex.tau_param_groups)", _build_pyflex_tau(target=False)),
    Method("pyflex_tau_target", "pyflex LoRA + τ, target", "pyflex LoRA + τ steered to a target sparsity "
           "(patch_model(target_sparsity=0.5), beyond the paper)", _build_pyflex_tau(target=True)),
    Method("ist", "IST", "pyflex LoRA + ImportanceSchedule (IST: 25% of the layers train per step)", build_ist),
    Method("lift_f2e", "LIFT front2end", "pyflex LoRA + LiftSchedule (one block at a time, front to end)",
           _build_lift("front2end")),
    Method("lift_e2f", "LIFT end2front", "pyflex LoRA + LiftSchedule (one block at a time, end to front)",
           _build_lift("end2front")),
    Method("hlpt", "HLPT", "apply_hlpt: gated LoRA on down_proj (bottom 3/4) + gated prefix (top 1/4)",
           _build_hlpt("hlpt")),
    Method("h2lpt", "H²LPT", "apply_hlpt(variant='h2lpt'): bottom 3/8 and top 1/8 only", _build_hlpt("h2lpt")),
    Method("peft", "HF PEFT LoRA", "Hugging Face PEFT LoRA, same settings, fp32 adapters (PEFT's default)",
           _build_peft(bf16_adapters=False), requires="peft"),
    Method("peft_bf16", "HF PEFT LoRA, base-dtype adapters",
           "PEFT LoRA with adapters in the base dtype (autocast_adapter_dtype=False)",
           _build_peft(bf16_adapters=True), requires="peft"),
)
# older names each tool printed and wrote; a row is keyed by the name asked for
ALIASES: Dict[str, str] = {"lift": "lift_f2e", "peft_lora": "peft"}

# what each tool runs by default
DEMO_METHODS: Tuple[str, ...] = ("pyflex_lora", "pyflex_tau", "pyflex_tau_target", "ist", "lift", "hlpt", "h2lpt",
                                 "peft_lora")
PROFILE_METHODS: Tuple[str, ...] = ("hf_floor", "peft", "peft_bf16", "pyflex_lora", "pyflex_lora_norecompute",
                                    "pyflex_tau", "ist", "lift_f2e", "lift_e2f", "hlpt", "h2lpt",
                                    "pyflex_lora_fused")


def canonical_name(name: str) -> str:
    """The table's key for ``name`` (an alias or a key); KeyError for anything else."""
    name = ALIASES.get(name, name)
    if name not in METHODS:
        raise KeyError(name)
    return name


def method(name: str) -> Method:
    return METHODS[canonical_name(name)]


def parse_methods(text: str, *, arg: str = "--methods", training_only: bool = False) -> List[str]:
    """A comma list of method names (aliases allowed) → the list, in order. ValueError naming ``arg``, the value
    and what is allowed for an empty list, an unknown name, or (``training_only``) a method that trains nothing."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    allowed = [n for n, m in METHODS.items() if m.trains or not training_only]
    allowed += [a for a, n in ALIASES.items() if n in allowed]
    unknown = [n for n in names if n not in allowed]
    if unknown or not names:
        raise ValueError(f"{arg} {text!r}: {'unknown ' + ', '.join(unknown) if unknown else 'empty list'}; "
                         f"allowed: {', '.join(allowed)}")
    return names


def missing_requirement(name: str) -> Optional[str]:
    """The optional package ``name`` needs and cannot import, or None."""
    package = method(name).requires
    if package is None:
        return None
    import importlib.util

    return package if importlib.util.find_spec(package) is None else None
