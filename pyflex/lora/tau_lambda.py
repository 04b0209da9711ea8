"""PEFT_S's λ term of τ's gradient, added at the optimizer step so that it scales like every other gradient; and
the target-sparsity option, which steers τ to a fraction of masked tokens instead.

τ's gradient (eq. 14-17) is −Σ_i (1[(μ_i ≥ 0) == m_i]·μ_i + m_i·λ). The μ part is a gradient of the loss: it
scales with a GradScaler's loss scale, is averaged by DDP like every gradient and sums over gradient-accumulation
micro-batches. The λ part is a count of active tokens, not a function of the loss: added in backward it would be
divided away by ``GradScaler.unscale_`` and divided by the world size under DDP.

So FlexLinear sends the counts to a small "count sink" tensor (its gradient is (Σ m_i, n) over the real tokens of
the step, n the number of real tokens, accumulated by autograd across micro-batches) and a process-wide optimizer
step pre-hook adds −λ·Σ m_i to τ.grad right before the step, after unscaling, after DDP's averaging, with the
counts summed over ranks (one all-reduce per step for all τ of the optimizer). The update then equals the
single-process fp32 one on the union batch.

Target sparsity (``FlexLinear.target_sparsity`` = s*, beyond the paper): τ's gradient is replaced by
−(s* − s_t)·n = (1 − s*)·n − Σ m_i, s_t = 1 − Σ m_i / n the step's masked fraction. Under τ's Adam this moves τ up
by about its lr while fewer than s* of the tokens are masked and down while more are: τ tracks the s*-quantile of
the layer's ratios ρ_i (a stochastic quantile tracker), whatever the loss says. The μ part the op computed is
dropped; λ is not used.

Stale counts: a window whose step never ran (a GradScaler step skipped for inf/nan) is dropped at the next forward
that finds τ.grad reset to None by ``zero_grad()`` (PyTorch's default ``set_to_none=True``, which the HF Trainer
uses). With ``zero_grad(set_to_none=False)`` such a count would carry into the next step.
"""
from __future__ import annotations

import warnings
import weakref
from typing import List

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

# τ → weakref to the FlexLinear whose count sink holds its counts. A table, not an attribute of τ: a weakref in τ's
# __dict__ would make a patched model unpicklable (torch.save(model)). A copied or unpickled layer re-registers its
# τ (FlexLinear.__setstate__ and every eager forward call track()).
_OWNERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_step_hook = None


def new_count_sink(device) -> torch.Tensor:
    """A (2,) float32 leaf whose gradient collects a layer's (active real tokens, real tokens)."""
    return torch.zeros(2, dtype=torch.float32, device=device, requires_grad=True)


def track(tau: torch.Tensor, layer) -> None:
    """Route ``tau``'s λ term through ``layer`` (a FlexLinear with ``lam``, ``target_sparsity`` and
    ``tau_count_sink``)."""
    owner = _OWNERS.get(tau)
    if owner is None or owner() is not layer:
        _OWNERS[tau] = weakref.ref(layer)
    global _step_hook
    if _step_hook is None:
        _step_hook = register_optimizer_step_pre_hook(_add_lambda_terms)


def _taus_of(optimizer) -> List[torch.Tensor]:
    """The optimizer's τ parameters, cached per optimizer until its parameter count changes."""
    count = sum(len(g["params"]) for g in optimizer.param_groups)
    cached = optimizer.__dict__.get("_pyflex_taus")
    if cached is None or cached[0] != count:
        taus = [p for g in optimizer.param_groups for p in g["params"] if p in _OWNERS]
        cached = optimizer.__dict__["_pyflex_taus"] = (count, taus)
    return cached[1]


def add_lambda_terms(optimizer) -> None:
    """Add −λ·(active real tokens, summed over micro-batches and ranks) to the gradient of every τ of ``optimizer``
    that has one (or, for a layer with a target sparsity, set it to the target's gradient), and use up those counts.
    Runs by itself before every optimizer step; a caller that moves τ's gradient out of the way of another
    optimizer's step (PyflexCallback) calls it first. A τ whose grad is None keeps its counts for the step that will
    see its gradient."""
    pending = []
    for tau in _taus_of(optimizer):
        owner = _OWNERS.get(tau)
        layer = None if owner is None else owner()
        sink = None if layer is None else layer.tau_count_sink
        if sink is not None and sink.grad is not None and tau.grad is not None:
            pending.append((tau, layer, sink))
    if not pending:
        return
    device = pending[0][2].grad.device
    counts = torch.stack([sink.grad.reshape(2).to(device) for _, _, sink in pending])
    if torch.distributed.is_available() and torch.distributed.is_initialized() and \
            torch.distributed.get_world_size() > 1:
        # DDP/FSDP average gradients over ranks; the counts are sums over all tokens of the global batch.
        torch.distributed.all_reduce(counts)
    targets = [k for k, (_, layer, _) in enumerate(pending) if getattr(layer, "target_sparsity", None) is not None]
    if targets:
        _check_target_progress(optimizer, counts, [pending[k][1].target_sparsity for k in targets], targets)
    for (tau, layer, sink), (active, real) in zip(pending, counts):
        target = getattr(layer, "target_sparsity", None)
        if target is None:
            term = -layer.lam * active
            tau.grad.add_(term.to(device=tau.grad.device, dtype=tau.grad.dtype).reshape(tau.grad.shape))
        else:
            term = (1.0 - target) * real - active
            tau.grad.copy_(term.to(device=tau.grad.device, dtype=tau.grad.dtype).reshape(tau.grad.shape))
        sink.grad = None


TARGET_CHECK_EVERY = 50  # optimizer steps between two looks at how far target-sparsity layers got (one host read)


def _check_target_progress(optimizer, counts: torch.Tensor, wanted: List[float], rows: List[int]) -> None:
    """Warn once per optimizer when, after a multiple of :data:`TARGET_CHECK_EVERY` steps, the target-sparsity
    layers mask less than half of what they were asked to: τ moves by at most its lr per step, and on a model whose
    ratios ρ are large it may not arrive within the run (the default lr is calibrated on a real model)."""
    state = optimizer.__dict__.setdefault("_pyflex_target_check", {"steps": 0, "warned": False})
    state["steps"] += 1
    if state["warned"] or state["steps"] % TARGET_CHECK_EVERY:
        return
    got = counts[rows]
    masked = float((1.0 - got[:, 0] / got[:, 1].clamp_min(1.0)).mean())
    want = sum(wanted) / len(wanted)
    if masked < 0.5 * want:
        state["warned"] = True
        lrs = sorted({g["lr"] for g in optimizer.param_groups
                      if any(p in _OWNERS for p in g["params"])})
        warnings.warn(f"target_sparsity={want:g}: after {state['steps']} optimizer steps the τ-masked layers mask "
                      f"{masked:.1%} of their tokens. τ moves by at most its lr ({', '.join(f'{v:.2g}' for v in lrs)})"
                      " per step and is still below the ratios ρ of this model; give τ a larger lr "
                      "(pyflex.tau_param_groups(..., tau_lr_ratio=...) or PyflexCallback(tau_lr_ratio=...))",
                      stacklevel=3)


def _add_lambda_terms(optimizer, args, kwargs) -> None:
    add_lambda_terms(optimizer)
