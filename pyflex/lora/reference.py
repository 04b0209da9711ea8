"""Plain-PyTorch reference of the τ-masked LoRA linear (docs/op.md; PEFT_S eq. 4, 10, 14-17).

This file is the spec. Every backend (C++ CPU, Triton) runs the contract tests against it
(tests/lora/test_backend_contract.py); it is also the ``reference`` backend (pyflex/lora/backends.py).

Notation (shapes use the flattened token axis M):
    x      (M, K)   input tokens; ``x_lora`` (M, K) is dropout(x), or x itself without dropout
    weight (N, K)   frozen base W0; bias (N,) or None
    lora_A (r, K)   lora_B (N, r)
    cscale (M,)     float32 per-token effective scale s·β·c_i (scale × response scale × gate)
    tau             python float threshold, or None when the mask is off

The ratio ρ_i = ‖d_i‖ / ‖x_i W0ᵀ‖ leaves the bias out of the denominator, as PEFT_S eq. 4 (‖M(x)‖ / ‖W0 x‖).

All LoRA-side arithmetic (z, the Gram matrix, the ratio, the delta) runs in float32 (float64 when the
inputs are float64) so that the mask decision does not depend on bf16 rounding; y0 runs in the input
dtype, as F.linear does.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from pyflex.lora.contract import NORM_EPS, BackwardResult, ForwardResult


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the LoRA-side arithmetic: float64 stays float64, everything else runs in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def token_ratio(z: torch.Tensor, lora_B: torch.Tensor, cscale: torch.Tensor, y0_sq: torch.Tensor) -> torch.Tensor:
    """ρ_i = |cscale_i| · sqrt(z_iᵀ G z_i) / max(‖y0_i‖, eps) with G = BᵀB (r×r): O(r²) per token.

    z (M, r) and cscale (M,) in the compute dtype; y0_sq (M,) is Σ_j y0_ij².
    """
    B = lora_B.to(z.dtype)
    gram = B.t() @ B                                         # (r, r)
    d_sq = ((z @ gram) * z).sum(-1).clamp_min(0.0)           # rounding can make it slightly negative
    return cscale.abs() * d_sq.sqrt() / y0_sq.sqrt().clamp_min(NORM_EPS)


def lora_forward(x, weight, bias, lora_A, lora_B, x_lora, cscale, tau: Optional[float]) -> ForwardResult:
    """Forward of the τ-masked LoRA linear on flattened tokens. No autograd graph is built."""
    cdt = compute_dtype(x.dtype)
    z = x_lora.to(cdt) @ lora_A.to(cdt).t()                 # (M, r)
    if tau is None:
        y0 = F.linear(x, weight, bias)                      # (M, N), input dtype
        ratio = None
        mask = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    else:
        # PEFT_S eq. 4 divides by ‖W0 x_i‖: the bias is not part of the denominator.
        y0 = F.linear(x, weight)
        ratio = token_ratio(z, lora_B, cscale, y0.to(cdt).pow(2).sum(-1))
        mask = ratio >= tau
        if bias is not None:
            y0 = (y0.to(cdt) + bias.to(cdt)).to(x.dtype)
    active = mask.nonzero().squeeze(1)
    # The up-projection B z_i runs only for active tokens.
    delta = (z[active] @ lora_B.to(cdt).t()) * cscale[active, None]
    y = y0.to(cdt).index_add(0, active, delta).to(x.dtype) if active.numel() else y0
    return ForwardResult(y, z, ratio, mask)


def lora_backward(gy, x, weight, lora_A, lora_B, x_lora, z, cscale, mask, *,
                  need_dx: bool, need_dweight: bool, need_dbias: bool, need_adapter: bool,
                  need_uz: bool, dropout_scale: Optional[torch.Tensor] = None) -> BackwardResult:
    """Backward of the op (docs/op.md) given gy = ∂L/∂y (M, N).

    ``dropout_scale`` (M, K) is the dropout mask already divided by (1 - p), or None without dropout;
    the LoRA term of dx goes through it. Masked tokens take no part in dA, dB or the LoRA term of dx.
    """
    # x and lora_A are None when their gradients are not needed (the op saves only what runs), so the
    # dtypes come from gy and lora_B, which are always given and share the input dtype.
    cdt = compute_dtype(gy.dtype)
    dx = dweight = dbias = dA = dB = uz = None
    if need_dx:
        dx = gy @ weight                                      # (M, K)
    if need_dweight:
        dweight = gy.t() @ x
    if need_dbias:
        dbias = gy.sum(0)
    if need_dx or need_adapter or need_uz:
        gyc = gy.to(cdt)
        B = lora_B.to(cdt)
        if need_uz:
            uz = ((gyc @ B) * z).sum(-1)                       # (M,): u_i·z_i for every token
        active = mask.nonzero().squeeze(1)
        if active.numel():
            gy_a = gyc[active]                                   # (Ma, N)
            c_a = cscale[active, None]
            v_a = (gy_a @ B) * c_a                               # (Ma, r) = m·s·β·c·u
            if need_dx:
                lora_dx = v_a @ lora_A.to(cdt)                   # (Ma, K)
                if dropout_scale is not None:
                    lora_dx = lora_dx * dropout_scale[active].to(cdt)
                dx = dx.to(cdt).index_add(0, active, lora_dx).to(gy.dtype)
            if need_adapter:
                dA = (v_a.t() @ x_lora[active].to(cdt)).to(lora_B.dtype)
                dB = (gy_a.t() @ (z[active] * c_a)).to(lora_B.dtype)
        elif need_adapter:
            dA = lora_B.new_zeros((lora_B.shape[1], x_lora.shape[1]))
            dB = torch.zeros_like(lora_B)
    return BackwardResult(dx, dweight, dbias, dA, dB, uz)


def tau_gradient(uz: torch.Tensor, cscale: torch.Tensor, mask: torch.Tensor, lam: float) -> torch.Tensor:
    """∂L/∂τ surrogate = −g with g = Σ_i (1[(μ_i ≥ 0) == m_i]·μ_i + m_i·λ), μ_i = cscale_i·uz_i (PEFT_S eq. 10, 14-17).

    Returned as a 0-dim tensor in the compute dtype; autograd accumulates it into ``tau.grad``, and Adam on
    τ with lr = α·s then performs eq. 18-22.
    """
    mu = cscale * uz
    agree = (mu >= 0) == mask
    g = torch.where(agree, mu, torch.zeros_like(mu)).sum() + lam * mask.sum().to(mu.dtype)
    return -g


def flex_lora_autograd(x, weight, bias, lora_A, lora_B, scale: float, *, tau=None, coef=None,
                       x_lora=None):
    """The whole op written with differentiable torch ops only (no custom backward).

    Used for gradcheck in float64 and as an independent check of :func:`lora_backward`: autograd of this
    function must equal the hand-written backward for x, weight, bias, A, B and coef. (τ has no true
    gradient; its surrogate is :func:`tau_gradient`.) x is (M, K); coef is (M,) or None.
    Returns (y, mask).
    """
    x_lora = x if x_lora is None else x_lora
    c = scale * (coef if coef is not None else torch.ones(x.shape[0], dtype=x.dtype, device=x.device))
    y0 = F.linear(x, weight, bias)
    z = x_lora @ lora_A.t()
    if tau is None:
        mask = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    else:
        with torch.no_grad():
            ratio = token_ratio(z, lora_B, c, F.linear(x, weight).pow(2).sum(-1))
            mask = ratio >= float(tau)
    d = (z @ lora_B.t()) * c[:, None]
    y = y0 + d * mask[:, None].to(d.dtype)
    return y, mask
