"""`FlexLinear`: a base ``nn.Linear`` / GPT-2 ``Conv1D`` plus a LoRA adapter, run through :func:`pyflex.flex_lora`.

Parameter layout (so the base state dict is unchanged after patching):

    weight   the base module's own Parameter object, unchanged: (out, in) for nn.Linear,
             (in, out) for GPT-2 Conv1D. ``q_proj.weight`` stays ``q_proj.weight``.
    bias     the base module's own bias Parameter (or None).
    lora_A   (r, in)   kaiming_uniform(a=√5), as PEFT.
    lora_B   (out, r)  zeros, as PEFT.
    tau      0-dim float32 threshold (only when the PEFT_S mask is on), from :func:`pyflex.make_tau`.
    gate     optional child module (the HLPT gate hook), parameters named ``gate.*``.

The original base module is kept (unregistered, so its parameters are not listed twice) to give
``unpatch`` back the very same object.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from pyflex.lora import tau_lambda
from pyflex.lora.autograd import flex_lora, sparsity, verify_taus
from pyflex.lora.tau import check_target_sparsity, make_tau

try:  # GPT-2 style Conv1D: y = x @ W + b with W stored (in, out)
    from transformers.pytorch_utils import Conv1D as _HFConv1D
except ImportError:  # transformers is optional for the layer itself
    _HFConv1D = None

__all__ = ["FlexLinear", "is_conv1d", "is_linear_like"]


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' GPT-2 ``Conv1D`` (weight stored (in, out))."""
    return _HFConv1D is not None and isinstance(module, _HFConv1D)


def is_linear_like(module: nn.Module) -> bool:
    """Modules FlexLinear can wrap: ``nn.Linear`` (not a FlexLinear) or GPT-2 ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def default_adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """fp32 master adapters on 16-bit bases (as PEFT), the base dtype otherwise (float32 / float64)."""
    return torch.float32 if base_dtype in (torch.float16, torch.bfloat16) else base_dtype


class FlexLinear(nn.Module):
    """A base linear with a (τ-masked, optionally gated) LoRA adapter.

    ``y = x W0ᵀ + b + m · s · β · c · B A dropout(x)`` with s = α/r (α/√r for rsLoRA), β = ``response_scale``,
    c = ``gate(x)`` (per token; 1 when no gate) and m the PEFT_S mask (all ones when τ is off).

    Args:
        base: the ``nn.Linear`` or GPT-2 ``Conv1D`` to wrap. Its weight/bias Parameters are reused as-is.
        r: LoRA rank ≥ 1. alpha: LoRA α. rslora: scale α/√r instead of α/r.
        dropout: dropout probability on the LoRA input (training mode only), as PEFT.
        tau: create the PEFT_S threshold τ (initial value ``tau0``) and apply the token mask.
        lam: PEFT_S λ ≥ 0 (eq. 15).
        target_sparsity: None (τ trained by PEFT_S's rule), or a fraction in (0, 1) of real tokens to mask: τ is
            then steered to that fraction of each step's tokens instead (pyflex/lora/tau_lambda.py; λ unused, so
            ``lam`` must be 0).
        adapter_dtype: dtype of lora_A/lora_B. Default: float32 on float16/bfloat16 bases (master weights, as PEFT
            keeps them: 16-bit adapters under AdamW overflow to NaN), the base dtype otherwise. The op computes in
            the activation dtype: the small r×in and out×r adapter matrices are cast to it on every call (a
            differentiable cast of r·(in+out) elements, never an activation; gradients reach the stored fp32
            parameters).

    Shapes: x (..., in) → y (..., out), dtype of the base weight (or the autocast dtype under autocast).

    Conv1D: the op takes W0 as (N, K) = (out, in); a Conv1D weight is (in, out), so ``weight.t()`` is passed as a
    strided view, which keeps the base Parameter untouched. The backends read it through its strides (reference and
    C++: BLAS transpose flags; Triton: stride arguments), so no copy is made; a backend that needed a contiguous
    weight would pay an out·in copy per call.
    """

    def __init__(self, base: nn.Module, *, r: int = 8, alpha: float = 16.0, rslora: bool = False,
                 dropout: float = 0.0, tau: bool = False, lam: float = 0.0, tau0: float = 0.0,
                 target_sparsity: Optional[float] = None, adapter_dtype: Optional[torch.dtype] = None):
        super().__init__()
        if isinstance(base, FlexLinear):
            raise TypeError("base is already a FlexLinear; a module is patched once (unpatch it first)")
        if not is_linear_like(base):
            raise TypeError(f"base must be nn.Linear or transformers Conv1D, got {type(base).__name__}")
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise ValueError(f"r={r!r} is not allowed; the LoRA rank must be an int >= 1")
        if not math.isfinite(float(alpha)) or float(alpha) <= 0:
            raise ValueError(f"alpha={alpha!r} is not allowed; it must be a finite number > 0")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout={dropout!r} is not allowed; it must be in [0, 1)")
        if not math.isfinite(float(lam)) or float(lam) < 0:
            raise ValueError(f"lam={lam!r} is not allowed; λ must be finite and >= 0")
        if target_sparsity is not None:
            check_target_sparsity(target_sparsity, tau, lam)
        if not math.isfinite(float(tau0)):
            raise ValueError(f"tau0={tau0!r} is not allowed; it must be finite")
        base_dtype, device = self._adopt_base(base)
        self.r = int(r)
        self.alpha = float(alpha)
        self.rslora = bool(rslora)
        self.scaling = self.alpha / (math.sqrt(self.r) if self.rslora else self.r)
        self.dropout = float(dropout)
        self.lam = float(lam)
        self.target_sparsity = None if target_sparsity is None else float(target_sparsity)
        self.tau0 = float(tau0)
        dtype = adapter_dtype or default_adapter_dtype(base_dtype)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"adapter_dtype={dtype} is not allowed; use a floating dtype")
        self.lora_A = nn.Parameter(torch.empty(self.r, self.in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, self.r, dtype=dtype, device=device))
        if tau:
            tau_param = make_tau(tau0)
            tau_param.data = tau_param.data.to(device)  # keeps the Parameter (and its τ marker)
            self.tau = tau_param
        else:
            self.tau = None
        self.gate: Optional[nn.Module] = None
        self.response_scale = 1.0
        self.adapter_enabled = True
        self.merged = False
        self.last_mask: Optional[torch.Tensor] = None
        self.last_token_valid: Optional[torch.Tensor] = None
        # Padding mask of the model's current forward (pyflex.layers.token_context), set by patch_model; None: all real.
        self.token_context = None
        # Gradient collects (Σ m_i, real tokens) for τ's λ term (or its target), used at the optimizer step
        # (pyflex.lora.tau_lambda).
        self.tau_count_sink: Optional[torch.Tensor] = tau_lambda.new_count_sink(device) if tau else None
        if tau:  # here too, not only in forward: a compiled forward cannot set attributes on τ
            tau_lambda.track(self.tau, self)
        # Every τ of the patched model (set by patch_model), so that one host read checks them all after a step.
        self.tau_peers: list = []
        self.reset_adapter_parameters()

    def _adopt_base(self, base: nn.Module):
        """Take over ``base``'s weight and bias Parameters (and keep ``base`` itself, unregistered, for ``unpatch``);
        returns (the dtype adapters default from, the device). pyflex/layers/quantized.py overrides this for 4-bit
        bases."""
        weight = getattr(base, "weight", None)
        if not isinstance(weight, torch.Tensor) or type(weight) not in (torch.Tensor, nn.Parameter) or \
                weight.dim() != 2 or not weight.dtype.is_floating_point or (
                not is_conv1d(base) and tuple(weight.shape) != (base.out_features, base.in_features)):
            # e.g. a quantized nn.Linear subclass whose weight is packed, or a quantized tensor subclass: the dense
            # path needs the plain (out, in) matrix
            raise TypeError(f"{type(base).__name__} does not hold a plain dense floating (out, in) weight "
                            f"(got {None if weight is None else (type(weight).__name__, tuple(weight.shape), weight.dtype)}); "
                            "FlexLinear wraps dense linears only. pyflex.patch_model converts bitsandbytes NF4 "
                            "Linear4bit layers and torchao NF4 weights (pyflex/layers/quantized.py); other quantized "
                            "or packed linears are not supported")
        self.conv1d = is_conv1d(base)
        # The base module object itself, unregistered: unpatch() hands it back unchanged.
        object.__setattr__(self, "_base_module", base)
        self.weight = base.weight
        self.bias = base.bias
        if self.conv1d:
            self.in_features, self.out_features = base.weight.shape
        else:
            self.in_features, self.out_features = base.in_features, base.out_features
        return weight.dtype, weight.device

    # ------------------------------------------------------------------------------------------
    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the op runs in outside autocast (a floating x is cast to it): the base weight's dtype."""
        return self.weight.dtype

    @property
    def base_module(self) -> nn.Module:
        """The wrapped nn.Linear / Conv1D (shares ``weight`` and ``bias`` with this module)."""
        return self._base_module

    @property
    def tau_enabled(self) -> bool:
        return self.tau is not None

    @property
    def base_trainable(self) -> bool:
        """True when the base weight requires grad; the op then also computes ∂W0 (and ∂b) (LIFT full mode)."""
        return self.weight.requires_grad

    @base_trainable.setter
    def base_trainable(self, flag: bool) -> None:
        for p in (self.weight, self.bias):
            if p is not None:
                p.requires_grad_(bool(flag))
                if not flag:
                    p.grad = None

    def __setstate__(self, state):
        super().__setstate__(state)
        if self.tau is not None:  # a deep copy or an unpickled layer: route the copy's τ counts to this layer
            tau_lambda.track(self.tau, self)

    @property
    def last_sparsity(self) -> Optional[float]:
        """PEFT_S eq. 23 for the last forward: fraction of tokens whose delta was not applied. None when τ is
        off or before the first forward. Computed lazily from ``last_mask`` (the only device sync)."""
        return None if self.last_mask is None else sparsity(self.last_mask, self.last_token_valid)

    def adapter_parameters(self):
        """lora_A, lora_B, tau (if any) and the gate's parameters (if any)."""
        params = [self.lora_A, self.lora_B]
        if self.tau is not None:
            params.append(self.tau)
        if self.gate is not None:
            params.extend(self.gate.parameters())
        return params

    def reset_adapter_parameters(self) -> None:
        """PEFT's LoRA init: A ~ kaiming_uniform(a=√5), B = 0 (so the patched model starts equal to the base)."""
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    def base_weight_nk(self) -> torch.Tensor:
        """The base weight as (out, in) = (N, K) (a transposed view for Conv1D)."""
        return self.weight.t() if self.conv1d else self.weight

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The base layer alone (merged, or the adapter switched off): x W0ᵀ + b."""
        return F.linear(x, self.base_weight_nk(), self.bias)

    def delta_weight(self) -> torch.Tensor:
        """s·β·B A as (out, in), float32 (float64 for a float64 base)."""
        cdt = torch.float64 if self.weight.dtype == torch.float64 else torch.float32
        return (self.lora_B.to(cdt) @ self.lora_A.to(cdt)) * (self.scaling * float(self.response_scale))

    # ------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.base_weight_nk(), self.bias
        if self.merged or not self.adapter_enabled:
            return self.base_forward(x)
        lora_A, lora_B = self.lora_A, self.lora_B
        device_type = x.device.type
        autocast = torch.is_autocast_enabled(device_type)
        dtype = torch.get_autocast_dtype(device_type) if autocast else self.compute_dtype
        if x.dtype != dtype and (autocast or x.dtype.is_floating_point):
            x = x.to(dtype)
        if autocast and isinstance(weight, torch.Tensor):  # a 4-bit base is dequantized by the op into x's dtype
            weight = weight.to(dtype)
        if bias is not None and bias.dtype != dtype:  # autocast, or a 4-bit base's bias kept in the model dtype
            bias = bias.to(dtype)
        if lora_A.dtype != dtype:  # fp32 adapters on a low-precision base (see class docstring)
            lora_A, lora_B = lora_A.to(dtype), lora_B.to(dtype)
        if self.tau is not None and self.tau.is_cuda and not torch.compiler.is_compiling() and \
                getattr(self.tau, "_pyflex_checked_version", None) != self.tau._version:
            # τ changed (an optimizer step): check every τ of the model in one host read instead of one per layer
            verify_taus(self.tau_peers or [self.tau])
        coef = None if self.gate is None else self.gate(x)
        scale = self.scaling * float(self.response_scale)
        valid = sink = None
        if self.tau is not None:
            valid = self._token_valid(x)
            sink = self._count_sink(x.device)
        with torch.autocast(device_type, enabled=False) if autocast else contextlib.nullcontext():
            # under torch.compile flex_lora runs as opaque custom ops, so a patched model compiles without breaks
            y, mask = flex_lora(x, weight, bias, lora_A, lora_B, scale, tau=self.tau, coef=coef, lam=self.lam,
                                dropout_p=self.dropout if self.training else 0.0, token_valid=valid,
                                count_sink=sink, return_mask=True)
        if self.tau is not None:
            self.last_mask = mask.detach()  # stays on device; last_sparsity reads it lazily
            self.last_token_valid = valid
        return y

    def _token_valid(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """(x.shape[:-1]) bool, False for padding tokens, from the model's token context; None when unknown."""
        ctx = self.token_context
        if ctx is None or x.dim() != 3:
            return None
        real = ctx.token_mask(x.shape[0], x.shape[1])
        return None if real is None else real.to(x.device)

    def _count_sink(self, device: torch.device) -> Optional[torch.Tensor]:
        """The count sink when this forward trains τ (it receives (Σ m_i, real tokens) in backward), else None."""
        if not (self.tau.requires_grad and torch.is_grad_enabled()):
            return None
        sink = self.tau_count_sink
        if not torch.compiler.is_compiling():
            if sink is None or sink.device != device:  # created at init; follows the module across .to(device)
                sink = self.tau_count_sink = tau_lambda.new_count_sink(device)
            elif sink.grad is not None and self.tau.grad is None:
                sink.grad = None  # zero_grad() ran without an optimizer step (e.g. a skipped GradScaler step)
            tau_lambda.track(self.tau, self)
        return sink

    # ------------------------------------------------------------------------------------------
    def _check_mergeable(self) -> None:
        if self.tau is not None:
            raise RuntimeError("cannot merge a FlexLinear with the PEFT_S τ mask on: the mask depends on each token, "
                               "so B A cannot be folded into W0")
        if self.gate is not None:
            raise RuntimeError("cannot merge a FlexLinear with a gate: the gate scales the delta per token/sample, "
                               "so B A cannot be folded into W0")

    @torch.no_grad()
    def merge(self) -> None:
        """W0 += s·β·B A in place (Conv1D: transposed). Forward then runs the base only. Refuses with τ or a gate."""
        self._check_mergeable()
        if self.merged:
            raise RuntimeError("this FlexLinear is already merged")
        delta = self.delta_weight()
        self.weight.copy_((self.weight.to(delta.dtype) + (delta.t() if self.conv1d else delta)).to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge` (W0 -= s·β·B A; exact up to rounding in the base dtype)."""
        if not self.merged:
            raise RuntimeError("this FlexLinear is not merged")
        delta = self.delta_weight()
        self.weight.copy_((self.weight.to(delta.dtype) - (delta.t() if self.conv1d else delta)).to(self.weight.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        parts = [f"in_features={self.in_features}", f"out_features={self.out_features}", f"bias={self.bias is not None}",
                 f"r={self.r}", f"alpha={self.alpha:g}", f"scaling={self.scaling:g}"]
        if self.rslora:
            parts.append("rslora=True")
        if self.dropout:
            parts.append(f"dropout={self.dropout:g}")
        if self.tau is not None:
            parts.append(f"tau=on(lam={self.lam:g})" if self.target_sparsity is None
                         else f"tau=on(target_sparsity={self.target_sparsity:g})")
        if self.response_scale != 1.0:
            parts.append(f"response_scale={self.response_scale:g}")
        if self.conv1d:
            parts.append("conv1d=True")
        if self.merged:
            parts.append("merged=True")
        if not self.adapter_enabled:
            parts.append("adapter_enabled=False")
        return ", ".join(parts)

