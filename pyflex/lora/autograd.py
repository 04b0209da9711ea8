"""``flex_lora``: the τ-masked LoRA linear as an autograd op (docs/op.md), with one autograd path.

This module owns validation, dropout, the per-token scale, what is saved for backward and the backward itself;
backends (pyflex/lora/backends.py, behind the contract of pyflex/lora/contract.py) stay pure tensor functions.

One autograd path, two ways in. :func:`_forward_impl` and :func:`_backward_impl` are the op; :func:`_setup_context`
says what is saved and :func:`_backward` runs the backward, for both:
    eager           ``FlexLoraFunction`` (an autograd.Function whose forward, setup_context and backward are those)
    torch.compile   the custom ops ``pyflex::lora_forward`` / ``pyflex::lora_backward`` wrap the same two
                    functions, and ``torch.library.register_autograd`` registers the same setup_context and
                    backward, so dynamo keeps the op opaque and a patched model compiles as one graph.
Inference (no gradient needed) calls :func:`_forward_impl` directly, without autograd's per-call cost.
"""
from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Tuple

import torch

from pyflex.compat import mark_constant_for_compile
from pyflex.lora.backends import select_for
from pyflex.lora.contract import FLOAT_DTYPES, REGISTRY, Backend, BackwardInputs, ForwardInputs
from pyflex.lora.nf4 import NF4Weight
from pyflex.lora.reference import compute_dtype


# --------------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------------



def _check_inputs(x, weight, bias, lora_A, lora_B, scale, tau, coef, lam, dropout_p):
    quantized = isinstance(weight, NF4Weight)  # a 4-bit base: dequantized by the backend into x's dtype
    for arg, t in (("x", x), ("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
        if not isinstance(t, torch.Tensor) and not (quantized and arg == "weight"):
            raise TypeError(f"{arg} must be a torch.Tensor{' or an NF4Weight' if arg == 'weight' else ''}, got "
                            f"{type(t).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x.dtype={x.dtype} is not supported; allowed: float16, bfloat16, float32, float64")
    if x.dim() < 1:
        raise ValueError(f"x must have at least 1 dimension (..., K), got shape {tuple(x.shape)}")
    if not quantized and weight.dim() != 2:
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
    if quantized:
        if weight.device != x.device:
            raise ValueError(f"weight (an NF4Weight) is on {weight.device} but x is on {x.device}; all tensors must be "
                             "on one device")
        tensors = [("lora_A", lora_A), ("lora_B", lora_B)]     # its own dtype may differ: it dequantizes into x's
    else:
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
    # Under torch.compile a python float may arrive symbolic (dynamo makes floats that change between calls dynamic),
    # and math.isfinite on it breaks a fullgraph trace: the scalar checks run on eager calls only.
    compiling = torch.compiler.is_compiling()
    if not compiling and (not math.isfinite(float(scale)) or float(scale) < 0):
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
    if not compiling and (not math.isfinite(float(lam)) or float(lam) < 0):
        raise ValueError(f"lam={lam} is not allowed; λ must be finite and >= 0")
    if not compiling and not 0.0 <= float(dropout_p) < 1.0:
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
        if not isinstance(count_sink, torch.Tensor) or tuple(count_sink.shape) != (2,) or \
                not count_sink.dtype.is_floating_point:
            raise TypeError("count_sink must be a floating tensor of shape (2,) that requires grad, or None; got "
                            + (f"shape {tuple(count_sink.shape)}, {count_sink.dtype}"
                               if isinstance(count_sink, torch.Tensor) else type(count_sink).__name__))


# --------------------------------------------------------------------------------------------------
# the op: forward and backward on flattened tokens
# --------------------------------------------------------------------------------------------------
def _backend(backend) -> Backend:
    """The op's inputs carry the backend chosen for the call: the Backend itself on the eager way in, its registered
    name on the torch.compile way in (custom ops take strings; :func:`_traced_backend_name` chose it)."""
    return backend if isinstance(backend, Backend) else REGISTRY[backend]


def _host_tau(tau: Optional[torch.Tensor], backend):
    """τ as the backend takes it: the device tensor for backends that read it there (no sync), else a checked python
    float."""
    if tau is None:
        return None
    if backend.capabilities.tau_on_device and tau.device.type != "cpu":
        verify_taus([tau])
        return tau.detach()
    value = float(tau.detach())
    if not math.isfinite(value):
        raise ValueError(f"tau={value} is not finite; the threshold must be a finite number")
    return value


def _forward_impl(x, weight, bias, lora_A, lora_B, cscale, tau, dropout_scale, lam, backend, coef_given, valid,
                  sink, traced, nf4_state=None, nf4_meta=None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y (M, N), z (M, r), mask (M,)) for x (M, K). ``lam``, ``coef_given``, ``valid``, ``sink`` and ``traced`` are
    not used here: they are inputs so that :func:`_setup_context` sees them (and the sink receives its gradient).
    With ``nf4_meta``, ``weight`` is an NF4 base's packed bytes and ``nf4_state`` its code book and scales
    (``NF4Weight.flatten``): the backend receives the NF4Weight."""
    backend = _backend(backend)
    if nf4_meta is not None:
        weight = NF4Weight.unflatten(weight, nf4_state, nf4_meta)
    x_lora = x if dropout_scale is None else x * dropout_scale
    result = backend.implementation().forward(
        ForwardInputs(x, weight, bias, lora_A, lora_B, x_lora, cscale, _host_tau(tau, backend)))
    return result.y, result.z, result.mask


def _backward_impl(gy, x, weight, lora_A, lora_B, z, cscale, mask, dropout_scale, valid, lam: float,
                   backend, need_dx: bool, need_dweight: bool, need_dbias: bool, need_adapter: bool,
                   need_uz: bool, need_dcscale: bool, need_dtau: bool, has_sink: bool, need_count: bool, coef_given: bool,
                   has_bias: bool, has_tau: bool, nf4_state=None, nf4_meta=None):
    """[dx, dweight, dbias, dA, dB, dcscale, dtau, count], None where not requested.

    dcscale_i = m_i·u_i·z_i (∂y_i/∂cscale_i contracted with gy_i); dtau = −g of PEFT_S eq. 14-17 over the real tokens
    (``valid``), without the λ term when a count sink takes it; count = (Σ m_i over real tokens, number of real
    tokens), the sink's gradient.
    An NF4 base (``nf4_meta``, as in :func:`_forward_impl`) goes to the backend as the NF4Weight, which it
    dequantizes again for dx."""
    impl = _backend(backend).implementation()
    if nf4_meta is not None and weight is not None:
        weight = NF4Weight.unflatten(weight, nf4_state, nf4_meta)
    x_lora = x if dropout_scale is None or x is None else x * dropout_scale
    res = impl.backward(BackwardInputs(gy.contiguous(), x, weight, lora_A, lora_B, x_lora, z, cscale, mask,
                                       dropout_scale, need_dx, need_dweight, need_dbias, need_adapter, need_uz))
    uz = res.uz
    dcscale = dtau = count = None
    if need_dcscale:
        dcscale = mask.to(uz.dtype) * uz
    if need_dtau:
        # padding tokens count in neither term: their μ is zeroed and they are never "active"
        uz_real, mask_real = (uz, mask) if valid is None else (uz * valid.to(uz.dtype), mask & valid)
        dtau = impl.tau_gradient(uz_real, cscale, mask_real, 0.0 if has_sink else lam)
    if need_count:
        if valid is None:
            count = torch.stack([mask.sum(), mask.new_full((), mask.shape[0], dtype=torch.int64)])
        else:
            count = torch.stack([(mask & valid).sum(), valid.sum()])
    return [res.dx, res.dweight, res.dbias, res.dA, res.dB, dcscale, dtau, count]


# indices of the op's inputs, shared by setup_context and backward
_X, _W, _BIAS, _A, _B, _CSCALE, _TAU, _DROPOUT, _LAM, _BACKEND, _COEF, _VALID, _SINK, _TRACED, _NF4_STATE, _NF4_META = \
    range(16)
_N_SAVED = 9  # the fixed saved tensors; an NF4 base's state tensors follow them


class _Flags(NamedTuple):
    """What the backward computes, in the order of :func:`_backward_impl`'s parameters (passed positionally)."""
    need_dx: bool
    need_dweight: bool
    need_dbias: bool
    need_adapter: bool
    need_uz: bool
    need_dcscale: bool
    need_dtau: bool
    has_sink: bool
    need_count: bool
    coef_given: bool
    has_bias: bool
    has_tau: bool


def _setup_context(ctx, inputs, output):
    """What backward needs, and nothing more: a frozen adapter saves no x and no z, a frozen base no weight. An NF4
    base saves its packed bytes and scales (the module's own buffers, no new memory), never a dense W0."""
    (x, weight, bias, lora_A, lora_B, cscale, tau, dropout_scale, lam, backend, coef_given, valid, sink, traced,
     nf4_state, nf4_meta) = inputs
    _, z, mask = output
    needs = ctx.needs_input_grad
    need_adapter = needs[_A] or needs[_B]
    need_dtau = tau is not None and needs[_TAU]
    flags = _Flags(needs[_X], needs[_W], bias is not None and needs[_BIAS], need_adapter, need_dtau or needs[_CSCALE],
                   needs[_CSCALE], need_dtau, sink is not None, sink is not None and needs[_SINK], coef_given,
                   bias is not None, tau is not None)
    ctx.flags, ctx.lam, ctx.backend, ctx.traced = flags, float(lam), backend, traced
    ctx.tau_meta = None if tau is None else (tuple(tau.shape), tau.dtype, tau.device)
    ctx.sink_meta = None if sink is None else (tuple(sink.shape), sink.dtype)
    quantized = nf4_meta is not None and flags.need_dx
    ctx.nf4_meta = list(nf4_meta) if quantized else None
    ctx.nf4_len = 0 if nf4_state is None else len(nf4_state)  # the custom op's gradient mirrors its list input
    ctx.save_for_backward(x if flags.need_dweight or need_adapter else None,
                          weight if flags.need_dx else None, lora_A if flags.need_dx else None, lora_B,
                          z if need_adapter or flags.need_uz else None, cscale, mask,
                          dropout_scale if flags.need_dx or need_adapter else None, valid,
                          *(nf4_state if quantized else ()))
    if not traced:
        ctx.mark_non_differentiable(z, mask)
        # z and mask never receive a gradient: without this autograd would allocate zeros for them each backward
        ctx.set_materialize_grads(False)


def _backward(ctx, gy, _gz, _gmask):
    saved = ctx.saved_tensors
    x, weight, lora_A, lora_B, z, cscale, mask, dropout_scale, valid = saved[:_N_SAVED]
    nf4_state = list(saved[_N_SAVED:])  # empty unless an NF4 base was saved for dx
    if gy is None:  # y took no part in the loss (grads are not materialised): its gradient is zero
        gy = lora_B.new_zeros((mask.shape[0], lora_B.shape[0]))
    run = _lora_backward_op if ctx.traced else _backward_impl
    dx, dweight, dbias, dA, dB, dcscale, dtau, count = run(gy, x, weight, lora_A, lora_B, z, cscale, mask,
                                                           dropout_scale, valid, ctx.lam, ctx.backend,
                                                           *ctx.flags, nf4_state, ctx.nf4_meta)
    if ctx.traced:  # custom ops return tensors only: an empty tensor stands for "not computed"
        dx, dweight, dbias, dA, dB, dcscale, dtau, count = [
            t if asked else None for t, asked in zip((dx, dweight, dbias, dA, dB, dcscale, dtau, count),
                                                     _requested(ctx.flags))]
    if dtau is not None:
        shape, dtype, device = ctx.tau_meta
        dtau = dtau.reshape(shape).to(dtype=dtype, device=device)
    if count is not None:
        shape, dtype = ctx.sink_meta
        count = count.to(dtype).reshape(shape)
    nf4_grads = [None] * ctx.nf4_len if ctx.traced else None
    return dx, dweight, dbias, dA, dB, dcscale, dtau, None, None, None, None, None, count, None, nf4_grads, None


def _requested(flags) -> List[bool]:
    """Which of the backward op's outputs were asked for (an asked-for output may itself be empty when M = 0)."""
    return [flags.need_dx, flags.need_dweight, flags.need_dbias, flags.need_adapter, flags.need_adapter,
            flags.need_dcscale, flags.need_dtau, flags.need_count]


class FlexLoraFunction(torch.autograd.Function):
    """The eager way into the op: forward = :func:`_forward_impl`, with :func:`_setup_context` and :func:`_backward`
    (the same ones torch.compile's custom op registers)."""

    # forward(ctx, ...) rather than a separate setup_context: measured ~10 µs less per training call on CPU
    @staticmethod
    def forward(ctx, *inputs):
        output = _forward_impl(*inputs)
        _setup_context(ctx, inputs, output)
        return output

    backward = staticmethod(_backward)


# --------------------------------------------------------------------------------------------------
# the torch.compile way in: the same functions behind two opaque custom ops
# --------------------------------------------------------------------------------------------------
@torch.library.custom_op("pyflex::lora_forward", mutates_args=())
def _lora_forward_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
                     lora_B: torch.Tensor, cscale: torch.Tensor, tau: Optional[torch.Tensor],
                     dropout_scale: Optional[torch.Tensor], lam: float, backend_name: str, coef_given: bool,
                     valid: Optional[torch.Tensor], sink: Optional[torch.Tensor], traced: bool,
                     nf4_state: List[Optional[torch.Tensor]], nf4_meta: Optional[List[int]]
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y, z, mask = _forward_impl(x, weight, bias, lora_A, lora_B, cscale, tau, dropout_scale, lam, backend_name,
                               coef_given, valid, sink, traced, nf4_state, nf4_meta)
    return y, z, mask


@_lora_forward_op.register_fake
def _(x, weight, bias, lora_A, lora_B, cscale, tau, dropout_scale, lam, backend_name, coef_given, valid, sink, traced,
      nf4_state, nf4_meta):
    M = x.shape[0]
    N = weight.shape[0] if nf4_meta is None else nf4_meta[0]
    return (x.new_empty((M, N)), x.new_empty((M, lora_A.shape[0]), dtype=compute_dtype(x.dtype)),
            x.new_empty((M,), dtype=torch.bool))


@torch.library.custom_op("pyflex::lora_backward", mutates_args=())
def _lora_backward_op(gy: torch.Tensor, x: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                      lora_A: Optional[torch.Tensor], lora_B: torch.Tensor, z: Optional[torch.Tensor],
                      cscale: torch.Tensor, mask: torch.Tensor, dropout_scale: Optional[torch.Tensor],
                      valid: Optional[torch.Tensor], lam: float, backend_name: str, need_dx: bool,
                      need_dweight: bool, need_dbias: bool, need_adapter: bool, need_uz: bool, need_dcscale: bool,
                      need_dtau: bool, has_sink: bool, need_count: bool, coef_given: bool, has_bias: bool,
                      has_tau: bool, nf4_state: List[Optional[torch.Tensor]], nf4_meta: Optional[List[int]]
                      ) -> List[torch.Tensor]:
    outs = _backward_impl(gy, x, weight, lora_A, lora_B, z, cscale, mask, dropout_scale, valid, lam, backend_name,
                          need_dx, need_dweight, need_dbias, need_adapter, need_uz, need_dcscale, need_dtau, has_sink,
                          need_count, coef_given, has_bias, has_tau, nf4_state, nf4_meta)
    return [t if t is not None else gy.new_empty((0,)) for t in outs]


@_lora_backward_op.register_fake
def _(gy, x, weight, lora_A, lora_B, z, cscale, mask, dropout_scale, valid, lam, backend_name, need_dx, need_dweight,
      need_dbias, need_adapter, need_uz, need_dcscale, need_dtau, has_sink, need_count, coef_given, has_bias, has_tau,
      nf4_state, nf4_meta):
    M, N = gy.shape
    r = lora_B.shape[1]
    K = x.shape[1] if x is not None else nf4_meta[1] if nf4_meta is not None else \
        weight.shape[1] if weight is not None else 0
    empty = gy.new_empty((0,))
    return [gy.new_empty((M, K)) if need_dx else empty, gy.new_empty((N, K)) if need_dweight else empty,
            gy.new_empty((N,)) if need_dbias else empty,
            lora_B.new_empty((r, K)) if need_adapter else empty, lora_B.new_empty((N, r)) if need_adapter else empty,
            cscale.new_empty((M,)) if need_dcscale else empty, cscale.new_empty(()) if need_dtau else empty,
            mask.new_empty((2,), dtype=torch.int64) if need_count else empty]


torch.library.register_autograd("pyflex::lora_forward", _backward, setup_context=_setup_context)


@mark_constant_for_compile
def _traced_backend_name(device_type: str, dtype: torch.dtype, has_bias: bool, dropout: bool, has_tau: bool,
                         coef_given: bool, weight_format: str) -> str:
    """The backend's name, resolved once per compiled graph (dynamo treats the result as a constant)."""
    return select_for(device_type, dtype, has_bias, dropout, has_tau, coef_given, None, weight_format).name


def _cscale(coef2, scale: float, M: int, x) -> torch.Tensor:
    """s·c_i per token in the compute dtype (M,): a differentiable expression of coef, so that coef's gradient is
    ∂L/∂cscale_i · s through autograd, in both ways into the op."""
    cdt = compute_dtype(x.dtype)
    if coef2 is None:
        return torch.full((M,), float(scale), dtype=cdt, device=x.device)
    return coef2.to(cdt) * float(scale)


def flex_lora(x, weight, bias, lora_A, lora_B, scale, *, tau=None, coef=None, lam=0.0, dropout_p=0.0,
              token_valid=None, count_sink=None, return_mask=False):
    """τ-masked LoRA linear: ``y_i = x_i W0ᵀ + b + m_i · scale · c_i · B A dropout(x_i)`` (docs/op.md).

    Args:
        x: (..., K) float16/bfloat16/float32/float64.
        weight: (N, K) base weight W0, or an :class:`~pyflex.lora.nf4.NF4Weight` (a frozen 4-bit base, dequantized
            by the backend into x's dtype in forward and again in backward; no dense W0 is kept between calls or
            saved for backward; docs/op.md, "Quantized base"); bias: (N,) or None. Same dtype and device as x.
        lora_A: (r, K); lora_B: (N, r). Same dtype as x.
        scale: python float ≥ 0: α/r (or α/√r for rsLoRA) times the layer's response scale β.
        tau: 1-element tensor threshold on ρ_i = ‖d_i‖/‖x_i W0ᵀ‖ (PEFT_S eq. 4), or None for no mask.
            Its gradient is the PEFT_S surrogate −g (eq. 14-17); train it with
            :func:`pyflex.tau_param_groups` to get eq. 18-22.
        coef: (...,) per-token coefficient c_i ≥ 0 (the HLPT gate), or None for 1.
        lam: λ ≥ 0, the proximity strength of eq. 15 (pushes τ up by λ per active token).
        dropout_p: dropout on the LoRA path only, as PEFT does; applied whenever > 0.
        token_valid: (...,) bool, False for padding tokens, or None (every token is real). Padding tokens count in
            neither term of τ's gradient; their outputs are computed as usual.
        count_sink: (2,) floating leaf tensor that requires grad, or None. When given, the λ term is left out of
            τ's gradient and the sink's gradient receives instead (the number of real tokens whose delta was
            applied, Σ m_i; the number of real tokens). The λ term is a count, not a gradient of the loss: a
            caller that scales or averages gradients (GradScaler, DDP) adds −λ·Σ m_i to τ.grad itself at the
            optimizer step (pyflex/lora/tau_lambda.py does this for FlexLinear).
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
    cscale = _cscale(coef2, scale, x2.shape[0], x2)
    coef_given = coef2 is not None
    N = weight.shape[0]
    nf4_state = nf4_meta = None
    if isinstance(weight, NF4Weight):  # through autograd and the custom ops as tensors and ints
        weight, nf4_state, nf4_meta = weight.flatten()
    weight_format = "dense" if nf4_meta is None else "nf4"
    if torch.compiler.is_compiling():
        name = _traced_backend_name(x.device.type, x.dtype, bias is not None, dropout_scale is not None,
                                    tau is not None, coef_given, weight_format)
        y, _, mask = _lora_forward_op(x2, weight, bias, lora_A, lora_B, cscale, tau, dropout_scale, float(lam), name,
                                      coef_given, valid, count_sink, True, nf4_state or [], nf4_meta)
    else:
        backend = select_for(x2.device.type, x2.dtype, bias is not None, dropout_scale is not None, tau is not None,
                             coef_given, None, weight_format)
        inputs = (x2, weight, bias, lora_A, lora_B, cscale, tau, dropout_scale, float(lam), backend, coef_given, valid,
                  count_sink, False, nf4_state, nf4_meta)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                           for t in (x2, weight, bias, lora_A, lora_B, cscale, tau)):
            y, _, mask = FlexLoraFunction.apply(*inputs)
        else:  # inference (generate, decode): the same forward without autograd.Function's per-call cost
            y, _, mask = _forward_impl(*inputs)
    y = y.reshape(*lead, N)
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
