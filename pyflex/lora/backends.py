"""The built-in backends of the op, registered in the contract's registry, and dispatch by device and capability.

    reference  plain PyTorch (pyflex/lora/reference.py): every device and float dtype; the spec
    cpp        the C++ (OpenMP) extension pyflex._C: CPU tensors
    triton     the Triton kernels (pyflex.kernels.flex_lora): CUDA tensors, or CPU tensors under the Triton
               interpreter (TRITON_INTERPRET=1 at process start; how CI tests them); fp16/bf16/fp32

All three also take an NF4 base (the ``"nf4"`` weight format, an :class:`~pyflex.lora.nf4.NF4Weight`; docs/op.md,
"Quantized base"): each dequantizes it with its own dequantizer (reference: PyTorch; cpp: an OpenMP loop; triton: a
Triton pass, then cuBLAS) into a temporary in the call's dtype and runs its dense path on it, in forward and again in
backward for dx; the temporary is freed when the call returns.

``PYFLEX_BACKEND`` or :func:`use_backend` forces one by name; a forced backend that cannot serve a call (device,
dtype, a feature, not built) is an error, never a silent fallback. ``auto`` (the default) takes, for the tensors'
device, the first registered backend that covers the call: CUDA → triton, CPU → cpp; when none does, the reference,
with one warning if it stands in for the C++ extension that failed to load.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import warnings
from typing import Dict, Optional

import torch

from pyflex.lora import reference
from pyflex.lora.contract import (FLOAT_DTYPES, REGISTRY, Backend, BackendUnavailable, BackwardInputs, BackwardResult,
                                  CallNeeds,
                                  Capabilities, ForwardInputs, ForwardResult, Implementation, register)
from pyflex.lora.nf4 import NF4Weight

BACKENDS = ("auto", "triton", "cpp", "reference")
_backend_override: Optional[str] = None
_cpp_warned = False


# --------------------------------------------------------------------------------------------------
# the three built-in backends
# --------------------------------------------------------------------------------------------------
_BOTH_FORMATS = ("dense", "nf4")


def _reference_dequantize(weight: NF4Weight, dtype: torch.dtype) -> torch.Tensor:
    return weight.dequantize(dtype)


def _load_reference() -> Implementation:
    def forward(i: ForwardInputs) -> ForwardResult:
        w = i.weight if i.weight.__class__ is not NF4Weight else i.weight.dequantize(i.x.dtype)
        return reference.lora_forward(i.x, w, i.bias, i.lora_A, i.lora_B, i.x_lora, i.cscale, i.tau)

    def backward(i: BackwardInputs):
        w = i.weight if i.weight.__class__ is not NF4Weight else i.weight.dequantize(i.gy.dtype)
        return reference.lora_backward(i.gy, i.x, w, i.lora_A, i.lora_B, i.x_lora, i.z, i.cscale, i.mask,
                                       need_dx=i.need_dx, need_dweight=i.need_dweight, need_dbias=i.need_dbias,
                                       need_adapter=i.need_adapter, need_uz=i.need_uz,
                                       dropout_scale=i.dropout_scale)

    return Implementation(forward, backward, reference.tau_gradient, _reference_dequantize)


def load_cpp_module():
    """The compiled extension pyflex._C; BackendUnavailable (with the import error) when it is not built."""
    try:
        return importlib.import_module("pyflex._C")
    except ImportError as exc:  # not built, or built against another torch
        raise BackendUnavailable(f"{type(exc).__name__}: {exc}. Build it with `pip install -e .`") from exc


def _load_cpp() -> Implementation:
    module = load_cpp_module()
    native_dequantize = getattr(module, "nf4_dequantize", None)

    def dequantize(weight: NF4Weight, dtype: torch.dtype) -> torch.Tensor:
        if native_dequantize is None:  # an extension built before NF4 support: a clear error, not another path
            raise RuntimeError("pyflex._C was built without nf4_dequantize (an older build); rebuild it with "
                               "`python -m pip install --no-build-isolation -e .` to run an NF4 base on the cpp backend")
        out = torch.empty(weight.shape, dtype=dtype, device=weight.device)
        return native_dequantize(weight.packed, weight.code, weight.absmax, weight.absmax_code, weight.absmax_scale,
                                 weight.absmax_offset, weight.blocksize, weight.absmax_blocksize, out)

    def forward(i: ForwardInputs) -> ForwardResult:
        w = i.weight if i.weight.__class__ is not NF4Weight else dequantize(i.weight, i.x.dtype)
        return ForwardResult(*module.lora_forward(i.x, w, i.bias, i.lora_A, i.lora_B, i.x_lora, i.cscale, i.tau))

    def backward(i: BackwardInputs):
        w = i.weight if i.weight.__class__ is not NF4Weight else dequantize(i.weight, i.gy.dtype)
        return BackwardResult(*module.lora_backward(
            i.gy, i.x, w, i.lora_A, i.lora_B, i.x_lora, i.z, i.cscale, i.mask, need_dx=i.need_dx,
            need_dweight=i.need_dweight, need_dbias=i.need_dbias, need_adapter=i.need_adapter, need_uz=i.need_uz,
            dropout_scale=i.dropout_scale))

    return Implementation(forward, backward, reference.tau_gradient, dequantize)


def triton_interpreting() -> bool:
    """True when triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1 seen when triton was imported)."""
    try:
        import triton
    except ImportError:
        return False
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET") == "1"


def _load_triton() -> Implementation:
    try:
        module = importlib.import_module("pyflex.kernels.flex_lora")
        nf4 = importlib.import_module("pyflex.kernels.nf4")
    except ImportError as exc:
        raise BackendUnavailable(f"{type(exc).__name__}: {exc}") from exc

    def dequantize(weight: NF4Weight, dtype: torch.dtype) -> torch.Tensor:
        return nf4.nf4_dequantize(**weight.kernel_args(), dtype=dtype)

    def forward(i: ForwardInputs) -> ForwardResult:
        # a dequantization pass into a temporary, then the dense kernels (y0 on cuBLAS)
        if i.weight.__class__ is NF4Weight:
            i = dataclasses.replace(i, weight=dequantize(i.weight, i.x.dtype))
        return module.forward(i)

    def backward(i: BackwardInputs) -> BackwardResult:
        if i.weight.__class__ is NF4Weight:
            i = dataclasses.replace(i, weight=dequantize(i.weight, i.gy.dtype))
        return module.backward(i)

    return Implementation(forward, backward, module.tau_gradient, dequantize)


register(Backend("triton", Capabilities(devices=("cuda", "cpu"),
                                        dtypes=(torch.float16, torch.bfloat16, torch.float32), tau_on_device=True,
                                        weight_formats=_BOTH_FORMATS),
                 _load_triton, auto_devices=("cuda",)))
register(Backend("cpp", Capabilities(devices=("cpu",), dtypes=FLOAT_DTYPES, weight_formats=_BOTH_FORMATS), _load_cpp,
                 auto_devices=("cpu",)))
register(Backend("reference", Capabilities(devices=("cpu", "cuda", "meta", "mps", "xpu"), dtypes=FLOAT_DTYPES,
                                           weight_formats=_BOTH_FORMATS),
                 _load_reference))


def cpp_available() -> bool:
    """True when the C++ CPU extension (pyflex._C) imports."""
    return REGISTRY["cpp"].available()


# --------------------------------------------------------------------------------------------------
# choosing a backend
# --------------------------------------------------------------------------------------------------
def current_backend_name() -> str:
    """The backend requested by :func:`use_backend` or ``PYFLEX_BACKEND`` (default 'auto')."""
    name = _backend_override or os.environ.get("PYFLEX_BACKEND", "auto").strip().lower() or "auto"
    if name != "auto" and name not in REGISTRY:
        raise ValueError(f"PYFLEX_BACKEND={name!r} is not a backend; allowed: auto, {', '.join(REGISTRY)}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Force a backend inside a ``with`` block (overrides ``PYFLEX_BACKEND``)."""
    global _backend_override
    if name != "auto" and name not in REGISTRY:
        raise ValueError(f"backend={name!r} is not a backend; allowed: auto, {', '.join(REGISTRY)}")
    previous, _backend_override = _backend_override, name
    try:
        yield
    finally:
        _backend_override = previous


def _check_interpreter(backend: Backend, device_type: str) -> None:
    if backend.name == "triton" and device_type == "cpu" and not triton_interpreting():
        # triton decides between compiling and interpreting when it decorates a kernel, and torch imports triton
        # early: the switch cannot be flipped in a running process.
        raise RuntimeError(
            "backend 'triton' was asked for CPU tensors, which needs the Triton interpreter, but triton was imported "
            "without it. Set TRITON_INTERPRET=1 in the environment before starting Python (pyflex sets it itself "
            "when PYFLEX_BACKEND=triton is in the environment at import and no CUDA device is present)")


def _forced(name: str, call: CallNeeds) -> Backend:
    backend = REGISTRY[name]
    missing = backend.capabilities.unmet(call)
    if missing:
        raise ValueError(f"backend {name!r} cannot serve this call: it does not support {'; '.join(missing)}. "
                         f"Use PYFLEX_BACKEND=auto or a backend that does")
    _check_interpreter(backend, call.device_type)
    try:
        backend.implementation()
    except BackendUnavailable as exc:
        raise RuntimeError(str(exc)) from None
    return backend


def _auto(call: CallNeeds) -> Backend:
    global _cpp_warned
    for backend in REGISTRY.values():
        if call.device_type in backend.auto_devices and not backend.capabilities.unmet(call):
            if backend.available():
                return backend
            if backend.name == "cpp" and not _cpp_warned:
                warnings.warn(f"pyflex: the C++ extension pyflex._C is not available ({backend._error}); CPU calls "
                              "use the PyTorch reference path. Rebuild with `pip install -e .`.",
                              RuntimeWarning, stacklevel=4)
                _cpp_warned = True
    return REGISTRY["reference"]


_CACHE: Dict[tuple, Backend] = {}


def select_backend(call: CallNeeds, name: Optional[str] = None) -> Backend:
    """The backend that serves ``call``: the forced one (``name``, else use_backend / PYFLEX_BACKEND) or auto's pick.
    Cached per (name, call)."""
    return select_for(call.device_type, call.dtype, call.bias, call.dropout, call.tau, call.coef, name,
                      call.weight_format, call.adapter_kind)


def select_for(device_type: str, dtype: torch.dtype, bias: bool, dropout: bool, tau: bool, coef: bool,
               name: Optional[str] = None, weight_format: str = "dense", adapter_kind: str = "lora") -> Backend:
    """:func:`select_backend` without building a CallNeeds on a cache hit: the op calls this once per call, so a hit
    is one tuple and one dictionary lookup."""
    requested = name or _backend_override or os.environ.get("PYFLEX_BACKEND") or "auto"
    key = (requested, device_type, dtype, bias, dropout, tau, coef, weight_format, adapter_kind)
    backend = _CACHE.get(key)
    if backend is None:
        if name is None:
            name = current_backend_name()          # validates and normalises the override or the environment
        elif name != "auto" and name not in REGISTRY:
            raise ValueError(f"backend={name!r} is not a backend; allowed: auto, {', '.join(REGISTRY)}")
        call = CallNeeds(device_type, dtype, bias, dropout, tau, coef, weight_format, adapter_kind)
        backend = _auto(call) if name == "auto" else _forced(name, call)
        _CACHE[key] = backend
    return backend


def resolve_backend(device: torch.device, name: Optional[str] = None, dtype: torch.dtype = torch.float32):
    """``(name, Implementation)`` of the backend that serves a plain call (no bias, dropout, τ or coefficient) on
    ``device`` in ``dtype``; for inspection and benchmarks. The op itself dispatches on everything a call needs."""
    backend = select_backend(CallNeeds(torch.device(device).type, dtype), name)
    return backend.name, backend.implementation()


def clear_dispatch_cache() -> None:
    """Forget cached choices (after registering a backend, or in tests that change what is available)."""
    global _cpp_warned
    _CACHE.clear()
    _cpp_warned = False
