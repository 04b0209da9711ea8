"""The op on a 4-bit base (docs/op.md, "Quantized base"): ``flex_lora`` with an NF4Weight equals, bit for bit, the same
op on the dequantized dense weight, on every backend (reference, C++, Triton under the interpreter), with τ, dropout,
bias and gates; backward saves the packed bytes, never a dense W0; at most one dequantized weight is alive at a time;
torch.compile(fullgraph=True) gives the eager numbers. The whole op against an independent spec is
tests/lora/test_backend_contract.py; this file checks that the NF4 base changes nothing but where W0 comes from.
"""
from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

import pyflex
from pyflex.lora import backends, contract
from pyflex.memory import LiveTensorBytes
from tiny_models import random_nf4

BACKENDS = ["reference", "cpp", "triton"]


def _skip_unless_available(name):
    if name == "cpp" and not pyflex.cpp_available():
        pytest.skip("pyflex._C is not built")
    if name == "triton":
        try:
            importlib.import_module("pyflex.kernels.nf4")
            importlib.import_module("pyflex.kernels.flex_lora")
        except Exception as exc:  # noqa: BLE001
            pytest.skip(f"the Triton kernels cannot be imported ({exc})")


def _run(x, weight, bias, A, B, scale, gy, **kw):
    """flex_lora forward + backward of Σ gy·y; (y, mask, grads of x, bias, A, B, coef, τ)."""
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None
              for t in (x, bias, A, B, kw.pop("coef", None), kw.pop("tau", None))]
    xl, bl, Al, Bl, cl, tl = leaves
    y, mask = pyflex.flex_lora(xl, weight, bl, Al, Bl, scale, coef=cl, tau=tl, return_mask=True, **kw)
    (y * gy).sum().backward()
    return y.detach(), mask, [None if t is None else t.grad for t in leaves]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "double-quant"])
def test_nf4_base_equals_dense_op_on_the_dequantized_weight(backend, dtype, nested):
    """Same y, mask and gradients (x, bias, A, B, gate coefficient, τ) as the op on W0 = dequantize(W, x.dtype), bit
    for bit, with τ on, dropout, bias and a per-token coefficient; the weight's own dtype may differ from x's."""
    _skip_unless_available(backend)
    M, K, N, r = 24, 128, 48, 8
    w = random_nf4(N, K, dtype=torch.bfloat16 if dtype == torch.float32 else torch.float32, nested=nested)
    dense = w.dequantize(dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(M, K, generator=g).to(dtype)
    bias = (torch.randn(N, generator=g) * 0.5).to(dtype)
    A = (torch.randn(r, K, generator=g) / K ** 0.5).to(dtype)
    B = torch.randn(N, r, generator=g).to(dtype)
    coef = (torch.rand(M, generator=g) + 0.25).to(dtype)
    gy = torch.randn(M, N, generator=g).to(dtype)
    with pyflex.use_backend(backend):
        probe = pyflex.flex_lora(x, dense, bias, A, B, 0.5, coef=coef, tau=torch.tensor(0.0), return_mask=True)
        ratio_free = probe[1]
        tau = torch.tensor(0.3)
        results = []
        for weight in (dense, w):
            torch.manual_seed(7)                                     # the same dropout mask for both
            results.append(_run(x, weight, bias, A, B, 0.5, gy, coef=coef, tau=tau, lam=1e-3, dropout_p=0.1))
    (y_d, m_d, g_d), (y_q, m_q, g_q) = results
    assert bool(ratio_free.all())
    assert 0 < int(m_d.sum()) < M                                    # τ splits the tokens
    assert torch.equal(y_q, y_d) and torch.equal(m_q, m_d)
    for name, a, b in zip(("x", "bias", "A", "B", "coef", "tau"), g_q, g_d):
        assert a is not None and torch.equal(a, b), name


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_nf4_base_fp16_fp64_and_inference(backend):
    _skip_unless_available(backend)
    w = random_nf4(40, 64, nested=True)
    A, B = torch.randn(4, 64), torch.randn(40, 4)
    with pyflex.use_backend(backend):
        for dtype in (torch.float16, torch.float64):
            x = torch.randn(9, 64, dtype=dtype)
            want = pyflex.flex_lora(x, w.dequantize(dtype), None, A.to(dtype), B.to(dtype), 2.0)
            with torch.no_grad():
                got = pyflex.flex_lora(x, w, None, A.to(dtype), B.to(dtype), 2.0)
            assert got.dtype == dtype and torch.equal(got, want)


def test_backward_saves_the_packed_bytes_never_a_dense_weight():
    """What autograd keeps for a frozen NF4 base is the weight's own packed bytes and scales (no new memory)."""
    N, K = 64, 128
    w = random_nf4(N, K, nested=True)
    x = torch.randn(6, K, requires_grad=True)
    A, B = torch.randn(4, K, requires_grad=True), torch.randn(N, 4, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = pyflex.flex_lora(x, w, None, A, B, 1.0)
    dense = [t for t in saved if t.dtype.is_floating_point and tuple(t.shape) == (N, K)]
    assert not dense, "a dense (N, K) weight was saved for backward"
    ptrs = {t.untyped_storage().data_ptr() for t in saved}
    assert w.packed.untyped_storage().data_ptr() in ptrs and w.absmax.untyped_storage().data_ptr() in ptrs
    y.sum().backward()
    assert x.grad is not None
    # nothing to save for dx when x needs no grad: no weight at all
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        pyflex.flex_lora(x.detach(), w, None, A, B, 1.0)
    assert w.packed.untyped_storage().data_ptr() not in {t.untyped_storage().data_ptr() for t in saved}


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_at_most_one_dequantized_weight_alive(backend):
    """A stack of layers, few tokens (activations ≪ weights): the peak over forward + backward stays below two dense
    weights, where saving dense weights (F.linear on a dequantized weight under plain autograd) holds one per layer."""
    _skip_unless_available(backend)
    L, D, r = 6, 256, 4
    weights = [random_nf4(D, D, seed=i) for i in range(L)]
    adapters = [(torch.zeros(r, D, requires_grad=True), torch.zeros(D, r, requires_grad=True)) for _ in range(L)]
    x = torch.randn(4, D, requires_grad=True)
    dense_bytes = D * D * 4

    def step(layer_fn):
        with LiveTensorBytes() as mem:
            h = x
            for w, (A, B) in zip(weights, adapters):
                h = layer_fn(h, w, A, B)
            h.sum().backward()
        return mem.peak

    with pyflex.use_backend(backend):
        peak = step(lambda h, w, A, B: pyflex.flex_lora(h, w, None, A, B, 1.0))
        naive = step(lambda h, w, A, B: F.linear(h, w.dequantize()) + (h @ A.t()) @ B.t())
    assert peak < 2 * dense_bytes, (peak, dense_bytes)
    assert naive > L * dense_bytes                                   # the trap the op avoids


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
def test_torch_compile_fullgraph_on_an_nf4_base(backend):
    _skip_unless_available(backend)
    torch.manual_seed(4)
    M, K, N, r = 9, 64, 32, 4
    w = random_nf4(N, K, dtype=torch.bfloat16, nested=True)
    x = torch.randn(M, K, requires_grad=True)
    bias = torch.randn(N, requires_grad=True)
    A = torch.randn(r, K, requires_grad=True)
    B = (torch.randn(N, r) * 0.5).requires_grad_()
    coef = torch.rand(M, requires_grad=True)
    with torch.no_grad():   # τ between two token ratios ρ_i = ‖0.5·c_i·B A x_i‖ / ‖W0 x_i‖, so that it splits them
        ratio = (0.5 * coef[:, None] * (x @ A.t() @ B.t())).norm(dim=1) / (x @ w.dequantize(torch.float32).t()).norm(dim=1)
        low, high = ratio.sort().values[M // 2 - 1: M // 2 + 1]
    tau = torch.nn.Parameter(((low + high) / 2).clone())

    def op(x, bias, A, B, coef, tau):
        return pyflex.flex_lora(x, w, bias, A, B, 0.5, tau=tau, coef=coef, lam=1e-3, return_mask=True)

    inputs = (x, bias, A, B, coef, tau)
    with pyflex.use_backend(backend):
        y, mask = op(*inputs)
        gy = torch.randn_like(y)
        grads = torch.autograd.grad(y, inputs, gy)
        torch._dynamo.reset()
        y_c, mask_c = torch.compile(op, fullgraph=True, backend="aot_eager")(*inputs)
        grads_c = torch.autograd.grad(y_c, inputs, gy)
    assert 0 < int(mask.sum()) < M
    assert torch.equal(mask, mask_c) and torch.equal(y_c, y)
    for name, g, g_c in zip(("x", "bias", "A", "B", "coef", "tau"), grads, grads_c):
        assert torch.equal(g_c, g), name


def test_a_backend_without_nf4_is_refused_by_name(monkeypatch):
    """A forced backend that does not declare the "nf4" weight format is an error naming it; auto skips it."""
    dense_only = contract.Backend("dense_only", contract.Capabilities(devices=("cpu",), dtypes=(torch.float32,)),
                                  contract.REGISTRY["reference"].load, auto_devices=("cpu",))
    monkeypatch.setitem(contract.REGISTRY, "dense_only", dense_only)
    backends.clear_dispatch_cache()
    try:
        w = random_nf4(8, 64)
        x, A, B = torch.randn(3, 64), torch.randn(2, 64), torch.randn(8, 2)
        with pyflex.use_backend("dense_only"):
            pyflex.flex_lora(x, w.dequantize(), None, A, B, 1.0)     # dense calls are served
            with pytest.raises(ValueError, match="weight format 'nf4'"):
                pyflex.flex_lora(x, w, None, A, B, 1.0)
    finally:
        backends.clear_dispatch_cache()


def test_bad_nf4_arguments_name_the_argument():
    w = random_nf4(8, 64)
    A, B = torch.randn(2, 64), torch.randn(8, 2)
    with pytest.raises(ValueError, match=r"x.shape\[-1\]=32"):
        pyflex.flex_lora(torch.randn(3, 32), w, None, A, B, 1.0)
    with pytest.raises(ValueError, match="lora_B"):
        pyflex.flex_lora(torch.randn(3, 64), w, None, A, torch.randn(9, 2), 1.0)
    with pytest.raises(ValueError, match="NF4Weight.*meta"):
        pyflex.flex_lora(torch.randn(3, 64), w.to("meta"), None, A, B, 1.0)
    with pytest.raises(TypeError, match="weight must be a torch.Tensor or an NF4Weight"):
        pyflex.flex_lora(torch.randn(3, 64), "W0", None, A, B, 1.0)
