"""Saving and loading adapters: pyflex's own format, and PEFT LoRA import/export.

pyflex format (a directory):
    pyflex_adapter.safetensors   every adapter parameter (lora_A, lora_B, tau, gates, prefixes...), the parameters of
                                 the modules to save and the base biases that ``bias=`` trains, under their names in
                                 ``model.named_parameters()``, in their own dtype
    pyflex_config.json           the patch_model arguments (the exact list of patched modules, the resolved λ, the
                                 modules to save, rank/alpha patterns...), the configs patch_model was given
                                 (``patch.lora_config``: the peft.LoraConfig's fields, or null; ``patch.pyflex_config``:
                                 the PyflexConfig), each adapter module's settings, every layer's β and the plan
                                 (``model.pyflex_plan``, HLPT) if there is one

PEFT format (a directory, as ``PeftModel.save_pretrained`` writes it):
    adapter_config.json          LoraConfig fields (r, lora_alpha, target_modules, rank_pattern, alpha_pattern,
                                 use_rslora, lora_dropout, modules_to_save, ...; pyflex/integrations/peft_config.py)
    adapter_model.safetensors    ``base_model.model.<module>.lora_A.weight`` (r, in) / ``...lora_B.weight`` (out, r),
                                 and ``base_model.model.<module>.<param>`` for each module to save (PEFT writes them
                                 without its ``modules_to_save.default`` wrapper)

Loading is all or nothing: into a patched model the settings and then every tensor are checked before anything is
copied; an unpatched model is patched from the file only after a rehearsal on a weightless copy of it has checked
the file, so a load that fails leaves the model as it was.
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import os
import re
import warnings
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from pyflex.integrations.peft_config import lora_plan, peft_adapter_config, plan_mismatches
from pyflex.layers.linear import FlexLinear
from pyflex.model.config import DTYPE_NAMES, PyflexConfig
from pyflex.model.patch import _apply_plan, _unwrap, get_registry, is_patched, patch_model

__all__ = ["save_adapter", "load_adapter", "save_peft_adapter", "load_peft_adapter",
           "ADAPTER_FILE", "CONFIG_FILE", "PEFT_CONFIG_FILE", "PEFT_WEIGHTS_FILE"]

ADAPTER_FILE = "pyflex_adapter.safetensors"
CONFIG_FILE = "pyflex_config.json"
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# 2: modules_to_save, trained biases and the plan are saved; version-1 files load as having none of them.
# 3: rank_pattern / alpha_pattern and the given configs (lora_config, pyflex_config); older files have none.
FORMAT_VERSION = 3

# HLPTPlan fields that decide which adapters exist and what they compute (r and α are compared per module)
_PLAN_FIELDS = ("type", "variant", "lora_layers", "prefix_layers", "prefix_len", "gated", "gate_input", "gate_pooling")
# What an HLPT plan saved before these fields existed did (the official code's gate input, whole-sequence pooling).
_PLAN_LEGACY = {"gate_input": "down_proj_input", "gate_pooling": "sequence"}


def _safetensors():
    try:
        import safetensors.torch as st
    except ImportError as exc:  # pragma: no cover - safetensors ships with transformers
        raise ImportError("pyflex.integrations.adapter_files needs the `safetensors` package: pip install safetensors") from exc
    return st


def _check(params: Dict[str, nn.Parameter], tensors: Dict[str, torch.Tensor], source: str, *, cast: bool,
           file_key: Callable[[str], str] = lambda k: k) -> None:
    """Validate names, shapes (and dtypes unless ``cast``), naming the offending key as the file spells it (via
    ``file_key``)."""
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


def _weightless_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers are stride-0 CPU views of one zero of their dtype, with
    their shapes: the module tree at no memory cost, to rehearse a patch on. (Not the meta device: FlexLinear
    creates τ on the CPU and moves it, which meta tensors refuse.)"""
    memo = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        view = torch.zeros((), dtype=t.dtype).expand(t.shape)
        memo[id(t)] = nn.Parameter(view, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else view
    return copy.deepcopy(model, memo)


def _load(model: nn.Module, tensors: Dict[str, torch.Tensor], source: str, *, restore: Callable[[nn.Module], None],
          expected: Callable[[nn.Module], Dict[str, nn.Parameter]], cast: bool,
          file_key: Callable[[str], str] = lambda k: k) -> None:
    """Copy ``tensors`` into the parameters ``expected(model)`` names, after checking them all.

    An unpatched ``model`` is first patched by ``restore``, but only once ``restore`` has run on a weightless copy
    and the file has been checked against that copy: a file or setting that does not fit raises before the model
    is touched.
    """
    if is_patched(model):
        _check(expected(model), tensors, source, cast=cast, file_key=file_key)
    else:
        probe = _weightless_copy(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # patch_model's warnings are for the real model, patched next
            restore(probe)
        _check(expected(probe), tensors, source, cast=cast, file_key=file_key)
        restore(model)
    with torch.no_grad():
        for key, param in expected(model).items():
            param.copy_(tensors[key].to(device=param.device, dtype=param.dtype))


def _read_dir(path: str, config_name: str, weights_name: str):
    """(config dict, tensors) of an adapter directory; a missing, corrupt or truncated file is named."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"adapter path {path!r} is not a directory")
    config_path, weights_path = os.path.join(path, config_name), os.path.join(path, weights_name)
    for p in (config_path, weights_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{p!r} does not exist; an adapter directory holds {config_name} and {weights_name}")
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except ValueError as exc:  # json.JSONDecodeError and UnicodeDecodeError
        raise ValueError(f"{config_path!r} is not valid JSON ({exc}); the file is corrupt or truncated") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path!r} holds a JSON {type(config).__name__}, not an adapter config object")
    from safetensors import SafetensorError
    try:
        tensors = _safetensors().load_file(weights_path)
    except SafetensorError as exc:
        raise ValueError(f"{weights_path!r} is not a readable safetensors file ({exc}); the file is corrupt or "
                         "truncated") from None
    return config, tensors


# --------------------------------------------------------------------------------------------------
# pyflex format
# --------------------------------------------------------------------------------------------------
def _modules_to_save(model: nn.Module) -> List[str]:
    return list(get_registry(model).config.get("modules_to_save", ()))


def _saved_parameters(model: nn.Module) -> Dict[str, nn.Parameter]:
    """What a pyflex adapter file holds for the patched ``model``, by name in ``model.named_parameters()``: the
    registry's adapter parameters (LoRA, τ, gates, prefixes, modules to save) and the base biases ``bias=`` trains."""
    registry = get_registry(model)
    params = dict(registry.named_adapter_parameters())
    mode = registry.config.get("bias", "none")
    if mode != "none":
        lora_biases = {id(m.bias) for m in registry.adapter_modules().values()
                       if isinstance(m, FlexLinear) and m.bias is not None}
        for name, p in model.named_parameters():
            if mode == "all" and (name == "bias" or name.endswith(".bias")) or id(p) in lora_biases:
                params.setdefault(name, p)
    return params


def _module_settings(module: nn.Module) -> dict:
    """What save_adapter records about one adapter module (and load_adapter compares)."""
    if isinstance(module, FlexLinear):
        return dict(type="FlexLinear", r=module.r, alpha=module.alpha, rslora=module.rslora, dropout=module.dropout,
                    tau=module.tau is not None, lam=module.lam, target_sparsity=module.target_sparsity,
                    has_gate=module.gate is not None)
    return dict(type=type(module).__name__)


def _adapter_settings(model: nn.Module) -> Dict[str, dict]:
    """Qualified name → :func:`_module_settings` of every adapter module except the modules to save."""
    saved = set(_modules_to_save(model))
    return {name: _module_settings(m) for name, m in get_registry(model).adapter_modules().items() if name not in saved}


def _plan_record(model: nn.Module) -> Optional[dict]:
    """``model.pyflex_plan`` (what :func:`pyflex.apply_hlpt` did) as a JSON-able dict, or None."""
    plan = getattr(model, "pyflex_plan", None)
    return None if plan is None else dict(type=type(plan).__name__, **dataclasses.asdict(plan))


def save_adapter(model: nn.Module, path: str, *, state_dict: Optional[Dict[str, torch.Tensor]] = None) -> None:
    """Write every adapter parameter of the patched ``model`` (incl. τ, gates, prefixes), the modules to save, the
    base biases ``bias=`` trains and everything :func:`load_adapter` needs to rebuild the patch (patch_model's
    arguments, each module's settings, β per layer, the HLPT plan) to the directory ``path`` (created if needed).

    ``state_dict``: take the tensors from this full state dict of ``model`` instead of its live parameters (what
    ``save_pretrained(state_dict=...)`` gets from the HF Trainer when the parameters are sharded).
    """
    model = _unwrap(model)
    registry = get_registry(model)
    params = _saved_parameters(model)
    source = params if state_dict is None else state_dict
    missing = [n for n in params if n not in source]
    if missing:
        raise KeyError(f"state_dict has no {missing[0]!r}; pass the model's full state dict (or none)")
    tensors = {name: source[name].detach().to("cpu").contiguous().clone() for name in params}
    config = dict(format="pyflex-adapter", format_version=FORMAT_VERSION, patch=registry.config,
                  modules=_adapter_settings(model), plan=_plan_record(model),
                  response_scales=[h.response_scale for h in registry.layers])
    os.makedirs(path, exist_ok=True)
    _safetensors().save_file(tensors, os.path.join(path, ADAPTER_FILE), metadata={"format": "pt"})
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def _setting_mismatches(model: nn.Module, config: dict) -> List[str]:
    """'field: model X, file Y' for every setting of the patched ``model`` that differs from the saved ``config``.
    τ's initial value (tau0), adapter_dtype (checked per tensor) and recompute_mlp (same function) are not
    compared."""
    out = []
    mine, theirs = _adapter_settings(model), config["modules"]
    only_model, only_file = [n for n in mine if n not in theirs], [n for n in theirs if n not in mine]
    if only_model or only_file:
        out.append(f"adapted modules: {len(only_model)} only in the model {only_model[:2]}, {len(only_file)} only in "
                   f"the file {only_file[:2]}")
    differing: Dict[tuple, List[str]] = {}
    for name in (n for n in mine if n in theirs):
        for field in sorted(set(mine[name]) | set(theirs[name])):
            ours, saved = mine[name].get(field), theirs[name].get(field)
            if ours != saved:
                differing.setdefault((field, repr(ours), repr(saved)), []).append(name)
    for (field, ours, saved), names in differing.items():
        more = f" and {len(names) - 1} more" if len(names) > 1 else ""
        out.append(f"{field}: model {ours}, file {saved} ({names[0]!r}{more})")
    registry_config, patch = get_registry(model).config, config["patch"]
    for field, default in (("bias", "none"), ("modules_to_save", [])):
        ours, saved = registry_config.get(field, default), patch.get(field, default)
        if ours != saved:
            out.append(f"{field}: model {ours!r}, file {saved!r}")
    ours, saved = _plan_record(model), config.get("plan")
    if (ours is None) != (saved is None):
        out.append(f"plan: model {ours and ours['type']!r}, file {saved and saved['type']!r}")
    elif ours is not None:
        saved = {**_PLAN_LEGACY, **saved}
        out += [f"plan {field}: model {ours.get(field)!r}, file {saved.get(field)!r}"
                for field in _PLAN_FIELDS if ours.get(field) != saved.get(field)]
    return out


def _restore_patch(model: nn.Module, config: dict, path: str) -> None:
    """Patch the unpatched ``model`` the way the saved one was: patch_model with the saved arguments, or the saved
    plan (:func:`pyflex.apply_hlpt`) with them."""
    from pyflex.model.families import family_spec
    from pyflex.methods.hlpt import apply_hlpt

    patch, plan = config["patch"], config.get("plan")
    flex = [m for m in config["modules"].values() if m.get("type") == "FlexLinear"]
    others = [n for n, m in config["modules"].items() if m.get("type") != "FlexLinear" or m.get("has_gate")]
    if others and plan is None:
        raise ValueError(f"the adapter in {path!r} has gates or other plan adapters (e.g. {others[0]!r}) but records no "
                         "plan that load_adapter could replay; patch the model and apply the same plan first, then load")
    # r and α may differ per module (rank_pattern / alpha_pattern, replayed below); everything else is one value
    if len({json.dumps({k: v for k, v in m.items() if k not in ("has_gate", "r", "alpha")}, sort_keys=True)
            for m in flex}) > 1:
        raise ValueError(f"the adapter in {path!r} mixes FlexLinear settings (rsLoRA/dropout/τ differ between "
                         "modules); patch the model the same way first, then call load_adapter")
    dtype_name = patch.get("adapter_dtype")
    kwargs = dict(rslora=patch["rslora"], dropout=patch["dropout"], tau=patch["tau"], tau0=patch["tau0"],
                  bias=patch.get("bias", "none"), adapter_dtype=None if dtype_name is None else DTYPE_NAMES[dtype_name],
                  recompute_mlp=patch.get("recompute_mlp"), modules_to_save=patch.get("modules_to_save") or None)
    if patch["tau"]:
        if patch.get("target_sparsity") is not None:
            kwargs["target_sparsity"] = patch["target_sparsity"]
        else:
            kwargs["lam"] = patch["lam"]
    if plan is None:
        patch_model(model, r=patch["r"], alpha=patch["alpha"], target_modules=list(patch["target_modules"]),
                    layers_path=patch.get("layers_path") if family_spec(model) is None else None,
                    rank_pattern=patch.get("rank_pattern") or None, alpha_pattern=patch.get("alpha_pattern") or None,
                    **kwargs)
    elif plan.get("type") == "HLPTPlan":
        apply_hlpt(model, variant=plan["variant"], counts=(len(plan["lora_layers"]), len(plan["prefix_layers"])),
                   prefix_len=plan["prefix_len"], r=plan["r"], alpha=plan["alpha"], gated=plan["gated"],
                   gate_input=plan.get("gate_input", _PLAN_LEGACY["gate_input"]),
                   gate_pooling=plan.get("gate_pooling", _PLAN_LEGACY["gate_pooling"]), **kwargs)
    else:
        raise ValueError(f"the adapter in {path!r} records a plan of type {plan.get('type')!r}; load_adapter can replay "
                         "HLPTPlan only. Apply that plan to the model first, then load")
    registry = get_registry(model)
    for record in ("lora_config", "pyflex_config"):  # the configs the saved model was given, not the replay's keywords
        if record in patch:
            registry.config[record] = patch[record]
    mismatches = _setting_mismatches(model, config)
    if mismatches:
        raise ValueError(f"the adapter in {path!r} does not replay: patching from its saved settings gives "
                         + "; ".join(mismatches) + ". The file's settings are inconsistent (edited by hand?)")


def load_adapter(model: nn.Module, path: str) -> nn.Module:
    """Load an adapter written by :func:`save_adapter` into ``model`` and return it.

    An unpatched model is patched from the file: patch_model with the saved arguments (r, α, rsLoRA, dropout, τ, λ,
    τ₀, bias mode, the exact module list, recompute_mlp, modules_to_save), or the saved HLPT plan with them; then
    every layer's β is set. A patched model must have been patched the same way: r, α, rsLoRA, dropout, τ on/off,
    λ, gates, the adapted modules, the bias mode, the modules to save and the plan are compared and every difference
    is named with both values. Tensor names, shapes and dtypes are validated (the first offending key is named).
    A load that fails leaves the model as it was.
    """
    config, tensors = _read_dir(path, CONFIG_FILE, ADAPTER_FILE)
    config_path = os.path.join(path, CONFIG_FILE)
    if config.get("format") != "pyflex-adapter":
        raise ValueError(f"{config_path!r} is not a pyflex adapter config (format={config.get('format')!r}); for a "
                         "PEFT adapter use pyflex.load_peft_adapter")
    version = config.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise ValueError(f"{config_path!r} has format_version={version!r}; this pyflex reads versions 1 to "
                         f"{FORMAT_VERSION}")
    missing = [k for k in ("patch", "modules") if not isinstance(config.get(k), dict)]
    if missing:
        raise ValueError(f"{config_path!r} has no {missing[0]!r} object; the file is corrupt or truncated")
    inner = _unwrap(model)
    if is_patched(inner):
        mismatches = _setting_mismatches(inner, config)
        if mismatches:
            raise ValueError(f"the adapter in {path!r} was saved with other settings than the patched model has: "
                             + "; ".join(mismatches) + ". Patch the model with the saved settings, or load into an "
                             "unpatched model (load_adapter then patches it from the file)")
    _load(inner, tensors, f"adapter {os.path.join(path, ADAPTER_FILE)!r}",
          restore=lambda m: _restore_patch(m, config, path), expected=_saved_parameters, cast=False)
    registry = get_registry(inner)
    scales = config.get("response_scales")
    if scales and len(scales) == registry.num_layers:
        for handle, beta in zip(registry.layers, scales):
            handle.response_scale = beta
    return model


# --------------------------------------------------------------------------------------------------
# PEFT
# --------------------------------------------------------------------------------------------------
def _peft_key(name: str) -> str:
    """PEFT's file key of a pyflex parameter name: 'X.lora_A' → 'base_model.model.X.lora_A.weight'; a module to
    save's 'score.weight' → 'base_model.model.score.weight'."""
    return f"{PEFT_PREFIX}{name}.weight" if name.endswith((".lora_A", ".lora_B")) else f"{PEFT_PREFIX}{name}"


def _peft_key_to_name(key: str) -> str:
    """The inverse of :func:`_peft_key`; LoRA keys may also carry the adapter name ('X.lora_A.default.weight')."""
    name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
    match = re.fullmatch(r"(.+)\.(lora_[AB])(?:\.[^.]+)?\.weight", name)
    return f"{match.group(1)}.{match.group(2)}" if match else name


def _peft_parameters(model: nn.Module) -> Dict[str, nn.Parameter]:
    """The parameters a PEFT LoRA directory holds for the patched ``model``: every lora_A / lora_B and the modules to
    save's parameters. Anything else (τ, gates, prefixes, trained biases) has no place in it: an error."""
    saved = tuple(m + "." for m in _modules_to_save(model))
    params = _saved_parameters(model)
    others = [n for n in params if not n.endswith((".lora_A", ".lora_B")) and not n.startswith(saved)]
    if others:
        raise ValueError(f"the model has adapter parameters a PEFT LoRA adapter cannot hold (e.g. {others[0]!r}); PEFT "
                         "import/export needs a plain LoRA patch (plus modules_to_save)")
    return params


def load_peft_adapter(model: nn.Module, path: str) -> nn.Module:
    """Load a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors) into ``model``.

    The config goes through the same rules as ``patch_model(model, peft.LoraConfig(...))`` (pyflex/model/config.py):
    the modules PEFT would adapt (target_modules incl. "all-linear" and regexes, exclude_modules,
    layers_to_transform / layers_pattern, modules_to_save, task_type's heads), each module's r and α
    (rank_pattern / alpha_pattern), use_rslora and lora_dropout; a field pyflex does not implement (DoRA, LoRA
    biases, ...) is an error naming it. ``inference_mode`` (PEFT writes True into every saved config) is not applied:
    the loaded adapter trains. An unpatched model is patched that way; an already patched model must be exactly that
    patch (modules, r, α, rsLoRA, modules to save; every difference is named). Every PEFT key must map to a pyflex
    parameter (a LoRA weight or a parameter of a module to save) and vice versa, with the same shape (the first
    offending key is named). Weights are cast to the parameter dtype, as PEFT does on load. A load that fails leaves
    the model as it was.
    """
    config, tensors = _read_dir(path, PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE)
    source = f"PEFT config {os.path.join(path, PEFT_CONFIG_FILE)!r}"
    if config.get("bias", "none") not in (None, "none"):
        raise ValueError(f"{source} bias={config['bias']!r} is not supported: pyflex does not load the base biases a "
                         "PEFT adapter trained; only bias='none' adapters load")
    inner = _unwrap(model)
    if is_patched(inner):
        mismatches = plan_mismatches(inner, lora_plan(inner, config, source=source, apply_inference_mode=False))
        if mismatches:
            raise ValueError(f"the PEFT adapter in {path!r} is another patch than the model has: "
                             + "; ".join(mismatches) + ". Load it into an unpatched model (it is then patched from "
                             "the file), or patch the model the same way first")

    def restore(m: nn.Module) -> None:
        _apply_plan(m, lora_plan(m, config, source=source, apply_inference_mode=False), PyflexConfig())

    mapped = {_peft_key_to_name(key): tensor for key, tensor in tensors.items()}
    original = {_peft_key_to_name(key): key for key in tensors}
    _load(inner, mapped, f"PEFT adapter {os.path.join(path, PEFT_WEIGHTS_FILE)!r}", restore=restore,
          expected=_peft_parameters, cast=True, file_key=lambda name: original.get(name, _peft_key(name)))
    return model


def save_peft_adapter(model: nn.Module, path: str) -> None:
    """Write the patched model's LoRA adapter (and its modules to save) as a PEFT directory that
    ``peft.PeftModel.from_pretrained(base, path)`` loads (base = the same architecture, unpatched) to the same logits.

    adapter_config.json holds the LoraConfig the model was patched from, as given, when there is one (so
    "all-linear", regexes, layers_to_transform, task_type, rank_pattern / alpha_pattern... round-trip), else fields
    derived from the patch (per-module r / α as rank_pattern / alpha_pattern); either way it is checked to select
    exactly the patched modules with their r and α under PEFT's rules (pyflex/integrations/peft_config.py).
    Refused (clear error) when τ is on, a gate or another non-LoRA adapter is present, β ≠ 1, base biases train, or
    modules differ in rsLoRA / dropout.
    """
    inner = _unwrap(model)
    config = peft_adapter_config(inner)
    tensors = {_peft_key(name): p.detach().to("cpu").contiguous().clone() for name, p in _peft_parameters(inner).items()}
    os.makedirs(path, exist_ok=True)
    _safetensors().save_file(tensors, os.path.join(path, PEFT_WEIGHTS_FILE), metadata={"format": "pt"})
    with open(os.path.join(path, PEFT_CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
