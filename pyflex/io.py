"""Saving and loading adapters: pyflex's own format, and PEFT LoRA import/export.

pyflex format (a directory):
    pyflex_adapter.safetensors   every adapter parameter (lora_A, lora_B, tau, gates, prefixes...) under its name in
                                 ``model.named_parameters()``, in its own dtype
    pyflex_config.json           the patch_model arguments (incl. the exact list of patched modules)

PEFT format (a directory, as ``PeftModel.save_pretrained`` writes it):
    adapter_config.json          LoraConfig fields (r, lora_alpha, target_modules, use_rslora, lora_dropout, ...)
    adapter_model.safetensors    ``base_model.model.<module>.lora_A.weight`` (r, in) / ``...lora_B.weight`` (out, r)
"""
from __future__ import annotations

import json
import os
import re
from typing import Dict, Optional

import torch
from torch import nn

from .layers import FlexLinear, is_linear_like
from .patch import _unwrap, get_registry, is_patched, patch_model

__all__ = ["save_adapter", "load_adapter", "save_peft_adapter", "load_peft_adapter",
           "ADAPTER_FILE", "CONFIG_FILE", "PEFT_CONFIG_FILE", "PEFT_WEIGHTS_FILE"]

ADAPTER_FILE = "pyflex_adapter.safetensors"
CONFIG_FILE = "pyflex_config.json"
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
FORMAT_VERSION = 1

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


def _safetensors():
    try:
        import safetensors.torch as st
    except ImportError as exc:  # pragma: no cover - safetensors ships with transformers
        raise ImportError("pyflex.io needs the `safetensors` package: pip install safetensors") from exc
    return st


def _check_and_copy(params: Dict[str, nn.Parameter], tensors: Dict[str, torch.Tensor], source: str, *,
                    cast: bool, file_key=lambda k: k) -> None:
    """Validate names, shapes (and dtypes unless ``cast``), naming the offending key (as the file spells it,
    via ``file_key``), then copy in place. Nothing is copied unless everything validates."""
    missing = [file_key(k) for k in params if k not in tensors]
    extra = [file_key(k) for k in tensors if k not in params]
    if missing:
        raise KeyError(f"{source}: missing key {missing[0]!r} (the model has this adapter parameter, the file does not)"
                       + (f"; {len(missing) - 1} more missing" if len(missing) > 1 else ""))
    if extra:
        raise KeyError(f"{source}: unexpected key {extra[0]!r} (the file has it, the model has no such adapter "
                       "parameter)" + (f"; {len(extra) - 1} more unexpected" if len(extra) > 1 else ""))
    for key, param in params.items():
        t = tensors[key]
        if tuple(t.shape) != tuple(param.shape):
            raise ValueError(f"{source}: key {file_key(key)!r} has shape {tuple(t.shape)}, the model expects "
                             f"{tuple(param.shape)}")
        if not cast and t.dtype != param.dtype:
            raise TypeError(f"{source}: key {file_key(key)!r} has dtype {t.dtype}, the model expects {param.dtype}")
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(tensors[key].to(device=param.device, dtype=param.dtype))


# --------------------------------------------------------------------------------------------------
# pyflex format
# --------------------------------------------------------------------------------------------------
def save_adapter(model: nn.Module, path: str) -> None:
    """Write every adapter parameter of the patched ``model`` (incl. τ, gates, prefixes) and its patch config to
    the directory ``path`` (created if needed)."""
    model = _unwrap(model)
    registry = get_registry(model)
    named = registry.named_adapter_parameters()
    tensors = {name: p.detach().to("cpu").contiguous().clone() for name, p in named.items()}
    modules = {}
    for name, module in registry.adapter_modules().items():
        if isinstance(module, FlexLinear):
            modules[name] = dict(type="FlexLinear", r=module.r, alpha=module.alpha, rslora=module.rslora,
                                 dropout=module.dropout, tau=module.tau is not None, lam=module.lam,
                                 has_gate=module.gate is not None)
        else:
            modules[name] = dict(type=type(module).__name__)
    config = dict(format="pyflex-adapter", format_version=FORMAT_VERSION, patch=registry.config, modules=modules,
                  response_scales=[h.response_scale for h in registry.layers])
    os.makedirs(path, exist_ok=True)
    _safetensors().save_file(tensors, os.path.join(path, ADAPTER_FILE), metadata={"format": "pt"})
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def _read_dir(path: str, config_name: str, weights_name: str):
    if not os.path.isdir(path):
        raise FileNotFoundError(f"adapter path {path!r} is not a directory")
    config_path, weights_path = os.path.join(path, config_name), os.path.join(path, weights_name)
    for p in (config_path, weights_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{p!r} does not exist; an adapter directory holds {config_name} and {weights_name}")
    with open(config_path) as f:
        config = json.load(f)
    tensors = _safetensors().load_file(weights_path)
    return config, tensors


def load_adapter(model: nn.Module, path: str) -> nn.Module:
    """Load an adapter written by :func:`save_adapter` into ``model`` and return it.

    An unpatched model is first patched with the saved config (the exact module list). A patched model must
    already have exactly the saved adapter parameters: names, shapes and dtypes are validated and the first
    offending key is named. Adapters that plans add (gates, prefixes) must be created before loading.
    """
    config, tensors = _read_dir(path, CONFIG_FILE, ADAPTER_FILE)
    if config.get("format") != "pyflex-adapter":
        raise ValueError(f"{os.path.join(path, CONFIG_FILE)!r} is not a pyflex adapter config (format="
                         f"{config.get('format')!r}); for a PEFT adapter use pyflex.load_peft_adapter")
    inner = _unwrap(model)
    if not is_patched(inner):
        plan_modules = [n for n, m in config["modules"].items() if m.get("type") != "FlexLinear" or m.get("has_gate")]
        if plan_modules:
            raise ValueError(f"the adapter in {path!r} has gates or other plan adapters (e.g. {plan_modules[0]!r}) that "
                             "load_adapter cannot create; patch the model and apply the same plan first, then load")
        patch = dict(config["patch"])
        dtype_name = patch.get("adapter_dtype")
        kinds = {json.dumps({k: v for k, v in m.items() if k != "has_gate"}, sort_keys=True)
                 for m in config["modules"].values() if m.get("type") == "FlexLinear"}
        if len(kinds) > 1:
            raise ValueError("the saved adapter mixes FlexLinear settings (r/alpha/τ differ between modules); patch the "
                             "model the same way first, then call load_adapter")
        patch_model(inner, r=patch["r"], alpha=patch["alpha"], rslora=patch["rslora"], dropout=patch["dropout"],
                    target_modules=list(patch["target_modules"]), tau=patch["tau"], lam=patch["lam"],
                    tau0=patch["tau0"], bias=patch.get("bias", "none"),
                    adapter_dtype=None if dtype_name is None else _DTYPES[dtype_name],
                    layers_path=patch.get("layers_path") if _needs_layers_path(inner) else None,
                    recompute_mlp=patch.get("recompute_mlp"))
    registry = get_registry(inner)
    _check_and_copy(registry.named_adapter_parameters(), tensors, f"adapter {path!r}", cast=False)
    scales = config.get("response_scales")
    if scales and len(scales) == registry.num_layers:
        for handle, beta in zip(registry.layers, scales):
            handle.response_scale = beta
    return model


def _needs_layers_path(model: nn.Module) -> bool:
    from .models import family_spec
    return family_spec(model) is None


# --------------------------------------------------------------------------------------------------
# PEFT
# --------------------------------------------------------------------------------------------------
_PEFT_UNSUPPORTED = {
    "use_dora": lambda v: bool(v),
    "rank_pattern": lambda v: bool(v),
    "alpha_pattern": lambda v: bool(v),
    "modules_to_save": lambda v: bool(v),
    "exclude_modules": lambda v: bool(v),
    "layer_replication": lambda v: bool(v),
    "lora_bias": lambda v: bool(v),
    "target_parameters": lambda v: bool(v),
    "bias": lambda v: v not in (None, "none"),
}


def _peft_key_to_name(key: str) -> Optional[str]:
    """'base_model.model.X.lora_A.weight' (or 'X.lora_A.default.weight') → 'X.lora_A'; None if not a LoRA key."""
    name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
    match = re.fullmatch(r"(.+)\.(lora_[AB])(?:\.[^.]+)?\.weight", name)
    return f"{match.group(1)}.{match.group(2)}" if match else None


def load_peft_adapter(model: nn.Module, path: str) -> nn.Module:
    """Load a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors) into ``model``.

    An unpatched model is patched per the PEFT config (r, lora_alpha, target_modules, use_rslora, lora_dropout,
    layers_to_transform); an already patched model must match r, α and rsLoRA. Every PEFT key must map to a pyflex
    adapter parameter and vice versa, with the same shape (the first offending key is named). Weights are cast to
    the adapter dtype, as PEFT does on load. DoRA, rank/alpha patterns, modules_to_save, LoRA biases and other
    PEFT features pyflex does not implement are refused.
    """
    config, tensors = _read_dir(path, PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE)
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"peft_type={config.get('peft_type')!r} is not supported; only LORA adapters can be loaded")
    for key, unsupported in _PEFT_UNSUPPORTED.items():
        if key in config and unsupported(config[key]):
            raise ValueError(f"PEFT config {key}={config[key]!r} is not supported by pyflex")
    r, alpha, rslora = int(config["r"]), float(config["lora_alpha"]), bool(config.get("use_rslora", False))
    inner = _unwrap(model)
    if not is_patched(inner):
        targets = config.get("target_modules")
        if targets is None:
            raise ValueError("PEFT config has target_modules=None; pyflex needs the module list (or a regex)")
        layers = config.get("layers_to_transform")
        patch_model(inner, r=r, alpha=alpha, rslora=rslora, dropout=float(config.get("lora_dropout", 0.0) or 0.0),
                    target_modules=targets if isinstance(targets, str) else list(targets), layers=layers)
    registry = get_registry(inner)
    for name, module in registry.adapter_modules().items():
        if isinstance(module, FlexLinear) and (module.r != r or module.alpha != alpha or module.rslora != rslora):
            raise ValueError(f"{name}: the model is patched with r={module.r}, alpha={module.alpha:g}, "
                             f"rslora={module.rslora}, the PEFT adapter has r={r}, alpha={alpha:g}, rslora={rslora}")
    mapped: Dict[str, torch.Tensor] = {}
    original: Dict[str, str] = {}
    for key, tensor in tensors.items():
        name = _peft_key_to_name(key)
        if name is None:
            raise KeyError(f"PEFT adapter {path!r}: key {key!r} is not a LoRA weight (lora_A/lora_B); pyflex cannot load it")
        mapped[name], original[name] = tensor, key
    params = {n: p for n, p in registry.named_adapter_parameters().items() if n.endswith((".lora_A", ".lora_B"))}
    if len(params) != len(registry.named_adapter_parameters()):
        others = [n for n in registry.named_adapter_parameters() if n not in params]
        raise ValueError(f"the model has adapter parameters PEFT LoRA cannot hold (e.g. {others[0]!r}); "
                         "load_peft_adapter needs a plain LoRA patch")
    _check_and_copy(params, mapped, f"PEFT adapter {path!r}", cast=True,
                    file_key=lambda name: original.get(name, f"{PEFT_PREFIX}{name}.weight"))
    return model


def save_peft_adapter(model: nn.Module, path: str) -> None:
    """Write the patched model's LoRA adapter as a PEFT directory that ``peft.PeftModel.from_pretrained(base, path)``
    loads (base = the same architecture, unpatched).

    Refused (clear error) when τ is on, a gate or another non-LoRA adapter is present, β ≠ 1, or modules differ in
    r/α/rsLoRA/dropout (PEFT would need rank/alpha patterns).
    """
    inner = _unwrap(model)
    registry = get_registry(inner)
    modules = registry.adapter_modules()
    for name, module in modules.items():
        if not isinstance(module, FlexLinear):
            raise ValueError(f"cannot export to PEFT: adapter {name!r} is a {type(module).__name__}, not LoRA")
        if module.tau is not None:
            raise ValueError(f"cannot export to PEFT: {name!r} has the PEFT_S τ mask on, which PEFT LoRA does not have")
        if module.gate is not None:
            raise ValueError(f"cannot export to PEFT: {name!r} has a gate, which PEFT LoRA does not have")
        if module.response_scale != 1.0:
            raise ValueError(f"cannot export to PEFT: {name!r} has response_scale={module.response_scale:g} (must be 1)")
        if module.merged:
            raise ValueError(f"cannot export to PEFT: {name!r} is merged")
    if registry.config.get("bias", "none") != "none":
        raise ValueError(f"cannot export to PEFT: bias={registry.config['bias']!r} trains base biases, which a PEFT LoRA "
                         "adapter directory does not hold")
    settings = {(m.r, m.alpha, m.rslora, m.dropout) for m in modules.values()}
    if len(settings) != 1:
        raise ValueError(f"cannot export to PEFT: modules differ in (r, alpha, rslora, dropout): {sorted(settings)}")
    r, alpha, rslora, dropout = settings.pop()
    names = list(modules)
    config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": getattr(
            getattr(inner, "config", None), "_name_or_path", None) or None,
        "r": r, "lora_alpha": alpha, "use_rslora": rslora, "lora_dropout": dropout, "bias": "none",
        "target_modules": _peft_targets(inner, names), "fan_in_fan_out": any(m.conv1d for m in modules.values()),
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None, "layers_to_transform": None,
        "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "use_dora": False,
    }
    tensors = {}
    for name, module in modules.items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = module.lora_A.detach().to("cpu").contiguous().clone()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = module.lora_B.detach().to("cpu").contiguous().clone()
    os.makedirs(path, exist_ok=True)
    _safetensors().save_file(tensors, os.path.join(path, PEFT_WEIGHTS_FILE), metadata={"format": "pt"})
    with open(os.path.join(path, PEFT_CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def _peft_targets(model: nn.Module, names):
    """PEFT target_modules: the list of leaf names when it selects exactly the patched modules (PEFT's suffix rule),
    else a regex that fully matches exactly their qualified names."""
    leaves = sorted({n.rpartition(".")[2] for n in names})
    selected = [n for n, m in model.named_modules()
                if n.rpartition(".")[2] in leaves and (isinstance(m, FlexLinear) or is_linear_like(m))]
    if sorted(selected) == sorted(names):
        return leaves
    return "(?:" + "|".join(re.escape(n) for n in names) + ")"
