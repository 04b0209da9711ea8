"""pyflex: kernel-accelerated parameter-efficient fine-tuning for Hugging Face models."""
from .ops import BACKENDS, cpp_available, current_backend_name, flex_lora, resolve_backend, sparsity, use_backend
from .tau import make_tau, tau_param_groups, tau_values

__version__ = "0.1.0"

__all__ = [
    "BACKENDS", "cpp_available", "current_backend_name", "flex_lora", "make_tau", "resolve_backend",
    "sparsity", "tau_param_groups", "tau_values", "use_backend",
]

from .layers import FlexLinear
from .patch import get_registry, merge, patch_model, unpatch

__all__ += ["FlexLinear", "get_registry", "merge", "patch_model", "unpatch"]

from .io import load_adapter, load_peft_adapter, save_adapter, save_peft_adapter

__all__ += ["load_adapter", "load_peft_adapter", "save_adapter", "save_peft_adapter"]

from .plans import HLPT_LR, HLPTPlan, apply_hlpt, hlpt_layer_counts
from .prefix import GatedPrefix, PooledGate
from .schedules import ImportanceSchedule, LayerSchedule, LiftSchedule, lift_sequence

__all__ += ["GatedPrefix", "HLPT_LR", "HLPTPlan", "ImportanceSchedule", "LayerSchedule", "LiftSchedule", "PooledGate",
            "apply_hlpt", "hlpt_layer_counts", "lift_sequence"]

try:  # the Trainer callback needs transformers (a dependency of every model pyflex patches)
    from .callbacks import PyflexCallback
    __all__ += ["PyflexCallback"]
except ImportError:  # pragma: no cover
    pass

from .handles import LayerHandle, LayerRegistry

__all__ += ["LayerHandle", "LayerRegistry"]

from .fused_ops import fuse_model_ops, fused_ops  # liger-kernel is imported only when fuse_model_ops is called

__all__ += ["fuse_model_ops", "fused_ops"]
