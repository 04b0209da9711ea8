"""HLPT and H²LPT (docs/methods.md, "HLPT / H²LPT"): gated LoRA on the FFN down projection (W2) in the bottom layers,
gated prefix in the top layers, nothing in between (H²LPT).

Placement (paper §4.1):
    HLPT   bottom 3/4 LoRA, top 1/4 prefix                      32 layers → 24 + 8,  28 layers → 21 + 7
    H²LPT  bottom 3/8 LoRA, top 1/8 prefix (3/7 and 1/7 for    32 layers → 12 + 4,  28 layers (GPT-J) → 12 + 4
           GPT-J's 28 layers)

Counting rule. With the default ratios (``lora_ratio=None, prefix_ratio=None``) the paper's fractions are used;
for H²LPT a layer count that is a multiple of 7 but not of 8 takes the paper's GPT-J fractions 3/7 and 1/7.
A fractional count is rounded half up, each part gets at least one layer, and with HLPT's default split (which
covers every layer) the LoRA part is ``L − n_prefix``. Explicit ratios are rounded half up the same way.
``counts=(n_lora, n_prefix)`` sets the counts directly.

Gates (paper eq. 5 and 9; docs/methods.md), :class:`pyflex.methods.prefix.PooledGate`:

* LoRA gate (eq. 9): ``sigmoid(Linear(h_FN → 1))`` per token, where h_FN is the FFN block's input (the input of the
  layer's ``mlp``; BERT: of ``intermediate``); it scales the down-projection LoRA term (α' = g·α, through
  ``FlexLinear.gate``). ``gate_input="down_proj_input"`` reads down_proj's input instead, as the official code does.
* Prefix gate (eq. 5): ``sigmoid(Linear(attention input after its norm → 1))`` per token; it scales P_k and P_v.

Each is pooled per sample over the sample's real tokens (padding excluded; the mask comes from the model's
:class:`pyflex.layers.token_context.TokenContext`, so encoders' 4-D masks are handled): ``gate_pooling="causal"`` gives token
t the mean over the real tokens up to t (the default for causal models: no look-ahead, and ``generate`` with a KV
cache equals ``generate`` without), ``"sequence"`` the mean over all of them (the paper's whole-sample mean; the default for
bidirectional encoders; on a causal LM token t then depends on later tokens and cached decoding differs from
cache-less decoding). The paper itself states no pooling (eq. 5, 9: g = Linear(x) ∈ (0, 1)).
Paper defaults: r = 8, α = 16, l = 20, lr 3e-3 (:data:`HLPT_LR`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import List, Optional, Tuple

from torch import nn

from pyflex.layers.linear import default_adapter_dtype
from pyflex.methods.prefix import (GatedPrefix, PooledGate, attach_prefix, check_init_std, enable_prefix_attention,
                                   remove_gates_and_prefixes)
from pyflex.layers.token_context import install_token_context
from pyflex.model.families import family_spec, resolve_layers
from pyflex.model.patch import get_registry, patch_model, register_plan_remover, unpatch
from pyflex.model.registry import REGISTRY_ATTR

# patch_model arguments apply_hlpt sets itself
_PLANNED_PATCH_ARGUMENTS = frozenset({"target_modules", "layers", "config", "pyflex_config", "layers_path",
                                      "rank_pattern", "alpha_pattern"})

VARIANTS = ("hlpt", "h2lpt")
GATE_INPUTS = ("ffn_input", "down_proj_input")
GATE_POOLINGS = ("auto", "causal", "sequence")
HLPT_LR = 3e-3  # the paper's learning rate for both hybrid methods (appendix B)

__all__ = ["HLPT_LR", "HLPTPlan", "apply_hlpt", "hlpt_layer_counts"]


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5 + 1e-9))


def hlpt_layer_counts(num_layers: int, variant: str = "hlpt", lora_ratio: Optional[float] = None,
                      prefix_ratio: Optional[float] = None) -> Tuple[int, int]:
    """(n_lora, n_prefix) for a model with ``num_layers`` layers (see the module docstring for the rule)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r} is not supported; allowed: {', '.join(VARIANTS)}")
    if not isinstance(num_layers, int) or num_layers < 2:
        raise ValueError(f"num_layers={num_layers!r} is not allowed; HLPT needs at least 2 layers")
    L = num_layers
    default = lora_ratio is None and prefix_ratio is None
    if variant == "hlpt":
        lr_, pr_ = Fraction(3, 4), Fraction(1, 4)
    elif L % 8 != 0 and L % 7 == 0:
        lr_, pr_ = Fraction(3, 7), Fraction(1, 7)  # the paper's GPT-J (28 layers) setting
    else:
        lr_, pr_ = Fraction(3, 8), Fraction(1, 8)
    lr_ = lr_ if lora_ratio is None else lora_ratio
    pr_ = pr_ if prefix_ratio is None else prefix_ratio
    for arg, value in (("lora_ratio", lr_), ("prefix_ratio", pr_)):
        if not 0 <= float(value) <= 1:
            raise ValueError(f"{arg}={float(value)} is not allowed; it must be in [0, 1]")
    n_prefix = _round_half_up(float(pr_) * L) if float(pr_) > 0 else 0
    n_prefix = max(1, n_prefix) if float(pr_) > 0 else 0
    if default and variant == "hlpt":
        n_lora = L - n_prefix
    else:
        n_lora = _round_half_up(float(lr_) * L) if float(lr_) > 0 else 0
        n_lora = max(1, n_lora) if float(lr_) > 0 else 0
    if n_lora + n_prefix > L:
        raise ValueError(f"lora_ratio={float(lr_)} and prefix_ratio={float(pr_)} give {n_lora} LoRA + {n_prefix} prefix "
                         f"layers, more than the model's {L}")
    return n_lora, n_prefix


@dataclass
class HLPTPlan:
    """What :func:`apply_hlpt` did. Stored on the model as ``model.pyflex_plan``."""
    variant: str
    num_layers: int
    lora_layers: List[int]
    prefix_layers: List[int]
    r: int
    alpha: float
    prefix_len: int
    base_attention: str
    gated: bool = True
    gate_input: str = "ffn_input"
    gate_pooling: str = "causal"
    lr: float = HLPT_LR
    notes: List[str] = field(default_factory=list)


def _get(module: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        module = getattr(module, part)
    return module


def _attention_dims(model: nn.Module, attention: nn.Module) -> Tuple[int, int, int]:
    """(hidden_size, num_kv_heads, head_dim)."""
    cfg = model.config
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd")
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head")
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(attention, "head_dim", None) or getattr(cfg, "head_dim", None) or hidden // heads
    return int(hidden), int(kv_heads), int(head_dim)


def apply_hlpt(model: nn.Module, *, variant: str = "hlpt", lora_ratio: Optional[float] = None,
               prefix_ratio: Optional[float] = None, counts: Optional[Tuple[int, int]] = None, prefix_len: int = 20,
               r: int = 8, alpha: float = 16.0, gated: bool = True, gate_input: str = "ffn_input",
               gate_pooling: str = "auto", prefix_init_std: float = 0.02, **patch_kwargs) -> nn.Module:
    """Apply HLPT (``variant="hlpt"``) or H²LPT (``"h2lpt"``) to an unpatched HF model, in place.

    Args:
        model: a model whose family is in :mod:`pyflex.model.families` (must not be patched yet).
        variant: "hlpt" (bottom 3/4 LoRA, top 1/4 prefix) or "h2lpt" (bottom 3/8, top 1/8).
        lora_ratio, prefix_ratio: override the fractions; counts: (n_lora, n_prefix) directly.
        prefix_len: l, virtual tokens per prefix layer (paper: 20).
        r, alpha: LoRA rank and α of the down-projection LoRA (paper: 8, 16).
        gated: add the gates (the paper's method); False gives the "w/o gate" ablation.
        gate_input: what the LoRA gate reads.
            ``"ffn_input"`` (default, paper eq. 9): h_FN, the FFN block's input — the input of the layer's ``mlp``
            (Llama-likes: the post-attention-norm output; GPT-2: ``ln_2``'s output; Phi-3: the input of the fused
            gate_up_proj) or of BERT's ``intermediate``. The gate's Linear is hidden_size → 1.
            ``"down_proj_input"`` (the official code's choice): the down projection's own input, act(gate)·up for
            gated MLPs. The gate's Linear is intermediate_size → 1.
            Either way the coefficient scales the down projection's LoRA term.
        gate_pooling: how the per-token gate values are pooled over a sample's real (non-padding) tokens.
            ``"causal"``: token t gets the mean over the real tokens up to t; ``"sequence"``: every token gets the
            mean over all real tokens (the paper's whole-sample mean; on a causal LM token t then depends on later
            tokens, and KV-cached decoding differs from cache-less decoding). ``"auto"`` (default): "causal" when the
            model's attention is causal (decoder LMs), "sequence" for bidirectional encoders (BERT).
        prefix_init_std: std of the normal init of P_k, P_v.
        **patch_kwargs: passed to :func:`pyflex.patch_model` (e.g. ``tau=True``, ``dropout``).

    Returns the model; ``model.pyflex_plan`` is the :class:`HLPTPlan`. Only the LoRA, gate and prefix parameters
    require grad. When the model has prefix layers its attention implementation becomes ``"pyflex_prefix_eager"``
    if it was ``"eager"`` (layers call the model's own eager attention, e.g. with Gemma2's softcapping), else
    ``"pyflex_prefix"`` (sdpa; a model on flash/flex attention moves to sdpa).
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r} is not supported; allowed: {', '.join(VARIANTS)}")
    if gate_input not in GATE_INPUTS:
        raise ValueError(f"gate_input={gate_input!r} is not supported; allowed: {', '.join(GATE_INPUTS)}")
    if gate_pooling not in GATE_POOLINGS:
        raise ValueError(f"gate_pooling={gate_pooling!r} is not supported; allowed: {', '.join(GATE_POOLINGS)}")
    if not isinstance(prefix_len, int) or isinstance(prefix_len, bool) or prefix_len < 1:
        raise ValueError(f"prefix_len={prefix_len!r} is not allowed; it must be an int >= 1")
    check_init_std(prefix_init_std)
    if not isinstance(gated, bool):
        raise ValueError(f"gated={gated!r} is not allowed; it must be True or False")
    planned = sorted(set(patch_kwargs) & _PLANNED_PATCH_ARGUMENTS)
    if planned:
        raise ValueError(f"apply_hlpt decides {', '.join(planned)} itself (LoRA on the FFN down projection of the "
                         "bottom layers); pass counts=/lora_ratio= and r=/alpha= instead, or use patch_model")
    if getattr(model, REGISTRY_ATTR, None) is not None:
        raise ValueError("apply_hlpt patches the model itself; call it on an unpatched model (it already has a "
                         "pyflex layer registry)")
    spec = family_spec(model)
    if spec is None:
        from pyflex.model.families import unknown_family_message
        raise ValueError(unknown_family_message(getattr(getattr(model, "config", None), "model_type", None)))
    layers, _ = resolve_layers(model)
    L = len(layers)
    if counts is not None:
        n_lora, n_prefix = (int(c) for c in counts)
        if n_lora < 0 or n_prefix < 0 or n_lora + n_prefix > L:
            raise ValueError(f"counts={counts!r} is not allowed for {L} layers; need n_lora, n_prefix >= 0 and "
                             f"n_lora + n_prefix <= {L}")
    else:
        n_lora, n_prefix = hlpt_layer_counts(L, variant, lora_ratio, prefix_ratio)
    if n_lora < 1:
        raise ValueError(f"HLPT needs at least one LoRA layer, got n_lora={n_lora} for {L} layers")
    lora_layers = list(range(n_lora))
    prefix_layers = list(range(L - n_prefix, L))
    if gate_pooling == "auto":
        causal = bool(getattr(_get(layers[0], spec.attention_module), "is_causal", True))
        gate_pooling = "causal" if causal else "sequence"

    patch_model(model, r=r, alpha=alpha, target_modules="ffn_down", layers=lora_layers, **patch_kwargs)
    try:
        _add_gates_and_prefixes(model, spec, layers, lora_layers, prefix_layers, prefix_len=prefix_len, r=r,
                                alpha=alpha, gated=gated, gate_input=gate_input, gate_pooling=gate_pooling,
                                prefix_init_std=prefix_init_std, variant=variant)
    except BaseException:
        # leave the model as it was: drop what was added, then the patch
        remove_hlpt(model)
        unpatch(model)
        raise
    return model


def _add_gates_and_prefixes(model, spec, layers, lora_layers, prefix_layers, *, prefix_len, r, alpha, gated,
                            gate_input, gate_pooling, prefix_init_std, variant) -> None:
    """The part of :func:`apply_hlpt` after ``patch_model``: gates, prefixes, the plan record."""
    attn_path, ffn_path = spec.attention_module, spec.ffn_module
    registry = get_registry(model)
    context = install_token_context(model) if gated else None

    if gated:
        for i in lora_layers:
            block = registry[i].block
            down = _get(block, spec.ffn_down)
            if not hasattr(down, "gate"):
                raise RuntimeError(f"layer {i} {spec.ffn_down} was not patched into a FlexLinear")
            w = down.weight
            base_dtype = down.compute_dtype   # not w.dtype: a 4-bit base stores uint8 codes
            if gate_input == "ffn_input":
                hidden, _, _ = _attention_dims(model, _get(block, attn_path))
                gate = PooledGate(hidden, context, pooling=gate_pooling, dtype=default_adapter_dtype(base_dtype),
                                  device=w.device)
                gate.observe_input_of(_get(block, ffn_path), f"{registry[i].name}.{ffn_path}".lstrip("."))
            else:
                gate = PooledGate(down.in_features, context, pooling=gate_pooling,
                                  dtype=default_adapter_dtype(base_dtype), device=w.device)
            down.gate = gate
            for p in gate.parameters():
                p.requires_grad_(True)

    base = None
    if prefix_layers:
        base = enable_prefix_attention(model)
        for i in prefix_layers:
            handle = registry[i]
            attention = _get(handle.block, attn_path)
            hidden, kv_heads, head_dim = _attention_dims(model, attention)
            ref = next(p for p in attention.parameters() if p.is_floating_point())
            prefix = GatedPrefix(hidden, kv_heads, head_dim, prefix_len, context=context, gated=gated,
                                 pooling=gate_pooling, init_std=prefix_init_std,
                                 dtype=default_adapter_dtype(ref.dtype), device=ref.device)
            attach_prefix(attention, prefix)
            handle.add_adapter(f"{handle.name}.{attn_path}.pyflex_prefix" if handle.name else
                               f"{attn_path}.pyflex_prefix", prefix)
            for p in prefix.parameters():
                p.requires_grad_(True)

    model.pyflex_plan = HLPTPlan(variant=variant, num_layers=len(layers), lora_layers=lora_layers,
                                 prefix_layers=prefix_layers, r=r, alpha=float(alpha), prefix_len=prefix_len,
                                 base_attention=base or "unchanged", gated=gated, gate_input=gate_input,
                                 gate_pooling=gate_pooling)


def remove_hlpt(model: nn.Module) -> None:
    """Remove what :func:`apply_hlpt` added beyond :func:`pyflex.patch_model` (gates' hooks, prefixes, the prefix
    attention implementation, ``model.pyflex_plan``); :func:`pyflex.unpatch` calls it, then removes the patch."""
    remove_gates_and_prefixes(model)
    model.__dict__.pop("pyflex_plan", None)


register_plan_remover(HLPTPlan, remove_hlpt)
