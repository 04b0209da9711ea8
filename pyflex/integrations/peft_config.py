"""PEFT configs both ways: a ``peft.LoraConfig`` (or an ``adapter_config.json``) into pyflex, a patched model back out.

Into pyflex: ``pyflex.patch_model(model, lora_config)`` takes a LoraConfig as it is; the rules that turn it into a
patch (PEFT's module selection, rank/alpha patterns, the table of supported fields) live with patching, in
:mod:`pyflex.model.config`, because patch_model is below this layer. :func:`lora_plan` re-exports them here for
adapter files, which hand an ``adapter_config.json`` dict through the same rules.

Out of pyflex: :func:`peft_adapter_config` gives the ``adapter_config.json`` of a patched model, with every field that
decides what PEFT adapts (target_modules, r, lora_alpha, rank_pattern, alpha_pattern, use_rslora, lora_dropout,
modules_to_save, ...). When the model was patched from a LoraConfig, that config is written as it was given, so
its fields (``"all-linear"``, regexes, layers_to_transform, task_type, ...) round-trip; otherwise the fields are
derived from the patched modules. Either way the result is checked by running PEFT's rules on it: it must select
exactly the patched modules with their r and α, else it is an error, never a file that loads differently.
:func:`to_lora_config` builds the ``peft.LoraConfig`` (peft is imported only there).
"""
from __future__ import annotations

import collections
import re
import warnings
from typing import Any, Dict, List

from torch import nn

from pyflex.layers.linear import FlexLinear
from pyflex.model.config import LoraPlan, lora_plan_from_config
from pyflex.model.patch import _unwrap, get_registry

__all__ = ["lora_plan", "peft_adapter_config", "to_lora_config", "plan_mismatches"]

# fields of a recorded LoraConfig that do not belong in an adapter_config.json (runtime-only in PEFT)
_NOT_SAVED = ("runtime_config",)


def lora_plan(model: nn.Module, config, *, source: str = "LoraConfig", apply_inference_mode: bool = True) -> LoraPlan:
    """What ``get_peft_model(model, config)`` adapts, for a ``peft.LoraConfig`` or an ``adapter_config.json`` dict
    (see :func:`pyflex.model.config.lora_plan_from_config`)."""
    return lora_plan_from_config(model, config, source=source, apply_inference_mode=apply_inference_mode)


def _lora_modules(model: nn.Module) -> Dict[str, FlexLinear]:
    registry = get_registry(model)
    saved = set(registry.config.get("modules_to_save") or ())
    return {n: m for n, m in registry.adapter_modules().items() if n not in saved and isinstance(m, FlexLinear)}


def plan_mismatches(model: nn.Module, plan: LoraPlan) -> List[str]:
    """How the patched ``model`` differs from ``plan`` ('what: model X, config Y'), [] when it is that patch."""
    out = []
    modules = _lora_modules(model)
    only_model = [n for n in modules if n not in plan.ranks]
    only_plan = [n for n in plan.targets if n not in modules]
    if only_model or only_plan:
        out.append(f"adapted modules: {len(only_model)} only in the model {only_model[:2]}, {len(only_plan)} only in the "
                   f"config {only_plan[:2]}")
    for name, module in modules.items():
        if name in plan.ranks:
            ours = (module.r, module.alpha, module.rslora)
            theirs = (plan.ranks[name], plan.alphas[name], plan.rslora)
            if ours != theirs:
                out.append(f"{name}: the model is patched with r={ours[0]}, alpha={ours[1]:g}, rslora={ours[2]}, the "
                           f"config has r={theirs[0]}, alpha={theirs[1]:g}, rslora={theirs[2]}")
                break
    ours = list(get_registry(model).config.get("modules_to_save") or [])
    if ours != list(plan.modules_to_save or []):
        out.append(f"modules_to_save: the model is patched with {ours}, the config has {list(plan.modules_to_save or [])}")
    return out


def _reproduces(model: nn.Module, config: Dict[str, Any], dropout: float) -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plan = lora_plan_from_config(model, config, apply_inference_mode=False)
    except (ValueError, TypeError):
        return False
    return not plan_mismatches(model, plan) and plan.dropout == dropout


def _leaf_or_regex_targets(model: nn.Module, names: List[str]):
    """target_modules selecting exactly ``names`` by PEFT's list rule (their leaf names) when that selects nothing
    else, else a regex that fully matches exactly their qualified names."""
    leaves = sorted({n.rpartition(".")[2] for n in names})
    selected = [n for n, m in model.named_modules() if n.rpartition(".")[2] in leaves]
    if sorted(selected) == sorted(names):
        return leaves
    return _exact_regex(names)


def _exact_regex(names: List[str]) -> str:
    return "(?:" + "|".join(re.escape(n) for n in names) + ")"


def _most_common(values):
    return collections.Counter(values).most_common(1)[0][0]


def peft_adapter_config(model: nn.Module) -> Dict[str, Any]:
    """The ``adapter_config.json`` (as a dict) under which PEFT adapts exactly the LoRA modules of the patched
    ``model`` with their r and α. Raises ValueError when the patch has something a PEFT LoRA cannot hold (τ, gates,
    β ≠ 1, merged layers, trained base biases, modules differing in rsLoRA or dropout)."""
    inner = _unwrap(model)
    registry = get_registry(inner)
    saved = list(registry.config.get("modules_to_save") or ())
    adapters = {n: m for n, m in registry.adapter_modules().items() if n not in saved}
    for name, module in adapters.items():
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
        raise ValueError(f"cannot export to PEFT: bias={registry.config['bias']!r} trains base biases, which pyflex's "
                         "PEFT export does not write")
    modules = _lora_modules(inner)
    if not modules:
        raise ValueError("cannot export to PEFT: the model has no LoRA module")
    shared = {(m.rslora, m.dropout) for m in modules.values()}
    if len(shared) != 1:
        raise ValueError(f"cannot export to PEFT: modules differ in (rslora, dropout): {sorted(shared)}; a PEFT LoRA "
                         "config has one value of each")
    rslora, dropout = shared.pop()
    names = list(modules)

    candidates = []
    recorded = registry.config.get("lora_config")
    if recorded:  # patched from a LoraConfig: write it as given
        candidates.append({**{k: v for k, v in recorded.items() if k not in _NOT_SAVED}, "inference_mode": True})
    common = dict(peft_type="LORA", task_type=None, use_rslora=rslora, lora_dropout=dropout, bias="none",
                  modules_to_save=saved or None, init_lora_weights=True, inference_mode=True, layers_to_transform=None,
                  layers_pattern=None, use_dora=False, exclude_modules=None,
                  fan_in_fan_out=any(m.conv1d for m in modules.values()),
                  base_model_name_or_path=getattr(getattr(inner, "config", None), "_name_or_path", None) or None)
    r = registry.config.get("r", _most_common(m.r for m in modules.values()))
    alpha = registry.config.get("alpha", _most_common(m.alpha for m in modules.values()))
    # patched with keywords: the given patterns if they reproduce the patch, else one exact-name key per module that
    # differs from the most common r / α
    candidates.append(dict(common, r=r, lora_alpha=alpha, target_modules=_leaf_or_regex_targets(inner, names),
                           rank_pattern=dict(registry.config.get("rank_pattern") or {}),
                           alpha_pattern=dict(registry.config.get("alpha_pattern") or {})))
    base_r = _most_common(m.r for m in modules.values())
    base_alpha = _most_common(m.alpha for m in modules.values())
    for targets in (_leaf_or_regex_targets(inner, names), _exact_regex(names)):
        candidates.append(dict(common, r=base_r, lora_alpha=base_alpha, target_modules=targets,
                               rank_pattern={re.escape(n): m.r for n, m in modules.items() if m.r != base_r},
                               alpha_pattern={re.escape(n): m.alpha for n, m in modules.items()
                                              if m.alpha != base_alpha}))
    for candidate in candidates:
        if _reproduces(inner, candidate, dropout):
            return candidate
    raise ValueError("cannot export to PEFT: no adapter_config.json selects exactly the patched modules with their r "
                     "and alpha under PEFT's rules")  # pragma: no cover - the exact-name candidate always does


def to_lora_config(model: nn.Module):
    """A ``peft.LoraConfig`` under which ``peft.get_peft_model`` adapts exactly the LoRA modules of the patched
    ``model`` (:func:`peft_adapter_config`, inference_mode off). Imports peft."""
    import dataclasses

    import peft

    config = dict(peft_adapter_config(model), inference_mode=False)
    known = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    unknown = sorted(k for k in config if k not in known)
    if unknown:
        raise ValueError(f"the recorded LoraConfig field {unknown[0]!r} is unknown to the installed peft "
                         f"{peft.__version__}")
    config.pop("peft_type", None)
    return peft.LoraConfig(**config)
