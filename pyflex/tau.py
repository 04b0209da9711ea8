"""Training the PEFT_S threshold τ (eq. 18-22) with a stock torch optimizer.

The op accumulates ``tau.grad = −g`` (eq. 17). Adam then gives m̂/(√v̂+ε) of −g, and its step
``τ ← τ − lr·m̂(−g)/(√v̂+ε)`` equals eq. 22's ``τ ← τ + α·s·m̂(g)/(√v̂+ε)`` when lr = α·s,
betas = (0.9, 0.98) and there is no weight decay. :func:`tau_param_groups` builds exactly that group.
"""
from __future__ import annotations

from typing import Iterable, List, Tuple

import torch
from torch import nn

# PEFT_S defaults (paper §4 and A.4): α = 1, s = 4e-5, β1 = 0.9, β2 = 0.98, τ0 = 0.
TAU_ALPHA = 1.0
TAU_S = 4e-5
TAU_BETAS = (0.9, 0.98)
TAU_EPS = 1e-8


def make_tau(init: float = 0.0) -> nn.Parameter:
    """A 0-dim τ parameter, marked so :func:`tau_param_groups` finds it whatever its name."""
    tau = nn.Parameter(torch.tensor(float(init), dtype=torch.float32))
    tau._pyflex_tau = True
    return tau


def is_tau(param: torch.Tensor) -> bool:
    return bool(getattr(param, "_pyflex_tau", False))


def tau_param_groups(model: nn.Module, lr: float, weight_decay: float = 0.0, *, tau_alpha: float = TAU_ALPHA,
                     tau_s: float = TAU_S, tau_betas: Tuple[float, float] = TAU_BETAS,
                     tau_eps: float = TAU_EPS) -> List[dict]:
    """Param groups for ``torch.optim.Adam``/``AdamW``: every trainable non-τ parameter in one group
    (``lr``, ``weight_decay``), every τ in a group of its own with lr = tau_alpha·tau_s, betas
    ``tau_betas`` and no weight decay (PEFT_S eq. 18-22).

    τ parameters are included even when currently frozen (a schedule may unfreeze them later; AdamW skips
    parameters whose grad is None), so the optimizer never has to be rebuilt.
    """
    for arg, value in (("lr", lr), ("tau_alpha", tau_alpha), ("tau_s", tau_s)):
        if not value > 0:
            raise ValueError(f"{arg}={value} must be > 0")
    taus, others = [], []
    for name, param in model.named_parameters():
        # The attribute can be lost when a model is deep-copied; the name `tau` is the stable marker.
        if is_tau(param) or name == "tau" or name.endswith(".tau"):
            taus.append(param)
        elif param.requires_grad:
            others.append(param)
    groups = [{"params": others, "lr": lr, "weight_decay": weight_decay, "name": "pyflex_params"}]
    if taus:
        groups.append({"params": taus, "lr": tau_alpha * tau_s, "betas": tuple(tau_betas), "eps": tau_eps,
                       "weight_decay": 0.0, "name": "pyflex_tau"})
    return groups


def tau_values(model: nn.Module) -> Iterable[Tuple[str, float]]:
    """(name, value) of every τ in the model, for logging."""
    return [(name, p.item()) for name, p in model.named_parameters()
            if is_tau(p) or name == "tau" or name.endswith(".tau")]
