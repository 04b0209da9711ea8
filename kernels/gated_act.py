"""Triton kernels for the SwiGLU product h = silu(g) · u of a gated MLP, forward and backward.

Used by :class:`pyflex.gated_mlp.GatedActFunction` on CUDA (and under the Triton interpreter in tests). Eager PyTorch
runs silu, then mul (two kernels, 5 passes over a (tokens × intermediate) tensor) forward, and mul, mul and
silu_backward (9 passes) backward; these kernels read g and u once and write h (3 passes) forward, and read dh, g, u
and write dg, du (5 passes) backward, recomputing silu(g) instead of keeping it.

Numerics follow eager, rounding where eager rounds: a = silu(g) and h = a·u are each rounded to the input dtype;
backward rounds da = dh·u, then dg = da·σ(g)·(1 + g·(1 − σ(g))) and du = dh·a, all computed in fp32. exp is Triton's,
not CUDA's expf, so 16-bit results can differ from eager by one unit in the last place on a few elements.

Shapes: g, u, dh (M, I) with unit stride along I (rows may be strided: Phi-3's gate/up are halves of one tensor).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pyflex.kernels.numerics import _rtne, _to_out

__all__ = ["silu_mul", "silu_mul_backward"]

_BLOCK_M, _BLOCK_N = 4, 1024


@triton.jit
def _round(v, dtype: tl.constexpr, RTNE_BF16: tl.constexpr):
    """fp32 → input dtype → fp32: the value eager would store in a tensor of the input dtype."""
    return _to_out(v, dtype, RTNE_BF16).to(tl.float32)


@triton.jit(do_not_specialize=["M"])
def _silu_mul_fwd_kernel(g_ptr, u_ptr, h_ptr, M, N, s_g, s_u, s_h,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RTNE_BF16: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = (rows < M)[:, None] & (cols < N)[None, :]
    g = tl.load(g_ptr + rows[:, None] * s_g + cols[None, :], mask=m, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + rows[:, None] * s_u + cols[None, :], mask=m, other=0.0).to(tl.float32)
    dtype = h_ptr.dtype.element_ty
    a = _round(g / (1.0 + tl.exp(-g)), dtype, RTNE_BF16)
    tl.store(h_ptr + rows[:, None] * s_h + cols[None, :], _to_out(a * u, dtype, RTNE_BF16), mask=m)


@triton.jit(do_not_specialize=["M"])
def _silu_mul_bwd_kernel(dh_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, M, N, s_dh, s_g, s_u, s_dg, s_du,
                         NEED_G: tl.constexpr, NEED_U: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RTNE_BF16: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = (rows < M)[:, None] & (cols < N)[None, :]
    dh = tl.load(dh_ptr + rows[:, None] * s_dh + cols[None, :], mask=m, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + rows[:, None] * s_g + cols[None, :], mask=m, other=0.0).to(tl.float32)
    dtype = dh_ptr.dtype.element_ty
    sig = 1.0 / (1.0 + tl.exp(-g))
    if NEED_G:
        u = tl.load(u_ptr + rows[:, None] * s_u + cols[None, :], mask=m, other=0.0).to(tl.float32)
        da = _round(dh * u, dtype, RTNE_BF16)
        dg = da * sig * (1.0 + g * (1.0 - sig))
        tl.store(dg_ptr + rows[:, None] * s_dg + cols[None, :], _to_out(dg, dtype, RTNE_BF16), mask=m)
    if NEED_U:
        a = _round(g * sig, dtype, RTNE_BF16)
        tl.store(du_ptr + rows[:, None] * s_du + cols[None, :], _to_out(dh * a, dtype, RTNE_BF16), mask=m)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(…, I) → (M, I) view with unit column stride (a copy only when the last dim is strided)."""
    t2 = t.reshape(-1, t.shape[-1]) if t.dim() != 2 else t
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _grid(M: int, N: int):
    return (triton.cdiv(M, _BLOCK_M), triton.cdiv(N, _BLOCK_N))


def silu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """h = silu(g) · u. g, u (..., I), same shape and dtype (fp16/bf16/fp32) → h (..., I) contiguous."""
    if g.shape != u.shape or g.dtype != u.dtype:
        raise ValueError(f"g {tuple(g.shape)} {g.dtype} and u {tuple(u.shape)} {u.dtype} must match in shape and dtype")
    g2, u2 = _rows(g), _rows(u)
    M, N = g2.shape
    h = torch.empty((M, N), dtype=g.dtype, device=g.device)
    if M and N:
        _silu_mul_fwd_kernel[_grid(M, N)](g2, u2, h, M, N, g2.stride(0), u2.stride(0), h.stride(0),
                                          BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N, RTNE_BF16=_rtne(g.dtype),
                                          num_warps=4)
    return h.view(g.shape)


def silu_mul_backward(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor, need_g: bool = True,
                      need_u: bool = True):
    """(dg, du) of h = silu(g) · u for the upstream gradient dh (..., I); None where not needed."""
    dh2, g2, u2 = _rows(dh), _rows(g), _rows(u)
    M, N = g2.shape
    dg = torch.empty((M, N), dtype=g.dtype, device=g.device) if need_g else None
    du = torch.empty((M, N), dtype=g.dtype, device=g.device) if need_u else None
    if M and N and (need_g or need_u):
        dg_arg, du_arg = (dg if need_g else dh2), (du if need_u else dh2)
        _silu_mul_bwd_kernel[_grid(M, N)](dh2, g2, u2, dg_arg, du_arg, M, N, dh2.stride(0), g2.stride(0),
                                          u2.stride(0), dg_arg.stride(0), du_arg.stride(0),
                                          NEED_G=need_g, NEED_U=need_u, BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N,
                                          RTNE_BF16=_rtne(g.dtype), num_warps=4)
    return (None if dg is None else dg.view(g.shape)), (None if du is None else du.view(g.shape))

