"""Triton kernels for the gated-MLP product h = act(g) · u, forward and backward; act is SiLU (SwiGLU: Llama,
Mistral, Qwen, Phi-3) or tanh-approximated GELU (GeGLU: Gemma2).

Used by :class:`pyflex.layers.gated_mlp.GatedActFunction` on CUDA (and under the Triton interpreter in tests). Eager PyTorch
runs silu, then mul (two kernels, 5 passes over a (tokens × intermediate) tensor) forward, and mul, mul and
silu_backward (9 passes) backward; these kernels read g and u once and write h (3 passes) forward, and read dh, g, u
and write dg, du (5 passes) backward, recomputing silu(g) instead of keeping it.

Numerics follow eager, rounding where eager rounds: a = act(g) and h = a·u are each rounded to the input dtype;
backward rounds da = dh·u, then dg = da·act'(g) and du = dh·a, all computed in fp32 (act' as PyTorch's
silu_backward / gelu_backward(approximate="tanh") write it). exp is Triton's, not CUDA's expf, and tanh is built from
exp, so 16-bit results can differ from eager by one unit in the last place on a few elements.

Shapes: g, u, dh (M, I) with unit stride along I (rows may be strided: Phi-3's gate/up are halves of one tensor).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pyflex.kernels.numerics import _rtne, _to_out

__all__ = ["ACTIVATIONS", "gated_mul", "gated_mul_backward"]

ACTIVATIONS = ("silu", "gelu_tanh")
_BLOCK_M, _BLOCK_N = 4, 1024
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
_GELU_KAPPA = tl.constexpr(0.044715)


@triton.jit
def _round(v, dtype: tl.constexpr, RTNE_BF16: tl.constexpr):
    """fp32 → input dtype → fp32: the value eager would store in a tensor of the input dtype."""
    return _to_out(v, dtype, RTNE_BF16).to(tl.float32)


@triton.jit
def _act(g, ACT: tl.constexpr):
    """act(g) in fp32 (ACT 0: SiLU, 1: GELU with the tanh approximation)."""
    if ACT == 0:
        return g / (1.0 + tl.exp(-g))
    else:
        inner = _SQRT_2_OVER_PI * (g + _GELU_KAPPA * g * g * g)
        # 1 + tanh(y) = 2σ(2y); the exponent is capped so that exp stays finite (σ is 0 to fp32 precision there)
        return 0.5 * g * (2.0 / (1.0 + tl.exp(tl.minimum(-2.0 * inner, 80.0))))


@triton.jit
def _act_grad(g, ACT: tl.constexpr):
    """act'(g) in fp32."""
    if ACT == 0:
        sig = 1.0 / (1.0 + tl.exp(-g))
        return sig * (1.0 + g * (1.0 - sig))
    else:
        inner = _SQRT_2_OVER_PI * (g + _GELU_KAPPA * g * g * g)
        t = 2.0 / (1.0 + tl.exp(tl.minimum(-2.0 * inner, 80.0))) - 1.0
        return 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_KAPPA * g * g)


@triton.jit(do_not_specialize=["M"])
def _gated_fwd_kernel(g_ptr, u_ptr, h_ptr, M, N, s_g, s_u, s_h, ACT: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RTNE_BF16: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = (rows < M)[:, None] & (cols < N)[None, :]
    g = tl.load(g_ptr + rows[:, None] * s_g + cols[None, :], mask=m, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + rows[:, None] * s_u + cols[None, :], mask=m, other=0.0).to(tl.float32)
    dtype = h_ptr.dtype.element_ty
    a = _round(_act(g, ACT), dtype, RTNE_BF16)
    tl.store(h_ptr + rows[:, None] * s_h + cols[None, :], _to_out(a * u, dtype, RTNE_BF16), mask=m)


@triton.jit(do_not_specialize=["M"])
def _gated_bwd_kernel(dh_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, M, N, s_dh, s_g, s_u, s_dg, s_du, ACT: tl.constexpr,
                      NEED_G: tl.constexpr, NEED_U: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RTNE_BF16: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = (rows < M)[:, None] & (cols < N)[None, :]
    dh = tl.load(dh_ptr + rows[:, None] * s_dh + cols[None, :], mask=m, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + rows[:, None] * s_g + cols[None, :], mask=m, other=0.0).to(tl.float32)
    dtype = dh_ptr.dtype.element_ty
    if NEED_G:
        u = tl.load(u_ptr + rows[:, None] * s_u + cols[None, :], mask=m, other=0.0).to(tl.float32)
        da = _round(dh * u, dtype, RTNE_BF16)
        tl.store(dg_ptr + rows[:, None] * s_dg + cols[None, :], _to_out(da * _act_grad(g, ACT), dtype, RTNE_BF16),
                 mask=m)
    if NEED_U:
        a = _round(_act(g, ACT), dtype, RTNE_BF16)
        tl.store(du_ptr + rows[:, None] * s_du + cols[None, :], _to_out(dh * a, dtype, RTNE_BF16), mask=m)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(…, I) → (M, I) view with unit column stride (a copy only when the last dim is strided)."""
    t2 = t.reshape(-1, t.shape[-1]) if t.dim() != 2 else t
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _grid(M: int, N: int):
    return (triton.cdiv(M, _BLOCK_M), triton.cdiv(N, _BLOCK_N))


def _act_id(act: str) -> int:
    if act not in ACTIVATIONS:
        raise ValueError(f"act={act!r} is not supported; allowed: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS.index(act)


def gated_mul(g: torch.Tensor, u: torch.Tensor, act: str = "silu") -> torch.Tensor:
    """h = act(g) · u. g, u (..., I), same shape and dtype (fp16/bf16/fp32) → h (..., I) contiguous."""
    act_id = _act_id(act)
    if g.shape != u.shape or g.dtype != u.dtype:
        raise ValueError(f"g {tuple(g.shape)} {g.dtype} and u {tuple(u.shape)} {u.dtype} must match in shape and dtype")
    g2, u2 = _rows(g), _rows(u)
    M, N = g2.shape
    h = torch.empty((M, N), dtype=g.dtype, device=g.device)
    if M and N:
        _gated_fwd_kernel[_grid(M, N)](g2, u2, h, M, N, g2.stride(0), u2.stride(0), h.stride(0), ACT=act_id,
                                       BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N, RTNE_BF16=_rtne(g.dtype), num_warps=4)
    return h.view(g.shape)


def gated_mul_backward(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor, act: str = "silu", need_g: bool = True,
                       need_u: bool = True):
    """(dg, du) of h = act(g) · u for the upstream gradient dh (..., I); None where not needed."""
    act_id = _act_id(act)
    dh2, g2, u2 = _rows(dh), _rows(g), _rows(u)
    M, N = g2.shape
    dg = torch.empty((M, N), dtype=g.dtype, device=g.device) if need_g else None
    du = torch.empty((M, N), dtype=g.dtype, device=g.device) if need_u else None
    if M and N and (need_g or need_u):
        dg_arg, du_arg = (dg if need_g else dh2), (du if need_u else dh2)
        _gated_bwd_kernel[_grid(M, N)](dh2, g2, u2, dg_arg, du_arg, M, N, dh2.stride(0), g2.stride(0),
                                       u2.stride(0), dg_arg.stride(0), du_arg.stride(0), ACT=act_id,
                                       NEED_G=need_g, NEED_U=need_u, BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N,
                                       RTNE_BF16=_rtne(g.dtype), num_warps=4)
    return (None if dg is None else dg.view(g.shape)), (None if du is None else du.view(g.shape))

