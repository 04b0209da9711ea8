"""Tests of the op `pyflex.flex_lora` on every backend (reference, cpp, triton).

Every backend is compared with `dense_spec`, an independent, deliberately naive implementation of
docs/op.md written here: float64, N-wide norms of the materialised delta (no Gram trick), gradients by
torch autograd on the dense formula, and the τ surrogate gradient from μ_i = Σ_j gy_ij d_ij (PEFT_S eq. 10,
17). It shares no code with pyflex.reference.
"""
from __future__ import annotations

import importlib
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyflex
import pyflex.lora.tau
from pyflex.lora import autograd as ops
from pyflex.lora import backends, contract, reference
from pyflex.lora.contract import BackwardInputs, ForwardInputs

# --------------------------------------------------------------------------------------------------
# backends
# --------------------------------------------------------------------------------------------------
BACKENDS = ["reference", "cpp", "triton"]


def _triton_import_error():
    try:
        importlib.import_module("pyflex.kernels.flex_lora")
    except Exception as exc:  # noqa: BLE001 - any import failure means the backend is not there yet
        return f"{type(exc).__name__}: {exc}"
    return None


_TRITON_ERROR = _triton_import_error()


def _skip_unless_available(name):
    if name == "triton" and _TRITON_ERROR is not None:
        pytest.skip(f"pyflex.kernels.flex_lora cannot be imported ({_TRITON_ERROR})")
    if name == "cpp" and not pyflex.cpp_available() and os.environ.get("PYFLEX_REQUIRE_CPP") != "1":
        pytest.skip(f"pyflex._C is not built ({contract.REGISTRY['cpp']._error}); set PYFLEX_REQUIRE_CPP=1 to make this a failure")


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Force a backend. With a GPU, the triton cases run on CUDA tensors (the default device inside the test);
    without one, on CPU tensors under the Triton interpreter (conftest sets TRITON_INTERPRET=1)."""
    _skip_unless_available(request.param)
    device = "cuda" if request.param == "triton" and torch.cuda.is_available() else "cpu"
    previous = torch.get_default_device()
    torch.set_default_device(device)
    try:
        with pyflex.use_backend(request.param):
            yield request.param
    finally:
        torch.set_default_device(previous)


TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}
# Relative distance from τ inside which two correct implementations may decide a token differently.
MASK_TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 3e-2}


def rms_ratio(a, b):
    """‖a − b‖ / ‖b‖ in float64 (‖a‖ when b is all zeros)."""
    a, b = a.detach().double(), b.detach().double()
    assert a.shape == b.shape, (a.shape, b.shape)
    nb = b.norm().item()
    return (a - b).norm().item() / nb if nb > 0 else a.norm().item()


def assert_rms(a, b, tol, what):
    assert a is not None, f"{what}: got None"
    err = rms_ratio(a, b)
    assert err <= tol, f"{what}: rms ratio {err:.3g} > {tol:.3g}"


# --------------------------------------------------------------------------------------------------
# the independent spec (docs/op.md), dense, float64
# --------------------------------------------------------------------------------------------------
def dense_spec(x, weight, bias, lora_A, lora_B, scale, *, tau=None, coef=None, lam=0.0, x_lora=None, gy=None):
    """Dense float64 evaluation of docs/op.md on flattened tokens.

    Returns a dict with y, y0, d, ratio, mask and, when gy (M, N) is given, the gradients of Σ gy·y with
    respect to x, weight, bias, lora_A, lora_B, coef (autograd on the dense formula, mask held fixed) and
    the τ surrogate gradient −g (PEFT_S eq. 17).
    """
    def leaf(t):
        return None if t is None else t.detach().double().requires_grad_(True)

    K = x.shape[-1]
    xs, ws, bs, As, Bs = leaf(x.reshape(-1, K)), leaf(weight), leaf(bias), leaf(lora_A), leaf(lora_B)
    cs = leaf(coef.reshape(-1)) if coef is not None else None
    M = xs.shape[0]
    # x̃ = dropout(x) = x * keep/(1-p): given as the multiplier so that autograd sees x̃ as a function of x.
    xl = xs if x_lora is None else xs * x_lora.detach().double().reshape(-1, K)
    y0 = xs @ ws.t() + (bs if bs is not None else 0.0)
    z = xl @ As.t()
    c = scale * (cs if cs is not None else torch.ones(M, dtype=torch.float64))
    d = c[:, None] * (z @ Bs.t())
    with torch.no_grad():
        # PEFT_S eq. 4: ‖M(x)‖ / ‖W0 x‖, the bias is not in the denominator
        ratio = d.norm(dim=1) / (xs @ ws.t()).norm(dim=1).clamp_min(reference.NORM_EPS)
        mask = torch.ones(M, dtype=torch.bool) if tau is None else ratio >= float(tau)
    y = y0 + mask[:, None].double() * d
    out = dict(y=y.detach(), y0=y0.detach(), d=d.detach(), ratio=ratio, mask=mask)
    if gy is not None:
        g64 = gy.detach().double().reshape(M, -1)
        (y * g64).sum().backward()
        out.update(dx=xs.grad, dweight=ws.grad, dbias=None if bs is None else bs.grad, dA=As.grad, dB=Bs.grad,
                   dcoef=None if cs is None else cs.grad)
        mu = (g64 * d.detach()).sum(1)                                   # eq. 10, N-wide
        agree = (mu >= 0) == mask
        g = (mu * agree.double()).sum() + lam * mask.double().sum()       # eq. 17
        out["dtau"] = -g
        out["tau_grad_scale"] = mu.abs().sum().item() + lam * M          # size of the terms summed into g
    return out


def randn(*shape, dtype=None):
    """torch.randn drawn on CPU, then moved to the default device: the same test data with and without a GPU
    (the CUDA generator gives other numbers for the same seed)."""
    return torch.randn(*shape, dtype=dtype, device="cpu").to(torch.get_default_device())


def rand(*shape, dtype=None):
    return torch.rand(*shape, dtype=dtype, device="cpu").to(torch.get_default_device())


def pick_tau(ratio, min_rel_gap):
    """A τ between two neighbouring ratios in the middle of the distribution, at least ``min_rel_gap`` (relative)
    from every ratio, so that rounding cannot flip any mask."""
    r = torch.sort(ratio.double()).values
    n = r.numel()
    best, best_gap = None, -1.0
    for i in range(n // 4, max(n // 4 + 1, 3 * n // 4)):
        lo, hi = r[i].item(), r[i + 1].item()
        tau = 0.5 * (lo + hi)
        gap = (hi - lo) / 2 / max(tau, 1e-30)
        if gap > best_gap:
            best, best_gap = tau, gap
    assert best_gap >= min_rel_gap, f"no ratio gap of {min_rel_gap} around the median (best {best_gap})"
    return best


def make_inputs(M, K, N, r, dtype, *, bias=True, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape, std=1.0):
        t = torch.randn(*shape, generator=g, dtype=torch.float64, device="cpu") * std
        return t.to(dtype=dtype, device=torch.get_default_device())

    x = rnd(M, K)
    weight = rnd(N, K, std=1 / math.sqrt(K))
    b = rnd(N, std=0.5) if bias else None
    lora_A = rnd(r, K, std=1 / math.sqrt(K))
    lora_B = rnd(N, r, std=1.0)
    return x, weight, b, lora_A, lora_B


def run_op(x, weight, bias, lora_A, lora_B, scale, gy, *, tau=None, coef=None, lam=0.0, dropout_p=0.0,
           grad_x=True, grad_weight=False, grad_bias=True, grad_adapter=True, grad_coef=True, grad_tau=True):
    """Run pyflex.flex_lora forward + backward of Σ gy·y; returns (y, mask, grads dict)."""
    x = x.detach().requires_grad_(grad_x)   # no clone: keep x's strides (non-contiguous cases)
    weight = weight.detach().clone().requires_grad_(grad_weight)
    bias = None if bias is None else bias.detach().clone().requires_grad_(grad_bias)
    lora_A = lora_A.detach().clone().requires_grad_(grad_adapter)
    lora_B = lora_B.detach().clone().requires_grad_(grad_adapter)
    coef = None if coef is None else coef.detach().clone().requires_grad_(grad_coef)
    tau_t = None if tau is None else torch.tensor(float(tau), requires_grad=grad_tau)
    y, mask = pyflex.flex_lora(x, weight, bias, lora_A, lora_B, scale, tau=tau_t, coef=coef, lam=lam,
                               dropout_p=dropout_p, return_mask=True)
    if y.requires_grad:
        (y * gy).sum().backward()
    grads = dict(dx=x.grad, dweight=weight.grad, dbias=None if bias is None else bias.grad, dA=lora_A.grad,
                 dB=lora_B.grad, dcoef=None if coef is None else coef.grad,
                 dtau=None if tau_t is None else tau_t.grad)
    return y.detach(), mask, grads


# --------------------------------------------------------------------------------------------------
# every backend vs the dense spec
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("masked", [False, True], ids=["tau_off", "tau_on"])
@pytest.mark.parametrize("variant", ["bias_coef", "nobias_weight_trains"])
def test_matches_dense_spec(backend, dtype, masked, variant):
    M, K, N, r, scale, lam = 33, 47, 29, 8, 0.7, 1e-3
    with_bias = variant == "bias_coef"
    # seed 4: the ratios leave a gap around the median wide enough for every dtype (pick_tau)
    x, w, b, A, B = make_inputs(M, K, N, r, dtype, bias=with_bias, seed=4)
    coef = rand(M, dtype=dtype) + 0.25 if with_bias else None
    gy = randn(M, N, dtype=dtype)
    tau = None
    if masked:
        probe = dense_spec(x, w, b, A, B, scale, coef=coef)
        tau = pick_tau(probe["ratio"], 2 * MASK_TOL[dtype])
    want = dense_spec(x, w, b, A, B, scale, tau=tau, coef=coef, lam=lam, gy=gy)
    if masked:
        assert 0 < int(want["mask"].sum()) < M  # the mask really selects
    y, mask, got = run_op(x, w, b, A, B, scale, gy, tau=tau, coef=coef, lam=lam, grad_weight=not with_bias)

    tol = TOL[dtype]
    assert y.dtype == dtype and y.shape == (M, N)
    assert torch.equal(mask, want["mask"])
    assert_rms(y, want["y"], tol, "y")
    assert_rms(got["dx"], want["dx"], tol, "dx")
    assert_rms(got["dA"], want["dA"], tol, "dA")
    assert_rms(got["dB"], want["dB"], tol, "dB")
    if with_bias:
        assert_rms(got["dbias"], want["dbias"], tol, "dbias")
        assert_rms(got["dcoef"], want["dcoef"], tol, "dcoef")
        assert got["dweight"] is None
    else:
        assert_rms(got["dweight"], want["dweight"], tol, "dweight")
    if masked:
        err = abs(got["dtau"].item() - want["dtau"].item())
        assert err <= tol * want["tau_grad_scale"], (got["dtau"].item(), want["dtau"].item())
        assert got["dtau"].dtype == torch.float32 and got["dtau"].shape == ()


@pytest.mark.parametrize("M,K,N,r", [(33, 47, 29, 1), (33, 47, 29, 16), (17, 70, 9, 64), (1, 3, 5, 8),
                                     (65, 33, 130, 8)])
def test_odd_shapes_and_ranks(backend, M, K, N, r):
    dtype, scale = torch.float32, 1.3
    x, w, b, A, B = make_inputs(M, K, N, r, dtype, seed=M + r)
    gy = randn(M, N, dtype=dtype)
    probe = dense_spec(x, w, b, A, B, scale)
    # With one token there is no gap to sit in: put τ below its ratio.
    tau = pick_tau(probe["ratio"], 1e-3) if M >= 4 else 0.5 * probe["ratio"].min().item()
    want = dense_spec(x, w, b, A, B, scale, tau=tau, gy=gy)
    y, mask, got = run_op(x, w, b, A, B, scale, gy, tau=tau)
    assert torch.equal(mask, want["mask"])
    assert_rms(y, want["y"], 1e-5, "y")
    for key in ("dx", "dbias", "dA", "dB"):
        assert_rms(got[key], want[key], 1e-5, key)
    assert abs(got["dtau"].item() - want["dtau"].item()) <= 1e-5 * want["tau_grad_scale"]


def _skip_fp64(backend):
    if backend == "triton":
        pytest.skip("the Triton kernels declare fp16/bf16/fp32 (test_backend_capabilities_are_enforced)")


def test_fp64(backend):
    _skip_fp64(backend)
    M, K, N, r, scale = 20, 13, 11, 4, 0.9
    x, w, b, A, B = make_inputs(M, K, N, r, torch.float64, seed=3)
    gy = randn(M, N, dtype=torch.float64)
    tau = pick_tau(dense_spec(x, w, b, A, B, scale)["ratio"], 1e-6)
    want = dense_spec(x, w, b, A, B, scale, tau=tau, gy=gy)
    y, mask, got = run_op(x, w, b, A, B, scale, gy, tau=tau)
    assert y.dtype == torch.float64 and torch.equal(mask, want["mask"])
    assert_rms(y, want["y"], 1e-12, "y")
    for key in ("dx", "dbias", "dA", "dB"):
        assert_rms(got[key], want[key], 1e-12, key)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_masks_that_flip_near_tau(backend, dtype):
    """τ placed exactly on token 5's ratio: that token may go either way; every other token must agree, and
    the outputs must agree on the tokens whose masks agree."""
    M, K, N, r, scale = 40, 24, 19, 8, 1.0
    x, w, b, A, B = make_inputs(M, K, N, r, dtype, seed=7)
    # Two tokens share token 5's direction scaled ×2: same ratio without bias, so give them no bias.
    b = None
    x[6] = x[5] * 2
    probe = dense_spec(x, w, b, A, B, scale)
    tau = probe["ratio"][5].item()
    gy = randn(M, N, dtype=dtype)
    want = dense_spec(x, w, b, A, B, scale, tau=tau, gy=gy)
    y, mask, got = run_op(x, w, b, A, B, scale, gy, tau=tau)
    near = (want["ratio"] - tau).abs() < MASK_TOL[dtype] * tau
    assert near[5] and near[6]
    assert torch.equal(mask[~near], want["mask"][~near])
    agree = mask == want["mask"]
    assert agree.sum() >= M - int(near.sum())
    assert_rms(y[agree], want["y"][agree], TOL[dtype], "y on tokens whose masks agree")
    # dx_i = gy_i W0 + m_i·v_i A depends on token i's own mask only.
    assert_rms(got["dx"][agree], want["dx"][agree], TOL[dtype], "dx on tokens whose masks agree")
    # A flipped token carries either the full delta or none of it, never something in between.
    for i in torch.nonzero(~agree).flatten().tolist():
        other = want["y0"][i] if bool(want["mask"][i]) else want["y0"][i] + want["d"][i]
        assert_rms(y[i], other, TOL[dtype], f"flipped token {i}")


def test_mask_off_equals_plain_lora(backend):
    M, K, N, r, scale = 21, 18, 14, 4, 2.0
    x, w, b, A, B = make_inputs(M, K, N, r, torch.float32, seed=11)
    leaves = [t.clone().requires_grad_(True) for t in (x, b, A, B)]
    xe, be, Ae, Be = leaves
    y_eager = F.linear(xe, w, be) + scale * (xe @ Ae.t()) @ Be.t()
    gy = randn(*y_eager.shape, dtype=y_eager.dtype)
    (y_eager * gy).sum().backward()
    y, mask, got = run_op(x, w, b, A, B, scale, gy)
    assert bool(mask.all())
    assert_rms(y, y_eager, 1e-6, "y")
    for key, leaf in zip(("dx", "dbias", "dA", "dB"), leaves):
        assert_rms(got[key], leaf.grad, 1e-6, key)


# --------------------------------------------------------------------------------------------------
# shapes and layouts
# --------------------------------------------------------------------------------------------------
def test_empty_batch(backend):
    K, N, r = 12, 7, 4
    x, w, b, A, B = make_inputs(0, K, N, r, torch.float32)
    for shape in [(0, K), (2, 0, K)]:
        xs = x.reshape(shape).requires_grad_(True)
        Ag, Bg = A.clone().requires_grad_(True), B.clone().requires_grad_(True)
        tau = torch.tensor(0.1, requires_grad=True)
        y, mask = pyflex.flex_lora(xs, w, b, Ag, Bg, 1.0, tau=tau, return_mask=True)
        assert y.shape == (*shape[:-1], N) and mask.shape == shape[:-1]
        y.sum().backward()
        assert xs.grad.shape == shape
        assert torch.equal(Ag.grad, torch.zeros_like(A)) and torch.equal(Bg.grad, torch.zeros_like(B))
        assert tau.grad.item() == 0.0


def test_3d_and_noncontiguous_x(backend):
    B_, T, K, N, r, scale = 3, 5, 10, 9, 4, 0.8
    _, w, b, A, B = make_inputs(1, K, N, r, torch.float32, seed=5)
    base = randn(T, B_, 2 * K)
    variants = {
        "3d": randn(B_, T, K),
        "transposed": base[..., :K].transpose(0, 1),           # (B_, T, K), not contiguous
        "strided": base[..., ::2].transpose(0, 1),             # every other feature
        "2d_t": randn(K, B_ * T).t(),                    # column-major 2-D
    }
    for name, x in variants.items():
        if name != "3d":
            assert not x.is_contiguous()
        gy = randn(*x.shape[:-1], N)
        probe = dense_spec(x, w, b, A, B, scale)
        tau = pick_tau(probe["ratio"], 1e-3)
        want = dense_spec(x, w, b, A, B, scale, tau=tau, gy=gy)
        y, mask, got = run_op(x, w, b, A, B, scale, gy, tau=tau)
        assert y.shape == (*x.shape[:-1], N) and mask.shape == x.shape[:-1], name
        assert torch.equal(mask.reshape(-1), want["mask"]), name
        assert_rms(y.reshape(-1, N), want["y"], 1e-5, f"{name}: y")
        assert got["dx"].shape == x.shape, name
        assert_rms(got["dx"].reshape(-1, K), want["dx"], 1e-5, f"{name}: dx")
        assert_rms(got["dA"], want["dA"], 1e-5, f"{name}: dA")
        assert_rms(got["dB"], want["dB"], 1e-5, f"{name}: dB")


def test_noncontiguous_parameters(backend):
    """Parameters that are transposed views (GPT-2 Conv1D stores W0 as (K, N)) work unchanged."""
    M, K, N, r, scale = 19, 12, 10, 3, 1.1
    x, w, b, A, B = make_inputs(M, K, N, r, torch.float32, seed=14)
    w_t, A_t, B_t = w.t().contiguous().t(), A.t().contiguous().t(), B.t().contiguous().t()
    assert not (w_t.is_contiguous() or A_t.is_contiguous() or B_t.is_contiguous())
    gy = randn(M, N)
    tau = pick_tau(dense_spec(x, w, b, A, B, scale)["ratio"], 1e-3)
    want = dense_spec(x, w, b, A, B, scale, tau=tau, gy=gy)
    xs = x.clone().requires_grad_(True)
    ws, As, Bs = (t.detach().requires_grad_(True) for t in (w_t, A_t, B_t))
    y = pyflex.flex_lora(xs, ws, b, As, Bs, scale, tau=torch.tensor(tau))
    (y * gy).sum().backward()
    assert_rms(y, want["y"], 1e-5, "y")
    for got, key in ((xs.grad, "dx"), (ws.grad, "dweight"), (As.grad, "dA"), (Bs.grad, "dB")):
        assert_rms(got, want[key], 1e-5, key)


def test_all_tokens_masked(backend):
    M, K, N, r = 14, 9, 8, 3
    x, w, b, A, B = make_inputs(M, K, N, r, torch.float32, seed=15)
    gy = randn(M, N)
    y, mask, got = run_op(x, w, b, A, B, 1.0, gy, tau=1e4)
    assert not mask.any()
    torch.testing.assert_close(y, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["dx"], gy @ w, rtol=1e-5, atol=1e-5)
    assert torch.equal(got["dA"], torch.zeros_like(A)) and torch.equal(got["dB"], torch.zeros_like(B))


def test_zero_base_output_rows(backend):
    """‖y0_i‖ = 0: the ratio is ‖d_i‖/NORM_EPS (finite, huge, so the token is active) and a token with
    d_i = 0 too gets ratio 0; nothing turns into inf or nan."""
    M, K, N, r, scale = 6, 8, 5, 3, 1.0
    x, w, _, A, B = make_inputs(M, K, N, r, torch.float32, seed=9)
    w[:, :2] = 0.0          # features 0-1 are invisible to the base but not to the adapter
    x[0] = 0.0              # y0 = 0 and d = 0
    x[1] = 0.0
    x[1, :2] = torch.tensor([1.0, -2.0])  # y0 = 0, d ≠ 0
    tau = 1e-3
    gy = randn(M, N)
    want = dense_spec(x, w, None, A, B, scale, tau=tau, gy=gy)
    assert want["y0"][0].abs().max() == 0 and want["y0"][1].abs().max() == 0
    y, mask, got = run_op(x, w, None, A, B, scale, gy, tau=tau)
    assert not bool(mask[0]) and bool(mask[1])
    assert torch.equal(mask, want["mask"])
    assert torch.isfinite(y).all()
    assert_rms(y, want["y"], 1e-5, "y")
    for key in ("dx", "dA", "dB"):
        assert torch.isfinite(got[key]).all(), key
        assert_rms(got[key], want[key], 1e-5, key)
    # The backend's own ratio for those rows: 0, and ‖d‖/NORM_EPS.
    name, impl = pyflex.resolve_backend(x.device)
    ratio = impl.forward(ForwardInputs(x, w, None, A, B, x, torch.full((M,), scale), tau)).ratio
    assert ratio[0].item() == 0.0
    expected = want["d"][1].norm().item() / reference.NORM_EPS
    assert abs(ratio[1].item() - expected) <= 1e-4 * expected


# --------------------------------------------------------------------------------------------------
# τ: direction, masked-token independence, Adam = PEFT_S eq. 18-22
# --------------------------------------------------------------------------------------------------
def _tau_step(tau0, gy_sign, backend_inputs, lam=0.0):
    x, w, b, A, B, scale = backend_inputs
    d = dense_spec(x, w, b, A, B, scale)["d"].float()
    tau = pyflex.make_tau(tau0)
    y = pyflex.flex_lora(x, w, b, A.clone().requires_grad_(True), B.clone().requires_grad_(True), scale,
                         tau=tau, lam=lam)
    # L = Σ gy·y with gy = ±d: μ_i = gy_i·d_i = ±‖d_i‖².
    (y * (gy_sign * d)).sum().backward()
    grad = tau.grad.item()
    opt = torch.optim.Adam([tau], lr=1e-2, betas=(0.9, 0.98))
    opt.step()
    return grad, tau.item()


def test_tau_rises_for_a_harmful_applied_delta(backend):
    inputs = (*make_inputs(16, 12, 10, 4, torch.float32, seed=2), 1.0)
    grad, tau_after = _tau_step(0.0, +1.0, inputs)  # τ = 0: every token active; μ > 0 (harmful)
    assert grad < 0 and tau_after > 0.0


def test_tau_falls_for_a_helpful_masked_delta(backend):
    inputs = (*make_inputs(16, 12, 10, 4, torch.float32, seed=2), 1.0)
    grad, tau_after = _tau_step(100.0, -1.0, inputs)  # τ large: every token masked; μ < 0 (would help)
    assert grad > 0 and tau_after < 100.0


def test_tau_ignores_harmful_masked_and_helpful_applied(backend):
    inputs = (*make_inputs(16, 12, 10, 4, torch.float32, seed=2), 1.0)
    grad, _ = _tau_step(100.0, +1.0, inputs)          # masked and μ > 0: τ is already large enough
    assert grad == 0.0
    grad, _ = _tau_step(0.0, -1.0, inputs)           # applied and μ < 0: τ is already small enough
    assert grad == 0.0
    grad, _ = _tau_step(0.0, -1.0, inputs, lam=0.5)  # λ still pushes τ up by λ per active token
    assert grad == pytest.approx(-0.5 * 16)


def test_masked_tokens_do_not_affect_adapter_grads(backend):
    M, K, N, r, scale = 30, 16, 12, 4, 1.0
    x, w, _, A, B = make_inputs(M, K, N, r, torch.float32, seed=4)
    gy = randn(M, N)
    tau = pick_tau(dense_spec(x, w, None, A, B, scale)["ratio"], 1e-3)
    _, mask, got = run_op(x, w, None, A, B, scale, gy, tau=tau)
    masked = ~mask
    assert 0 < int(masked.sum()) < M
    # Without bias ρ_i is invariant to scaling x_i, so these tokens stay masked with different values.
    x2 = x.clone()
    x2[masked] = x[masked] * 3.0 + 0.0
    _, mask2, got2 = run_op(x2, w, None, A, B, scale, gy, tau=tau)
    assert torch.equal(mask2, mask)
    torch.testing.assert_close(got2["dA"], got["dA"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got2["dB"], got["dB"], rtol=1e-6, atol=1e-7)
    # ...while changing an active token does change them (so the check above can fail).
    x3 = x.clone()
    i = int(torch.nonzero(mask)[0])
    x3[i] = x[i] * 3.0
    _, _, got3 = run_op(x3, w, None, A, B, scale, gy, tau=tau)
    assert not torch.allclose(got3["dA"], got["dA"])


class _TauLayer(nn.Module):
    def __init__(self, w, A, B, tau0):
        super().__init__()
        self.weight = nn.Parameter(w.clone(), requires_grad=False)
        self.lora_A = nn.Parameter(A.clone())
        self.lora_B = nn.Parameter(B.clone())
        self.tau = pyflex.make_tau(tau0)


def test_tau_adam_follows_peft_s_eq_18_22(backend):
    M, K, N, r, scale, lam = 24, 10, 8, 4, 1.0, 1e-2
    x, w, _, A, B = make_inputs(M, K, N, r, torch.float32, seed=6)
    tau0 = pick_tau(dense_spec(x, w, None, A, B, scale)["ratio"], 5e-3)
    layer = _TauLayer(w, A, B, tau0)
    groups = pyflex.tau_param_groups(layer, lr=1e-3, tau_s=pyflex.lora.tau.TAU_S)  # the paper's α·s exactly
    opt = torch.optim.Adam(groups)
    alpha_s, (b1, b2), eps = pyflex.lora.tau.TAU_ALPHA * pyflex.lora.tau.TAU_S, pyflex.lora.tau.TAU_BETAS, pyflex.lora.tau.TAU_EPS
    tau_hand, m, v = float(tau0), 0.0, 0.0
    for k in range(1, 6):
        gy = randn(M, N) * (1.0 if k % 2 else -3.0)
        want = dense_spec(x, layer.weight, None, layer.lora_A, layer.lora_B, scale, tau=tau_hand, lam=lam, gy=gy)
        g = -want["dtau"].item()                                   # eq. 17
        m = b1 * m + (1 - b1) * g                                  # eq. 18
        v = b2 * v + (1 - b2) * g * g                              # eq. 19
        m_hat = m / (1 - b1 ** k)                                  # eq. 20
        v_hat = v / (1 - b2 ** k)                                  # eq. 21
        tau_hand = tau_hand + alpha_s * m_hat / (math.sqrt(v_hat) + eps)  # eq. 22

        opt.zero_grad()
        y = pyflex.flex_lora(x, layer.weight, None, layer.lora_A, layer.lora_B, scale, tau=layer.tau, lam=lam)
        (y * gy).sum().backward()
        assert layer.tau.grad.item() == pytest.approx(-g, rel=1e-4)
        opt.step()
        assert layer.tau.item() == pytest.approx(tau_hand, rel=0, abs=1e-6 * max(1.0, abs(tau_hand)))
    assert abs(layer.tau.item() - tau0) > 1e-5  # τ moved (by ~α·s per step)


# --------------------------------------------------------------------------------------------------
# skipped work and saved tensors
# --------------------------------------------------------------------------------------------------
def _saved_shapes(fn):
    shapes = []

    def pack(t):
        shapes.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, shapes


def _spy_backward(monkeypatch):
    """Record the need_* flags the op passes to the active backend's backward."""
    import dataclasses
    name, impl = pyflex.resolve_backend(torch.get_default_device())
    calls = []

    def spy(inputs: BackwardInputs):
        calls.append({f: getattr(inputs, f) for f in ("need_dx", "need_dweight", "need_dbias", "need_adapter",
                                                      "need_uz")})
        return impl.backward(inputs)

    monkeypatch.setattr(contract.REGISTRY[name], "_implementation", dataclasses.replace(impl, backward=spy))
    return calls


def test_frozen_adapter_saves_no_z_and_gets_no_grads(backend, monkeypatch):
    M, K, N, r = 11, 13, 9, 3   # r differs from every other dim, so an (M, r) saved tensor is z
    x, w, b, A, B = make_inputs(M, K, N, r, torch.float32)
    calls = _spy_backward(monkeypatch)

    def call(train_adapter, x_grad):
        xs = x.clone().requires_grad_(x_grad)
        As, Bs = A.clone().requires_grad_(train_adapter), B.clone().requires_grad_(train_adapter)
        tau = torch.tensor(0.05)  # a fixed (not trained) threshold
        y, shapes = _saved_shapes(lambda: pyflex.flex_lora(xs, w, b, As, Bs, 1.0, tau=tau))
        y.sum().backward()
        return xs, As, Bs, shapes

    # Trainable adapter: z (M, r) and x̃ = x (M, K) are saved.
    xs, As, Bs, shapes = call(True, True)
    assert ((M, r), torch.float32) in shapes and ((M, K), torch.float32) in shapes
    assert As.grad is not None and Bs.grad is not None
    # Frozen adapter, frozen base: neither z nor x is saved; no adapter grads; dx still flows.
    xs, As, Bs, shapes = call(False, True)
    assert ((M, r), torch.float32) not in shapes
    assert ((M, K), torch.float32) not in shapes
    assert As.grad is None and Bs.grad is None and xs.grad is not None
    assert calls[-1]["need_adapter"] is False and calls[-1]["need_uz"] is False and calls[-1]["need_dx"] is True
    # x without grad: no dx is computed.
    xs, As, Bs, shapes = call(True, False)
    assert xs.grad is None and As.grad is not None
    assert calls[-1]["need_dx"] is False and calls[-1]["need_dweight"] is False


@pytest.mark.parametrize("with_coef", [False, True], ids=["tau_only", "tau_and_gate"])
def test_tau_and_gate_train_with_frozen_adapter_and_x(backend, with_coef):
    """Only u·z is needed (τ and/or the HLPT gate train; adapter, base and x are frozen)."""
    M, K, N, r, scale, lam = 25, 11, 9, 4, 0.6, 1e-2
    x, w, b, A, B = make_inputs(M, K, N, r, torch.float32, seed=13)
    coef = rand(M) + 0.5 if with_coef else None
    gy = randn(M, N)
    tau = pick_tau(dense_spec(x, w, b, A, B, scale, coef=coef)["ratio"], 1e-3)
    want = dense_spec(x, w, b, A, B, scale, tau=tau, coef=coef, lam=lam, gy=gy)
    y, mask, got = run_op(x, w, b, A, B, scale, gy, tau=tau, coef=coef, lam=lam, grad_x=False, grad_bias=False,
                          grad_adapter=False)
    assert torch.equal(mask, want["mask"])
    assert_rms(y, want["y"], 1e-5, "y")
    assert got["dx"] is None and got["dA"] is None and got["dB"] is None and got["dbias"] is None
    assert abs(got["dtau"].item() - want["dtau"].item()) <= 1e-5 * want["tau_grad_scale"]
    if with_coef:
        assert_rms(got["dcoef"], want["dcoef"], 1e-5, "dcoef")


def test_weight_and_bias_grads(backend):
    M, K, N, r = 15, 9, 7, 2
    x, w, b, A, B = make_inputs(M, K, N, r, torch.float32, seed=8)
    gy = randn(M, N)
    _, _, got = run_op(x, w, b, A, B, 1.0, gy, tau=0.2, grad_weight=True, grad_adapter=False)
    torch.testing.assert_close(got["dweight"], gy.t() @ x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["dbias"], gy.sum(0), rtol=1e-5, atol=1e-5)
    assert got["dA"] is None and got["dB"] is None
    # Frozen base: no dW, no db.
    _, _, got = run_op(x, w, b, A, B, 1.0, gy, tau=0.2, grad_weight=False, grad_bias=False)
    assert got["dweight"] is None and got["dbias"] is None


@pytest.mark.parametrize("masked", [False, True], ids=["tau_off", "tau_on"])
def test_dropout_matches_manual_reference(backend, masked):
    M, K, N, r, scale, p = 26, 14, 10, 4, 1.5, 0.3
    x, w, b, A, B = make_inputs(M, K, N, r, torch.float32, seed=12)
    gy = randn(M, N)
    torch.manual_seed(1234)
    keep = torch.rand_like(x, dtype=torch.float32) >= p   # the RNG call the op makes
    multiplier = keep.float() / (1 - p)
    probe = dense_spec(x, w, b, A, B, scale, x_lora=multiplier)
    tau = pick_tau(probe["ratio"], 1e-3) if masked else None
    want = dense_spec(x, w, b, A, B, scale, tau=tau, x_lora=multiplier, gy=gy)
    torch.manual_seed(1234)
    y, mask, got = run_op(x, w, b, A, B, scale, gy, tau=tau, dropout_p=p)
    assert torch.equal(mask, want["mask"])
    assert_rms(y, want["y"], 1e-5, "y")
    for key in ("dx", "dbias", "dA", "dB"):
        assert_rms(got[key], want[key], 1e-5, key)
    if masked:
        assert abs(got["dtau"].item() - want["dtau"].item()) <= 1e-5 * want["tau_grad_scale"]
    # And dropout really changed something compared with no dropout.
    y_nodrop, _, _ = run_op(x, w, b, A, B, scale, gy, tau=tau)
    assert rms_ratio(y, y_nodrop) > 1e-3


# --------------------------------------------------------------------------------------------------
# gradcheck (float64)
# --------------------------------------------------------------------------------------------------
def _gradcheck_inputs(seed=0):
    M, K, N, r = 6, 5, 4, 2
    x, w, b, A, B = make_inputs(M, K, N, r, torch.float64, seed=seed)
    coef = rand(M, dtype=torch.float64) + 0.5
    ratio = dense_spec(x, w, b, A, B, 0.9, coef=coef)["ratio"]
    tau = pick_tau(ratio, 1e-2)  # far from every ratio: finite differences cannot flip a mask
    return [t.clone().requires_grad_(True) for t in (x, w, b, A, B, coef)], tau


def test_gradcheck_reference_autograd():
    inputs, tau = _gradcheck_inputs()

    def fn(x, w, b, A, B, coef):
        return reference.flex_lora_autograd(x, w, b, A, B, 0.9, tau=torch.tensor(tau), coef=coef)[0]

    assert torch.autograd.gradcheck(fn, inputs)
    y, mask = reference.flex_lora_autograd(*inputs[:5], 0.9, tau=tau, coef=inputs[5])
    assert 0 < int(mask.sum()) < mask.numel()


def test_gradcheck_op(backend):
    _skip_fp64(backend)
    inputs, tau = _gradcheck_inputs(seed=1)

    def fn(x, w, b, A, B, coef):
        return pyflex.flex_lora(x, w, b, A, B, 0.9, tau=torch.tensor(tau), coef=coef)

    assert torch.autograd.gradcheck(fn, inputs)


# --------------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------------
def _good():
    x, w, b, A, B = make_inputs(4, 6, 5, 2, torch.float32)
    return dict(x=x, weight=w, bias=b, lora_A=A, lora_B=B, scale=1.0)


def _call(**over):
    kw = _good()
    kw.update(over)
    pos = [kw.pop(k) for k in ("x", "weight", "bias", "lora_A", "lora_B", "scale")]
    return pyflex.flex_lora(*pos, **kw)


BAD = [
    ("x_K", dict(x=torch.randn(4, 7)), ValueError, "x.shape"),
    ("weight_1d", dict(weight=torch.randn(5)), ValueError, "weight"),
    ("lora_A_K", dict(lora_A=torch.randn(2, 7)), ValueError, "lora_A"),
    ("lora_B_r", dict(lora_B=torch.randn(5, 3)), ValueError, "lora_B"),
    ("bias_N", dict(bias=torch.randn(6)), ValueError, "bias"),
    ("coef_shape", dict(coef=torch.rand(5)), ValueError, "coef"),
    ("rank_0", dict(lora_A=torch.randn(0, 6), lora_B=torch.randn(5, 0)), ValueError, "r=0"),
    ("weight_dtype", dict(weight=torch.randn(5, 6, dtype=torch.float64)), TypeError, "weight.dtype"),
    ("lora_B_dtype", dict(lora_B=torch.randn(5, 2, dtype=torch.bfloat16)), TypeError, "lora_B.dtype"),
    ("x_int", dict(x=torch.ones(4, 6, dtype=torch.int64)), TypeError, "x.dtype"),
    ("tau_nan", dict(tau=torch.tensor(float("nan"))), ValueError, "tau"),
    ("tau_inf", dict(tau=torch.tensor(float("inf"))), ValueError, "tau"),
    ("tau_shape", dict(tau=torch.zeros(2)), TypeError, "tau"),
    ("scale_neg", dict(scale=-1.0), ValueError, "scale"),
    ("scale_nan", dict(scale=float("nan")), ValueError, "scale"),
    ("lam_neg", dict(lam=-1.0), ValueError, "lam"),
    ("dropout_1", dict(dropout_p=1.0), ValueError, "dropout_p"),
    ("weight_meta", dict(weight=torch.randn(5, 6, device="meta")), ValueError, "weight"),
    ("lora_A_meta", dict(lora_A=torch.randn(2, 6, device="meta")), ValueError, "lora_A"),
]


@pytest.mark.parametrize("case,over,exc,needle", BAD, ids=[c[0] for c in BAD])
def test_bad_input_names_the_argument(case, over, exc, needle):
    _call()  # the good call works
    with pytest.raises(exc, match=needle.replace(".", r"\.").replace("(", r"\(")):
        _call(**over)


def test_cpp_direct_calls_check_arguments():
    _skip_unless_available("cpp")
    C = backends.load_cpp_module()
    x, w, b, A, B = make_inputs(4, 6, 5, 2, torch.float32)
    c = torch.ones(4)
    with pytest.raises(ValueError, match="lora_B"):
        C.lora_forward(x, w, b, A, B[:, :1], x, c, None)
    with pytest.raises(ValueError, match="cscale"):
        C.lora_forward(x, w, b, A, B, x, torch.ones(3), None)
    with pytest.raises(TypeError, match="weight"):
        C.lora_forward(x, w.double(), b, A, B, x, c, None)
    with pytest.raises(ValueError, match="x must be a CPU tensor"):
        C.lora_forward(x.to("meta"), w, b, A, B, x, c, None)
    y, z, ratio, mask = C.lora_forward(x, w, b, A, B, x, c, None)
    with pytest.raises(ValueError, match="weight"):
        C.lora_backward(torch.ones(4, 5), x, None, A, B, x, z, c, mask, need_dx=True, need_dweight=False,
                        need_dbias=False, need_adapter=False, need_uz=False)
    with pytest.raises(ValueError, match="z"):
        C.lora_backward(torch.ones(4, 5), x, w, A, B, x, None, c, mask, need_dx=False, need_dweight=False,
                        need_dbias=False, need_adapter=True, need_uz=False)


def test_every_backend_implements_the_contract():
    """Each registered backend that can run here takes the contract's dataclasses and returns its results, with None
    exactly where a gradient was not requested, and agrees with the reference on the mask."""
    for name, backend in contract.REGISTRY.items():
        if not backend.available() or (name == "triton" and _TRITON_ERROR is not None):
            continue
        device = "cuda" if name == "triton" and torch.cuda.is_available() else "cpu"
        x, w, b, A, B = (t.to(device) for t in make_inputs(5, 6, 4, 2, torch.float32))
        c = torch.full((5,), 0.5, device=device)
        impl = backend.implementation()
        out = impl.forward(ForwardInputs(x, w, b, A, B, x, c, 0.01))
        want = reference.lora_forward(x, w, b, A, B, x, c, 0.01)
        assert isinstance(out, contract.ForwardResult) and torch.equal(out.mask, want.mask), name
        res = impl.backward(BackwardInputs(torch.randn(5, 4, device=device), x, w, A, B, x, want.z, c, want.mask,
                                           None, need_dx=True, need_dweight=False, need_dbias=False,
                                           need_adapter=True, need_uz=False))
        assert isinstance(res, contract.BackwardResult), name
        assert res.dweight is None and res.dbias is None and res.uz is None, name
        assert res.dx is not None and res.dA is not None and res.dB is not None, name


def test_backend_capabilities_are_enforced():
    """A forced backend that does not declare what a call needs is an error naming what it lacks; auto skips it."""
    x, w, b, A, B = (t.double() for t in make_inputs(3, 4, 5, 2, torch.float32))
    if _TRITON_ERROR is None:
        with pyflex.use_backend("triton"):
            with pytest.raises(ValueError, match=r"backend 'triton' cannot serve.*dtype torch.float64"):
                pyflex.flex_lora(x, w, b, A, B, 1.0)
    with pyflex.use_backend("auto"):
        y = pyflex.flex_lora(x, w, b, A, B, 1.0)   # the reference or C++ serve float64
    torch.testing.assert_close(y, F.linear(x, w, b) + (x @ A.t()) @ B.t())


# --------------------------------------------------------------------------------------------------
# dispatch
# --------------------------------------------------------------------------------------------------
def test_forced_cpp_unavailable_raises(monkeypatch):
    def missing():
        raise contract.BackendUnavailable("ImportError: no module named pyflex._C")

    unbuilt = contract.Backend("cpp", contract.REGISTRY["cpp"].capabilities, missing, auto_devices=("cpu",))
    monkeypatch.setitem(contract.REGISTRY, "cpp", unbuilt)
    backends.clear_dispatch_cache()
    x, w, b, A, B = make_inputs(3, 4, 5, 2, torch.float32)
    with pyflex.use_backend("cpp"):
        with pytest.raises(RuntimeError, match="backend 'cpp' is not available.*pyflex._C"):
            pyflex.flex_lora(x, w, b, A, B, 1.0)
    # 'auto' falls back to the reference path, with one warning.
    with pyflex.use_backend("auto"):
        with pytest.warns(RuntimeWarning, match="pyflex._C is not available"):
            y = pyflex.flex_lora(x, w, b, A, B, 1.0)
        assert pyflex.resolve_backend(x.device)[0] == "reference"
    torch.testing.assert_close(y, F.linear(x, w, b) + (x @ A.t()) @ B.t())
    backends.clear_dispatch_cache()   # the real extension again for the tests after this one (after monkeypatch)


def test_cpp_refuses_non_cpu_tensors():
    _skip_unless_available("cpp")
    with pytest.raises(ValueError, match=r"backend 'cpp' cannot serve.*tensors on meta \(serves cpu\)"):
        pyflex.resolve_backend(torch.device("meta"), "cpp")


def test_auto_picks_cpp_on_cpu_when_built():
    _skip_unless_available("cpp")
    with pyflex.use_backend("auto"):
        assert pyflex.resolve_backend(torch.device("cpu"))[0] == "cpp"


def test_invalid_backend_names_raise(monkeypatch):
    monkeypatch.setenv("PYFLEX_BACKEND", "cuda")
    with pytest.raises(ValueError, match="PYFLEX_BACKEND='cuda'"):
        pyflex.current_backend_name()
    x, w, b, A, B = make_inputs(3, 4, 5, 2, torch.float32)
    with pytest.raises(ValueError, match="PYFLEX_BACKEND"):
        pyflex.flex_lora(x, w, b, A, B, 1.0)
    monkeypatch.setenv("PYFLEX_BACKEND", "CPP")
    assert pyflex.current_backend_name() == "cpp"
    with pytest.raises(ValueError, match="backend='bogus'"):
        with pyflex.use_backend("bogus"):
            pass


def test_verify_taus_checks_each_change_once():
    """On CUDA the op checks τ's finiteness once per change of τ (version counter), for all layers at once."""
    taus = [torch.tensor(0.1), torch.tensor(0.2)]
    ops.verify_taus(taus)
    assert all(t._pyflex_checked_version == t._version for t in taus)
    with torch.no_grad():
        taus[1].fill_(float("nan"))  # an in-place write bumps the version, so the next check reads it again
    with pytest.raises(ValueError, match="tau=nan is not finite"):
        ops.verify_taus(taus)
    with torch.no_grad():
        taus[1].fill_(0.3)
    ops.verify_taus(taus)
    assert taus[1]._pyflex_checked_version == taus[1]._version


def test_torch_compile_fullgraph_matches_eager(backend):
    """Under torch.compile the op is two opaque custom ops with a registered autograd: one graph, same numbers,
    same gradients (coef's through cscale, τ's surrogate included)."""
    torch.manual_seed(4)
    M, K, N, r = 9, 16, 12, 4
    x = torch.randn(M, K, requires_grad=True)
    weight = torch.randn(N, K)
    bias = torch.randn(N, requires_grad=True)
    lora_A = torch.randn(r, K, requires_grad=True)
    lora_B = (torch.randn(N, r) * 0.5).requires_grad_()
    coef = torch.rand(M, requires_grad=True)
    tau = torch.nn.Parameter(torch.tensor(0.2))

    def op(x, bias, lora_A, lora_B, coef, tau):
        return pyflex.flex_lora(x, weight, bias, lora_A, lora_B, 0.5, tau=tau, coef=coef, lam=1e-3, return_mask=True)

    inputs = (x, bias, lora_A, lora_B, coef, tau)
    y, mask = op(*inputs)
    gy = torch.randn_like(y)
    grads = torch.autograd.grad(y, inputs, gy)
    torch._dynamo.reset()
    y_c, mask_c = torch.compile(op, fullgraph=True, backend="aot_eager")(*inputs)
    grads_c = torch.autograd.grad(y_c, inputs, gy)
    assert 0 < int(mask.sum()) < M  # τ splits the tokens
    assert torch.equal(mask, mask_c)
    assert rms_ratio(y_c, y) < 1e-6
    for name, g, g_c in zip(("x", "bias", "lora_A", "lora_B", "coef", "tau"), grads, grads_c):
        assert rms_ratio(g_c, g) < 1e-6, name


# --------------------------------------------------------------------------------------------------
# the Triton interpreter switch, in fresh processes (this one has it on already)
# --------------------------------------------------------------------------------------------------
_TRITON_ON_CPU = """
import torch, pyflex
x, w, A, B = torch.randn(5, 8), torch.randn(6, 8), torch.randn(2, 8), torch.randn(6, 2)
{call}
torch.testing.assert_close(y, x @ w.t() + (x @ A.t()) @ B.t())
print("ok")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the triton backend compiles the kernels")
@pytest.mark.parametrize("how", ["env", "use_backend"])
def test_triton_backend_on_cpu_without_exporting_triton_interpret(how):
    """PYFLEX_BACKEND=triton runs on CPU tensors without TRITON_INTERPRET in the environment; use_backend('triton')
    in a process whose triton was imported without the interpreter says what to set."""
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYFLEX_BACKEND")}
    if how == "env":
        env["PYFLEX_BACKEND"] = "triton"
        call = "y = pyflex.flex_lora(x, w, None, A, B, 1.0)"
    else:
        call = "with pyflex.use_backend('triton'):\n    y = pyflex.flex_lora(x, w, None, A, B, 1.0)"
    proc = subprocess.run([sys.executable, "-c", _TRITON_ON_CPU.format(call=call)], env=env, capture_output=True,
                          text=True, timeout=300)
    if how == "env":
        assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]
    else:
        assert proc.returncode != 0 and "TRITON_INTERPRET=1" in proc.stderr, proc.stderr[-2000:]
