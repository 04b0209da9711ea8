"""Optimizer helpers for a patched model: τ's param group by PEFT_S's Adam rule, and clipping that leaves τ out.

The op accumulates ``tau.grad = −g`` (eq. 17 of the PEFT_S paper; docs/op.md). Adam then gives m̂/(√v̂+ε) of −g, and
its step ``τ ← τ − lr·m̂(−g)/(√v̂+ε)`` equals eq. 22's ``τ ← τ + α·s·m̂(g)/(√v̂+ε)`` when lr = α·s, betas = (0.9, 0.98)
and there is no weight decay. :func:`tau_param_groups` builds exactly that group, by default with α·s = 0.4 × the
adapters' lr (the paper's ratio; its absolute α·s = 4e-5 is ``tau_s=4e-5``).

τ's gradient is a sum over tokens, orders of magnitude above an adapter weight's; inside a global gradient norm it
would dominate and shrink every adapter update. :func:`clip_grad_norm_` clips everything trainable except τ.
"""
from __future__ import annotations

import math
import numbers
import warnings
from typing import Iterable, List, Optional, Tuple

import torch
from torch import nn

from pyflex.layers.linear import FlexLinear
from pyflex.lora.tau import (TAU_BETAS, TAU_EPS, TAU_GROUP_NAME, TAU_LR_RATIO, TAU_TARGET_LR_RATIO, _is_tau_name,
                             is_tau, resolve_tau_lr)


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


def default_tau_lr_ratio(model: nn.Module) -> float:
    """τ's default lr as a multiple of the adapters' lr for ``model``: 0.4 (PEFT_S with λ), or 2 when its τ-masked
    layers steer to a target sparsity (pyflex/lora/tau.py). A model that mixes both needs an explicit τ lr."""
    modes = {m.target_sparsity is not None for m in model.modules() if isinstance(m, FlexLinear) and m.tau is not None}
    if len(modes) > 1:
        raise ValueError("the model has τ layers with a target sparsity and τ layers trained with λ, whose default τ "
                         "lrs differ; give τ's lr explicitly (tau_lr= or tau_lr_ratio=)")
    return TAU_TARGET_LR_RATIO if modes == {True} else TAU_LR_RATIO


def _check_pyflex_model(model: nn.Module, what: str) -> None:
    """A clear error for a model pyflex did not patch: without adapters, "every trainable parameter" would silently
    be the whole base model (a full fine-tune)."""
    from pyflex.model.patch import is_patched

    if is_patched(model) or any(isinstance(m, FlexLinear) for m in model.modules()) or tau_parameters(model):
        return
    raise ValueError(f"{what} got a {type(model).__name__} that is not patched by pyflex (no layer registry, no "
                     "FlexLinear, no τ); call pyflex.patch_model(model, ...) first and pass the patched model")


def tau_param_groups(model: nn.Module, lr: float, weight_decay: float = 0.0, *, tau_lr: Optional[float] = None,
                     tau_lr_ratio: Optional[float] = None, tau_alpha: Optional[float] = None,
                     tau_s: Optional[float] = None, tau_betas: Tuple[float, float] = TAU_BETAS,
                     tau_eps: float = TAU_EPS) -> List[dict]:
    """Param groups for ``torch.optim.Adam``/``AdamW``: every trainable non-τ parameter in one group
    (``lr``, ``weight_decay``), every τ in a group of its own with betas ``tau_betas``, no weight decay (PEFT_S
    eq. 18-22) and τ's lr:

    * default: ``TAU_LR_RATIO`` (0.4) × ``lr``, the paper's ratio of τ's step to the adapters' lr
      (pyflex/lora/tau.py; docs/methods.md, "PEFT_S"); 2 × ``lr`` when the τs steer to a target sparsity;
    * ``tau_lr_ratio=q``: q × ``lr``;
    * ``tau_s=4e-5`` (and/or ``tau_alpha``): the paper's absolute α·s (α = 1, s = 4e-5 for the one left out), i.e.
      PEFT_S exactly; ``tau_alpha=100`` is 100 × 4e-5;
    * ``tau_lr``: that lr.

    An lr scheduler scales τ's group like every other group. τ parameters are included even when currently frozen
    (a schedule may unfreeze them later; AdamW skips parameters whose grad is None), so the optimizer never has to be
    rebuilt.

    ``model`` must be patched by pyflex (or hold FlexLinear layers or τ parameters); on a plain model the first
    group would be the whole trainable base model, so that is an error.
    """
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not math.isfinite(lr) or not lr > 0:
        raise ValueError(f"lr={lr!r} is not allowed; it must be a finite number > 0")
    _check_pyflex_model(model, "tau_param_groups")
    given = any(v is not None for v in (tau_lr, tau_alpha, tau_s, tau_lr_ratio))
    tau_group_lr, _ = resolve_tau_lr(lr, tau_lr, tau_alpha, tau_s, tau_lr_ratio,
                                     default_ratio=TAU_LR_RATIO if given else default_tau_lr_ratio(model))
    taus = tau_parameters(model)
    tau_ids = {id(p) for p in taus}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in tau_ids]
    groups = [{"params": others, "lr": lr, "weight_decay": weight_decay, "name": "pyflex_params"}]
    if given and not taus:
        named = ", ".join(f"{k}={v!r}" for k, v in (("tau_lr", tau_lr), ("tau_lr_ratio", tau_lr_ratio),
                                                      ("tau_alpha", tau_alpha), ("tau_s", tau_s)) if v is not None)
        warnings.warn(f"tau_param_groups got {named} but the model has no τ (patch_model(..., tau=True) adds it); "
                      "it is not used", stacklevel=2)
    if taus:
        groups.append({"params": taus, "lr": tau_group_lr, "betas": tuple(tau_betas), "eps": tau_eps,
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
