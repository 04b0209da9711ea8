"""`fuse_model_ops`: fuse the work *outside* the adapters (RMSNorm, the gated MLP activation, cross-entropy) with
liger-kernel, on one already-built Hugging Face model.

pyflex's own kernels cover the LoRA op only. RMSNorm, SwiGLU and (fused linear) cross-entropy are not specific to
adapters, so pyflex uses liger-kernel for them: it is maintained, tested across HF families and transformers
versions. Install it with ``pip install liger-kernel`` (or ``pip install 'pyflex[fused]'``).

What liger does to an *instance* (``apply_liger_kernel_to_<family>(model=...)``), for the families below:

* RMSNorm: ``forward`` of every decoder-layer norm and the final norm is rebound to ``LigerRMSNorm.forward``
  (Triton kernel; same weight Parameter). Qwen3 also gets its q_norm/k_norm, Gemma2 its four per-layer norms
  (with Gemma's ``1 + w`` offset and fp32 casting).
* MLP: ``forward`` of every ``layer.mlp`` is rebound to a fused-activation forward that still calls the module's
  own projections: ``down_proj(silu(gate_proj(x)) * up_proj(x))`` (Llama, Mistral, Qwen2, Qwen3), Phi-3's
  ``gate_up_proj`` + chunk, Gemma2's GELU-tanh variant (``geglu``). Projections patched by
  :func:`pyflex.patch_model` are therefore used either way round, so the two patches compose in either order.
* Cross-entropy: ``model.forward`` becomes liger's ``lce_forward``: in training mode with ``labels`` it computes the
  loss from the last hidden states and ``lm_head.weight`` in chunks (fused linear cross-entropy) and returns
  ``logits=None``; otherwise (eval, or no labels) it materialises logits as HF does. Only for ``*ForCausalLM``.
* RoPE (off by default): liger has no per-instance RoPE patch; it replaces
  ``transformers.models.<family>.modeling_<family>.apply_rotary_pos_emb``, which changes EVERY model of that family
  in the process. pyflex keeps that side effect only when ``rope=True`` is asked for.

liger's ``apply_*`` functions also swap module-level classes (``modeling_llama.LlamaRMSNorm = LigerRMSNorm``, ...),
which would silently fuse every model of the family built later in the process (a reference model in a test, the
HF-floor run in a benchmark). :func:`fuse_model_ops` restores those globals afterwards, so only ``model`` changes.
"""
from __future__ import annotations

import functools
import importlib
import os
import warnings
from importlib.metadata import PackageNotFoundError, version as _dist_version
from types import MethodType
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from pyflex.layers import gated_mlp
from pyflex.layers.linear import FlexLinear
from pyflex.model.families import FAMILIES

__all__ = ["fuse_model_ops", "fused_ops", "fused_ops_families", "liger_act_mul", "FUSED_ATTR"]


FUSED_ATTR = "_pyflex_fused_ops"

def liger_act_mul(mlp_kind: str):
    """liger's fused act(g)·u ('swiglu' or 'geglu') as a :mod:`pyflex.layers.gated_mlp` act_mul: pyflex's memory-light MLP
    forward runs it in place of its own GatedActFunction when the model is fused (same saved tensors: g and u)."""
    if mlp_kind == "swiglu":
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction as function
    elif mlp_kind == "geglu":
        from liger_kernel.ops.geglu import LigerGELUMulFunction as function
    else:
        raise ValueError(f"mlp_kind={mlp_kind!r} is not one of swiglu, geglu")

    def act_mul(g, u, state):
        return function.apply(g, u)
    # liger makes contiguous copies of its inputs and saves those; handing it contiguous g, u makes the h recipe
    # share them instead of keeping a third and fourth tensor alive
    act_mul.needs_contiguous = True
    return act_mul


def fused_ops_families() -> Tuple[str, ...]:
    """Model types :func:`fuse_model_ops` supports (pyflex's family table ∩ liger-kernel's)."""
    return tuple(sorted(t for t, spec in FAMILIES.items() if spec.liger_mlp))


def fused_ops(model: nn.Module) -> Dict[str, object]:
    """What :func:`fuse_model_ops` fused on ``model`` ({} if nothing)."""
    return dict(getattr(model, FUSED_ATTR, None) or {})


def _import_liger():
    try:
        from liger_kernel.transformers import monkey_patch
    except ImportError as exc:
        raise ImportError("pyflex.fuse_model_ops needs liger-kernel: pip install liger-kernel "
                          f"(or pip install 'pyflex[fused]'); importing it failed: {exc}") from exc
    return monkey_patch


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def _interpreter_error(op: str, softcap: Optional[float] = None) -> Optional[str]:
    """None if liger's kernel for ``op`` runs (forward + backward) under the Triton interpreter, else the error text.

    The interpreter does not implement everything liger's kernels use (with triton 3.9: float scalar arguments are
    passed as Python floats, so ``eps.to(tl.float32)`` fails, and libdevice math returns None), so RMSNorm, SwiGLU,
    GeGLU and soft-capped cross-entropy do not run there while fused linear cross-entropy and RoPE do. Probing a tiny
    input (about 0.1 s) turns a deep InterpreterError at the first forward into a clear error at fuse time, and
    follows future triton / liger versions instead of hard-coding today's list.
    """
    from liger_kernel.transformers import functional as F

    g = torch.Generator().manual_seed(0)  # not the global RNG: fusing must not change a training run's randomness
    a = torch.randn(2, 8, generator=g).requires_grad_()
    b = torch.randn(2, 8, generator=g).requires_grad_()
    try:
        if op == "rms_norm":
            w = torch.ones(8, requires_grad=True)
            out = F.liger_rms_norm(a, w, 1e-6, in_place=False)
        elif op == "swiglu":
            out = F.liger_swiglu(a, b)
        elif op == "geglu":
            out = F.liger_geglu(a, b)
        elif op == "cross_entropy":
            w = torch.randn(16, 8, generator=g).requires_grad_()
            target = torch.randint(0, 16, (2,), generator=g)
            out = F.liger_fused_linear_cross_entropy(a, w, target, softcap=softcap)
        elif op == "rope":
            q, k = a.view(1, 2, 1, 8), b.view(1, 2, 1, 8)  # (batch, heads, seq, head_dim)
            cos, sin = torch.ones(1, 1, 8), torch.zeros(1, 1, 8)
            out = torch.cat([t.flatten() for t in F.liger_rope(q, k, cos, sin)])
        else:  # pragma: no cover
            raise KeyError(op)
        out.sum().backward()
        if not torch.isfinite(out).all():
            return "non-finite output"
    except Exception as exc:  # noqa: BLE001 - any failure means "does not run here"
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None


def _model_devices(model: nn.Module):
    return sorted({p.device.type for p in model.parameters()} | {b.device.type for b in model.buffers()})


def _guard_lm_head(lce_forward):
    """liger's fused linear CE reads ``lm_head.weight`` directly, so a LoRA adapter on lm_head would be ignored."""
    @functools.wraps(lce_forward)
    def forward(self, *args, **kwargs):
        if isinstance(getattr(self, "lm_head", None), FlexLinear):
            raise RuntimeError("lm_head is patched by pyflex (FlexLinear) but fuse_model_ops(cross_entropy=True) "
                               "computes the loss from lm_head.weight alone, which would ignore its adapter; "
                               "leave lm_head out of target_modules or fuse with cross_entropy=False")
        return lce_forward(self, *args, **kwargs)
    return forward


def fuse_model_ops(model: nn.Module, *, rms_norm: bool = True, swiglu: bool = True, cross_entropy: bool = True,
                   rope: bool = False) -> nn.Module:
    """Fuse RMSNorm, the gated MLP activation and the cross-entropy of ``model`` with liger-kernel, in place.

    Args:
        rms_norm: every RMSNorm of the decoder (and the final norm) runs liger's Triton RMSNorm.
        swiglu: each ``layer.mlp`` runs liger's fused gated activation (SwiGLU; GeGLU for Gemma2) between its own
            projections, so pyflex adapters on gate/up/down (or Phi-3's gate_up) projections stay in use.
        cross_entropy: fused linear cross-entropy in ``model.forward`` (``*ForCausalLM`` only): training-mode
            calls with ``labels`` return the loss and ``logits=None``; the 8×1024×32000 logits are never built.
            Skipped with a warning for models without an LM head.
        rope: liger's RoPE. Process-wide for the family (see the module docstring); off by default.

    Composes with :func:`pyflex.patch_model` in either order; :func:`pyflex.unpatch` / :func:`pyflex.merge` leave the
    fusion in place. What was fused is in ``model._pyflex_fused_ops`` (see :func:`fused_ops`).

    Needs a CUDA model: liger's kernels are Triton GPU kernels. On CPU it is allowed only under the Triton interpreter
    (``TRITON_INTERPRET=1``, how the tests run), and only for the ops whose kernels the interpreter can run.
    Returns ``model``.
    """
    liger = _import_liger()
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    families = fused_ops_families()
    if model_type not in families or model_type not in liger.MODEL_TYPE_TO_APPLY_LIGER_FN:
        raise ValueError(f"fuse_model_ops does not support model_type={model_type!r} ({type(model).__name__}); "
                         f"supported: {', '.join(families)}")
    if getattr(model, FUSED_ATTR, None):
        raise RuntimeError(f"model is already fused by pyflex.fuse_model_ops ({fused_ops(model)}); fusing twice is "
                           "not supported")
    mlp_kind = FAMILIES[model_type].liger_mlp

    is_causal_lm = type(model).__name__.endswith("ForCausalLM") and isinstance(getattr(model, "lm_head", None),
                                                                               nn.Module)
    if cross_entropy and not is_causal_lm:
        warnings.warn(f"fuse_model_ops: {type(model).__name__} is not a *ForCausalLM with an lm_head; fused linear "
                      "cross-entropy is skipped (cross_entropy=False)", stacklevel=2)
        cross_entropy = False
    if cross_entropy and isinstance(model.lm_head, FlexLinear):
        raise ValueError("lm_head is patched by pyflex (FlexLinear); fused linear cross-entropy reads lm_head.weight "
                         "alone and would ignore its adapter. Use cross_entropy=False, or leave lm_head unpatched")

    devices = _model_devices(model)
    if devices != ["cuda"]:
        if not _interpreting():
            raise RuntimeError(f"fuse_model_ops needs the model on a CUDA device: liger-kernel's ops are Triton GPU "
                               f"kernels, but the model is on {', '.join(devices) or 'no device (no parameters)'}. "
                               "Move it first (model.cuda()), or set TRITON_INTERPRET=1 before triton is imported "
                               "to run the kernels in the (slow) Triton interpreter on CPU")
        softcap = getattr(config, "final_logit_softcapping", None)
        for op, flag, wanted in (("rms_norm", "rms_norm", rms_norm), (mlp_kind, "swiglu", swiglu),
                                 ("cross_entropy", "cross_entropy", cross_entropy),
                                 ("rope", "rope", rope)):
            err = _interpreter_error(op, softcap if op == "cross_entropy" else None) if wanted else None
            if err is not None:
                what = f"{op} (softcap={softcap})" if op == "cross_entropy" and softcap is not None else op
                raise RuntimeError(f"liger-kernel's {what} kernel does not run under the Triton interpreter here "
                                   f"({err}); the model is on {', '.join(devices)}. Pass {flag}=False on CPU, or "
                                   "run on CUDA")

    # liger also swaps module-level names (classes for models built later, apply_rotary_pos_emb); keep only what
    # this instance needs: the RoPE function when rope=True (there is no per-instance RoPE patch).
    modeling = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    before = dict(vars(modeling))
    kwargs = {"rope": bool(rope), "rms_norm": bool(rms_norm), mlp_kind: bool(swiglu),
              "fused_linear_cross_entropy": bool(cross_entropy), "cross_entropy": False}
    # MLPs running pyflex's memory-light forward (patch_model(recompute_mlp=...)); liger rebinds their forward
    pyflex_mlps = [m for m in model.modules() if gated_mlp.has_gated_mlp(m)]
    try:
        liger.MODEL_TYPE_TO_APPLY_LIGER_FN[model_type](model=model, **kwargs)
    finally:
        keep = {"apply_rotary_pos_emb"} if rope else set()
        for name, value in before.items():
            if name not in keep and vars(modeling).get(name) is not value:
                setattr(modeling, name, value)

    if swiglu:
        # keep pyflex's forward (it saves g and u only, and rebuilds down_proj's input) with liger's kernel inside,
        # now and for MLPs patch_model gives that forward later
        act_mul = liger_act_mul(mlp_kind)
        gated_mlp.set_model_act_mul(model, act_mul)
        for mlp in pyflex_mlps:
            gated_mlp.install_gated_mlp(mlp, gated_mlp.installed_kind(mlp), act_mul)
    if cross_entropy:
        lce = model.forward.__func__  # liger bound its lce_forward to this instance
        model.forward = MethodType(_guard_lm_head(lce), model)
    if rope:
        warnings.warn(f"fuse_model_ops(rope=True) replaced {modeling.__name__}.apply_rotary_pos_emb: every "
                      f"{model_type} model in this process now uses liger's RoPE", stacklevel=2)

    object.__setattr__(model, FUSED_ATTR, {
        "family": model_type, "rms_norm": bool(rms_norm), "swiglu": bool(swiglu), "mlp": mlp_kind if swiglu else None,
        "cross_entropy": "fused_linear" if cross_entropy else None, "rope": bool(rope),
        "liger_kernel": _liger_version(),
    })
    return model


def _liger_version() -> Optional[str]:
    try:
        return _dist_version("liger-kernel")
    except PackageNotFoundError:  # pragma: no cover
        return None
