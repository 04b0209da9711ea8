"""pyflex adapter files and PEFT import/export."""
import copy
import json
import os
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import pyflex
from tiny_models import (assert_close, lm_loss, peft_lora_modules, randomize_flex, randomize_peft,  # noqa: F401
                         reference_backend, single_thread, tiny_model, tokens)

peft = pytest.importorskip("peft")


def _patched(family="llama", **kw):
    model = pyflex.patch_model(tiny_model(family), r=4, alpha=8, **kw)
    randomize_flex(model)
    return model


def test_roundtrip_into_unpatched_and_patched(tmp_path):
    model = _patched(target_modules=["q_proj", "down_proj"], layers=[1, 2], tau=True, tau0=0.01, lam=1e-4)
    pyflex.get_registry(model)[2].response_scale = 0.5
    with torch.no_grad():
        model.model.layers[1].self_attn.q_proj.tau.fill_(0.02)
    ids = tokens()
    ref = model(ids).logits
    pyflex.save_adapter(model, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["pyflex_adapter.safetensors", "pyflex_config.json"]
    saved = load_file(str(tmp_path / "pyflex_adapter.safetensors"))
    assert "model.layers.1.self_attn.q_proj.tau" in saved and "model.layers.2.mlp.down_proj.lora_B" in saved
    assert not any(k.endswith(".weight") for k in saved)  # base weights are not part of an adapter

    fresh = pyflex.load_adapter(tiny_model("llama"), str(tmp_path))
    reg = pyflex.get_registry(fresh)
    assert sorted(reg.adapter_modules()) == sorted(pyflex.get_registry(model).adapter_modules())
    assert reg[2].response_scale == 0.5
    assert fresh.model.layers[1].self_attn.q_proj.tau.item() == pytest.approx(0.02)
    assert_close(fresh(ids).logits, ref)

    other = pyflex.patch_model(tiny_model("llama"), r=4, alpha=8, target_modules=["q_proj", "down_proj"],
                               layers=[1, 2], tau=True)
    pyflex.load_adapter(other, str(tmp_path))
    assert_close(other(ids).logits, ref)


@pytest.mark.parametrize("recompute_mlp", [False, True])
def test_load_into_unpatched_keeps_recompute_mlp(tmp_path, recompute_mlp):
    model = _patched(recompute_mlp=recompute_mlp)
    pyflex.save_adapter(model, str(tmp_path))
    fresh = pyflex.load_adapter(tiny_model("llama"), str(tmp_path))
    assert pyflex.get_registry(fresh).config["recompute_mlp"] is recompute_mlp
    assert ("forward" in fresh.model.layers[0].mlp.__dict__) is recompute_mlp
    ids = tokens()
    assert_close(fresh(ids).logits, model(ids).logits)


def _corrupt(path, fn):
    file = os.path.join(path, "pyflex_adapter.safetensors")
    tensors = load_file(file)
    fn(tensors)
    save_file(tensors, file)


@pytest.mark.parametrize("kind", ["missing", "extra", "shape", "dtype"])
def test_load_validation_names_key(tmp_path, kind):
    model = _patched(target_modules=["v_proj"])
    pyflex.save_adapter(model, str(tmp_path))
    key = "model.layers.1.self_attn.v_proj.lora_A"
    if kind == "missing":
        _corrupt(tmp_path, lambda t: t.pop(key))
        err, pattern = KeyError, f"missing key '{key}'"
    elif kind == "extra":
        _corrupt(tmp_path, lambda t: t.__setitem__("model.layers.0.bogus.lora_A", torch.zeros(2)))
        err, pattern = KeyError, "unexpected key 'model.layers.0.bogus.lora_A'"
    elif kind == "shape":
        _corrupt(tmp_path, lambda t: t.__setitem__(key, torch.zeros(5, 32)))
        err, pattern = ValueError, f"'{key}' has shape \\(5, 32\\)"
    else:
        _corrupt(tmp_path, lambda t: t.__setitem__(key, t[key].double()))
        err, pattern = TypeError, f"'{key}' has dtype torch.float64"
    target = pyflex.patch_model(tiny_model("llama"), r=4, alpha=8, target_modules=["v_proj"])
    before = target.model.layers[0].self_attn.v_proj.lora_A.detach().clone()
    with pytest.raises(err, match=pattern):
        pyflex.load_adapter(target, str(tmp_path))
    assert torch.equal(target.model.layers[0].self_attn.v_proj.lora_A, before)  # nothing copied on error


def test_load_errors_on_bad_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="pyflex_config.json"):
        pyflex.load_adapter(tiny_model("llama"), str(tmp_path))


def _peft_saved(tmp_path, family="llama", **cfg):
    base = tiny_model(family)
    cfg.setdefault("target_modules", ["q_proj", "v_proj", "up_proj", "down_proj"])
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, **cfg))
    randomize_peft(pm)
    pm.save_pretrained(str(tmp_path))
    return base, pm


@pytest.mark.parametrize("rslora", [False, True])
def test_load_peft_adapter_matches_peft(tmp_path, rslora):
    """Acceptance: a PEFT adapter with random weights, loaded with pyflex, gives PEFT's logits and gradients."""
    base, pm = _peft_saved(tmp_path, use_rslora=rslora, layers_to_transform=[0, 2] if rslora else None)
    flex = pyflex.load_peft_adapter(copy.deepcopy(base), str(tmp_path))
    flex_mods = pyflex.get_registry(flex).adapter_modules()
    peft_mods = peft_lora_modules(pm)
    assert set(flex_mods) == set(peft_mods) and len(flex_mods) == (8 if rslora else 12)
    ids = tokens()
    flex_logits, flex_loss = lm_loss(flex, ids)
    peft_logits, peft_loss = lm_loss(pm, ids)
    assert_close(flex_logits, peft_logits)
    flex_loss.backward()
    peft_loss.backward()
    for name, module in peft_mods.items():
        assert_close(flex.get_submodule(name).lora_A.grad, module.lora_A["default"].weight.grad)
        assert_close(flex.get_submodule(name).lora_B.grad, module.lora_B["default"].weight.grad)


@pytest.mark.parametrize("family,kw", [("llama", {}), ("gpt2", {}), ("llama", {"layers": [1]}),
                                       ("llama", {"target_modules": ["q_proj", "lm_head"]})])
def test_save_peft_adapter_loads_in_peft(tmp_path, family, kw):
    base = tiny_model(family)
    flex = pyflex.patch_model(copy.deepcopy(base), r=4, alpha=8, **kw)
    randomize_flex(flex)
    pyflex.save_peft_adapter(flex, str(tmp_path))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    assert set(peft_lora_modules(pm)) == set(pyflex.get_registry(flex).adapter_modules())
    ids = tokens()
    assert_close(pm(input_ids=ids).logits, flex(input_ids=ids).logits)
    # and back into pyflex
    back = pyflex.load_peft_adapter(copy.deepcopy(base), str(tmp_path))
    assert_close(back(input_ids=ids).logits, flex(input_ids=ids).logits)


def test_save_peft_refuses_tau_and_gate(tmp_path):
    with pytest.raises(ValueError, match="τ mask"):
        pyflex.save_peft_adapter(_patched(tau=True), str(tmp_path))
    model = _patched()
    model.model.layers[0].mlp.down_proj.gate = torch.nn.Linear(48, 1)
    with pytest.raises(ValueError, match="down_proj.*gate"):
        pyflex.save_peft_adapter(model, str(tmp_path))
    assert not os.path.exists(tmp_path / "adapter_config.json")


def test_load_peft_errors_name_the_key(tmp_path):
    base, _ = _peft_saved(tmp_path)
    file = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(file))
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"
    assert key in tensors
    tensors[key] = torch.zeros(5, 4)
    save_file(tensors, str(file))
    with pytest.raises(ValueError, match=f"'{key}' has shape"):
        pyflex.load_peft_adapter(copy.deepcopy(base), str(tmp_path))
    del tensors[key]
    save_file(tensors, str(file))
    with pytest.raises(KeyError, match=f"missing key '{key}'"):
        pyflex.load_peft_adapter(copy.deepcopy(base), str(tmp_path))
    # a patched model with another rank is refused before any copy
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    other = pyflex.patch_model(copy.deepcopy(base), r=2, target_modules=cfg["target_modules"])
    with pytest.raises(ValueError, match="r=2"):
        pyflex.load_peft_adapter(other, str(tmp_path))
    cfg["use_dora"] = True
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="use_dora"):
        pyflex.load_peft_adapter(copy.deepcopy(base), str(tmp_path))


def test_load_refuses_plan_adapters_into_unpatched_model(tmp_path):
    model = _patched()
    model.model.layers[0].mlp.down_proj.gate = torch.nn.Linear(48, 1)
    pyflex.save_adapter(model, str(tmp_path))
    fresh = tiny_model("llama")
    with pytest.raises(ValueError, match="down_proj.*apply the same plan first"):
        pyflex.load_adapter(fresh, str(tmp_path))
    assert not any(isinstance(m, pyflex.FlexLinear) for m in fresh.modules())
