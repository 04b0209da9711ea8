"""The frozen-prefix skip: layers below the lowest trainable one run without autograd.

While grad is enabled, every layer below :meth:`LayerRegistry.lowest_trainable` runs under ``torch.no_grad()`` (a
forward pre-hook switches grad mode off, a forward hook that runs even on error switches it back). Its outputs are
plain tensors without history: no activations saved, no backward reaches it; the numbers are the same. Skipping is
off while the input embeddings train (their gradient flows through every layer) and when
``registry.skip_frozen_prefix`` is False. Under *reentrant* activation checkpointing the first trainable layer's
hidden-state input is made a leaf that requires grad, because a reentrant checkpoint only back-propagates when an
input requires grad.
"""
from __future__ import annotations

import threading
from typing import List, Optional

import torch

__all__ = ["FrozenPrefixSkip"]


class _PreHook:
    """Forward pre-hook of one block. A class (not a closure) so that deepcopy/pickle rebind it to the copied
    registry."""

    def __init__(self, skip: "FrozenPrefixSkip", index: int):
        self.skip = skip
        self.index = index

    def __call__(self, module, args, kwargs):
        return self.skip.before_block(self.index, module, args, kwargs)


class _PostHook:
    def __init__(self, skip: "FrozenPrefixSkip", index: int):
        self.skip = skip
        self.index = index

    def __call__(self, module, args, kwargs, output):
        self.skip.after_block(self.index)
        return None


class FrozenPrefixSkip:
    """The hooks and bookkeeping of the skip for one :class:`pyflex.model.registry.LayerRegistry`."""

    def __init__(self, registry):
        self.registry = registry
        self._lowest_cache: Optional[int] = None
        self._last_index = None
        self._tls = threading.local()  # grad-mode bookkeeping is per thread, like grad mode itself

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_tls", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._tls = threading.local()

    def _grad_stack(self, index: int) -> List[bool]:
        stacks = getattr(self._tls, "stacks", None)
        if stacks is None:
            stacks = self._tls.stacks = {}
        return stacks.setdefault(index, [])

    def _upstream_trains(self) -> bool:
        get = getattr(self.registry.model, "get_input_embeddings", None)
        try:
            emb = get() if callable(get) else None
        except (NotImplementedError, AttributeError):
            emb = None
        return emb is not None and any(p.requires_grad for p in emb.parameters())

    def _skip_limit(self, index: int) -> int:
        """Layers with index below the returned value run without autograd. Recomputed once per forward pass
        (when the layer index does not increase), so a forward costs one scan of the parameters."""
        if self._lowest_cache is None or self._last_index is None or index <= self._last_index:
            if self._upstream_trains():
                self._lowest_cache = -1
            else:
                lowest = self.registry.lowest_trainable()
                self._lowest_cache = self.registry.num_layers if lowest is None else lowest
        self._last_index = index
        return self._lowest_cache

    def before_block(self, index, module, args, kwargs):
        if not torch.is_grad_enabled() or not self.registry.skip_frozen_prefix:
            self._last_index = None
            return None
        limit = self._skip_limit(index)
        if index < limit:
            self._grad_stack(index).append(True)
            torch.set_grad_enabled(False)
            return None
        if index == limit and getattr(module, "gradient_checkpointing", False) and module.training:
            func = getattr(module, "_gradient_checkpointing_func", None)
            reentrant = getattr(func, "keywords", {}).get("use_reentrant", True) if func is not None else True
            if reentrant and args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point() \
                    and not args[0].requires_grad:
                # A reentrant checkpoint back-propagates only when an input requires grad.
                return (args[0].detach().requires_grad_(True),) + tuple(args[1:]), kwargs
        return None

    def after_block(self, index):
        stack = self._grad_stack(index)
        if stack:
            torch.set_grad_enabled(stack.pop())

    def attach(self) -> None:
        for handle in self.registry.layers:
            handle.block.register_forward_pre_hook(_PreHook(self, handle.index), with_kwargs=True)
            handle.block.register_forward_hook(_PostHook(self, handle.index), with_kwargs=True, always_call=True)

    def detach(self) -> None:
        for handle in self.registry.layers:
            for hooks in (handle.block._forward_pre_hooks, handle.block._forward_hooks):
                for key in [k for k, h in hooks.items() if isinstance(h, (_PreHook, _PostHook))]:
                    del hooks[key]
                    for extra in ("_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                                  "_forward_pre_hooks_with_kwargs"):
                        getattr(handle.block, extra, {}).pop(key, None)
