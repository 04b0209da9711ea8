"""The transformers calling conventions that move between releases, each behind one function.

pyflex follows the newest transformers that pip resolves (see README, "Supported versions"). Code elsewhere in
the package never reads these conventions directly; when a release renames or moves something, only this file
changes.

* :func:`cache_from_call` — the KV cache handed to a decoder stack's ``forward``: ``cache=`` since transformers
  5.24 (``past_key_values=`` is deprecated there), ``past_key_values=`` before.
* :func:`cache_length` — how many tokens a cache already holds, for the cache classes and the legacy
  tuple-of-tuples format.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

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
