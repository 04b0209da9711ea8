"""The PEFT_S threshold τ as a parameter, and the rule it must be trained by (eq. 18-22).

The op accumulates ``tau.grad = −g`` (eq. 17). Adam then gives m̂/(√v̂+ε) of −g, and its step
``τ ← τ − lr·m̂(−g)/(√v̂+ε)`` equals eq. 22's ``τ ← τ + α·s·m̂(g)/(√v̂+ε)`` when lr = α·s,
betas = (0.9, 0.98) and there is no weight decay; ``pyflex.tau_param_groups`` (pyflex/model/optim.py) builds exactly
that group (docs/op.md, "Training τ"). Its lr is by default :data:`TAU_LR_RATIO` × the adapters' lr, the paper's
ratio, rather than the paper's absolute α·s (:func:`resolve_tau_lr`; ``tau_s=4e-5`` gives the paper's exact step).

Any other rule is refused at the optimizer step: the first τ is created with a process-wide optimizer step pre-hook
that raises when an optimizer is about to update a τ (one with a gradient) from a param group that is not an
Adam/AdamW group of τ alone with betas (0.9, 0.98) and no weight decay — e.g. the HF Trainer's own AdamW without
:class:`pyflex.PyflexCallback`, which would give τ the adapters' lr, betas and weight decay.
"""
from __future__ import annotations

import math
import numbers
import weakref
from typing import Optional, Tuple

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

# PEFT_S's settings (paper §4 and A.4): α = 1, s = 4e-5, β1 = 0.9, β2 = 0.98; τ0 = 0 (every token starts active).
TAU_ALPHA = 1.0
TAU_S = 4e-5
# pyflex's default τ lr is relative to the adapters' lr: the paper's own ratio α·s / lr = 4e-5 / 1e-4 (its LLaMA3-8B
# run, whose λ is pyflex's default λ). Adam moves τ by about its lr per step whatever the gradient's size, and the
# ratios ρ τ must reach grow as fast as the adapters train, so the ratio, not α·s, carries over between fine-tunes
# of different lengths and lrs (docs/real_tier.md, "τ (PEFT_S)").
TAU_LR_RATIO = 0.4
# With a target sparsity τ is a quantile tracker (pyflex/lora/tau_lambda.py): it must climb from τ0 = 0 to the
# ratios' quantile within the run, and overshoot corrects itself, so its default lr is larger. Measured on the real
# tier (40 steps, target 50 %): ratio 0.4 → 36 % masked (still climbing), 1 → 46 %, 2 → 49 % (docs/real_tier.md).
TAU_TARGET_LR_RATIO = 2.0
TAU_BETAS = (0.9, 0.98)
TAU_EPS = 1e-8
TAU_GROUP_NAME = "pyflex_tau"  # the "name" of the param group tau_param_groups and PyflexCallback give τ


def resolve_tau_lr(lr: Optional[float], tau_lr: Optional[float] = None, tau_alpha: Optional[float] = None,
                   tau_s: Optional[float] = None, tau_lr_ratio: Optional[float] = None,
                   default_ratio: float = TAU_LR_RATIO) -> Tuple[Optional[float], bool]:
    """τ's Adam lr and whether it is relative to the adapters' ``lr``: (value, relative).

    One way at a time: ``tau_lr`` (absolute); ``tau_alpha`` and/or ``tau_s`` (the paper's α·s, the one left out at
    the paper's value: ``tau_s=4e-5`` is PEFT_S exactly); ``tau_lr_ratio`` × ``lr``; none of them:
    ``default_ratio`` × ``lr`` (:data:`TAU_LR_RATIO`, or :data:`TAU_TARGET_LR_RATIO` for target-sparsity τs).
    A relative lr with ``lr`` None has the value None (the caller multiplies later)."""
    given = {k: v for k, v in (("tau_lr", tau_lr), ("tau_alpha", tau_alpha), ("tau_s", tau_s),
                               ("tau_lr_ratio", tau_lr_ratio)) if v is not None}
    for arg, value in given.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{arg}={value!r} is not allowed; it must be a finite number > 0")
    ways = [way for way, on in (("tau_lr", tau_lr is not None), ("tau_alpha/tau_s", tau_alpha is not None or
                                                                  tau_s is not None),
                                ("tau_lr_ratio", tau_lr_ratio is not None)) if on]
    if len(ways) > 1:
        raise ValueError(f"τ's lr is given {len(ways)} ways ({', '.join(f'{k}={v!r}' for k, v in given.items())}); "
                         "give one: tau_lr (absolute), tau_alpha/tau_s (the paper's α·s) or tau_lr_ratio (× the "
                         "adapters' lr)")
    if tau_lr is not None:
        return float(tau_lr), False
    if tau_alpha is not None or tau_s is not None:
        alpha = TAU_ALPHA if tau_alpha is None else float(tau_alpha)
        return alpha * (TAU_S if tau_s is None else float(tau_s)), False
    ratio = float(tau_lr_ratio if tau_lr_ratio is not None else default_ratio)
    return (None if lr is None else ratio * float(lr)), True


def check_target_sparsity(target_sparsity, tau: bool, lam: float) -> None:
    """A clear error unless ``target_sparsity`` is a fraction in (0, 1) asked for with τ on and no λ (0 or unset)."""
    if isinstance(target_sparsity, bool) or not isinstance(target_sparsity, numbers.Real) or \
            not 0.0 < float(target_sparsity) < 1.0:
        raise ValueError(f"target_sparsity={target_sparsity!r} is not allowed; it must be a fraction of tokens to "
                         "mask in (0, 1), or None")
    if not tau:
        raise ValueError(f"target_sparsity={target_sparsity!r} is given with tau={tau!r}: it steers the PEFT_S τ "
                         "mask; pass tau=True as well")
    if lam:
        raise ValueError(f"target_sparsity={target_sparsity!r} is given with lam={lam!r}: with a target sparsity τ is "
                         "steered to it and λ is not used; leave lam out")


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
