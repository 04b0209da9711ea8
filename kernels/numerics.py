"""Dtype handling shared by the Triton kernels, aware of the Triton interpreter (TRITON_INTERPRET=1, CPU tests).

The interpreter converts fp32 → bf16 by truncation where compiled Triton rounds to nearest even, so kernels that
store bf16 results take a RTNE_BF16 constexpr (set only under the interpreter) and convert through :func:`_to_out`.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _rtne(dtype: torch.dtype) -> bool:
    """The RTNE_BF16 constexpr for a kernel whose outputs have ``dtype``."""
    return INTERPRET and dtype == torch.bfloat16


@triton.jit
def _to_out(v, dtype: tl.constexpr, RTNE_BF16: tl.constexpr):
    """fp32 → output dtype, rounding to nearest even (done on the bits when RTNE_BF16, i.e. under the interpreter)."""
    if RTNE_BF16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(dtype)
