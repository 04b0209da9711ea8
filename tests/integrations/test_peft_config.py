"""patch_model(model, peft.LoraConfig(...)) against peft.get_peft_model with the same config: the same modules, r,
α, dropout, modules to save and trainable parameters, the same logits and gradients from the same adapter; every
LoraConfig field pyflex does not implement is an error naming it."""
import copy
import dataclasses
import json
import warnings

import pytest
import torch
from torch import nn

import pyflex
import pyflex.model.patch
from pyflex.model.config import LORA_FIELDS
from tiny_models import (assert_close, copy_peft_to_flex, lm_loss, peft_lora_modules, randomize_peft,  # noqa: F401
                         reference_backend, single_thread, tiny_classifier, tiny_config, tiny_model, tokens)

peft = pytest.importorskip("peft")


def _token_classifier(family="llama"):
    import transformers as tf
    torch.manual_seed(0)
    config = tiny_config(family)
    config.num_labels = 3
    return tf.AutoModelForTokenClassification.from_config(config).eval()


def _question_answering(family="llama"):
    import transformers as tf
    torch.manual_seed(0)
    return tf.AutoModelForQuestionAnswering.from_config(tiny_config(family)).eval()


def _saved_wrappers(pm):
    """{name in the base model: PEFT's ModulesToSaveWrapper}."""
    return {n.removeprefix("base_model.model."): m for n, m in pm.named_modules()
            if type(m).__name__ == "ModulesToSaveWrapper"}


def _peft_trainable_names(pm):
    """PEFT's trainable parameter names, spelled as pyflex's model names them (no wrappers, no adapter name)."""
    out = set()
    for name, p in pm.named_parameters():
        if p.requires_grad:
            name = name.removeprefix("base_model.model.")
            for peft_part, ours in ((".lora_A.default.weight", ".lora_A"), (".lora_B.default.weight", ".lora_B"),
                                    (".modules_to_save.default.", "."), (".base_layer.", ".")):
                name = name.replace(peft_part, ours)
            out.add(name)
    return out


def _copy_saved(pm, flex):
    """PEFT's (randomised) copies of the modules to save into pyflex's modules, trained in place."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, wrapper in _saved_wrappers(pm).items():
            for (_, theirs), (_, ours) in zip(wrapper.modules_to_save["default"].named_parameters(),
                                              flex.get_submodule(name).named_parameters()):
                theirs.add_(torch.randn(theirs.shape, generator=g) * 0.1)
                ours.copy_(theirs)


def _both(base, make_config, *, flex_base=None, pyflex_config=None):
    """(pyflex model, PEFT model) from the same base and a fresh LoraConfig each (get_peft_model edits its config)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's and pyflex's own warnings (fan_in_fan_out, frozen heads)
        pm = peft.get_peft_model(copy.deepcopy(base), make_config())
        args = (make_config(),) if pyflex_config is None else (make_config(), pyflex_config)
        flex = pyflex.patch_model(copy.deepcopy(flex_base or base), *args)
    return flex, pm


def _assert_same_patch(flex, pm):
    """Same adapted modules with the same r, scaling and dropout; same modules to save; same trainable set."""
    theirs = peft_lora_modules(pm)
    ours = {n: m for n, m in pyflex.get_registry(flex).adapter_modules().items() if isinstance(m, pyflex.FlexLinear)}
    assert set(ours) == set(theirs) and ours
    for name, module in theirs.items():
        dropout = module.lora_dropout["default"]
        assert (ours[name].r, ours[name].scaling) == (module.r["default"], module.scaling["default"]), name
        assert ours[name].dropout == (dropout.p if isinstance(dropout, nn.Dropout) else 0.0), name
    assert pyflex.get_registry(flex).config["modules_to_save"] == sorted(
        _saved_wrappers(pm), key=[n for n, _ in flex.named_modules()].index)
    assert {n for n, p in flex.named_parameters() if p.requires_grad} == _peft_trainable_names(pm)


def _assert_same_outputs(flex, pm, ids, loss_fn=None):
    flex.eval(), pm.eval()  # PEFT's new dropout modules start in train mode even on an eval-mode model
    randomize_peft(pm)
    copy_peft_to_flex(pm, flex)
    _copy_saved(pm, flex)
    loss_fn = loss_fn or (lambda model: lm_loss(model, ids))
    flex_logits, flex_loss = loss_fn(flex)
    peft_logits, peft_loss = loss_fn(pm)
    assert_close(flex_logits, peft_logits)
    flex_loss.backward()
    peft_loss.backward()
    for name, module in peft_lora_modules(pm).items():
        ours = flex.get_submodule(name)
        assert_close(ours.lora_A.grad, module.lora_A["default"].weight.grad, msg=f"{name}.lora_A.grad")
        assert_close(ours.lora_B.grad, module.lora_B["default"].weight.grad, msg=f"{name}.lora_B.grad")
    for name, wrapper in _saved_wrappers(pm).items():
        for (_, theirs), (_, ours) in zip(wrapper.modules_to_save["default"].named_parameters(),
                                          flex.get_submodule(name).named_parameters()):
            assert_close(ours.grad, theirs.grad, msg=f"{name} (module to save) grad")


def _classifier_loss(ids):
    def run(model):
        out = model(input_ids=ids)
        logits = out.logits if "logits" in out else torch.stack([out.start_logits, out.end_logits])
        return logits, logits.float().pow(2).mean()
    return run


CASES = {
    # name: (model builder, LoraConfig kwargs)
    "all-linear": (lambda: tiny_model("llama"), dict(r=4, lora_alpha=8, target_modules="all-linear")),
    "ALL-LINEAR gpt2": (lambda: tiny_model("gpt2"), dict(r=4, target_modules="ALL-LINEAR")),
    "all-linear bert (head, transform.dense)": (lambda: tiny_model("bert"), dict(r=4, target_modules="all-linear")),
    "default targets llama": (lambda: tiny_model("llama"), dict(r=4, lora_alpha=16)),
    "default targets gpt2 (Conv1D)": (lambda: tiny_model("gpt2"), dict(r=2, fan_in_fan_out=True)),
    "list, int layer": (lambda: tiny_model("llama"), dict(r=4, target_modules=["q_proj", "mlp.down_proj", "nope"],
                                                          layers_to_transform=1)),
    "list, layers + pattern": (lambda: tiny_model("gpt2"), dict(r=4, target_modules=["c_attn", "c_fc"],
                                                                layers_to_transform=[0, 2], layers_pattern="h",
                                                                fan_in_fan_out=True)),
    "regex": (lambda: tiny_model("llama"), dict(r=4, target_modules=r".*\.(1|2)\.self_attn\.(k|o)_proj")),
    "exclude list": (lambda: tiny_model("llama"), dict(r=4, target_modules="all-linear",
                                                       exclude_modules=["down_proj", "layers.0.self_attn.q_proj"])),
    "exclude regex": (lambda: tiny_model("llama"), dict(r=4, target_modules=["q_proj", "v_proj"],
                                                        exclude_modules=r".*layers\.2\..*")),
    "rank/alpha patterns + rslora": (lambda: tiny_model("llama"), dict(
        r=4, lora_alpha=8, use_rslora=True, target_modules="all-linear",
        rank_pattern={"layers.1.self_attn.q_proj": 2, "down_proj": 6, r"up_.*": 3},
        alpha_pattern={"o_proj": 3.5, "layers.2.mlp.gate_proj": 32})),
    "modules_to_save suffix rule": (lambda: tiny_model("llama"), dict(r=4, target_modules=["q_proj"],
                                                                      modules_to_save=["norm"])),
    "bias all": (lambda: tiny_model("qwen2"), dict(r=4, target_modules=["q_proj", "o_proj"], bias="all")),
    "bias lora_only": (lambda: tiny_model("qwen2"), dict(r=4, target_modules=["q_proj", "o_proj"], bias="lora_only")),
    "dropout": (lambda: tiny_model("llama"), dict(r=4, target_modules=["v_proj"], lora_dropout=0.25)),
    "inference_mode": (lambda: tiny_model("llama"), dict(r=4, target_modules=["q_proj"], inference_mode=True,
                                                         modules_to_save=["lm_head"])),
}
CLASSIFIER_CASES = {
    "SEQ_CLS all-linear": (tiny_classifier, dict(r=4, target_modules="all-linear", task_type="SEQ_CLS")),
    "classifier all-linear, no task": (tiny_classifier, dict(r=4, target_modules="all-linear")),
    "SEQ_CLS bert": (lambda: tiny_classifier("bert"), dict(r=4, target_modules=["query", "value"],
                                                           task_type="SEQ_CLS")),
    "TOKEN_CLS": (_token_classifier, dict(r=4, target_modules=["q_proj", "v_proj"], task_type="TOKEN_CLS")),
    "QUESTION_ANS": (_question_answering, dict(r=4, target_modules=["k_proj"], task_type="QUESTION_ANS")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_lora_config_patches_what_get_peft_model_adapts(case):
    build, kwargs = CASES[case]
    base = build()
    flex, pm = _both(base, lambda: peft.LoraConfig(**kwargs))
    _assert_same_patch(flex, pm)
    if case == "inference_mode":
        assert not any(p.requires_grad for p in flex.parameters())
        return
    _assert_same_outputs(flex, pm, tokens())


@pytest.mark.parametrize("case", list(CLASSIFIER_CASES))
def test_lora_config_task_types_match_get_peft_model(case):
    build, kwargs = CLASSIFIER_CASES[case]
    base = build()
    flex, pm = _both(base, lambda: peft.LoraConfig(**kwargs))
    _assert_same_patch(flex, pm)
    ids = tokens()
    _assert_same_outputs(flex, pm, ids, loss_fn=_classifier_loss(ids))


def test_rank_pattern_gives_each_module_its_own_rank():
    base = tiny_model("llama")
    flex, pm = _both(base, lambda: peft.LoraConfig(r=4, target_modules=["q_proj", "down_proj"],
                                                   rank_pattern={"down_proj": 2, "layers.0.self_attn.q_proj": 8}))
    layer0, layer1 = flex.model.layers[0], flex.model.layers[1]
    assert layer0.self_attn.q_proj.lora_A.shape == (8, 32) and layer1.self_attn.q_proj.lora_A.shape == (4, 32)
    assert layer1.mlp.down_proj.lora_B.shape == (32, 2)
    assert pyflex.get_registry(flex).config["rank_pattern"] == {"down_proj": 2, "layers.0.self_attn.q_proj": 8}


@pytest.mark.parametrize("init", [True, "gaussian", "Gaussian", False])
def test_init_lora_weights_follow_peft(init):
    """pyflex's adapter at init has PEFT's distribution for each supported init (same laws, independent draws)."""
    base = tiny_model("llama")
    flex, pm = _both(base, lambda: peft.LoraConfig(r=8, target_modules="all-linear", init_lora_weights=init))
    theirs = peft_lora_modules(pm)
    for part in ("lora_A", "lora_B"):
        ours_values = torch.cat([getattr(flex.get_submodule(n), part).detach().flatten() for n in theirs])
        peft_values = torch.cat([getattr(m, part)["default"].weight.detach().flatten() for m in theirs.values()])
        if part == "lora_B" and init is not False:
            assert not ours_values.any() and not peft_values.any()
            continue
        assert ours_values.std().item() == pytest.approx(peft_values.std().item(), rel=0.1)
        assert abs(ours_values.mean().item()) < 0.1 * ours_values.std().item()
        # the shape of the law: share within one std (normal 0.68, uniform 0.58) and, for uniform, the same support
        within = [(v.abs() <= v.std()).float().mean().item() for v in (ours_values, peft_values)]
        assert within[0] == pytest.approx(within[1], abs=0.03)
        if init != "gaussian" and not (isinstance(init, str) and init.lower() == "gaussian"):
            assert ours_values.abs().max() <= peft_values.abs().max() * 1.05
    if init is True:  # pyflex's own init is PEFT's default: the bound is 1/√in for A
        q = flex.model.layers[0].self_attn.q_proj
        assert q.lora_A.abs().max() <= 1 / 32 ** 0.5


def test_every_lora_config_field_of_the_installed_peft_is_decided():
    """The rule table covers every LoraConfig field of this peft (a new field must be decided, not ignored)."""
    fields = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    assert fields <= set(LORA_FIELDS), sorted(fields - set(LORA_FIELDS))


REFUSED = {
    "use_dora": True, "use_qalora": True, "lora_bias": True, "ensure_weight_tying": True,
    "loftq_config": {"loftq_bits": 4}, "megatron_config": {"tensor_model_parallel_size": 1},
    "trainable_token_indices": [1, 2], "layer_replication": [[0, 2]], "target_parameters": ["mlp.experts.weight"],
    "alora_invocation_tokens": [5], "use_bdlora": {"lora_a_is_blockdiagonal": True}, "eva_config": {"rho": 2.0},
    "corda_config": {"cache_file": "x"}, "lora_ga_config": {"batch_size": 2}, "velora_config": {"x": 1},
    "monteclora_config": {"x": 1}, "arrow_config": {"top_k": 2}, "kasa_config": {"beta": 1.0},
    "init_lora_weights": "pissa", "task_type": "SOMETHING_NEW",
}


@pytest.mark.parametrize("field", list(REFUSED))
def test_unsupported_lora_config_fields_are_errors_naming_them(field):
    config = peft.LoraConfig(r=4, target_modules=["q_proj"])
    object.__setattr__(config, field, REFUSED[field])  # past LoraConfig's own checks: pyflex's rule is under test
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=f"{field}={REFUSED[field]!r}".replace("[", r"\[").replace("(", r"\(")):
        pyflex.patch_model(model, config)
    assert not pyflex.model.patch.is_patched(model) and all(p.requires_grad for p in model.parameters())


def test_other_inits_and_unknown_fields_are_refused():
    model = tiny_model("llama")
    for init in ("olora", "loftq", "orthogonal", "pissa_niter_4", "corda", "eva"):
        config = peft.LoraConfig(r=4, target_modules=["q_proj"])
        object.__setattr__(config, "init_lora_weights", init)
        with pytest.raises(ValueError, match=f"init_lora_weights={init!r} is not supported"):
            pyflex.patch_model(model, config)
    config = peft.LoraConfig(r=4, target_modules=["q_proj"])
    object.__setattr__(config, "runtime_config", peft.tuners.lora.config.LoraRuntimeConfig(ephemeral_gpu_offload=True))
    with pytest.raises(ValueError, match="runtime_config=.*ephemeral_gpu_offload=True"):
        pyflex.patch_model(model, config)
    # a field a newer peft might add: through the dict path (adapter_config.json), set → refused, empty → accepted
    from pyflex.model.config import lora_plan_from_config
    with pytest.raises(ValueError, match="use_future_trick=True is not supported: pyflex does not know this LoraConfig field"):
        lora_plan_from_config(model, {"r": 4, "target_modules": ["q_proj"], "use_future_trick": True})
    plan = lora_plan_from_config(model, {"r": 4, "target_modules": ["q_proj"], "use_future_trick": None})
    assert len(plan.targets) == 3
    assert not pyflex.model.patch.is_patched(model)


def test_target_selection_errors():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"target_modules=\['nothing'\] matches no module"):
        pyflex.patch_model(model, peft.LoraConfig(target_modules=["nothing"]))
    with pytest.raises(ValueError, match="selects 'model.embed_tokens' of type Embedding: pyflex adapts nn.Linear"):
        pyflex.patch_model(model, peft.LoraConfig(target_modules=["embed_tokens", "q_proj"]))
    with pytest.raises(ValueError, match="selects 'model.layers.0.mlp' of type LlamaMLP"):
        peft_err = None
        try:
            peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(target_modules=["mlp"]))
        except ValueError as exc:  # PEFT refuses it too
            peft_err = exc
        assert peft_err is not None
        pyflex.patch_model(model, peft.LoraConfig(target_modules=["mlp"]))
    custom = nn.Module()
    custom.config = type("Cfg", (), {"model_type": "not_in_peft"})()
    with pytest.raises(ValueError, match="PEFT has no default target modules for model_type='not_in_peft'"):
        pyflex.patch_model(custom, peft.LoraConfig())
    assert not pyflex.model.patch.is_patched(model)


def test_fan_in_fan_out_mismatch_warns_and_uses_the_module_layout_as_peft():
    base = tiny_model("gpt2")
    with pytest.warns(UserWarning, match="fan_in_fan_out=False, but 'transformer.h.0.attn.c_attn' is a GPT-2 Conv1D"):
        flex = pyflex.patch_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=["c_attn"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=["c_attn"]))
    _assert_same_outputs(flex, pm, tokens())


def test_unmatched_modules_to_save_entry_warns():
    with pytest.warns(UserWarning, match="modules_to_save entry 'scroe' matches no module"):
        pyflex.patch_model(tiny_model("llama"), peft.LoraConfig(target_modules=["q_proj"], modules_to_save=["scroe"]))


def test_the_given_config_is_not_modified():
    config = peft.LoraConfig(r=4, target_modules="all-linear", task_type="SEQ_CLS")
    before = copy.deepcopy(config.to_dict())
    pyflex.patch_model(tiny_classifier("llama"), config)
    assert config.to_dict() == before


# ---------------------------------------------------------------------------------------------------------------------
# keywords, PyflexConfig and LoraConfig together
# ---------------------------------------------------------------------------------------------------------------------
def test_pyflex_config_and_keywords_give_the_same_patch():
    lora = dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    by_configs = pyflex.patch_model(tiny_model("llama"), peft.LoraConfig(**lora),
                                    pyflex.PyflexConfig(tau=True, lam=1e-4, tau0=0.01, recompute_mlp=False))
    by_keywords = pyflex.patch_model(tiny_model("llama"), r=4, alpha=8, target_modules=["q_proj", "down_proj"],
                                     tau=True, lam=1e-4, tau0=0.01, recompute_mlp=False)
    by_pyflex_only = pyflex.patch_model(tiny_model("llama"),
                                        pyflex.PyflexConfig(tau=True, lam=1e-4, tau0=0.01, recompute_mlp=False),
                                        r=4, alpha=8, target_modules=["q_proj", "down_proj"])
    by_lora_and_keywords = pyflex.patch_model(tiny_model("llama"), peft.LoraConfig(**lora), tau=True, lam=1e-4,
                                              tau0=0.01, recompute_mlp=False)
    configs = [pyflex.get_registry(m).config for m in (by_configs, by_keywords, by_pyflex_only, by_lora_and_keywords)]
    records = ("lora_config", "pyflex_config")
    for config in configs[1:]:
        assert {k: v for k, v in config.items() if k not in records} == \
            {k: v for k, v in configs[0].items() if k not in records}
    assert configs[0]["pyflex_config"] == dict(tau=True, lam=1e-4, target_sparsity=None, tau0=0.01, adapter_dtype=None,
                                               recompute_mlp=False, layers_path=None)
    assert configs[0]["lora_config"]["target_modules"] == ["down_proj", "q_proj"]
    assert configs[1]["lora_config"] is None
    torch.manual_seed(5)
    ids = tokens()
    for model in (by_keywords, by_pyflex_only, by_lora_and_keywords):
        model.load_state_dict(by_configs.state_dict())
        assert_close(model(ids).logits, by_configs(ids).logits)


def test_config_argument_errors_leave_the_model_untouched():
    model = tiny_model("llama")
    lora = peft.LoraConfig(r=4, target_modules=["q_proj"])
    cases = [
        ((lora,), dict(r=8), ValueError, r"got a peft.LoraConfig and the keyword argument r=8, which the "
                                         r"peft.LoraConfig sets"),
        ((lora,), dict(target_modules=["v_proj"], layers=[1]), ValueError, r"keyword arguments target_modules="),
        ((pyflex.PyflexConfig(tau=True),), dict(tau0=0.1), ValueError, "got a pyflex.PyflexConfig and the keyword "
                                                                       "argument tau0=0.1"),
        ((pyflex.PyflexConfig(), pyflex.PyflexConfig()), {}, TypeError, "two PyflexConfig"),
        (({"r": 4},), {}, TypeError, "must be a peft.LoraConfig or a pyflex.PyflexConfig, got dict"),
        ((lora, lora), {}, TypeError, "pyflex_config must be a pyflex.PyflexConfig, got LoraConfig"),
        ((peft.IA3Config(target_modules=["q_proj"], feedforward_modules=[]),), {}, ValueError,
         "peft_type='IA3' is not supported: pyflex adapts with LoRA only"),
    ]
    for args, kwargs, err, pattern in cases:
        with pytest.raises(err, match=pattern):
            pyflex.patch_model(model, *args, **kwargs)
        assert not pyflex.model.patch.is_patched(model) and all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="lam=0.001 is given with tau=False"):
        pyflex.PyflexConfig(lam=1e-3)
    with pytest.raises(ValueError, match="adapter_dtype='float8'"):
        pyflex.PyflexConfig(adapter_dtype="float8")
    assert pyflex.PyflexConfig(adapter_dtype="bfloat16").adapter_dtype is torch.bfloat16
    assert pyflex.PyflexConfig.from_dict(pyflex.PyflexConfig(tau=True, adapter_dtype=torch.float16).to_dict()) == \
        pyflex.PyflexConfig(tau=True, adapter_dtype=torch.float16)
    with pytest.raises(ValueError, match="PyflexConfig has no field 'taus'"):
        pyflex.PyflexConfig.from_dict({"taus": True})


def test_to_lora_config_gives_peft_the_same_patch():
    from pyflex.integrations.peft_config import to_lora_config
    base = tiny_model("llama")
    flex = pyflex.patch_model(copy.deepcopy(base), r=4, alpha=8, target_modules=["q_proj", "up_proj"], layers=[0, 2],
                              rank_pattern={"up_proj": 2}, alpha_pattern={"layers.2.self_attn.q_proj": 3.0})
    config = to_lora_config(flex)
    pm = peft.get_peft_model(copy.deepcopy(base), config)
    _assert_same_patch(flex, pm)
    _assert_same_outputs(flex, pm, tokens())
    assert json.dumps(peft.LoraConfig(**{k: v for k, v in config.to_dict().items() if k != "peft_type"}).to_dict(),
                      sort_keys=True, default=str)  # a plain, serialisable config


def test_import_pyflex_does_not_import_peft():
    import subprocess
    import sys
    code = ("import sys, pyflex; pyflex.patch_model; pyflex.PyflexConfig; pyflex.trainable_parameters; "
            "import pyflex.integrations.peft_config; print(any(m == 'peft' or m.startswith('peft.') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
