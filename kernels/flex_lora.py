"""Triton launchers for the τ-masked LoRA linear (docs/op.md): the ``triton`` backend of pyflex/lora/contract.py.

``forward``, ``backward`` and ``tau_gradient`` implement the contract; ``lora_forward`` and ``lora_backward`` are
the same with the positional signatures of pyflex/lora/reference.py (the spec), which the kernel tests call.
Dispatch (pyflex/lora/backends.py) sends CUDA tensors here, and CPU tensors under the Triton interpreter
(TRITON_INTERPRET=1, used by the tests). fp16, bf16 and fp32 only (declared in the backend's capabilities).

Design (chosen by measurement on one H100, bf16, torch 2.11 + triton 3.6; bench/bench_gpu_flex_lora.py):

* The two big GEMMs (y0 = x W0ᵀ + b, dx = gy W0) and the optional dW0/db stay on cuBLAS: a plain Triton
  GEMM measured 1.17-1.30× cuBLAS, more than everything the LoRA side costs.
* Everything rank-r is fused into memory-bound Triton passes that read each big operand once:
    - forward rows pass: z = x̃ Aᵀ (fp32), Σ y0² per row, ρ through the r×r Gram G = BᵀB, the mask, and
      y = y0 + m·c·(B z) for active rows only (masked rows are neither re-read nor written). With τ off
      and no bias the pass writes c·(B z) into a fresh buffer and cuBLAS adds x W0ᵀ onto it (beta = 1),
      which measured ~35 µs faster at 8192×4096×4096 than re-reading y0 (GPU_CONFIG["modes"]);
    - backward rows pass: u = Bᵀ gy (gy read once; masked rows are skipped unless μ needs u), uz = u·z,
      v = m·c·u, and the LoRA term of dx, (v A)·dropout, which cuBLAS then adds gy W0 onto (dx_addmm);
    - dA = vᵀ x̃ and dB = gyᵀ (m·c·z) as split-M skinny reductions whose row loads skip masked rows
      (no compaction copy, no host sync).
* Decode (M ≤ DECODE_MAX_M): one GEMV-style launch reads W0 once; besides the W0-block programs that
  produce y0 (+bias) and partial Σ y0², a few programs compute partial z and partial Gram matrices, so no
  program reads much more than a W0 block; a second small launch forms ρ, the mask and adds m·c·(B z).

Numerics: y0 in the input dtype as F.linear; z, G, ρ, uz, v and the LoRA delta accumulate in float32.
bf16/fp16 operands go to tensor cores natively (exact products, fp32 accumulation). Products with an fp32
operand (v A, (c z) Bᵀ, vᵀ x̃, wᵀ gy): fp32 inputs use IEEE fp32 dots; fp16 (and bf16 at r ≤ 16) use TF32,
whose rounding stays below the 16-bit output rounding; bf16 at r ≥ 32 splits the fp32 operand into
bf16 hi + lo and runs two native dots (≈ fp32-exact, ~15% faster fwd+bwd at r=64).

Under the interpreter ``tl.dot`` on bf16/fp16 tiles is wrong (triton 3.6/3.9 on CPU), so all dot
operands are upcast to fp32 there (the ``UPCAST`` constexpr); it also converts fp32 → bf16 by truncation,
so bf16 stores round to nearest even on the bits there (``RTNE_BF16``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from pyflex.kernels.numerics import INTERPRET, _rtne, _to_out
from pyflex.lora.contract import NORM_EPS, BackwardInputs, BackwardResult, ForwardInputs, ForwardResult

# Token counts up to this take the decode path (one pass over W0 computing y0, z, Σy0² together).
DECODE_MAX_M = 64

# Block sizes of the compiled (GPU) kernels, picked with `bench/bench_gpu_flex_lora.py --sweep` on H100
# bf16 (M=8192, K=N=4096). Keys (name, padded rank) override per rank; BM=None would pick 32 rows per
# program when that still gives ≥ 2 programs per SM, else 16.
GPU_CONFIG = {
    "fwd_rows": dict(BM=16, BN=128, BK=128, num_warps=4),
    ("fwd_rows", 16): dict(BM=16, BN=256, BK=128, num_warps=4),
    "bwd_rows": dict(BM=16, BN=128, BK=128, num_warps=4),
    ("bwd_rows", 16): dict(BM=16, BN=256, BK=256, num_warps=8),
    "rank_reduce": dict(BM=64, BD=128, num_warps=4),
    ("rank_reduce", 16): dict(BM=32, BD=256, num_warps=4),
    # BK halves for fp32; BN_TAU: wider W0 blocks when τ is on (fewer Σy0² partials to gather)
    "decode": dict(BN=32, BN_TAU=64, BK=256, BK_SMALL_M=128, BNG=128, BN_APPLY=128, num_warps=4, num_stages=4),
    # fwd_addmm / dx_addmm: the rows pass writes only the LoRA term into a fresh buffer and cuBLAS adds the
    # big GEMM onto it (beta = 1) instead of the pass re-reading and re-writing the GEMM's output.
    # split_dots: see _dot_f32_lhs.
    "modes": dict(fwd_addmm=True, dx_addmm=True, split_dots=True, split_min_rank=32),
}
# Small blocks under the interpreter: fewer wasted lanes, faster tests.
_INTERPRET_CONFIG = {
    "fwd_rows": dict(BM=16, BN=64, BK=64, num_warps=4),
    "bwd_rows": dict(BM=16, BN=64, BK=64, num_warps=4),
    "rank_reduce": dict(BM=16, BD=64, num_warps=4),
    "decode": dict(BN=32, BN_TAU=32, BK=32, BK_SMALL_M=32, BNG=32, BN_APPLY=64, num_warps=4, num_stages=1),
    "modes": dict(fwd_addmm=False, dx_addmm=False, split_dots=False),
}


def _config(name: str, M: int, device: torch.device, RP: int = 16) -> dict:
    table = _INTERPRET_CONFIG if INTERPRET else GPU_CONFIG
    cfg = dict(table.get((name, RP), table[name]))  # (name, padded rank) entries override per rank
    if cfg.get("BM", 0) is None:
        cfg["BM"] = 32 if triton.cdiv(M, 32) >= 2 * _num_sms(device) else 16
    return cfg


def _rank_pad(r: int) -> int:
    """tl.dot needs every dimension ≥ 16 and tl.arange needs powers of two."""
    return max(16, triton.next_power_of_2(r))


def _split(dtype: torch.dtype, RP: int) -> bool:
    """Split fp32 operands into bf16 hi + lo for native dots (see _dot_f32_lhs): bf16 on GPU only (fp16 could
    overflow on hi; the interpreter's bf16 dots are wrong), and from rank split_min_rank on (H100: at r=64 it
    saved ~15% of fwd+bwd; at r=16 it measured 2-6% slower than the TF32 dot)."""
    modes = GPU_CONFIG["modes"]
    return (not INTERPRET) and dtype == torch.bfloat16 and modes["split_dots"] and RP >= modes.get("split_min_rank", 0)


def _prec(dtype: torch.dtype) -> str:
    """Precision of dots that have an fp32 operand: IEEE for fp32 inputs, TF32 for 16-bit inputs."""
    return "ieee" if (dtype == torch.float32 or INTERPRET) else "tf32"



@triton.jit
def _dot_f32_lhs(p, q, acc, SPLIT: tl.constexpr, PREC: tl.constexpr):
    """acc + p @ q for an fp32 p and a q in the input dtype. SPLIT (bf16 on GPU): p = hi + lo, both bf16,
    and two native bf16 dots: products exact to ~2^-16 of p, fp32 sums, and q is never widened to fp32
    (half the registers and shared memory of a TF32 dot). Otherwise q is widened and the dot runs at PREC."""
    if SPLIT:
        hi = p.to(q.dtype)
        lo = (p - hi.to(tl.float32)).to(q.dtype)
        acc = tl.dot(hi, q, acc)
        acc = tl.dot(lo, q, acc)
    else:
        acc = tl.dot(p, q.to(tl.float32), acc, input_precision=PREC)
    return acc


@triton.jit
def _acc_x_wt(acc, x_ptr, rows, rmask, s_xm, s_xk, w_ptr, cols, cmask, s_wc, s_wk, k_lo, k_hi, K,
              BK: tl.constexpr, UPCAST: tl.constexpr, XPREC: tl.constexpr):
    """acc + x[rows, k_lo:k_hi] · W[cols, k_lo:k_hi]ᵀ with fp32 accumulation; W is read through its strides (s_wc per
    column of the result, s_wk along K). The one skinny-GEMM loop of the forward kernels: z = x̃ Aᵀ (W = A) and the
    decode path's y0 block (W = W0). ``rows``/``cols`` come in the index type the caller needs (int64 for big M)."""
    for k0 in range(k_lo, k_hi, BK):
        ks = k0 + tl.arange(0, BK)
        kmask = ks < K
        xt = tl.load(x_ptr + rows[:, None] * s_xm + ks[None, :] * s_xk,
                     mask=rmask[:, None] & kmask[None, :], other=0.0)
        wt = tl.load(w_ptr + cols[None, :] * s_wc + ks[:, None] * s_wk,
                     mask=cmask[None, :] & kmask[:, None], other=0.0)
        if UPCAST:
            xt = xt.to(tl.float32)
            wt = wt.to(tl.float32)
        acc = tl.dot(xt, wt, acc, input_precision=XPREC)
    return acc


# ------------------------------------------------------------------------------------------------
# forward: rows pass after the cuBLAS y0
# ------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["M"])
def _fwd_rows_kernel(y_ptr, xl_ptr, a_ptr, b_ptr, g_ptr, c_ptr, z_ptr, ratio_ptr, mask_ptr, bias_ptr,
                     M, N, K, R, tau_ptr,
                     s_ym, s_yn, s_xm, s_xk, s_ar, s_ak, s_bn, s_br,
                     HAS_TAU: tl.constexpr, ADD_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                     RP: tl.constexpr, UPCAST: tl.constexpr, RTNE_BF16: tl.constexpr, XPREC: tl.constexpr, PREC: tl.constexpr,
                     EPS: tl.constexpr, WRITE_ONLY: tl.constexpr, SPLIT: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BM + tl.arange(0, BM)
    rmask = rows < M
    rr = tl.arange(0, RP)
    rrmask = rr < R
    rows64 = rows.to(tl.int64)

    # z = x̃ Aᵀ, fp32 accumulation
    acc = _acc_x_wt(tl.zeros((BM, RP), dtype=tl.float32), xl_ptr, rows64, rmask, s_xm, s_xk,
                    a_ptr, rr, rrmask, s_ar, s_ak, 0, K, K, BK, UPCAST, XPREC)
    tl.store(z_ptr + rows64[:, None] * R + rr[None, :], acc, mask=rmask[:, None] & rrmask[None, :])

    c = tl.load(c_ptr + rows, mask=rmask, other=0.0)
    if HAS_TAU:
        sq = tl.zeros((BM,), dtype=tl.float32)
        for n0 in range(0, N, BN):
            ns = n0 + tl.arange(0, BN)
            yt = tl.load(y_ptr + rows64[:, None] * s_ym + ns[None, :] * s_yn,
                         mask=rmask[:, None] & (ns < N)[None, :], other=0.0).to(tl.float32)
            sq += tl.sum(yt * yt, axis=1)
        g = tl.load(g_ptr + rr[:, None] * R + rr[None, :], mask=rrmask[:, None] & rrmask[None, :], other=0.0)
        zg = tl.dot(acc, g, input_precision="ieee")
        dsq = tl.maximum(tl.sum(zg * acc, axis=1), 0.0)
        ratio = tl.abs(c) * tl.sqrt(dsq) / tl.maximum(tl.sqrt(sq), EPS)
        active = ratio >= tl.load(tau_ptr)  # τ read on the device: no host sync
        tl.store(ratio_ptr + rows, ratio, mask=rmask)
        tl.store(mask_ptr + rows, active.to(tl.int8), mask=rmask)
        act = rmask & active
    else:
        tl.store(mask_ptr + rows, tl.full((BM,), 1, tl.int8), mask=rmask)
        act = rmask

    # y = y0 + m·c·(z Bᵀ), written in place, active rows only
    w = acc * c[:, None]
    for n0 in range(0, N, BN):
        ns = n0 + tl.arange(0, BN)
        nmask = ns < N
        bt = tl.load(b_ptr + ns[None, :] * s_bn + rr[:, None] * s_br,
                     mask=nmask[None, :] & rrmask[:, None], other=0.0)
        d = _dot_f32_lhs(w, bt, tl.zeros((BM, BN), dtype=tl.float32), SPLIT, PREC)
        yp = y_ptr + rows64[:, None] * s_ym + ns[None, :] * s_yn
        if ADD_BIAS:  # y0 came without bias (the ratio's denominator is ‖W0 x‖): every row gets the bias here
            d = tl.where(act[:, None], d, 0.0) + tl.load(bias_ptr + ns, mask=nmask, other=0.0).to(tl.float32)[None, :]
            ym = rmask[:, None] & nmask[None, :]
        else:
            ym = act[:, None] & nmask[None, :]
        if WRITE_ONLY:
            tl.store(yp, _to_out(d, y_ptr.dtype.element_ty, RTNE_BF16), mask=ym)
        else:
            yt = tl.load(yp, mask=ym, other=0.0).to(tl.float32)
            tl.store(yp, _to_out(yt + d, y_ptr.dtype.element_ty, RTNE_BF16), mask=ym)


# ------------------------------------------------------------------------------------------------
# forward: decode path (small M): one pass over W0
# ------------------------------------------------------------------------------------------------
@triton.jit
def _decode_base_kernel(x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, y_ptr, sqp_ptr, zp_ptr, gp_ptr,
                        M, N, K, R, KZ, NG,
                        s_xm, s_xk, s_wn, s_wk, s_ar, s_ak, s_bn, s_br, s_ym, s_yn,
                        HAS_BIAS: tl.constexpr, HAS_TAU: tl.constexpr, NZ: tl.constexpr,
                        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BNG: tl.constexpr,
                        RP: tl.constexpr, UPCAST: tl.constexpr, RTNE_BF16: tl.constexpr, XPREC: tl.constexpr):
    """One launch, three kinds of programs that all run at once:
    [0, cdiv(N, BN)): y0[:, block] (+bias), rounded, and the partial Σ (x W0ᵀ)² per row (bias-free);
    next NZ: partial z = x[:, k-range] A[:, k-range]ᵀ over K ranges of KZ (summed by the apply kernel);
    next (with τ) cdiv(N, NG): partial Gram B[n-range]ᵀ B[n-range].
    Splitting z and G over programs keeps every program's bytes close to a W0 block's."""
    pid = tl.program_id(0)
    n_wblk = tl.cdiv(N, BN)
    rows = tl.arange(0, BM)
    rmask = rows < M
    rr = tl.arange(0, RP)
    rrmask = rr < R
    if pid < n_wblk:
        cols = pid * BN + tl.arange(0, BN)
        cmask = cols < N
        acc = _acc_x_wt(tl.zeros((BM, BN), dtype=tl.float32), x_ptr, rows, rmask, s_xm, s_xk,
                        w_ptr, cols.to(tl.int64), cmask, s_wn, s_wk, 0, K, K, BK, UPCAST, XPREC)
        ym = rmask[:, None] & cmask[None, :]
        if HAS_TAU:
            # Σ over the rounded bias-free y0 = x W0ᵀ, as the reference squares F.linear(x, W0) (PEFT_S eq. 4)
            yf = tl.where(ym, _to_out(acc, y_ptr.dtype.element_ty, RTNE_BF16).to(tl.float32), 0.0)
            tl.store(sqp_ptr + pid * BM + rows, tl.sum(yf * yf, axis=1))
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        yv = _to_out(acc, y_ptr.dtype.element_ty, RTNE_BF16)
        tl.store(y_ptr + rows[:, None] * s_ym + cols[None, :] * s_yn, yv, mask=ym)
    elif pid < n_wblk + NZ:
        j = pid - n_wblk
        acc = _acc_x_wt(tl.zeros((BM, RP), dtype=tl.float32), x_ptr, rows, rmask, s_xm, s_xk,
                        a_ptr, rr, rrmask, s_ar, s_ak, j * KZ, tl.minimum(j * KZ + KZ, K), K, BK, UPCAST, XPREC)
        tl.store(zp_ptr + j * BM * RP + rows[:, None] * RP + rr[None, :], acc)
    else:
        if HAS_TAU:
            j = pid - n_wblk - NZ
            gacc = tl.zeros((RP, RP), dtype=tl.float32)
            for n0 in range(j * NG, tl.minimum(j * NG + NG, N), BNG):
                ns = n0 + tl.arange(0, BNG)
                bt = tl.load(b_ptr + ns[:, None] * s_bn + rr[None, :] * s_br,
                             mask=(ns < N)[:, None] & rrmask[None, :], other=0.0)
                if UPCAST:
                    bt = bt.to(tl.float32)
                # 16-bit B goes to tensor cores natively: exact products, fp32 sums
                gacc = tl.dot(tl.trans(bt), bt, gacc, input_precision=XPREC)
            tl.store(gp_ptr + j * RP * RP + rr[:, None] * RP + rr[None, :], gacc)


@triton.jit
def _decode_apply_kernel(y_ptr, b_ptr, gp_ptr, c_ptr, zp_ptr, z_ptr, sqp_ptr, ratio_ptr, mask_ptr,
                         M, N, R, n_parts, tau_ptr,
                         s_ym, s_yn, s_bn, s_br,
                         HAS_TAU: tl.constexpr, NZ: tl.constexpr, NGP: tl.constexpr,
                         BM: tl.constexpr, BN: tl.constexpr, BP: tl.constexpr,
                         RP: tl.constexpr, PREC: tl.constexpr, EPS: tl.constexpr, RTNE_BF16: tl.constexpr):
    pid = tl.program_id(0)
    rows = tl.arange(0, BM)
    rmask = rows < M
    rr = tl.arange(0, RP)
    rrmask = rr < R
    z = tl.zeros((BM, RP), dtype=tl.float32)
    for j in tl.static_range(NZ):
        z += tl.load(zp_ptr + j * BM * RP + rows[:, None] * RP + rr[None, :])
    if pid == 0:
        tl.store(z_ptr + rows[:, None] * R + rr[None, :], z, mask=rmask[:, None] & rrmask[None, :])
    c = tl.load(c_ptr + rows, mask=rmask, other=0.0)
    if HAS_TAU:
        sq = tl.zeros((BM,), dtype=tl.float32)
        for p0 in range(0, n_parts, BP):
            ps = p0 + tl.arange(0, BP)
            part = tl.load(sqp_ptr + ps[:, None] * BM + rows[None, :], mask=(ps < n_parts)[:, None], other=0.0)
            sq += tl.sum(part, axis=0)
        g = tl.zeros((RP, RP), dtype=tl.float32)
        for j in tl.static_range(NGP):
            g += tl.load(gp_ptr + j * RP * RP + rr[:, None] * RP + rr[None, :])
        zg = tl.dot(z, g, input_precision="ieee")
        dsq = tl.maximum(tl.sum(zg * z, axis=1), 0.0)
        ratio = tl.abs(c) * tl.sqrt(dsq) / tl.maximum(tl.sqrt(sq), EPS)
        active = ratio >= tl.load(tau_ptr)  # τ read on the device: no host sync
        if pid == 0:
            tl.store(ratio_ptr + rows, ratio, mask=rmask)
            tl.store(mask_ptr + rows, active.to(tl.int8), mask=rmask)
        act = rmask & active
    else:
        if pid == 0:
            tl.store(mask_ptr + rows, tl.full((BM,), 1, tl.int8), mask=rmask)
        act = rmask
    cols = pid * BN + tl.arange(0, BN)
    cmask = cols < N
    bt = tl.load(b_ptr + cols[None, :] * s_bn + rr[:, None] * s_br,
                 mask=cmask[None, :] & rrmask[:, None], other=0.0).to(tl.float32)
    d = tl.dot(z * c[:, None], bt, input_precision=PREC)
    yp = y_ptr + rows[:, None] * s_ym + cols[None, :] * s_yn
    ym = act[:, None] & cmask[None, :]
    yt = tl.load(yp, mask=ym, other=0.0).to(tl.float32)
    tl.store(yp, _to_out(yt + d, y_ptr.dtype.element_ty, RTNE_BF16), mask=ym)


# ------------------------------------------------------------------------------------------------
# backward kernels
# ------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["M"])
def _bwd_rows_kernel(gy_ptr, b_ptr, z_ptr, c_ptr, mask_ptr, a_ptr, dx_ptr, ds_ptr, uz_ptr, v_ptr, w_ptr,
                     M, N, K, R,
                     s_gm, s_gn, s_bn, s_br, s_ar, s_ak, s_dm, s_dk, s_sm, s_sk,
                     NEED_UZ: tl.constexpr, NEED_ADAPTER: tl.constexpr, NEED_DX: tl.constexpr,
                     HAS_DROPOUT: tl.constexpr, DX_WRITE_ONLY: tl.constexpr, SPLIT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                     RP: tl.constexpr, UPCAST: tl.constexpr, RTNE_BF16: tl.constexpr, XPREC: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BM + tl.arange(0, BM)
    rmask = rows < M
    rows64 = rows.to(tl.int64)
    rr = tl.arange(0, RP)
    rrmask = rr < R
    m = tl.load(mask_ptr + rows, mask=rmask, other=0) != 0
    act = rmask & m
    # μ needs u on every token; v only on active ones, so masked rows of gy are not read unless needed
    if NEED_UZ:
        ld = rmask
    else:
        ld = act
    u = tl.zeros((BM, RP), dtype=tl.float32)
    for n0 in range(0, N, BN):
        ns = n0 + tl.arange(0, BN)
        nmask = ns < N
        gt = tl.load(gy_ptr + rows64[:, None] * s_gm + ns[None, :] * s_gn,
                     mask=ld[:, None] & nmask[None, :], other=0.0)
        bt = tl.load(b_ptr + ns[:, None] * s_bn + rr[None, :] * s_br,
                     mask=nmask[:, None] & rrmask[None, :], other=0.0)
        if UPCAST:
            gt = gt.to(tl.float32)
            bt = bt.to(tl.float32)
        u = tl.dot(gt, bt, u, input_precision=XPREC)
    c = tl.load(c_ptr + rows, mask=rmask, other=0.0)
    if NEED_UZ or NEED_ADAPTER:
        z = tl.load(z_ptr + rows64[:, None] * R + rr[None, :], mask=rmask[:, None] & rrmask[None, :], other=0.0)
        if NEED_UZ:
            tl.store(uz_ptr + rows, tl.sum(u * z, axis=1), mask=rmask)
        if NEED_ADAPTER:
            wv = tl.where(act[:, None], z * c[:, None], 0.0)
            tl.store(w_ptr + rows64[:, None] * RP + rr[None, :], wv, mask=rmask[:, None])
    v = tl.where(act[:, None], u * c[:, None], 0.0)
    if NEED_ADAPTER:
        tl.store(v_ptr + rows64[:, None] * RP + rr[None, :], v, mask=rmask[:, None])
    if NEED_DX:
        for k0 in range(0, K, BK):
            ks = k0 + tl.arange(0, BK)
            kmask = ks < K
            at = tl.load(a_ptr + rr[:, None] * s_ar + ks[None, :] * s_ak,
                         mask=rrmask[:, None] & kmask[None, :], other=0.0)
            t = _dot_f32_lhs(v, at, tl.zeros((BM, BK), dtype=tl.float32), SPLIT, PREC)
            xm = act[:, None] & kmask[None, :]
            if HAS_DROPOUT:
                t = t * tl.load(ds_ptr + rows64[:, None] * s_sm + ks[None, :] * s_sk, mask=xm, other=0.0).to(tl.float32)
            dp = dx_ptr + rows64[:, None] * s_dm + ks[None, :] * s_dk
            if DX_WRITE_ONLY:
                # the LoRA term alone (zero on masked rows); cuBLAS adds gy W0 on top of it
                tl.store(dp, _to_out(t, dx_ptr.dtype.element_ty, RTNE_BF16), mask=rmask[:, None] & kmask[None, :])
            else:
                dt = tl.load(dp, mask=xm, other=0.0).to(tl.float32)
                tl.store(dp, _to_out(dt + t, dx_ptr.dtype.element_ty, RTNE_BF16), mask=xm)


@triton.jit(do_not_specialize=["M"])
def _rank_reduce_kernel(p_ptr, q_ptr, mask_ptr, out_ptr, M, D, rows_per_split,
                        s_qm, s_qd,
                        BM: tl.constexpr, BD: tl.constexpr, RP: tl.constexpr, UPCAST: tl.constexpr,
                        PREC: tl.constexpr, SPLIT: tl.constexpr):
    """out[s] (RP × D, fp32) = Σ_{i in split s, mask_i} P_iᵀ Q_i with P (M × RP) fp32, Q (M × D)."""
    pid_d = tl.program_id(0)
    pid_s = tl.program_id(1)
    cols = pid_d * BD + tl.arange(0, BD)
    cmask = cols < D
    rr = tl.arange(0, RP)
    acc = tl.zeros((RP, BD), dtype=tl.float32)
    m_start = pid_s * rows_per_split
    m_end = tl.minimum(m_start + rows_per_split, M)
    for m0 in range(m_start, m_end, BM):
        rows = m0 + tl.arange(0, BM)
        rows64 = rows.to(tl.int64)
        act = (rows < m_end) & (tl.load(mask_ptr + rows, mask=rows < m_end, other=0) != 0)
        pt = tl.load(p_ptr + rows64[None, :] * RP + rr[:, None], mask=act[None, :], other=0.0)
        qt = tl.load(q_ptr + rows64[:, None] * s_qm + cols[None, :] * s_qd,
                     mask=act[:, None] & cmask[None, :], other=0.0)
        acc = _dot_f32_lhs(pt, qt, acc, SPLIT, PREC)
    tl.store(out_ptr + pid_s.to(tl.int64) * RP * D + rr[:, None] * D + cols[None, :], acc, mask=cmask[None, :])


@triton.jit(do_not_specialize=["M"])
def _tau_grad_kernel(uz_ptr, c_ptr, mask_ptr, out_ptr, M, lam, BLOCK: tl.constexpr):
    """out[0] = −g, g = Σ_i 1[(μ_i ≥ 0) == m_i]·μ_i + λ·Σ_i m_i with μ_i = c_i·uz_i (PEFT_S eq. 10, 14-17).
    One program: M is a token count, so this is one short loop, and one launch instead of a chain of small ops."""
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    count = tl.zeros((BLOCK,), dtype=tl.float32)
    for m0 in range(0, M, BLOCK):
        offs = m0 + tl.arange(0, BLOCK)
        valid = offs < M
        mu = tl.load(uz_ptr + offs, mask=valid, other=0.0) * tl.load(c_ptr + offs, mask=valid, other=0.0)
        m = (tl.load(mask_ptr + offs, mask=valid, other=0) != 0) & valid
        acc += tl.where(((mu >= 0) == m) & valid, mu, 0.0)
        count += tl.where(m, 1.0, 0.0)
    tl.store(out_ptr, -(tl.sum(acc, axis=0) + lam * tl.sum(count, axis=0)))


# ------------------------------------------------------------------------------------------------
# launchers
# ------------------------------------------------------------------------------------------------
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _tau_arg(tau, cscale: torch.Tensor) -> torch.Tensor:
    """τ as a 1-element fp32 tensor on the kernel's device. ``tau`` may be a python float or a 1-element tensor
    already on that device (then no host round trip is needed); None gives a dummy the kernel never reads."""
    if tau is None:
        return cscale
    if isinstance(tau, torch.Tensor):
        return tau.detach().reshape(1).to(device=cscale.device, dtype=torch.float32)
    return torch.full((1,), float(tau), dtype=torch.float32, device=cscale.device)


def _forward_rows(x, weight, bias, lora_A, lora_B, x_lora, cscale, tau):
    M, K = x.shape
    N, R = lora_B.shape
    RP = _rank_pad(R)
    modes = (_INTERPRET_CONFIG if INTERPRET else GPU_CONFIG)["modes"]
    write_only = tau is None and bias is None and modes["fwd_addmm"]
    add_bias = tau is not None and bias is not None
    if write_only:
        y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    else:
        # With τ the ratio needs ‖x W0ᵀ‖ without the bias (PEFT_S eq. 4); the kernel adds the bias afterwards.
        y = F.linear(x, weight, None if add_bias else bias)
        if not y.is_contiguous():
            y = y.contiguous()
    z = torch.empty((M, R), dtype=torch.float32, device=x.device)
    mask = torch.empty((M,), dtype=torch.bool, device=x.device)
    if tau is None:
        ratio, gram = None, z
    else:
        ratio = torch.empty((M,), dtype=torch.float32, device=x.device)
        bf = lora_B.float()
        gram = (bf.t() @ bf).contiguous()
    cfg = _config("fwd_rows", M, x.device, RP)
    _fwd_rows_kernel[(triton.cdiv(M, cfg["BM"]),)](
        y, x_lora, lora_A, lora_B, gram, cscale, z, ratio if ratio is not None else z, mask.view(torch.int8),
        bias if add_bias else z, M, N, K, R, _tau_arg(tau, cscale),
        y.stride(0), y.stride(1), x_lora.stride(0), x_lora.stride(1), lora_A.stride(0), lora_A.stride(1),
        lora_B.stride(0), lora_B.stride(1),
        HAS_TAU=tau is not None, ADD_BIAS=add_bias, RP=RP, UPCAST=INTERPRET, RTNE_BF16=_rtne(x.dtype), XPREC=_prec(x.dtype),
        PREC=_prec(x.dtype), EPS=NORM_EPS, WRITE_ONLY=write_only,
        SPLIT=_split(x.dtype, RP), **cfg)
    if write_only:
        y.addmm_(x, weight.t())
    return ForwardResult(y, z, ratio, mask)


def _forward_decode(x, weight, bias, lora_A, lora_B, cscale, tau):
    """M ≤ DECODE_MAX_M and x̃ = x (no dropout). Two launches: _decode_base_kernel, _decode_apply_kernel."""
    M, K = x.shape
    N, R = lora_B.shape
    RP = _rank_pad(R)
    BM = max(16, triton.next_power_of_2(M))
    cfg = _INTERPRET_CONFIG["decode"] if INTERPRET else GPU_CONFIG["decode"]
    has_tau = tau is not None
    BN = cfg["BN_TAU"] if has_tau else cfg["BN"]
    BK = cfg["BK"] if (M > 16 and not has_tau) else cfg["BK_SMALL_M"]
    BK = BK if x.element_size() == 2 else BK // 2
    # shared memory per stage is (BM + max(BN, RP))·BK·itemsize (W0 programs load BN rows of W0, z programs
    # RP rows of A): keep the pipeline under ~200 KiB (H100: 227 KiB)
    stages = max(1, min(cfg["num_stages"], (200 * 1024) // ((BM + max(BN, RP)) * BK * x.element_size())))
    n_wblk = triton.cdiv(N, BN)
    # split the z and Gram work so that no program reads much more than one W0 block does
    w_block_bytes = BN * K * x.element_size()
    nz = max(1, min(8, triton.cdiv((R + M) * K * x.element_size(), w_block_bytes)))
    KZ = triton.cdiv(triton.cdiv(K, nz), BK) * BK
    nz = triton.cdiv(K, KZ)
    NG = triton.cdiv(triton.cdiv(N, max(1, min(8, triton.cdiv(N * R * lora_B.element_size(), w_block_bytes)))),
                     cfg["BNG"]) * cfg["BNG"]
    ng = triton.cdiv(N, NG) if has_tau else 0
    dev = x.device
    y = torch.empty((M, N), dtype=x.dtype, device=dev)
    z = torch.empty((M, R), dtype=torch.float32, device=dev)
    zpart = torch.empty((nz, BM, RP), dtype=torch.float32, device=dev)
    mask = torch.empty((M,), dtype=torch.bool, device=dev)
    if has_tau:
        sqp = torch.empty((n_wblk, BM), dtype=torch.float32, device=dev)
        gpart = torch.empty((ng, RP, RP), dtype=torch.float32, device=dev)
        ratio = torch.empty((M,), dtype=torch.float32, device=dev)
    else:
        sqp = gpart = z
        ratio = None
    _decode_base_kernel[(n_wblk + nz + ng,)](
        x, weight, bias if bias is not None else x, lora_A, lora_B, y, sqp, zpart, gpart,
        M, N, K, R, KZ, NG,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), lora_A.stride(0), lora_A.stride(1),
        lora_B.stride(0), lora_B.stride(1), y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None, HAS_TAU=has_tau, NZ=nz, BM=BM, BN=BN, BK=BK, BNG=cfg["BNG"],
        RP=RP, UPCAST=INTERPRET, RTNE_BF16=_rtne(x.dtype), XPREC=_prec(x.dtype), num_warps=cfg["num_warps"],
        num_stages=stages)
    BN2 = cfg["BN_APPLY"]
    _decode_apply_kernel[(triton.cdiv(N, BN2),)](
        y, lora_B, gpart, cscale, zpart, z, sqp, ratio if ratio is not None else z, mask.view(torch.int8),
        M, N, R, n_wblk, _tau_arg(tau, cscale),
        y.stride(0), y.stride(1), lora_B.stride(0), lora_B.stride(1),
        HAS_TAU=has_tau, NZ=nz, NGP=ng, BM=BM, BN=BN2, BP=64, RP=RP, PREC=_prec(x.dtype), EPS=NORM_EPS,
        RTNE_BF16=_rtne(x.dtype), num_warps=4)
    return ForwardResult(y, z, ratio, mask)


def lora_forward(x, weight, bias, lora_A, lora_B, x_lora, cscale, tau) -> ForwardResult:
    """Same semantics as pyflex/lora/reference.py's ``lora_forward``; ``tau`` may also be a 1-element tensor on x's
    device, which the kernels read in place (no device→host sync).

    x, x_lora (M, K), weight (N, K), bias (N,) or None, lora_A (r, K), lora_B (N, r): one dtype, fp16/bf16/fp32.
    cscale (M,) float. Returns ForwardResult(y (M, N) x.dtype, z (M, r) fp32, ratio (M,) fp32 or None, mask (M,)).
    """
    M = x.shape[0]
    N, R = lora_B.shape
    if M == 0:
        y = F.linear(x, weight, bias)
        z = torch.empty((0, R), dtype=torch.float32, device=x.device)
        ratio = None if tau is None else torch.empty((0,), dtype=torch.float32, device=x.device)
        return ForwardResult(y, z, ratio, torch.ones((0,), dtype=torch.bool, device=x.device))
    cscale = cscale.to(torch.float32).contiguous()
    if M <= DECODE_MAX_M and (x_lora is x or x_lora.data_ptr() == x.data_ptr() and x_lora.stride() == x.stride()):
        return _forward_decode(x, weight, bias, lora_A, lora_B, cscale, tau)
    return _forward_rows(x, weight, bias, lora_A, lora_B, x_lora, cscale, tau)


def _rank_reduce(p: torch.Tensor, q: torch.Tensor, mask_i8: torch.Tensor, R: int) -> torch.Tensor:
    """Σ_i mask_i · p_iᵀ q_i → (R, D) fp32, p (M, RP) fp32 contiguous, q (M, D)."""
    M, D = q.shape
    RP = p.shape[1]
    cfg = _config("rank_reduce", M, q.device, RP)
    BM, BD = cfg["BM"], cfg["BD"]
    n_d = triton.cdiv(D, BD)
    target = 4 * _num_sms(q.device)
    splits = max(1, min(triton.cdiv(target, n_d), triton.cdiv(M, BM)))
    rows_per_split = triton.cdiv(triton.cdiv(M, splits), BM) * BM
    splits = triton.cdiv(M, rows_per_split)
    out = torch.empty((splits, RP, D), dtype=torch.float32, device=q.device)
    _rank_reduce_kernel[(n_d, splits)](
        p, q, mask_i8, out, M, D, rows_per_split, q.stride(0), q.stride(1),
        RP=RP, UPCAST=INTERPRET, PREC=_prec(q.dtype), SPLIT=_split(q.dtype, RP), **cfg)
    return out.sum(0)[:R] if splits > 1 else out[0, :R]


def lora_backward(gy, x, weight, lora_A, lora_B, x_lora, z, cscale, mask, *,
                  need_dx: bool, need_dweight: bool, need_dbias: bool, need_adapter: bool,
                  need_uz: bool, dropout_scale: Optional[torch.Tensor] = None) -> BackwardResult:
    """Same semantics as pyflex/lora/reference.py's ``lora_backward``.

    gy (M, N) in the input dtype; z (M, r) fp32 (needed when need_adapter or need_uz); cscale (M,);
    mask (M,) bool; dropout_scale (M, K) or None. dx, dweight, dbias from cuBLAS (+ the fused LoRA term
    of dx); uz (M,) fp32; dA (r, K), dB (N, r) in the adapter dtype.
    """
    M, N = gy.shape
    R = lora_B.shape[1]
    dx = dweight = dbias = dA = dB = uz = None
    modes = (_INTERPRET_CONFIG if INTERPRET else GPU_CONFIG)["modes"]
    dx_write_only = need_dx and modes["dx_addmm"] and M > 0
    if need_dx:
        dx = torch.empty((M, weight.shape[1]), dtype=gy.dtype, device=gy.device) if dx_write_only else gy @ weight
    if need_dweight:
        dweight = gy.t() @ x
    if need_dbias:
        dbias = gy.sum(0)
    if not (need_dx or need_adapter or need_uz):
        return BackwardResult(dx, dweight, dbias, dA, dB, uz)
    adapter_dtype = lora_A.dtype if lora_A is not None else lora_B.dtype
    if M == 0:
        if need_uz:
            uz = torch.empty((0,), dtype=torch.float32, device=gy.device)
        if need_adapter:
            K = x_lora.shape[1]
            dA = torch.zeros((R, K), dtype=adapter_dtype, device=gy.device)
            dB = torch.zeros_like(lora_B)
        return BackwardResult(dx, dweight, dbias, dA, dB, uz)
    RP = _rank_pad(R)
    dev = gy.device
    cscale = cscale.to(torch.float32).contiguous()
    mask_i8 = mask.contiguous().view(torch.int8)
    if need_dx and not dx.is_contiguous():
        dx = dx.contiguous()
    if need_uz:
        uz = torch.empty((M,), dtype=torch.float32, device=dev)
    if need_adapter:
        v = torch.empty((M, RP), dtype=torch.float32, device=dev)
        w = torch.empty((M, RP), dtype=torch.float32, device=dev)
    else:
        v = w = cscale
    zz = z if z is not None else cscale
    K = dx.shape[1] if need_dx else 0
    a_arg = lora_A if need_dx else lora_B
    dx_arg = dx if need_dx else gy
    ds = dropout_scale if (need_dx and dropout_scale is not None) else dx_arg
    cfg = _config("bwd_rows", M, dev, RP)
    _bwd_rows_kernel[(triton.cdiv(M, cfg["BM"]),)](
        gy, lora_B, zz, cscale, mask_i8, a_arg, dx_arg, ds, uz if uz is not None else cscale, v, w,
        M, N, K, R,
        gy.stride(0), gy.stride(1), lora_B.stride(0), lora_B.stride(1), a_arg.stride(0), a_arg.stride(1),
        dx_arg.stride(0), dx_arg.stride(1), ds.stride(0), ds.stride(1),
        NEED_UZ=need_uz, NEED_ADAPTER=need_adapter, NEED_DX=need_dx,
        HAS_DROPOUT=need_dx and dropout_scale is not None, DX_WRITE_ONLY=dx_write_only,
        SPLIT=_split(gy.dtype, RP),
        RP=RP, UPCAST=INTERPRET, RTNE_BF16=_rtne(gy.dtype), XPREC=_prec(gy.dtype), PREC=_prec(gy.dtype), **cfg)
    if dx_write_only:
        dx.addmm_(gy, weight)
    if need_adapter:
        dA = _rank_reduce(v, x_lora, mask_i8, R).to(adapter_dtype)
        dB = _rank_reduce(w, gy, mask_i8, R).t().to(lora_B.dtype)
    return BackwardResult(dx, dweight, dbias, dA, dB, uz)


def tau_gradient(uz: torch.Tensor, cscale: torch.Tensor, mask: torch.Tensor, lam: float) -> torch.Tensor:
    """Same semantics as pyflex/lora/reference.py's ``tau_gradient``: uz, cscale (M,) fp32, mask (M,) bool → 0-dim
    fp32."""
    M = uz.shape[0]
    out = torch.empty((), dtype=torch.float32, device=uz.device)
    _tau_grad_kernel[(1,)](uz.to(torch.float32).contiguous(), cscale.to(torch.float32).contiguous(),
                           mask.contiguous().view(torch.int8), out, M, float(lam), BLOCK=1024, num_warps=4)
    return out


def forward(i: ForwardInputs) -> ForwardResult:
    """The contract's forward (pyflex/lora/contract.py)."""
    return lora_forward(i.x, i.weight, i.bias, i.lora_A, i.lora_B, i.x_lora, i.cscale, i.tau)


def backward(i: BackwardInputs) -> BackwardResult:
    """The contract's backward (pyflex/lora/contract.py)."""
    return lora_backward(i.gy, i.x, i.weight, i.lora_A, i.lora_B, i.x_lora, i.z, i.cscale, i.mask,
                         need_dx=i.need_dx, need_dweight=i.need_dweight, need_dbias=i.need_dbias,
                         need_adapter=i.need_adapter, need_uz=i.need_uz, dropout_scale=i.dropout_scale)
