"""The schedule API shared by IST and LIFT.

A schedule decides, before each training step, which layers of the model's layer registry train:

    schedule = ImportanceSchedule(model)            # or LiftSchedule(model, total_steps=...)
    optimizer = torch.optim.AdamW(schedule.trainable_parameters(), lr=...)   # or any list that holds them
    schedule.attach_optimizer(optimizer)            # optional: checks it (LIFT's full mode finds it by itself)
    for batch in loader:
        schedule.step(batch)                        # before the forward
        loss = model(**batch).loss; loss.backward(); optimizer.step(); optimizer.zero_grad()

Rules (docs/architecture.md, "Adding a method"):
* Every parameter a schedule may ever train is set ``requires_grad=True`` when the schedule is built, so an
  optimizer built afterwards — including the HF Trainer's, which keeps only ``requires_grad`` parameters —
  holds all of them. Freezing starts at the first :meth:`LayerSchedule.step`, and only through
  ``requires_grad_(False)`` + ``grad = None``: AdamW skips parameters without a gradient, so nothing is ever
  removed from the optimizer.
* Schedules act on layer handles only (trainable switch, response scale), never on kernels.
* ``state_dict()`` holds the step position, the private ``torch.Generator`` state and the method's scores, so a
  resumed run continues the exact same sequence.
"""
from __future__ import annotations

import math
import weakref
from typing import Any, Dict, Iterable, List, Optional, Sequence

import torch
from torch import nn


# registry → weakref to the schedule that drives it (kept outside the registry so models still pickle)
_OWNERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def resolve_registry(model_or_registry):
    """The :class:`pyflex.model.registry.LayerRegistry` of a patched model (or the registry itself)."""
    if hasattr(model_or_registry, "layers") and hasattr(model_or_registry, "set_active"):
        return model_or_registry
    from pyflex.model.patch import get_registry
    return get_registry(model_or_registry)


def _handle_params(handle, full_block: bool) -> List[nn.Parameter]:
    """Adapter parameters of a handle, plus every parameter of its block when ``full_block``."""
    params: Dict[int, nn.Parameter] = {}
    for p in handle.parameters():
        params[id(p)] = p
    if full_block:
        for p in handle.block.parameters():
            params[id(p)] = p
    return list(params.values())


def resolve_count(value, total: int, arg: str, rounding: str = "half_up") -> int:
    """A layer count given as a fraction in (0, 1] of ``total`` or an int in [1, total].

    A fraction becomes ``value·total`` rounded half up (``rounding="half_up"``: IST's Table 8 lists 30 layers →
    N_u = 8 for 25 %) or truncated (``rounding="floor"``: ``int(total·value)``, as IST's official code does),
    then clamped to at least 1.
    """
    if rounding not in ("half_up", "floor"):
        raise ValueError(f"rounding={rounding!r} is not supported; allowed: half_up, floor")
    if isinstance(value, bool):
        raise TypeError(f"{arg}={value!r} must be a fraction in (0, 1] or an int count")
    if isinstance(value, int):
        if not 1 <= value <= total:
            raise ValueError(f"{arg}={value} is not allowed; a layer count must be in [1, {total}]")
        return value
    if isinstance(value, float):
        if not 0.0 < value <= 1.0:
            raise ValueError(f"{arg}={value} is not allowed; a fraction must be in (0, 1]")
        # the 1e-9 keeps products such as 0.3·10 = 3.0000000000000004 or 0.7·10 = 6.999999999999999 on their integer
        exact = value * total + (0.5 if rounding == "half_up" else 0.0)
        return max(1, min(total, math.floor(exact + 1e-9)))
    raise TypeError(f"{arg}={value!r} must be a fraction in (0, 1] (float) or an int count")


class LayerSchedule:
    """Base class: holds the registry, the candidate layers, the step position and a private RNG.

    Args:
        model: a patched model (or its LayerRegistry).
        layers: registry indices the schedule chooses among. Default: every layer that has adapters.
        seed: seed of the schedule's private ``torch.Generator`` (the global RNG is never touched).
        full_block: the trainable unit is the whole block (base weights included), not only its adapters.
    """

    full_block = False

    def __init__(self, model, *, layers: Optional[Sequence[int]] = None, seed: int = 0, full_block: bool = False):
        self.model = model if isinstance(model, nn.Module) else None
        self.registry = resolve_registry(model)
        n = len(self.registry)
        if layers is None:
            layers = [h.index for h in self.registry.layers if len(list(h.parameters())) > 0]
            if not layers:
                raise ValueError("the model's layer registry has no layer with adapters; patch the model (or apply a "
                                 "plan) before building a schedule")
        layers = sorted({int(i) for i in layers})
        bad = [i for i in layers if not 0 <= i < n]
        if bad:
            raise ValueError(f"layers={bad} are out of range; the registry has layers 0..{n - 1}")
        self.layers: List[int] = layers
        self.full_block = bool(full_block)
        self.seed = int(seed)
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(self.seed)
        self.step_count = 0
        self._active: List[int] = []
        self.optimizers: list = []
        # One schedule drives a model at a time: the newest one owns the registry, and an older one that is still
        # stepped raises instead of fighting over the trainable switches.
        _OWNERS[self.registry] = weakref.ref(self)
        self._arm()

    # -- parameters -------------------------------------------------------------------------------
    def _params_of(self, index: int) -> List[nn.Parameter]:
        return _handle_params(self.registry[index], self.full_block)

    def trainable_parameters(self) -> List[nn.Parameter]:
        """Every parameter this schedule may train (build the optimizer on a list that contains them): the scheduled
        layers' and, always on, the adapters outside every layer (``modules_to_save`` heads, a targeted lm_head)."""
        seen: Dict[int, nn.Parameter] = {}
        for i in self.layers:
            for p in self._params_of(i):
                seen[id(p)] = p
        for module in self.registry.extra_adapters.values():
            for p in module.parameters():
                if p.requires_grad:
                    seen[id(p)] = p
        return list(seen.values())

    def _arm(self) -> None:
        """Make every schedulable parameter visible to an optimizer built next (requires_grad=True)."""
        for p in self.trainable_parameters():
            if p.dtype.is_floating_point:
                p.requires_grad_(True)

    def attach_optimizer(self, optimizer, *more) -> None:
        """Give the schedule the optimizer(s) that train its parameters: it checks that every schedulable parameter
        is in one of them (a parameter missing from the optimizer would silently never train) and lets LIFT free
        per-block state. Wrappers with an ``.optimizer`` (accelerate's AcceleratedOptimizer) are unwrapped."""
        inners = [getattr(opt, "optimizer", opt) for opt in (optimizer,) + more]
        in_opt = {id(p) for inner in inners for group in inner.param_groups for p in group["params"]}
        missing = [p for p in self.trainable_parameters() if p.dtype.is_floating_point and id(p) not in in_opt]
        if missing:
            raise ValueError(f"{len(missing)} parameters the schedule may train are not in the optimizer; build the "
                             "optimizer after creating the schedule (it sets requires_grad=True on all of them) and "
                             "before its first step(), e.g. from schedule.trainable_parameters()")
        self.optimizers = inners

    # -- activity ---------------------------------------------------------------------------------
    @property
    def active_layers(self) -> List[int]:
        """Registry indices that train in the current step (sorted)."""
        return list(self._active)

    def _apply_active(self, active: Iterable[int]) -> None:
        active = sorted({int(i) for i in active})
        if self.full_block:
            for i in self.layers:
                self.registry[i].set_trainable(i in active, full_block=True)
            # layers outside the schedule's range stay as they are (frozen by the registry's set_active below)
            others = [h.index for h in self.registry.layers if h.index not in self.layers]
            for i in others:
                if self.registry[i].trainable:
                    self.registry[i].set_trainable(False)
        else:
            self.registry.set_active(active)
        self._active = active

    def step(self, batch: Any = None) -> List[int]:
        """Choose and switch on this step's layers; call before the forward. Returns ``active_layers``."""
        owner = _OWNERS.get(self.registry)
        owner = owner() if owner is not None else None
        if owner is not None and owner is not self:
            raise RuntimeError(f"this model's layers are driven by another schedule ({type(owner).__name__}, created "
                               f"after this {type(self).__name__}); two schedules would overwrite each other's "
                               "trainable switches. Step only the newest one")
        active = self._choose(batch)
        self._apply_active(active)
        self.step_count += 1
        return self.active_layers

    def _choose(self, batch: Any) -> List[int]:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- state ------------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        return {"class": type(self).__name__, "step_count": self.step_count, "rng_state": self.generator.get_state(),
                "active": list(self._active), "layers": list(self.layers), "seed": self.seed}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state.get("class") != type(self).__name__:
            raise ValueError(f"state was saved by {state.get('class')!r}, cannot load it into {type(self).__name__}")
        if list(state["layers"]) != list(self.layers):
            raise ValueError(f"state covers layers {state['layers']} but this schedule covers {self.layers}")
        self.step_count = int(state["step_count"])
        self.generator.set_state(state["rng_state"])
        self.seed = int(state.get("seed", self.seed))
        if state.get("active"):
            self._apply_active(state["active"])
        else:
            self._active = []

    def __repr__(self) -> str:
        return f"{type(self).__name__}(layers={self.layers}, step={self.step_count}, active={self._active})"
