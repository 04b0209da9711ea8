"""pyflex.fuse_model_ops: liger-kernel's RMSNorm / SwiGLU / fused linear cross-entropy on a pyflex-patched model.

Under the Triton interpreter (CPU, triton 3.9) liger's fused linear cross-entropy runs, but its RMSNorm, SwiGLU and
GeGLU kernels do not (float scalar arguments, libdevice), nor does soft-capped cross-entropy (Gemma2). So on CPU:
  * the real fused linear cross-entropy is compared with HF's loss and adapter gradients;
  * the composition of everything (liger's rebound forwards calling pyflex's FlexLinear projections, either patch
    order) is checked with liger's RMSNorm / SiLU-mul / GELU-mul autograd Functions replaced by their torch
    definitions (`reference_kernels`): that tests the patching, not the kernels.
The real RMSNorm / SwiGLU / GeGLU kernels are compared in the `gpu` tests (skipped without CUDA).
"""
import copy
import inspect
import sys

import pytest
import torch
import torch.nn.functional as F

import pyflex
import pyflex.model.patch
from pyflex import fuse_model_ops, fused_ops
from pyflex.layers import gated_mlp
from pyflex.integrations.liger import _interpreter_error, fused_ops_families
from tiny_models import assert_close, reference_backend, single_thread, tiny_model, tokens  # noqa: F401

liger_kernel = pytest.importorskip("liger_kernel")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3")
ORDERS = ("fuse_first", "patch_first")
ALL = dict(rms_norm=True, swiglu=True, cross_entropy=True)


@pytest.fixture
def reference_kernels(monkeypatch):
    """liger's elementwise/norm autograd Functions → their torch definitions (same math as the HF modules)."""
    from liger_kernel.ops import LigerGELUMulFunction, LigerRMSNormFunction, LigerSiLUMulFunction

    def rms_norm(X, W, eps, offset=0.0, casting_mode="llama", in_place=True, row_mode=None):
        y = X.float() * torch.rsqrt(X.float().pow(2).mean(-1, keepdim=True) + eps)
        if casting_mode == "gemma":
            return (y * (offset + W.float())).to(X.dtype)
        return (offset + W) * y.to(X.dtype)

    def silu_mul(a, b, gate_multiplier=1.0, down_multiplier=1.0):
        assert gate_multiplier == 1.0 and down_multiplier == 1.0
        return F.silu(a) * b

    monkeypatch.setattr(LigerRMSNormFunction, "apply", staticmethod(rms_norm))
    monkeypatch.setattr(LigerSiLUMulFunction, "apply", staticmethod(silu_mul))
    monkeypatch.setattr(LigerGELUMulFunction, "apply", staticmethod(lambda a, b: F.gelu(a, approximate="tanh") * b))


def _ce_runs_here(family):
    # Gemma2's soft-capped fused CE does not run under the interpreter (see the module docstring).
    return CUDA or family != "gemma2"


def _pair(family, order, ops, r=4):
    """(reference: pyflex LoRA on stock HF modules, fused: the same LoRA + fuse_model_ops in `order`), same weights."""
    base = tiny_model(family, layers=2).to(DEVICE)
    ref = pyflex.patch_model(copy.deepcopy(base), r=r, alpha=2 * r)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # nonzero B so the adapters change the output
        for p in ref.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    fused = copy.deepcopy(base)
    if order == "fuse_first":
        pyflex.patch_model(fuse_model_ops(fused, **ops), r=r, alpha=2 * r)
    else:
        fuse_model_ops(pyflex.patch_model(fused, r=r, alpha=2 * r), **ops)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def _check_step(ref, fused, atol=2e-5, rtol=1e-4):
    """Training-mode loss and adapter gradients, then eval-mode logits, fused vs reference."""
    ids = tokens(2, 8).to(DEVICE)
    ref.train(), fused.train()
    out_r, out_f = ref(input_ids=ids, labels=ids), fused(input_ids=ids, labels=ids)
    if fused_ops(fused)["cross_entropy"]:
        assert out_f.logits is None  # fused linear CE: the logits are never built
    assert_close(out_f.loss, out_r.loss, atol=atol, rtol=rtol)
    out_r.loss.backward()
    out_f.loss.backward()
    grads_r = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    grads_f = {n: p.grad for n, p in fused.named_parameters() if p.requires_grad}
    assert grads_f.keys() == grads_r.keys() and any("mlp" in n for n in grads_f)
    for name in grads_r:
        assert grads_f[name] is not None and grads_f[name].abs().sum() > 0, name
        assert_close(grads_f[name], grads_r[name], atol=atol, rtol=rtol, msg=name)
    ref.eval(), fused.eval()
    with torch.no_grad():
        assert_close(fused(input_ids=ids).logits, ref(input_ids=ids).logits, atol=atol, rtol=rtol)
    return ids


def _lora_matters(model, ids):
    """The fused model's loss moves when the MLP adapters are zeroed: liger's MLP forward goes through FlexLinear."""
    model.train()
    with torch.no_grad():
        before = model(input_ids=ids, labels=ids).loss
        for name, module in model.named_modules():
            if isinstance(module, pyflex.FlexLinear) and ".mlp." in name:
                module.lora_B.zero_()
        after = model(input_ids=ids, labels=ids).loss
    assert (before - after).abs() > 1e-4


# --- real liger kernels that run everywhere (CPU: Triton interpreter) ----------------------------------------------

@pytest.mark.parametrize("order", ORDERS)
def test_fused_linear_cross_entropy_matches_hf(order):
    ref, fused = _pair("llama", order, dict(rms_norm=False, swiglu=False, cross_entropy=True))
    assert fused_ops(fused) == {"family": "llama", "rms_norm": False, "swiglu": False, "mlp": None,
                                "cross_entropy": "fused_linear", "rope": False,
                                "liger_kernel": fused_ops(fused)["liger_kernel"]}
    _check_step(ref, fused)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in ("llama", "gemma2")])
def test_fused_linear_cross_entropy_families(family):
    ref, fused = _pair(family, "fuse_first", dict(rms_norm=False, swiglu=False, cross_entropy=True))
    _check_step(ref, fused)


# --- composition with pyflex, all ops, liger's norm/activation Functions as torch math -----------------------------

@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("family", FAMILIES)
def test_composition_either_order(family, order, reference_kernels):
    from liger_kernel.transformers.geglu import LigerGEGLUMLP
    from liger_kernel.transformers.rms_norm import LigerRMSNorm
    from liger_kernel.transformers.swiglu import LigerPhi3SwiGLUMLP, LigerSwiGLUMLP

    ops = dict(ALL, cross_entropy=_ce_runs_here(family))
    ref, fused = _pair(family, order, ops)
    mlp_forward = {"gemma2": LigerGEGLUMLP, "phi3": LigerPhi3SwiGLUMLP}.get(family, LigerSwiGLUMLP).forward
    for layer in fused.model.layers:
        # pyflex's memory-light MLP forward (patch_model's recompute_mlp) running liger's fused activation, in
        # either order; liger's own MLP forward is what unpatch restores
        assert layer.mlp.forward.__func__ is gated_mlp._gated_forward
        assert layer.mlp._pyflex_previous_forward.__func__ is mlp_forward
        assert layer.input_layernorm.forward.__func__ is LigerRMSNorm.forward
        projections = ("gate_up_proj", "down_proj") if family == "phi3" else ("gate_proj", "up_proj", "down_proj")
        assert all(isinstance(getattr(layer.mlp, p), pyflex.FlexLinear) for p in projections)
    assert fused.model.norm.forward.__func__ is LigerRMSNorm.forward
    record = fused_ops(fused)
    assert record["family"] == family and record["rms_norm"] and record["swiglu"]
    assert record["mlp"] == ("geglu" if family == "gemma2" else "swiglu")
    ids = _check_step(ref, fused)
    _lora_matters(fused, ids)


def _liger_names(module):
    return {k for k, v in vars(module).items() if getattr(v, "__module__", "").startswith("liger_kernel")}


@pytest.mark.parametrize("family", FAMILIES)
def test_only_the_instance_changes(family, reference_kernels):
    """liger's apply_* also swaps module-level classes/functions; fuse_model_ops must leave them as they were."""
    import importlib

    from transformers import AutoModelForCausalLM
    modeling = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    before, ce_before = dict(vars(modeling)), F.cross_entropy
    fused = fuse_model_ops(tiny_model(family, layers=2).to(DEVICE), **dict(ALL, cross_entropy=_ce_runs_here(family)))
    assert _liger_names(modeling) == set()
    assert {k for k, v in vars(modeling).items() if before.get(k) is not v} == set()
    assert F.cross_entropy is ce_before
    fresh = AutoModelForCausalLM.from_config(fused.config)
    assert "forward" not in vars(fresh) and "forward" not in vars(fresh.model.norm)
    assert type(fresh.model.layers[0].mlp).__module__ == modeling.__name__
    if family != "llama":
        return
    # HF Trainer reads forward's signature to pick dataset columns; deepcopy rebinds the forward to the copy.
    assert {"input_ids", "labels", "attention_mask"} <= set(inspect.signature(fused.forward).parameters)
    twin = copy.deepcopy(fused)
    assert twin.forward.__self__ is twin and twin.model.layers[0].mlp.forward.__self__ is twin.model.layers[0].mlp


def test_rope_is_process_wide_and_opt_in(monkeypatch):
    from liger_kernel.transformers.rope import liger_rotary_pos_emb
    from transformers.models.llama import modeling_llama
    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", modeling_llama.apply_rotary_pos_emb)  # undo after
    ref = pyflex.patch_model(tiny_model("llama", layers=2).to(DEVICE), r=4, alpha=8)
    fused = copy.deepcopy(ref)
    ids = tokens(2, 8).to(DEVICE)
    with torch.no_grad():
        expected = ref(input_ids=ids).logits
    with pytest.warns(UserWarning, match="every llama model in this process"):
        fused = fuse_model_ops(fused, rms_norm=False, swiglu=False, cross_entropy=True, rope=True)
    assert modeling_llama.apply_rotary_pos_emb is liger_rotary_pos_emb and fused_ops(fused)["rope"]
    with torch.no_grad():
        assert_close(fused(input_ids=ids).logits, expected)


def test_unpatch_and_merge_keep_the_fusion(reference_kernels):
    base = tiny_model("llama", layers=2).to(DEVICE)
    fused = pyflex.patch_model(fuse_model_ops(copy.deepcopy(base), **ALL), r=4, alpha=8)
    pyflex.unpatch(fused)
    assert not any(isinstance(m, pyflex.FlexLinear) for m in fused.modules())
    assert fused_ops(fused)["rms_norm"] and not pyflex.model.patch.is_patched(fused)
    ids = tokens(2, 8).to(DEVICE)
    with torch.no_grad():
        assert_close(fused(input_ids=ids).logits, base(input_ids=ids).logits)
    pyflex.merge(pyflex.patch_model(fused, r=4, alpha=8))  # patch again after fusing, then merge
    assert fused_ops(fused)["swiglu"]


def test_lora_on_lm_head_is_refused(reference_kernels):
    model = pyflex.patch_model(tiny_model("llama", layers=2).to(DEVICE), r=4, target_modules=["q_proj", "lm_head"])
    with pytest.raises(ValueError, match="lm_head.*cross_entropy=False"):
        fuse_model_ops(model)
    fuse_model_ops(model, cross_entropy=False)  # the rest is fine
    model = fuse_model_ops(tiny_model("llama", layers=2).to(DEVICE), **ALL)
    pyflex.patch_model(model, r=4, target_modules=["q_proj", "lm_head"])
    ids = tokens(2, 8).to(DEVICE)
    with pytest.raises(RuntimeError, match="lm_head is patched by pyflex"):
        model(input_ids=ids, labels=ids)


def test_base_model_without_lm_head(reference_kernels):
    from transformers import LlamaModel
    from tiny_models import tiny_config
    model = LlamaModel(tiny_config("llama", 2)).to(DEVICE)
    with pytest.warns(UserWarning, match="not a \\*ForCausalLM"):
        fuse_model_ops(model)
    assert fused_ops(model)["cross_entropy"] is None and fused_ops(model)["rms_norm"]
    with pytest.raises(RuntimeError, match="already fused"):
        fuse_model_ops(model)


# --- errors ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_unsupported_family(family):
    with pytest.raises(ValueError, match="supported: gemma2, llama, mistral, phi3, qwen2, qwen3"):
        fuse_model_ops(tiny_model(family, layers=1))
    assert fused_ops_families() == ("gemma2", "llama", "mistral", "phi3", "qwen2", "qwen3")


def test_missing_liger(monkeypatch):
    for name in [n for n in sys.modules if n == "liger_kernel" or n.startswith("liger_kernel.")]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match="pip install liger-kernel"):
        fuse_model_ops(tiny_model("llama", layers=1))


def test_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    model = tiny_model("llama", layers=1)
    with pytest.raises(RuntimeError, match="needs the model on a CUDA device.*on cpu"):
        fuse_model_ops(model)
    assert not fused_ops(model) and "forward" not in vars(model)


@pytest.mark.skipif(CUDA, reason="the interpreter probe only runs for CPU models")
def test_kernels_the_interpreter_cannot_run_are_refused_at_fuse_time():
    if _interpreter_error("rms_norm") is None:
        pytest.skip("this triton's interpreter runs liger's RMSNorm")
    model = tiny_model("llama", layers=1)
    with pytest.raises(RuntimeError, match="rms_norm kernel does not run under the Triton interpreter.*rms_norm=False"):
        fuse_model_ops(model)
    assert not fused_ops(model) and "forward" not in vars(model.model.norm)


# --- real kernels, all ops: needs CUDA -------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="liger's RMSNorm/SwiGLU/GeGLU kernels do not run in the Triton interpreter")
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("family", FAMILIES)
def test_real_kernels_match_hf_gpu(family, order):
    ref, fused = _pair(family, order, ALL)
    ids = _check_step(ref, fused, atol=1e-4, rtol=1e-3)
    _lora_matters(fused, ids)
