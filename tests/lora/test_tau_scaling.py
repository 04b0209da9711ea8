"""τ's gradient scales like every other gradient (PEFT_S eq. 14-17 with the λ term added at the optimizer step,
pyflex/tau_lambda.py), padding tokens count nowhere, and 16-bit bases train with fp32 master adapters."""
from __future__ import annotations

import math
import os
import socket
import sys
import traceback

import pytest
import torch

import pyflex
from tiny_models import init_gloo_worker, randomize_flex, tiny_model, tokens

LAM = 0.05  # large enough that the λ term dominates τ's update in a few steps


def _tau_model(seed=0, lam=LAM, layers=2, target=None, **kw):
    """λ = ``lam``, or with ``target`` a target sparsity (and no λ)."""
    tau_kw = {"lam": lam} if target is None else {"target_sparsity": target, "tau0": 0.3}
    model = pyflex.patch_model(tiny_model("llama", layers=layers, seed=seed), r=4, tau=True,
                               target_modules=["q_proj", "v_proj", "down_proj"], **tau_kw, **kw)
    randomize_flex(model)
    return model.train()


def _taus(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(".tau")}


def _causal_loss(model, ids, attention_mask=None):
    labels = ids.clone()
    if attention_mask is not None:
        labels[attention_mask == 0] = -100
    return model(input_ids=ids, attention_mask=attention_mask, labels=labels).loss


def _opt(model, lr=1e-2):
    """PEFT_S's Adam rule for τ. Adam's update is nearly invariant to the gradient's scale, so the tests compare
    τ.grad as the step saw it (the λ term is added right before the step), not only τ's value."""
    return torch.optim.AdamW(pyflex.tau_param_groups(model, lr=lr))


def _tau_grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if n.endswith(".tau")}


def _step(model, opt, batches, scaler=None, divide=1):
    opt.zero_grad()
    for ids in batches:
        loss = _causal_loss(model, ids) / divide
        (scaler.scale(loss) if scaler is not None else loss).backward()
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    return _tau_grads(model)


def _assert_taus_equal(a, b, rtol=1e-5):
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=1e-7, msg=name)


def test_lambda_term_is_the_active_token_count():
    """After the step, τ.grad = −(μ part + λ·Σ m_i): the μ part alone is what the op leaves in τ.grad in backward."""
    model = _tau_model()
    ids = tokens(batch=2, seq=6)
    opt = _opt(model)
    opt.zero_grad()
    _causal_loss(model, ids).backward()
    layers = [m for m in model.modules() if isinstance(m, pyflex.FlexLinear)]
    mu_part = [m.tau.grad.clone() for m in layers]
    counts = [m.last_mask.sum().item() for m in layers]
    opt.step()
    for m, mu, count in zip(layers, mu_part, counts):
        assert count > 0
        torch.testing.assert_close(m.tau.grad, mu - LAM * count)
        assert m.tau_count_sink.grad is None  # consumed


def test_grad_scaler_gives_the_unscaled_update():
    ids = tokens(batch=2, seq=6)
    plain, scaled = _tau_model(), _tau_model()
    opt_plain, opt_scaled = _opt(plain), _opt(scaled)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for _ in range(2):
        _assert_taus_equal(_step(scaled, opt_scaled, [ids], scaler=scaler), _step(plain, opt_plain, [ids]))
    assert scaler.get_scale() >= 1024.0  # no skipped step: both runs made 2 updates
    _assert_taus_equal(_taus(scaled), _taus(plain))


def test_gradient_accumulation_equals_the_union_batch():
    ids = tokens(batch=4, seq=6)
    whole, accumulated = _tau_model(), _tau_model()
    opt_whole, opt_acc = _opt(whole), _opt(accumulated)
    for _ in range(2):
        _assert_taus_equal(_step(accumulated, opt_acc, [ids[:2], ids[2:]], divide=2),
                           _step(whole, opt_whole, [ids]))
    _assert_taus_equal(_taus(accumulated), _taus(whole))


def test_count_of_a_step_that_never_ran_is_dropped():
    """A backward whose step is skipped (GradScaler found inf) must not leak its λ count into the next step."""
    ids = tokens(batch=2, seq=6)
    ref, skipped = _tau_model(), _tau_model()
    opt_ref, opt_skipped = _opt(ref), _opt(skipped)
    opt_skipped.zero_grad()
    _causal_loss(skipped, ids).backward()          # ... and no step
    _assert_taus_equal(_step(skipped, opt_skipped, [ids]), _step(ref, opt_ref, [ids]))


# ---------------------------------------------------------------------------------------------------------------
# padding
# ---------------------------------------------------------------------------------------------------------------
def test_padding_changes_neither_logits_nor_tau_grad_nor_sparsity():
    """The same sequences right-padded to two lengths: equal logits on real tokens, equal τ.grad (λ term included)
    and equal reported sparsity."""
    ids = tokens(batch=2, seq=5)
    lengths = torch.tensor([5, 3])
    results = []
    for total in (5, 9):
        model = _tau_model(tau0=5)
        padded = torch.zeros(2, total, dtype=torch.long)
        mask = torch.zeros(2, total, dtype=torch.long)
        for b, n in enumerate(lengths.tolist()):
            padded[b, :n] = ids[b, :n]
            mask[b, :n] = 1
        opt = _opt(model)
        opt.zero_grad()
        out = model(input_ids=padded, attention_mask=mask, labels=padded.masked_fill(mask == 0, -100))
        out.loss.backward()
        opt.step()  # adds the λ term
        logits = [out.logits[b, :n].detach() for b, n in enumerate(lengths.tolist())]
        layers = [m for m in model.modules() if isinstance(m, pyflex.FlexLinear)]
        results.append((logits, [m.tau.grad.clone() for m in layers], [m.last_sparsity for m in layers]))
    (logits_a, grads_a, sp_a), (logits_b, grads_b, sp_b) = results
    for a, b in zip(logits_a, logits_b):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert sp_a == pytest.approx(sp_b) and 0.0 < max(sp_a) < 1.0  # the mask really selects


def test_op_token_valid_excludes_tokens_from_tau_gradient():
    """flex_lora with token_valid equals the op on the real tokens alone, for τ's gradient (μ and λ terms)."""
    torch.manual_seed(0)
    M, K, N, r = 12, 10, 8, 4
    x, w = torch.randn(M, K, dtype=torch.float64), torch.randn(N, K, dtype=torch.float64)
    A, B = torch.randn(r, K, dtype=torch.float64), torch.randn(N, r, dtype=torch.float64)
    gy = torch.randn(M, N, dtype=torch.float64)
    valid = torch.rand(M) > 0.4
    grads = []
    for xs, gys, v in ((x, gy, valid), (x[valid], gy[valid], None)):
        tau = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
        y = pyflex.flex_lora(xs, w, None, A, B, 0.5, tau=tau, lam=0.1, token_valid=v)
        (y * gys).sum().backward()
        grads.append(tau.grad)
    torch.testing.assert_close(grads[0], grads[1])


# ---------------------------------------------------------------------------------------------------------------
# DDP: 2 gloo ranks against one process on the union batch
# ---------------------------------------------------------------------------------------------------------------
_DDP_STEPS = 2


def _ddp_batches():
    return [tokens(batch=4, seq=6, seed=20 + s) for s in range(_DDP_STEPS)]


def _ddp_worker(rank, world, port, out_path, target):
    import torch.distributed as dist
    init_gloo_worker(rank, world, port)
    try:
        from torch.nn.parallel import DistributedDataParallel
        model = _tau_model(target=target)
        wrapped = DistributedDataParallel(model)
        opt = _opt(model)
        per = 4 // world
        grads = []
        for ids in _ddp_batches():
            opt.zero_grad()
            _causal_loss(wrapped, ids[rank * per:(rank + 1) * per]).backward()
            opt.step()
            grads.append(_tau_grads(model))
        if rank == 0:
            torch.save((grads, _taus(model)), out_path)
        dist.barrier()
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    os._exit(0)  # skip gloo teardown in the spawned child (can deadlock); results are on disk


@pytest.mark.slow
@pytest.mark.parametrize("target", [None, 0.5], ids=["lambda", "target_sparsity"])
def test_ddp_tau_update_equals_single_process(tmp_path, target):
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out_path = str(tmp_path / "taus.pt")
    mp.spawn(_ddp_worker, args=(2, port, out_path, target), nprocs=2, join=True)
    model = _tau_model(target=target)
    opt = _opt(model)
    grads = [_step(model, opt, [ids]) for ids in _ddp_batches()]
    ddp_grads, ddp_taus = torch.load(out_path)
    for got, want in zip(ddp_grads, grads):
        _assert_taus_equal(got, want)
    _assert_taus_equal(ddp_taus, _taus(model))


# ---------------------------------------------------------------------------------------------------------------
# 16-bit bases: fp32 master adapters
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_bases_get_fp32_adapters(dtype):
    model = pyflex.patch_model(tiny_model("llama", layers=2).to(dtype), r=4, tau=True)
    layers = [m for m in model.modules() if isinstance(m, pyflex.FlexLinear)]
    assert layers and all(m.lora_A.dtype == m.lora_B.dtype == m.tau.dtype == torch.float32 for m in layers)
    assert all(m.weight.dtype == dtype for m in layers)
    out = model(input_ids=tokens(batch=2, seq=5)).logits
    assert out.dtype == dtype
    override = pyflex.patch_model(tiny_model("llama", layers=2).to(dtype), r=4, adapter_dtype=dtype)
    assert all(m.lora_A.dtype == dtype for m in override.modules() if isinstance(m, pyflex.FlexLinear))


def _train_losses(dtype, steps, lr):
    torch.manual_seed(0)
    model = pyflex.patch_model(tiny_model("llama", layers=2).to(dtype), r=8, alpha=16, tau=True).train()
    opt = torch.optim.AdamW(pyflex.tau_param_groups(model, lr=lr))
    ids = tokens(batch=4, seq=12, seed=5)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = _causal_loss(model, ids)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        params = [p for p in model.parameters() if p.requires_grad]
        assert all(torch.isfinite(p).all() for p in params), f"non-finite adapter after step {len(losses)}"
    return losses


def test_fp16_base_trains_50_adamw_steps_without_nan():
    losses = _train_losses(torch.float16, 50, lr=1e-2)
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]


def test_bf16_base_loss_goes_down():
    losses = _train_losses(torch.bfloat16, 20, lr=1e-2)
    assert losses[-1] < 0.9 * losses[0]


def test_torch_compile_adds_the_lambda_term_like_eager():
    eager, compiled_model = _tau_model(tau0=0.5), _tau_model(tau0=0.5)
    compiled = torch.compile(compiled_model, fullgraph=True)
    ids = tokens(batch=2, seq=6)
    grads = []
    for model, run in ((eager, eager), (compiled_model, compiled)):
        opt = _opt(model)
        opt.zero_grad()
        _causal_loss(run, ids).backward()
        opt.step()
        grads.append(_tau_grads(model))
    _assert_taus_equal(grads[1], grads[0], rtol=1e-4)
