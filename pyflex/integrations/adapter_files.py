"""Saving and loading adapters: pyflex's own format, and PEFT LoRA import/export.

pyflex format (a directory):
    pyflex_adapter.safetensors   every adapter parameter (lora_A, lora_B, tau, gates, prefixes...), the parameters of
                                 the modules to save and the base biases that ``bias=`` trains, under their names in
                                 ``model.named_parameters()``, in their own dtype
    pyflex_config.json           the patch_model arguments (the exact list of patched modules, the resolved λ, the
                                 modules to save...), each adapter module's settings, every layer's β and the plan
                                 (``model.pyflex_plan``, HLPT) if there is one

PEFT format (a directory, as ``PeftModel.save_pretrained`` writes it):
    adapter_config.json          LoraConfig fields (r, lora_alpha, target_modules, use_rslora, lora_dropout,
                                 modules_to_save, ...)
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

from pyflex.layers.linear import FlexLinear, is_linear_like
from pyflex.model.patch import _name_matches, _resolve_modules_to_save, _unwrap, get_registry, is_patched, patch_model

__all__ = ["save_adapter", "load_adapter", "save_peft_adapter", "load_peft_adapter",
           "ADAPTER_FILE", "CONFIG_FILE", "PEFT_CONFIG_FILE", "PEFT_WEIGHTS_FILE"]

ADAPTER_FILE = "pyflex_adapter.safetensors"
CONFIG_FILE = "pyflex_config.json"
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# 2: modules_to_save, trained biases and the plan are saved; version-1 files load as having none of them.
FORMAT_VERSION = 2

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}
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
                    tau=module.tau is not None, lam=module.lam, has_gate=module.gate is not None)
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
    if len({json.dumps({k: v for k, v in m.items() if k != "has_gate"}, sort_keys=True) for m in flex}) > 1:
        raise ValueError(f"the adapter in {path!r} mixes FlexLinear settings (r/alpha/τ differ between modules); patch "
                         "the model the same way first, then call load_adapter")
    dtype_name = patch.get("adapter_dtype")
    kwargs = dict(rslora=patch["rslora"], dropout=patch["dropout"], tau=patch["tau"], tau0=patch["tau0"],
                  bias=patch.get("bias", "none"), adapter_dtype=None if dtype_name is None else _DTYPES[dtype_name],
                  recompute_mlp=patch.get("recompute_mlp"), modules_to_save=patch.get("modules_to_save") or None)
    if patch["tau"]:
        kwargs["lam"] = patch["lam"]
    if plan is None:
        patch_model(model, r=patch["r"], alpha=patch["alpha"], target_modules=list(patch["target_modules"]),
                    layers_path=patch.get("layers_path") if family_spec(model) is None else None, **kwargs)
    elif plan.get("type") == "HLPTPlan":
        apply_hlpt(model, variant=plan["variant"], counts=(len(plan["lora_layers"]), len(plan["prefix_layers"])),
                   prefix_len=plan["prefix_len"], r=plan["r"], alpha=plan["alpha"], gated=plan["gated"],
                   gate_input=plan.get("gate_input", _PLAN_LEGACY["gate_input"]),
                   gate_pooling=plan.get("gate_pooling", _PLAN_LEGACY["gate_pooling"]), **kwargs)
    else:
        raise ValueError(f"the adapter in {path!r} records a plan of type {plan.get('type')!r}; load_adapter can replay "
                         "HLPTPlan only. Apply that plan to the model first, then load")


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
_PEFT_UNSUPPORTED = {
    "use_dora": lambda v: bool(v),
    "rank_pattern": lambda v: bool(v),
    "alpha_pattern": lambda v: bool(v),
    "exclude_modules": lambda v: bool(v),
    "layer_replication": lambda v: bool(v),
    "lora_bias": lambda v: bool(v),
    "target_parameters": lambda v: bool(v),
    "bias": lambda v: v not in (None, "none"),
}


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


def _peft_modules_to_save(model: nn.Module, entries) -> Optional[List[str]]:
    """The PEFT config's modules_to_save entries that name a module of ``model``. PEFT skips the others (e.g. the
    'classifier' that task_type='SEQ_CLS' adds on a model whose head is 'score'), and so does pyflex."""
    if not entries:
        return None
    names = [n for n, _ in model.named_modules() if n]
    kept = [e for e in dict.fromkeys(entries) if any(_name_matches(n, e) for n in names)]
    return kept or None


def load_peft_adapter(model: nn.Module, path: str) -> nn.Module:
    """Load a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors) into ``model``.

    An unpatched model is patched per the PEFT config (r, lora_alpha, target_modules, use_rslora, lora_dropout,
    layers_to_transform, modules_to_save); an already patched model must match r, α, rsLoRA and the modules to save.
    Every PEFT key must map to a pyflex parameter (a LoRA weight or a parameter of a module to save) and vice versa,
    with the same shape (the first offending key is named). Weights are cast to the parameter dtype, as PEFT does on
    load. DoRA, rank/alpha patterns, LoRA biases and other PEFT features pyflex does not implement are refused.
    A load that fails leaves the model as it was.
    """
    config, tensors = _read_dir(path, PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE)
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"peft_type={config.get('peft_type')!r} is not supported; only LORA adapters can be loaded")
    for key, unsupported in _PEFT_UNSUPPORTED.items():
        if key in config and unsupported(config[key]):
            raise ValueError(f"PEFT config {key}={config[key]!r} is not supported by pyflex")
    r, alpha, rslora = int(config["r"]), float(config["lora_alpha"]), bool(config.get("use_rslora", False))
    inner = _unwrap(model)
    to_save = _peft_modules_to_save(inner, config.get("modules_to_save"))
    if is_patched(inner):
        for name, module in get_registry(inner).adapter_modules().items():
            if isinstance(module, FlexLinear) and (module.r != r or module.alpha != alpha or module.rslora != rslora):
                raise ValueError(f"{name}: the model is patched with r={module.r}, alpha={module.alpha:g}, "
                                 f"rslora={module.rslora}, the PEFT adapter has r={r}, alpha={alpha:g}, rslora={rslora}")
        ours, theirs = _modules_to_save(inner), _resolve_modules_to_save(inner, to_save, [])
        if ours != theirs:
            raise ValueError(f"modules_to_save: the model is patched with {ours}, the PEFT adapter has {theirs}")

    def restore(m: nn.Module) -> None:
        targets = config.get("target_modules")
        if targets is None:
            raise ValueError("PEFT config has target_modules=None; pyflex needs the module list (or a regex)")
        patch_model(m, r=r, alpha=alpha, rslora=rslora, dropout=float(config.get("lora_dropout", 0.0) or 0.0),
                    target_modules=targets if isinstance(targets, str) else list(targets),
                    layers=config.get("layers_to_transform"), modules_to_save=to_save)

    mapped = {_peft_key_to_name(key): tensor for key, tensor in tensors.items()}
    original = {_peft_key_to_name(key): key for key in tensors}
    _load(inner, mapped, f"PEFT adapter {os.path.join(path, PEFT_WEIGHTS_FILE)!r}", restore=restore,
          expected=_peft_parameters, cast=True, file_key=lambda name: original.get(name, _peft_key(name)))
    return model


def save_peft_adapter(model: nn.Module, path: str) -> None:
    """Write the patched model's LoRA adapter (and its modules to save) as a PEFT directory that
    ``peft.PeftModel.from_pretrained(base, path)`` loads (base = the same architecture, unpatched).

    Refused (clear error) when τ is on, a gate or another non-LoRA adapter is present, β ≠ 1, base biases train, or
    modules differ in r/α/rsLoRA/dropout (PEFT would need rank/alpha patterns).
    """
    inner = _unwrap(model)
    registry = get_registry(inner)
    saved = _modules_to_save(inner)
    modules = {n: m for n, m in registry.adapter_modules().items() if n not in saved}
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
    config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": getattr(
            getattr(inner, "config", None), "_name_or_path", None) or None,
        "r": r, "lora_alpha": alpha, "use_rslora": rslora, "lora_dropout": dropout, "bias": "none",
        "target_modules": _peft_targets(inner, list(modules)), "fan_in_fan_out": any(m.conv1d for m in modules.values()),
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": saved or None,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "use_dora": False,
    }
    tensors = {_peft_key(name): p.detach().to("cpu").contiguous().clone() for name, p in _peft_parameters(inner).items()}
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
