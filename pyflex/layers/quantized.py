"""4-bit (QLoRA) bases: reading bitsandbytes ``Linear4bit`` and torchao ``NF4Tensor`` weights into the op's
:class:`~pyflex.lora.nf4.NF4Weight`, and :class:`QuantizedFlexLinear`, the FlexLinear that runs the fused op on one.

bitsandbytes and torchao are optional and never imported here: their objects are recognised by class name and
module (a ``Linear4bit`` exists only once bitsandbytes is loaded) and read through their attributes. A
QuantizedFlexLinear never calls bitsandbytes: the op dequantizes the 4-bit weight itself (docs/op.md, "Quantized
base"), into a temporary per call, in forward and again in backward.

What is refused, each with an :class:`UnsupportedQuantizedWeight` naming the module: bitsandbytes FP4 weights, a
weight bitsandbytes repacked into its CPU-only layout (it does so in place on an eval-mode forward whose input needs
no grad, on CPUs with AVX512-BF16), a ``Linear4bit`` not quantized yet, a code book other than NF4's, and any other
quantized tensor subclass.
"""
from __future__ import annotations

import sys
from typing import Optional, Tuple

import torch
from torch import nn

from pyflex.layers.linear import FlexLinear, is_linear_like
from pyflex.lora.autograd import flex_lora
from pyflex.lora.nf4 import NF4_CODE, NF4_DTYPES, NF4Weight

__all__ = ["UnsupportedQuantizedWeight", "QuantizedFlexLinear", "flex_linear_for", "nf4_weight_of",
           "from_bnb_linear4bit", "from_torchao_nf4", "is_bnb_linear4bit", "is_quantized_linear"]


class UnsupportedQuantizedWeight(TypeError, ValueError):
    """A quantized weight pyflex cannot read (FP4, bitsandbytes' CPU repacked layout, an unknown tensor subclass).

    A TypeError (what patch_model raises for modules it cannot patch) and a ValueError (a bad value)."""


_SUPPORTED = ("pyflex supports bitsandbytes NF4 Linear4bit layers (bnb_4bit_quant_type='nf4', with or without "
              "bnb_4bit_use_double_quant, any bnb_4bit_quant_storage) and torchao NF4Tensor weights")


# -------------------------------------------------------------------- readers
def _is_class(obj, name: str, module_prefix: str) -> bool:
    return any(c.__name__ == name and c.__module__.startswith(module_prefix) for c in type(obj).__mro__)


def is_bnb_linear4bit(module) -> bool:
    """True for bitsandbytes' ``Linear4bit`` (and its ``LinearNF4`` / ``LinearFP4`` subclasses)."""
    return "bitsandbytes" in sys.modules and _is_class(module, "Linear4bit", "bitsandbytes")


def _is_torchao_nf4(t) -> bool:
    return _is_class(t, "NF4Tensor", "torchao")


def _is_plain(t) -> bool:
    return type(t) in (torch.Tensor, nn.Parameter)


def _plain(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return t if type(t) is torch.Tensor else t.as_subclass(torch.Tensor)


def _unsupported(name: str, problem: str, supported: str = _SUPPORTED) -> UnsupportedQuantizedWeight:
    return UnsupportedQuantizedWeight(f"module {name!r}: {problem}. {supported}")


def _type_name(t) -> str:
    return f"{type(t).__module__}.{type(t).__qualname__}"


def from_bnb_linear4bit(module, name: str = "<module>") -> NF4Weight:
    """The :class:`NF4Weight` of a bitsandbytes ``Linear4bit`` (``name`` is its path in the model, for messages).

    Shares memory with the module's packed weight and quant state (no copy). Raises
    :class:`UnsupportedQuantizedWeight` for FP4, for a weight repacked into bitsandbytes' CPU-only layout, for a
    weight not quantized yet and for anything that is not a ``Linear4bit``.
    """
    if not is_bnb_linear4bit(module):
        raise _unsupported(name, f"{type(module).__qualname__} is not a bitsandbytes Linear4bit")
    weight = getattr(module, "weight", None)
    if weight is None:
        raise _unsupported(name, "the Linear4bit has no weight")
    if not (_is_plain(weight) or _is_class(weight, "Params4bit", "bitsandbytes")):
        raise _unsupported(name, f"the Linear4bit's weight is a {_type_name(weight)} tensor subclass, not a "
                                 "bitsandbytes Params4bit")
    # bitsandbytes itself falls back to the module's quant_state when the parameter lost it (FSDP)
    qs = getattr(weight, "quant_state", None) or getattr(module, "quant_state", None)
    if qs is None or (hasattr(weight, "bnb_quantized") and not weight.bnb_quantized):
        raise _unsupported(name, "the Linear4bit is not quantized yet (its weight is still dense: bitsandbytes "
                                 "quantizes when the module is moved to a device)")
    if getattr(qs, "packing_format_for_cpu", False):
        raise _unsupported(name, "its 4-bit weight was repacked in place into bitsandbytes' CPU-only AVX512-BF16 "
                                 "layout (quant_state.packing_format_for_cpu=True; bitsandbytes does this on an "
                                 "eval-mode forward whose input needs no grad), which keeps the scales only in bf16 "
                                 "and cannot be read back exactly; reload the model in 4-bit and call model.train() "
                                 "(or patch it) before any eval-mode forward")
    quant_type = getattr(qs, "quant_type", None)
    if quant_type != "nf4":
        raise _unsupported(name, f"its 4-bit weight uses quant_type={quant_type!r} (bitsandbytes FP4), which pyflex "
                                 "does not support", _SUPPORTED + "; load with bnb_4bit_quant_type='nf4'")
    shape = tuple(int(s) for s in qs.shape)
    if len(shape) != 2:
        raise _unsupported(name, f"its quant_state.shape {shape} is not 2-D")
    n, k = shape
    if (module.out_features, module.in_features) != (n, k):
        raise _unsupported(name, f"its 4-bit weight has shape {shape} but the layer is {module.in_features} -> "
                                 f"{module.out_features} (a weight quantized in [K, N] orientation)")
    if qs.dtype not in NF4_DTYPES:
        raise _unsupported(name, f"quant_state.dtype {qs.dtype} is not fp32/bf16/fp16")
    code = getattr(qs, "code", None)
    if code is not None and not torch.equal(code.detach().float().cpu(), NF4_CODE):
        raise _unsupported(name, "its quant_state.code is not bitsandbytes' NF4 table (bitsandbytes' dequantize "
                                 "ignores it and uses the built-in table, so its meaning is unclear)")

    data = _plain(weight.data if hasattr(weight, "data") else weight)
    packed = data.contiguous().view(torch.uint8).reshape(-1)      # any quant_storage: reinterpret the bytes
    nbytes = (n * k + 1) // 2
    if packed.numel() < nbytes:
        raise _unsupported(name, f"its packed weight has {packed.numel()} bytes, expected {nbytes} for shape {shape}")
    packed = packed[:nbytes]
    device = packed.device
    # the code book is copied per layer: a buffer shared with the module constant (or other layers) would be one tensor
    # under several state-dict keys, and an in-place load into one would change them all
    kw = dict(packed=packed, code=NF4_CODE.to(device, copy=True), shape=shape, dtype=qs.dtype,
              blocksize=int(qs.blocksize), source=name)
    if getattr(qs, "nested", False) or getattr(qs, "state2", None) is not None:
        s2 = qs.state2
        offset = qs.offset if isinstance(qs.offset, torch.Tensor) else torch.tensor(float(qs.offset))
        kw.update(absmax=_plain(qs.absmax).view(torch.uint8).reshape(-1), absmax_code=_plain(s2.code).float(),
                  absmax_scale=_plain(s2.absmax).float().reshape(-1),
                  absmax_offset=_plain(offset).float().reshape(()).to(device), absmax_blocksize=int(s2.blocksize))
    else:
        kw.update(absmax=_plain(qs.absmax).float().reshape(-1))
    try:
        return NF4Weight(**kw)
    except ValueError as e:
        raise _unsupported(name, f"its quant state is inconsistent: {e}") from e


def from_torchao_nf4(tensor, name: str = "<module>") -> NF4Weight:
    """Convert a torchao ``NF4Tensor`` bit-exactly (its ``get_original_weight()``): torchao's own code book and its
    decoded scales (torchao decodes them with a division, so they are kept decoded, fp32, not double-quantized)."""
    if not _is_torchao_nf4(tensor):
        raise _unsupported(name, f"{type(tensor).__qualname__} is not a torchao NF4Tensor")
    if tensor.dim() != 2 or tensor.dtype not in NF4_DTYPES:
        raise _unsupported(name, f"torchao NF4Tensor of shape {tuple(tensor.shape)} and dtype {tensor.dtype} "
                                 "(2-D fp32/bf16/fp16 only)")
    scales = tensor.dequantize_scalers(tensor.quantized_scalers, tensor.quantization_factor,
                                       tensor.scaler_block_size)
    try:
        return NF4Weight(packed=_plain(tensor.quantized_data).view(torch.uint8).reshape(-1),
                         code=_plain(tensor.nf4).float(), absmax=_plain(scales).float().reshape(-1),
                         shape=tuple(tensor.shape), dtype=tensor.dtype, blocksize=int(tensor.block_size), source=name)
    except ValueError as e:
        raise _unsupported(name, f"its NF4Tensor is inconsistent: {e}") from e


def nf4_weight_of(module, name: str = "<module>") -> Optional[NF4Weight]:
    """The :class:`NF4Weight` of a quantized linear, None for a dense one (a plain float weight); raises
    :class:`UnsupportedQuantizedWeight` for a quantized or subclassed weight pyflex cannot read."""
    weight = getattr(module, "weight", None)
    if weight is not None and _is_torchao_nf4(weight):
        return from_torchao_nf4(weight, name)
    if is_bnb_linear4bit(module):
        return from_bnb_linear4bit(module, name)
    if weight is not None and _is_class(weight, "Params4bit", "bitsandbytes"):
        raise _unsupported(name, f"its weight is a bitsandbytes Params4bit but the module is a {_type_name(module)}, "
                                 "not a Linear4bit (a wrapper, e.g. a PEFT LoRA layer?): pass the Linear4bit itself")
    if isinstance(weight, torch.Tensor) and not _is_plain(weight):
        raise _unsupported(name, f"its weight is a {_type_name(weight)} tensor subclass, which pyflex cannot read")
    return None


def is_quantized_linear(module) -> bool:
    """True when :func:`nf4_weight_of` would read (or refuse) ``module`` as quantized rather than dense."""
    weight = getattr(module, "weight", None)
    return is_bnb_linear4bit(module) or (isinstance(weight, torch.Tensor) and not _is_plain(weight))


# -------------------------------------------------------------------- the layer
# NF4Weight field → buffer name. fp32 tensors are stored as int32 views of their bytes, so that ``model.to(bf16)`` /
# ``.half()`` (which cast floating buffers) cannot round the code book or the scales; uint8 ones stay as they are.
_BUFFERS = {"packed": "nf4_packed", "code": "nf4_code", "absmax": "nf4_absmax", "absmax_code": "nf4_absmax_code",
            "absmax_scale": "nf4_absmax_scale", "absmax_offset": "nf4_absmax_offset"}


class QuantizedFlexLinear(FlexLinear):
    """:class:`~pyflex.FlexLinear` on a 4-bit NF4 base (QLoRA): ``y = x W0ᵀ + b + m · s · β · c · B A dropout(x)``
    with W0 = dequantize(the 4-bit weight), which the op does per call (docs/op.md, "Quantized base").

    Args:
        base: a bitsandbytes ``Linear4bit`` (NF4) or an ``nn.Linear`` whose weight is a torchao ``NF4Tensor``.
        name: the module's path in the model, for error messages.
        everything else: as :class:`FlexLinear`.

    The layer owns the packed 4-bit bytes, the code book and the scales as buffers (``nf4_packed``, ``nf4_code``,
    ``nf4_absmax`` and, with double quantization, ``nf4_absmax_code``, ``nf4_absmax_scale``, ``nf4_absmax_offset``;
    fp32 ones stored as int32 views so dtype casts of the model leave them exact). They share memory with the
    bitsandbytes module, which is kept unregistered for ``unpatch``; ``weight`` is that module's own weight
    (read-only here), the bias its bias Parameter.

    Compute dtype: the ``Linear4bit``'s ``compute_dtype`` (``bnb_4bit_compute_dtype``), else the dtype the weight was
    quantized from; x is cast to it, the op runs in it (W0 dequantized straight into it), and y is cast back to x's
    dtype, as bitsandbytes does. Adapters default to fp32 on 16-bit compute dtypes. The base is frozen
    (``base_trainable`` cannot be set) and :meth:`merge` is refused.
    """

    def __init__(self, base: nn.Module, *, name: str = "<module>", **kwargs):
        if isinstance(base, FlexLinear):
            raise TypeError("base is already a FlexLinear; a module is patched once (unpatch it first)")
        if not is_linear_like(base):
            raise TypeError(f"module {name!r}: base must be a bitsandbytes Linear4bit or an nn.Linear with a torchao "
                            f"NF4 weight, got {type(base).__name__}")
        nf4 = nf4_weight_of(base, name)
        if nf4 is None:
            raise TypeError(f"module {name!r}: {type(base).__name__} holds a dense weight; use FlexLinear for it")
        compute = getattr(base, "compute_dtype", None) if is_bnb_linear4bit(base) else None
        if compute is not None and not (isinstance(compute, torch.dtype) and compute.is_floating_point):
            raise TypeError(f"module {name!r}: compute_dtype={compute!r} is not a floating dtype")
        # handed to _adopt_base, which FlexLinear.__init__ calls after its argument checks
        object.__setattr__(self, "_incoming_base", (nf4, compute or nf4.dtype, name))
        super().__init__(base, **kwargs)

    def _adopt_base(self, base: nn.Module) -> Tuple[torch.dtype, torch.device]:
        nf4, compute, name = self.__dict__.pop("_incoming_base")
        self.conv1d = False
        object.__setattr__(self, "_base_module", base)   # unregistered: unpatch() hands it back unchanged
        self.bias = base.bias
        self.in_features, self.out_features = base.in_features, base.out_features
        for field, tensor in nf4.buffers().items():
            self.register_buffer(_BUFFERS[field], tensor.view(torch.int32) if tensor.dtype == torch.float32 else tensor)
        self.nf4_meta = dict(nf4.meta(), source=name)
        self._compute_dtype = compute
        self._nf4_cache: Optional[Tuple[tuple, NF4Weight]] = None
        return compute, nf4.device

    # ------------------------------------------------------------------------------------------
    @property
    def weight(self) -> torch.Tensor:
        """The wrapped module's own (4-bit) weight; the op reads the layer's buffers instead."""
        return self._base_module.weight

    @property
    def compute_dtype(self) -> torch.dtype:
        return self._compute_dtype

    @property
    def nf4_weight(self) -> NF4Weight:
        """The base as an :class:`NF4Weight` over this layer's buffers (rebuilt when ``.to()`` replaced them)."""
        return self.base_weight_nk()

    def base_weight_nk(self) -> NF4Weight:
        buffers = self._buffers
        current = tuple(buffers.get(b) for b in _BUFFERS.values())
        cache = self._nf4_cache
        if cache is not None and all(a is b for a, b in zip(cache[0], current)):
            return cache[1]
        tensors = {field: (t.view(torch.float32) if t.dtype == torch.int32 else t)
                   for field, t in zip(_BUFFERS, current) if t is not None}
        meta = self.nf4_meta
        nf4 = NF4Weight.from_buffers(tensors, shape=meta["shape"], dtype=meta["dtype"], blocksize=meta["blocksize"],
                                     absmax_blocksize=meta["absmax_blocksize"], source=meta["source"])
        if not torch.compiler.is_compiling():
            self._nf4_cache = (current, nf4)
        return nf4

    @property
    def base_trainable(self) -> bool:
        return False

    @base_trainable.setter
    def base_trainable(self, flag: bool) -> None:
        if flag:
            raise RuntimeError(f"{self.nf4_meta['source']}: a 4-bit (NF4) base cannot train (it has no dense weight "
                               "to update); train its adapter, or load the base unquantized for full training")
        if self.bias is not None:
            self.bias.requires_grad_(False)
            self.bias.grad = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        # back to x's dtype, as bitsandbytes' Linear4bit does (the op ran in the compute dtype)
        return y if y.dtype == x.dtype or not x.dtype.is_floating_point else y.to(x.dtype)

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The base alone (adapter switched off): the op with an all-zero rank-1 adapter, so that it keeps the op's
        memory rule (no dense W0 saved for backward) and is exact whatever the trained adapter holds."""
        dtype = self.compute_dtype if not torch.is_autocast_enabled(x.device.type) else \
            torch.get_autocast_dtype(x.device.type)
        xc = x.to(dtype) if x.dtype != dtype and x.dtype.is_floating_point else x
        bias = self.bias if self.bias is None or self.bias.dtype == dtype else self.bias.to(dtype)
        zeros_A = xc.new_zeros((1, self.in_features))
        zeros_B = xc.new_zeros((self.out_features, 1))
        with torch.autocast(x.device.type, enabled=False):
            y = flex_lora(xc, self.base_weight_nk(), bias, zeros_A, zeros_B, 0.0)
        return y if y.dtype == x.dtype or not x.dtype.is_floating_point else y.to(x.dtype)

    def delta_weight(self) -> torch.Tensor:
        """s·β·B A as (out, in), float32."""
        cdt = torch.float64 if self.compute_dtype == torch.float64 else torch.float32
        return (self.lora_B.to(cdt) @ self.lora_A.to(cdt)) * (self.scaling * float(self.response_scale))

    def _check_mergeable(self) -> None:
        raise RuntimeError("cannot merge a LoRA adapter into a 4-bit (NF4) base: W0 + s·B A is not a 4-bit weight, and "
                           "re-quantizing it would move W0 by the quantization error, which is far larger than the "
                           "update; keep the adapter separate (pyflex.save_adapter / save_peft_adapter) and merge it "
                           "into a dense (unquantized) copy of the base instead")

    def extra_repr(self) -> str:
        meta = self.nf4_meta
        dq = ", double_quant" if "nf4_absmax_code" in self._buffers else ""
        return (f"{super().extra_repr()}, base=nf4(blocksize={meta['blocksize']}{dq}, "
                f"dtype={str(meta['dtype']).replace('torch.', '')}, "
                f"compute={str(self.compute_dtype).replace('torch.', '')})")


def flex_linear_for(base: nn.Module, name: str = "<module>", **kwargs) -> FlexLinear:
    """The FlexLinear for ``base``: a :class:`QuantizedFlexLinear` for a 4-bit NF4 base (bitsandbytes ``Linear4bit``,
    torchao ``NF4Tensor`` weight), else a dense :class:`FlexLinear`. An unsupported quantized weight is an
    :class:`UnsupportedQuantizedWeight` naming ``name``. ``kwargs`` go to the layer (r, alpha, tau, ...)."""
    if is_quantized_linear(base):
        return QuantizedFlexLinear(base, name=name, **kwargs)
    return FlexLinear(base, **kwargs)
