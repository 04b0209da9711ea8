"""NF4 weights for the op (pyflex/lora/nf4.py) and the backends' dequantizers: the reference dequantization is bit-exact
with bitsandbytes, the Triton kernel (kernels/nf4.py, interpreter on CPU) and the C++ loop (pyflex._C) with the
reference. Reading modules (bitsandbytes, torchao) and what is refused: tests/layers/test_quantized.py.

Everything stays on CPU. K is a multiple of 64 wherever bitsandbytes' C dequantize is the baseline (its CPU kernel is
wrong when K is a multiple of 16 but not of 64), and no bitsandbytes forward runs in eval mode (on AVX512-BF16 CPUs
that repacks the weight in place into a layout dequantize_4bit cannot read).
"""
import pytest
import torch

import pyflex
from pyflex.layers.quantized import from_bnb_linear4bit
from pyflex.lora import backends
from pyflex.lora.nf4 import NF4Weight
from tiny_models import random_nf4

NAME = "model.layers.1.mlp.up_proj"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


# ------------------------------------------------------------------ helpers
def _linear4bit(bnb, n, k, *, dtype=torch.float32, nested=False, storage=torch.uint8, quant_type="nf4", seed=0,
                quantize=True):
    g = torch.Generator().manual_seed(seed)
    m = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.float32, compress_statistics=nested,
                          quant_type=quant_type, quant_storage=storage)
    m.weight = bnb.nn.Params4bit(torch.randn(n, k, generator=g).to(dtype), requires_grad=False,
                                 compress_statistics=nested, quant_type=quant_type, quant_storage=storage, module=m)
    return m.to("cpu") if quantize else m      # Params4bit quantizes on its first move to a device


def _bnb_dequant(bnb, m, dtype):
    """What bitsandbytes' MatMul4Bit forward multiplies by: the weight dequantized straight into ``dtype``."""
    qs = m.weight.quant_state
    absmax = qs.absmax
    if qs.nested:
        absmax = bnb.functional.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
    return torch.ops.bitsandbytes.dequantize_4bit.default(m.weight.data, absmax, qs.blocksize, "nf4", qs.shape, dtype)


def _random_nf4(n, k, **kw):
    """Arbitrary scales and code book: what the bit-exact dequantization checks need."""
    return random_nf4(n, k, scales="random", **kw)


def _nf4_kernel():
    pytest.importorskip("triton")
    from pyflex.kernels.nf4 import nf4_dequantize
    return nf4_dequantize


# ------------------------------------------------------------------ reference vs bitsandbytes
@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16], ids=["uint8", "bf16-storage"])
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "double-quant"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
def test_reference_equals_bnb_dequantize(dtype, nested, storage):
    bnb = pytest.importorskip("bitsandbytes")
    m = _linear4bit(bnb, 192, 320, dtype=dtype, nested=nested, storage=storage)
    w = from_bnb_linear4bit(m, NAME)
    assert w.shape == (192, 320) and w.dtype == dtype and w.double_quant == nested and w.blocksize == 64
    ref = bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state)
    out = w.dequantize()
    assert out.dtype == ref.dtype == dtype and torch.equal(out, ref)
    for dt in DTYPES:                                  # straight into another dtype: what MatMul4Bit's forward uses
        assert torch.equal(w.dequantize(dt), _bnb_dequant(bnb, m, dt))
    assert w.packed.data_ptr() == m.weight.data.data_ptr()          # shares the bytes, no copy


def test_reference_equals_bnb_fp32_storage_and_blocksize():
    bnb = pytest.importorskip("bitsandbytes")
    g = torch.Generator().manual_seed(3)
    for blocksize in (64, 128, 256):
        W = torch.randn(64, 256, generator=g)
        q, qs = bnb.functional.quantize_4bit(W, blocksize=blocksize, quant_type="nf4", compress_statistics=True,
                                             quant_storage=torch.float32)
        lin = bnb.nn.Linear4bit(256, 64, bias=False, quant_type="nf4", quant_storage=torch.float32)
        lin.weight = bnb.nn.Params4bit(q, requires_grad=False, quant_state=qs, quant_type="nf4",
                                       blocksize=blocksize, quant_storage=torch.float32, bnb_quantized=True, module=lin)
        w = from_bnb_linear4bit(lin, NAME)
        assert w.blocksize == blocksize
        assert torch.equal(w.dequantize(), bnb.functional.dequantize_4bit(q, qs))


def test_reference_equals_bnb_pytorch_path_any_k():
    """For K not a multiple of 64 bitsandbytes' C kernel is wrong on CPU; its pure-PyTorch path is the baseline."""
    bnb = pytest.importorskip("bitsandbytes")
    try:
        from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    except ImportError:
        pytest.skip("bitsandbytes' pure-PyTorch 4-bit dequantize moved")
    _dequantize_4bit_compute = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)  # eager
    for n, k in ((64, 80), (3, 1000), (64, 72)):
        m = _linear4bit(bnb, n, k)
        qs = m.weight.quant_state
        code = bnb.functional.get_4bit_type("nf4", device="cpu")
        ref = _dequantize_4bit_compute(m.weight.data.reshape(-1), qs.absmax, code, 64, (n, k), torch.float32)
        assert torch.equal(from_bnb_linear4bit(m, NAME).dequantize(), ref)


# ------------------------------------------------------------------ Triton (interpreter on CPU)
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "double-quant"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
def test_triton_equals_reference(dtype, nested):
    nf4_dequantize = _nf4_kernel()
    # (N, K, blocksize): aligned; blocks crossing rows; an odd element count (half-used last byte) and a tail block
    for seed, (n, k, bs) in enumerate(((64, 128, 64), (96, 80, 64), (5, 13, 64), (3, 1000, 128), (40, 2048, 64))):
        w = _random_nf4(n, k, dtype=dtype, nested=nested, blocksize=bs, seed=seed)
        ref = w.dequantize()
        out = nf4_dequantize(**w.kernel_args(), dtype=dtype)
        assert out.shape == (n, k) and out.dtype == dtype
        assert torch.equal(out, ref), (n, k, bs)
    out = torch.empty(n, k, dtype=torch.bfloat16)                # into a given output, another dtype
    assert nf4_dequantize(**w.kernel_args(), dtype=torch.bfloat16, out=out) is out
    assert torch.equal(out, w.dequantize(torch.bfloat16))


def test_triton_equals_bnb():
    bnb = pytest.importorskip("bitsandbytes")
    nf4_dequantize = _nf4_kernel()
    for dtype, nested, storage in ((torch.bfloat16, True, torch.bfloat16), (torch.float32, False, torch.uint8)):
        m = _linear4bit(bnb, 128, 192, dtype=dtype, nested=nested, storage=storage)
        w = from_bnb_linear4bit(m, NAME)
        ref = bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state)
        assert torch.equal(nf4_dequantize(**w.kernel_args(), dtype=dtype), ref)


def test_triton_rejects_bad_arguments():
    nf4_dequantize = _nf4_kernel()
    w = _random_nf4(8, 64)
    with pytest.raises(ValueError, match="dtype"):
        nf4_dequantize(**w.kernel_args(), dtype=torch.int8)
    with pytest.raises(ValueError, match="blocksize"):
        nf4_dequantize(**{**w.kernel_args(), "blocksize": 63}, dtype=torch.float32)
    with pytest.raises(ValueError, match="out"):
        nf4_dequantize(**w.kernel_args(), dtype=torch.float32, out=torch.empty(8, 64, dtype=torch.float16))


# ------------------------------------------------------------------ the container
def test_container_buffers_roundtrip_and_nbytes():
    w = _random_nf4(64, 256, dtype=torch.bfloat16, nested=True)
    bufs = w.buffers()
    assert set(bufs) == {"packed", "code", "absmax", "absmax_code", "absmax_scale", "absmax_offset"}
    assert all(type(t) is torch.Tensor for t in bufs.values())
    w2 = NF4Weight.from_buffers(bufs, **w.meta())
    assert torch.equal(w2.dequantize(), w.dequantize())
    # 8192 bytes of codes + 64 fp32 code book + 256 uint8 indices + 1 fp32 factor + 256 fp32 code book + offset
    assert w.nbytes == 8192 + 64 + 256 + 4 + 1024 + 4
    assert w.dense_nbytes == 64 * 256 * 2
    assert _random_nf4(64, 256).nbytes == 8192 + 64 + 256 * 4
    with pytest.raises(ValueError, match="absmax"):
        NF4Weight(packed=w.packed, code=w.code, absmax=torch.rand(3), shape=(64, 256), dtype=torch.float32)


def test_flatten_roundtrip_and_validation():
    """The op passes an NF4 base through autograd and its custom ops as (packed, state, meta): the round trip gives
    the same weight; a bad field is a ValueError naming it."""
    for nested in (False, True):
        w = _random_nf4(40, 192, dtype=torch.bfloat16, nested=nested, blocksize=128)
        packed, state, meta = w.flatten()
        assert len(state) == 5 and (state[2] is not None) == nested and all(isinstance(m, int) for m in meta)
        w2 = NF4Weight.unflatten(packed, state, meta)
        assert w2.shape == w.shape and w2.dtype == w.dtype and w2.blocksize == 128 and w2.double_quant == nested
        assert torch.equal(w2.dequantize(), w.dequantize())
    w = _random_nf4(8, 64)
    with pytest.raises(ValueError, match="packed"):
        NF4Weight(packed=w.packed[:-1], code=w.code, absmax=w.absmax, shape=(8, 64), dtype=torch.float32)
    with pytest.raises(ValueError, match="dtype"):
        NF4Weight(packed=w.packed, code=w.code, absmax=w.absmax, shape=(8, 64), dtype=torch.int8)
    with pytest.raises(ValueError, match="blocksize"):
        NF4Weight(packed=w.packed, code=w.code, absmax=w.absmax, shape=(8, 64), dtype=torch.float32, blocksize=63)
    with pytest.raises(ValueError, match="absmax_offset"):
        NF4Weight(packed=w.packed, code=w.code, absmax=w.absmax.to(torch.uint8), shape=(8, 64), dtype=torch.float32,
                  absmax_code=torch.randn(256), absmax_scale=torch.ones(1), absmax_offset=torch.zeros(1))
    with pytest.raises(ValueError, match="several devices"):
        NF4Weight(packed=w.packed, code=w.code.to("meta"), absmax=w.absmax, shape=(8, 64), dtype=torch.float32)


# ------------------------------------------------------------------ the backends' dequantizers
def _cpp_dequantize():
    if not pyflex.cpp_available():
        pytest.skip("pyflex._C is not built")
    return backends.REGISTRY["cpp"].implementation().dequantize


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "double-quant"])
def test_cpp_dequantize_equals_reference(nested):
    """The C++ loop (OpenMP over scale blocks, 16 outputs per block then lookups) gives the reference's bits in every
    dtype, on aligned shapes, blocks crossing rows, an odd element count and a partial last block."""
    dequantize = _cpp_dequantize()
    for seed, (n, k, bs) in enumerate(((64, 128, 64), (96, 80, 64), (5, 13, 64), (3, 1000, 128), (7, 9, 2),
                                       (257, 512, 64))):
        w = _random_nf4(n, k, nested=nested, blocksize=bs, seed=seed)
        for dtype in DTYPES + [torch.float64]:
            out = dequantize(w, dtype)
            assert out.shape == (n, k) and out.dtype == dtype
            assert torch.equal(out, w.dequantize(dtype)), (n, k, bs, dtype)


def test_cpp_dequantize_equals_bnb():
    bnb = pytest.importorskip("bitsandbytes")
    dequantize = _cpp_dequantize()
    for dtype, nested, storage in ((torch.bfloat16, True, torch.bfloat16), (torch.float16, False, torch.uint8)):
        m = _linear4bit(bnb, 128, 192, dtype=dtype, nested=nested, storage=storage)
        w = from_bnb_linear4bit(m, NAME)
        assert torch.equal(dequantize(w, dtype), bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state))


def test_cpp_dequantize_checks_arguments():
    _cpp_dequantize()
    C = backends.load_cpp_module()
    w = _random_nf4(8, 64)
    out = torch.empty(8, 64)
    with pytest.raises(ValueError, match="packed"):
        C.nf4_dequantize(w.packed[:10], w.code, w.absmax, None, None, None, 64, 256, out)
    with pytest.raises(ValueError, match="blocksize"):
        C.nf4_dequantize(w.packed, w.code, w.absmax, None, None, None, 63, 256, out)
    with pytest.raises(ValueError, match="absmax"):
        C.nf4_dequantize(w.packed, w.code, w.absmax.to(torch.uint8), None, None, None, 64, 256, out)
    with pytest.raises(ValueError, match="out"):
        C.nf4_dequantize(w.packed, w.code, w.absmax, None, None, None, 64, 256, out.t())
    with pytest.raises(ValueError, match="absmax_scale"):
        C.nf4_dequantize(w.packed, w.code, w.absmax.to(torch.uint8), torch.randn(256), None, torch.tensor(0.0), 64,
                         256, out)
