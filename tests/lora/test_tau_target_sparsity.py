"""Target sparsity (pyflex/lora/tau_lambda.py): τ's gradient becomes (1 − s*)·n − Σ m_i over the real tokens of the
step, so that τ's Adam steers each layer to mask the fraction s* of its tokens."""
from __future__ import annotations

import statistics

import pytest
import torch

import pyflex
from tiny_models import randomize_flex, tiny_model, tokens

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _target_model(target, seed=0, std=0.05, **kw):
    model = pyflex.patch_model(tiny_model("llama", layers=2, seed=seed), r=4, tau=True, target_sparsity=target,
                               target_modules=TARGETS, **kw)
    randomize_flex(model, std=std)
    return model.train()


def _layers(model):
    return [m for m in model.modules() if isinstance(m, pyflex.FlexLinear)]


def test_target_gradient_is_the_count_error_over_real_tokens_and_micro_batches():
    """Two right-padded micro-batches, then one step: τ.grad = (1 − s*)·(real tokens) − (active real tokens), both
    summed over the micro-batches; padding counts in neither; the μ part the op left in τ.grad is replaced."""
    target = 0.3
    model = _target_model(target, tau0=0.5)
    opt = torch.optim.AdamW(pyflex.tau_param_groups(model, lr=1e-2))
    layers = _layers(model)
    ids = tokens(batch=4, seq=8, seed=5)
    attention = torch.ones_like(ids)
    attention[1, 5:] = 0
    attention[3, 2:] = 0
    opt.zero_grad()
    active = [0.0] * len(layers)
    real = 0.0
    mu_parts = [0.0] * len(layers)
    for rows in (slice(0, 2), slice(2, 4)):
        labels = ids[rows].masked_fill(attention[rows] == 0, -100)
        model(input_ids=ids[rows], attention_mask=attention[rows], labels=labels).loss.backward()
        real += float(attention[rows].sum())
        for k, m in enumerate(layers):
            active[k] += float((m.last_mask & m.last_token_valid).sum())
            mu_parts[k] = m.tau.grad.clone()
    assert 0 < sum(active) < real * len(layers)  # some tokens masked, some not: both terms matter
    assert any(float(mu) != 0.0 for mu in mu_parts)  # the op computed a μ part, which the target replaces
    opt.step()
    for k, m in enumerate(layers):
        assert m.tau.grad.item() == pytest.approx((1 - target) * real - active[k], abs=1e-4), k
        assert m.tau_count_sink.grad is None  # consumed


@pytest.mark.parametrize("target", [0.25, 0.5, 0.8])
def test_tau_converges_to_the_target_fraction_of_masked_tokens(target):
    """With the adapters frozen (the ratios ρ_i keep one distribution), τ tracks the target quantile of ρ: over the
    last 30 of 150 steps every layer masks the target fraction within 0.05. τ starts at 0 (nothing masked)."""
    model = _target_model(target)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.requires_grad_(False)
    opt = torch.optim.AdamW(pyflex.tau_param_groups(model, lr=1e-2, tau_lr=0.02))
    layers = _layers(model)
    history = []
    for step in range(150):
        ids = tokens(batch=4, seq=16, seed=step)
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        history.append([m.last_sparsity for m in layers])
    assert history[0] == [0.0] * len(layers)
    for k in range(len(layers)):
        mean = statistics.fmean(h[k] for h in history[-30:])
        assert mean == pytest.approx(target, abs=0.05), (k, [round(h[k], 2) for h in history[-30:]])


def test_target_sparsity_is_recorded_saved_and_loaded(tmp_path):
    model = _target_model(0.4)
    registry = pyflex.get_registry(model)
    assert registry.config["target_sparsity"] == 0.4 and registry.config["lam"] == 0.0
    assert all(m.target_sparsity == 0.4 and m.lam == 0.0 for m in _layers(model))
    assert "target_sparsity=0.4" in repr(_layers(model)[0])
    pyflex.save_adapter(model, str(tmp_path / "adapter"))
    loaded = pyflex.load_adapter(tiny_model("llama", layers=2, seed=0), str(tmp_path / "adapter"))
    assert all(m.target_sparsity == 0.4 and m.lam == 0.0 for m in _layers(loaded))
    ids = tokens(batch=2, seq=6)
    torch.testing.assert_close(loaded.eval()(input_ids=ids).logits, model.eval()(input_ids=ids).logits)
    config = pyflex.PyflexConfig(tau=True, target_sparsity=0.6)
    patched = pyflex.patch_model(tiny_model("llama", layers=2), None, config)
    assert {m.target_sparsity for m in _layers(patched)} == {0.6}


@pytest.mark.parametrize("kwargs, match", [
    ({"target_sparsity": 0.5}, "pass tau=True"),
    ({"tau": True, "target_sparsity": 0.5, "lam": 1e-4}, "leave lam out"),
    ({"tau": True, "target_sparsity": 1.0}, r"target_sparsity=1.0 is not allowed; .* \(0, 1\)"),
    ({"tau": True, "target_sparsity": 0}, r"target_sparsity=0 is not allowed"),
    ({"tau": True, "target_sparsity": True}, r"target_sparsity=True is not allowed"),
    ({"tau": True, "target_sparsity": "half"}, r"target_sparsity='half' is not allowed"),
], ids=lambda v: str(v))
def test_bad_target_sparsity_is_an_error_and_leaves_the_model_alone(kwargs, match):
    model = tiny_model("llama", layers=2)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        pyflex.patch_model(model, r=4, **kwargs)
    with pytest.raises(ValueError, match=match):
        pyflex.PyflexConfig(**kwargs)
    assert not any(isinstance(m, pyflex.FlexLinear) for m in model.modules())
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[n], before[n]) for n in before)


def test_a_target_far_out_of_reach_warns_once():
    """PEFT's init (lora_B = 0) and a small lr on a tiny model: the ratios ρ outgrow τ's steps, the layers mask
    far less than asked, and after 50 steps one warning says so and names the way out (a larger τ lr)."""
    model = pyflex.patch_model(tiny_model("llama", layers=2, seed=0), r=4, tau=True, target_sparsity=0.5,
                               target_modules=TARGETS).train()
    opt = torch.optim.AdamW(pyflex.tau_param_groups(model, lr=1e-3))
    with pytest.warns(UserWarning, match=r"target_sparsity=0.5: after 50 optimizer steps .* tau_lr_ratio") as seen:
        for step in range(100):
            ids = tokens(batch=2, seq=8, seed=step)
            opt.zero_grad()
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
    assert len([w for w in seen if "target_sparsity" in str(w.message)]) == 1
    assert statistics.fmean(m.last_sparsity for m in _layers(model)) < 0.25


def test_a_target_within_reach_does_not_warn():
    import warnings

    model = _target_model(0.5)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.requires_grad_(False)
    opt = torch.optim.AdamW(pyflex.tau_param_groups(model, lr=1e-2, tau_lr=0.02))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="target_sparsity")
        for step in range(60):
            ids = tokens(batch=4, seq=16, seed=step)
            opt.zero_grad()
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
