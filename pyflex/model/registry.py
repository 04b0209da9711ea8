"""Layer handles: the only interface plans and schedules use (docs/architecture.md, "Adding a method").

After :func:`pyflex.patch_model` the model carries a :class:`LayerRegistry` (``pyflex.get_registry(model)``), one
:class:`LayerHandle` per decoder/encoder layer, ordered by index.

Freezing never removes a parameter from an optimizer: a frozen parameter has ``requires_grad=False`` and
``grad=None``, so AdamW skips it, and it trains again as soon as it is switched back on.

Layers below the lowest trainable one run without autograd (pyflex/model/frozen_prefix.py; switch with
``registry.skip_frozen_prefix``).
"""
from __future__ import annotations

import operator
from typing import Dict, Iterable, Iterator, List, Optional

import torch
from torch import nn

from pyflex.model.frozen_prefix import FrozenPrefixSkip

__all__ = ["LayerHandle", "LayerRegistry", "REGISTRY_ATTR", "attach_block_registry"]

REGISTRY_ATTR = "_pyflex_registry"


def _unique(params: Iterable[nn.Parameter]) -> List[nn.Parameter]:
    seen, out = set(), []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _module_adapter_parameters(module: nn.Module) -> List[nn.Parameter]:
    # FlexLinear owns the base weight too; only its adapter parameters count.
    getter = getattr(module, "adapter_parameters", None)
    return list(getter()) if callable(getter) else list(module.parameters())


class LayerHandle:
    """One decoder/encoder layer: its index, its block, its adapters, a trainable switch and a response scale β.

    adapters: qualified module name (from the top model) → adapter module (FlexLinear, gates, prefixes, ...).
    """

    def __init__(self, index: int, block: nn.Module, name: str = ""):
        self.index = int(index)
        self.block = block
        self.name = name
        self.adapters: Dict[str, nn.Module] = {}
        self._response_scale = 1.0

    def __repr__(self) -> str:
        return (f"LayerHandle(index={self.index}, name={self.name!r}, adapters={list(self.adapters)}, "
                f"trainable={self.trainable}, response_scale={self._response_scale:g})")

    def add_adapter(self, name: str, module: nn.Module) -> None:
        """Register another adapter module of this layer (a gate, a prefix...). Create it before the optimizer.
        It takes the layer's current β if it has a ``response_scale`` attribute."""
        if not isinstance(module, nn.Module):
            raise TypeError(f"adapter {name!r} must be an nn.Module, got {type(module).__name__}")
        if name in self.adapters and self.adapters[name] is not module:
            raise ValueError(f"layer {self.index} already has an adapter named {name!r}")
        self.adapters[name] = module
        if hasattr(module, "response_scale"):
            module.response_scale = self._response_scale

    def parameters(self) -> List[nn.Parameter]:
        """The adapter parameters of this layer (lora_A, lora_B, tau, gates, prefixes), trainable or not."""
        return _unique(p for module in self.adapters.values() for p in _module_adapter_parameters(module))

    def named_parameters(self) -> Iterator:
        for mod_name, module in self.adapters.items():
            for p_name, p in module.named_parameters():
                if any(p is q for q in _module_adapter_parameters(module)):
                    yield f"{mod_name}.{p_name}", p

    @property
    def trainable(self) -> bool:
        """True when any adapter parameter of this layer, or any parameter of its block, requires grad."""
        return any(p.requires_grad for p in self.parameters()) or any(p.requires_grad for p in self.block.parameters())

    def set_trainable(self, flag: bool, *, full_block: bool = False) -> None:
        """Switch this layer's adapter parameters on/off (``requires_grad_`` and, when off, ``grad = None``).

        full_block=True switches every parameter of the block too (the base weights: LIFT's full mode).
        With full_block=False the block's base parameters are left as they are.
        """
        flag = bool(flag)
        params = self.parameters()
        if full_block:
            params = _unique(params + list(self.block.parameters()))
        for p in params:
            p.requires_grad_(flag)
            if not flag:
                p.grad = None

    @property
    def response_scale(self) -> float:
        """β: multiplies the adapter output of every adapter of this layer (IST's response suppression)."""
        return self._response_scale

    @response_scale.setter
    def response_scale(self, value: float) -> None:
        value = float(value)
        if not value >= 0.0:
            raise ValueError(f"response_scale={value} is not allowed; β must be >= 0")
        self._response_scale = value
        for module in self.adapters.values():
            if hasattr(module, "response_scale"):
                module.response_scale = value


class LayerRegistry:
    """The model's layers, in order. ``registry[i]`` is layer i's :class:`LayerHandle`.

    Attributes:
        layers: list of LayerHandle, ordered by index.
        skip_frozen_prefix: run the layers below :meth:`lowest_trainable` without autograd (default True).
        extra_adapters: adapters outside every layer (qualified name → module), e.g. an explicitly targeted head.
        config: the arguments patch_model was called with (read by pyflex.integrations.adapter_files).
        spec: the models.FamilySpec of the model, or None.
    """

    def __init__(self, model: nn.Module, blocks: List[nn.Module], block_names: List[str], spec=None,
                 layers_path: str = ""):
        self.model = model
        self.layers: List[LayerHandle] = [LayerHandle(i, b, n) for i, (b, n) in enumerate(zip(blocks, block_names))]
        self.skip_frozen_prefix = True
        self.extra_adapters: Dict[str, nn.Module] = {}
        self.config: dict = {}
        self.spec = spec
        self.layers_path = layers_path
        self.frozen_prefix = FrozenPrefixSkip(self)

    def __setstate__(self, state):
        self.__dict__.update(state)
        # copy.deepcopy of the model copies each τ Parameter without its marker attribute (pickling keeps it);
        # mark the copies again so pyflex's τ handling (param groups, clipping, the optimizer check) still sees them
        for module in self.adapter_modules().values():
            tau = getattr(module, "tau", None)
            if isinstance(tau, nn.Parameter):
                tau._pyflex_tau = True

    # -- container ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, index: int) -> LayerHandle:
        return self.layers[index]

    def __iter__(self) -> Iterator[LayerHandle]:
        return iter(self.layers)

    def __repr__(self) -> str:
        return (f"LayerRegistry(num_layers={self.num_layers}, trainable={self.trainable_indices()}, "
                f"skip_frozen_prefix={self.skip_frozen_prefix})")

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    # -- switches --------------------------------------------------------------------------------
    def trainable_indices(self) -> List[int]:
        return [h.index for h in self.layers if h.trainable]

    def lowest_trainable(self) -> Optional[int]:
        for handle in self.layers:
            if handle.trainable:
                return handle.index
        return None

    def _check_indices(self, indices: Iterable[int]) -> List[int]:
        out = []
        for i in indices:
            try:
                if isinstance(i, bool):
                    raise TypeError
                i = operator.index(i)  # int, numpy integer, 0-dim integer tensor
            except TypeError:
                raise TypeError(f"layer index {i!r} must be an int") from None
            if not 0 <= i < self.num_layers:
                raise IndexError(f"layer index {i} is out of range; the model has {self.num_layers} layers "
                                 f"(0..{self.num_layers - 1})")
            out.append(i)
        return out

    def set_active(self, indices: Iterable[int], *, full_block: bool = False) -> None:
        """Make exactly the layers in ``indices`` trainable and freeze all others (see LayerHandle.set_trainable)."""
        active = set(self._check_indices(indices))
        for handle in self.layers:
            if handle.index not in active:
                handle.set_trainable(False, full_block=full_block)
        for handle in self.layers:
            if handle.index in active:
                handle.set_trainable(True, full_block=full_block)

    def adapter_parameters(self) -> List[nn.Parameter]:
        """Every adapter parameter of the model (all layers + extra adapters), trainable or not."""
        params = [p for h in self.layers for p in h.parameters()]
        params += [p for m in self.extra_adapters.values() for p in _module_adapter_parameters(m)]
        return _unique(params)

    def named_adapter_parameters(self) -> Dict[str, nn.Parameter]:
        """Qualified name (as in ``model.named_parameters()``) → adapter parameter, in model order."""
        wanted = {id(p) for p in self.adapter_parameters()}
        named = {n: p for n, p in self.model.named_parameters(remove_duplicate=True) if id(p) in wanted}
        if len(named) < len(wanted):  # an adapter module kept outside the model tree: name it by its registry name
            found = {id(p) for p in named.values()}
            for mod_name, module in self.adapter_modules().items():
                for p_name, p in module.named_parameters():
                    if id(p) in wanted and id(p) not in found:
                        named[f"{mod_name}.{p_name}"] = p
                        found.add(id(p))
        return named

    def adapter_modules(self) -> Dict[str, nn.Module]:
        """Qualified name → adapter module, over all layers and the extra adapters."""
        out: Dict[str, nn.Module] = {}
        for handle in self.layers:
            out.update(handle.adapters)
        out.update(self.extra_adapters)
        return out

    def tau_sparsity(self) -> Dict[int, Optional[float]]:
        """PEFT_S eq. 23 per layer index: the mean sparsity of the layer's τ-masked FlexLinears in their last forward,
        over real tokens (padding left out, as in ``FlexLinear.last_sparsity``); None for a layer without one (or
        before the first forward). All masks are read with one host sync."""
        counts, fractions = [], []
        for handle in self.layers:
            masked = [m for m in handle.adapters.values() if getattr(m, "last_mask", None) is not None]
            counts.append(len(masked))
            fractions += [_masked_fraction(m.last_mask, getattr(m, "last_token_valid", None)) for m in masked]
        values = torch.stack([f.to(fractions[0].device) for f in fractions]).tolist() if fractions else []
        out: Dict[int, Optional[float]] = {}
        start = 0
        for handle, count in zip(self.layers, counts):
            out[handle.index] = sum(values[start:start + count]) / count if count else None
            start += count
        return out

    def set_response_scale(self, value: float) -> None:
        for handle in self.layers:
            handle.response_scale = value


def _masked_fraction(mask: torch.Tensor, valid: Optional[torch.Tensor]) -> torch.Tensor:
    """1 − mean(mask) over real tokens, as a 0-dim fp32 tensor on mask's device (no sync); 0 for no tokens."""
    if valid is not None:
        mask = mask[valid]
    return 1.0 - mask.float().mean() if mask.numel() else mask.new_zeros((), dtype=torch.float32)


def attach_block_registry(model: nn.Module, layers_path: Optional[str] = None) -> LayerRegistry:
    """Give an unpatched model a layer registry without adapters and return it (LIFT's full-block mode, which trains
    the blocks' own weights and needs no LoRA). The model's modules stay as they are; every parameter is frozen
    (a schedule switches blocks on), the frozen-prefix skip applies, and :func:`pyflex.unpatch` removes the registry
    and restores each parameter's ``requires_grad``.

    Args:
        layers_path: dotted path of the layer ModuleList, for families outside pyflex.model.families.
    """
    from pyflex.model.families import resolve_layers

    if getattr(model, REGISTRY_ATTR, None) is not None:
        raise RuntimeError(f"{type(model).__name__} already has a pyflex layer registry; use "
                           "pyflex.get_registry(model)")
    layer_list, spec = resolve_layers(model, layers_path)
    names_by_id = {id(m): n for n, m in model.named_modules()}
    block_names = [names_by_id[id(b)] for b in layer_list]
    registry = LayerRegistry(model, list(layer_list), block_names, spec=spec,
                             layers_path=layers_path or (block_names[0].rpartition(".")[0] if block_names else ""))
    registry._orig_requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
        p.grad = None
    registry.frozen_prefix.attach()
    object.__setattr__(model, REGISTRY_ATTR, registry)
    return registry
