"""A patched model inside the usual HF machinery: Trainer, activation checkpointing, torch.compile, generate, DDP."""
import copy
import os
import socket
import sys
import traceback

import pytest
import torch

import pyflex
import pyflex.model.patch
from tiny_models import (assert_close, lm_loss, randomize_flex, reference_backend, single_thread,  # noqa: F401
                         init_gloo_worker, tiny_model, tokens)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_trainer_trains_adapters_only(tmp_path, checkpointing):
    from transformers import Trainer, TrainingArguments
    model = pyflex.patch_model(tiny_model("llama"), r=4, alpha=8)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapters_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(3, 64, (8, 12), generator=g)]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=12,
                             learning_rate=2e-2, logging_steps=1, report_to="none", save_strategy="no",
                             use_cpu=True, disable_tqdm=True, dataloader_num_workers=0, warmup_steps=0,
                             gradient_checkpointing=checkpointing)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 12 and losses[-1] < losses[0] - 0.05, losses
    for n, p in model.named_parameters():
        if n in base_before:
            assert torch.equal(p, base_before[n]), n
    assert all(not torch.equal(p, adapters_before[n]) for n, p in model.named_parameters() if n.endswith("lora_B"))
    assert model.model.layers[0].gradient_checkpointing == checkpointing


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_same_grads(reentrant):
    ref = pyflex.patch_model(tiny_model("llama", layers=4), r=4)
    randomize_flex(ref)
    ckpt = copy.deepcopy(ref)
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    for m in (ref, ckpt):
        m.train()
        pyflex.get_registry(m).set_active([1, 3])  # frozen prefix: layer 0 runs without autograd
    ids = tokens()
    logits_ref, loss_ref = lm_loss(ref, ids)
    logits_ckpt, loss_ckpt = lm_loss(ckpt, ids)
    assert_close(logits_ckpt, logits_ref)
    loss_ref.backward()
    loss_ckpt.backward()
    reg_ref, reg_ckpt = pyflex.get_registry(ref), pyflex.get_registry(ckpt)
    n = 0
    for a, b in zip(reg_ref.adapter_parameters(), reg_ckpt.adapter_parameters()):
        assert (a.grad is None) == (b.grad is None)
        if a.grad is not None:
            assert_close(b.grad, a.grad)
            n += 1
    assert n == 2 * 14


def test_torch_compile_matches_eager():
    model = pyflex.patch_model(tiny_model("llama", layers=2), r=4)
    randomize_flex(model)
    pyflex.get_registry(model).set_active([1])
    ids = tokens()
    logits, loss = lm_loss(model, ids)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True)  # flex_lora runs as opaque custom ops: no graph break
    c_logits, c_loss = lm_loss(compiled, ids)
    assert_close(c_logits, logits, atol=1e-4)
    c_loss.backward()
    assert set(grads) == {n for n, p in model.named_parameters() if p.grad is not None}
    for n, g in grads.items():
        assert_close(dict(model.named_parameters())[n].grad, g, atol=1e-4, msg=n)


def test_generate_matches_merged_model():
    model = pyflex.patch_model(tiny_model("llama"), r=4, alpha=16)
    randomize_flex(model, std=0.5)
    ids = tokens(batch=2, seq=5)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                         pad_token_id=0)
    assert out.shape == (2, 11)
    merged = pyflex.merge(copy.deepcopy(model))
    ref = merged.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                          pad_token_id=0)
    assert torch.equal(out, ref)
    base = tiny_model("llama").generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                        do_sample=False, pad_token_id=0)
    assert not torch.equal(out, base)  # the adapter changes what is generated


# -------------------------------------------------------------------------------------------------------------------
# DDP: 2 gloo processes on CPU, each with half of the global batch, must end with the single-process adapter weights.
# -------------------------------------------------------------------------------------------------------------------
_STEPS = 3


def _train(model, batches, lr=0.2):
    # the trainable parameters as the wrapper holds them (FSDP2 swaps in sharded DTensor parameters)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr)
    for ids in batches:
        opt.zero_grad()
        lm_loss(model, ids)[1].backward()
        opt.step()


def _fresh():
    model = pyflex.patch_model(tiny_model("llama", layers=2), r=4)
    randomize_flex(model)
    return model.train()


def _global_batches():
    return [tokens(batch=4, seq=6, seed=10 + s) for s in range(_STEPS)]


def _distributed_worker(rank, world, port, out_path, wrapper):
    """Train on this rank's slice of each global batch under DDP or FSDP2 and save the (full) adapter weights."""
    import torch.distributed as dist
    init_gloo_worker(rank, world, port)
    try:
        with pyflex.use_backend("reference"):
            model = _fresh()
            if wrapper == "ddp":
                from torch.nn.parallel import DistributedDataParallel
                wrapped = DistributedDataParallel(model)
            elif wrapper == "fsdp1":  # FullyShardedDataParallel, one unit per decoder layer; frozen base weights
                # share flat parameters with trainable adapters, which needs use_orig_params=True
                from torch.distributed.fsdp import FullyShardedDataParallel
                from torch.distributed.fsdp.wrap import ModuleWrapPolicy
                wrapped = FullyShardedDataParallel(model, auto_wrap_policy=ModuleWrapPolicy({type(model.model.layers[0])}),
                                                   use_orig_params=True, device_id=torch.device("cpu"))
            else:  # FSDP2: each decoder layer, then the root, sharded over the ranks
                from torch.distributed.fsdp import fully_shard
                for layer in model.model.layers:
                    fully_shard(layer)
                wrapped = fully_shard(model)
            per = 4 // world
            _train(wrapped, [ids[rank * per:(rank + 1) * per] for ids in _global_batches()])
            if wrapper == "fsdp1":
                from torch.distributed.fsdp import FullyShardedDataParallel
                with FullyShardedDataParallel.summon_full_params(wrapped):
                    weights = {n.replace("_fsdp_wrapped_module.", ""): p.detach().clone()
                               for n, p in wrapped.named_parameters() if "lora_" in n}
            else:
                weights = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
                           for n, p in model.named_parameters() if "lora_" in n}
        if rank == 0:
            torch.save(weights, out_path)
        dist.barrier()
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    # Leave without running destructors: tearing down gloo's process group (via the DDP reducer) in a spawned child
    # can deadlock inside torch, its worker thread waiting for the GIL that the joining main thread holds (seen
    # once in four runs here). The results are already on disk.
    sys.stdout.flush()
    os._exit(0)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("wrapper", ["ddp", "fsdp1", "fsdp2"])
def test_distributed_matches_single_process(tmp_path, wrapper):
    """2 gloo processes on CPU, each with half of every global batch, end with the adapter weights that one process
    training on the whole batches gets (DDP averages gradients; FSDP1 and FSDP2 shard and reduce-scatter them)."""
    import torch.multiprocessing as mp
    if wrapper == "fsdp2":
        from torch.distributed import fsdp
        if not hasattr(fsdp, "fully_shard"):
            pytest.skip("this torch has no torch.distributed.fsdp.fully_shard (FSDP2)")
    out_path = str(tmp_path / "weights.pt")
    mp.spawn(_distributed_worker, args=(2, _free_port(), out_path, wrapper), nprocs=2, join=True)
    distributed = torch.load(out_path)
    model = _fresh()
    _train(model, _global_batches())
    single = {n: p.detach() for n, p in model.named_parameters() if "lora_" in n}
    assert set(distributed) == set(single) and len(single) == 2 * 7 * 2
    for n, p in single.items():
        assert_close(distributed[n], p, atol=1e-5, msg=n)

def test_mark_constant_for_compile_sets_what_torch_sets():
    """pyflex marks its backend lookup constant for dynamo without importing torch._dynamo; the public decorator
    must still set exactly that attribute (a torch release that changes it fails here, not in a compiled model)."""
    import torch.compiler

    from pyflex.compat import mark_constant_for_compile

    def ours():
        return 1

    def theirs():
        return 1

    torch.compiler.assume_constant_result(theirs)
    mark_constant_for_compile(ours)
    added = {k: v for k, v in vars(theirs).items()}
    assert added and vars(ours) == added
