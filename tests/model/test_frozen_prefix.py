"""Frozen layers cost nothing under a schedule (pyflex/model/frozen_prefix.py), and the methods compose (issue #5 item 6)."""
import pytest
import torch

import pyflex
from pyflex.methods.hlpt import apply_hlpt
from pyflex.methods.ist import ImportanceSchedule
from pyflex.methods.lift import LiftSchedule

from _schedule_utils import make_batches, one_thread, snapshot, tiny_llama  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def saved_tensors_per_layer(model, batch):
    """Forward under a saved-tensors hook; count the tensors autograd saves while each block runs."""
    blocks = model.model.layers
    current = {"layer": None}
    counts = {i: 0 for i in range(len(blocks))}
    hooks = []
    for i, block in enumerate(blocks):
        hooks.append(block.register_forward_pre_hook(lambda m, a, i=i: current.__setitem__("layer", i)))
        hooks.append(block.register_forward_hook(lambda m, a, o: current.__setitem__("layer", None)))

    def pack(t):
        if current["layer"] is not None:
            counts[current["layer"]] += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    for h in hooks:
        h.remove()
    return counts, loss


@pytest.mark.parametrize("make", [
    lambda m: LiftSchedule(m, total_steps=4, order="end2front"),             # first step: layer 3 only
    lambda m: ImportanceSchedule(m, n_u=2, t_c=100),
])
def test_layers_below_the_lowest_active_save_nothing(make):
    model = tiny_llama(num_layers=4)
    pyflex.patch_model(model, r=4, alpha=8)
    reg = pyflex.get_registry(model)
    schedule = make(model)
    # every adapter parameter exists and is visible to an optimizer built now
    assert {id(p) for p in schedule.trainable_parameters()} == {id(p) for p in reg.adapter_parameters()}
    opt = torch.optim.AdamW(schedule.trainable_parameters(), lr=1e-2)
    schedule.attach_optimizer(opt)
    batch = make_batches(1)[0]
    with pyflex.use_backend("reference"):
        for _ in range(3):
            active = schedule.step(batch)
            counts, loss = saved_tensors_per_layer(model, batch)
            lowest = min(active)
            for i in range(4):
                if i < lowest:
                    assert counts[i] == 0, f"frozen layer {i} below the lowest active {lowest} saved {counts[i]} tensors"
                else:
                    assert counts[i] > 0
            loss.backward()
            for i in range(4):
                for p in reg[i].parameters():
                    assert (p.grad is None) == (i not in active)  # inactive: no grad, so AdamW skips them
            state_before = {id(p) for p in opt.state}
            opt.step()
            opt.zero_grad(set_to_none=True)
            new_state = {id(p) for p in opt.state} - state_before
            assert new_state <= {id(p) for i in active for p in reg[i].parameters()}


def _train(model, schedule, params, steps, lr=3e-2):
    reg = pyflex.get_registry(model)
    opt = torch.optim.AdamW(params, lr=lr)
    schedule.attach_optimizer(opt)
    batch = make_batches(1, pad=True)[0]
    losses = []
    with pyflex.use_backend("reference"):
        for _ in range(steps):
            active = schedule.step(batch)
            before = snapshot(model.named_parameters())
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            names = reg.named_adapter_parameters()
            allowed = {n for n, p in names.items() if any(p is q for i in active for q in reg[i].parameters())}
            changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
            assert changed <= allowed, f"outside the active set {active}: {sorted(changed - allowed)[:3]}"
    return losses


def test_hlpt_with_ist():
    model = tiny_llama(num_layers=8)
    apply_hlpt(model, variant="h2lpt", prefix_len=4)  # LoRA 0-2, prefix 7
    schedule = ImportanceSchedule(model, n_u=2, n_v=2, t_c=3, n_c=2)
    assert schedule.layers == [0, 1, 2, 7]  # the middle layers have nothing to train
    losses = _train(model, schedule, schedule.trainable_parameters(), steps=7)
    assert losses[-1] < losses[0]
    assert len(schedule.history) == 2
    assert [h.response_scale for h in pyflex.get_registry(model).layers] == [1.0] * 8
    # β reaches the prefix as well as the gated LoRA
    reg = pyflex.get_registry(model)
    reg[7].response_scale = 0.25
    assert model.model.layers[7].self_attn.pyflex_prefix.response_scale == 0.25
    reg[7].response_scale = 1.0


def test_lora_tau_with_ist():
    model = tiny_llama(num_layers=4)
    pyflex.patch_model(model, r=4, alpha=8, tau=True, lam=1e-4)
    schedule = ImportanceSchedule(model, n_u=1, t_c=2, n_c=2)
    groups = pyflex.tau_param_groups(model, lr=3e-2)  # built after the schedule armed every adapter
    assert sum(len(g["params"]) for g in groups) == len(schedule.trainable_parameters())
    losses = _train(model, schedule, groups, steps=5)
    assert losses[-1] < losses[0]


def test_lift_with_tau_mask():
    model = tiny_llama(num_layers=4)
    pyflex.patch_model(model, r=4, alpha=8, tau=True, lam=1e-4)
    schedule = LiftSchedule(model, total_steps=8, policy="grouped")
    losses = _train(model, schedule, pyflex.tau_param_groups(model, lr=3e-2), steps=8)
    assert losses[-1] < losses[0]


def test_two_schedules_on_one_model_is_an_error():
    model = tiny_llama(num_layers=4)
    pyflex.patch_model(model, r=4)
    first = LiftSchedule(model, total_steps=4)
    second = ImportanceSchedule(model)
    with pytest.raises(RuntimeError, match="another schedule"):
        first.step()
    assert len(second.step()) == 1


def test_schedule_on_an_unpatched_model_is_an_error():
    with pytest.raises(ValueError, match="patch"):
        ImportanceSchedule(tiny_llama(num_layers=2))
