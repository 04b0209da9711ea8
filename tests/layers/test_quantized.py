"""4-bit bases in the layer (pyflex/layers/quantized.py): reading bitsandbytes Linear4bit and torchao NF4 weights, what
is refused (by module name), and QuantizedFlexLinear against "dequantize, then the dense FlexLinear".

Everything stays on CPU. K is a multiple of 64 wherever bitsandbytes' C dequantize is the baseline (its CPU kernel is
wrong otherwise), and no bitsandbytes forward runs in eval mode (on AVX512-BF16 CPUs that repacks the weight in place).
"""
import copy

import pytest
import torch
from torch import nn

import pyflex
from pyflex import FlexLinear
from pyflex.layers.quantized import (QuantizedFlexLinear, UnsupportedQuantizedWeight, flex_linear_for,
                                     from_bnb_linear4bit, from_torchao_nf4, nf4_weight_of)
from pyflex.lora.nf4 import NF4Weight

NAME = "model.layers.1.mlp.up_proj"


def _linear4bit(bnb, n, k, *, dtype=torch.float32, nested=False, storage=torch.uint8, quant_type="nf4", seed=0,
                quantize=True, bias=False, compute_dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    m = bnb.nn.Linear4bit(k, n, bias=bias, compute_dtype=compute_dtype, compress_statistics=nested,
                          quant_type=quant_type, quant_storage=storage)
    m.weight = bnb.nn.Params4bit(torch.randn(n, k, generator=g).to(dtype), requires_grad=False,
                                 compress_statistics=nested, quant_type=quant_type, quant_storage=storage, module=m)
    if bias:
        m.bias = nn.Parameter(torch.randn(n, generator=g).to(dtype))
    return m.to("cpu").train() if quantize else m      # Params4bit quantizes on its first move to a device


def _tiny_llama_dir(tmp_path, layers=2):
    transformers = pytest.importorskip("transformers")
    conf = transformers.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                                    num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                    max_position_embeddings=32)
    transformers.LlamaForCausalLM(conf).save_pretrained(tmp_path)
    return tmp_path


# ------------------------------------------------------------------ readers
def test_from_pretrained_4bit_llama(tmp_path):
    """A saved tiny Llama reloaded with BitsAndBytesConfig(nf4) on CPU: every Linear4bit reads back bit-exactly."""
    bnb = pytest.importorskip("bitsandbytes")
    transformers = pytest.importorskip("transformers")
    path = _tiny_llama_dir(tmp_path)
    for nested, storage in ((False, torch.uint8), (True, torch.bfloat16)):
        cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                              bnb_4bit_compute_dtype=torch.float32, bnb_4bit_use_double_quant=nested,
                                              bnb_4bit_quant_storage=storage)
        model = transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg, device_map="cpu")
        mods = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
        assert len(mods) == 14
        for name, m in mods.items():
            w = nf4_weight_of(m, name)
            assert w.double_quant == nested and w.source == name
            assert torch.equal(w.dequantize(), bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state))
            assert w.packed.untyped_storage().data_ptr() == m.weight.untyped_storage().data_ptr()   # no copy
        assert nf4_weight_of(model.lm_head, "lm_head") is None      # dense layers: None


def test_fp4_is_a_clear_error():
    bnb = pytest.importorskip("bitsandbytes")
    m = _linear4bit(bnb, 64, 128, quant_type="fp4")
    with pytest.raises(UnsupportedQuantizedWeight, match="quant_type='fp4'") as e:
        from_bnb_linear4bit(m, NAME)
    assert NAME in str(e.value) and "nf4" in str(e.value)
    with pytest.raises(TypeError, match=NAME):                     # patch_model's error type
        flex_linear_for(m, NAME, r=4)


def test_cpu_repacked_weight_is_a_clear_error():
    bnb = pytest.importorskip("bitsandbytes")
    convert = getattr(bnb.functional, "_convert_weight_packed_for_cpu", None)
    for nested in (False, True):
        m = _linear4bit(bnb, 64, 128, nested=nested)
        if convert is not None:   # what an eval-mode forward with a no-grad input does on AVX512-BF16 CPUs
            m.weight.data, m.weight.quant_state = convert(m.weight.data, m.weight.quant_state)
        else:
            m.weight.quant_state.packing_format_for_cpu = True
        with pytest.raises(UnsupportedQuantizedWeight, match="repacked") as e:
            flex_linear_for(m, NAME, r=4)
        assert NAME in str(e.value) and "packing_format_for_cpu" in str(e.value)


def test_unquantized_linear4bit_is_a_clear_error():
    bnb = pytest.importorskip("bitsandbytes")
    m = _linear4bit(bnb, 64, 128, quantize=False)
    with pytest.raises(UnsupportedQuantizedWeight, match="not quantized yet") as e:
        from_bnb_linear4bit(m, NAME)
    assert NAME in str(e.value)


class _OddTensor(torch.Tensor):
    """A tensor subclass pyflex knows nothing about."""


def test_unknown_tensor_subclass_is_a_clear_error():
    lin = nn.Linear(64, 32, bias=False)
    lin.weight = nn.Parameter(torch.randn(32, 64).as_subclass(_OddTensor), requires_grad=False)
    with pytest.raises(UnsupportedQuantizedWeight, match="subclass") as e:
        nf4_weight_of(lin, NAME)
    assert NAME in str(e.value) and "_OddTensor" in str(e.value)
    with pytest.raises(UnsupportedQuantizedWeight, match=NAME):
        flex_linear_for(lin, NAME, r=4)
    with pytest.raises(TypeError, match="plain dense"):            # FlexLinear itself refuses it too
        FlexLinear(lin, r=4)
    with pytest.raises(UnsupportedQuantizedWeight, match="not a bitsandbytes Linear4bit"):
        from_bnb_linear4bit(nn.Linear(64, 32), NAME)
    assert nf4_weight_of(nn.Linear(64, 32), NAME) is None
    assert type(flex_linear_for(nn.Linear(64, 32), NAME, r=4)) is FlexLinear


def test_torchao_nf4_converts_bit_exactly():
    pytest.importorskip("torchao")
    try:
        from torchao.quantization import to_nf4
    except ImportError:
        from torchao.dtypes.nf4tensor import to_nf4
    for dtype in (torch.bfloat16, torch.float32):
        t = to_nf4(torch.randn(128, 256, dtype=dtype))
        lin = nn.Linear(256, 128, bias=False)
        lin.weight = nn.Parameter(t, requires_grad=False)
        w = nf4_weight_of(lin, NAME)
        assert w.shape == (128, 256) and w.dtype == dtype and not w.double_quant
        assert torch.equal(w.dequantize(), t.get_original_weight())
        assert torch.equal(from_torchao_nf4(t, NAME).dequantize(), t.get_original_weight())
        layer = flex_linear_for(lin, NAME, r=4)                     # the layer runs the op on it
        assert isinstance(layer, QuantizedFlexLinear) and layer.compute_dtype == dtype
        x = torch.randn(3, 256, dtype=dtype)
        assert torch.equal(layer(x), nn.functional.linear(x, t.get_original_weight()))   # lora_B = 0


# ------------------------------------------------------------------ QuantizedFlexLinear
def _dense_twin(layer: QuantizedFlexLinear, bias):
    """A dense FlexLinear on the dequantized weight (in the compute dtype) with the same adapters."""
    w = layer.nf4_weight.dequantize(layer.compute_dtype)
    base = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, dtype=layer.compute_dtype)
    with torch.no_grad():
        base.weight.copy_(w)
        if bias is not None:
            base.bias.copy_(bias.to(layer.compute_dtype))
    twin = FlexLinear(base, r=layer.r, alpha=layer.alpha, adapter_dtype=layer.lora_A.dtype)
    with torch.no_grad():
        twin.lora_A.copy_(layer.lora_A)
        twin.lora_B.copy_(layer.lora_B)
    twin.weight.requires_grad_(False)
    return twin


@pytest.mark.parametrize("wdtype,compute", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                            (torch.bfloat16, torch.float32)], ids=["fp32", "bf16", "bf16-fp32compute"])
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "double-quant"])
def test_equals_dense_flexlinear_on_the_dequantized_weight(wdtype, compute, nested):
    """Output and every gradient equal, bit for bit, a dense FlexLinear holding dequantize(W0) in the compute dtype
    (x cast to it, y cast back to x's dtype, as bitsandbytes does)."""
    bnb = pytest.importorskip("bitsandbytes")
    m = _linear4bit(bnb, 96, 128, dtype=wdtype, nested=nested, bias=True, compute_dtype=compute)
    layer = flex_linear_for(m, NAME, r=4, alpha=8)
    assert isinstance(layer, QuantizedFlexLinear) and layer.compute_dtype == compute
    assert layer.lora_A.dtype == torch.float32                      # fp32 master adapters, as PEFT
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
    twin = _dense_twin(layer, m.bias)
    x = torch.randn(2, 7, 128, dtype=wdtype)
    x1, x2 = x.clone().requires_grad_(), x.to(compute).requires_grad_()
    y = layer(x1)
    y_twin = twin(x2)
    assert y.dtype == wdtype
    assert torch.equal(y, y_twin.to(wdtype))
    gy = torch.randn_like(y)
    y.backward(gy)
    y_twin.backward(gy.to(compute))
    assert torch.equal(x1.grad, x2.grad.to(wdtype))
    assert torch.equal(layer.lora_A.grad, twin.lora_A.grad) and torch.equal(layer.lora_B.grad, twin.lora_B.grad)
    assert torch.equal(m.bias.grad, twin.bias.grad.to(m.bias.dtype))   # the layer's bias is the module's own


def test_buffers_survive_dtype_casts_and_moves():
    """The fp32 code book and scales are int32 views: model.to(bf16) / .half() leave the base exact; a move rebuilds
    the cached NF4Weight."""
    bnb = pytest.importorskip("bitsandbytes")
    m = _linear4bit(bnb, 64, 128, nested=True)
    layer = flex_linear_for(m, NAME, r=4)
    want = layer.nf4_weight.dequantize()
    names = {n for n, _ in layer.named_buffers()}
    assert names == {"nf4_packed", "nf4_code", "nf4_absmax", "nf4_absmax_code", "nf4_absmax_scale",
                     "nf4_absmax_offset"}
    assert {layer.get_buffer(n).dtype for n in names} == {torch.uint8, torch.int32}
    assert set(layer.state_dict()) == names | {"lora_A", "lora_B"}
    layer.to(torch.bfloat16)
    layer.half()
    assert layer.lora_A.dtype == torch.float16                      # adapters cast as usual
    assert torch.equal(layer.nf4_weight.dequantize(), want)
    layer.to("cpu", torch.float32)
    old = layer.nf4_weight
    layer._apply(lambda t: t.clone())                               # new buffer tensors, as a device move makes
    assert layer.nf4_weight is not old and torch.equal(layer.nf4_weight.dequantize(), want)
    clone = copy.deepcopy(layer)
    assert torch.equal(clone.nf4_weight.dequantize(), want)


def test_adapter_off_gives_the_base_exactly_and_merge_is_refused():
    bnb = pytest.importorskip("bitsandbytes")
    m = _linear4bit(bnb, 64, 128, bias=True)
    layer = flex_linear_for(m, NAME, r=4)
    with torch.no_grad():
        layer.lora_A.fill_(float("nan"))                            # even a diverged adapter is ignored when off
    layer.adapter_enabled = False
    x = torch.randn(5, 128, requires_grad=True)
    y = layer(x)
    w = bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state)
    assert torch.equal(y, nn.functional.linear(x.detach(), w, m.bias.detach()))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(5, 64) @ w)
    with pytest.raises(RuntimeError, match="4-bit"):
        layer.merge()
    with pytest.raises(RuntimeError, match="cannot train"):
        layer.base_trainable = True
    assert layer.base_trainable is False
    assert layer.weight is m.weight                                  # the module's own 4-bit weight
    assert "base=nf4" in repr(layer)


def test_quantized_layer_needs_a_quantized_base():
    with pytest.raises(TypeError, match="dense weight"):
        QuantizedFlexLinear(nn.Linear(8, 8), name=NAME, r=2)
    bnb = pytest.importorskip("bitsandbytes")
    with pytest.raises(ValueError, match="r=0"):                    # FlexLinear's own checks still run
        QuantizedFlexLinear(_linear4bit(bnb, 64, 128), name=NAME, r=0)


def test_pyflex_runs_without_bitsandbytes_and_torchao():
    """Neither library is imported by pyflex: with both unimportable, import pyflex and the dense path work."""
    import subprocess
    import sys
    code = ("import sys; sys.modules['bitsandbytes'] = None; sys.modules['torchao'] = None\n"
            "import torch, pyflex\n"
            "from pyflex.layers.quantized import flex_linear_for, nf4_weight_of\n"
            "layer = flex_linear_for(torch.nn.Linear(8, 8), 'proj', r=2)\n"
            "assert type(layer) is pyflex.FlexLinear and nf4_weight_of(torch.nn.Linear(8, 8)) is None\n"
            "layer(torch.randn(3, 8)).sum().backward()\n"
            "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]
