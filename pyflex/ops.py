"""`flex_lora`: the τ-masked LoRA linear as an autograd op, with backend dispatch.

Backends all implement the two functions of :mod:`pyflex.reference` with the same signatures
(``lora_forward`` and ``lora_backward``); this module owns validation, dropout, the autograd
bookkeeping (what to save, what to skip) and the τ surrogate gradient, so the backends stay pure
tensor functions.

Dispatch (``PYFLEX_BACKEND`` or :func:`use_backend`):
    auto       CUDA tensors → triton; CPU tensors → cpp if the extension loaded, else reference
    triton     Triton kernels; on CPU tensors they run under the Triton interpreter (TRITON_INTERPRET=1)
    cpp        the C++ (OpenMP) extension, CPU tensors only
    reference  plain PyTorch (pyflex/reference.py)

Two autograd paths over the same backends: eager calls go through :class:`FlexLoraFunction`; under torch.compile
the op is the custom ops ``pyflex::lora_forward`` / ``pyflex::lora_backward`` with a registered autograd, which
dynamo keeps opaque, so a patched model compiles as one graph.
"""
from __future__ import annotations

import contextlib
import importlib
import math
import os
import warnings
from typing import List, Optional, Tuple

import torch

from . import reference

BACKENDS = ("auto", "triton", "cpp", "reference")
_backend_override: Optional[str] = None
_cpp_module = None
_cpp_error: Optional[str] = None
_cpp_warned = False


# --------------------------------------------------------------------------------------------------
# backend loading
# --------------------------------------------------------------------------------------------------
def _load_cpp():
    """Import the compiled extension once; remember why it failed so errors can say so."""
    global _cpp_module, _cpp_error
    if _cpp_module is None and _cpp_error is None:
        try:
            _cpp_module = importlib.import_module("pyflex._C")
        except ImportError as exc:  # not built, or built against another torch
            _cpp_error = f"{type(exc).__name__}: {exc}"
    return _cpp_module


def cpp_available() -> bool:
    """True when the C++ CPU extension (pyflex._C) imports."""
    return _load_cpp() is not None


def _load_triton(device: torch.device):
    """Import the Triton launchers. CPU tensors need the interpreter, which must be chosen before
    triton decorates any kernel, so it is switched on here when the module is not yet imported."""
    name = "pyflex.kernels.flex_lora"
    if device.type == "cpu" and not triton_interpreting():
        # triton decides between compiling and interpreting when it decorates a kernel, its own standard library
        # included, and torch imports triton early (torch._dynamo): the switch cannot be flipped in a running
        # process.
        raise RuntimeError(
            "backend 'triton' was asked for CPU tensors, which needs the Triton interpreter, but triton was imported "
            "without it. Set TRITON_INTERPRET=1 in the environment before starting Python (pyflex sets it itself "
            "when PYFLEX_BACKEND=triton is in the environment at import and no CUDA device is present)")
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise RuntimeError(f"backend 'triton' is not available: {type(exc).__name__}: {exc}") from exc


def triton_interpreting() -> bool:
    """True when triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1 seen when triton was imported)."""
    try:
        import triton
    except ImportError:
        return False
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET") == "1"


def current_backend_name() -> str:
    """The backend requested by :func:`use_backend` or ``PYFLEX_BACKEND`` (default 'auto')."""
    name = _backend_override or os.environ.get("PYFLEX_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"PYFLEX_BACKEND={name!r} is not a backend; allowed: {', '.join(BACKENDS)}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Force a backend inside a ``with`` block (overrides ``PYFLEX_BACKEND``)."""
    global _backend_override
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r} is not a backend; allowed: {', '.join(BACKENDS)}")
    previous, _backend_override = _backend_override, name
    try:
        yield
    finally:
        _backend_override = previous


def resolve_backend(device: torch.device, name: Optional[str] = None):
    """Return ``(name, module)`` for the backend that serves tensors on ``device``.

    A forced backend that cannot serve is an error; only 'auto' picks, and it says once when it
    cannot use the C++ extension.
    """
    global _cpp_warned
    name = name or current_backend_name()
    if name == "auto":
        if device.type == "cuda":
            name = "triton"
        elif device.type == "cpu":
            if cpp_available():
                name = "cpp"
            else:
                if not _cpp_warned:
                    warnings.warn(f"pyflex: the C++ extension pyflex._C is not available ({_cpp_error}); "
                                  "CPU calls use the PyTorch reference path. Rebuild with `pip install -e .`.",
                                  RuntimeWarning, stacklevel=3)
                    _cpp_warned = True
                name = "reference"
        else:
            name = "reference"
    if name == "reference":
        return name, reference
    if name == "cpp":
        if device.type != "cpu":
            raise ValueError(f"backend 'cpp' serves CPU tensors only, got tensors on {device}")
        module = _load_cpp()
        if module is None:
            raise RuntimeError(f"backend 'cpp' is not available: {_cpp_error}. Build it with `pip install -e .`")
        return name, module
    if name == "triton":
        if device.type not in ("cuda", "cpu"):
            raise ValueError(f"backend 'triton' serves CUDA tensors (or CPU under the interpreter), got {device}")
        return name, _load_triton(device)
    raise AssertionError(name)


# --------------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------------
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_inputs(x, weight, bias, lora_A, lora_B, scale, tau, coef, lam, dropout_p):
    for arg, t in (("x", x), ("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{arg} must be a torch.Tensor, got {type(t).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x.dtype={x.dtype} is not supported; allowed: float16, bfloat16, float32, float64")
    if x.dim() < 1:
        raise ValueError(f"x must have at least 1 dimension (..., K), got shape {tuple(x.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (N, K), got shape {tuple(weight.shape)}")
    N, K = weight.shape
    if x.shape[-1] != K:
        raise ValueError(f"x.shape[-1]={x.shape[-1]} does not match weight.shape[1]={K} (weight is (N, K))")
    if lora_A.dim() != 2 or lora_A.shape[1] != K:
        raise ValueError(f"lora_A must be (r, K)=(r, {K}), got shape {tuple(lora_A.shape)}")
    r = lora_A.shape[0]
    if r == 0:
        raise ValueError("lora_A has rank r=0; the LoRA rank must be >= 1")
    if lora_B.dim() != 2 or tuple(lora_B.shape) != (N, r):
        raise ValueError(f"lora_B must be (N, r)=({N}, {r}), got shape {tuple(lora_B.shape)}")
    tensors = [("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)]
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (N,):
            raise ValueError(f"bias must be a tensor of shape (N,)=({N},) or None, got "
                             f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")
        tensors.append(("bias", bias))
    for arg, t in tensors:
        if t.dtype != x.dtype:
            raise TypeError(f"{arg}.dtype={t.dtype} differs from x.dtype={x.dtype}; all of x, weight, bias, "
                            "lora_A and lora_B must share one dtype (cast the adapter to the base dtype)")
        if t.device != x.device:
            raise ValueError(f"{arg} is on {t.device} but x is on {x.device}; all tensors must be on one device")
    if isinstance(scale, torch.Tensor):
        raise TypeError("scale must be a python float (α/r or α/√r, times the response scale β), got a tensor")
    if not math.isfinite(float(scale)) or float(scale) < 0:
        raise ValueError(f"scale={scale} is not allowed; it must be finite and >= 0")
    if tau is not None:
        if not isinstance(tau, torch.Tensor) or tau.numel() != 1:
            raise TypeError(f"tau must be a 1-element tensor (an nn.Parameter in practice) or None, got "
                            f"{tuple(tau.shape) if isinstance(tau, torch.Tensor) else type(tau).__name__}")
        if tau.device != x.device and tau.device.type != "cpu":
            raise ValueError(f"tau is on {tau.device} but x is on {x.device}")
    if coef is not None:
        if not isinstance(coef, torch.Tensor):
            raise TypeError(f"coef must be a tensor of shape x.shape[:-1] or None, got {type(coef).__name__}")
        if tuple(coef.shape) != tuple(x.shape[:-1]):
            raise ValueError(f"coef.shape={tuple(coef.shape)} must equal x.shape[:-1]={tuple(x.shape[:-1])} "
                             "(one coefficient per token)")
        if not coef.dtype.is_floating_point:
            raise TypeError(f"coef.dtype={coef.dtype} must be a floating dtype")
        if coef.device != x.device:
            raise ValueError(f"coef is on {coef.device} but x is on {x.device}")
    if not math.isfinite(float(lam)) or float(lam) < 0:
        raise ValueError(f"lam={lam} is not allowed; λ must be finite and >= 0")
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p={dropout_p} is not allowed; it must be in [0, 1)")


def _check_tau_accounting(x, tau, token_valid, count_sink):
    if token_valid is not None:
        if not isinstance(token_valid, torch.Tensor) or token_valid.dtype != torch.bool:
            raise TypeError(f"token_valid must be a bool tensor of shape x.shape[:-1] or None, got "
                            f"{token_valid.dtype if isinstance(token_valid, torch.Tensor) else type(token_valid).__name__}")
        if tuple(token_valid.shape) != tuple(x.shape[:-1]) or token_valid.device != x.device:
            raise ValueError(f"token_valid has shape {tuple(token_valid.shape)} on {token_valid.device}; it must have "
                             f"shape x.shape[:-1]={tuple(x.shape[:-1])} on {x.device}")
    if count_sink is not None:
        if tau is None:
            raise ValueError("count_sink is given but tau is None; the sink counts the tokens of the τ mask")
        if not isinstance(count_sink, torch.Tensor) or count_sink.dim() != 0 or \
                not count_sink.dtype.is_floating_point:
            raise TypeError("count_sink must be a 0-dim floating tensor that requires grad, or None")


# --------------------------------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------------------------------
def _tau_gradient(tau_gradient_fn, uz, cscale, mask, lam, valid, has_sink):
    """−g of PEFT_S eq. 14-17 over the real tokens (``valid`` (M,) bool or None for all).

    Padding tokens count in neither term: their μ is zeroed and they are never "active". With a count sink the λ
    term is left out here (it goes to the sink's gradient, see :func:`flex_lora`)."""
    if valid is not None:
        uz = uz * valid.to(uz.dtype)
        mask = mask & valid
    return tau_gradient_fn(uz, cscale, mask, 0.0 if has_sink else lam)


def _active_count(mask, valid, sink):
    """The sink's gradient: how many real tokens had the delta applied (the λ term's count), in sink's dtype."""
    active = mask if valid is None else mask & valid
    return active.sum().to(sink.dtype).reshape(sink.shape)


def _run_forward(backend, x, weight, bias, lora_A, lora_B, coef, tau_value, scale, dropout_scale):
    """cscale = scale·coef (M,) in the compute dtype, x̃ = x·dropout_scale, and the backend's forward."""
    cdt = reference.compute_dtype(x.dtype)
    if coef is None:
        cscale = torch.full((x.shape[0],), float(scale), dtype=cdt, device=x.device)
    else:
        cscale = coef.detach().to(cdt) * float(scale)
    x_lora = x if dropout_scale is None else x * dropout_scale
    return backend.lora_forward(x, weight, bias, lora_A, lora_B, x_lora, cscale, tau_value), cscale, x_lora


class FlexLoraFunction(torch.autograd.Function):
    """Inputs are flattened: x (M, K), coef (M,) or None, dropout_scale (M, K) or None; ``backend`` is the module
    :func:`resolve_backend` returned for x's device (resolved once per call)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, coef, tau, tau_value, scale, lam, dropout_scale, backend,
                valid, sink):
        result, cscale, x_lora = _run_forward(backend, x, weight, bias, lora_A, lora_B, coef, tau_value, scale,
                                              dropout_scale)
        y, z, mask = result[0], result[1], result[3]

        needs = ctx.needs_input_grad
        need_adapter = needs[3] or needs[4]
        need_uz = (tau is not None and needs[6]) or (coef is not None and needs[5])
        # Save only what the backward that will run needs: a frozen adapter saves no x̃ and no z.
        keep_z = need_adapter or need_uz
        ctx.save_for_backward(
            x if needs[1] or (need_adapter and dropout_scale is None) else None,
            weight if needs[0] else None,
            lora_A if needs[0] else None,
            lora_B,
            x_lora if need_adapter and dropout_scale is not None else None,
            z if keep_z else None,
            cscale, mask,
            dropout_scale if needs[0] else None,
            valid,
        )
        ctx.flags = dict(need_dx=needs[0], need_dweight=needs[1], need_dbias=bias is not None and needs[2],
                         need_adapter=need_adapter, need_uz=need_uz)
        ctx.scale, ctx.lam, ctx.backend = float(scale), float(lam), backend
        ctx.coef_dtype = None if coef is None else coef.dtype
        ctx.tau_meta = None if tau is None else (tau.shape, tau.dtype, tau.device)
        ctx.sink = sink
        ctx.mark_non_differentiable(mask)
        return y, mask

    @staticmethod
    def backward(ctx, gy, _gmask):
        x, weight, lora_A, lora_B, x_lora, z, cscale, mask, dropout_scale, valid = ctx.saved_tensors
        flags = ctx.flags
        if x_lora is None and flags["need_adapter"]:
            x_lora = x
        backend = ctx.backend
        res = backend.lora_backward(gy.contiguous(), x, weight, lora_A, lora_B, x_lora, z, cscale, mask,
                                    dropout_scale=dropout_scale, **flags)
        dx, dweight, dbias, dA, dB, uz = res
        dcoef = dtau = dsink = None
        if ctx.coef_dtype is not None and ctx.needs_input_grad[5]:
            dcoef = (mask.to(uz.dtype) * uz * ctx.scale).to(ctx.coef_dtype)
        if ctx.tau_meta is not None and ctx.needs_input_grad[6]:
            shape, dtype, device = ctx.tau_meta
            dtau = _tau_gradient(getattr(backend, "tau_gradient", reference.tau_gradient), uz, cscale, mask,
                                 ctx.lam, valid, ctx.sink is not None).reshape(shape).to(dtype=dtype, device=device)
        if ctx.sink is not None and ctx.needs_input_grad[13]:
            dsink = _active_count(mask, valid, ctx.sink)
        return dx, dweight, dbias, dA, dB, dcoef, dtau, None, None, None, None, None, None, dsink


# --------------------------------------------------------------------------------------------------
# torch.compile path: the same backends behind two opaque custom ops, so that dynamo traces a patched model
# without a graph break per layer. Eager calls keep FlexLoraFunction (lower per-call overhead).
# --------------------------------------------------------------------------------------------------
def _host_tau(tau: Optional[torch.Tensor], device: torch.device, backend_name: str):
    """τ as the backend takes it: the device tensor for Triton on CUDA (no sync), else a checked python float."""
    if tau is None:
        return None
    if backend_name == "triton" and device.type == "cuda":
        verify_taus([tau])
        return tau.detach()
    value = float(tau.detach())
    if not math.isfinite(value):
        raise ValueError(f"tau={value} is not finite; the threshold must be a finite number")
    return value


@torch.library.custom_op("pyflex::lora_forward", mutates_args=())
def _lora_forward_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
                     lora_B: torch.Tensor, cscale: torch.Tensor, tau: Optional[torch.Tensor],
                     dropout_scale: Optional[torch.Tensor], lam: float, backend_name: str,
                     valid: Optional[torch.Tensor], sink: Optional[torch.Tensor]
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # lam, valid and sink are unused here: they are inputs so that the backward (setup_context) sees them and
    # sink receives its gradient
    _, backend = resolve_backend(x.device, backend_name)
    x_lora = x if dropout_scale is None else x * dropout_scale
    result = backend.lora_forward(x, weight, bias, lora_A, lora_B, x_lora, cscale,
                                  _host_tau(tau, x.device, backend_name))
    return result[0], result[1], result[3]


@_lora_forward_op.register_fake
def _(x, weight, bias, lora_A, lora_B, cscale, tau, dropout_scale, lam, backend_name, valid, sink):
    cdt = reference.compute_dtype(x.dtype)
    M = x.shape[0]
    return (x.new_empty((M, weight.shape[0])), x.new_empty((M, lora_A.shape[0]), dtype=cdt),
            x.new_empty((M,), dtype=torch.bool))


@torch.library.custom_op("pyflex::lora_backward", mutates_args=())
def _lora_backward_op(gy: torch.Tensor, x: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                      lora_A: Optional[torch.Tensor], lora_B: torch.Tensor, z: Optional[torch.Tensor],
                      cscale: torch.Tensor, mask: torch.Tensor,
                      dropout_scale: Optional[torch.Tensor], need_dx: bool, need_dweight: bool, need_dbias: bool,
                      need_adapter: bool, need_uz: bool, backend_name: str) -> List[torch.Tensor]:
    _, backend = resolve_backend(gy.device, backend_name)
    x_lora = x if dropout_scale is None else x * dropout_scale
    res = backend.lora_backward(gy.contiguous(), x, weight, lora_A, lora_B, x_lora, z, cscale, mask,
                                dropout_scale=dropout_scale, need_dx=need_dx, need_dweight=need_dweight,
                                need_dbias=need_dbias, need_adapter=need_adapter, need_uz=need_uz)
    # custom ops return tensors only: an empty tensor stands for "not computed"
    return [t if t is not None else gy.new_empty((0,)) for t in res]


@_lora_backward_op.register_fake
def _(gy, x, weight, lora_A, lora_B, z, cscale, mask, dropout_scale, need_dx, need_dweight, need_dbias,
      need_adapter, need_uz, backend_name):
    M, N = gy.shape
    r = lora_B.shape[1]
    K = x.shape[1] if x is not None else weight.shape[1] if weight is not None else 0
    empty = gy.new_empty((0,))
    return [gy.new_empty((M, K)) if need_dx else empty, gy.new_empty((N, K)) if need_dweight else empty,
            gy.new_empty((N,)) if need_dbias else empty,
            lora_B.new_empty((r, K)) if need_adapter else empty,
            lora_B.new_empty((N, r)) if need_adapter else empty,
            cscale.new_empty((M,)) if need_uz else empty]


def _compiled_setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, cscale, tau, dropout_scale, lam, backend_name, valid, sink = inputs
    _, z, mask = output
    needs = ctx.needs_input_grad
    ctx.flags = dict(need_dx=needs[0], need_dweight=needs[1], need_dbias=bias is not None and needs[2],
                     need_adapter=needs[3] or needs[4],
                     need_uz=(tau is not None and needs[6]) or needs[5])
    ctx.backend_name, ctx.lam = backend_name, lam
    ctx.has_tau, ctx.has_bias, ctx.has_sink = tau is not None, bias is not None, sink is not None
    flags = ctx.flags
    # As in eager: save only what the backward that will run reads (a frozen adapter saves no x and no z).
    ctx.save_for_backward(x if flags["need_dweight"] or flags["need_adapter"] else None,
                          weight if flags["need_dx"] else None, lora_A if flags["need_dx"] else None, lora_B,
                          z if flags["need_adapter"] or flags["need_uz"] else None, cscale, mask,
                          dropout_scale, tau, valid, sink)


def _compiled_backward(ctx, gy, _gz, _gmask):
    x, weight, lora_A, lora_B, z, cscale, mask, dropout_scale, tau, valid, sink = ctx.saved_tensors
    dx, dweight, dbias, dA, dB, uz = _lora_backward_op(gy, x, weight, lora_A, lora_B, z, cscale, mask, dropout_scale,
                                                       backend_name=ctx.backend_name, **ctx.flags)
    needs = ctx.needs_input_grad
    dcscale = (mask.to(uz.dtype) * uz) if needs[5] else None      # ∂y_i/∂cscale_i = m_i·B z_i
    dtau = dsink = None
    if ctx.has_tau and needs[6]:
        # plain torch here: AOT autograd traces this backward, and inductor fuses these few elementwise ops
        dtau = _tau_gradient(reference.tau_gradient, uz, cscale, mask, ctx.lam, valid,
                             ctx.has_sink).reshape(tau.shape).to(tau.dtype)
    if ctx.has_sink and needs[11]:
        dsink = _active_count(mask, valid, sink)
    return (dx if needs[0] else None, dweight if needs[1] else None, dbias if ctx.flags["need_dbias"] else None,
            dA if needs[3] else None, dB if needs[4] else None, dcscale, dtau, None, None, None, None, dsink)


def _compiled_flex_lora(x2, weight, bias, lora_A, lora_B, coef2, tau, scale, lam, dropout_scale, backend_name, valid,
                        sink):
    """The op as dynamo traces it: cscale = scale·coef is a differentiable torch expression, so coef's gradient flows
    through it (∂L/∂cscale_i = m_i·u_i·z_i)."""
    cdt = reference.compute_dtype(x2.dtype)
    if coef2 is None:
        cscale = torch.full((x2.shape[0],), float(scale), dtype=cdt, device=x2.device)
    else:
        cscale = coef2.to(cdt) * float(scale)
    y, _, mask = _lora_forward_op(x2, weight, bias, lora_A, lora_B, cscale, tau, dropout_scale, float(lam),
                                  backend_name, valid, sink)
    return y, mask


torch.library.register_autograd("pyflex::lora_forward", _compiled_backward, setup_context=_compiled_setup_context)


@torch.compiler.assume_constant_result
def _backend_name_for(device: torch.device) -> str:
    """The backend name, resolved once per compiled graph (dynamo treats it as a constant)."""
    return resolve_backend(device)[0]


def flex_lora(x, weight, bias, lora_A, lora_B, scale, *, tau=None, coef=None, lam=0.0, dropout_p=0.0,
              token_valid=None, count_sink=None, return_mask=False):
    """τ-masked LoRA linear: ``y_i = x_i W0ᵀ + b + m_i · scale · c_i · B A dropout(x_i)``.

    Args:
        x: (..., K) float16/bfloat16/float32/float64.
        weight: (N, K) base weight W0; bias: (N,) or None. Same dtype and device as x.
        lora_A: (r, K); lora_B: (N, r). Same dtype as x.
        scale: python float ≥ 0: α/r (or α/√r for rsLoRA) times the layer's response scale β.
        tau: 1-element tensor threshold on ρ_i = ‖d_i‖/‖y0_i‖ (PEFT_S eq. 4), or None for no mask.
            Its gradient is the PEFT_S surrogate −g (eq. 14-17); train it with
            :func:`pyflex.tau_param_groups` to get eq. 18-22.
        coef: (...,) per-token coefficient c_i ≥ 0 (the HLPT gate), or None for 1.
        lam: λ ≥ 0, the proximity strength of eq. 15 (pushes τ up by λ per active token).
        dropout_p: dropout on the LoRA path only, as PEFT does; applied whenever > 0.
        token_valid: (...,) bool, False for padding tokens, or None (every token is real). Padding tokens count in
            neither term of τ's gradient; their outputs are computed as usual.
        count_sink: 0-dim floating leaf tensor that requires grad, or None. When given, the λ term is left out of
            τ's gradient and the sink's gradient receives instead the number of real tokens whose delta was applied
            (Σ m_i). The λ term is a count, not a gradient of the loss: a caller that scales or averages gradients
            (GradScaler, DDP) adds −λ·count to τ.grad itself at the optimizer step (pyflex.tau does this for
            FlexLinear).
        return_mask: also return the bool mask (...,), True where the delta was applied.

    Returns:
        y (..., N), or (y, mask).
    """
    _check_inputs(x, weight, bias, lora_A, lora_B, scale, tau, coef, lam, dropout_p)
    _check_tau_accounting(x, tau, token_valid, count_sink)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    coef2 = None if coef is None else coef.reshape(-1)
    valid = None if token_valid is None else token_valid.reshape(-1)
    dropout_scale = None
    if dropout_p > 0:
        keep = torch.rand_like(x2, dtype=torch.float32) >= dropout_p
        dropout_scale = keep.to(x2.dtype) / (1.0 - dropout_p)
    if torch.compiler.is_compiling():
        y, mask = _compiled_flex_lora(x2, weight, bias, lora_A, lora_B, coef2, tau, scale, lam, dropout_scale,
                                      _backend_name_for(x.device), valid, count_sink)
    else:
        backend_name, backend = resolve_backend(x.device)
        # On CUDA the kernels read τ on the device; its finiteness is checked once per change of τ (verify_taus),
        # not once per call, since a host read is a device sync.
        tau_value = _host_tau(tau, x.device, backend_name)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                           for t in (x2, weight, bias, lora_A, lora_B, coef2, tau)):
            y, mask = FlexLoraFunction.apply(x2, weight, bias, lora_A, lora_B, coef2, tau, tau_value, float(scale),
                                             float(lam), dropout_scale, backend, valid, count_sink)
        else:  # inference (generate, decode): the same forward without autograd.Function's per-call cost
            result = _run_forward(backend, x2, weight, bias, lora_A, lora_B, coef2, tau_value, scale,
                                  dropout_scale)[0]
            y, mask = result[0], result[3]
    y = y.reshape(*lead, weight.shape[0])
    if return_mask:
        return y, mask.reshape(lead)
    return y


def verify_taus(taus) -> None:
    """Check that every τ in ``taus`` is finite, with one host read for all of those that changed since their
    last check (tracked by the tensor version counter, which optimizer steps and in-place writes bump).

    Callers holding many τ (one per patched layer) pass them all, so a training step pays one device sync for the
    check instead of one per layer. A write through ``tau.data`` bypasses the version counter and so skips the
    re-check; the mask itself always uses the current value.
    """
    stale = [t for t in taus if getattr(t, "_pyflex_checked_version", None) != t._version]
    if not stale:
        return
    by_device = {}
    for t in stale:
        by_device.setdefault(t.device, []).append(t)
    for group in by_device.values():
        values = torch.stack([t.detach().reshape(()).to(torch.float64) for t in group]).tolist()  # one sync
        for t, value in zip(group, values):
            if not math.isfinite(value):
                raise ValueError(f"tau={value} is not finite; the threshold must be a finite number")
            t._pyflex_checked_version = t._version


def sparsity(mask: torch.Tensor, token_valid: Optional[torch.Tensor] = None) -> float:
    """PEFT_S eq. 23: the fraction of real tokens whose delta was not applied (0.0 for no tokens).

    mask and token_valid (padding = False; None for all real) have one shape."""
    if token_valid is not None:
        mask = mask[token_valid]
    if mask.numel() == 0:
        return 0.0
    return 1.0 - mask.float().mean().item()
