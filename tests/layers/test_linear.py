"""FlexLinear against hand-written formulas (reference backend)."""
import math

import pytest
import torch
from torch import nn

import pyflex
import pyflex.lora.tau
from pyflex import FlexLinear
from tiny_models import assert_close, reference_backend, single_thread  # noqa: F401

Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D


def _randomize(layer, std=0.3):
    with torch.no_grad():
        layer.lora_A.normal_(0, std)
        layer.lora_B.normal_(0, std)


def _manual(x, weight_nk, bias, layer, coef=None, beta=1.0):
    y = x @ weight_nk.t() + (0 if bias is None else bias)
    d = (x @ layer.lora_A.t()) @ layer.lora_B.t() * layer.scaling * beta
    if coef is not None:
        d = d * coef[..., None]
    return y + d


def test_wraps_linear_in_place():
    base = nn.Linear(12, 10)
    layer = FlexLinear(base, r=4, alpha=8)
    assert layer.weight is base.weight and layer.bias is base.bias and layer.base_module is base
    assert list(dict(layer.named_parameters())) == ["weight", "bias", "lora_A", "lora_B"]
    assert layer.lora_A.shape == (4, 12) and layer.lora_B.shape == (10, 4)
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0
    bound = 1 / math.sqrt(12)  # kaiming_uniform(a=√5) on (r, in) gives U(-1/√in, 1/√in)
    assert layer.lora_A.abs().max() <= bound
    assert layer.scaling == 2.0 and layer.tau is None
    x = torch.randn(2, 5, 12)
    assert_close(layer(x), base(x))
    _randomize(layer)
    assert_close(layer(x), _manual(x, base.weight, base.bias, layer))
    assert "r=4" in repr(layer) and "scaling=2" in repr(layer)


def test_rslora_scaling():
    layer = FlexLinear(nn.Linear(8, 8), r=16, alpha=8, rslora=True)
    assert layer.scaling == pytest.approx(8 / 4)
    assert "rslora=True" in layer.extra_repr()


def test_conv1d_forward_and_grads():
    base = Conv1D(10, 12)  # nf=10 outputs, nx=12 inputs; weight (12, 10)
    with torch.no_grad():
        base.bias.normal_()
    layer = FlexLinear(base, r=3, alpha=6)
    assert layer.conv1d and layer.weight is base.weight and layer.in_features == 12 and layer.out_features == 10
    _randomize(layer)
    x = torch.randn(4, 12, requires_grad=True)
    y = layer(x)
    assert_close(y, _manual(x, base.weight.t(), base.bias, layer))
    gy = torch.randn_like(y)
    y.backward(gy)
    A = layer.lora_A.detach().requires_grad_()
    B = layer.lora_B.detach().requires_grad_()
    x2 = x.detach().requires_grad_()
    ref = base(x2) + (x2 @ A.t()) @ B.t() * layer.scaling
    ref.backward(gy)
    assert_close(layer.lora_A.grad, A.grad)
    assert_close(layer.lora_B.grad, B.grad)
    assert_close(x.grad, x2.grad)


@pytest.mark.parametrize("conv", [False, True])
def test_base_trainable_computes_weight_grad(conv):
    base = Conv1D(6, 5) if conv else nn.Linear(5, 6)
    layer = FlexLinear(base, r=2)
    _randomize(layer)
    assert layer.base_trainable  # a fresh module's weight requires grad
    x = torch.randn(3, 5)
    layer(x).sum().backward()
    expected = torch.ones(3, 6).t() @ x  # (out, in)
    assert_close(layer.weight.grad, expected.t() if conv else expected)
    layer.base_trainable = False
    assert layer.weight.grad is None and not layer.weight.requires_grad and not layer.bias.requires_grad


def test_response_scale_gate_and_disable():
    base = nn.Linear(8, 6)
    layer = FlexLinear(base, r=2, alpha=2)
    _randomize(layer)
    x = torch.randn(2, 3, 8)
    layer.response_scale = 0.25
    assert_close(layer(x), _manual(x, base.weight, base.bias, layer, beta=0.25))
    layer.response_scale = 1.0

    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 1)

        def forward(self, inp):
            return torch.sigmoid(self.proj(inp)).squeeze(-1)

    layer.gate = Gate()
    assert "gate.proj.weight" in dict(layer.named_parameters())
    assert any(p is layer.gate.proj.weight for p in layer.adapter_parameters())
    coef = layer.gate(x)
    y = layer(x)
    assert_close(y, _manual(x, base.weight, base.bias, layer, coef=coef))
    y.sum().backward()
    assert layer.gate.proj.weight.grad is not None and layer.gate.proj.weight.grad.abs().sum() > 0
    layer.adapter_enabled = False
    assert_close(layer(x), base(x))


def test_tau_mask_records_sparsity():
    base = nn.Linear(8, 6)
    layer = FlexLinear(base, r=2, tau=True, tau0=0.0, lam=1e-3)
    assert isinstance(layer.tau, nn.Parameter) and pyflex.lora.tau.is_tau(layer.tau) and layer.tau.dim() == 0
    _randomize(layer)
    x = torch.randn(4, 8)
    y = layer(x)
    assert layer.last_mask.dtype == torch.bool and layer.last_mask.shape == (4,)
    assert layer.last_sparsity == 0.0
    y.sum().backward()
    assert layer.tau.grad is not None
    with torch.no_grad():
        layer.tau.fill_(1e9)
    assert_close(layer(x), base(x))
    assert layer.last_sparsity == 1.0
    assert "tau=on" in layer.extra_repr()


@pytest.mark.parametrize("conv", [False, True])
def test_merge_unmerge(conv):
    base = Conv1D(6, 5) if conv else nn.Linear(5, 6)
    layer = FlexLinear(base, r=2, alpha=4)
    _randomize(layer)
    layer.response_scale = 0.5
    x = torch.randn(3, 5)
    ref = layer(x).detach()
    w0 = base.weight.detach().clone()
    layer.merge()
    assert layer.merged and not torch.equal(base.weight, w0)
    assert_close(layer(x), ref)
    assert_close(base(x), ref)  # the base module itself now carries the delta
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.unmerge()
    assert_close(base.weight.detach(), w0, atol=1e-6, rtol=0)
    assert_close(layer(x), ref)


def test_merge_refused_with_tau():
    layer = FlexLinear(nn.Linear(4, 4), tau=True)
    with pytest.raises(RuntimeError, match="τ mask"):
        layer.merge()


def test_fp32_adapters_on_bf16_base():
    base = nn.Linear(16, 8).to(torch.bfloat16)
    layer = FlexLinear(base, r=4, adapter_dtype=torch.float32)
    assert layer.lora_A.dtype == torch.float32 and layer.weight.dtype == torch.bfloat16
    _randomize(layer)
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and layer.lora_B.grad.abs().sum() > 0
    ref = _manual(x.float(), base.weight.float(), base.bias.float(), layer)
    assert (y.float() - ref).norm() / ref.norm() < 2e-2


def test_autocast_bf16_on_cpu():
    layer = FlexLinear(nn.Linear(16, 8), r=4)
    _randomize(layer)
    x = torch.randn(3, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    ref = layer(x)
    assert (y.float() - ref).norm() / ref.norm() < 2e-2
    y.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32


def test_dropout_only_in_training():
    base = nn.Linear(16, 8)
    layer = FlexLinear(base, r=4, dropout=0.5)
    _randomize(layer)
    x = torch.randn(6, 16)
    layer.eval()
    assert_close(layer(x), _manual(x, base.weight, base.bias, layer))
    layer.train()
    torch.manual_seed(0)
    y_train = layer(x)
    assert not torch.allclose(y_train, _manual(x, base.weight, base.bias, layer))


def test_bad_arguments():
    with pytest.raises(ValueError, match="r=0"):
        FlexLinear(nn.Linear(4, 4), r=0)
    with pytest.raises(ValueError, match="dropout=1.0"):
        FlexLinear(nn.Linear(4, 4), dropout=1.0)
    with pytest.raises(ValueError, match="alpha"):
        FlexLinear(nn.Linear(4, 4), alpha=0)
    with pytest.raises(TypeError, match="nn.Linear or transformers Conv1D"):
        FlexLinear(nn.Conv2d(3, 3, 1))
    class Packed(nn.Linear):  # stands for a quantized subclass with a packed weight
        def __init__(self):
            super().__init__(8, 4)
            self.weight = nn.Parameter(torch.zeros(16, 1, dtype=torch.uint8), requires_grad=False)

    with pytest.raises(TypeError, match="quantized or packed"):
        FlexLinear(Packed())
    layer = FlexLinear(nn.Linear(4, 4))
    with pytest.raises(TypeError, match="already a FlexLinear"):
        FlexLinear(layer)
