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
