"""pyflex adapter files and PEFT import/export."""
import copy
import dataclasses
import json
import os
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import pyflex
import pyflex.model.patch
from tiny_models import (assert_close, lm_loss, peft_lora_modules, randomize_flex, randomize_peft,  # noqa: F401
                         reference_backend, single_thread, tiny_classifier, tiny_model, tokens)

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
                               layers=[1, 2], tau=True, lam=1e-4)
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
        err, pattern = ValueError, f"'{key}' has shape \\(5, 32\\), the model expects \\(4, 32\\)"
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


def _perturb(model, seed=5, std=0.1):
    """Move every trainable parameter (adapters, τ, trained biases, modules to save) away from its fresh value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * std)


def test_load_into_unpatched_restores_every_setting(tmp_path):
    kwargs = dict(r=2, alpha=32, rslora=True, dropout=0.1, target_modules=["q_proj", "v_proj", "down_proj"],
                  layers=[0, 2], tau=True, lam=2e-6, tau0=0.05, bias="lora_only", recompute_mlp=False,
                  modules_to_save=["score"])
    src = pyflex.patch_model(tiny_classifier("qwen2"), **kwargs)
    _perturb(src)  # Qwen2's q/v projections have biases: bias="lora_only" trains them
    pyflex.save_adapter(src, str(tmp_path))
    saved = load_file(str(tmp_path / "pyflex_adapter.safetensors"))
    assert {"model.layers.0.self_attn.q_proj.bias", "score.weight"} <= set(saved)
    dst = pyflex.load_adapter(tiny_classifier("qwen2"), str(tmp_path))
    src_reg, dst_reg = pyflex.get_registry(src), pyflex.get_registry(dst)
    assert dst_reg.config == src_reg.config and dst_reg.config["lam"] == 2e-6
    for name, module in src_reg.adapter_modules().items():
        other = dst_reg.adapter_modules()[name]
        if isinstance(module, pyflex.FlexLinear):
            assert (other.r, other.alpha, other.rslora, other.scaling, other.dropout, other.lam, other.tau0) == \
                (module.r, module.alpha, module.rslora, module.scaling, module.dropout, module.lam, module.tau0)
    assert {n for n, p in dst.named_parameters() if p.requires_grad} == \
        {n for n, p in src.named_parameters() if p.requires_grad}
    ids = tokens()
    assert_close(dst(input_ids=ids).logits, src(input_ids=ids).logits)


def test_saved_config_holds_the_resolved_lam(tmp_path):
    pyflex.save_adapter(_patched(tau=True), str(tmp_path))
    config = json.loads((tmp_path / "pyflex_config.json").read_text())
    assert config["patch"]["lam"] == pyflex.model.patch.DEFAULT_LAM
    assert {m["lam"] for m in config["modules"].values()} == {pyflex.model.patch.DEFAULT_LAM}


def test_load_into_unpatched_replays_the_hlpt_plan(tmp_path):
    src = pyflex.apply_hlpt(tiny_model("llama", layers=4), variant="hlpt", prefix_len=3, tau=True)
    _perturb(src)
    pyflex.save_adapter(src, str(tmp_path))
    dst = pyflex.load_adapter(tiny_model("llama", layers=4), str(tmp_path))
    assert dataclasses.asdict(dst.pyflex_plan) == dataclasses.asdict(src.pyflex_plan)
    assert pyflex.get_registry(dst).config == pyflex.get_registry(src).config
    ids = tokens()
    assert_close(dst(input_ids=ids).logits, src(input_ids=ids).logits)


@pytest.mark.parametrize("saved,other,message", [
    (dict(alpha=32), dict(), r"alpha: model 8.0, file 32.0 \('model.layers.0.self_attn.q_proj' and 2 more\)"),
    (dict(r=2), dict(), "r: model 4, file 2"),
    (dict(rslora=True), dict(), "rslora: model False, file True"),
    (dict(dropout=0.1), dict(), "dropout: model 0.0, file 0.1"),
    (dict(tau=True), dict(), "lam: model 0.0, file 4.5e-05 .*; tau: model False, file True"),
    (dict(tau=True, lam=1e-4), dict(tau=True), "lam: model 4.5e-05, file 0.0001"),
    (dict(target_modules=["q_proj", "k_proj"]), dict(),
     r"adapted modules: 0 only in the model \[\], 3 only in the file"),
    (dict(bias="all"), dict(), "bias: model 'none', file 'all'"),
    (dict(modules_to_save=["lm_head"]), dict(), r"modules_to_save: model \[\], file \['lm_head'\]"),
])
def test_load_into_patched_model_with_other_settings_is_an_error(tmp_path, saved, other, message):
    base = dict(r=4, alpha=8, target_modules=["q_proj"])
    pyflex.save_adapter(pyflex.patch_model(tiny_model("llama"), **{**base, **saved}), str(tmp_path))
    model = pyflex.patch_model(tiny_model("llama"), **{**base, **other})
    randomize_flex(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="saved with other settings than the patched model has: " + message):
        pyflex.load_adapter(model, str(tmp_path))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_load_into_model_with_another_plan_is_an_error(tmp_path):
    pyflex.save_adapter(pyflex.apply_hlpt(tiny_model("llama", layers=4), prefix_len=4), str(tmp_path))
    with pytest.raises(ValueError, match="plan prefix_len: model 3, file 4"):
        pyflex.load_adapter(pyflex.apply_hlpt(tiny_model("llama", layers=4), prefix_len=3), str(tmp_path))
    plain = pyflex.patch_model(tiny_model("llama", layers=4), r=8, alpha=16, target_modules="ffn_down", layers=[0, 1, 2])
    with pytest.raises(ValueError, match="has_gate: model False, file True.*plan: model None, file 'HLPTPlan'"):
        pyflex.load_adapter(plain, str(tmp_path))


def _snapshot(model):
    """What a failed load must leave alone: module tree, values, requires_grad, modes, hooks, attributes."""
    return dict(modules=[(n, type(m), m.training) for n, m in model.named_modules()],
                state={k: v.clone() for k, v in model.state_dict().items()},
                flags={n: p.requires_grad for n, p in model.named_parameters()},
                hooks=[(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()],
                attributes=sorted(model.__dict__), attention=model.config._attn_implementation)


@pytest.mark.parametrize("kind", ["pyflex", "hlpt", "peft"])
def test_failed_load_leaves_an_unpatched_model_as_it_was(tmp_path, kind):
    if kind == "peft":
        _peft_saved(tmp_path)
        file = tmp_path / "adapter_model.safetensors"
        key = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"
    else:
        src = (pyflex.apply_hlpt(tiny_model("llama"), prefix_len=3) if kind == "hlpt"
               else _patched(target_modules=["q_proj"]))
        pyflex.save_adapter(src, str(tmp_path))
        file = tmp_path / "pyflex_adapter.safetensors"
        key = "model.layers.2.self_attn.pyflex_prefix.prefix_key" if kind == "hlpt" \
            else "model.layers.1.self_attn.q_proj.lora_B"
    tensors = load_file(str(file))
    tensors[key] = torch.zeros(5, 4)
    save_file(tensors, str(file))
    model = tiny_model("llama")
    before = _snapshot(model)
    loader = pyflex.load_peft_adapter if kind == "peft" else pyflex.load_adapter
    with pytest.raises(ValueError, match=f"{file}': key '{key}' has shape \\(5, 4\\), the model expects"):
        loader(model, str(tmp_path))
    after = _snapshot(model)
    assert not pyflex.model.patch.is_patched(model)
    assert all(torch.equal(after["state"][k], v) for k, v in before.pop("state").items())
    after.pop("state")
    assert after == before


@pytest.mark.parametrize("fmt", ["pyflex", "peft"])
@pytest.mark.parametrize("damage", ["truncated", "garbage", "config"])
def test_corrupt_files_are_named(tmp_path, fmt, damage):
    if fmt == "peft":
        _peft_saved(tmp_path)
        weights, config = "adapter_model.safetensors", "adapter_config.json"
    else:
        pyflex.save_adapter(_patched(), str(tmp_path))
        weights, config = "pyflex_adapter.safetensors", "pyflex_config.json"
    target = tmp_path / (config if damage == "config" else weights)
    data = target.read_bytes()
    target.write_bytes(b"not an adapter file" if damage == "garbage" else data[:len(data) // 2])
    model = tiny_model("llama")
    loader = pyflex.load_peft_adapter if fmt == "peft" else pyflex.load_adapter
    with pytest.raises(ValueError, match=f"'{target}' is not .*; the file is corrupt or truncated"):
        loader(model, str(tmp_path))
    assert not pyflex.model.patch.is_patched(model)


def test_peft_modules_to_save_both_ways(tmp_path):
    base = tiny_classifier("llama")
    # task_type SEQ_CLS puts PEFT's ['classifier', 'score'] in modules_to_save; this model has a 'score' only
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                                   task_type="SEQ_CLS"))
    randomize_peft(pm)
    with torch.no_grad():
        pm.get_submodule("base_model.model.score").modules_to_save["default"].weight.mul_(-2.0)
    pm.save_pretrained(str(tmp_path / "peft"))
    flex = pyflex.load_peft_adapter(copy.deepcopy(base), str(tmp_path / "peft"))
    assert pyflex.get_registry(flex).config["modules_to_save"] == ["score"] and flex.score.weight.requires_grad
    ids = tokens()
    assert_close(flex(input_ids=ids).logits, pm(input_ids=ids).logits)

    pyflex.save_peft_adapter(flex, str(tmp_path / "flex"))
    exported = json.loads((tmp_path / "flex" / "adapter_config.json").read_text())
    original = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    # the config it was loaded from round-trips (PEFT wrote SEQ_CLS's heads into modules_to_save)
    assert exported["task_type"] == "SEQ_CLS" and exported["modules_to_save"] == original["modules_to_save"]
    assert "base_model.model.score.weight" in load_file(str(tmp_path / "flex" / "adapter_model.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "flex"))
    assert_close(back(input_ids=ids).logits, flex(input_ids=ids).logits)

    other = pyflex.patch_model(copy.deepcopy(base), r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    with pytest.raises(ValueError, match=r"another patch than the model has: modules_to_save: the model is patched "
                                         r"with \[\], the config has \['score'\]"):
        pyflex.load_peft_adapter(other, str(tmp_path / "peft"))


def _peft_logits(base, path, ids):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(path))
    return pm, pm(input_ids=ids).logits


def test_save_adapter_writes_the_given_configs_and_load_replays_patterns(tmp_path):
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", exclude_modules=["gate_proj"],
                           rank_pattern={"down_proj": 2, "layers.0.self_attn.q_proj": 6}, alpha_pattern={"v_proj": 3})
    src = pyflex.patch_model(tiny_model("llama"), lora, pyflex.PyflexConfig(tau=True, lam=1e-4))
    _perturb(src)
    pyflex.save_adapter(src, str(tmp_path))
    saved = json.loads((tmp_path / "pyflex_config.json").read_text())["patch"]
    assert saved["lora_config"]["target_modules"] == "all-linear"
    assert saved["lora_config"]["rank_pattern"] == {"down_proj": 2, "layers.0.self_attn.q_proj": 6}
    assert saved["lora_config"]["exclude_modules"] == ["gate_proj"]
    assert saved["pyflex_config"] == dict(tau=True, lam=1e-4, target_sparsity=None, tau0=0.0, adapter_dtype=None, recompute_mlp=None,
                                          layers_path=None)
    dst = pyflex.load_adapter(tiny_model("llama"), str(tmp_path))  # modules of three ranks and two α
    assert pyflex.get_registry(dst).config == pyflex.get_registry(src).config
    assert {m.r for m in dst.modules() if isinstance(m, pyflex.FlexLinear)} == {2, 4, 6}
    ids = tokens()
    assert_close(dst(input_ids=ids).logits, src(input_ids=ids).logits)


@pytest.mark.parametrize("kwargs", [
    dict(target_modules="all-linear", rank_pattern={"down_proj": 2, "layers.0.self_attn.q_proj": 6},
         alpha_pattern={"v_proj": 3, "o_proj": 12}, use_rslora=True),
    dict(target_modules=["q_proj", "up_proj"], layers_to_transform=[0, 2], layers_pattern="layers",
         rank_pattern={"up_proj": 3}, exclude_modules=["layers.2.self_attn.q_proj"]),
    dict(target_modules=r".*\.(0|1)\.self_attn\.(q|v)_proj", alpha_pattern={"layers.1.self_attn.v_proj": 2}),
])
def test_peft_export_round_trips_the_lora_config(tmp_path, kwargs):
    base = tiny_model("llama")
    flex = pyflex.patch_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, **kwargs))
    randomize_flex(flex)
    pyflex.save_peft_adapter(flex, str(tmp_path))
    exported = json.loads((tmp_path / "adapter_config.json").read_text())
    for field, value in kwargs.items():
        assert exported[field] == (sorted(value) if isinstance(value, list) else value), field
    ids = tokens()
    pm, logits = _peft_logits(base, tmp_path, ids)
    assert_close(logits, flex(input_ids=ids).logits)
    for name, module in peft_lora_modules(pm).items():
        assert (module.r["default"], module.scaling["default"]) == (flex.get_submodule(name).r,
                                                                    flex.get_submodule(name).scaling)
    back = pyflex.load_peft_adapter(copy.deepcopy(base), str(tmp_path))
    assert_close(back(input_ids=ids).logits, flex(input_ids=ids).logits)
    assert pyflex.get_registry(back).config["lora_config"]["target_modules"] == exported["target_modules"]


def test_peft_export_of_keyword_patterns(tmp_path):
    base = tiny_model("gpt2")
    flex = pyflex.patch_model(copy.deepcopy(base), r=4, alpha=8, target_modules=["c_attn", "c_fc"],
                              rank_pattern={"h.1.attn.c_attn": 2}, alpha_pattern={"c_fc": 2.0})
    randomize_flex(flex)
    pyflex.save_peft_adapter(flex, str(tmp_path))
    exported = json.loads((tmp_path / "adapter_config.json").read_text())
    assert exported["rank_pattern"] == {"h.1.attn.c_attn": 2} and exported["alpha_pattern"] == {"c_fc": 2.0}
    ids = tokens()
    _, logits = _peft_logits(base, tmp_path, ids)
    assert_close(logits, flex(input_ids=ids).logits)
    back = pyflex.load_peft_adapter(copy.deepcopy(base), str(tmp_path))
    assert back.transformer.h[1].attn.c_attn.r == 2 and back.transformer.h[0].attn.c_attn.r == 4
    assert_close(back(input_ids=ids).logits, flex(input_ids=ids).logits)


def test_peft_export_derives_patterns_for_modules_of_other_ranks(tmp_path):
    """A patch whose recorded patterns no longer describe it (ranks set per module by a saved pyflex file of another
    layout) still exports exactly: one exact-name key per module that differs."""
    from pyflex.integrations.peft_config import peft_adapter_config
    flex = pyflex.patch_model(tiny_model("llama"), r=4, alpha=8, target_modules=["q_proj"],
                              rank_pattern={"layers.2.self_attn.q_proj": 2})
    pyflex.get_registry(flex).config["rank_pattern"] = {}  # as if the record were lost
    config = peft_adapter_config(flex)
    assert config["r"] == 4 and config["rank_pattern"] == {r"model\.layers\.2\.self_attn\.q_proj": 2}


def test_load_peft_adapter_with_patterns_matches_peft(tmp_path):
    base, pm = _peft_saved(tmp_path, rank_pattern={"up_proj": 2, "layers.1.self_attn.q_proj": 6},
                           alpha_pattern={"down_proj": 32})
    flex = pyflex.load_peft_adapter(copy.deepcopy(base), str(tmp_path))
    assert flex.model.layers[1].self_attn.q_proj.r == 6 and flex.model.layers[0].mlp.up_proj.r == 2
    ids = tokens()
    flex_logits, flex_loss = lm_loss(flex, ids)
    peft_logits, peft_loss = lm_loss(pm, ids)
    assert_close(flex_logits, peft_logits)
    flex_loss.backward()
    peft_loss.backward()
    for name, module in peft_lora_modules(pm).items():
        assert_close(flex.get_submodule(name).lora_B.grad, module.lora_B["default"].weight.grad)
    # a model patched with the same modules but without the patterns is another patch: refused, naming the module
    other = pyflex.patch_model(copy.deepcopy(base), r=4, alpha=8, target_modules=["q_proj", "v_proj", "up_proj",
                                                                                   "down_proj"])
    with pytest.raises(ValueError, match=r"another patch than the model has: .*up_proj: the model is patched with "
                                         r"r=4, alpha=8, rslora=False, the config has r=2"):
        pyflex.load_peft_adapter(other, str(tmp_path))
