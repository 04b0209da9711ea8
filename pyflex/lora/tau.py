"""The PEFT_S threshold τ as a parameter, and the rule it must be trained by (eq. 18-22).

The op accumulates ``tau.grad = −g`` (eq. 17). Adam then gives m̂/(√v̂+ε) of −g, and its step
``τ ← τ − lr·m̂(−g)/(√v̂+ε)`` equals eq. 22's ``τ ← τ + α·s·m̂(g)/(√v̂+ε)`` when lr = α·s,
betas = (0.9, 0.98) and there is no weight decay; ``pyflex.tau_param_groups`` (pyflex/model/optim.py) builds exactly
that group (docs/op.md, "Training τ").

Any other rule is refused at the optimizer step: the first τ is created with a process-wide optimizer step pre-hook
that raises when an optimizer is about to update a τ (one with a gradient) from a param group that is not an
Adam/AdamW group of τ alone with betas (0.9, 0.98) and no weight decay — e.g. the HF Trainer's own AdamW without
:class:`pyflex.PyflexCallback`, which would give τ the adapters' lr, betas and weight decay.
"""
from __future__ import annotations

import weakref
from typing import Tuple

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

# PEFT_S defaults (paper §4 and A.4): α = 1, s = 4e-5, β1 = 0.9, β2 = 0.98; τ0 = 0 (every token starts active).
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
