"""τ outside the adapters' rules: its own Adam rule (refused otherwise), out of gradient clipping, and
tau_param_groups only on patched models."""
import copy

import pytest
import torch

import pyflex
import pyflex.lora.tau
from tiny_models import reference_backend, single_thread, tiny_model, tokens  # noqa: F401

from _schedule_utils import tiny_llama

pytestmark = pytest.mark.usefixtures("single_thread", "reference_backend")


def _loss(model):
    ids = tokens(batch=2, seq=9)
    return model(input_ids=ids, labels=ids).loss


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _with_grad(g):
    p = torch.nn.Parameter(torch.zeros_like(g))
    p.grad = g
    return p


# -- clip_grad_norm_ ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("setup", ["gpt2_tau_bias", "llama_hlpt", "lift_full"])
def test_clip_grad_norm_clips_every_trainable_parameter_but_tau(setup):
    if setup == "gpt2_tau_bias":   # lora_A, lora_B, trainable biases, τ
        model = pyflex.patch_model(tiny_model("gpt2"), r=4, tau=True, lam=1e-3, bias="lora_only")
        adapter = lambda n: "lora_" in n or n.endswith(".bias")  # noqa: E731
    elif setup == "llama_hlpt":    # gated LoRA and gated prefixes
        model = tiny_model("llama", layers=4)
        pyflex.apply_hlpt(model, r=4)
        adapter = lambda n: "lora_" in n or "gate" in n or "prefix" in n  # noqa: E731
    else:                          # LIFT's full block: the block's own weights
        model = tiny_model("llama", layers=3)
        pyflex.LiftSchedule(model, total_steps=3, target="full").step()
        adapter = lambda n: n.startswith("model.layers.0.")  # noqa: E731
    model.train()
    with torch.no_grad():  # lora_B = 0 would leave lora_A without a gradient
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.5)
    _loss(model).backward()
    raw = _grads(model)
    names = [n for n in raw if adapter(n)]
    taus = [n for n in raw if n.endswith(".tau")]
    assert set(raw) == set(names) | set(taus) and names and (taus or setup != "gpt2_tau_bias")
    # the reference: torch's clip over exactly the adapter gradients, on copies
    want = {n: raw[n].clone() for n in names}
    want_norm = torch.nn.utils.clip_grad_norm_([_with_grad(want[n]) for n in names], 1e-3)
    norm = pyflex.clip_grad_norm_(model, 1e-3)
    assert torch.equal(norm, want_norm) and norm > 1e-3  # the pre-clip norm, as torch returns it; it did clip
    got = _grads(model)
    for n in taus:
        assert torch.equal(got[n], raw[n]), f"{n} was clipped"
    for n in names:
        assert torch.allclose(got[n], want[n], rtol=1e-6, atol=0), n


def test_clip_grad_norm_without_gradients_and_bad_max_norm():
    model = pyflex.patch_model(tiny_model("llama"), r=4, tau=True)
    assert torch.equal(pyflex.clip_grad_norm_(model, 1.0), torch.nn.utils.clip_grad_norm_([], 1.0))
    with pytest.raises(ValueError, match="max_norm"):
        pyflex.clip_grad_norm_(model, 0.0)


# -- τ's optimizer rule --------------------------------------------------------------------------------------
def test_stepping_tau_with_another_rule_is_an_error():
    model = pyflex.patch_model(tiny_model("llama"), r=4, tau=True, lam=1e-3)
    model.train()
    wrong = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)  # τ: betas 0.999, decay
    _loss(model).backward()
    tau = model.model.layers[0].self_attn.q_proj.tau
    before = tau.detach().clone()
    with pytest.raises(RuntimeError, match="PEFT_S trains τ with Adam"):
        wrong.step()
    assert torch.equal(tau.detach(), before)  # refused before anything moved
    right = torch.optim.AdamW(pyflex.tau_param_groups(model, lr=1e-3))
    right.step()
    assert not torch.equal(tau.detach(), before)
    # a τ without a gradient is not being trained: no objection (e.g. frozen τ in a plain AdamW)
    wrong.zero_grad(set_to_none=True)
    _loss(model).backward()
    for t in pyflex.tau_parameters(model):
        t.grad = None
    wrong.step()


def test_deepcopied_model_keeps_its_tau_marked():
    model = copy.deepcopy(pyflex.patch_model(tiny_model("llama"), r=4, tau=True, lam=1e-3))
    taus = [m.tau for m in model.modules() if isinstance(m, pyflex.FlexLinear)]
    assert len(taus) == 3 * 7 and all(pyflex.lora.tau.is_tau(t) for t in taus)  # copy.deepcopy alone drops the marker
    model.train()
    _loss(model).backward()
    with pytest.raises(RuntimeError, match="τ"):
        torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3).step()


# -- tau_param_groups ----------------------------------------------------------------------------------------
def test_tau_param_groups_on_an_unpatched_model_is_an_error():
    model = tiny_llama(num_layers=2)
    with pytest.raises(ValueError, match="not patched by pyflex"):
        pyflex.tau_param_groups(model, lr=1e-3)
    pyflex.patch_model(model, r=4, tau=True)
    groups = pyflex.tau_param_groups(model, lr=1e-3)
    assert [len(g["params"]) for g in groups] == [2 * 7 * 2, 2 * 7]
    assert groups[1]["lr"] == pytest.approx(0.4 * 1e-3) and groups[1]["betas"] == (0.9, 0.98)


@pytest.mark.parametrize("kwargs, want", [
    ({}, 0.4 * 2e-3),                          # default: the paper's ratio α·s / lr = 4e-5 / 1e-4
    ({"tau_lr_ratio": 0.1}, 0.1 * 2e-3),
    ({"tau_s": 4e-5}, 4e-5),                   # the paper's α·s exactly
    ({"tau_alpha": 1.0}, 4e-5),
    ({"tau_alpha": 100.0}, 100 * 4e-5),
    ({"tau_alpha": 2.0, "tau_s": 1e-4}, 2e-4),
    ({"tau_lr": 3e-4}, 3e-4),
], ids=lambda v: str(v))
def test_tau_param_groups_tau_lr(kwargs, want):
    model = pyflex.patch_model(tiny_llama(num_layers=2), r=4, tau=True)
    groups = pyflex.tau_param_groups(model, lr=2e-3, **kwargs)
    assert groups[0]["lr"] == 2e-3 and groups[1]["lr"] == pytest.approx(want, rel=1e-12)
    assert (groups[1]["betas"], groups[1]["weight_decay"]) == ((0.9, 0.98), 0.0)


def test_tau_param_groups_default_for_target_sparsity_and_mixed_models():
    target = pyflex.patch_model(tiny_llama(num_layers=2), r=4, tau=True, target_sparsity=0.5)
    assert pyflex.tau_param_groups(target, lr=2e-3)[1]["lr"] == pytest.approx(2 * 2e-3)       # a tracker: faster
    assert pyflex.tau_param_groups(target, lr=2e-3, tau_lr_ratio=0.4)[1]["lr"] == pytest.approx(0.4 * 2e-3)
    mixed = pyflex.patch_model(tiny_llama(num_layers=2), r=4, tau=True)
    next(m for m in mixed.modules() if isinstance(m, pyflex.FlexLinear)).target_sparsity = 0.5
    with pytest.raises(ValueError, match="give τ's lr explicitly"):
        pyflex.tau_param_groups(mixed, lr=2e-3)
    assert pyflex.tau_param_groups(mixed, lr=2e-3, tau_lr=1e-3)[1]["lr"] == 1e-3


def test_tau_lr_for_a_model_without_tau_warns():
    model = pyflex.patch_model(tiny_llama(num_layers=2), r=4)
    with pytest.warns(UserWarning, match=r"tau_s=4e-05 but the model has no τ"):
        groups = pyflex.tau_param_groups(model, lr=1e-3, tau_s=4e-5)
    assert len(groups) == 1


@pytest.mark.parametrize("kwargs, match", [
    ({"tau_lr": 1e-3, "tau_alpha": 10.0}, "given 2 ways"),
    ({"tau_lr_ratio": 0.4, "tau_s": 4e-5}, "given 2 ways"),
    ({"tau_lr": 0.0}, "tau_lr=0.0 is not allowed"),
    ({"tau_lr_ratio": float("nan")}, "tau_lr_ratio=nan is not allowed"),
    ({"tau_alpha": -1.0}, "tau_alpha=-1.0 is not allowed"),
], ids=lambda v: str(v))
def test_tau_param_groups_bad_tau_lr_is_an_error_naming_it(kwargs, match):
    model = pyflex.patch_model(tiny_llama(num_layers=2), r=4, tau=True)
    with pytest.raises(ValueError, match=match):
        pyflex.tau_param_groups(model, lr=1e-3, **kwargs)


def test_demo_clips_adapters_and_leaves_tau_out():
    """The demo's loop clips with pyflex.clip_grad_norm_: with a tiny max norm τ's first update is the unclipped
    run's (bit for bit), while the adapters' updates shrink."""
    import dataclasses

    import pyflex.demo.__main__ as demo

    after = {}
    for clip in (1e-9, 0.0):
        cfg = dataclasses.replace(demo.DemoConfig.quick(), layers=2, hidden=32, intermediate=64, batch_size=4,
                                  grad_clip=clip)
        batches = demo.make_batches(cfg, "sort", 1, cfg.batch_size, seed=3, device="cpu")
        model = demo.build_model(cfg, "cpu")
        torch.manual_seed(cfg.seed)
        setup = demo.METHODS["pyflex_tau"](model, cfg)
        with torch.no_grad():  # lora_B ≠ 0, so τ's gradient has its μ part (the λ part is added at the step)
            g = torch.Generator().manual_seed(1)
            for n, p in model.named_parameters():
                if n.endswith("lora_B"):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        start = {n: p.detach().clone() for n, p in model.named_parameters()}  # the same in both runs
        demo.train(setup, batches, batches, cfg, torch.device("cpu"), steps=1, log=lambda line: None, label="tau")
        after[clip] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    taus = [n for n in after[0.0] if n.endswith(".tau")]
    assert len(taus) == 2 * 7 and all(torch.equal(after[1e-9][n], after[0.0][n]) for n in taus)
    assert all(after[0.0][n].abs() > 0 for n in taus)  # τ moved
    moved = lambda n, clip: (after[clip][n] - start[n]).abs().max()  # noqa: E731
    assert all(moved(n, 1e-9) < moved(n, 0.0) / 10 for n in after[0.0] if "lora_" in n)
