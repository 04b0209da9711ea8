"""LIFT schedule: exact sequences, training one block at a time, full-block mode and optimizer-state freeing."""
import copy

import pytest
import torch

import pyflex
from pyflex.methods.lift import LiftSchedule, lift_sequence

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


def _lift_reference(model, batches, sequence, free_on_leave, lr=1e-3):
    """LIFT full mode in plain PyTorch: block ``sequence[k]`` alone requires grad at step k, one AdamW over every
    block parameter, the left block's AdamW state deleted when ``free_on_leave``. Returns the final state dict."""
    blocks = model.model.layers
    for p in model.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW([p for b in blocks for p in b.parameters()], lr=lr)
    previous = None
    for block, batch in zip(sequence, batches):
        if previous is not None and previous != block:
            for p in blocks[previous].parameters():
                p.requires_grad_(False)
                if free_on_leave:
                    opt.state.pop(p, None)
        for p in blocks[block].parameters():
            p.requires_grad_(True)
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        previous = block
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("keep", [False, True])
def test_full_mode_trains_block_weights_without_adapters_in_a_plain_loop(keep):
    """The README's loop (no attach_optimizer): only the active block's own weights train, no LoRA exists, the
    left block's optimizer state is gone at the switch, and the weights equal a plain-PyTorch LIFT."""
    model = tiny_llama(num_layers=4)
    reference = copy.deepcopy(model)
    sched = LiftSchedule(model, total_steps=8, policy="cyclic", target="full", keep_optimizer_state=keep)
    assert not any(isinstance(m, pyflex.FlexLinear) for m in model.modules())
    assert not any("lora" in n or n.endswith(".tau") for n, _ in model.named_parameters())
    reg = pyflex.get_registry(model)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == \
        [n for n, _ in model.named_parameters() if n.startswith("model.layers.")]  # armed: blocks only
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batches = make_batches(8)
    for step, batch in enumerate(batches):
        active = sched.step(batch)[0]
        block_ids = {id(p) for p in reg[active].block.parameters()}
        in_state = {id(p) for p in opt.state}
        if keep:
            assert in_state >= {id(p) for i in range(min(step, 4)) for p in reg[i].block.parameters()}
        else:  # at most the active block holds state (it had some when it was active a pass ago: now freed too)
            assert in_state <= block_ids, f"step {step}: a left block still holds optimizer state"
        before = snapshot(model.named_parameters())
        model(**batch).loss.backward()
        assert all(p.grad is not None for p in reg[active].block.parameters())
        opt.step()
        opt.zero_grad(set_to_none=True)
        changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
        assert changed and all(n.startswith(f"model.layers.{active}.") for n in changed), sorted(changed)[:3]
    assert (sched.freed_state_count > 0) == (not keep)
    want = _lift_reference(reference, batches, sched.sequence, free_on_leave=not keep)
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), want[n]), n  # bitwise: skipped layers run the same kernels without autograd
    pyflex.unpatch(model)  # the block registry comes off and every parameter trains again, as before
    assert all(p.requires_grad for p in model.parameters())


def test_full_mode_optimizer_built_before_the_schedule_is_an_error():
    model = tiny_llama(num_layers=4)
    model.requires_grad_(False)
    model.lm_head.weight.requires_grad_(True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)  # built too early
    sched = LiftSchedule(model, total_steps=4, target="full")
    sched.step()
    model(**make_batches(1)[0]).loss.backward()
    with pytest.raises(ValueError, match="not in the optimizer"):
        opt.step()


def test_full_mode_refuses_a_model_with_adapters(patched):
    with pytest.raises(ValueError, match="adapter parameters"):
        LiftSchedule(patched, total_steps=4, target="full")


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
