"""NF4 (QLoRA 4-bit NormalFloat) base weights for the op: a plain container and its reference dequantization.

Only torch is imported here (the op layer and the kernels use it). Reading bitsandbytes ``Linear4bit`` modules and
torchao ``NF4Tensor`` weights into this container is pyflex/layers/quantized.py's job.

Format (what bitsandbytes stores, ``quant_type="nf4"``; docs/op.md, "Quantized base"):

- ``packed``: uint8, ``ceil(N*K/2)`` bytes, two 4-bit codes per byte, high nibble first, row-major over (N, K)
  (element ``i`` of the flattened weight is ``packed[i // 2] >> 4`` when ``i`` is even, ``& 0xF`` when odd).
- ``code``: the 16-entry fp32 code book (:data:`NF4_CODE` for bitsandbytes; torchao's table is a rounded one).
- scales, one per ``blocksize`` consecutive elements of the flattened weight (blocks may cross rows):
  ``absmax`` fp32 ``(n_blocks,)``; or, with double quantization, ``absmax`` uint8 indices into ``absmax_code``
  (256 fp32 entries) times one fp32 ``absmax_scale`` per ``absmax_blocksize`` (256) blocks, plus the fp32 scalar
  ``absmax_offset``.

Dequantization (bit-identical to bitsandbytes' ``dequantize_4bit``, its C kernel and its PyTorch path)::

    scale[b] = fp32(absmax_code[absmax[b]] * absmax_scale[b // absmax_blocksize]) + absmax_offset   (double quant)
    scale[b] = absmax[b]                                                                               (otherwise)
    W.flat[i] = dtype(fp32(code[nibble(i)] * scale[i // blocksize]))                 (round to nearest even)

Every backend that declares the ``"nf4"`` weight format (pyflex/lora/backends.py) computes exactly this, into the
op's input dtype.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Tuple

import torch

__all__ = ["NF4_CODE", "NF4Weight", "NF4_DTYPES"]

# bitsandbytes.functional.get_4bit_type("nf4"): the NF4 quantiles of N(0, 1) scaled to [-1, 1]; these literals round
# to the same fp32 values.
_NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
NF4_CODE = torch.tensor(_NF4_VALUES, dtype=torch.float32)

# The dense dtypes an NF4 weight may stand for (its ``dtype``), in the order the op's flat form numbers them.
NF4_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_BUFFER_NAMES = ("packed", "code", "absmax", "absmax_code", "absmax_scale", "absmax_offset")


@dataclass(eq=False)
class NF4Weight:
    """An NF4 weight of logical shape (N, K) = (out_features, in_features) standing for a dense weight of dtype
    ``dtype`` (the module doc gives the format and the dequantization).

    Plain tensors only (no tensor subclass), so a module can own them as buffers. Construction validates every
    field; a bad one is a ValueError naming the field (and ``source``, the module it came from).
    """

    packed: torch.Tensor                         # uint8 (ceil(N*K/2),)
    code: torch.Tensor                           # fp32 (16,)
    absmax: torch.Tensor                         # fp32 (n_blocks,), or uint8 (n_blocks,) when double-quantized
    shape: Tuple[int, int]
    dtype: torch.dtype                           # the dense weight's dtype (bitsandbytes' quant_state.dtype)
    blocksize: int = 64
    absmax_code: Optional[torch.Tensor] = None   # fp32 (256,)                                (double quant only)
    absmax_scale: Optional[torch.Tensor] = None  # fp32 (ceil(n_blocks / absmax_blocksize),)
    absmax_offset: Optional[torch.Tensor] = None  # fp32 ()
    absmax_blocksize: int = 256
    source: str = field(default="", compare=False)  # where it came from, for messages

    def __post_init__(self):
        self.shape = tuple(int(s) for s in self.shape)
        self.validate()

    # ---------------------------------------------------------------- properties
    @property
    def double_quant(self) -> bool:
        return self.absmax_code is not None

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def n_blocks(self) -> int:
        return math.ceil(self.numel / self.blocksize)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def nbytes(self) -> int:
        """Bytes of the quantized representation (packed codes, code books, scales)."""
        return sum(t.numel() * t.element_size() for t in self.buffers().values())

    @property
    def dense_nbytes(self) -> int:
        """Bytes of the dense weight in ``dtype`` (what :meth:`dequantize` allocates)."""
        return self.numel * torch.empty((), dtype=self.dtype).element_size()

    # ---------------------------------------------------------------- checks
    def validate(self) -> None:
        n, k = self.shape
        where = f" ({self.source})" if self.source else ""
        if n < 0 or k < 0:
            raise ValueError(f"NF4Weight{where}: shape {self.shape} must be (N, K) with N, K >= 0")
        if self.dtype not in NF4_DTYPES:
            raise ValueError(f"NF4Weight{where}: dtype {self.dtype} is not one of fp32, bf16, fp16")
        if self.blocksize <= 0 or self.blocksize % 2 or self.absmax_blocksize <= 0:
            raise ValueError(f"NF4Weight{where}: blocksize={self.blocksize} must be positive and even and "
                             f"absmax_blocksize={self.absmax_blocksize} positive")
        if self.packed.dtype != torch.uint8 or self.packed.dim() != 1 or self.packed.numel() != (n * k + 1) // 2:
            raise ValueError(f"NF4Weight{where}: packed must be uint8 of shape ({(n * k + 1) // 2},) for shape "
                             f"{self.shape}, got {self.packed.dtype} {tuple(self.packed.shape)}")
        if self.code.dtype != torch.float32 or self.code.shape != (16,):
            raise ValueError(f"NF4Weight{where}: code must be fp32 (16,), got {self.code.dtype} {tuple(self.code.shape)}")
        want = torch.uint8 if self.double_quant else torch.float32
        if self.absmax.dtype != want or self.absmax.shape != (self.n_blocks,):
            raise ValueError(f"NF4Weight{where}: absmax must be {want} ({self.n_blocks},), got "
                             f"{self.absmax.dtype} {tuple(self.absmax.shape)}")
        if self.double_quant:
            n2 = math.ceil(self.n_blocks / self.absmax_blocksize)
            if self.absmax_code.dtype != torch.float32 or self.absmax_code.shape != (256,):
                raise ValueError(f"NF4Weight{where}: absmax_code must be fp32 (256,)")
            if self.absmax_scale is None or self.absmax_scale.dtype != torch.float32 or self.absmax_scale.shape != (n2,):
                raise ValueError(f"NF4Weight{where}: absmax_scale must be fp32 ({n2},)")
            if self.absmax_offset is None or self.absmax_offset.dtype != torch.float32 or \
                    self.absmax_offset.shape != ():
                raise ValueError(f"NF4Weight{where}: absmax_offset must be a 0-dim fp32 tensor")
        elif self.absmax_scale is not None or self.absmax_offset is not None:
            raise ValueError(f"NF4Weight{where}: absmax_scale/absmax_offset given without absmax_code")
        devices = {t.device for t in self.buffers().values()}
        if len(devices) != 1:
            raise ValueError(f"NF4Weight{where}: its tensors are on several devices ({sorted(map(str, devices))})")

    # ---------------------------------------------------------------- math (the reference)
    def scales(self) -> torch.Tensor:
        """fp32 (n_blocks,): the per-block scale, double quantization decoded as bitsandbytes does."""
        if not self.double_quant:
            return self.absmax
        factor = self.absmax_scale.repeat_interleave(self.absmax_blocksize)[: self.n_blocks]
        scale = torch.index_select(self.absmax_code, 0, self.absmax.int()) * factor   # fp32 product, rounded
        return scale + self.absmax_offset                                          # then the fp32 add

    def codes(self) -> torch.Tensor:
        """uint8 (N, K): the 4-bit code of each element."""
        p = self.packed
        return torch.stack((p >> 4, p & 0xF), dim=1).reshape(-1)[: self.numel].reshape(self.shape)

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The dense (N, K) weight in ``dtype`` (default ``self.dtype``), plain PyTorch, one rounding from fp32."""
        dtype = self.dtype if dtype is None else dtype
        # lut[b] = (code[b >> 4], code[b & 15]): one gather per byte gives both elements, in order
        lut = torch.stack((self.code.repeat_interleave(16), self.code.repeat(16)), dim=1)
        n, bs = self.numel, self.blocksize
        values = torch.index_select(lut, 0, self.packed.int()).view(-1)[:n]      # fp32 (N*K,), a fresh tensor
        scale = self.scales()
        full = (n // bs) * bs
        values[:full].view(-1, bs).mul_(scale[: n // bs].view(-1, 1))             # one fp32 product per element
        if full < n:
            values[full:].mul_(scale[-1])
        return values.view(self.shape).to(dtype)

    # ---------------------------------------------------------------- storage
    def buffers(self) -> Dict[str, torch.Tensor]:
        """The tensors, by name (``packed``, ``code``, ``absmax`` and, for double quantization, ``absmax_code``,
        ``absmax_scale``, ``absmax_offset``); :meth:`meta` holds the rest."""
        return {k: getattr(self, k) for k in _BUFFER_NAMES if getattr(self, k) is not None}

    def meta(self) -> Dict[str, object]:
        return {"shape": self.shape, "dtype": self.dtype, "blocksize": self.blocksize,
                "absmax_blocksize": self.absmax_blocksize}

    @classmethod
    def from_buffers(cls, buffers: Dict[str, torch.Tensor], *, shape, dtype, blocksize=64, absmax_blocksize=256,
                     source: str = "") -> "NF4Weight":
        return cls(shape=tuple(shape), dtype=dtype, blocksize=blocksize, absmax_blocksize=absmax_blocksize,
                   source=source, **{k: buffers.get(k) for k in _BUFFER_NAMES})

    def to(self, device) -> "NF4Weight":
        """The same weight with its tensors on ``device``."""
        return replace(self, **{k: v.to(device) for k, v in self.buffers().items()})

    def kernel_args(self) -> Dict[str, object]:
        """Keyword arguments for ``pyflex.kernels.nf4.nf4_dequantize`` and the C++ ``nf4_dequantize`` (add
        ``dtype=``)."""
        return dict(packed=self.packed, code=self.code, absmax=self.absmax, shape=self.shape,
                    blocksize=self.blocksize, absmax_code=self.absmax_code, absmax_scale=self.absmax_scale,
                    absmax_offset=self.absmax_offset, absmax_blocksize=self.absmax_blocksize)

    # ---------------------------------------------------------------- the op's flat form (tensors + ints)
    def flatten(self) -> Tuple[torch.Tensor, List[Optional[torch.Tensor]], List[int]]:
        """``(packed, state, meta)``: what the op passes through autograd and its custom ops, which take tensors and
        ints only. state = [code, absmax, absmax_code, absmax_scale, absmax_offset] (the last three None without
        double quantization); meta = [N, K, blocksize, absmax_blocksize, index of dtype in NF4_DTYPES]."""
        state = [self.code, self.absmax, self.absmax_code, self.absmax_scale, self.absmax_offset]
        return self.packed, state, [self.shape[0], self.shape[1], self.blocksize, self.absmax_blocksize,
                                    NF4_DTYPES.index(self.dtype)]

    @classmethod
    def unflatten(cls, packed: torch.Tensor, state: List[Optional[torch.Tensor]], meta: List[int]) -> "NF4Weight":
        """The inverse of :meth:`flatten`, without validation (the op rebuilds a weight it validated)."""
        self = cls.__new__(cls)
        self.packed, self.code, self.absmax, self.absmax_code, self.absmax_scale, self.absmax_offset = packed, *state
        self.shape, self.blocksize, self.absmax_blocksize = (int(meta[0]), int(meta[1])), int(meta[2]), int(meta[3])
        self.dtype, self.source = NF4_DTYPES[int(meta[4])], ""
        return self

    def __repr__(self) -> str:
        dq = f", double_quant(blocksize={self.absmax_blocksize})" if self.double_quant else ""
        src = f", source={self.source!r}" if self.source else ""
        return (f"NF4Weight(shape={self.shape}, dtype={self.dtype}, blocksize={self.blocksize}{dq}, "
                f"nbytes={self.nbytes}, device={self.device}{src})")
