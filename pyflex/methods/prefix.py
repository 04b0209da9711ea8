"""Gated prefix tuning (HLPT §4.3) through the transformers attention registry, and HLPT's pooled gates.

Pieces:

* :class:`PooledGate` — HLPT's gate (paper eq. 5 and 9): ``g_i = sigmoid(w·h_i + b)`` per token, then pooled per
  sample over the sample's *real* tokens (attention_mask 1; the mask comes from the model's
  :class:`~pyflex.layers.token_context.TokenContext`, so 2-D masks of decoders and the 4-D masks encoders build are both
  handled). Two poolings:

  - ``"causal"``: token t gets the mean of g over the sample's real tokens up to and including t. Nothing reads
    later tokens, so a causal LM stays causal, and cached decoding (``generate(use_cache=True)``) gives exactly what
    recomputing the whole sequence gives. At the last token it is the mean over the whole sample.
  - ``"sequence"``: every token gets the mean over all of the sample's real tokens (the paper's whole-sample mean). In a
    causal LM token t's output then depends on later tokens, so keys/values cached during decoding were computed
    with an older gate and cached decoding differs from cache-less decoding.

  The gate reads the tensor it is called with, or, after :meth:`PooledGate.observe_input_of`, the input of another
  module seen by a forward pre-hook (HLPT's LoRA gate reads the FFN block's input h_FN but scales down_proj's LoRA).
  Across the forwards of one cached sequence it continues from running sums (kept per position, so a cropped cache
  is followed; beam-search reordering is followed through the token context).
* :class:`GatedPrefix` — per-layer ``P_k``, ``P_v`` of shape (num_kv_heads, l, head_dim) and the prefix gate, which
  reads the attention module's input (after the layer's norm).
* The attention functions registered as ``attn_implementation="pyflex_prefix"`` (delegating to sdpa) and
  ``"pyflex_prefix_eager"`` (delegating to the model's own eager attention, so Gemma2's logit softcapping and every
  family's eager quirks apply). Layers without a prefix call exactly the base function with exactly the mask the base
  implementation's own mask function builds. A prefix layer prepends the gated prefix to the (post-RoPE) keys and
  values of that call — never to the KV cache — and extends the mask with always-attended prefix columns (also in
  sliding-window layers: the virtual tokens have no position). Prefix keys are not rotated by RoPE.

Exactness of the per-query prefix gate: with causal pooling query t sees ``[g_t P_k ; K]`` and ``[g_t P_v ; V]``.
The base functions take one key set per head, so a multi-token forward runs them once on widened heads
``q̃_t = [q_t, g_t q_t]``, prefix keys ``[0, P_k]``, keys ``[K, 0]``, prefix values ``[0, P_v]``, values ``[V, 0]``
(the score of prefix key j is ``g_t q_t·P_k,j``, of key k ``q_t·K_k``: the same scores, softcapping, mask, softmax and
dropout as the definition), and the output is ``out[:d] + g_t out[d:]``. That costs twice the attention work of the
prefix layers; a single-token decode step, ``"sequence"`` pooling and ungated prefixes scale P directly instead.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from pyflex.compat import eager_attention_function
from pyflex.layers.token_context import TokenContext

ATTN_IMPLEMENTATION = "pyflex_prefix"              # delegates to sdpa
ATTN_IMPLEMENTATION_EAGER = "pyflex_prefix_eager"  # delegates to the model's eager attention
IMPLEMENTATIONS = {"sdpa": ATTN_IMPLEMENTATION, "eager": ATTN_IMPLEMENTATION_EAGER}
PREFIX_ATTR = "pyflex_prefix"  # attribute of the attention module that holds its GatedPrefix
_ATTN_BEFORE_ATTR = "_pyflex_attn_before_prefix"  # on the model: its attention implementation before the prefix plan
POOLINGS = ("causal", "sequence")

__all__ = ["ATTN_IMPLEMENTATION", "ATTN_IMPLEMENTATION_EAGER", "POOLINGS", "PooledGate", "GatedPrefix",
           "attach_prefix", "enable_prefix_attention", "register_prefix_attention", "prefix_attention_forward",
           "prefix_attention_forward_eager"]


# --------------------------------------------------------------------------------------------------
# gates
# --------------------------------------------------------------------------------------------------
class _PoolingState:
    """Running sums of one gate over the current sequence: cumulative Σ g·w and Σ w (w = 1 for real tokens) at every
    position seen so far, (B, T) each, detached (earlier forwards of a cached sequence never need gradients)."""

    def __init__(self):
        self.total: Optional[torch.Tensor] = None
        self.count: Optional[torch.Tensor] = None

    def before(self, past: int, batch: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
        """(B,) sums over the first ``past`` positions of the sequence."""
        seen = 0 if self.total is None else self.total.shape[1]
        if seen < past or self.total.shape[0] != batch:
            raise RuntimeError(
                f"the KV cache holds {past} tokens of a batch of {batch}, but this HLPT gate saw "
                f"{seen} tokens{'' if self.total is None else f' of a batch of {self.total.shape[0]}'} of the "
                "sequence; every forward of a cached sequence must run through the model (whose forward records the "
                "padding mask and cache length for the gates), from the first token")
        return self.total[:, past - 1].to(device), self.count[:, past - 1].to(device)

    def store(self, past: int, total: torch.Tensor, count: torch.Tensor) -> None:
        if past == 0 or self.total is None:
            self.total, self.count = total, count
        else:  # positions beyond `past` were cropped from the cache (assisted decoding): drop them here too
            self.total = torch.cat([self.total[:, :past].to(total.device), total], dim=1)
            self.count = torch.cat([self.count[:, :past].to(count.device), count], dim=1)

    def apply_batch_edit(self, row_op: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if self.total is not None:
            self.total, self.count = row_op(self.total), row_op(self.count)


class _ObserveInput:
    """Forward pre-hook that makes a gate compute its coefficients from the hooked module's input. A class, not a
    closure, so a deep copy of the model rebinds it to the copied gate."""

    def __init__(self, gate: "PooledGate"):
        self.gate = gate

    def __call__(self, module, args, kwargs):
        hidden = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))
        if not isinstance(hidden, torch.Tensor):
            raise RuntimeError(f"{type(module).__name__} was called without a hidden-states tensor as its first "
                               "argument; the HLPT gate observing its input needs it")
        if not self.gate.adapter_enabled:  # switched off (pyflex.disable_adapters): nothing reads it this forward
            self.gate._observed = None
            return
        self.gate._observed = self.gate.coefficients(hidden)


class PooledGate(nn.Module):
    """HLPT gate: per-token ``sigmoid(Linear(h → 1))``, pooled per sample over real tokens (see the module docstring).

    Args:
        in_features: width of the gate's input h.
        context: the model's :class:`~pyflex.layers.token_context.TokenContext` (padding mask, KV-cache length); None:
            every token is real and each call is a sequence of its own.
        pooling: ``"causal"`` (default) or ``"sequence"``.

    ``coefficients(h)``: h (B, S, in) → (B, S) pooled coefficient per token (float32, or float64 for a float64
    gate); h (S, in) is one sample → (S,). ``forward(x)`` returns ``coefficients(x)`` in x's dtype, or, when the gate
    observes another module's input (:meth:`observe_input_of`), the coefficients computed from that input in the
    current forward; either way of shape ``x.shape[:-1]``, as ``FlexLinear.gate`` requires. The Linear keeps
    nn.Linear's Kaiming-uniform initialisation (HLPT appendix B).
    """

    def __init__(self, in_features: int, context: Optional[TokenContext] = None, *, pooling: str = "causal",
                 dtype=None, device=None):
        super().__init__()
        if not isinstance(in_features, int) or isinstance(in_features, bool) or in_features < 1:
            raise ValueError(f"in_features={in_features!r} is not allowed; it must be an int >= 1")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling={pooling!r} is not supported; allowed: {', '.join(POOLINGS)}")
        self.linear = nn.Linear(in_features, 1, dtype=dtype, device=device)
        # Plain attributes, not submodules: shared state, not parameter holders.
        self.context = context
        self.pooling = pooling
        self._state = _PoolingState()
        if context is not None:
            context.add_batch_state(self._state)
        self.observes: Optional[str] = None        # name of the module whose input the gate reads, if any
        self._observed: Optional[torch.Tensor] = None
        # False while pyflex.disable_adapters runs the base model: the observing pre-hook then computes nothing
        self.adapter_enabled = True

    def observe_input_of(self, module: nn.Module, name: str = "") -> None:
        """Read the gate's input from ``module``'s input (forward pre-hook) instead of the tensor passed to
        :meth:`forward`. Once per gate."""
        if self.observes is not None:
            raise ValueError(f"this gate already observes the input of {self.observes!r}")
        module.register_forward_pre_hook(_ObserveInput(self), with_kwargs=True)
        self.observes = name or type(module).__name__

    def coefficients(self, h: torch.Tensor) -> torch.Tensor:
        if h.dim() not in (2, 3):
            raise ValueError(f"the gate input must be (B, S, {self.linear.in_features}) or (S, "
                             f"{self.linear.in_features}), got shape {tuple(h.shape)}")
        h3 = h if h.dim() == 3 else h.unsqueeze(0)
        # fp32 master weights on a 16-bit model: cast the (1, in) weight to the activation, never the activation
        w_, b_ = self.linear.weight, self.linear.bias
        g = torch.sigmoid(F.linear(h3, w_.to(h3.dtype), None if b_ is None else b_.to(h3.dtype))).squeeze(-1)  # (B, S)
        cdt = torch.promote_types(g.dtype, torch.float32)
        g = g.to(cdt)
        batch, seq = g.shape
        ctx = self.context
        real = None if ctx is None else ctx.token_mask(batch, seq)
        w = torch.ones_like(g) if real is None else real.to(device=g.device, dtype=cdt)
        total = torch.cumsum(g * w, dim=1)
        count = torch.cumsum(w, dim=1)
        past = 0 if ctx is None else ctx.past_length
        if past > 0:
            total0, count0 = self._state.before(past, batch, g.device)
            total = total + total0.to(cdt)[:, None]
            count = count + count0.to(cdt)[:, None]
        if ctx is not None:
            self._state.store(past, total.detach(), count.detach())
        if self.pooling == "causal":
            coef = total / count.clamp_min(1.0)
        else:
            coef = (total[:, -1] / count[:, -1].clamp_min(1.0))[:, None].expand(batch, seq)
        return coef if h.dim() == 3 else coef[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observes is None:
            return self.coefficients(x).to(x.dtype)
        coef, self._observed = self._observed, None
        if coef is None:
            raise RuntimeError(f"this gate reads the input of {self.observes!r} (a forward pre-hook computes it "
                               "there), but it was called without that module running first in this forward")
        if tuple(coef.shape) != tuple(x.shape[:-1]):
            raise RuntimeError(f"the gate computed {tuple(coef.shape)} coefficients from the input of "
                               f"{self.observes!r} but is applied to an input of shape {tuple(x.shape)}")
        return coef.to(device=x.device, dtype=x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.linear.in_features}, pooling={self.pooling!r}" + (
            f", observes={self.observes!r}" if self.observes else "")


def check_init_std(init_std) -> None:
    """A clear error unless ``init_std`` (the prefixes' normal-init std) is a finite number >= 0."""
    if isinstance(init_std, bool) or not isinstance(init_std, numbers.Real) or not math.isfinite(init_std) \
            or init_std < 0:
        raise ValueError(f"prefix_init_std={init_std!r} is not allowed; it must be a finite number >= 0")


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
                 context: Optional[TokenContext] = None, gated: bool = True, pooling: str = "causal",
                 init_std: float = 0.02, dtype=None, device=None):
        super().__init__()
        for arg, value in (("hidden_size", hidden_size), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                           ("prefix_len", prefix_len)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{arg}={value!r} is not allowed; it must be an int >= 1")
        check_init_std(init_std)
        shape = (num_kv_heads, prefix_len, head_dim)
        self.prefix_key = nn.Parameter(torch.randn(shape, dtype=dtype, device=device) * init_std)
        self.prefix_value = nn.Parameter(torch.randn(shape, dtype=dtype, device=device) * init_std)
        self.gate = PooledGate(hidden_size, context, pooling=pooling, dtype=dtype, device=device) if gated else None
        self.response_scale = 1.0
        self.enabled = True
        self._coef: Optional[torch.Tensor] = None  # (B, S) gate of the current forward, set by the pre-hook

    @property
    def prefix_len(self) -> int:
        return self.prefix_key.shape[1]

    @property
    def adapter_enabled(self) -> bool:
        """The switch :func:`pyflex.disable_adapters` turns off (the same flag as ``enabled``): a disabled prefix adds
        nothing to attention and its gate is not computed."""
        return self.enabled

    @adapter_enabled.setter
    def adapter_enabled(self, flag: bool) -> None:
        self.enabled = bool(flag)

    def observe(self, hidden_states: torch.Tensor) -> None:
        """Compute this forward's per-token gate from the attention input (B, S, hidden)."""
        self._coef = None if self.gate is None else self.gate.coefficients(hidden_states)

    def query_coefficients(self, batch: int, q_len: int) -> Optional[torch.Tensor]:
        """(batch, q_len) gate × β for the queries of the current attention call, or None when ungated."""
        coef = self._coef
        if self.gate is None:
            return None
        if coef is None or coef.dim() != 2 or tuple(coef.shape) != (batch, q_len):
            raise RuntimeError(f"the prefix gate was computed for {None if coef is None else tuple(coef.shape)} "
                               f"tokens but attention runs on batch {batch} × {q_len} queries; the gate must be "
                               "observed by the attention module's pre-hook each forward")
        return coef * float(self.response_scale)

    def extra_repr(self) -> str:
        h, l, d = self.prefix_key.shape
        return f"num_kv_heads={h}, prefix_len={l}, head_dim={d}, gated={self.gate is not None}"


def _attention_pre_hook(module, args, kwargs):
    prefix = getattr(module, PREFIX_ATTR, None)
    if prefix is None or not prefix.enabled:
        return
    hidden = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(hidden, torch.Tensor):
        raise RuntimeError(f"{type(module).__name__} was called without hidden_states; the prefix gate needs them")
    prefix.observe(hidden)


def attach_prefix(attention: nn.Module, prefix: GatedPrefix) -> None:
    """Put ``prefix`` on an attention module (as submodule ``pyflex_prefix``) and hook its gate on the attention
    input."""
    if getattr(attention, PREFIX_ATTR, None) is not None:
        raise ValueError(f"{type(attention).__name__} already has a prefix; apply a prefix plan once per model")
    attention.add_module(PREFIX_ATTR, prefix)
    attention.register_forward_pre_hook(_attention_pre_hook, with_kwargs=True)


# --------------------------------------------------------------------------------------------------
# the registered attention functions
# --------------------------------------------------------------------------------------------------
def _base_function(base: str, module: nn.Module) -> Callable:
    if base == "eager":
        return eager_attention_function(module)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    return sdpa_attention_forward


def _prefix_mask(attention_mask: Optional[torch.Tensor], q_len: int, kv_len: int, n_prefix: int, causal: bool,
                 device, additive_dtype: Optional[torch.dtype]) -> Optional[torch.Tensor]:
    """The layer's mask with ``n_prefix`` always-attended columns in front; None when nothing is masked."""
    if attention_mask is None:
        if q_len == 1 or not causal:
            return None  # every key is attended (transformers' convention for a skipped mask)
        # A skipped causal mask means sdpa's is_causal, i.e. top-left aligned: query i sees keys j <= i (kv > q only
        # happens for a prefill into an empty static cache, whose extra slots must stay unseen).
        mask = (torch.arange(kv_len, device=device)[None, :] <= torch.arange(q_len, device=device)[:, None])
        mask = mask.view(1, 1, q_len, kv_len)
    else:
        mask = attention_mask
        if mask.shape[-1] < kv_len:
            raise RuntimeError(f"the attention mask covers {mask.shape[-1]} keys but the layer has {kv_len}")
        mask = mask[..., mask.shape[-1] - kv_len:]
    if mask.dtype == torch.bool:
        pad = torch.ones(*mask.shape[:-1], n_prefix, dtype=torch.bool, device=mask.device)
    else:
        pad = torch.zeros(*mask.shape[:-1], n_prefix, dtype=mask.dtype, device=mask.device)
    mask = torch.cat([pad, mask], dim=-1)
    if additive_dtype is not None and mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=additive_dtype, device=mask.device).masked_fill(
            ~mask, torch.finfo(additive_dtype).min)
    return mask


def _prefix_attention(base: str, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: Optional[torch.Tensor], scaling: Optional[float] = None, dropout: float = 0.0,
                      **kwargs):
    base_fn = _base_function(base, module)
    prefix = getattr(module, PREFIX_ATTR, None)
    if prefix is None or not prefix.enabled:
        return base_fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)

    batch, _, q_len, head_dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    pk, pv = prefix.prefix_key, prefix.prefix_value
    if pk.shape[0] != kv_heads or pk.shape[-1] != head_dim or pv.shape[-1] != value.shape[-1]:
        raise RuntimeError(f"prefix K/V have {pk.shape[0]} heads × {pk.shape[-1]} dims but the layer's keys have "
                           f"{kv_heads} heads × {head_dim} dims")
    pk = pk.to(device=key.device, dtype=key.dtype).unsqueeze(0).expand(batch, -1, -1, -1)
    pv = pv.to(device=value.device, dtype=value.dtype).unsqueeze(0).expand(batch, -1, -1, -1)
    n_prefix = pk.shape[2]
    if scaling is None:  # what every base uses for head_dim d; explicit because the widened path below widens heads
        scaling = head_dim ** -0.5
    mask = _prefix_mask(attention_mask, q_len, kv_len, n_prefix, getattr(module, "is_causal", True), query.device,
                        query.dtype if base == "eager" else None)
    kwargs.pop("is_causal", None)
    if base == "sdpa":
        kwargs["is_causal"] = False  # the prefix mask is explicit (or nothing is masked)

    coef = prefix.query_coefficients(batch, q_len)
    if coef is None or q_len == 1 or prefix.gate.pooling == "sequence":
        # one coefficient per sample: scale P_k and P_v (eq. 5) and concatenate (eq. 4)
        c = float(prefix.response_scale) if coef is None else coef[:, 0].to(key.dtype)[:, None, None, None]
        key = torch.cat([c * pk, key], dim=2)
        value = torch.cat([c * pv, value], dim=2)
        return base_fn(module, query, key, value, mask, scaling=scaling, dropout=dropout, **kwargs)

    # one coefficient per query: widened heads (module docstring)
    c = coef.to(query.dtype)  # (B, q)
    query2 = torch.cat([query, c[:, None, :, None] * query], dim=-1)
    key2 = torch.cat([torch.cat([torch.zeros_like(pk), pk], dim=-1),
                      torch.cat([key, torch.zeros_like(key)], dim=-1)], dim=2)
    value2 = torch.cat([torch.cat([torch.zeros_like(pv), pv], dim=-1),
                        torch.cat([value, torch.zeros_like(value)], dim=-1)], dim=2)
    out, weights = base_fn(module, query2, key2, value2, mask, scaling=scaling, dropout=dropout, **kwargs)
    dv = value.shape[-1]
    out = out[..., :dv] + c[:, :, None, None].to(out.dtype) * out[..., dv:]  # out: (B, q, H, 2·dv)
    return out, weights


def prefix_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: Optional[torch.Tensor], scaling: Optional[float] = None,
                             dropout: float = 0.0, **kwargs):
    """``attn_implementation="pyflex_prefix"``: sdpa, with the layer's gated prefix prepended.

    Shapes (transformers' attention-interface convention):
        query (B, H, q, d); key, value (B, H_kv, kv, d), post-RoPE, including cached tokens;
        attention_mask: None (causal implied, or nothing masked), bool (B|1, 1, q, kv) True = attend, or float additive.
    Returns what sdpa returns: (B, q, H, d) output and None.
    """
    return _prefix_attention("sdpa", module, query, key, value, attention_mask, scaling, dropout, **kwargs)


def prefix_attention_forward_eager(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                   attention_mask: Optional[torch.Tensor], scaling: Optional[float] = None,
                                   dropout: float = 0.0, **kwargs):
    """``attn_implementation="pyflex_prefix_eager"``: the model's own eager attention (softcapping and all), with
    the layer's gated prefix prepended. Same shapes as :func:`prefix_attention_forward`; the returned weights of a
    prefix layer have l prefix columns in front."""
    return _prefix_attention("eager", module, query, key, value, attention_mask, scaling, dropout, **kwargs)


_registered = False


def register_prefix_attention() -> None:
    """Register both attention functions, each with its base's mask function (sdpa's, eager's); idempotent."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask
        AttentionInterface.register(ATTN_IMPLEMENTATION, prefix_attention_forward)
        AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
        AttentionInterface.register(ATTN_IMPLEMENTATION_EAGER, prefix_attention_forward_eager)
        AttentionMaskInterface.register(ATTN_IMPLEMENTATION_EAGER, eager_mask)
        _registered = True


def _set_attn_implementation(model: nn.Module, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    if getattr(model.config, "_attn_implementation", None) != name:
        model.config._attn_implementation = name


def enable_prefix_attention(model: nn.Module) -> str:
    """Switch ``model`` to the prefix attention; returns the base implementation it delegates to: ``"eager"`` when
    the model ran eager attention, else ``"sdpa"`` (flash/flex kernels cannot take the extended mask, so a model on
    one of them runs sdpa from here on). The implementation it had is kept for :func:`remove_gates_and_prefixes`."""
    register_prefix_attention()
    current = getattr(model.config, "_attn_implementation", None) or "sdpa"
    bases = {name: base for base, name in IMPLEMENTATIONS.items()}
    base = bases.get(current, "eager" if current == "eager" else "sdpa")
    name = IMPLEMENTATIONS[base]
    if current != name:
        model.__dict__.setdefault(_ATTN_BEFORE_ATTR, current)
        _set_attn_implementation(model, name)
    return base


def _drop_pre_hooks(module: nn.Module, is_ours: Callable[[Callable], bool]) -> None:
    for key in [k for k, hook in module._forward_pre_hooks.items() if is_ours(hook)]:
        del module._forward_pre_hooks[key]
        module._forward_pre_hooks_with_kwargs.pop(key, None)


def remove_gates_and_prefixes(model: nn.Module) -> None:
    """Undo what the prefix plan added to ``model``: every attention module's prefix and its pre-hook, every gate's
    observing pre-hook, and the prefix attention implementation (back to the one the model had). Found by type, so
    it works on a deep copy of the model too."""
    for module in model.modules():
        if isinstance(getattr(module, PREFIX_ATTR, None), GatedPrefix):
            delattr(module, PREFIX_ATTR)
        _drop_pre_hooks(module, lambda hook: hook is _attention_pre_hook or isinstance(hook, _ObserveInput))
    before = model.__dict__.pop(_ATTN_BEFORE_ATTR, None)
    if before is not None:
        _set_attn_implementation(model, before)
