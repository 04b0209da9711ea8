"""Kernel-level tests of pyflex.kernels.flex_lora against the spec (pyflex/reference.py).

Without a GPU the kernels run under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so
shapes stay small; on a GPU the same tests run compiled, with larger shapes added.

Closeness is the RMS ratio ‖a − b‖ / ‖b‖ with per-dtype tolerances. Masks are compared only on tokens
whose reference ratio is not within rounding of τ, and outputs only on tokens whose masks agree.
"""
import itertools

import pytest
import torch

from conftest import DEVICE
from pyflex.lora import reference

fl = pytest.importorskip("pyflex.kernels.flex_lora")

ON_GPU = DEVICE == "cuda"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# RMS-ratio tolerance of input-dtype outputs (y, dx, dA, dB) and of fp32 LoRA-side values (z, ratio, uz).
TOL_OUT = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float64: 1e-12}
TOL_F32 = {torch.float32: 2e-5, torch.bfloat16: 1e-4, torch.float16: 1e-4, torch.float64: 1e-12}
# ratio depends on ‖y0‖, which the decode kernel rounds to the input dtype itself (may differ by 1 ulp)
TOL_RATIO = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float64: 1e-12}
# relative distance to τ below which a token's mask may legitimately flip between implementations
TAU_BAND = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float64: 1e-9}

# (M, K, N, r): decode path (M ≤ 64) and rows path, none a multiple of a block; every r ∈ {1, 8, 16, 64}
# meets both paths. (40, 100, 30, 8) splits z over K and (64, 19, 130, 64) splits the Gram over N in the
# decode kernel under the interpreter's block sizes.
SHAPES = [(1, 37, 45, 16), (13, 70, 33, 1), (64, 19, 130, 64), (40, 100, 30, 8),
          (65, 37, 45, 8), (97, 50, 70, 16), (70, 21, 30, 64), (80, 20, 35, 1)]
if ON_GPU:
    SHAPES += [(48, 1000, 777, 16), (33, 4096, 4096, 64), (1000, 520, 1100, 8), (4099, 384, 1000, 64),
               (2048, 1024, 1024, 16)]


def rms_rel(a, b):
    a, b = a.double(), b.double()
    den = b.norm()
    num = (a - b).norm()
    return (num / den).item() if den > 0 else num.item()


def make_inputs(M, K, N, r, dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype=dtype, device=DEVICE)

    x = rnd(M, K)
    weight = rnd(N, K, scale=K ** -0.5)
    b = rnd(N, scale=0.1) if bias else None
    A = rnd(r, K, scale=K ** -0.5)
    B = rnd(N, r, scale=0.5)
    # per-token effective scale s·β·c_i, with a negative entry (ratio uses |cscale|)
    cscale = (torch.rand(M, generator=g) * 2.0).to(reference.compute_dtype(dtype)).to(DEVICE)
    if M > 2:
        cscale[1] = -cscale[1]
    return x, weight, b, A, B, cscale


def check_forward(out, exp, tau, dtype):
    assert out.y.shape == exp.y.shape and out.y.dtype == exp.y.dtype
    assert out.z.shape == exp.z.shape and out.z.dtype == exp.z.dtype
    assert out.mask.dtype == torch.bool and out.mask.shape == exp.mask.shape
    if exp.y.shape[0] == 0:
        return
    assert rms_rel(out.z, exp.z) <= TOL_F32[dtype]
    if tau is None:
        assert out.ratio is None
        assert bool(out.mask.all())
        keep = torch.ones_like(exp.mask)
    else:
        assert out.ratio is not None and out.ratio.dtype == exp.ratio.dtype
        assert rms_rel(out.ratio, exp.ratio) <= TOL_RATIO[dtype]
        near = (exp.ratio - tau).abs() <= TAU_BAND[dtype] * max(abs(tau), 1e-12)
        assert bool((out.mask == exp.mask)[~near].all()), "mask differs away from τ"
        keep = out.mask == exp.mask
    assert rms_rel(out.y[keep], exp.y[keep]) <= TOL_OUT[dtype]


def median_tau(x, weight, b, A, B, cscale):
    """τ at the median ratio: ~50% sparsity."""
    ratio = reference.lora_forward(x, weight, b, A, B, x, cscale, 0.0).ratio
    return float(ratio.median())


# ------------------------------------------------------------------------------------------------
# forward
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,K,N,r", SHAPES)
@pytest.mark.parametrize("masked", [False, True], ids=["tau_off", "tau_median"])
def test_forward(M, K, N, r, dtype, masked):
    x, weight, b, A, B, cscale = make_inputs(M, K, N, r, dtype, bias=(M + r) % 2 == 0)
    tau = median_tau(x, weight, b, A, B, cscale) if masked else None
    out = fl.lora_forward(x, weight, b, A, B, x, cscale, tau)
    exp = reference.lora_forward(x, weight, b, A, B, x, cscale, tau)
    check_forward(out, exp, tau, dtype)
    if masked:
        assert 0 < int(out.mask.sum()) < M or M < 4


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", [3, 70])
@pytest.mark.parametrize("bias", [False, True])
def test_forward_dropout_input(M, dtype, bias):
    """x_lora ≠ x (dropout): z comes from x_lora, y0 from x (decode path falls back to the rows pass)."""
    K, N, r = 30, 40, 8
    x, weight, b, A, B, cscale = make_inputs(M, K, N, r, dtype, bias=bias)
    keep = (torch.rand(M, K, device=DEVICE) > 0.25).to(dtype) / 0.75
    x_lora = x * keep
    tau = float(reference.lora_forward(x, weight, b, A, B, x_lora, cscale, 0.0).ratio.median())
    for t in (None, tau):
        out = fl.lora_forward(x, weight, b, A, B, x_lora, cscale, t)
        exp = reference.lora_forward(x, weight, b, A, B, x_lora, cscale, t)
        check_forward(out, exp, t, dtype)


@pytest.mark.parametrize("M", [5, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_forward_zero_rows(M, dtype):
    """‖y0_i‖ = 0: the NORM_EPS clamp gives a finite ratio; all-zero tokens have ratio 0."""
    K, N, r = 24, 40, 4
    x, weight, _, A, B, cscale = make_inputs(M, K, N, r, dtype, bias=False)
    x[0] = 0                                    # y0 = 0 and z = 0 → ratio 0
    x_lora = x.clone()
    x[2] = 0                                    # y0 = 0 but z ≠ 0 (x_lora row kept) → ratio = ‖d‖ / eps
    for tau in (None, 0.0, 1.0):
        out = fl.lora_forward(x, weight, None, A, B, x_lora, cscale, tau)
        exp = reference.lora_forward(x, weight, None, A, B, x_lora, cscale, tau)
        check_forward(out, exp, tau, dtype)
        if tau is not None:
            assert torch.isfinite(out.ratio).all()
            assert out.ratio[0].item() == 0.0 and bool(out.mask[0]) == (tau <= 0.0)
            assert out.ratio[2].item() > 1e3 and bool(out.mask[2])
    # zero base weight: every ‖y0_i‖ = 0, also on the decode path (x_lora is x)
    wz = torch.zeros_like(weight)
    out = fl.lora_forward(x_lora, wz, None, A, B, x_lora, cscale, 0.5)
    exp = reference.lora_forward(x_lora, wz, None, A, B, x_lora, cscale, 0.5)
    check_forward(out, exp, 0.5, dtype)


@pytest.mark.parametrize("tau", [None, 0.1])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_empty(tau, dtype):
    x, weight, b, A, B, cscale = make_inputs(0, 16, 24, 4, dtype)
    out = fl.lora_forward(x, weight, b, A, B, x, cscale, tau)
    exp = reference.lora_forward(x, weight, b, A, B, x, cscale, tau)
    assert out.y.shape == (0, 24) and out.z.shape == (0, 4) and out.mask.shape == (0,)
    assert (out.ratio is None) == (tau is None)
    check_forward(out, exp, tau, dtype)


@pytest.mark.parametrize("M", [7, 90])
def test_forward_noncontiguous(M):
    """x, A, B as strided views: the launchers honour strides."""
    dtype = torch.float32
    K, N, r = 30, 44, 8
    x, weight, b, A, B, cscale = make_inputs(M, K, N, r, dtype)
    xs = torch.randn(M, 2 * K, device=DEVICE, dtype=dtype)[:, ::2]
    xs.copy_(x)
    At = A.t().contiguous().t()
    Bt = B.t().contiguous().t()
    tau = median_tau(x, weight, b, A, B, cscale)
    out = fl.lora_forward(xs, weight, b, At, Bt, xs, cscale, tau)
    exp = reference.lora_forward(x, weight, b, A, B, x, cscale, tau)
    check_forward(out, exp, tau, dtype)


def test_decode_limit_covers_the_small_shapes():
    assert fl.DECODE_MAX_M == 64
    for r in (1, 8, 16, 64):
        assert any(s[0] <= fl.DECODE_MAX_M and s[3] == r for s in SHAPES)
        assert any(s[0] > fl.DECODE_MAX_M and s[3] == r for s in SHAPES)


# ------------------------------------------------------------------------------------------------
# backward
# ------------------------------------------------------------------------------------------------
def run_backward(M, K, N, r, dtype, *, flags, dropout=False, mask_kind="random", bias=True, seed=0):
    x, weight, b, A, B, cscale = make_inputs(M, K, N, r, dtype, bias=bias, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    gy = torch.randn(M, N, generator=g).to(dtype=dtype, device=DEVICE)
    ds = None
    x_lora = x
    if dropout:
        ds = ((torch.rand(M, K, generator=g) > 0.3).to(dtype) / 0.7).to(DEVICE)
        x_lora = x * ds
    z = x_lora.to(reference.compute_dtype(dtype)) @ A.to(reference.compute_dtype(dtype)).t()
    if mask_kind == "random":
        mask = (torch.rand(M, generator=g) > 0.5).to(DEVICE)
    elif mask_kind == "none":
        mask = torch.zeros(M, dtype=torch.bool, device=DEVICE)
    else:
        mask = torch.ones(M, dtype=torch.bool, device=DEVICE)
    exp = reference.lora_backward(gy, x, weight, A, B, x_lora, z, cscale, mask, dropout_scale=ds if flags["need_dx"] else None,
                                  **flags)
    # pass None for what the op (pyflex/lora/autograd.py) does not save for this combination
    need_adapter = flags["need_adapter"]
    out = fl.lora_backward(
        gy,
        x if flags["need_dweight"] or need_adapter else None,
        weight if flags["need_dx"] else None,
        A if flags["need_dx"] else None,
        B,
        x_lora if need_adapter else None,
        z if need_adapter or flags["need_uz"] else None,
        cscale, mask, dropout_scale=ds if flags["need_dx"] else None, **flags)
    return out, exp


def check_backward(out, exp, flags, dtype):
    names = ("dx", "dweight", "dbias", "dA", "dB", "uz")
    wanted = dict(dx=flags["need_dx"], dweight=flags["need_dweight"], dbias=flags["need_dbias"],
                  dA=flags["need_adapter"], dB=flags["need_adapter"], uz=flags["need_uz"])
    for name in names:
        o, e = getattr(out, name), getattr(exp, name)
        if not wanted[name]:
            assert o is None, f"{name} computed although not requested"
            continue
        assert o is not None and o.shape == e.shape and o.dtype == e.dtype, name
        tol = TOL_F32[dtype] if name == "uz" else TOL_OUT[dtype]
        assert rms_rel(o, e) <= tol, f"{name}: {rms_rel(o, e)}"


FLAG_NAMES = ("need_dx", "need_dweight", "need_dbias", "need_adapter", "need_uz")


@pytest.mark.parametrize("combo", list(itertools.product([False, True], repeat=5)),
                         ids=lambda c: "".join("1" if f else "0" for f in c))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backward_flags(combo, dtype):
    flags = dict(zip(FLAG_NAMES, combo))
    out, exp = run_backward(21, 29, 41, 8, dtype, flags=flags, dropout=bool(combo[0] and combo[3]))
    check_backward(out, exp, flags, dtype)


ALL = dict(need_dx=True, need_dweight=True, need_dbias=True, need_adapter=True, need_uz=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,K,N,r", [(1, 37, 45, 16), (20, 30, 50, 64), (70, 37, 45, 1), (97, 50, 70, 8)]
                         + ([(1000, 520, 1100, 16), (4099, 384, 1000, 64)] if ON_GPU else []))
@pytest.mark.parametrize("dropout", [False, True], ids=["nodrop", "dropout"])
def test_backward(M, K, N, r, dtype, dropout):
    out, exp = run_backward(M, K, N, r, dtype, flags=ALL, dropout=dropout)
    check_backward(out, exp, ALL, dtype)


@pytest.mark.parametrize("mask_kind", ["none", "all"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backward_mask_extremes(mask_kind, dtype):
    """No active token: dA = dB = 0 and dx is the base term only."""
    out, exp = run_backward(50, 33, 27, 8, dtype, flags=ALL, dropout=True, mask_kind=mask_kind)
    check_backward(out, exp, ALL, dtype)
    if mask_kind == "none":
        assert not out.dA.any() and not out.dB.any()


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
def test_backward_empty(dtype):
    out, exp = run_backward(0, 16, 24, 4, dtype, flags=ALL)
    assert out.dx.shape == (0, 16) and out.uz.shape == (0,)
    assert out.dA.shape == (4, 16) and not out.dA.any() and out.dB.shape == (24, 4) and not out.dB.any()
    assert out.dweight.shape == (24, 16) and out.dbias.shape == (24,)


# ------------------------------------------------------------------------------------------------
# through the autograd op (pyflex.flex_lora), triton vs reference backend
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("M", [6, 75])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_op_triton_matches_reference(M, dtype):
    import pyflex

    K, N, r = 32, 40, 8
    x, weight, b, A, B, _ = make_inputs(M, K, N, r, dtype)
    coef = torch.rand(M, device=DEVICE, dtype=dtype)
    results = {}
    for backend in ("reference", "triton"):
        xs = x.clone().reshape(2, M // 2, K) if M % 2 == 0 else x.clone()  # 3-D x when it splits evenly
        leaves = [t.clone().requires_grad_(True) for t in (xs, weight, b, A, B, coef.reshape(xs.shape[:-1]))]
        tau = torch.zeros(1, device=DEVICE, dtype=torch.float32, requires_grad=True)
        with pyflex.use_backend(backend):
            y, mask = pyflex.flex_lora(leaves[0], leaves[1], leaves[2], leaves[3], leaves[4], 2.0, tau=tau,
                                    coef=leaves[5], lam=1e-3, return_mask=True)
            (y.float() * torch.linspace(-1, 1, N, device=DEVICE)).sum().backward()
        results[backend] = (y, mask, [t.grad for t in leaves], tau.grad)
    (y_r, m_r, g_r, t_r), (y_t, m_t, g_t, t_t) = results["reference"], results["triton"]
    assert torch.equal(m_r, m_t)
    assert rms_rel(y_t, y_r) <= TOL_OUT[dtype]
    for a, e in zip(g_t, g_r):
        assert rms_rel(a, e) <= TOL_OUT[dtype]
    assert rms_rel(t_t, t_r) <= TOL_OUT[dtype]


MODES = [dict(fwd_addmm=False, dx_addmm=False, split_dots=False), dict(fwd_addmm=True, dx_addmm=True, split_dots=False)]
if ON_GPU:
    MODES += [dict(fwd_addmm=False, dx_addmm=False, split_dots=True), dict(fwd_addmm=True, dx_addmm=True, split_dots=True)]


@pytest.mark.parametrize("modes", MODES, ids=lambda m: "-".join(k for k, v in m.items() if v) or "plain")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("masked", [False, True], ids=["tau_off", "tau_median"])
def test_modes(monkeypatch, modes, dtype, masked):
    """Every schedule of GPU_CONFIG['modes'] (LoRA term written alone with cuBLAS adding the GEMM onto it;
    fp32 operands split into bf16 hi + lo for native dots) gives the reference's results."""
    for table in (fl.GPU_CONFIG, fl._INTERPRET_CONFIG):
        monkeypatch.setitem(table, "modes", dict(modes))
    M, K, N, r = (90, 40, 50, 8) if not ON_GPU else (1000, 520, 1100, 64)
    x, weight, _, A, B, cscale = make_inputs(M, K, N, r, dtype, bias=False)
    tau = median_tau(x, weight, None, A, B, cscale) if masked else None
    out = fl.lora_forward(x, weight, None, A, B, x, cscale, tau)
    exp = reference.lora_forward(x, weight, None, A, B, x, cscale, tau)
    check_forward(out, exp, tau, dtype)
    for dropout in (False, True):
        out, exp = run_backward(M, K, N, r, dtype, flags=ALL, dropout=dropout, bias=False)
        check_backward(out, exp, ALL, dtype)


def ref_ratio_median(x, weight, lora_A, lora_B, cscale):
    probe = reference.lora_forward(x, weight, None, lora_A, lora_B, x, cscale, 0.0)
    return probe.ratio.median()


def test_tau_as_device_tensor_matches_float():
    """On CUDA the op hands τ to the kernels as a tensor (no host sync); it must give what a float τ gives."""
    torch.manual_seed(3)
    M, K, N, R = 37, 24, 20, 4
    x = torch.randn(M, K, device=DEVICE)
    weight, lora_A, lora_B = (torch.randn(N, K, device=DEVICE), torch.randn(R, K, device=DEVICE),
                              torch.randn(N, R, device=DEVICE))
    cscale = torch.full((M,), 0.5, device=DEVICE)
    for rows in (M, 5):  # the rows kernel and the decode kernel
        tau = float(ref_ratio_median(x[:rows], weight, lora_A, lora_B, cscale[:rows]))
        as_float = fl.lora_forward(x[:rows], weight, None, lora_A, lora_B, x[:rows], cscale[:rows], tau)
        as_tensor = fl.lora_forward(x[:rows], weight, None, lora_A, lora_B, x[:rows], cscale[:rows],
                                    torch.tensor(tau, device=DEVICE))
        assert 0 < int(as_tensor.mask.sum()) < rows  # τ splits the tokens, so the comparison means something
        assert torch.equal(as_float.mask, as_tensor.mask)
        assert torch.equal(as_float.y, as_tensor.y)


@pytest.mark.parametrize("M", [0, 1, 7, 1024, 3000])
@pytest.mark.parametrize("lam", [0.0, 0.25])
def test_tau_gradient_kernel_matches_reference(M, lam):
    """One-launch τ surrogate gradient (eq. 10, 14-17) against the reference, incl. M not a multiple of the block,
    several blocks, negative per-token scales and all four (sign of μ, mask) cases."""
    g = torch.Generator().manual_seed(M)
    uz = torch.randn(M, generator=g).to(DEVICE)
    cscale = (torch.rand(M, generator=g) * 2 - 0.5).to(DEVICE)
    mask = (torch.rand(M, generator=g) > 0.4).to(DEVICE)
    got = fl.tau_gradient(uz, cscale, mask, lam)
    want = reference.tau_gradient(uz.double(), cscale.double(), mask, lam)
    assert got.shape == () and got.dtype == torch.float32
    scale = (uz.double() * cscale.double()).abs().sum().item() + lam * M + 1e-12
    assert abs(got.item() - want.item()) <= 1e-6 * scale, (got.item(), want.item())
