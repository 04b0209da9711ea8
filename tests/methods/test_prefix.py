"""Gated prefix through the attention registry and HLPT's pooled gates.

References are independent of pyflex's code path: an explicit per-query loop over [g_t·P_k ; K], [g_t·P_v ; V]
(eq. 4-5), hand-applied RoPE, softcapping and sliding windows, and cache-less recomputation for KV-cached decoding.
"""
import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaAttention, apply_rotary_pos_emb

import pyflex
from pyflex.methods.hlpt import apply_hlpt
from pyflex.methods.prefix import GatedPrefix, PooledGate, attach_prefix, prefix_attention_forward, prefix_attention_forward_eager
from pyflex.layers.token_context import TokenContext

from _schedule_utils import VOCAB, one_thread, tiny_llama  # noqa: F401
from tiny_models import FAMILIES, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
PREFIX_FAMILIES = [f for f in FAMILIES if f != "bert"]


def reference_attention(q, k, v, pk, pv, coef, keep, scale, softcap=None):
    """Attention of query t over [coef[b,t]·P_k ; K] and [coef[b,t]·P_v ; V], one query at a time.

    q (B,H,Q,d); k, v (B,Hkv,kv,d); pk, pv (Hkv,l,d); coef (B,Q); keep (B,Q,kv) bool for the real keys (prefix keys
    are always kept); softcap: Gemma2's cap·tanh(s/cap) on the scaled scores. Returns (B,Q,H,d)."""
    B, H, Q, d = q.shape
    rep = H // k.shape[1]
    out = torch.empty(B, Q, H, v.shape[-1], dtype=q.dtype)
    for b in range(B):
        for t in range(Q):
            c = coef[b, t]
            K = torch.cat([c * pk, k[b]], dim=1).repeat_interleave(rep, dim=0)  # (H, l+kv, d)
            V = torch.cat([c * pv, v[b]], dim=1).repeat_interleave(rep, dim=0)
            s = torch.einsum("hd,hkd->hk", q[b, :, t], K) * scale
            if softcap is not None:
                s = softcap * torch.tanh(s / softcap)
            kept = torch.cat([torch.ones(pk.shape[1], dtype=torch.bool), keep[b, t]])
            s = s.masked_fill(~kept, float("-inf"))
            out[b, t] = torch.einsum("hk,hkd->hd", s.softmax(-1), V)
    return out


def causal_mean(per_token, real):
    """Mean of per_token (B,S) over the real tokens up to each position (0 before the first real token)."""
    w = real.to(per_token.dtype)
    return (per_token * w).cumsum(1) / w.cumsum(1).clamp_min(1)


def sequence_mean(per_token, real):
    w = real.to(per_token.dtype)
    return ((per_token * w).sum(1) / w.sum(1))[:, None].expand_as(per_token)


def _attention_module(pooling="causal"):
    cfg = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=1,
                      intermediate_size=64, vocab_size=VOCAB)
    attn = LlamaAttention(cfg, layer_idx=0).double()
    prefix = GatedPrefix(32, 2, 8, prefix_len=3, pooling=pooling, init_std=0.5, dtype=torch.float64)
    attach_prefix(attn, prefix)
    return attn, prefix


CASES = {  # name: (q_len, kv_len, mask kind)
    "causal_none": (5, 5, None),          # sdpa's skipped causal mask
    "padding_bool": (5, 5, "bool"),
    "padding_float": (5, 5, "float"),
    "decode_none": (1, 6, None),          # one query sees every key
    "decode_padding": (1, 6, "bool"),
    "chunk_padding": (3, 7, "float"),     # a multi-token chunk after 4 cached tokens
    "static_prefill_none": (4, 6, None),  # sdpa's skipped mask with kv > q: top-left aligned (empty static slots)
}


@pytest.mark.parametrize("pooling", ["causal", "sequence"])
@pytest.mark.parametrize("base, case", [(base, case) for base in ("sdpa", "eager") for case in CASES
                                        # eager's mask function never skips a causal mask
                                        if base == "sdpa" or CASES[case][2] is not None or CASES[case][0] == 1])
def test_prefix_attention_equals_per_query_reference(base, case, pooling):
    torch.manual_seed(0)
    q_len, kv_len, kind = CASES[case]
    attn, prefix = _attention_module(pooling)
    B, H, Hkv, d = 2, 4, 2, 8
    q = torch.randn(B, H, q_len, d, dtype=torch.float64)
    k = torch.randn(B, Hkv, kv_len, d, dtype=torch.float64)
    v = torch.randn(B, Hkv, kv_len, d, dtype=torch.float64)
    coef = torch.rand(B, q_len, dtype=torch.float64)
    if pooling == "sequence":
        coef = coef[:, :1].expand(B, q_len).clone()
    prefix._coef = coef
    if kind is None and q_len > 1 and kv_len > q_len:  # top-left: query i sees keys j <= i
        keep = (torch.arange(kv_len)[None, :] <= torch.arange(q_len)[:, None]).expand(B, q_len, kv_len).clone()
    elif kind is None and q_len == 1:
        keep = torch.ones(B, q_len, kv_len, dtype=torch.bool)
    else:  # bottom-right causal
        keep = (torch.arange(kv_len)[None, :] <= torch.arange(q_len)[:, None] + kv_len - q_len)
        keep = keep.expand(B, q_len, kv_len).clone()
    mask = None
    if kind is not None:
        keep[1, :, :2] = False  # sample 1 is left-padded by two tokens
        if kind == "float" or base == "eager":
            mask = torch.zeros(B, 1, q_len, kv_len, dtype=torch.float64).masked_fill(~keep[:, None], -1e30)
        else:
            mask = keep[:, None].clone()
    fn = prefix_attention_forward if base == "sdpa" else prefix_attention_forward_eager
    out, _ = fn(attn, q, k, v, mask, scaling=d ** -0.5)
    ref = reference_attention(q, k, v, prefix.prefix_key.detach(), prefix.prefix_value.detach(), coef, keep,
                              d ** -0.5)
    tol = 1e-12 if base == "sdpa" else 1e-6  # Llama's eager attention takes its softmax in float32
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)


def test_response_scale_multiplies_the_gate():
    attn, prefix = _attention_module()
    q, k, v = (torch.randn(1, n, 4, 8, dtype=torch.float64) for n in (4, 2, 2))
    coef = torch.rand(1, 4, dtype=torch.float64)
    prefix._coef = coef
    prefix.response_scale = 0.25
    out, _ = prefix_attention_forward(attn, q, k, v, None, scaling=8 ** -0.5)
    keep = torch.tril(torch.ones(4, 4, dtype=torch.bool))[None]
    ref = reference_attention(q, k, v, prefix.prefix_key.detach(), prefix.prefix_value.detach(), 0.25 * coef, keep,
                              8 ** -0.5)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("base", ["sdpa", "eager"])
def test_layers_without_prefix_call_the_base_function(base):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.models.llama.modeling_llama import eager_attention_forward
    cfg = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=1,
                      intermediate_size=64, vocab_size=VOCAB)
    attn = LlamaAttention(cfg, layer_idx=0)
    q, k, v = torch.randn(1, 4, 4, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
    mask = torch.zeros(1, 1, 4, 4).masked_fill(~torch.tril(torch.ones(4, 4, dtype=torch.bool)), -1e9)
    fn, ref_fn = (prefix_attention_forward, sdpa_attention_forward) if base == "sdpa" else \
        (prefix_attention_forward_eager, eager_attention_forward)
    out, _ = fn(attn, q, k, v, mask, scaling=8 ** -0.5)
    ref, _ = ref_fn(attn, q, k, v, mask, scaling=8 ** -0.5)
    assert torch.equal(out, ref)


def test_gpt2_reorder_and_upcast_attn_keeps_its_eager_path():
    """GPT-2 with reorder_and_upcast_attn runs _upcast_and_reordered_attn under eager; so do its non-prefix layers."""
    model = tiny_model("gpt2", layers=2)
    model.config.reorder_and_upcast_attn = True
    for block in model.transformer.h:
        block.attn.reorder_and_upcast_attn = True
    attn = model.transformer.h[0].attn
    calls = []
    original = attn._upcast_and_reordered_attn
    attn._upcast_and_reordered_attn = lambda *a, **kw: calls.append(1) or original(*a, **kw)
    ids = torch.randint(3, 60, (2, 5))
    with torch.no_grad():
        ref = model(ids).logits
        assert len(calls) == 1
        apply_hlpt(model, counts=(1, 1), prefix_len=2)
        model.transformer.h[1].attn.pyflex_prefix.enabled = False
        out = model(ids).logits
    assert len(calls) == 2
    assert model.config._attn_implementation == "pyflex_prefix_eager"
    assert torch.equal(out, ref)


# --------------------------------------------------------------------------------------------------
# pooled gates
# --------------------------------------------------------------------------------------------------
def _gate(pooling, context):
    torch.manual_seed(0)
    return PooledGate(8, context, pooling=pooling, dtype=torch.float64)


@pytest.mark.parametrize("pooling", ["causal", "sequence"])
def test_pooled_gate_excludes_padding_and_continues_over_cached_forwards(pooling):
    ctx = TokenContext()
    gate = _gate(pooling, ctx)
    x = torch.randn(2, 7, 8, dtype=torch.float64)
    am = torch.tensor([[1] * 7, [0, 0, 1, 1, 1, 1, 1]])
    per_tok = torch.sigmoid(gate.linear(x)).squeeze(-1).detach()
    pool = causal_mean if pooling == "causal" else sequence_mean
    ctx.begin_forward(am, past_length=0)
    full = gate(x)
    torch.testing.assert_close(full, pool(per_tok, am.bool()), rtol=1e-14, atol=1e-14)
    # the same sequence in cached chunks: 4 tokens, then 1, then 2
    outs = []
    for a, b in ((0, 4), (4, 5), (5, 7)):
        ctx.begin_forward(am[:, :b], past_length=a)
        outs.append(gate(x[:, a:b]))
    if pooling == "causal":  # every position equals the cache-less value
        torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-14, atol=1e-14)
    else:  # each chunk gets the mean over everything seen so far
        torch.testing.assert_close(outs[1][:, 0], pool(per_tok[:, :5], am[:, :5].bool())[:, 0], rtol=1e-14,
                                   atol=1e-14)
    torch.testing.assert_close(outs[2][:, -1], full[:, -1], rtol=1e-14, atol=1e-14)


def test_pooled_gate_follows_cache_crop_and_batch_edits():
    ctx = TokenContext()
    gate = _gate("causal", ctx)
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    per_tok = torch.sigmoid(gate.linear(x)).squeeze(-1).detach()
    ctx.begin_forward(None, past_length=0)
    gate(x[:, :5])
    # assisted decoding cropped the cache back to 3 tokens: token 5 follows token 3
    ctx.begin_forward(None, past_length=3)
    g = gate(x[:, 5:6])
    ref = causal_mean(torch.cat([per_tok[:, :3], per_tok[:, 5:6]], 1), torch.ones(2, 4, dtype=torch.bool))
    torch.testing.assert_close(g[:, 0], ref[:, -1], rtol=1e-14, atol=1e-14)
    # beam search reorders the cache rows: the gate's sums follow (the edit reaches it through the context)
    from transformers import DynamicCache
    cache = DynamicCache()
    cache.update(torch.zeros(2, 1, 4, 2), torch.zeros(2, 1, 4, 2), 0)
    ctx.begin_forward(None, past_length=4, cache=cache)
    g_before = gate(x[:, 4:5])  # position 4 after [0, 1, 2, 5]
    cache.reorder_cache(torch.tensor([1, 1]))
    ctx.begin_forward(None, past_length=5, cache=cache)
    g = gate(x[:, 5:6])
    seq = torch.cat([per_tok[:, :3], per_tok[:, 5:6], per_tok[:, 4:5]], 1)
    expected = (seq[1].sum() + per_tok[:, 5]) / 6  # both rows continue sample 1's sums
    torch.testing.assert_close(g[:, 0], expected, rtol=1e-14, atol=1e-14)
    assert g_before.shape == (2, 1)
    with pytest.raises(RuntimeError, match="holds 9 tokens"):
        ctx.begin_forward(None, past_length=9)
        gate(x[:, :1])


def test_gate_observing_another_module_needs_it_to_run():
    gate = PooledGate(8)
    gate.observe_input_of(torch.nn.Identity(), "mlp")
    with pytest.raises(RuntimeError, match="input of 'mlp'"):
        gate(torch.randn(1, 3, 8))
    with pytest.raises(ValueError, match="pooling='max'"):
        PooledGate(8, pooling="max")


# --------------------------------------------------------------------------------------------------
# whole models
# --------------------------------------------------------------------------------------------------
def _capture_attention(module):
    store = {}

    def hook(mod, args, kwargs, output):
        store["hidden"] = kwargs.get("hidden_states", args[0] if args else None)
        store["pos"] = kwargs["position_embeddings"]
        store["out"] = output[0]
    handle = module.register_forward_hook(hook, with_kwargs=True)
    return store, handle


def test_model_prefix_layer_matches_manual_computation():
    """A prefix layer of a patched Llama: RoPE on q/k only, per-token gate = causal mean over real tokens."""
    model = tiny_llama(num_layers=4, attn_implementation="sdpa").double()
    apply_hlpt(model, variant="hlpt", prefix_len=4)  # 3 LoRA layers + 1 prefix layer
    assert model.pyflex_plan.prefix_layers == [3] and model.pyflex_plan.gate_pooling == "causal"
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
    with torch.no_grad():
        coef = causal_mean(torch.sigmoid(prefix.gate.linear(h)).squeeze(-1), am.bool())
        keep = (torch.arange(S)[None, :] <= torch.arange(S)[:, None]).expand(B, S, S).clone()
        keep &= am.bool()[:, None, :]
        ref = reference_attention(q, k, v, prefix.prefix_key, prefix.prefix_value, coef, keep, 8 ** -0.5)
        ref = attn.o_proj(ref.reshape(B, S, -1))
    torch.testing.assert_close(store["out"][0], ref[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(store["out"][1, 2:], ref[1, 2:], rtol=1e-12, atol=1e-12)


def _randomize_adapters(model, seed=5, std=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pyflex.get_registry(model).adapter_parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


def test_gemma2_prefix_layers_use_its_eager_softcapping_and_sliding_window():
    """Gemma2 (eager: logit softcapping, sliding-window layers): prefix layers equal the per-query reference with
    cap·tanh(s/cap) on every score and the window on the real keys; prefix columns are always attended."""
    model = tiny_model("gemma2", layers=3).double()
    model.config.attn_logit_softcapping = 0.7  # small, so tanh saturates and a missing softcap shows
    window = 3
    for layer in model.model.layers:
        layer.self_attn.attn_logit_softcapping = 0.7
        if layer.self_attn.sliding_window is not None:
            layer.self_attn.sliding_window = window
    model.config.sliding_window = window
    apply_hlpt(model, counts=(1, 2), prefix_len=3)  # prefix on layer 1 (full) and layer 2 (sliding)
    assert model.config._attn_implementation == "pyflex_prefix_eager"
    _randomize_adapters(model)
    stores = {i: _capture_attention(model.model.layers[i].self_attn) for i in (1, 2)}
    ids = torch.randint(3, VOCAB, (2, 7))
    am = torch.ones(2, 7, dtype=torch.long)
    am[1, 5:] = 0  # right padding (eager float64 with fully masked query rows is NaN in transformers itself)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=am)
    from transformers.models.gemma2.modeling_gemma2 import apply_rotary_pos_emb as gemma_rope
    for i, (store, handle) in stores.items():
        handle.remove()
        attn = model.model.layers[i].self_attn
        h, (cos, sin) = store["hidden"], store["pos"]
        B, S, _ = h.shape
        with torch.no_grad():
            q = attn.q_proj(h).view(B, S, -1, 8).transpose(1, 2)
            k = attn.k_proj(h).view(B, S, -1, 8).transpose(1, 2)
            v = attn.v_proj(h).view(B, S, -1, 8).transpose(1, 2)
            q, k = gemma_rope(q, k, cos, sin)
            prefix = attn.pyflex_prefix
            coef = causal_mean(torch.sigmoid(prefix.gate.linear(h)).squeeze(-1), am.bool())
            t, j = torch.arange(S)[:, None], torch.arange(S)[None, :]
            keep = (j <= t) & ((t - j < window) if i == 2 else torch.ones(S, S, dtype=torch.bool))
            keep = keep[None] & am.bool()[:, None, :]
            ref = reference_attention(q, k, v, prefix.prefix_key, prefix.prefix_value, coef, keep, 8 ** -0.5,
                                      softcap=0.7)
            ref = attn.o_proj(ref.reshape(B, S, -1))
        real = am.bool()
        # Gemma2's eager attention takes its softmax in float32
        torch.testing.assert_close(store["out"][real], ref[real], rtol=1e-6, atol=1e-6)


def test_gemma2_non_prefix_layers_are_the_models_own_attention():
    """Before pyflex delegated by implementation name, Gemma2's non-prefix layers went to sdpa, which refuses
    softcapping: every forward failed."""
    model = tiny_model("gemma2", layers=3).double()
    ids = torch.randint(3, VOCAB, (2, 6))
    with torch.no_grad():
        ref = model(ids).logits
        apply_hlpt(model, counts=(2, 1), prefix_len=3)  # lora_B = 0: the LoRA layers are the base layers
        model.model.layers[2].self_attn.pyflex_prefix.enabled = False
        out = model(ids).logits
    assert torch.equal(out, ref)


def _family_model(family, dtype=torch.float64, gated=True):
    model = tiny_model(family, layers=4).to(dtype)
    if family != "gemma2":  # Gemma2 needs eager (softcapping); sdpa keeps the float64 comparison exact elsewhere
        model.set_attn_implementation("sdpa")
    apply_hlpt(model, counts=(2, 2), prefix_len=3, gated=gated)  # two (gated) LoRA layers, two (gated) prefixes
    _randomize_adapters(model)
    return model


def _left_padded_batch(family, seq=9, seed=7):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, seq), generator=g)
    am = torch.ones(2, seq, dtype=torch.long)
    if family != "gemma2":  # eager float64 turns fully masked (padded) query rows into NaN in transformers itself
        am[1, :3] = 0
    return ids, am


@pytest.mark.parametrize("family, gated", [(f, True) for f in PREFIX_FAMILIES] + [("llama", False)])
def test_cached_forwards_equal_one_cacheless_forward(family, gated):
    """Prefill, single-token steps and a multi-token chunk through a KV cache give every position the logits of one
    forward over the whole sequence, to float64 rounding."""
    from transformers import DynamicCache
    model = _family_model(family, gated=gated)
    ids, am = _left_padded_batch(family)
    pos = (am.cumsum(1) - 1).clamp_min(0)
    with torch.no_grad():
        full = model(ids, attention_mask=am, position_ids=pos).logits
        cache = DynamicCache(config=model.config)
        steps = []
        cuts = [0, 4, 5, 6, 8, 9]
        for a, b in zip(cuts[:-1], cuts[1:]):
            steps.append(model(ids[:, a:b], attention_mask=am[:, :b], position_ids=pos[:, a:b], cache=cache,
                               use_cache=True).logits)
    real = am.bool()
    torch.testing.assert_close(torch.cat(steps, 1)[real], full[real], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("family", ["llama", "phi3", "gpt2", "gpt_neox", "gemma2"])
def test_cached_forwards_equal_one_cacheless_forward_eager_float32(family):
    """The same through the model's own eager attention, in float32 with left padding."""
    from transformers import DynamicCache
    model = tiny_model(family, layers=4)
    apply_hlpt(model, counts=(2, 2), prefix_len=3)
    assert model.config._attn_implementation == "pyflex_prefix_eager"
    _randomize_adapters(model)
    ids, am = _left_padded_batch("llama")
    pos = (am.cumsum(1) - 1).clamp_min(0)
    with torch.no_grad():
        full = model(ids, attention_mask=am, position_ids=pos).logits
        cache = DynamicCache(config=model.config)
        steps = [model(ids[:, a:b], attention_mask=am[:, :b], position_ids=pos[:, a:b], cache=cache,
                       use_cache=True).logits for a, b in ((0, 5), (5, 6), (6, 9))]
    real = am.bool()
    torch.testing.assert_close(torch.cat(steps, 1)[real], full[real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", PREFIX_FAMILIES)
def test_generate_with_kv_cache_equals_without(family):
    model = _family_model(family)
    ids, am = _left_padded_batch(family, seq=5)
    kw = dict(attention_mask=am, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True,
              pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(ids, use_cache=True, **kw)
        plain = model.generate(ids, use_cache=False, **kw)
    assert torch.equal(cached.sequences, plain.sequences)
    for a, b in zip(cached.logits, plain.logits):  # generate hands back float32 copies of the float64 logits
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert cached.sequences.shape == (2, 11)


def test_beam_search_with_kv_cache_equals_without():
    """Beam search reorders the cache rows every step; the gates' running sums follow them."""
    model = _family_model("llama")
    ids, am = _left_padded_batch("llama", seq=5)
    kw = dict(attention_mask=am, max_new_tokens=6, do_sample=False, num_beams=3, num_return_sequences=3,
              output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(ids, use_cache=True, **kw)
        plain = model.generate(ids, use_cache=False, **kw)
    assert torch.equal(cached.sequences, plain.sequences)
    torch.testing.assert_close(cached.sequences_scores, plain.sequences_scores, rtol=1e-6, atol=1e-6)


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
        with torch.no_grad():
            outs.append(model(input_ids=ids).logits)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-6, atol=1e-6)  # eager: float32 softmax


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
