"""IST schedule: sampling, the importance update formula (paper and official-code modes), training only the
active layers, state round trip."""
import math

import pytest
import torch

import pyflex
from pyflex.methods.ist import ImportanceSchedule

from _schedule_utils import make_batches, one_thread, snapshot, tiny_llama  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

BETA = 0.25


@pytest.fixture
def patched():
    model = tiny_llama(num_layers=4)
    pyflex.patch_model(model, r=4, alpha=8, target_modules="all-linear")
    return model


class FakeLoss:
    """loss = 1 + Σ_i w_i·[layer i suppressed]; records the response scales it saw (eq. 8 check)."""

    def __init__(self, registry, weights):
        self.registry, self.weights, self.seen = registry, weights, []

    def __call__(self, model, batch):
        scales = [h.response_scale for h in self.registry.layers]
        self.seen.append(scales)
        return torch.tensor(1.0 + sum(w for w, s in zip(self.weights, scales) if s != 1.0))


def test_counts_and_defaults(patched):
    s = ImportanceSchedule(patched)
    assert (s.n_u, s.n_v, s.n_c, s.t_c, s.beta, s.mu, s.mode) == (1, 2, 3, 10, 0.25, 10.0, "paper")
    s = ImportanceSchedule(patched, n_u=2, n_v=0.75)
    assert (s.n_u, s.n_v) == (2, 3)
    with pytest.raises(ValueError, match="n_u"):
        ImportanceSchedule(patched, n_u=5)
    with pytest.raises(ValueError, match="mode"):
        ImportanceSchedule(patched, mode="lisa")


# Table 8 (and Table 9) of the IST paper: N_L, N_u, N_v per model with N_u = 25 %, N_v = 50 % of the layers.
TABLE_8 = [(32, 8, 16), (40, 10, 20), (28, 7, 14), (30, 8, 15), (32, 8, 16), (32, 8, 16)]


def test_counts_round_half_up_as_table_8_lists_them():
    model = tiny_llama(num_layers=40, hidden=8, heads=2, kv_heads=1)
    pyflex.patch_model(model, r=1, target_modules=["down_proj"])
    for n_layers, n_u, n_v in TABLE_8:
        s = ImportanceSchedule(model, layers=range(n_layers))
        assert (len(s.layers), s.n_u, s.n_v) == (n_layers, n_u, n_v)
        assert len(s.step()) == n_u
    # official mode keeps the official code's int(L·fraction): 30 layers → 7 (the table's 8 is the paper's count)
    s = ImportanceSchedule(model, layers=range(30), mode="official")
    assert (s.n_u, s.n_v) == (7, 15)


@pytest.mark.parametrize("mode", ["paper", "official"])
def test_importance_update_matches_formula(patched, mode):
    reg = pyflex.get_registry(patched)
    weights = [0.5, 0.1, 0.0, 0.3]
    fake = FakeLoss(reg, weights)
    s = ImportanceSchedule(patched, n_u=1, n_v=2, n_c=3, t_c=2, beta=BETA, mu=10.0, mode=mode, loss_fn=fake)
    scores = torch.zeros(4, dtype=torch.float64)
    for step in range(7):
        s.step(batch={"unused": True})
        if step > 0 and step % 2 == 0:
            rec = s.history[-1]
            assert rec["step"] == step
            sets = rec["candidates"]
            assert len(sets) == 3 and all(len(c) == 2 for c in sets)
            seen = fake.seen[-3:]
            losses = []
            for cand, scales in zip(sets, seen):
                # eq. 8: paper suppresses the layers OUTSIDE the set; the official code the layers IN it
                for i, sc in enumerate(scales):
                    suppressed = (i not in cand) if mode == "paper" else (i in cand)
                    assert sc == pytest.approx(BETA if suppressed else 1.0)
                losses.append(1.0 + sum(w for i, w in enumerate(weights) if (i not in cand) == (mode == "paper")))
            assert rec["losses"] == pytest.approx(losses)
            mean = sum(math.exp(-l) for l in losses) / 3
            rewards = [math.exp(-l) - mean for l in losses]
            assert rec["rewards"] == pytest.approx(rewards, abs=1e-6)
            factor = torch.sigmoid(scores) * (1 - torch.sigmoid(scores))
            for cand, r in zip(sets, rewards):
                for i in cand:
                    scores[i] += 10.0 * r * (factor[i] if mode == "official" else 1.0)
            expected_importance = scores if mode == "paper" else -scores
            assert torch.allclose(s.importance, expected_importance, atol=1e-5)
            if mode == "official":
                assert all(a != b for k, a in enumerate(sets) for b in sets[:k])  # distinct sets
    assert len(s.history) == 3
    # response scales restored after every round
    assert [h.response_scale for h in reg.layers] == [1.0] * 4


def test_importance_steers_sampling(patched):
    s = ImportanceSchedule(patched, n_u=2, t_c=1000)
    s.scores[:] = torch.tensor([-10.0, 10.0, -10.0, 10.0], dtype=torch.float64)
    for _ in range(20):
        assert s.step() == [1, 3]
    s.scores.zero_()
    picks = {tuple(s.step()) for _ in range(30)}
    assert len(picks) > 2  # equal importance: the active set varies


def test_update_needs_a_batch(patched):
    s = ImportanceSchedule(patched, t_c=1)
    s.step()  # step 0: no update yet
    with pytest.raises(ValueError, match="batch"):
        s.step()


def test_importance_data_is_cycled(patched):
    reg = pyflex.get_registry(patched)
    seen_batches = []

    def loss_fn(model, batch):
        seen_batches.append(batch["k"])
        return torch.tensor(1.0)

    data = [{"k": torch.tensor(0)}, {"k": torch.tensor(1)}]
    s = ImportanceSchedule(patched, t_c=1, n_c=1, loss_fn=loss_fn, importance_data=data)
    for _ in range(4):
        s.step()
    assert [int(k) for k in seen_batches] == [0, 1, 0]
    assert reg is s.registry


@pytest.mark.parametrize("source", ["list", "batches"])
def test_importance_data_position_is_in_the_state(patched, source):
    """A schedule restored mid-pass draws the importance batches the saved one would have drawn next."""
    rows = [{"k": torch.tensor(i)} for i in range(5)]

    def make(seen, seed):
        data = rows[:3] if source == "list" else pyflex.ImportanceBatches(rows, batch_size=2, seed=seed)
        loss = lambda model, batch: seen.append(batch["k"].tolist()) or torch.tensor(1.0)  # noqa: E731
        return ImportanceSchedule(patched, t_c=1, n_c=1, loss_fn=loss, importance_data=data, seed=seed)

    seen_a, seen_b = [], []
    a = make(seen_a, 3)
    for _ in range(5):  # updates at steps 1-4 draw 4 batches: one pass and one batch into the next
        a.step()
    state = a.state_dict()
    for _ in range(6):
        a.step()
    b = make(seen_b, 8)  # another seed: the saved state decides
    b.load_state_dict(state)
    for _ in range(6):
        b.step()
    assert seen_b == seen_a[4:] and len(seen_b) == 6
    if source == "list":
        assert seen_a == [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]
    else:  # passes of 2 + 2 + 1 rows, each a fresh permutation of all 5
        passes = [sum(seen_a[k:k + 3], []) for k in (0, 3, 6)]
        assert all(sorted(p) == [0, 1, 2, 3, 4] for p in passes) and passes[0] != passes[1]


def test_default_loss_uses_model_output_and_restores_mode(patched):
    s = ImportanceSchedule(patched, t_c=1, n_c=2)
    batch = make_batches(1)[0]
    patched.train()
    with pyflex.use_backend("reference"):
        s.step(batch)
        s.step(batch)
    assert patched.training
    assert len(s.history) == 1 and all(math.isfinite(l) and l > 0 for l in s.history[0]["losses"])


def test_trains_exactly_n_u_layers_and_only_they_change(patched):
    reg = pyflex.get_registry(patched)
    s = ImportanceSchedule(patched, n_u=2, t_c=2, n_c=2)
    opt = torch.optim.AdamW(s.trainable_parameters(), lr=3e-2)
    s.attach_optimizer(opt)
    losses = []
    with pyflex.use_backend("reference"):
        for batch in make_batches(1) * 5:  # one batch repeated: the loss must go down
            active = s.step(batch)
            assert len(active) == 2 and reg.trainable_indices() == active
            before = snapshot(reg.named_adapter_parameters().items())
            loss = patched(**batch).loss
            loss.backward()
            for i in range(4):
                grads = [p.grad for p in reg[i].parameters()]
                assert all((g is None) != (i in active) for g in grads), f"layer {i} grad state is wrong"
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            after = reg.named_adapter_parameters()
            changed_layers = {i for i in range(4) for n, p in reg[i].named_parameters()
                              if not torch.equal(before[n], after[n].detach())}
            assert changed_layers == set(active)
    assert losses[-1] < losses[0]


def test_state_round_trip_is_exact(patched):
    reg = pyflex.get_registry(patched)
    fake = FakeLoss(reg, [0.5, 0.1, 0.0, 0.3])
    a = ImportanceSchedule(patched, t_c=3, loss_fn=fake, seed=5)
    seq_a = [a.step(batch=0) for _ in range(8)]
    state = a.state_dict()
    rest_a = [a.step(batch=0) for _ in range(10)]
    b = ImportanceSchedule(patched, t_c=3, loss_fn=fake, seed=99)
    b.load_state_dict(state)
    assert b.active_layers == seq_a[-1]
    assert torch.equal(b.scores, state["scores"])
    rest_b = [b.step(batch=0) for _ in range(10)]
    assert rest_b == rest_a
    assert torch.equal(a.scores, b.scores)
    with pytest.raises(ValueError, match="mode"):
        ImportanceSchedule(patched, mode="official").load_state_dict(state)


def test_plot_importance(tmp_path, patched):
    pytest.importorskip("matplotlib")
    reg = pyflex.get_registry(patched)
    s = ImportanceSchedule(patched, t_c=1, loss_fn=FakeLoss(reg, [0.5, 0.1, 0.0, 0.3]))
    for _ in range(4):
        s.step(batch=0)
    path = tmp_path / "imp.png"
    ax = s.plot_importance(str(path))
    assert path.stat().st_size > 0 and len(ax.lines) == 4


def test_trainable_parameters_include_heads_outside_the_layers():
    """modules_to_save heads live outside every layer: a schedule's parameter list must still hold them, else an
    optimizer built from it never trains the head."""
    import transformers as tf
    from tiny_models import tiny_config
    torch.manual_seed(0)
    model = tf.LlamaForSequenceClassification(tiny_config("llama", 4))
    pyflex.patch_model(model, r=4, modules_to_save=["score"])
    sched = pyflex.ImportanceSchedule(model)
    ids = {id(p) for p in sched.trainable_parameters()}
    assert all(id(p) in ids for p in model.score.parameters())
