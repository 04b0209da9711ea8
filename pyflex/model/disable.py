"""`disable_adapters(model)`: run a patched model as exactly its base model for a while.

    with pyflex.disable_adapters(model):
        ref_logits = model(**batch).logits      # the base model's logits: no LoRA, no τ mask, no HLPT gate or prefix

Every adapter module the registry holds has an ``adapter_enabled`` switch (FlexLinear: its forward is then the base
``F.linear`` alone; HLPT's gated prefix adds nothing to attention; HLPT's pooled gates are not computed). The
context turns every switch in every adapter module's subtree off and, on exit — an exception included — puts each one
back to the value it had, so contexts nest. Nothing else changes: no parameter is touched, so an optimizer built
before keeps working, and since no adapter takes part in a disabled forward, no adapter receives a gradient from it.

What cannot be the base model is refused, before anything is switched (a ValueError naming what is in the way):
the modules to save and the base biases ``bias=`` trains are trained in place (there is no untouched copy to switch
back to), a merged FlexLinear holds its delta inside W0, an adapter module without a switch cannot be turned off,
and a model whose registry has no adapter at all (LIFT's full mode trains the blocks' own weights) has nothing to
turn off.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List, Tuple

from torch import nn

from pyflex.model.patch import _unwrap, get_registry

__all__ = ["disable_adapters", "adapter_switches", "SWITCH_ATTR"]

# The boolean attribute every adapter module (and its gates) exposes: FlexLinear, GatedPrefix, PooledGate.
SWITCH_ATTR = "adapter_enabled"


def adapter_switches(model: nn.Module) -> List[nn.Module]:
    """The modules whose ``adapter_enabled`` switch :func:`disable_adapters` turns off, after checking that the
    patched ``model`` without its adapters is its base model (see the module docstring for what is refused)."""
    inner = _unwrap(model)
    registry = get_registry(inner)
    config = registry.config
    saved = list(config.get("modules_to_save") or ())
    if saved:
        raise ValueError(f"disable_adapters: modules_to_save={saved} train in place, so the base model's values of "
                         "these modules no longer exist and the model without adapters is not the base model; "
                         "patch without modules_to_save to use a disabled-adapter reference")
    bias = config.get("bias", "none")
    if bias != "none":
        raise ValueError(f"disable_adapters: the model was patched with bias={bias!r}, whose biases train in place, "
                         "so the model without adapters is not the base model; patch with bias='none' to use a "
                         "disabled-adapter reference")
    modules = registry.adapter_modules()
    if not modules:
        raise ValueError("disable_adapters: the model has no adapter module to switch off (a registry without "
                         "adapters, e.g. LiftSchedule(target='full'), trains the blocks' own weights)")
    switches: List[nn.Module] = []
    for name, module in modules.items():
        if not hasattr(module, SWITCH_ATTR):
            raise ValueError(f"disable_adapters: adapter {name!r} is a {type(module).__name__}, which has no "
                             f"{SWITCH_ATTR!r} switch, so it cannot be turned off")
        if getattr(module, "merged", False):
            raise ValueError(f"disable_adapters: {name!r} is merged (its LoRA delta is inside the base weight); "
                             "unmerge it first")
        for sub in module.modules():
            if hasattr(sub, SWITCH_ATTR) and not any(sub is s for s in switches):
                switches.append(sub)
    return switches


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Within the context, ``model`` (patched by pyflex; a DDP/accelerate wrapper is fine) computes its base model:
    LoRA deltas, τ masks, HLPT gates and prefixes are off and receive no gradient. Restores every switch on exit,
    exceptions included. Yields ``model``. Raises ValueError (before switching anything) for a model whose base
    cannot be recovered this way (modules to save, trained biases, merged layers; module docstring)."""
    switches = adapter_switches(model)
    previous: List[Tuple[nn.Module, bool]] = [(m, getattr(m, SWITCH_ATTR)) for m in switches]
    try:
        for module in switches:
            setattr(module, SWITCH_ATTR, False)
        yield model
    finally:
        for module, value in previous:
            setattr(module, SWITCH_ATTR, value)
