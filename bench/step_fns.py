"""The step a GPU microbenchmark times, shared by bench_gpu_flex_lora.py and bench_gpu_gated_act.py."""
from __future__ import annotations

from typing import Callable, List, Tuple

import torch


def step_fn(fwd: Callable[[], torch.Tensor], grad_out: torch.Tensor, train: bool,
            leaves: List[torch.Tensor]) -> Tuple[Callable[[], object], List[torch.Tensor]]:
    """(fn, leaves whose .grad the timer resets): the forward alone under no_grad, or forward + backward(grad_out)."""
    if not train:
        def run():
            with torch.no_grad():
                return fwd()
        return run, []

    def run():
        fwd().backward(grad_out)
    return run, leaves
