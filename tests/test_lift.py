"""LIFT schedule: exact sequences, training one block at a time, full-block mode and optimizer-state freeing."""
import pytest
import torch

import pyflex
from pyflex.schedules import LiftSchedule, lift_sequence

from _schedule_utils import make_batches, one_thread, snapshot, tiny_llama  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


# -- sequences ----------------------------------------------------------------------------------------------
def test_grouped_front2end_matches_appendix():
    assert lift_sequence([0, 1, 2, 3], 8, order="front2end", policy="grouped") == [0, 0, 1, 1, 2, 2, 3, 3]


def test_cyclic_front2end_matches_appendix():
    assert lift_sequence([0, 1, 2, 3], 8, order="front2end", policy="cyclic") == [0, 1, 2, 3, 0, 1, 2, 3]


def test_end2front_is_reversed():
    assert lift_sequence([0, 1, 2, 3], 8, order="end2front", policy="grouped") == [3, 3, 2, 2, 1, 1, 0, 0]
    assert lift_sequence([0, 1, 2, 3], 8, order="end2front", policy="cyclic") == [3, 2, 1, 0, 3, 2, 1, 0]


def test_remainder_goes_to_the_end():
    # t = 10, N = 4: ⌊10/4⌋ = 2 per block; the 2 leftover iterations come last.
    assert lift_sequence([0, 1, 2, 3], 10, policy="grouped") == [0, 0, 1, 1, 2, 2, 3, 3, 3, 3]
    assert lift_sequence([0, 1, 2, 3], 10, policy="cyclic") == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]


def test_layer_range_and_errors():
    assert lift_sequence([4, 5, 6], 6) == [4, 4, 5, 5, 6, 6]
    with pytest.raises(ValueError, match="total_steps"):
        lift_sequence([0, 1, 2, 3], 3)
    with pytest.raises(ValueError, match="order"):
        lift_sequence([0, 1], 4, order="middle-out")
    with pytest.raises(ValueError, match="policy"):
        lift_sequence([0, 1], 4, policy="interleaved")


def test_random_is_seeded_reproducible_and_uniform_with_replacement():
    def seq(seed, policy="grouped", t=8):
        return lift_sequence([0, 1, 2, 3], t, order="random", policy=policy,
                             generator=torch.Generator().manual_seed(seed))
    assert seq(3) == seq(3)
    assert seq(3, "cyclic") == seq(3, "cyclic")
    grouped = seq(3)
    assert all(grouped[2 * k] == grouped[2 * k + 1] for k in range(4))  # grouped: each slot held ⌊t/N⌋ = 2 steps
    draws = [tuple(seq(s, t=4)) for s in range(40)]
    assert len(set(draws)) > 20  # different seeds give different orders
    assert any(len(set(d)) < 4 for d in draws)  # with replacement: some orders repeat a block


# -- on a model ---------------------------------------------------------------------------------------------
@pytest.fixture
def patched():
    model = tiny_llama(num_layers=4)
    pyflex.patch_model(model, r=4, alpha=8, target_modules="all-linear")
    return model


def test_schedule_sequence_and_active_layers(patched):
    sched = LiftSchedule(patched, total_steps=8, policy="grouped", layer_range=(1, 3))
    assert sched.layers == [1, 2]
    seen = [sched.step()[0] for _ in range(8)]
    assert seen == [1, 1, 1, 1, 2, 2, 2, 2]
    reg = pyflex.get_registry(patched)
    assert reg.trainable_indices() == [2]
    # steps past t wrap around
    assert sched.step() == [1]


def test_lora_mode_trains_only_the_active_block(patched):
    reg = pyflex.get_registry(patched)
    sched = LiftSchedule(patched, total_steps=8, policy="cyclic")
    opt = torch.optim.AdamW(sched.trainable_parameters(), lr=3e-2)
    sched.attach_optimizer(opt)
    batches = make_batches(1) * 8  # one batch repeated: the loss must go down
    losses = []
    with pyflex.use_backend("reference"):
        for batch in batches:
            active = sched.step(batch)
            before = snapshot(patched.named_parameters())
            loss = patched(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            after = dict(patched.named_parameters())
            changed = {n for n, v in before.items() if not torch.equal(v, after[n].detach())}
            allowed = {n for n, p in reg[active[0]].named_parameters()}
            allowed = {n for n in before if any(n.endswith(a) for a in allowed)}
            assert changed, "the active block did not change"
            assert changed <= allowed, f"parameters outside block {active} changed: {sorted(changed - allowed)[:3]}"
    assert losses[-1] < losses[0]


def test_full_mode_trains_base_weights_and_frees_optimizer_state(patched):
    reg = pyflex.get_registry(patched)
    sched = LiftSchedule(patched, total_steps=4, policy="grouped", target="full")
    params = sched.trainable_parameters()
    block0 = {id(p) for p in reg[0].block.parameters()}
    assert block0 <= {id(p) for p in params}
    opt = torch.optim.AdamW(params, lr=1e-3)
    sched.attach_optimizer(opt)
    batches = make_batches(4)
    with pyflex.use_backend("reference"):
        for step, batch in enumerate(batches):
            sched.step(batch)
            w = reg[step].block.mlp.down_proj.weight
            w_before = w.detach().clone()
            other = reg[(step + 1) % 4].block.mlp.down_proj.weight.detach().clone()
            patched(**batch).loss.backward()
            assert w.grad is not None, "the base weight of the active block got no gradient (∂W0)"
            opt.step()
            opt.zero_grad(set_to_none=True)
            assert not torch.equal(w.detach(), w_before)
            assert torch.equal(reg[(step + 1) % 4].block.mlp.down_proj.weight.detach(), other)
            # only the active block holds optimizer state: the previous one was freed on leaving it
            with_state = {id(p) for p in opt.state}
            assert with_state <= {id(p) for p in reg[step].block.parameters()} | {id(p) for p in reg[step].parameters()}
    assert sched.freed_state_count > 0


def test_full_mode_keep_optimizer_state(patched):
    sched = LiftSchedule(patched, total_steps=4, target="full", keep_optimizer_state=True)
    opt = torch.optim.AdamW(sched.trainable_parameters(), lr=1e-3)
    sched.attach_optimizer(opt)
    with pyflex.use_backend("reference"):
        for batch in make_batches(2):
            sched.step(batch)
            patched(**batch).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    reg = pyflex.get_registry(patched)
    assert sched.freed_state_count == 0
    assert any(id(p) in {id(q) for q in opt.state} for p in reg[0].block.parameters())


def test_total_steps_can_come_later(patched):
    sched = LiftSchedule(patched, policy="cyclic")
    with pytest.raises(RuntimeError, match="total_steps"):
        sched.step()
    sched.set_total_steps(8)
    assert [sched.step()[0] for _ in range(4)] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="cannot change"):
        sched.set_total_steps(12)


def test_attach_optimizer_rejects_missing_parameters(patched):
    sched = LiftSchedule(patched, total_steps=4)
    reg = pyflex.get_registry(patched)
    opt = torch.optim.AdamW(reg[0].parameters(), lr=1e-3)  # only block 0's adapters
    with pytest.raises(ValueError, match="not in the optimizer"):
        sched.attach_optimizer(opt)


def test_state_dict_resume_continues_exactly(patched):
    a = LiftSchedule(patched, total_steps=12, order="random", policy="cyclic", seed=7)
    first = [a.step()[0] for _ in range(5)]
    state = a.state_dict()
    rest_a = [a.step()[0] for _ in range(7)]
    b = LiftSchedule(patched, total_steps=12, order="random", policy="cyclic", seed=123)  # different seed
    b.load_state_dict(state)
    assert b.active_layers == [first[-1]]
    assert [b.step()[0] for _ in range(7)] == rest_a
    with pytest.raises(ValueError, match="policy"):
        LiftSchedule(patched, total_steps=12, order="random", policy="grouped").load_state_dict(state)
