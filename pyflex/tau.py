"""Training the PEFT_S threshold τ (eq. 18-22) with a stock torch optimizer, and keeping τ out of gradient clipping.

The op accumulates ``tau.grad = −g`` (eq. 17). Adam then gives m̂/(√v̂+ε) of −g, and its step
``τ ← τ − lr·m̂(−g)/(√v̂+ε)`` equals eq. 22's ``τ ← τ + α·s·m̂(g)/(√v̂+ε)`` when lr = α·s,
betas = (0.9, 0.98) and there is no weight decay. :func:`tau_param_groups` builds exactly that group.

Any other rule is refused at the optimizer step: the first τ is created with a process-wide optimizer step pre-hook
that raises when an optimizer is about to update a τ (one with a gradient) from a param group that is not an
Adam/AdamW group of τ alone with betas (0.9, 0.98) and no weight decay — e.g. the HF Trainer's own AdamW without
:class:`pyflex.PyflexCallback`, which would give τ the adapters' lr, betas and weight decay.

τ's gradient is a sum over tokens (eq. 17), orders of magnitude above an adapter weight's; inside a global gradient
norm it would dominate and shrink every adapter update. :func:`clip_grad_norm_` clips everything trainable except τ.
"""
from __future__ import annotations

import weakref
from typing import Iterable, List, Optional, Tuple

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

# PEFT_S defaults (paper §4 and A.4): α = 1, s = 4e-5, β1 = 0.9, β2 = 0.98, τ0 = 0.
TAU_ALPHA = 1.0
TAU_S = 4e-5
TAU_BETAS = (0.9, 0.98)
TAU_EPS = 1e-8
TAU_GROUP_NAME = "pyflex_tau"  # the "name" of the param group tau_param_groups and PyflexCallback give τ


def make_tau(init: float = 0.0) -> nn.Parameter:
    """A 0-dim τ parameter, marked so :func:`tau_param_groups` finds it whatever its name."""
    tau = nn.Parameter(torch.tensor(float(init), dtype=torch.float32))
    tau._pyflex_tau = True
    _install_tau_rule_check()
    return tau


def is_tau(param: torch.Tensor) -> bool:
    return bool(getattr(param, "_pyflex_tau", False))


def _is_tau_name(name: str) -> bool:
    return name == "tau" or name.endswith(".tau")


def tau_parameters(model: nn.Module) -> List[nn.Parameter]:
    """Every τ of ``model`` (marked by :func:`make_tau`, or named ``tau``), trainable or not.

    The marker is an attribute of the Parameter object, which ``copy.deepcopy`` drops; the name is the stable sign,
    and a τ found by its name is marked again (so the optimizer check sees it too)."""
    out = []
    for name, param in model.named_parameters():
        if is_tau(param) or _is_tau_name(name):
            param._pyflex_tau = True
            out.append(param)
    return out


def _check_pyflex_model(model: nn.Module, what: str) -> None:
    """A clear error for a model pyflex did not patch: without adapters, "every trainable parameter" would silently
    be the whole base model (a full fine-tune)."""
    from .layers import FlexLinear
    from .patch import is_patched

    if is_patched(model) or any(isinstance(m, FlexLinear) for m in model.modules()) or tau_parameters(model):
        return
    raise ValueError(f"{what} got a {type(model).__name__} that is not patched by pyflex (no layer registry, no "
                     "FlexLinear, no τ); call pyflex.patch_model(model, ...) first and pass the patched model")


def tau_param_groups(model: nn.Module, lr: float, weight_decay: float = 0.0, *, tau_alpha: float = TAU_ALPHA,
                     tau_s: float = TAU_S, tau_betas: Tuple[float, float] = TAU_BETAS,
                     tau_eps: float = TAU_EPS) -> List[dict]:
    """Param groups for ``torch.optim.Adam``/``AdamW``: every trainable non-τ parameter in one group
    (``lr``, ``weight_decay``), every τ in a group of its own with lr = tau_alpha·tau_s, betas
    ``tau_betas`` and no weight decay (PEFT_S eq. 18-22).

    τ parameters are included even when currently frozen (a schedule may unfreeze them later; AdamW skips
    parameters whose grad is None), so the optimizer never has to be rebuilt.

    ``model`` must be patched by pyflex (or hold FlexLinear layers or τ parameters); on a plain model the first
    group would be the whole trainable base model, so that is an error.
    """
    for arg, value in (("lr", lr), ("tau_alpha", tau_alpha), ("tau_s", tau_s)):
        if not value > 0:
            raise ValueError(f"{arg}={value} must be > 0")
    _check_pyflex_model(model, "tau_param_groups")
    taus = tau_parameters(model)
    tau_ids = {id(p) for p in taus}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in tau_ids]
    groups = [{"params": others, "lr": lr, "weight_decay": weight_decay, "name": "pyflex_params"}]
    if taus:
        groups.append({"params": taus, "lr": tau_alpha * tau_s, "betas": tuple(tau_betas), "eps": tau_eps,
                       "weight_decay": 0.0, "name": TAU_GROUP_NAME})
    return groups


def tau_values(model: nn.Module) -> Iterable[Tuple[str, float]]:
    """(name, value) of every τ in the model, for logging."""
    return [(name, p.item()) for name, p in model.named_parameters() if is_tau(p) or _is_tau_name(name)]


# -- gradient clipping -----------------------------------------------------------------------------------
def has_fsdp1(model: nn.Module) -> bool:
    """True when ``model`` is or contains an FSDP1 ``FullyShardedDataParallel`` unit."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # torch built without distributed
        return False
    return any(isinstance(m, FullyShardedDataParallel) for m in model.modules())


def clip_grad_norm_(model: nn.Module, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False,
                    foreach: Optional[bool] = None) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over every trainable parameter of ``model`` except τ.

    Clips the gradients of exactly the parameters that require grad and have one — lora_A, lora_B, gates,
    prefixes, trainable biases, LIFT's full blocks — and leaves τ's untouched. Returns what torch returns: the total
    ``norm_type`` norm of those gradients before clipping (a 0-dim tensor; 0 when none has a gradient).
    """
    if not max_norm > 0:
        raise ValueError(f"max_norm={max_norm!r} is not allowed; it must be > 0")
    if has_fsdp1(model):
        # FSDP1 gradients are flat local shards: a norm over them is this rank's share only.
        raise NotImplementedError("pyflex.clip_grad_norm_ does not support FSDP1 (FullyShardedDataParallel) models; "
                                  "wrap with FSDP2 (torch.distributed.fsdp.fully_shard), whose DTensor gradients "
                                  "torch's norm reduces over the ranks")
    params = [p for name, p in model.named_parameters()
              if p.requires_grad and p.grad is not None and not (is_tau(p) or _is_tau_name(name))]
    return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type=norm_type,
                                          error_if_nonfinite=error_if_nonfinite, foreach=foreach)


# -- the optimizer check ---------------------------------------------------------------------------------
def is_tau_rule_group(optimizer: torch.optim.Optimizer, group: dict,
                      betas: Tuple[float, float] = TAU_BETAS) -> bool:
    """True when ``group`` of ``optimizer`` trains τ by PEFT_S's rule: an Adam/AdamW group that holds only τ, with
    ``betas`` (or other betas chosen through pyflex: a group named ``"pyflex_tau"``) and no weight decay (any lr:
    α is a free hyper-parameter)."""
    return (isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))
            and all(is_tau(p) for p in group["params"])
            and (tuple(group.get("betas", ())) == tuple(betas) or group.get("name") == TAU_GROUP_NAME)
            and group.get("weight_decay", 0.0) == 0.0)


# optimizer → (layout it was checked with, the τs it holds in groups without the rule)
_CHECKED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_HOOK = None


def _group_layout(optimizer) -> tuple:
    return tuple((len(g["params"]), tuple(g.get("betas", ())), g.get("weight_decay", 0.0))
                 for g in optimizer.param_groups)


def _tau_rule_check(optimizer, args, kwargs) -> None:
    layout = _group_layout(optimizer)
    seen = _CHECKED.get(optimizer)
    if seen is None or seen[0] != layout:
        wrong = [(k, p) for k, g in enumerate(optimizer.param_groups) if not is_tau_rule_group(optimizer, g)
                 for p in g["params"] if is_tau(p)]
        seen = _CHECKED[optimizer] = (layout, wrong)
    for k, p in seen[1]:
        if p.grad is not None:
            g = optimizer.param_groups[k]
            raise RuntimeError(
                f"{type(optimizer).__name__} is about to update τ (the PEFT_S threshold) from param group {k} "
                f"(lr={g.get('lr')}, betas={g.get('betas')}, weight_decay={g.get('weight_decay')}, "
                f"{len(g['params'])} params); PEFT_S trains τ with Adam, lr = α·s, betas {TAU_BETAS}, no weight "
                "decay (eq. 18-22). Build the optimizer with pyflex.tau_param_groups(model, lr=...), or with the HF "
                "Trainer add callbacks=[pyflex.PyflexCallback()], which trains τ by that rule")


def _install_tau_rule_check() -> None:
    global _HOOK
    if _HOOK is None:
        _HOOK = register_optimizer_step_pre_hook(_tau_rule_check)
