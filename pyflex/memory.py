"""`LiveTensorBytes`: peak bytes of tensor storage allocated inside a block, on any device (CPU included).

``torch.cuda.max_memory_allocated`` exists only for CUDA. To compare the activation memory of training methods on a
CPU-only machine (tests, CI, the CPU run of bench/profile_model.py), this dispatch mode sees every ATen op that runs
inside the block (also from C++ extensions and autograd's backward), records each new output storage once, and
drops it when the storage is freed. ``current`` / ``peak`` are the bytes of storages created inside the block that
are alive now / were alive at the worst moment. Storages that existed before the block (weights, optimizer state,
inputs) are not counted: the figure is what the block itself adds, which is what differs between methods.

It slows every op down a little (one Python call per op): for measurement runs, not for timed runs.
"""
from __future__ import annotations

import weakref
from typing import Dict

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["LiveTensorBytes"]


class LiveTensorBytes(TorchDispatchMode):
    """``with LiveTensorBytes() as mem: ...`` then ``mem.peak`` / ``mem.current`` (bytes).

    ``mem.mark()`` returns ``current`` at that point (e.g. after the forward, the activations kept for backward).
    """

    def __init__(self):
        super().__init__()
        self._live: Dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def mark(self) -> int:
        return self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key, nbytes = storage.data_ptr(), storage.nbytes()
                if nbytes and key not in self._live:
                    self._live[key] = nbytes
                    self.current += nbytes
                    self.peak = max(self.peak, self.current)
                    # torch keeps one Python object per storage alive as long as the storage: the callback fires
                    # when the memory is released
                    weakref.finalize(storage, self._release, key)
        return out
