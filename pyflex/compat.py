"""The transformers (and torch) calling conventions that move between releases, each behind one function.

pyflex follows the newest transformers that pip resolves (see README, "Supported versions"). Code elsewhere in
the package never reads these conventions directly; when a release renames or moves something, only this file
changes.

* :func:`cache_from_call` — the KV cache handed to a decoder stack's ``forward``: ``cache=`` since transformers
  5.24 (``past_key_values=`` is deprecated there), ``past_key_values=`` before.
* :func:`cache_length` — how many tokens a cache already holds, for the cache classes and the legacy
  tuple-of-tuples format.
* :func:`watch_cache_batch_edits` — be told when ``generate`` reorders, selects or repeats the batch rows of a cache
  (beam search, contrastive search), so that per-sample state kept beside the cache follows its rows.
* :func:`eager_attention_function` — the eager attention a transformers attention module runs when the model's
  ``attn_implementation`` is ``"eager"`` (its modeling file's ``eager_attention_forward``; GPT-2's
  ``reorder_and_upcast_attn`` path), in the attention-interface calling convention.
* :func:`mark_constant_for_compile` — torch's ``assume_constant_result`` without importing its compiler.
* :func:`peft_default_lora_targets` — peft's default LoRA target modules per model type (``target_modules=None``).
"""
from __future__ import annotations

import sys
from types import MethodType
from typing import Any, Callable, Mapping, Optional, Sequence

# Keyword names under which transformers passes the KV cache to a model's forward, newest first.
_CACHE_KWARGS = ("cache", "past_key_values")


def cache_from_call(args: Sequence[Any], kwargs: Mapping[str, Any]) -> Optional[Any]:
    """The KV cache of a decoder-stack forward call (``LlamaModel.forward(input_ids, attention_mask,
    position_ids, cache, ...)``) seen by a forward pre-hook, or None when the call carries none."""
    for name in _CACHE_KWARGS:
        cache = kwargs.get(name)
        if cache is not None:
            return cache
    # Positional calls: the cache is the fourth argument of every decoder stack pyflex patches.
    if len(args) > 3 and args[3] is not None and not hasattr(args[3], "dtype"):
        return args[3]
    return None


def cache_length(cache: Optional[Any]) -> int:
    """Number of tokens already in ``cache`` (0 for None or an empty cache)."""
    if cache is None:
        return 0
    get_seq_length = getattr(cache, "get_seq_length", None)
    if callable(get_seq_length):
        return int(get_seq_length())
    if isinstance(cache, (tuple, list)):  # legacy ((k, v), ...) with k (B, H, S, d)
        return int(cache[0][0].shape[-2]) if len(cache) and len(cache[0]) else 0
    raise TypeError(f"cannot tell the length of a KV cache of type {type(cache).__name__}; "
                    "expected a transformers Cache or a tuple of (key, value) pairs")


# Cache methods through which generate edits the batch rows of a cache between forwards, and the row operation each
# one applies (to a tensor whose first dimension is the batch).
_BATCH_EDITS = {
    "reorder_cache": lambda index: (lambda t: t.index_select(0, index.to(t.device))),        # beam search
    "batch_select_indices": lambda index: (lambda t: t[index.to(t.device)]),                # contrastive search
    "batch_repeat_interleave": lambda repeats: (lambda t: t.repeat_interleave(repeats, dim=0)),
}
_LISTENERS_ATTR = "_pyflex_batch_edit_listeners"


def _make_edit_wrapper(name: str, make_op: Callable) -> Callable:
    def edited(cache, arg, *args, **kwargs):
        out = getattr(type(cache), name)(cache, arg, *args, **kwargs)
        op = make_op(arg)
        for listener in list(getattr(cache, _LISTENERS_ATTR, ())):
            listener(op)
        return out
    edited.__name__ = name
    return edited


def watch_cache_batch_edits(cache: Any, listener: Callable[[Callable], None]) -> None:
    """Call ``listener(row_op)`` after ``cache`` reorders, selects or repeats its batch rows, where ``row_op(t)``
    applies the same edit to a tensor ``t`` whose first dimension is the batch. Idempotent per (cache, listener);
    objects without these methods (legacy tuples) are left alone."""
    if cache is None or isinstance(cache, (tuple, list)):
        return
    listeners = getattr(cache, _LISTENERS_ATTR, None)
    if listeners is None:
        listeners = []
        try:
            object.__setattr__(cache, _LISTENERS_ATTR, listeners)
        except (AttributeError, TypeError):  # a cache type that takes no attributes: nothing to watch
            return
        for name, make_op in _BATCH_EDITS.items():
            if callable(getattr(type(cache), name, None)):
                # bound with MethodType, so a deep copy of the cache rebinds the wrapper to the copy
                object.__setattr__(cache, name, MethodType(_make_edit_wrapper(name, make_op), cache))
    if listener not in listeners:
        listeners.append(listener)


def eager_attention_function(module: Any) -> Callable:
    """What ``module`` (a transformers attention module) runs under ``attn_implementation="eager"``, called as
    ``fn(module, query, key, value, attention_mask, scaling=..., dropout=..., **kwargs)``.

    That is the ``eager_attention_forward`` of the module's modeling file, except for GPT-2-style attention with
    ``config.reorder_and_upcast_attn``, whose eager path is ``module._upcast_and_reordered_attn`` (it reads the
    module's own scaling and dropout).
    """
    if getattr(module, "reorder_and_upcast_attn", False) and callable(getattr(module, "_upcast_and_reordered_attn",
                                                                              None)):
        def reordered(mod, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
            return mod._upcast_and_reordered_attn(query, key, value, attention_mask)
        return reordered
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        raise RuntimeError(f"{type(module).__name__}'s modeling module ({type(module).__module__}) has no "
                           "eager_attention_forward; pyflex cannot run its eager attention")
    return fn


def mark_constant_for_compile(fn: Callable) -> Callable:
    """``torch.compiler.assume_constant_result(fn)`` without importing torch._dynamo (about a second) when nothing
    has imported it yet: that decorator only sets the attribute below, which dynamo reads when it traces a call of
    ``fn`` (tests/test_compat.py checks that the public decorator still sets exactly this)."""
    if "torch._dynamo" in sys.modules:
        import torch.compiler
        return torch.compiler.assume_constant_result(fn)
    fn._dynamo_marked_constant = True
    return fn


def peft_default_lora_targets(model_type: Optional[str]) -> Optional[list]:
    """The module names PEFT's LoRA targets for ``model_type`` when a LoraConfig has ``target_modules=None`` (peft's
    table of defaults per architecture), or None when peft has no entry. Imports peft: only called for a LoraConfig,
    which the user built with peft."""
    from peft import utils as peft_utils
    table = getattr(peft_utils, "TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING", None)
    if table is None:
        raise RuntimeError("this peft has no TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING; pyflex cannot tell "
                           "its default LoRA targets: name them in target_modules")
    targets = table.get(model_type)
    return None if targets is None else list(targets)
