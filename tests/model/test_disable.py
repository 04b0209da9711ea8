"""pyflex.disable_adapters (pyflex/model/disable.py): inside the context a patched model is its base model — compared
against a copy of the model taken before patching — and no adapter gets a gradient; on exit every switch is back."""
import copy

import pytest
import torch

import pyflex
from pyflex.methods.prefix import GatedPrefix, PooledGate

from tiny_models import FAMILIES, randomize_flex, reference_backend, single_thread, tiny_model, tokens  # noqa: F401


def _nonzero_hlpt(model, seed=4):
    """Gates, prefixes and LoRA weights away from their init, so the adapted model differs from the base."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pyflex.get_registry(model).adapter_parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)


def _switches(model):
    return [m.adapter_enabled for m in model.modules() if hasattr(m, "adapter_enabled")]


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_with_tau_disabled_is_the_base_model(family):
    base = tiny_model(family)
    model = pyflex.patch_model(copy.deepcopy(base), r=4, tau=True, tau0=0.05)
    randomize_flex(model)
    ids = tokens()
    want = base(input_ids=ids).logits
    adapted = model(input_ids=ids).logits
    assert not torch.allclose(adapted, want, atol=1e-3)  # the adapter matters, so the test has teeth
    with pyflex.disable_adapters(model) as same:
        assert same is model
        got = model(input_ids=ids).logits
    assert torch.equal(got, want)  # F.linear on the base weights: the very ops of the unpatched model
    assert torch.equal(model(input_ids=ids).logits, adapted)  # restored on exit


@pytest.mark.parametrize("variant", ["hlpt", "h2lpt"])
def test_hlpt_gates_and_prefixes_disabled_is_the_base_model(variant):
    base = tiny_model("llama", layers=4)
    model = pyflex.apply_hlpt(copy.deepcopy(base), variant=variant, prefix_len=3)
    _nonzero_hlpt(model)
    prefixes = [m for m in model.modules() if isinstance(m, GatedPrefix)]
    gates = [m for m in model.modules() if isinstance(m, PooledGate)]
    assert prefixes and gates
    ids = tokens()
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # padding goes through the same mask path as the base model's
    want = base(input_ids=ids, attention_mask=mask).logits
    adapted = model(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(adapted, want, atol=1e-3)
    with pyflex.disable_adapters(model):
        got = model(input_ids=ids, attention_mask=mask).logits
        assert all(g._observed is None for g in gates)  # the observing pre-hooks computed nothing
    assert torch.equal(got, want)
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, adapted, rtol=0, atol=0)


def test_no_gradient_reaches_the_adapters():
    model = pyflex.apply_hlpt(tiny_model("llama", layers=4), variant="hlpt", prefix_len=3, tau=True)
    _nonzero_hlpt(model)
    model.model.embed_tokens.weight.requires_grad_(True)  # something upstream trains, so backward runs
    with pyflex.disable_adapters(model):
        model(input_ids=tokens()).logits.square().mean().backward()
    adapters = pyflex.get_registry(model).named_adapter_parameters()
    assert adapters and all(p.requires_grad for p in adapters.values())  # still armed for the optimizer
    assert all(p.grad is None for p in adapters.values()), [n for n, p in adapters.items() if p.grad is not None]
    assert model.model.embed_tokens.weight.grad is not None
    model(input_ids=tokens()).logits.square().mean().backward()  # and they train again afterwards
    assert all(p.grad is not None for p in adapters.values())


def test_switches_come_back_after_an_exception_and_nest():
    model = pyflex.patch_model(tiny_model("llama"), r=4)
    first = next(m for m in model.modules() if isinstance(m, pyflex.FlexLinear))
    first.adapter_enabled = False  # a user's own switch is kept as it was
    before = _switches(model)
    with pytest.raises(KeyError, match="inside"):
        with pyflex.disable_adapters(model):
            assert not any(_switches(model))
            raise KeyError("inside")
    assert _switches(model) == before
    with pyflex.disable_adapters(model):
        with pyflex.disable_adapters(model):
            assert not any(_switches(model))
        assert not any(_switches(model))  # the outer context is still on
    assert _switches(model) == before


def test_what_cannot_be_the_base_model_is_refused_before_switching():
    with pytest.raises(ValueError, match="not patched"):
        with pyflex.disable_adapters(tiny_model("llama")):
            pass
    for kwargs, match in ((dict(modules_to_save=["lm_head"]), "modules_to_save"), (dict(bias="all"), "bias='all'")):
        model = pyflex.patch_model(tiny_model("llama"), r=4, target_modules=["q_proj"], **kwargs)
        with pytest.raises(ValueError, match=match):
            with pyflex.disable_adapters(model):
                pass
        assert all(_switches(model))
    model = pyflex.patch_model(tiny_model("llama"), r=4)
    model.model.layers[1].self_attn.q_proj.merge()
    with pytest.raises(ValueError, match="merged"):
        with pyflex.disable_adapters(model):
            pass
    assert all(_switches(model))
    full = tiny_model("llama")
    pyflex.LiftSchedule(full, target="full", total_steps=3)  # a registry without adapters
    with pytest.raises(ValueError, match="no adapter module"):
        with pyflex.disable_adapters(full):
            pass


def test_generation_with_adapters_disabled_is_the_base_models():
    base = tiny_model("llama")
    model = pyflex.patch_model(copy.deepcopy(base), r=4)
    randomize_flex(model)
    ids = tokens(seq=4)
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                  pad_token_id=0)
    with pyflex.disable_adapters(model):
        got = model.generate(**kwargs)
    assert torch.equal(got, base.generate(**kwargs))
    assert not torch.equal(model.generate(**kwargs), got)
