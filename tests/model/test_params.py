"""pyflex.trainable_parameters / print_trainable_parameters against PEFT's counts on the same config."""
import copy
import warnings

import pytest
import torch
from torch import nn

import pyflex
from tiny_models import reference_backend, single_thread, tiny_classifier, tiny_model  # noqa: F401 (fixtures)

peft = pytest.importorskip("peft")


def _pair(base, make_config, **flex_kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base), make_config())
        flex = pyflex.patch_model(copy.deepcopy(base), make_config(), **flex_kw)
    return flex, pm


@pytest.mark.parametrize("family,kwargs", [
    ("llama", dict(r=4, target_modules="all-linear")),
    ("gpt2", dict(r=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)),  # lm_head tied to wte: counted once
    ("qwen2", dict(r=4, target_modules=["q_proj", "v_proj"], bias="lora_only",
                   rank_pattern={"layers.0.self_attn.q_proj": 2})),
    ("bert", dict(r=2, target_modules="all-linear", bias="all")),
])
def test_counts_equal_peft(family, kwargs, capsys):
    flex, pm = _pair(tiny_model(family), lambda: peft.LoraConfig(**kwargs))
    counts = pyflex.trainable_parameters(flex)
    assert (counts.trainable, counts.all) == pm.get_nb_trainable_parameters()
    assert counts.this_step is None and counts.trainable > 0
    pm.print_trainable_parameters()
    theirs = capsys.readouterr().out
    pyflex.print_trainable_parameters(flex)
    assert capsys.readouterr().out == theirs
    assert theirs.startswith(f"trainable params: {counts.trainable:,d} || all params: {counts.all:,d} || trainable%: ")


def test_counts_with_modules_to_save_and_tau():
    """PEFT trains a copy of each module to save (counted in its "all params"); pyflex trains it in place. τ adds one
    trainable parameter per adapted module."""
    flex, pm = _pair(tiny_classifier("llama"), lambda: peft.LoraConfig(r=4, target_modules=["q_proj"],
                                                                      task_type="SEQ_CLS"))
    peft_trainable, peft_all = pm.get_nb_trainable_parameters()
    counts = pyflex.trainable_parameters(flex)
    assert counts.trainable == peft_trainable
    assert counts.all == peft_all - flex.score.weight.numel()
    with_tau = pyflex.patch_model(tiny_model("llama"), peft.LoraConfig(r=4, target_modules=["q_proj"]),
                                  pyflex.PyflexConfig(tau=True))
    plain = pyflex.patch_model(tiny_model("llama"), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    a, b = pyflex.trainable_parameters(with_tau), pyflex.trainable_parameters(plain)
    assert (a.trainable - b.trainable, a.all - b.all) == (3, 3)


class Params4bit(nn.Parameter):
    """Stands in for bitsandbytes' 4-bit parameter (recognised by class name, as PEFT does)."""


def test_4bit_parameters_count_their_weights_as_peft():
    model = nn.Module()
    model.packed = Params4bit(torch.zeros(8, 1, dtype=torch.uint8), requires_grad=False)  # 16 weights in 8 bytes
    model.dense = nn.Linear(4, 3)
    ours = pyflex.trainable_parameters(model)
    assert (ours.trainable, ours.all) == peft.PeftModel.get_nb_trainable_parameters(model) == (15, 31)


def test_a_quantized_flexlinear_base_counts_its_weights():
    flex = pyflex.patch_model(tiny_model("llama"), r=4, target_modules=["q_proj"])
    before = pyflex.trainable_parameters(flex)
    layer = flex.model.layers[0].self_attn.q_proj
    weight = layer._parameters.pop("weight")  # as a quantized base would be held: not a parameter
    layer.register_buffer("weight", torch.zeros(8, dtype=torch.uint8))
    assert pyflex.trainable_parameters(flex) == before
    layer._buffers.pop("weight")
    layer.weight = weight


def test_schedule_counts_what_trains_at_this_step():
    model = pyflex.patch_model(tiny_model("llama", layers=4), r=4, target_modules=["q_proj", "v_proj"])
    per_layer = sum(p.numel() for p in pyflex.get_registry(model)[0].parameters())  # q_proj + v_proj: A and B
    assert per_layer == 4 * 32 + 32 * 4 + 4 * 32 + 16 * 4
    total = 4 * per_layer
    schedule = pyflex.LiftSchedule(model, total_steps=8)
    before = pyflex.trainable_parameters(model, schedule=schedule)
    assert (before.trainable, before.this_step) == (total, total)  # armed: everything requires grad until step()
    schedule.step()
    counts = pyflex.trainable_parameters(model, schedule=schedule)
    assert counts == (total, before.all, per_layer)
    assert pyflex.trainable_parameters(model) == (per_layer, before.all, None)  # PEFT's figure: requires_grad now
    ist = pyflex.ImportanceSchedule(model, n_u=2)
    ist.step()
    counts = pyflex.trainable_parameters(model, schedule=ist)
    assert (counts.trainable, counts.this_step) == (total, 2 * per_layer) and len(ist.active_layers) == 2


def test_schedule_errors_and_print_line(capsys):
    model = pyflex.patch_model(tiny_model("llama", layers=4), r=4, target_modules=["q_proj"])
    other = pyflex.patch_model(tiny_model("llama", layers=4), r=4, target_modules=["q_proj"])
    schedule = pyflex.LiftSchedule(other, total_steps=4)
    with pytest.raises(ValueError, match="schedule drives another model's layer registry"):
        pyflex.trainable_parameters(model, schedule=schedule)
    with pytest.raises(TypeError, match="schedule=dict is not a pyflex layer schedule"):
        pyflex.trainable_parameters(model, schedule={})
    schedule.step()
    pyflex.print_trainable_parameters(other, schedule=schedule)
    counts = pyflex.trainable_parameters(other, schedule=schedule)
    assert capsys.readouterr().out == (f"trainable params: {counts.trainable:,d} || all params: {counts.all:,d} || "
                                       f"trainable%: {100 * counts.trainable / counts.all:.4f} || trainable this step: "
                                       f"{counts.this_step:,d}\n")
