"""Triton NF4 dequantization: packed 4-bit codes + per-block scales → a dense (N, K) weight in fp32/bf16/fp16.

The format is bitsandbytes' (pyflex/lora/nf4.py documents it; docs/op.md, "Quantized base"): ``packed``
uint8 ``ceil(N*K/2)`` bytes, two codes per byte, high nibble first, row-major over (N, K); ``code`` 16 fp32 values;
one scale per ``blocksize`` consecutive elements of the flattened weight, either fp32 ``absmax`` or, with double
quantization, ``absmax_code[absmax] * absmax_scale[block // absmax_blocksize] + absmax_offset`` (uint8 indices into
a 256-entry fp32 code book, one fp32 factor per ``absmax_blocksize`` blocks, an fp32 offset).

The ``triton`` backend (pyflex/lora/backends.py) runs this pass into a temporary and then its dense kernels (y0 and dx
on cuBLAS). Numerics equal the reference (``NF4Weight.dequantize``) and ``bitsandbytes.functional.dequantize_4bit``
bit for bit: every product is one fp32 multiply, the nested scale's add is a separate fp32 add (the launch sets
``enable_fp_fusion=False`` so that ptxas does not contract the multiply and the add into an FMA; the sm_90 PTX has no
fma), and the final conversion rounds to nearest even (done on the bits under the interpreter, which truncates
fp32 → bf16: pyflex.kernels.numerics).

One program handles ``BLOCK`` bytes (2·BLOCK outputs); ``blocksize`` must be even so that both nibbles of a byte share
one scale (bitsandbytes' block sizes are 32 … 4096, torchao's 64).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from pyflex.kernels.numerics import _rtne, _to_out

__all__ = ["nf4_dequantize"]

_BLOCK = 1024
_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _nf4_dequant_kernel(packed_ptr, code_ptr, absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr,
                        out_ptr, n_bytes, n_out,
                        BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, ABSMAX_BLOCKSIZE: tl.constexpr,
                        OUT_DTYPE: tl.constexpr, RTNE_BF16: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    byte = pid * BLOCK + tl.arange(0, BLOCK)                     # int64 (N*K may pass 2**31)
    bmask = byte < n_bytes
    p = tl.load(packed_ptr + byte, mask=bmask, other=0).to(tl.int32)
    hi = tl.load(code_ptr + (p >> 4), mask=bmask, other=0.0)       # element 2·byte
    lo = tl.load(code_ptr + (p & 0xF), mask=bmask, other=0.0)      # element 2·byte + 1
    blk = (byte * 2) // BLOCKSIZE                                 # both nibbles: BLOCKSIZE is even
    if NESTED:
        q = tl.load(absmax_ptr + blk, mask=bmask, other=0).to(tl.int32)
        c2 = tl.load(absmax_code_ptr + q, mask=bmask, other=0.0)
        s2 = tl.load(absmax_scale_ptr + blk // ABSMAX_BLOCKSIZE, mask=bmask, other=0.0)
        off = tl.load(absmax_offset_ptr)
        scale = c2 * s2                                           # one fp32 multiply, rounded,
        scale = scale + off                                       # then one fp32 add (no FMA: fp fusion is off)
    else:
        scale = tl.load(absmax_ptr + blk, mask=bmask, other=0.0)
    w_hi = _to_out(hi * scale, OUT_DTYPE, RTNE_BF16)
    w_lo = _to_out(lo * scale, OUT_DTYPE, RTNE_BF16)
    w = tl.interleave(w_hi, w_lo)                                 # (2·BLOCK,): element order
    elem = pid * (2 * BLOCK) + tl.arange(0, 2 * BLOCK)
    tl.store(out_ptr + elem, w, mask=elem < n_out)


def nf4_dequantize(packed: torch.Tensor, code: torch.Tensor, absmax: torch.Tensor, shape: Sequence[int],
                   dtype: torch.dtype, blocksize: int = 64, absmax_code: Optional[torch.Tensor] = None,
                   absmax_scale: Optional[torch.Tensor] = None, absmax_offset: Optional[torch.Tensor] = None,
                   absmax_blocksize: int = 256, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The dense weight of ``shape`` (N, K) in ``dtype`` (``out`` if given: contiguous, that shape and dtype).

    ``packed`` uint8 (ceil(N·K/2),), ``code`` fp32 (16,), ``absmax`` fp32 (n_blocks,) or, with ``absmax_code``
    (fp32 (256,)), uint8 (n_blocks,) with ``absmax_scale`` fp32 and ``absmax_offset`` fp32 (); all on one device
    (CUDA, or CPU under TRITON_INTERPRET=1). ``NF4Weight.kernel_args()`` gives all but ``dtype``.
    """
    n, k = (int(s) for s in shape)
    numel = n * k
    if dtype not in _TL_DTYPES:
        raise ValueError(f"nf4_dequantize: dtype must be fp32, bf16 or fp16, got {dtype}")
    if blocksize <= 0 or blocksize % 2:
        raise ValueError(f"nf4_dequantize: blocksize must be positive and even, got {blocksize}")
    n_bytes = (numel + 1) // 2
    n_blocks = -(-numel // blocksize)
    if packed.dtype != torch.uint8 or packed.numel() < n_bytes:
        raise ValueError(f"nf4_dequantize: packed must be uint8 with {n_bytes} bytes, got {packed.dtype} "
                         f"{packed.numel()}")
    nested = absmax_code is not None
    if code.dtype != torch.float32 or code.numel() != 16:
        raise ValueError("nf4_dequantize: code must be fp32 (16,)")
    if absmax.numel() < n_blocks or absmax.dtype != (torch.uint8 if nested else torch.float32):
        raise ValueError(f"nf4_dequantize: absmax must be {'uint8' if nested else 'fp32'} with {n_blocks} blocks")
    if nested and (absmax_scale is None or absmax_offset is None or absmax_code.dtype != torch.float32
                   or absmax_scale.dtype != torch.float32 or absmax_offset.dtype != torch.float32):
        raise ValueError("nf4_dequantize: double quantization needs fp32 absmax_code, absmax_scale, absmax_offset")
    if out is None:
        out = torch.empty((n, k), dtype=dtype, device=packed.device)
    elif out.shape != (n, k) or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"nf4_dequantize: out must be contiguous {dtype} of shape {(n, k)}")
    if numel == 0:
        return out
    packed = packed.reshape(-1).contiguous()
    absmax = absmax.reshape(-1).contiguous()
    if nested:
        absmax_code = absmax_code.contiguous()
        absmax_scale = absmax_scale.reshape(-1).contiguous()
        absmax_offset = absmax_offset.reshape(1).contiguous()
    else:                                     # unused pointers (never loaded)
        absmax_code = absmax_scale = absmax_offset = absmax
    rtne = _rtne(dtype)
    grid = (triton.cdiv(n_bytes, _BLOCK),)
    _nf4_dequant_kernel[grid](packed, code.contiguous(), absmax, absmax_code, absmax_scale, absmax_offset, out,
                              n_bytes, numel, BLOCKSIZE=blocksize, NESTED=nested, ABSMAX_BLOCKSIZE=absmax_blocksize,
                              OUT_DTYPE=_TL_DTYPES[dtype], RTNE_BF16=rtne, BLOCK=_BLOCK, enable_fp_fusion=False)
    return out
