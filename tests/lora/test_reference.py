"""Checks of pyflex/reference.py on its own: the hand-written backward against autograd of the
differentiable formula, the Gram-matrix ratio against the materialised delta, the τ surrogate on numbers
worked out by hand, and the None arguments the op passes when a gradient is not needed."""
import pytest
import torch
import torch.nn.functional as F

import pyflex
from pyflex.lora import reference

ALL = dict(need_dx=True, need_dweight=True, need_dbias=True, need_adapter=True, need_uz=True)


def _inputs(M=12, K=7, N=6, r=3, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g, dtype=dtype)
    w = torch.randn(N, K, generator=g, dtype=dtype) / 3
    b = torch.randn(N, generator=g, dtype=dtype)
    A = torch.randn(r, K, generator=g, dtype=dtype) / 3
    B = torch.randn(N, r, generator=g, dtype=dtype)
    return x, w, b, A, B


def test_compute_dtype():
    assert reference.compute_dtype(torch.float64) == torch.float64
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        assert reference.compute_dtype(dt) == torch.float32


def test_token_ratio_equals_materialised_norm_ratio():
    x, w, b, A, B = _inputs()
    c = torch.rand(x.shape[0], dtype=torch.float64) - 0.5  # negative entries: the ratio uses |c|
    z = x @ A.t()
    y0 = F.linear(x, w, b)
    d = c[:, None] * (z @ B.t())
    want = d.norm(dim=1) / y0.norm(dim=1)
    got = reference.token_ratio(z, B, c, y0.pow(2).sum(-1))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    # a zero base row is clamped to NORM_EPS, not divided by zero
    got0 = reference.token_ratio(z[:1], B, c[:1], torch.zeros(1, dtype=torch.float64))
    torch.testing.assert_close(got0, d[:1].norm(dim=1) / reference.NORM_EPS)


@pytest.mark.parametrize("with_dropout", [False, True])
def test_hand_backward_equals_autograd(with_dropout):
    x, w, b, A, B = _inputs(seed=1)
    M = x.shape[0]
    coef = torch.rand(M, dtype=torch.float64) + 0.5
    scale = 0.8
    drop = (torch.rand(M, x.shape[1], dtype=torch.float64) > 0.3).double() / 0.7 if with_dropout else None
    leaves = [t.clone().requires_grad_(True) for t in (x, w, b, A, B, coef)]
    xl = leaves[0] if drop is None else leaves[0] * drop
    cs = (coef * scale).detach()
    fwd = reference.lora_forward(x, w, b, A, B, x if drop is None else x * drop, cs, 0.5)
    y, mask = reference.flex_lora_autograd(*leaves[:5], scale, tau=0.5, coef=leaves[5], x_lora=xl)
    assert torch.equal(mask, fwd.mask) and 0 < int(mask.sum()) < M
    torch.testing.assert_close(fwd.y, y.detach(), rtol=1e-12, atol=1e-12)
    gy = torch.randn_like(y)
    (y * gy).sum().backward()
    res = reference.lora_backward(gy, x, w, A, B, x if drop is None else x * drop, fwd.z, cs, fwd.mask,
                                  dropout_scale=drop, **ALL)
    for got, leaf in zip((res.dx, res.dweight, res.dbias, res.dA, res.dB), leaves[:5]):
        torch.testing.assert_close(got, leaf.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(mask.double() * res.uz * scale, leaves[5].grad, rtol=1e-10, atol=1e-10)


def test_masked_rows_are_exactly_the_base_output():
    x, w, b, A, B = _inputs(dtype=torch.float32, seed=2)
    cs = torch.ones(x.shape[0])
    res = reference.lora_forward(x, w, b, A, B, x, cs, 1.0)
    assert 0 < int(res.mask.sum()) < x.shape[0]
    y0 = F.linear(x, w, b)
    assert torch.equal(res.y[~res.mask], y0[~res.mask])
    assert not torch.allclose(res.y[res.mask], y0[res.mask])


def test_tau_gradient_by_hand():
    uz = torch.tensor([1.0, -2.0, 3.0, -4.0])
    mask = torch.tensor([True, True, False, False])
    # μ = uz; agree = [(1≥0)==T, (−2≥0)==T, (3≥0)==F, (−4≥0)==F] = [T, F, F, T] → Σμ = 1 − 4 = −3; + λ·2
    got = reference.tau_gradient(uz, torch.ones(4), mask, 0.1)
    assert got.item() == pytest.approx(-(-3.0 + 0.2))
    got = reference.tau_gradient(uz, torch.full((4,), 2.0), mask, 0.0)   # μ = cscale·uz
    assert got.item() == pytest.approx(6.0)


def test_backward_accepts_none_for_unneeded_inputs():
    """The op passes x=None, weight=None and lora_A=None when their gradients are not needed."""
    x, w, b, A, B = _inputs(dtype=torch.float32, seed=3)
    M = x.shape[0]
    cs = torch.ones(M)
    fwd = reference.lora_forward(x, w, b, A, B, x, cs, 0.5)
    gy = torch.randn(M, w.shape[0])
    flags = dict(need_dx=False, need_dweight=False, need_dbias=False, need_adapter=True, need_uz=True)
    res = reference.lora_backward(gy, None, None, None, B, x, fwd.z, cs, fwd.mask, **flags)
    full = reference.lora_backward(gy, x, w, A, B, x, fwd.z, cs, fwd.mask, **ALL)
    assert res.dx is None and res.dweight is None and res.dbias is None
    torch.testing.assert_close(res.dA, full.dA)
    torch.testing.assert_close(res.dB, full.dB)
    # every token masked: zero adapter grads of the right shapes, still without lora_A
    none = torch.zeros(M, dtype=torch.bool)
    res = reference.lora_backward(gy, None, None, None, B, x, fwd.z, cs, none, **flags)
    assert res.dA.shape == A.shape and not res.dA.any() and res.dB.shape == B.shape and not res.dB.any()


def test_sparsity():
    assert pyflex.sparsity(torch.tensor([True, False, False, True])) == pytest.approx(0.5)
    assert pyflex.sparsity(torch.zeros(0, dtype=torch.bool)) == 0.0
    assert pyflex.sparsity(torch.ones(3, 2, dtype=torch.bool)) == 0.0
