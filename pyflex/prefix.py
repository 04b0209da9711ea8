"""Gated prefix tuning (HLPT §4.3) through the transformers attention registry, and the pooled gates.

Pieces:

* :class:`GatingContext` — per-model state the gates read: the 2-D padding mask of the current forward
  (captured by a forward pre-hook on the decoder stack) and running per-sample sums for KV-cache decoding.
* :class:`PooledGate` — ``sigmoid(Linear(x → 1))`` per token, mean-pooled per sample over non-padding
  tokens, broadcast back to the tokens. Used as ``FlexLinear.gate`` (HLPT's LoRA gate, eq. 9) and inside
  :class:`GatedPrefix` (eq. 5).
* :class:`GatedPrefix` — per-layer ``P_k``, ``P_v`` of shape (num_kv_heads, l, head_dim) and the prefix gate.
* :func:`prefix_attention_forward` — the function registered as ``attn_implementation="pyflex_prefix"``.
  For a layer whose attention module carries a prefix it prepends the gated ``P_k``/``P_v`` to the (post-RoPE)
  key/value of that call — the prefix is never written to the KV cache, so ``generate()`` works unchanged —
  extends the mask with "attend" columns and delegates to the model's previous implementation (sdpa or eager).
  Prefix keys are not rotated by RoPE. Layers without a prefix are passed straight through.

Pooling under KV-cache decoding: a sample's gate is the mean over all of its non-padding tokens seen so far in
the sequence (running sums kept in the context and reset whenever a forward starts without cached tokens).
A forward without cache therefore pools over the whole input, and each decode step pools over prompt + generated
tokens, which is what a cache-less recomputation of that step would pool over.
"""
from __future__ import annotations

import sys
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from .compat import cache_from_call, cache_length

ATTN_IMPLEMENTATION = "pyflex_prefix"
PREFIX_ATTR = "pyflex_prefix"  # attribute of the attention module that holds its GatedPrefix
_BASES = ("sdpa", "eager")


# --------------------------------------------------------------------------------------------------
# context shared by the gates of one model
# --------------------------------------------------------------------------------------------------
class GatingContext:
    """What the gates need to know about the current forward.

    Attributes:
        attention_mask: (B, S_total) 0/1 padding mask of the current forward or None. With a KV cache S_total is
            past + current length; the gates use its last S columns.
        new_sequence: True when the current forward starts a sequence (no cached tokens), which resets the
            running pooling sums.
    """

    def __init__(self):
        self.attention_mask: Optional[torch.Tensor] = None
        self.new_sequence: bool = True
        self._sums: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}

    def begin_forward(self, attention_mask: Optional[torch.Tensor], past_length: int) -> None:
        self.attention_mask = attention_mask if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 \
            else None
        self.new_sequence = past_length == 0
        if self.new_sequence:
            self._sums.clear()

    def token_mask(self, batch: int, seq: int, device) -> Optional[torch.Tensor]:
        """(B, S) float mask of the current tokens (1 = real token), or None when unknown or inconsistent."""
        mask = self.attention_mask
        if mask is None or mask.shape[0] != batch or mask.shape[1] < seq:
            return None
        return mask[:, mask.shape[1] - seq:].to(device=device, dtype=torch.float32)

    def pool(self, key: int, per_token: torch.Tensor, token_mask: Optional[torch.Tensor], running: bool) -> torch.Tensor:
        """Mean of ``per_token`` (B, S) over real tokens → (B,). With ``running`` the sums continue across the
        forwards of one cached sequence (decode steps)."""
        weights = torch.ones_like(per_token, dtype=torch.float32) if token_mask is None else token_mask
        total = (per_token.float() * weights).sum(dim=1)
        count = weights.sum(dim=1)
        if running and not self.new_sequence and key in self._sums:
            prev_total, prev_count = self._sums[key]
            if prev_total.shape == total.shape:
                total = total + prev_total
                count = count + prev_count
        if running:
            # Detached: earlier decode steps never need gradients.
            self._sums[key] = (total.detach(), count.detach())
        return total / count.clamp_min(1.0)


def install_gating_context(decoder: nn.Module) -> GatingContext:
    """Attach (once) a :class:`GatingContext` to ``decoder`` (the module that runs the layer stack, e.g.
    ``LlamaModel``) and a forward pre-hook that records each forward's padding mask and cache length."""
    ctx = getattr(decoder, "_pyflex_gating_context", None)
    if ctx is not None:
        return ctx
    ctx = GatingContext()

    def _pre_hook(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1 and isinstance(args[1], torch.Tensor):
            mask = args[1]  # (input_ids, attention_mask, ...) called positionally
        ctx.begin_forward(mask, cache_length(cache_from_call(args, kwargs)))

    decoder._pyflex_gating_context = ctx
    decoder._pyflex_gating_hook = decoder.register_forward_pre_hook(_pre_hook, with_kwargs=True)
    return ctx


# --------------------------------------------------------------------------------------------------
# gates
# --------------------------------------------------------------------------------------------------
class PooledGate(nn.Module):
    """``g = mean_tokens(sigmoid(x wᵀ + b))`` per sample, broadcast to the tokens.

    ``forward(x)``: x (B, S, in_features) or (S, in_features) → coefficient of shape ``x.shape[:-1]``, dtype of x.
    The Linear keeps nn.Linear's Kaiming-uniform initialisation (HLPT appendix B).
    """

    def __init__(self, in_features: int, context: Optional[GatingContext] = None, *, running: bool = True,
                 dtype=None, device=None):
        super().__init__()
        self.linear = nn.Linear(in_features, 1, dtype=dtype, device=device)
        # A plain attribute, not a submodule: the context is shared state, not a parameter holder.
        self.context = context
        self.running = running

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """(B,) pooled gate for x (B, S, in_features); x (S, in) is one sample."""
        x3 = x if x.dim() == 3 else x.reshape(1, -1, x.shape[-1])
        per_token = torch.sigmoid(self.linear(x3.to(self.linear.weight.dtype))).squeeze(-1)  # (B, S)
        ctx = self.context
        if ctx is None:
            return per_token.float().mean(dim=1)
        return ctx.pool(id(self), per_token, ctx.token_mask(x3.shape[0], x3.shape[1], x.device), self.running)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.pooled(x)
        if x.dim() == 3:
            return g[:, None].expand(x.shape[0], x.shape[1]).to(x.dtype)
        return g.expand(x.shape[:-1]).to(x.dtype)


class GatedPrefix(nn.Module):
    """Gated prefix of one attention layer (HLPT eq. 4-5).

    Parameters:
        prefix_key, prefix_value: (num_kv_heads, l, head_dim), normal(0, init_std) — one l×d_kv block per KV head
            group, so GQA models pay for KV heads only.
        gate: :class:`PooledGate` on the attention input (after its norm), or None for an ungated prefix.

    ``response_scale`` (β, float) multiplies the gate, so IST's response suppression scales this adapter's
    contribution the way it scales a LoRA delta.
    """

    def __init__(self, hidden_size: int, num_kv_heads: int, head_dim: int, prefix_len: int = 20, *,
                 context: Optional[GatingContext] = None, gated: bool = True, init_std: float = 0.02,
                 dtype=None, device=None):
        super().__init__()
        for arg, value in (("hidden_size", hidden_size), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                           ("prefix_len", prefix_len)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{arg}={value!r} is not allowed; it must be an int >= 1")
        shape = (num_kv_heads, prefix_len, head_dim)
        self.prefix_key = nn.Parameter(torch.randn(shape, dtype=dtype, device=device) * init_std)
        self.prefix_value = nn.Parameter(torch.randn(shape, dtype=dtype, device=device) * init_std)
        self.gate = PooledGate(hidden_size, context, dtype=dtype, device=device) if gated else None
        self.response_scale = 1.0
        self.enabled = True
        self._coef: Optional[torch.Tensor] = None  # (B,) gate of the current forward, set by the pre-hook

    @property
    def prefix_len(self) -> int:
        return self.prefix_key.shape[1]

    def observe(self, hidden_states: torch.Tensor) -> None:
        """Compute this forward's per-sample gate from the attention input (B, S, hidden)."""
        if self.gate is None:
            self._coef = None
        else:
            self._coef = self.gate.pooled(hidden_states)

    def key_value(self, batch: int, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        """Gated P_k, P_v expanded to (batch, num_kv_heads, l, head_dim) in ``dtype``."""
        pk, pv = self.prefix_key.to(dtype), self.prefix_value.to(dtype)
        coef = self._coef
        if coef is None:
            coef = torch.ones(batch, device=pk.device, dtype=torch.float32)
        elif coef.shape[0] != batch:
            raise RuntimeError(f"prefix gate was computed for batch {coef.shape[0]} but attention runs on batch "
                               f"{batch}; the gate must be observed by the attention module's pre-hook each forward")
        coef = (coef * float(self.response_scale)).to(dtype)[:, None, None, None]
        return coef * pk.unsqueeze(0), coef * pv.unsqueeze(0)

    def extra_repr(self) -> str:
        h, l, d = self.prefix_key.shape
        return f"num_kv_heads={h}, prefix_len={l}, head_dim={d}, gated={self.gate is not None}"


def _attention_pre_hook(module, args, kwargs):
    prefix = getattr(module, PREFIX_ATTR, None)
    if prefix is None or not prefix.enabled:
        return
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    if hidden is None:
        raise RuntimeError(f"{type(module).__name__} was called without hidden_states; the prefix gate needs them")
    prefix.observe(hidden)


def attach_prefix(attention: nn.Module, prefix: GatedPrefix, *, base: str = "sdpa") -> None:
    """Put ``prefix`` on an attention module (as submodule ``pyflex_prefix``) and hook its gate on the
    attention input. ``base`` is the implementation the registered function delegates to."""
    if base not in _BASES:
        raise ValueError(f"base={base!r} is not supported; allowed: {', '.join(_BASES)}")
    if getattr(attention, PREFIX_ATTR, None) is not None:
        raise ValueError(f"{type(attention).__name__} already has a prefix; apply a prefix plan once per model")
    attention.add_module(PREFIX_ATTR, prefix)
    attention._pyflex_base_attention = base
    attention._pyflex_prefix_hook = attention.register_forward_pre_hook(_attention_pre_hook, with_kwargs=True)


# --------------------------------------------------------------------------------------------------
# the registered attention function
# --------------------------------------------------------------------------------------------------
def _causal_bool_mask(batch: int, q_len: int, kv_len: int, device) -> torch.Tensor:
    """(B, 1, q, kv) bool, bottom-right aligned: query i sees keys j <= i + (kv - q)."""
    q_pos = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
    k_pos = torch.arange(kv_len, device=device)[None, :]
    return (k_pos <= q_pos).view(1, 1, q_len, kv_len).expand(batch, 1, q_len, kv_len)


def _eager_forward(module):
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        raise RuntimeError(f"{type(module).__name__}'s modeling module has no eager_attention_forward; "
                           "use base='sdpa'")
    return fn


def _to_additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    return mask


def prefix_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: Optional[torch.Tensor], scaling: Optional[float] = None,
                             dropout: float = 0.0, **kwargs):
    """Attention with the layer's gated prefix prepended.

    Shapes (transformers' attention-interface convention):
        query (B, H, q, d); key, value (B, H_kv, kv, d), post-RoPE, including cached tokens;
        attention_mask: None (causal implied), bool (B|1, 1, q, kv) True = attend, or float additive.
    Returns what the base implementation returns: (B, q, H, d) output and weights or None.
    """
    base = getattr(module, "_pyflex_base_attention", "sdpa")
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    base_fn = sdpa_attention_forward if base == "sdpa" else _eager_forward(module)
    prefix = getattr(module, PREFIX_ATTR, None)
    batch, _, q_len, _ = query.shape
    kv_len = key.shape[2]
    if prefix is None or not prefix.enabled:
        if base == "eager":
            if attention_mask is None and getattr(module, "is_causal", True):
                attention_mask = _causal_bool_mask(batch, q_len, kv_len, query.device)
            if attention_mask is not None:
                attention_mask = _to_additive(attention_mask, query.dtype)
        return base_fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)

    pk, pv = prefix.key_value(batch, key.dtype)
    if pk.shape[1] != key.shape[1] or pk.shape[-1] != key.shape[-1]:
        raise RuntimeError(f"prefix K/V have {pk.shape[1]} heads × {pk.shape[-1]} dims but the layer's keys have "
                           f"{key.shape[1]} heads × {key.shape[-1]} dims")
    key = torch.cat([pk.to(key.device), key], dim=2)
    value = torch.cat([pv.to(value.device), value], dim=2)
    n_prefix = pk.shape[2]

    if attention_mask is None:
        if getattr(module, "is_causal", True):
            attention_mask = _causal_bool_mask(batch, q_len, kv_len, query.device)
        else:
            attention_mask = torch.ones(batch, 1, q_len, kv_len, dtype=torch.bool, device=query.device)
    mask = attention_mask[..., -kv_len:] if attention_mask.shape[-1] > kv_len else attention_mask
    # Prefix columns are always attended: True for bool masks, 0 for additive ones.
    pad = torch.ones(*mask.shape[:-1], n_prefix, dtype=torch.bool, device=mask.device) if mask.dtype == torch.bool \
        else torch.zeros(*mask.shape[:-1], n_prefix, dtype=mask.dtype, device=mask.device)
    mask = torch.cat([pad, mask], dim=-1)
    if base == "eager":
        mask = _to_additive(mask, query.dtype)
    kwargs.pop("is_causal", None)
    return base_fn(module, query, key, value, mask, scaling=scaling, dropout=dropout, **kwargs)


_registered = False


def register_prefix_attention() -> str:
    """Register :func:`prefix_attention_forward` and its mask function (transformers' sdpa mask, which may be
    None for plain causal batches) under ``"pyflex_prefix"``; idempotent. Returns the name."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
        AttentionInterface.register(ATTN_IMPLEMENTATION, prefix_attention_forward)
        AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
        _registered = True
    return ATTN_IMPLEMENTATION


def enable_prefix_attention(model: nn.Module) -> str:
    """Switch ``model`` to the prefix attention; returns the base implementation it delegates to."""
    register_prefix_attention()
    current = getattr(model.config, "_attn_implementation", None) or "sdpa"
    if current == ATTN_IMPLEMENTATION:
        return getattr(model, "_pyflex_base_attention", "sdpa")
    base = "eager" if current == "eager" else "sdpa"  # flash/flex kernels cannot take the extended mask
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    if getattr(model.config, "_attn_implementation", None) != ATTN_IMPLEMENTATION:
        model.config._attn_implementation = ATTN_IMPLEMENTATION
    model._pyflex_base_attention = base
    return base
