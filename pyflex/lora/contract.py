"""What a backend of the τ-masked LoRA linear is: the functions it provides, what they take and return, what it can
serve, and the registry dispatch looks backends up in (docs/architecture.md, "Adding a backend"; the math in
docs/op.md).

A backend provides three functions over flattened tokens (M tokens, K inputs, N outputs, rank r):

    forward(ForwardInputs) -> ForwardResult
    backward(BackwardInputs) -> BackwardResult
    tau_gradient(uz (M,), cscale (M,), mask (M,) bool, lam: float) -> 0-dim tensor

with the semantics of :mod:`pyflex.lora.reference` (the spec); tests/lora/test_backend_contract.py runs every
registered backend against it. What a backend cannot do is declared in its :class:`Capabilities`, never handled by
a silent fallback inside it: dispatch (pyflex/lora/backends.py) refuses a forced backend whose capabilities do not
cover a call, and ``auto`` picks the first registered backend for the device that covers it.

Base weights: ``weight`` is a dense (N, K) tensor, or — for a backend that declares the ``"nf4"`` weight format — an
:class:`~pyflex.lora.nf4.NF4Weight` (QLoRA's 4-bit base; docs/op.md, "Quantized base"), which the backend dequantizes
into the input dtype (forward, and again in backward for dx; never kept between calls). A quantized base is frozen:
``need_dweight`` is never set for it.

This module imports only torch (and pyflex/lora/nf4.py, which imports only torch), so the kernels (pyflex.kernels)
can implement the contract without the package.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple, Union

import torch

from pyflex.lora.nf4 import NF4Weight

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# ‖x_i W0ᵀ‖ is clamped to at least this in the ratio's denominator, so a token whose base output is exactly zero gets
# a finite ratio (‖d_i‖ / NORM_EPS) instead of inf/nan. Part of the math every backend implements.
NORM_EPS = 1e-6


@dataclass(frozen=True)
class Capabilities:
    """What a backend serves. A call is served only when every field covers it (:meth:`unmet`)."""
    devices: Tuple[str, ...]                      # device types the functions accept ("cpu", "cuda")
    dtypes: Tuple[torch.dtype, ...]               # input dtypes of x / weight / adapters
    bias: bool = True                             # a base bias (N,)
    dropout: bool = True                          # x_lora other than x (dropout on the LoRA path)
    tau: bool = True                              # the τ mask and its gradient
    coef: bool = True                             # a per-token coefficient c_i (HLPT gates) inside cscale
    tau_on_device: bool = False                   # reads τ as a 1-element device tensor (no host sync)
    weight_formats: Tuple[str, ...] = ("dense",)  # base weight storage: "dense", "nf4" (an NF4Weight, see above)
    adapter_kinds: Tuple[str, ...] = ("lora",)    # the delta's form: "lora" is s·c_i·B A x̃_i

    def unmet(self, call: "CallNeeds") -> list:
        """What of ``call`` this backend does not serve, as readable phrases (empty when it serves all)."""
        missing = []
        if call.device_type not in self.devices:
            missing.append(f"tensors on {call.device_type} (serves {', '.join(self.devices)})")
        if call.dtype not in self.dtypes:
            missing.append(f"dtype {call.dtype} (serves {', '.join(str(d) for d in self.dtypes)})")
        for flag in ("bias", "dropout", "tau", "coef"):
            if getattr(call, flag) and not getattr(self, flag):
                missing.append(flag)
        if call.weight_format not in self.weight_formats:
            missing.append(f"weight format {call.weight_format!r} (serves {', '.join(self.weight_formats)})")
        if call.adapter_kind not in self.adapter_kinds:
            missing.append(f"adapter kind {call.adapter_kind!r} (serves {', '.join(self.adapter_kinds)})")
        return missing


@dataclass(frozen=True)
class CallNeeds:
    """What one call of the op asks of a backend (the key dispatch looks up)."""
    device_type: str
    dtype: torch.dtype
    bias: bool = False
    dropout: bool = False
    tau: bool = False
    coef: bool = False
    weight_format: str = "dense"                  # "dense", or "nf4" when the weight is an NF4Weight
    adapter_kind: str = "lora"


def weight_format(weight) -> str:
    """The :class:`CallNeeds` weight format of a base weight: "nf4" for an NF4Weight, else "dense"."""
    return "nf4" if isinstance(weight, NF4Weight) else "dense"


@dataclass
class ForwardInputs:
    """x (M, K); weight (N, K) — a dense tensor, or an NF4Weight for the "nf4" format —, bias (N,) or None;
    lora_A (r, K), lora_B (N, r): one dtype (an NF4Weight's own ``dtype`` may differ), one device.
    x_lora (M, K) is dropout(x) (x itself without dropout); cscale (M,) in the compute dtype is s·β·c_i per token;
    tau is None (mask off), a python float, or — for backends with ``tau_on_device`` — a 1-element device tensor."""
    x: torch.Tensor
    weight: Union[torch.Tensor, NF4Weight]
    bias: Optional[torch.Tensor]
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    x_lora: torch.Tensor
    cscale: torch.Tensor
    tau: Union[None, float, torch.Tensor]


@dataclass
class ForwardResult:
    y: torch.Tensor                 # (M, N), input dtype
    z: torch.Tensor                 # (M, r), compute dtype: x_lora Aᵀ
    ratio: Optional[torch.Tensor]   # (M,), compute dtype: ‖d_i‖ / max(‖x_i W0ᵀ‖, eps); None when the mask is off
    mask: torch.Tensor              # (M,) bool: True where the delta is applied


@dataclass
class BackwardInputs:
    """gy = ∂L/∂y (M, N). Tensors the requested gradients do not need may be None: x unless need_dweight or
    need_adapter; weight and lora_A unless need_dx; z unless need_adapter or need_uz. x_lora is dropout(x) (x without
    dropout); dropout_scale (M, K) is the dropout mask divided by (1 − p), or None without dropout. weight may be an
    NF4Weight (the "nf4" format), dequantized into gy's dtype for dx."""
    gy: torch.Tensor
    x: Optional[torch.Tensor]
    weight: Union[None, torch.Tensor, NF4Weight]
    lora_A: Optional[torch.Tensor]
    lora_B: torch.Tensor
    x_lora: Optional[torch.Tensor]
    z: Optional[torch.Tensor]
    cscale: torch.Tensor
    mask: torch.Tensor
    dropout_scale: Optional[torch.Tensor]
    need_dx: bool
    need_dweight: bool
    need_dbias: bool
    need_adapter: bool
    need_uz: bool


@dataclass
class BackwardResult:
    dx: Optional[torch.Tensor]       # (M, K) input dtype; None when not requested
    dweight: Optional[torch.Tensor]  # (N, K)
    dbias: Optional[torch.Tensor]    # (N,)
    dA: Optional[torch.Tensor]       # (r, K) adapter dtype
    dB: Optional[torch.Tensor]       # (N, r)
    uz: Optional[torch.Tensor]       # (M,) compute dtype: u_i·z_i with u_i = Bᵀ gy_i (μ_i = cscale_i · uz_i)


@dataclass(frozen=True)
class Implementation:
    """The three functions of a loaded backend, and its NF4 dequantizer (``dequantize(NF4Weight, dtype) -> (N, K)
    dense tensor``, bit-identical to ``NF4Weight.dequantize``) when it declares the "nf4" format."""
    forward: Callable[[ForwardInputs], ForwardResult]
    backward: Callable[[BackwardInputs], BackwardResult]
    tau_gradient: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]
    dequantize: Optional[Callable[[NF4Weight, torch.dtype], torch.Tensor]] = None


class BackendUnavailable(RuntimeError):
    """Raised by a backend's loader when it cannot run here (not built, wrong mode); the message says why."""


@dataclass
class Backend:
    """A registered backend: its name, capabilities, the device types ``auto`` may pick it for (in registration
    order), and a loader that imports its implementation on first use (raising :class:`BackendUnavailable`)."""
    name: str
    capabilities: Capabilities
    load: Callable[[], Implementation]
    auto_devices: Tuple[str, ...] = ()
    _implementation: Optional[Implementation] = dataclasses.field(default=None, repr=False)
    _error: Optional[str] = dataclasses.field(default=None, repr=False)

    def implementation(self) -> Implementation:
        """The loaded functions; raises BackendUnavailable (with the first failure's reason) when they cannot load."""
        if self._implementation is None:
            if self._error is None:
                try:
                    self._implementation = self.load()
                except BackendUnavailable as exc:
                    self._error = str(exc)
            if self._implementation is None:
                raise BackendUnavailable(f"backend {self.name!r} is not available: {self._error}")
        return self._implementation

    def available(self) -> bool:
        try:
            self.implementation()
        except BackendUnavailable:
            return False
        return True


REGISTRY: Dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    """Add (or replace) a backend. ``auto`` tries backends in registration order."""
    REGISTRY[backend.name] = backend
    return backend
