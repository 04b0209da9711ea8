"""pyflex: kernel-accelerated parameter-efficient fine-tuning for Hugging Face models.

Layers, lowest first: the op (ops, reference, tau) → FlexLinear (layers) and the memory-light gated MLP
(gated_mlp) → patching (patch, models, handles, io) → plans (HLPT, prefix) and schedules (IST, LIFT) → the Trainer
callback. fused_ops wraps liger-kernel, imported only when it is called; memory measures tensor bytes on any device
(the demo and bench/profile_model.py use it).
"""
import os as _os
import sys as _sys

if _os.environ.get("PYFLEX_BACKEND", "").strip().lower() == "triton" and "TRITON_INTERPRET" not in _os.environ \
        and "triton" not in _sys.modules:
    # Triton on CPU tensors runs in its interpreter, which must be on before triton is first imported (torch
    # imports it with torch._dynamo, below): switch it on now when no GPU can run the compiled kernels.
    import torch as _torch
    if not _torch.cuda.is_available():
        _os.environ["TRITON_INTERPRET"] = "1"

from .ops import BACKENDS, cpp_available, current_backend_name, flex_lora, resolve_backend, sparsity, use_backend
from .tau import clip_grad_norm_, make_tau, tau_param_groups, tau_parameters, tau_values
from .layers import FlexLinear
from .handles import LayerHandle, LayerRegistry
from .patch import get_registry, merge, patch_model, unpatch
from .io import load_adapter, load_peft_adapter, save_adapter, save_peft_adapter
from .prefix import GatedPrefix, PooledGate
from .plans import HLPT_LR, HLPTPlan, apply_hlpt, hlpt_layer_counts
from .schedules import ImportanceBatches, ImportanceSchedule, LayerSchedule, LiftSchedule, lift_sequence
from .callbacks import PyflexCallback
from .fused_ops import fuse_model_ops, fused_ops

__version__ = "0.1.0"

__all__ = [
    "BACKENDS", "cpp_available", "current_backend_name", "flex_lora", "resolve_backend", "sparsity", "use_backend",
    "clip_grad_norm_", "make_tau", "tau_param_groups", "tau_parameters", "tau_values",
    "FlexLinear", "LayerHandle", "LayerRegistry", "get_registry", "merge", "patch_model", "unpatch",
    "load_adapter", "load_peft_adapter", "save_adapter", "save_peft_adapter",
    "GatedPrefix", "PooledGate", "HLPT_LR", "HLPTPlan", "apply_hlpt", "hlpt_layer_counts",
    "ImportanceBatches", "ImportanceSchedule", "LayerSchedule", "LiftSchedule", "lift_sequence",
    "PyflexCallback", "fuse_model_ops", "fused_ops",
]
