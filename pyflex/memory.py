"""Memory measurement for the demo and bench/profile_model.py, on any device (CPU included).

`LiveTensorBytes`: peak bytes of tensor storage allocated inside a block.

``torch.cuda.max_memory_allocated`` exists only for CUDA. To compare the activation memory of training methods on a
CPU-only machine (tests, CI, the CPU run of bench/profile_model.py), this dispatch mode sees every ATen op that runs
inside the block (also from C++ extensions and autograd's backward), records each new output storage once, and
drops it when the storage is freed. ``current`` / ``peak`` are the bytes of storages created inside the block that
are alive now / were alive at the worst moment. Storages that existed before the block (weights, optimizer state,
inputs) are not counted: the figure is what the block itself adds, which is what differs between methods.

It slows every op down a little (one Python call per op): for measurement runs, not for timed runs.

`step_peak_bytes(model, optimizer, step)`: what ``torch.cuda.max_memory_allocated`` reports for a training step,
counted exactly on any device: the storages alive before it (weights, buffers, grads, optimizer state) plus the
peak that ``step()`` allocates. `CudaPeakMemory`: ``max_memory_allocated`` over a ``with`` block on CUDA.
"""
from __future__ import annotations

import weakref
from typing import Callable, Dict, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["LiveTensorBytes", "persistent_bytes", "step_peak_bytes", "CudaPeakMemory"]


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


def persistent_bytes(model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> int:
    """Bytes of the distinct storages of the weights, buffers, grads and optimizer state (what lives between steps)."""
    tensors = list(model.parameters()) + list(model.buffers())
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    if optimizer is not None:
        tensors += [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def step_peak_bytes(model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer],
                    step: Callable[[], object]) -> int:
    """Peak tensor bytes of one training step: :func:`persistent_bytes` before it + the peak ``step()`` allocates."""
    persistent = persistent_bytes(model, optimizer)
    with LiveTensorBytes() as live:
        step()
    return persistent + live.peak


class CudaPeakMemory:
    """``torch.cuda.max_memory_allocated`` over a ``with`` block (peak of live tensors; the stats reset on entry)."""

    kind = "cuda max_memory_allocated"

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ValueError(f"CudaPeakMemory needs a CUDA device, got {self.device}; use step_peak_bytes elsewhere")
        self.peak_bytes = 0

    def __enter__(self):
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc):
        torch.cuda.synchronize(self.device)
        self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        return False
