"""Tiny models and batches shared by the plan/schedule tests (no hub access: models from configs)."""
import torch
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 61


def tiny_llama(num_layers: int = 4, hidden: int = 32, heads: int = 4, kv_heads: int = 2, seed: int = 0,
               attn_implementation: str = "sdpa") -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=num_layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=128,
                      attn_implementation=attn_implementation)
    model = LlamaForCausalLM(cfg)
    model.train()
    return model


def make_batches(n: int, batch: int = 4, seq: int = 12, seed: int = 1, pad: bool = False):
    """A learnable toy task: each sequence is an arithmetic progression mod VOCAB."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        start = torch.randint(0, VOCAB, (batch, 1), generator=g)
        step = torch.randint(1, 4, (batch, 1), generator=g)
        ids = (start + step * torch.arange(seq)[None, :]) % VOCAB
        mask = torch.ones_like(ids)
        labels = ids.clone()
        if pad:
            mask[0, :3] = 0  # left padding on the first sample
            labels[0, :3] = -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def snapshot(params):
    return {name: p.detach().clone() for name, p in params}


import pytest  # noqa: E402


@pytest.fixture
def one_thread():
    """These tiny models run faster on one intra-op thread, and much faster when the CPU is shared."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
