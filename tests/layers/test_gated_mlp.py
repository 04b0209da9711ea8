"""Gated-MLP activation memory (pyflex.gated_mlp, patch_model(recompute_mlp=...)): the same numbers as eager,
bitwise, with one or two (tokens × intermediate) tensors fewer kept for backward."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers.activations import ACT2FN

import pyflex
from pyflex.layers import gated_mlp
from pyflex.memory import LiveTensorBytes
from tiny_models import randomize_flex, reference_backend, single_thread, tiny_model, tokens  # noqa: F401 (fixtures)

GATED = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3")


# --------------------------------------------------------------------------------------------------
# the op
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("act_name", ["silu", "gelu_pytorch_tanh", "relu", "gelu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_act_matches_eager_bitwise(act_name, dtype):
    act = ACT2FN[act_name]
    g0 = torch.randn(5, 3, 24, dtype=dtype)
    u0 = torch.randn(5, 3, 24, dtype=dtype)
    dh = torch.randn(5, 3, 24, dtype=dtype)
    g, u = g0.clone().requires_grad_(), u0.clone().requires_grad_()
    h_eager = act(g) * u
    h_eager.backward(dh)
    g2, u2 = g0.clone().requires_grad_(), u0.clone().requires_grad_()
    h = gated_mlp.gated_act(g2, u2, act)
    h.backward(dh)
    assert torch.equal(h, h_eager)
    assert torch.equal(g2.grad, g.grad)
    assert torch.equal(u2.grad, u.grad)


def test_gated_act_saves_only_g_and_u():
    g = torch.randn(4, 8, requires_grad=True)
    u = torch.randn(4, 8, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        gated_mlp.gated_act(g, u, nn.SiLU())
    assert len(saved) == 2 and saved[0] is g and saved[1] is u
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        nn.functional.silu(g) * u   # eager: g, act(g), u
    assert len(saved) == 3


def test_gated_act_grad_of_one_input_only():
    g = torch.randn(4, 8, requires_grad=True)
    u = torch.randn(4, 8)
    gated_mlp.gated_act(g, u, nn.SiLU()).sum().backward()
    g_ref = g.detach().clone().requires_grad_()
    (nn.functional.silu(g_ref) * u).sum().backward()
    assert torch.equal(g.grad, g_ref.grad)


# --------------------------------------------------------------------------------------------------
# patched models: bitwise equal to the eager MLP
# --------------------------------------------------------------------------------------------------
def _train_step(family, recompute_mlp, targets="all-linear", **patch_kwargs):
    model = tiny_model(family, layers=2).train()
    torch.manual_seed(7)
    pyflex.patch_model(model, r=4, alpha=8, target_modules=targets, recompute_mlp=recompute_mlp, **patch_kwargs)
    randomize_flex(model)
    ids = tokens(batch=2, seq=9)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return model, out.logits.detach(), grads


@pytest.mark.parametrize("family", GATED)
def test_recompute_mlp_bitwise_equal_to_eager(family):
    _, logits_off, grads_off = _train_step(family, False)
    model, logits_on, grads_on = _train_step(family, None)
    assert pyflex.get_registry(model).config["recompute_mlp"] is True
    assert all(gated_mlp.has_gated_mlp(layer.mlp) for layer in model.model.layers)
    assert torch.equal(logits_on, logits_off)
    assert grads_on.keys() == grads_off.keys() and len(grads_on) > 0
    for name in grads_off:
        assert torch.equal(grads_on[name], grads_off[name]), name


@pytest.mark.parametrize("kwargs", [dict(tau=True, tau0=0.05), dict(dropout=0.3), dict(targets="attention"),
                                    dict(targets=["down_proj"], rslora=True)])
def test_recompute_mlp_composes(kwargs):
    kwargs = dict(kwargs)
    targets = kwargs.pop("targets", "all-linear")
    torch.manual_seed(11)
    _, logits_off, grads_off = _train_step("llama", False, targets, **kwargs)
    torch.manual_seed(11)
    _, logits_on, grads_on = _train_step("llama", True, targets, **kwargs)
    assert torch.equal(logits_on, logits_off)
    for name in grads_off:
        assert torch.equal(grads_on[name], grads_off[name]), name


@pytest.mark.parametrize("family", ["llama", "gemma2", "phi3"])
def test_recompute_mlp_on_the_triton_backend(family):
    """Triton backend (the interpreter here, CUDA on a GPU): the MLP runs the fused act·mul kernels (SiLU; Gemma2's
    tanh-GELU; Phi-3's gate/up halves of one tensor); the step matches the eager MLP to rounding (fp32)."""
    results = []
    for recompute in (False, True):
        with pyflex.use_backend("triton"):
            results.append(_train_step(family, recompute))
    (_, l0, g0), (_, l1, g1) = results
    torch.testing.assert_close(l1, l0, atol=1e-5, rtol=1e-5)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_recompute_mlp_under_gradient_checkpointing(use_reentrant):
    results = []
    for recompute in (False, True):
        model = tiny_model("llama", layers=2).train()
        torch.manual_seed(7)
        pyflex.patch_model(model, r=4, alpha=8, recompute_mlp=recompute)
        randomize_flex(model)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
        ids = tokens(batch=2, seq=9)
        model(input_ids=ids, labels=ids).loss.backward()
        results.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for name in results[0]:
        assert torch.equal(results[0][name], results[1][name]), name


def test_recompute_mlp_eval_and_generate_unchanged():
    model = tiny_model("llama", layers=2)
    reference = copy.deepcopy(model)
    torch.manual_seed(7)
    pyflex.patch_model(model, r=4, alpha=8)
    ids = tokens(batch=1, seq=5)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)  # B = 0: the base model
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    ref = reference.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(out, ref)


def test_unpatch_restores_the_class_forward():
    model = tiny_model("llama", layers=2)
    pyflex.patch_model(model, r=4)
    assert "forward" in model.model.layers[0].mlp.__dict__
    pyflex.unpatch(model)
    for layer in model.model.layers:
        assert "forward" not in layer.mlp.__dict__ and not gated_mlp.has_gated_mlp(layer.mlp)


def test_deepcopy_of_a_patched_model_uses_its_own_modules():
    model = tiny_model("llama", layers=1)
    pyflex.patch_model(model, r=4)
    twin = copy.deepcopy(model)
    mlp = twin.model.layers[0].mlp
    assert mlp.forward.__self__ is mlp
    calls = []
    mlp.act_fn.register_forward_hook(lambda *args: calls.append(1))
    ids = tokens(batch=1, seq=4)
    twin(input_ids=ids, labels=ids).loss.backward()
    assert calls  # the copy's activation ran, not the original's
    torch.testing.assert_close(twin(input_ids=ids).logits, model(input_ids=ids).logits)


def test_uninstall_restores_a_forward_bound_before():
    model = tiny_model("llama", layers=1)
    mlp = model.model.layers[0].mlp
    sentinel = type(mlp).forward.__get__(mlp)
    mlp.forward = sentinel        # e.g. liger's fused MLP forward, bound on the instance
    gated_mlp.install_gated_mlp(mlp, "split")
    gated_mlp.install_gated_mlp(mlp, "split")  # reinstall keeps what to restore
    gated_mlp.uninstall_gated_mlp(mlp)
    assert mlp.__dict__["forward"] is sentinel


# --------------------------------------------------------------------------------------------------
# memory: what the forward keeps for backward
# --------------------------------------------------------------------------------------------------
def _kept_after_forward(recompute, targets, batch=4, seq=64):
    model = tiny_model("llama", layers=3).train()
    pyflex.patch_model(model, r=4, alpha=8, target_modules=targets, recompute_mlp=recompute)
    ids = tokens(batch=batch, seq=seq)
    with LiveTensorBytes() as mem:
        out = model(input_ids=ids, labels=ids)
        kept = mem.mark()
        out.loss.backward()
    return kept, model


@pytest.mark.parametrize("targets,tensors_saved", [("all-linear", 2), ("attention", 1)])
def test_recompute_mlp_keeps_fewer_tensors(targets, tensors_saved):
    kept_off, model = _kept_after_forward(False, targets)
    kept_on, _ = _kept_after_forward(None, targets)
    config = model.config
    one = 4 * 64 * config.intermediate_size * 4   # one (tokens × intermediate) fp32 tensor
    expected = tensors_saved * one * config.num_hidden_layers
    assert kept_off - kept_on == pytest.approx(expected, rel=0.02), (kept_off, kept_on, expected)


def test_live_tensor_bytes_counts_and_releases():
    with LiveTensorBytes() as mem:
        a = torch.empty(1000, dtype=torch.float32)
        b = a.view(10, 100)          # a view: no new storage
        c = torch.ones(500, dtype=torch.float64)
        assert mem.current == 4000 + 4000
        del a, b, c
        assert mem.current == 0
    assert mem.peak == 8000


# --------------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------------
def test_recompute_mlp_true_on_a_family_without_gated_mlp():
    model = tiny_model("gpt2", layers=1)
    with pytest.raises(ValueError, match="recompute_mlp=True needs a gated-MLP family.*gpt2"):
        pyflex.patch_model(model, r=4, recompute_mlp=True)
    assert not any(isinstance(m, pyflex.FlexLinear) for m in model.modules())
    pyflex.patch_model(model, r=4)  # default: off for GPT-2
    assert pyflex.get_registry(model).config["recompute_mlp"] is False


def test_recompute_mlp_bad_value():
    model = tiny_model("llama", layers=1)
    with pytest.raises(TypeError, match="recompute_mlp='yes'"):
        pyflex.patch_model(model, r=4, recompute_mlp="yes")
    assert not any(isinstance(m, pyflex.FlexLinear) for m in model.modules())


def test_install_on_a_module_that_is_not_gated():
    with pytest.raises(ValueError, match="has no module 'gate_proj'"):
        gated_mlp.install_gated_mlp(nn.Linear(4, 4), "split")
    with pytest.raises(ValueError, match="kind='swiglu' is not a gated MLP kind"):
        gated_mlp.install_gated_mlp(nn.Linear(4, 4), "swiglu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (Triton kernels compiled, bf16)")
def test_recompute_mlp_on_cuda_bf16():
    """With and without recompute on the GPU path (Triton op, bf16; the MLP runs the fused SiLU·mul kernels, whose
    exp is not CUDA's expf, so a few elements differ by one bf16 ulp), and max_memory_allocated after the forward
    drops by the two (tokens × intermediate) tensors per layer."""
    results = []
    for recompute in (False, True):
        model = tiny_model("llama", layers=2).to("cuda", torch.bfloat16).train()
        torch.manual_seed(7)
        with pyflex.use_backend("triton"):
            pyflex.patch_model(model, r=4, alpha=8, recompute_mlp=recompute)
            randomize_flex(model)
            ids = tokens(batch=4, seq=64).cuda()
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            out = model(input_ids=ids, labels=ids)
            kept = torch.cuda.memory_allocated() - before
            out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((out.logits.detach(), grads, kept))
    (l0, g0, kept0), (l1, g1, kept1) = results

    def rms_rel(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm()).item()
    assert rms_rel(l1, l0) <= 1e-2
    for name in g0:
        assert rms_rel(g1[name], g0[name]) <= 3e-2, name
    expected = 2 * 2 * (4 * 64) * model.config.intermediate_size * 2
    assert kept0 - kept1 >= 0.9 * expected, (kept0, kept1, expected)


def test_a_patched_model_survives_torch_save_and_load():
    """torch.save / torch.load of a whole patched model (gated MLP installed, τ on): the loaded model gives the same
    logits and gradients, its MLP forward is bound to its own module, and unpatch gives the base model back. Before,
    the installed forward was a bound method of a module-level function, which pickle cannot rebuild."""
    import io

    import pyflex
    from tiny_models import tiny_model, tokens

    base = tiny_model("llama", layers=2).eval()
    ids = tokens(batch=2, seq=6)
    with torch.no_grad():
        want_base = base(input_ids=ids).logits
    model = pyflex.patch_model(base, r=4, tau=True)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for m in (model, loaded):
        m(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in loaded.named_parameters() if p.grad is not None}
    assert grads and all(torch.equal(grads[n], p.grad) for n, p in model.named_parameters() if n in grads)
    mlp = loaded.model.layers[0].mlp
    assert mlp.forward.__self__ is mlp
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
        assert torch.equal(pyflex.unpatch(loaded)(input_ids=ids).logits, want_base)
