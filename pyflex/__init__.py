"""pyflex: kernel-accelerated parameter-efficient fine-tuning for Hugging Face models.

Layers, lowest first (docs/architecture.md): kernels (pyflex.kernels) → the op (pyflex.lora) → modules
(pyflex.layers) → model patching (pyflex.model) → methods (pyflex.methods) → integrations (pyflex.integrations) →
the demo (pyflex.demo). Nothing lower imports anything higher.

``import pyflex`` loads nothing but this file: each public name imports its module on first use (PEP 562), so a
script that only patches a model never loads the Trainer, peft, accelerate, liger, matplotlib or torch's compiler.
"""
import importlib as _importlib
import os as _os
import sys as _sys

if _os.environ.get("PYFLEX_BACKEND", "").strip().lower() == "triton" and "TRITON_INTERPRET" not in _os.environ \
        and "triton" not in _sys.modules:
    # Triton on CPU tensors runs in its interpreter, which must be on before triton is first imported: switch it on
    # now when no GPU can run the compiled kernels.
    import torch as _torch
    if not _torch.cuda.is_available():
        _os.environ["TRITON_INTERPRET"] = "1"

__version__ = "0.1.0"

# public name → the module that defines it
_PUBLIC = {
    "pyflex.lora.backends": ("BACKENDS", "cpp_available", "current_backend_name", "resolve_backend", "use_backend"),
    "pyflex.lora.autograd": ("flex_lora", "sparsity"),
    "pyflex.lora.tau": ("make_tau",),
    "pyflex.layers.linear": ("FlexLinear",),
    "pyflex.layers.quantized": ("QuantizedFlexLinear", "UnsupportedQuantizedWeight"),
    "pyflex.lora.nf4": ("NF4Weight",),
    "pyflex.model.registry": ("LayerHandle", "LayerRegistry"),
    "pyflex.model.patch": ("get_registry", "merge", "patch_model", "unpatch"),
    "pyflex.model.config": ("PyflexConfig",),
    "pyflex.model.params": ("TrainableParameters", "print_trainable_parameters", "trainable_parameters"),
    "pyflex.model.optim": ("clip_grad_norm_", "tau_param_groups", "tau_parameters", "tau_values"),
    "pyflex.model.disable": ("disable_adapters",),
    "pyflex.methods.prefix": ("GatedPrefix", "PooledGate"),
    "pyflex.methods.hlpt": ("HLPT_LR", "HLPTPlan", "apply_hlpt", "hlpt_layer_counts"),
    "pyflex.methods.schedule": ("LayerSchedule",),
    "pyflex.methods.ist": ("ImportanceBatches", "ImportanceSchedule"),
    "pyflex.methods.lift": ("LiftSchedule", "lift_sequence"),
    "pyflex.integrations.adapter_files": ("load_adapter", "load_peft_adapter", "save_adapter", "save_peft_adapter"),
    "pyflex.integrations.trainer": ("PyflexCallback", "Trainer"),
    "pyflex.integrations.trl": ("DPOTrainer", "SFTTrainer"),
    "pyflex.integrations.liger": ("fuse_model_ops", "fused_ops"),
}
_WHERE = {name: module for module, names in _PUBLIC.items() for name in names}
_SUBPACKAGES = ("compat", "demo", "integrations", "kernels", "layers", "lora", "memory", "methods", "model")

__all__ = [name for names in _PUBLIC.values() for name in names]


def __getattr__(name):
    if name in _WHERE:
        value = getattr(_importlib.import_module(_WHERE[name]), name)
        globals()[name] = value          # later lookups skip this function
        return value
    if name in _SUBPACKAGES:
        return _importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'pyflex' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__) | set(_SUBPACKAGES))
