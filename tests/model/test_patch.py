"""patch_model / unpatch / merge / registry on tiny HF models, compared with PEFT."""
import copy
import warnings

import pytest
import torch
from torch import nn

import pyflex
import pyflex.model.patch
from pyflex.model.families import FAMILIES as FAMILY_TABLE
from tiny_models import (FAMILIES, assert_close, copy_peft_to_flex, lm_loss, peft_lora_modules,  # noqa: F401
                         randomize_flex, randomize_peft, reference_backend, single_thread, tiny_classifier, tiny_model,
                         tokens)

peft = pytest.importorskip("peft")


def _targets_for(family):
    if family == "bert":  # PEFT's all-linear would also take cls.predictions.transform.dense; name them instead
        return ["query", "key", "value", "dense"], ["query", "key", "value", "dense"]
    return "all-linear", "all-linear"


def _flex_and_peft(family, r=4, alpha=8, rslora=False, layers=None, seed=0, **peft_kwargs):
    base = tiny_model(family, seed=seed)
    flex_targets, peft_targets = _targets_for(family)
    if layers is not None and isinstance(peft_targets, str):  # PEFT refuses a str target with layers_to_transform
        peft_targets = sorted({p.rpartition(".")[2] for p in FAMILY_TABLE[family].projections})
    flex = pyflex.patch_model(copy.deepcopy(base), r=r, alpha=alpha, rslora=rslora, target_modules=flex_targets,
                              layers=layers)
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=peft_targets,
                          layers_to_transform=None if layers is None else list(layers), **peft_kwargs)
    pm = peft.get_peft_model(copy.deepcopy(base), cfg)
    randomize_peft(pm)
    n = copy_peft_to_flex(pm, flex)
    return base, flex, pm, n


def _compare_logits_and_grads(flex, pm, ids):
    flex_logits, flex_loss = lm_loss(flex, ids)
    peft_logits, peft_loss = lm_loss(pm, ids)
    assert_close(flex_logits, peft_logits)
    flex_loss.backward()
    peft_loss.backward()
    mods = peft_lora_modules(pm)
    assert mods
    for name, module in mods.items():
        f = flex.get_submodule(name)
        assert isinstance(f, pyflex.FlexLinear), name
        assert_close(f.lora_A.grad, module.lora_A["default"].weight.grad, msg=f"{name}.lora_A.grad")
        assert_close(f.lora_B.grad, module.lora_B["default"].weight.grad, msg=f"{name}.lora_B.grad")


@pytest.mark.parametrize("family", FAMILIES)
def test_family_matches_peft(family):
    base, flex, pm, n = _flex_and_peft(family)
    spec = FAMILY_TABLE[family]
    flex_names = set(pyflex.get_registry(flex).adapter_modules())
    assert n == len(flex_names) == len(peft_lora_modules(pm))
    # every table projection of every layer is patched
    reg = pyflex.get_registry(flex)
    for handle in reg.layers:
        for proj in spec.projections:
            assert f"{handle.name}.{proj}" in handle.adapters
    # base state dict keys and values unchanged
    base_sd, flex_sd = base.state_dict(), flex.state_dict()
    for key, value in base_sd.items():
        assert torch.equal(flex_sd[key], value), key
    extra = set(flex_sd) - set(base_sd)
    assert extra and all(k.endswith((".lora_A", ".lora_B")) for k in extra)
    # only adapters train
    trainable = {n for n, p in flex.named_parameters() if p.requires_grad}
    assert trainable == extra
    _compare_logits_and_grads(flex, pm, tokens())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_default_backend_matches_peft(family):
    """The same parity through the backend users get by default (the C++ extension when it is built)."""
    with pyflex.use_backend("auto"):
        _, flex, pm, _ = _flex_and_peft(family)
        _compare_logits_and_grads(flex, pm, tokens())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_rslora_and_layer_subset_match_peft(family):
    _, flex, pm, n = _flex_and_peft(family, r=8, alpha=4, rslora=True, layers=[0, 2])
    assert {h.index for h in pyflex.get_registry(flex).layers if h.adapters} == {0, 2}
    assert n == len(pyflex.get_registry(flex).adapter_modules())
    _compare_logits_and_grads(flex, pm, tokens())


def test_target_rules():
    model = tiny_model("llama")
    names = pyflex.model.patch.find_targets(model, ["q_proj", "self_attn.v_proj"])
    assert names == [f"model.layers.{i}.self_attn.{p}" for i in range(3) for p in ("q_proj", "v_proj")]
    names = pyflex.model.patch.find_targets(model, r"model\.layers\.[01]\.mlp\.(up|down)_proj")
    assert names == [f"model.layers.{i}.mlp.{p}" for i in range(2) for p in ("up_proj", "down_proj")]
    names = pyflex.model.patch.find_targets(model, "all-linear", layers=range(1, 3))
    assert len(names) == 14 and all(n.startswith(("model.layers.1.", "model.layers.2.")) for n in names)
    assert "lm_head" not in pyflex.model.patch.find_targets(model, "all-linear")
    assert pyflex.model.patch.find_targets(model, "ffn_down") == [f"model.layers.{i}.mlp.down_proj" for i in range(3)]
    assert len(pyflex.model.patch.find_targets(model, "attention", layers=1)) == 4
    # an explicitly named head is allowed and kept outside the layers
    pyflex.patch_model(model, target_modules=["q_proj", "lm_head"])
    reg = pyflex.get_registry(model)
    assert list(reg.extra_adapters) == ["lm_head"]
    assert any(p is model.lm_head.lora_A for p in reg.adapter_parameters())


def test_target_regex_matches_peft_selection():
    model = tiny_model("llama")
    regex = r".*layers\.[12]\.(self_attn\.[qv]_proj|mlp\.down_proj)"
    flex = pyflex.patch_model(copy.deepcopy(model), target_modules=regex)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=8, target_modules=regex))
    assert set(pyflex.get_registry(flex).adapter_modules()) == set(peft_lora_modules(pm))
    assert len(peft_lora_modules(pm)) == 6


def test_target_names_match_peft_selection():
    model = tiny_model("gpt2")
    flex = pyflex.patch_model(copy.deepcopy(model), target_modules=["c_attn", "mlp.c_proj"], layers=[1])
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=8, target_modules=["c_attn", "mlp.c_proj"],
                                                                   layers_to_transform=[1], fan_in_fan_out=True))
    assert set(pyflex.get_registry(flex).adapter_modules()) == set(peft_lora_modules(pm))


def test_bad_inputs():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="'q_prj'"):
        pyflex.patch_model(model, target_modules=["q_prj"])
    with pytest.raises(ValueError, match="fully matches no"):
        pyflex.patch_model(model, target_modules=r"nothing\.here")
    with pytest.raises(ValueError, match="valid regex"):
        pyflex.patch_model(model, target_modules="(unclosed")
    with pytest.raises(ValueError, match="LlamaMLP|only nn.Linear"):
        pyflex.patch_model(model, target_modules=["mlp"])
    with pytest.raises(ValueError, match="out of range"):
        pyflex.patch_model(model, layers=[5])
    with pytest.raises(ValueError, match="bias"):
        pyflex.patch_model(model, bias="some")
    with pytest.raises(ValueError, match="r=0"):
        pyflex.patch_model(model, r=0)
    with pytest.raises(TypeError, match="target_modules"):
        pyflex.patch_model(model, target_modules=3)
    # failed calls left the model untouched
    assert not pyflex.model.patch.is_patched(model)
    assert not any(isinstance(m, pyflex.FlexLinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    pyflex.patch_model(model)
    with pytest.raises(RuntimeError, match="already patched"):
        pyflex.patch_model(model)
    with pytest.raises(ValueError, match="not patched"):
        pyflex.get_registry(tiny_model("gpt2"))


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


class _Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = type("Cfg", (), {"model_type": "mycustom"})()
        self.stack = nn.ModuleList([_Block() for _ in range(2)])
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        for block in self.stack:
            x = block(x)
        return self.head(x)


def test_unknown_family_error_and_manual_path():
    model = _Custom()
    with pytest.raises(ValueError) as info:
        pyflex.patch_model(model, target_modules=["fc1"])
    msg = str(info.value)
    assert "'mycustom'" in msg and "llama" in msg and "gpt2" in msg and "layers_path" in msg
    x = torch.randn(3, 8)
    ref = model(x)
    pyflex.patch_model(model, target_modules=["fc1", "fc2"], layers_path="stack")
    reg = pyflex.get_registry(model)
    assert reg.num_layers == 2 and len(reg[1].adapters) == 2
    assert_close(model(x), ref)  # B = 0 at init
    with pytest.raises(ValueError, match="layers_path='nope'"):
        pyflex.patch_model(_Custom(), target_modules=["fc1"], layers_path="nope")


def test_unpatch_restores_modules_and_flags():
    model = tiny_model("llama")
    model.model.layers[0].input_layernorm.weight.requires_grad_(False)
    q = model.model.layers[1].self_attn.q_proj
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    ids = tokens()
    ref = model(ids).logits
    pyflex.patch_model(model, r=4)
    randomize_flex(model)
    assert not torch.allclose(model(ids).logits, ref)
    pyflex.unpatch(model)
    assert model.model.layers[1].self_attn.q_proj is q and type(q) is nn.Linear
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert_close(model(ids).logits, ref)
    assert not model.model.layers[0]._forward_pre_hooks and not model.model.layers[0]._forward_hooks
    pyflex.patch_model(model, target_modules=["v_proj"])  # can patch again after unpatch
    assert len(pyflex.get_registry(model).adapter_modules()) == 3


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_merge_folds_lora(family):
    model = pyflex.patch_model(tiny_model(family), r=4, alpha=8)
    randomize_flex(model)
    pyflex.get_registry(model)[1].response_scale = 0.5
    ids = tokens()
    ref = model(ids).logits
    base_w = (model.transformer.h[0].attn.c_attn.weight if family == "gpt2"
              else model.model.layers[0].self_attn.q_proj.weight).detach().clone()
    pyflex.merge(model)
    assert not any(isinstance(m, pyflex.FlexLinear) for m in model.modules())
    assert not pyflex.model.patch.is_patched(model)
    assert_close(model(ids).logits, ref, atol=1e-4)
    merged_w = model.transformer.h[0].attn.c_attn.weight if family == "gpt2" else model.model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(merged_w, base_w)


def test_merge_refuses_tau_and_gate():
    model = pyflex.patch_model(tiny_model("llama"), tau=True)
    with pytest.raises(RuntimeError, match="τ mask"):
        pyflex.merge(model)
    assert pyflex.model.patch.is_patched(model)  # nothing changed
    model = pyflex.patch_model(tiny_model("llama"))
    model.model.layers[2].mlp.down_proj.gate = _MeanGate(48)
    w = model.model.layers[0].self_attn.q_proj.weight.clone()
    with pytest.raises(RuntimeError, match="down_proj.*gate"):
        pyflex.merge(model)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, w)


class _MeanGate(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.proj = nn.Linear(dim, 1)

    def forward(self, x):
        return torch.sigmoid(self.proj(x)).squeeze(-1)


def test_registry_switches_and_optimizer():
    model = pyflex.patch_model(tiny_model("llama", layers=4), r=4)
    randomize_flex(model)
    reg = pyflex.get_registry(model)
    assert len(reg) == reg.num_layers == 4 and [h.index for h in reg.layers] == [0, 1, 2, 3]
    assert reg[2].block is model.model.layers[2]
    assert reg.trainable_indices() == [0, 1, 2, 3] and reg.lowest_trainable() == 0
    assert len(reg.adapter_parameters()) == 4 * 7 * 2
    assert all(len(h.parameters()) == 14 for h in reg.layers)
    opt = torch.optim.AdamW(reg.adapter_parameters(), lr=1e-2)
    ids = tokens()
    lm_loss(model, ids)[1].backward()
    opt.step()
    reg.set_active([2, 3])
    assert reg.trainable_indices() == [2, 3] and reg.lowest_trainable() == 2
    assert all(p.grad is None and not p.requires_grad for p in reg[0].parameters())
    frozen = [p.detach().clone() for p in reg[0].parameters()]
    opt.zero_grad()
    lm_loss(model, ids)[1].backward()
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(frozen, reg[0].parameters()))
    assert all(p.grad is not None for p in reg[3].parameters())
    # unfreezing later trains again with the same optimizer
    reg.set_active([0])
    opt.zero_grad()
    lm_loss(model, ids)[1].backward()
    opt.step()
    assert not all(torch.equal(a, b) for a, b in zip(frozen, reg[0].parameters()))
    with pytest.raises(IndexError, match="out of range"):
        reg.set_active([7])
    with pytest.raises(TypeError, match="must be an int"):
        reg.set_active([1.5])
    reg.set_active([torch.tensor(0)])  # integer-like indices are accepted
    assert reg.trainable_indices() == [0]
    # full block mode toggles base weights too
    reg[1].set_trainable(True, full_block=True)
    assert model.model.layers[1].self_attn.q_proj.weight.requires_grad
    assert reg.lowest_trainable() == 0 and reg.trainable_indices() == [0, 1]
    reg[1].set_trainable(False, full_block=True)
    assert not any(p.requires_grad for p in model.model.layers[1].parameters())


def test_response_scale_propagates():
    base = tiny_model("llama")
    ids = tokens()
    ref = base(ids).logits
    model = pyflex.patch_model(copy.deepcopy(base), r=4)
    randomize_flex(model)
    reg = pyflex.get_registry(model)
    gate = _MeanGate(32)
    gate.response_scale = 1.0
    reg[0].add_adapter("model.layers.0.extra_gate", gate)
    reg.set_response_scale(0.0)
    assert model.model.layers[1].mlp.up_proj.response_scale == 0.0 and gate.response_scale == 0.0
    assert_close(model(ids).logits, ref)
    reg[1].response_scale = 0.25
    assert reg[1].response_scale == 0.25 and model.model.layers[1].self_attn.o_proj.response_scale == 0.25
    assert not torch.allclose(model(ids).logits, ref)
    assert any(p is gate.proj.weight for p in reg[0].parameters())


def _count_saved(model, ids):
    count = [0]

    def pack(t):
        count[0] += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss = lm_loss(model, ids)
    return count[0], loss


def test_frozen_prefix_runs_without_autograd():
    model = pyflex.patch_model(tiny_model("llama", layers=4), r=4)
    randomize_flex(model)
    model.enable_input_require_grads()  # without skipping, every layer would record a graph
    reg = pyflex.get_registry(model)
    reg.set_active([2, 3])
    ids = tokens()
    seen = {}
    hooks = [model.model.layers[i].register_forward_hook(
        lambda m, a, o, i=i: seen.__setitem__(i, (o[0] if isinstance(o, tuple) else o).requires_grad))
        for i in range(4)]
    n_skip, loss_skip = _count_saved(model, ids)
    assert seen == {0: False, 1: False, 2: True, 3: True}
    loss_skip.backward()
    grads_skip = [p.grad.clone() for p in reg.adapter_parameters() if p.grad is not None]
    model.zero_grad()
    reg.skip_frozen_prefix = False
    n_full, loss_full = _count_saved(model, ids)
    assert seen[0] and seen[1]
    loss_full.backward()
    grads_full = [p.grad.clone() for p in reg.adapter_parameters() if p.grad is not None]
    for h in hooks:
        h.remove()
    assert n_skip < n_full
    assert torch.equal(loss_skip, loss_full)
    assert len(grads_skip) == len(grads_full) == 2 * 14
    for a, b in zip(grads_skip, grads_full):
        assert_close(a, b)
    # grad mode is restored after the forward, and no-grad forwards are left alone
    assert torch.is_grad_enabled()
    with torch.no_grad():
        model(ids)
    assert torch.is_grad_enabled()
    reg.skip_frozen_prefix = True
    def boom(module, args):
        assert not torch.is_grad_enabled()  # layer 0 is skipped
        raise RuntimeError("boom")

    handle = model.model.layers[0].self_attn.register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):  # an error inside a skipped layer still restores grad mode
        model(ids)
    handle.remove()
    assert torch.is_grad_enabled()


def test_frozen_prefix_off_when_embeddings_train():
    model = pyflex.patch_model(tiny_model("llama"), r=4)
    reg = pyflex.get_registry(model)
    reg.set_active([2])
    model.model.embed_tokens.weight.requires_grad_(True)
    _, loss = lm_loss(model, tokens())
    loss.backward()
    assert model.model.embed_tokens.weight.grad is not None and model.model.embed_tokens.weight.grad.abs().sum() > 0


def test_tau_patch_and_sparsity():
    model = pyflex.patch_model(tiny_model("llama"), r=4, tau=True, lam=1e-4, tau0=0.0)
    randomize_flex(model)
    groups = pyflex.tau_param_groups(model, lr=1e-3)
    assert len(groups[1]["params"]) == 21
    reg = pyflex.get_registry(model)
    assert len(reg[0].parameters()) == 21
    q = model.model.layers[0].self_attn.q_proj
    assert q.last_sparsity is None
    lm_loss(model, tokens())[1].backward()
    assert q.last_sparsity == 0.0 and q.last_mask.shape == (2, 7)  # τ0 = 0: every token active
    assert q.tau.grad is not None
    with torch.no_grad():
        q.tau.fill_(1e9)
    model(tokens())
    assert q.last_sparsity == 1.0


def test_deepcopy_rebinds_registry():
    model = pyflex.patch_model(tiny_model("llama"), r=4)
    clone = copy.deepcopy(model)
    reg, reg2 = pyflex.get_registry(model), pyflex.get_registry(clone)
    assert reg2 is not reg and reg2.model is clone and reg2[0].block is clone.model.layers[0]
    hook = next(iter(clone.model.layers[0]._forward_pre_hooks.values()))
    assert hook.skip.registry is reg2
    reg2.set_active([2])
    assert reg.trainable_indices() == [0, 1, 2]


def test_pickle_and_dtype_conversion_keep_the_patch():
    import pickle
    model = pyflex.patch_model(tiny_model("gpt2"), r=4)
    randomize_flex(model)
    ids = tokens()
    ref = model(ids).logits
    clone = pickle.loads(pickle.dumps(model))
    assert_close(clone(ids).logits, ref)
    assert pyflex.get_registry(clone).model is clone
    clone.double()
    layer = clone.transformer.h[0].attn.c_attn
    assert layer.weight.dtype == layer.lora_A.dtype == torch.float64
    assert_close(clone(ids).logits, ref.double(), atol=1e-4, rtol=1e-4)
    pyflex.unpatch(clone)
    assert clone.transformer.h[0].attn.c_attn.weight.dtype == torch.float64
    assert_close(clone(ids).logits, tiny_model("gpt2")(ids).logits.double(), atol=1e-4, rtol=1e-4)


def test_registry_tau_sparsity_matches_each_layer():
    """registry.tau_sparsity() (one host read) equals the per-module eq. 23 figures averaged per layer."""
    model = pyflex.patch_model(tiny_model("llama"), r=4, target_modules=["q_proj", "down_proj"], tau=True,
                               layers=[0, 2])
    randomize_flex(model)
    registry = pyflex.get_registry(model)
    assert all(v is None for v in registry.tau_sparsity().values())  # nothing has run yet
    with torch.no_grad():
        for name, module in registry.adapter_modules().items():
            module.tau.fill_(1e9 if name.endswith("q_proj") else 0.0)  # q_proj: every token masked; down_proj: none
        model(tokens(batch=2, seq=9))
    got = registry.tau_sparsity()
    assert got[1] is None  # layer 1 is not patched
    for index in (0, 2):
        modules = registry[index].adapters.values()
        expected = sum(m.last_sparsity for m in modules) / len(modules)
        assert got[index] == pytest.approx(expected, abs=1e-6)
        assert got[index] == pytest.approx(0.5)  # the mean of 1.0 (q_proj) and 0.0 (down_proj)


def test_lam_defaults_to_the_paper_value_with_tau_only():
    model = pyflex.patch_model(tiny_model("llama"), r=4, tau=True)
    layers = [m for m in model.modules() if isinstance(m, pyflex.FlexLinear)]
    assert pyflex.model.patch.DEFAULT_LAM == 4.5e-5 and 1e-7 <= pyflex.model.patch.DEFAULT_LAM <= 1e-3
    assert pyflex.get_registry(model).config["lam"] == 4.5e-5 and {m.lam for m in layers} == {4.5e-5}
    explicit = pyflex.patch_model(tiny_model("llama"), r=4, tau=True, lam=2e-6)
    assert pyflex.get_registry(explicit).config["lam"] == 2e-6
    assert pyflex.get_registry(pyflex.patch_model(tiny_model("llama"), r=4)).config["lam"] == 0.0
    for lam in (1e-4, 0.0):  # even λ = 0 without τ is a mistake worth naming: λ does nothing there
        model = tiny_model("llama")
        with pytest.raises(ValueError, match=f"lam={lam!r} is given with tau=False"):
            pyflex.patch_model(model, lam=lam)
        assert not pyflex.model.patch.is_patched(model) and all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_flexlinear_takes_the_training_mode_of_the_module_it_replaces(mode):
    model = tiny_model("llama")
    getattr(model, mode)()
    pyflex.patch_model(model, r=4, dropout=0.5)
    layers = [m for m in model.modules() if isinstance(m, pyflex.FlexLinear)]
    assert layers and all(m.training == (mode == "train") for m in layers)
    if mode == "eval":  # no dropout at inference: two forwards agree with a dropout-free patch
        randomize_flex(model)
        ref = pyflex.patch_model(tiny_model("llama"), r=4)
        randomize_flex(ref)
        ids = tokens()
        assert torch.equal(model(ids).logits, model(ids).logits)
        assert_close(model(ids).logits, ref(ids).logits)


def test_modules_to_save_train_the_head_fully():
    model = tiny_classifier("llama")
    model.score.weight.requires_grad_(False)  # unpatch must give back this flag, not True
    norm = "model.layers.1.post_attention_layernorm"
    pyflex.patch_model(model, r=4, target_modules=["q_proj"], modules_to_save=["score", norm])
    reg = pyflex.get_registry(model)
    assert reg.config["modules_to_save"] == [norm, "score"]
    assert reg.extra_adapters["score"] is model.score and reg[1].adapters[norm] is model.get_submodule(norm)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"score.weight", f"{norm}.weight"} <= trainable
    assert {"score.weight", f"{norm}.weight"} <= set(reg.named_adapter_parameters())
    groups = pyflex.tau_param_groups(model, lr=1e-2)
    assert any(p is model.score.weight for p in groups[0]["params"])
    reg.set_active([0])  # a module to save inside a layer switches with its layer
    assert not model.get_submodule(norm).weight.requires_grad and model.score.weight.requires_grad
    reg.set_active([0, 1, 2])
    opt = torch.optim.AdamW(groups)
    before = model.score.weight.detach().clone()
    model(input_ids=tokens(), labels=torch.tensor([0, 2])).loss.backward()
    opt.step()
    assert not torch.equal(model.score.weight, before)
    trained = model.score.weight.detach().clone()
    pyflex.unpatch(model)
    assert not model.score.weight.requires_grad and model.get_submodule(norm).weight.requires_grad
    assert torch.equal(model.score.weight, trained)  # trained in place: unpatch keeps the values


def test_merge_keeps_the_modules_to_save():
    model = pyflex.patch_model(tiny_classifier("llama"), r=4, modules_to_save=["score"])
    randomize_flex(model)
    with torch.no_grad():
        model.score.weight.mul_(3.0)
    ids = tokens()
    ref = model(ids).logits
    pyflex.merge(model)
    assert not pyflex.model.patch.is_patched(model)
    assert_close(model(ids).logits, ref, atol=1e-4)


def test_modules_to_save_errors_leave_the_model_untouched():
    model = tiny_classifier("llama")
    cases = [
        (dict(modules_to_save=["scores"]), ValueError, "modules_to_save entry 'scores' matches no module"),
        (dict(modules_to_save="score"), TypeError, "must be None or a list of module names"),
        (dict(modules_to_save=["rotary_emb"]), ValueError, "'model.rotary_emb' .*no parameters"),
        (dict(target_modules=["q_proj", "score"], modules_to_save=["score"]), ValueError,
         "selects 'score' and target_modules selects 'score'"),
        (dict(modules_to_save=["layers.0"]), ValueError, "'model.layers.0' and target_modules selects "
                                                         "'model.layers.0.self_attn.q_proj'"),
    ]
    for kwargs, err, pattern in cases:
        with pytest.raises(err, match=pattern):
            pyflex.patch_model(model, **kwargs)
        assert not pyflex.model.patch.is_patched(model) and all(p.requires_grad for p in model.parameters())
    tied = tiny_model("gpt2")  # lm_head.weight is wte.weight
    with pytest.raises(ValueError, match="'lm_head', which shares a parameter with 'transformer.wte.weight'"):
        pyflex.patch_model(tied, modules_to_save=["lm_head"])
    assert not pyflex.model.patch.is_patched(tied)


@pytest.mark.parametrize("family,head", [("llama", "score"), ("bert", "classifier")])
def test_frozen_task_head_warns(family, head):
    with pytest.warns(UserWarning, match=f"'{head}' looks like a newly initialised task head.*"
                                         f"modules_to_save=\\['{head}'\\]"):
        pyflex.patch_model(tiny_classifier(family), r=4, target_modules=["query"] if family == "bert" else "all-linear")
    for kwargs in (dict(modules_to_save=[head]), dict(target_modules=["query", head] if family == "bert"
                                                        else ["q_proj", head])):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            pyflex.patch_model(tiny_classifier(family), r=4, **{"target_modules": ["query"] if family == "bert"
                                                                 else "all-linear", **kwargs})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pyflex.patch_model(tiny_model(family), r=4, target_modules=["query"] if family == "bert" else "all-linear")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_rank_and_alpha_patterns_match_peft(family):
    """Keyword rank_pattern / alpha_pattern: each module gets its own r and α in the op, as PEFT's patterns give."""
    base = tiny_model(family)
    targets = ["q_proj", "down_proj", "o_proj"] if family == "llama" else ["c_attn", "c_fc", "mlp.c_proj"]
    rank_pattern = ({"layers.1.self_attn.q_proj": 2, "down_proj": 6} if family == "llama"
                    else {"h.1.attn.c_attn": 2, "c_fc": 6})
    alpha_pattern = {"o_proj": 3.0, r"layers\.[02]\.mlp\.down_proj": 24} if family == "llama" else {"c_proj": 3.0}
    flex = pyflex.patch_model(copy.deepcopy(base), r=4, alpha=8, rslora=True, target_modules=targets,
                              rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, use_rslora=True, target_modules=targets, rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern, fan_in_fan_out=family == "gpt2"))
    theirs = peft_lora_modules(pm)
    assert set(pyflex.get_registry(flex).adapter_modules()) == set(theirs)
    ranks = set()
    for name, module in theirs.items():
        ours = flex.get_submodule(name)
        assert (ours.r, ours.scaling) == (module.r["default"], module.scaling["default"]), name
        ranks.add(ours.r)
    assert ranks == {2, 4, 6}
    randomize_peft(pm)
    copy_peft_to_flex(pm, flex)
    _compare_logits_and_grads(flex, pm, tokens())
    config = pyflex.get_registry(flex).config
    assert config["rank_pattern"] == rank_pattern and config["alpha_pattern"] == alpha_pattern


def test_pattern_errors_leave_the_model_untouched():
    model = tiny_model("llama")
    cases = [
        (dict(rank_pattern={"q_prj": 2}), "rank_pattern key 'q_prj' selects none of the patched modules"),
        (dict(alpha_pattern={"(": 2}), "alpha_pattern key '\\(' is not a valid regex"),
        (dict(rank_pattern={"q_proj": 0}), r"rank_pattern\['q_proj'\]=0 is not allowed"),
        (dict(rank_pattern={"q_proj": 2.5}), r"rank_pattern\['q_proj'\]=2.5 is not allowed"),
        (dict(alpha_pattern={"q_proj": -1}), r"alpha_pattern\['q_proj'\]=-1 is not allowed"),
    ]
    for kwargs, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            pyflex.patch_model(model, target_modules=["q_proj", "v_proj"], **kwargs)
        assert not pyflex.model.patch.is_patched(model) and all(p.requires_grad for p in model.parameters())
    with pytest.raises(TypeError, match="rank_pattern=.* must be a dict"):
        pyflex.patch_model(model, rank_pattern=[("q_proj", 2)])


def test_keyword_defaults_are_not_counted_as_given():
    """The documented defaults still apply, and an explicit keyword equal to a default is still an explicit keyword."""
    import inspect
    signature = inspect.signature(pyflex.patch_model)
    assert repr(signature.parameters["r"].default) == "8" and repr(signature.parameters["alpha"].default) == "16"
    model = pyflex.patch_model(tiny_model("llama"))
    config = pyflex.get_registry(model).config
    assert (config["r"], config["alpha"], config["bias"], config["tau"]) == (8, 16.0, "none", False)
    with pytest.raises(ValueError, match="keyword argument r=8"):
        pyflex.patch_model(tiny_model("llama"), peft.LoraConfig(), r=8)
