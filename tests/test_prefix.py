"""Gated prefix through the attention registry: equality with a hand-written concatenated-KV attention,
RoPE not applied to the prefix, padding/GQA/decode masks, and generate() with a KV cache."""
import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaAttention, apply_rotary_pos_emb

import pyflex
from pyflex.plans import apply_hlpt
from pyflex.prefix import GatedPrefix, GatingContext, PooledGate, attach_prefix, prefix_attention_forward

from _schedule_utils import VOCAB, one_thread, tiny_llama  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def reference_attention(q, k, v, pk, pv, coef, keep, scale):
    """Explicit attention over [coef·P ; K]: q (B,H,q,d); k, v (B,Hkv,kv,d); pk, pv (Hkv,l,d); coef (B,);
    keep (B,q,kv) bool for the real keys (prefix keys are always kept). Returns (B,q,H,d)."""
    B, H, _, d = q.shape
    rep = H // k.shape[1]
    K = torch.cat([coef[:, None, None, None] * pk[None].expand(B, -1, -1, -1), k], dim=2)
    V = torch.cat([coef[:, None, None, None] * pv[None].expand(B, -1, -1, -1), v], dim=2)
    K = K.repeat_interleave(rep, dim=1)
    V = V.repeat_interleave(rep, dim=1)
    scores = torch.einsum("bhqd,bhkd->bhqk", q, K) * scale
    full_keep = torch.cat([torch.ones(B, q.shape[2], pk.shape[1], dtype=torch.bool), keep], dim=-1)
    scores = scores.masked_fill(~full_keep[:, None], float("-inf"))
    out = torch.einsum("bhqk,bhkd->bhqd", scores.softmax(-1), V)
    return out.transpose(1, 2)


def _attention_module(base):
    cfg = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=1,
                      intermediate_size=64, vocab_size=VOCAB)
    attn = LlamaAttention(cfg, layer_idx=0).double()
    prefix = GatedPrefix(32, 2, 8, prefix_len=3, dtype=torch.float64)
    attach_prefix(attn, prefix, base=base)
    return attn, prefix


@pytest.mark.parametrize("base", ["sdpa", "eager"])
@pytest.mark.parametrize("case", ["causal_none", "padding_bool", "padding_float", "decode_none", "decode_padding"])
def test_prefix_attention_equals_concatenated_reference(base, case):
    torch.manual_seed(0)
    attn, prefix = _attention_module(base)
    B, H, Hkv, d = 2, 4, 2, 8
    q_len, kv_len = (5, 5) if case.startswith(("causal", "padding")) else (1, 6)
    q = torch.randn(B, H, q_len, d, dtype=torch.float64)
    k = torch.randn(B, Hkv, kv_len, d, dtype=torch.float64)
    v = torch.randn(B, Hkv, kv_len, d, dtype=torch.float64)
    prefix._coef = torch.tensor([0.3, 0.9], dtype=torch.float64)
    offset = kv_len - q_len
    keep = (torch.arange(kv_len)[None, :] <= torch.arange(q_len)[:, None] + offset).expand(B, q_len, kv_len).clone()
    mask = None
    if "padding" in case:
        keep[1, :, :2] = False  # sample 1 is left-padded by two tokens
        if case == "padding_float":
            mask = torch.zeros(B, 1, q_len, kv_len, dtype=torch.float64).masked_fill(~keep[:, None], -1e30)
        else:
            mask = keep[:, None].clone()
    out, _ = prefix_attention_forward(attn, q, k, v, mask, scaling=d ** -0.5)
    ref = reference_attention(q, k, v, prefix.prefix_key.detach(), prefix.prefix_value.detach(), prefix._coef, keep,
                              d ** -0.5)
    if "padding" in case:  # fully-padded query rows are not meaningful; compare real query rows
        out, ref = out[:, 2:], ref[:, 2:]
    tol = 1e-9 if base == "sdpa" else 1e-6  # eager attention takes its softmax in float32
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)


def test_layers_without_prefix_pass_through():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=1,
                      intermediate_size=64, vocab_size=VOCAB)
    attn = LlamaAttention(cfg, layer_idx=0)
    q, k, v = torch.randn(1, 4, 4, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    out, _ = prefix_attention_forward(attn, q, k, v, None, scaling=8 ** -0.5)
    ref, _ = sdpa_attention_forward(attn, q, k, v, None, scaling=8 ** -0.5)
    torch.testing.assert_close(out, ref)


def test_pooled_gate_excludes_padding():
    torch.manual_seed(0)
    ctx = GatingContext()
    gate = PooledGate(8, ctx)
    x = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    ctx.begin_forward(mask, past_length=0)
    g = gate(x)
    per_tok = torch.sigmoid(gate.linear(x)).squeeze(-1)
    assert g.shape == (2, 5)
    torch.testing.assert_close(g[0], per_tok[0].mean().expand(5))
    torch.testing.assert_close(g[1], per_tok[1, 2:].mean().expand(5))
    # decode step: running mean over the sequence so far
    x2 = torch.randn(2, 1, 8)
    ctx.begin_forward(torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1), past_length=5)
    g2 = gate(x2)
    tok2 = torch.sigmoid(gate.linear(x2)).squeeze(-1)
    torch.testing.assert_close(g2[1, 0], (per_tok[1, 2:].sum() + tok2[1, 0]) / 4)


def _capture_attention(module):
    store = {}

    def hook(mod, args, kwargs, output):
        store["hidden"] = kwargs.get("hidden_states", args[0] if args else None)
        store["pos"] = kwargs["position_embeddings"]
        store["out"] = output[0]
    handle = module.register_forward_hook(hook, with_kwargs=True)
    return store, handle


def test_model_prefix_layer_matches_manual_computation():
    """A prefix layer of a patched Llama: RoPE on q/k only, gate pooled over real tokens, prefix in front."""
    model = tiny_llama(num_layers=4, attn_implementation="sdpa").double()
    apply_hlpt(model, variant="hlpt", prefix_len=4)  # 3 LoRA layers + 1 prefix layer
    assert model.pyflex_plan.prefix_layers == [3]
    attn = model.model.layers[3].self_attn
    store, handle = _capture_attention(attn)
    ids = torch.randint(0, VOCAB, (2, 7))
    am = torch.ones(2, 7, dtype=torch.long)
    am[1, :2] = 0
    with torch.no_grad():
        model(input_ids=ids, attention_mask=am)
    handle.remove()
    h = store["hidden"]
    cos, sin = store["pos"]
    B, S, _ = h.shape
    q = attn.q_proj(h).view(B, S, -1, 8).transpose(1, 2)
    k = attn.k_proj(h).view(B, S, -1, 8).transpose(1, 2)
    v = attn.v_proj(h).view(B, S, -1, 8).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    prefix = attn.pyflex_prefix
    per_tok = torch.sigmoid(prefix.gate.linear(h)).squeeze(-1)
    coef = (per_tok * am).sum(1) / am.sum(1)
    keep = (torch.arange(S)[None, :] <= torch.arange(S)[:, None]).expand(B, S, S).clone()
    keep &= am.bool()[:, None, :]
    with torch.no_grad():
        ref = reference_attention(q, k, v, prefix.prefix_key, prefix.prefix_value, coef, keep, 8 ** -0.5)
        ref = attn.o_proj(ref.reshape(B, S, -1))
    torch.testing.assert_close(store["out"][0], ref[0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(store["out"][1, 2:], ref[1, 2:], rtol=1e-9, atol=1e-9)


def test_eager_and_sdpa_bases_agree():
    outs = []
    for impl in ("sdpa", "eager"):
        model = tiny_llama(num_layers=4, attn_implementation=impl, seed=3).double()
        apply_hlpt(model, variant="h2lpt", counts=(1, 2), prefix_len=3)
        torch.manual_seed(9)
        for p in model.parameters():  # same prefix/gate/LoRA values in both models
            p.data.normal_(0, 0.05) if p.requires_grad else None
        assert model.pyflex_plan.base_attention == impl
        ids = torch.randint(0, VOCAB, (2, 6))
        am = torch.tensor([[1] * 6, [0, 1, 1, 1, 1, 1]])
        with torch.no_grad():
            outs.append(model(input_ids=ids, attention_mask=am).logits)
    torch.testing.assert_close(outs[0][0], outs[1][0])
    torch.testing.assert_close(outs[0][1, 1:], outs[1][1, 1:])


@pytest.mark.parametrize("gated", [False, True])
def test_generate_with_kv_cache_equals_without(gated):
    # One prefix layer on top (the LoRA delta starts at zero), so cached keys/values never depend on a gate value
    # and cached decoding must reproduce cache-less decoding exactly.
    model = tiny_llama(num_layers=4).double().eval()
    apply_hlpt(model, counts=(2, 1), prefix_len=4, gated=gated)
    with torch.no_grad():
        for p in model.model.layers[3].self_attn.pyflex_prefix.parameters():
            p.normal_(0, 0.5)
    ids = torch.randint(0, VOCAB, (2, 5))
    am = torch.tensor([[1] * 5, [0, 0, 1, 1, 1]])
    with pyflex.use_backend("reference"), torch.no_grad():
        kw = dict(attention_mask=am, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True,
                  pad_token_id=0)
        cached = model.generate(ids, use_cache=True, **kw)
        plain = model.generate(ids, use_cache=False, **kw)
    assert torch.equal(cached.sequences, plain.sequences)
    for a, b in zip(cached.logits, plain.logits):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-7)
    # the prefix is not stored in the cache: its length is prompt + generated - 1
    assert cached.sequences.shape == (2, 11)


def test_prefix_changes_the_output_and_trains():
    model = tiny_llama(num_layers=4)
    ids = torch.randint(0, VOCAB, (2, 6))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    apply_hlpt(model, counts=(1, 1), prefix_len=4)
    out = model(input_ids=ids, labels=ids)
    assert not torch.allclose(out.logits, before)  # the prefix is attended to
    out.loss.backward()
    prefix = model.model.layers[3].self_attn.pyflex_prefix
    assert prefix.prefix_key.grad is not None and prefix.prefix_key.grad.abs().sum() > 0
    assert prefix.gate.linear.weight.grad is not None and prefix.gate.linear.weight.grad.abs().sum() > 0
