"""LIFT: fine-tune one block at a time (docs/methods.md, "LIFT").

Sequence construction for ``total_steps = t`` over the N blocks of the layer range:

* order — which block each *slot* holds:
    ``front2end``  slots are the blocks in increasing index,
    ``end2front``  in decreasing index,
    ``random``     every slot draws a block uniformly with replacement from the range (the appendix's "permutation
                   with replacement, a.k.a. uniform sampling"), from the schedule's seeded generator.
* policy — how the t iterations are laid over the slots; every slot gets ⌊t/N⌋ iterations (appendix D):
    ``grouped``  "0 0 1 1 2 2 3 3": each slot's iterations are contiguous (the paper's main setting),
    ``cyclic``   "0 1 2 3 0 1 2 3": ⌊t/N⌋ passes over the slots (with ``random`` each pass draws its own slots).
* remainder — the appendix only states ⌊t/N⌋ per block; the r = t mod N leftover iterations are appended at the
  end: ``grouped`` gives them to the last slot's block, ``cyclic`` runs a partial pass over the first r slots
  (for ``random`` a partial pass of r fresh draws). Steps past t wrap around to the start of the sequence.

Target:
* ``"lora"``: the block's adapters train (base frozen, as after patching).
* ``"full"``: every parameter of the block trains and no LoRA adapter exists (the paper's LIFT). Pass the
  *unpatched* model: the schedule gives it a layer registry without adapters
  (:func:`pyflex.model.registry.attach_block_registry`; every parameter frozen, the frozen-prefix skip on), and the blocks
  run their own modules. A model patched with adapters is refused. When the schedule leaves a block, that block's
  optimizer state is deleted (``opt.state[p]``) unless ``keep_optimizer_state=True`` — LIFT's memory saving
  depends on it. No call is needed for that: the schedule watches optimizer steps (a torch optimizer step
  pre-hook), takes the first optimizer that steps parameters of the model as the training optimizer — an error
  if it lacks some of the schedule's parameters, as an optimizer built before the schedule armed the blocks
  does — and from then on frees a left block's state at the switch. :meth:`LiftSchedule.attach_optimizer`
  names the optimizer explicitly (PyflexCallback does).
"""
from __future__ import annotations

import weakref
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from pyflex.methods.schedule import _OWNERS, LayerSchedule, resolve_registry

ORDERS = ("front2end", "end2front", "random")
POLICIES = ("grouped", "cyclic")
TARGETS = ("lora", "full")


def lift_sequence(blocks: Sequence[int], total_steps: int, *, order: str = "front2end", policy: str = "grouped",
                  generator: Optional[torch.Generator] = None) -> List[int]:
    """The block trained at each of ``total_steps`` iterations (see the module docstring)."""
    if order not in ORDERS:
        raise ValueError(f"order={order!r} is not supported; allowed: {', '.join(ORDERS)}")
    if policy not in POLICIES:
        raise ValueError(f"policy={policy!r} is not supported; allowed: {', '.join(POLICIES)}")
    blocks = list(blocks)
    n = len(blocks)
    if n == 0:
        raise ValueError("blocks is empty; LIFT needs at least one block")
    if not isinstance(total_steps, int) or total_steps < n:
        raise ValueError(f"total_steps={total_steps!r} is not allowed; it must be an int >= the number of blocks ({n}) "
                         "so that every block gets ⌊t/N⌋ >= 1 iterations")
    per, rem = divmod(total_steps, n)
    if order == "random" and generator is None:
        raise ValueError("order='random' needs a torch.Generator (the schedule's seeded one)")

    def slots(count: int) -> List[int]:
        if order == "front2end":
            return blocks[:count]
        if order == "end2front":
            return blocks[::-1][:count]
        draws = torch.randint(0, n, (count,), generator=generator).tolist()
        return [blocks[i] for i in draws]

    seq: List[int] = []
    if policy == "grouped":
        order_slots = slots(n)
        for b in order_slots:
            seq.extend([b] * per)
        seq.extend([order_slots[-1]] * rem)
    else:
        if order == "random":
            for _ in range(per):
                seq.extend(slots(n))
            seq.extend(slots(rem) if rem else [])
        else:
            seq.extend(slots(n) * per)
            seq.extend(slots(n)[:rem])
    assert len(seq) == total_steps
    return seq


class _OptimizerWatch:
    """Optimizer step pre-hook of a full-block LiftSchedule; holds it weakly so a dropped schedule is collected."""

    def __init__(self, schedule_ref):
        self.schedule_ref = schedule_ref

    def __call__(self, optimizer, args, kwargs):
        schedule = self.schedule_ref()
        if schedule is not None:
            schedule._on_optimizer_step(optimizer)


class LiftSchedule(LayerSchedule):
    """One block at a time, in a fixed precomputed sequence.

    Args:
        model: a patched model (or its LayerRegistry).
        total_steps: t, the number of training iterations the sequence covers. None: set later with
            :meth:`set_total_steps` — :class:`pyflex.integrations.trainer.PyflexCallback` does it from ``state.max_steps``.
        order: "front2end" (paper default) | "end2front" | "random".
        policy: "grouped" (paper default) | "cyclic".
        layer_range: (start, stop) registry indices, half-open; default all layers (the paper's main setting).
        layers: explicit list of block indices instead of a range.
        target: "lora" (the block's adapters) | "full" (all the block's parameters, no adapters: pass the
            unpatched model).
        keep_optimizer_state: in "full" mode, keep a left block's optimizer state (default: free it).
        seed: seed of the private generator (used by order="random").
        layers_path: "full" mode on a family outside pyflex.model.families: dotted path of the layer ModuleList.
    """

    def __init__(self, model, total_steps: Optional[int] = None, *, order: str = "front2end", policy: str = "grouped",
                 layer_range: Optional[Tuple[int, int]] = None, layers: Optional[Sequence[int]] = None,
                 target: str = "lora", keep_optimizer_state: bool = False, seed: int = 0,
                 layers_path: Optional[str] = None):
        if target not in TARGETS:
            raise ValueError(f"target={target!r} is not supported; allowed: {', '.join(TARGETS)}")
        if layer_range is not None and layers is not None:
            raise ValueError("give either layer_range or layers, not both")
        if layer_range is not None:
            start, stop = layer_range
            if not (isinstance(start, int) and isinstance(stop, int) and start < stop):
                raise ValueError(f"layer_range={layer_range!r} must be (start, stop) ints with start < stop (half-open)")
            layers = list(range(start, stop))
        if target == "full":
            registry = self._full_block_registry(model, layers_path)
            if layers is None:
                layers = [h.index for h in registry.layers]
        super().__init__(model, layers=layers, seed=seed, full_block=(target == "full"))
        self.target = target
        self.order = order
        self.policy = policy
        self.keep_optimizer_state = bool(keep_optimizer_state)
        self.total_steps: Optional[int] = None
        self.sequence: List[int] = []
        if total_steps is not None:
            self.set_total_steps(total_steps)
        self.freed_state_count = 0  # optimizer-state entries deleted so far (for tests and logging)
        self._left: List[int] = []  # blocks left before the optimizer was known: their state is freed when it is
        if self.full_block:
            self._examined: "weakref.WeakSet" = weakref.WeakSet()
            handle = register_optimizer_step_pre_hook(_OptimizerWatch(weakref.ref(self)))
            weakref.finalize(self, handle.remove)

    @staticmethod
    def _full_block_registry(model, layers_path):
        """The registry for full-block mode: attached to an unpatched model here; a model with adapters is refused."""
        from pyflex.model.registry import attach_block_registry
        from pyflex.model.patch import is_patched

        if isinstance(model, nn.Module) and not is_patched(model):
            return attach_block_registry(model, layers_path)
        registry = resolve_registry(model)
        adapters = registry.adapter_parameters()
        if adapters:
            raise ValueError(f"target='full' trains each block's own weights with no LoRA adapter, but this model has "
                             f"{len(adapters)} adapter parameters (it was patched with adapters); pass the unpatched "
                             "model (pyflex.unpatch(model) first) or use target='lora'")
        if layers_path is not None:
            raise ValueError(f"layers_path={layers_path!r} only locates the layers of an unpatched model; this one "
                             "already has a layer registry")
        return registry

    def set_total_steps(self, total_steps: int) -> None:
        """Build the sequence for t = ``total_steps`` (once; a different t later is an error)."""
        if self.total_steps is not None:
            if total_steps != self.total_steps:
                raise ValueError(f"total_steps is already {self.total_steps}; cannot change it to {total_steps}")
            return
        self.sequence = lift_sequence(self.layers, total_steps, order=self.order, policy=self.policy,
                                      generator=self.generator)
        self.total_steps = total_steps

    def _choose(self, batch: Any) -> List[int]:
        if not self.sequence:
            raise RuntimeError("LiftSchedule has no total_steps yet: pass total_steps=..., call set_total_steps(t), or "
                               "drive it with PyflexCallback (which uses the Trainer's max_steps)")
        return [self.sequence[self.step_count % len(self.sequence)]]

    def _apply_active(self, active) -> None:
        previous = list(self._active)
        super()._apply_active(active)
        if self.full_block and not self.keep_optimizer_state:
            for i in previous:
                if i not in self._active:
                    if self.optimizers:
                        self._free_optimizer_state(i)
                    else:
                        self._left.append(i)

    def _free_optimizer_state(self, index: int) -> None:
        for optimizer in self.optimizers:
            for p in self._params_of(index):
                if p in optimizer.state:
                    del optimizer.state[p]
                    self.freed_state_count += 1

    def _on_optimizer_step(self, optimizer) -> None:
        """Before any optimizer's step: adopt the model's optimizer (checked), then free the state of blocks left
        while it was not known yet (a block not active now holds no state it will need before it is active again)."""
        owner = _OWNERS.get(self.registry)
        if owner is None or owner() is not self:  # a newer schedule drives the model now
            return
        if not self.optimizers:
            if optimizer in self._examined:
                return
            model_params = {id(p) for p in self.registry.model.parameters()}
            if not any(id(p) in model_params for g in optimizer.param_groups for p in g["params"]):
                self._examined.add(optimizer)
                return
            self.attach_optimizer(optimizer)  # raises when the optimizer lacks some of the schedule's parameters
        if optimizer in self.optimizers and self._left and not self.keep_optimizer_state:
            for i in sorted(set(self._left) - set(self._active)):
                self._free_optimizer_state(i)
            self._left = []

    def state_dict(self) -> Dict[str, Any]:
        state = super().state_dict()
        state.update(sequence=list(self.sequence), order=self.order, policy=self.policy, target=self.target,
                     total_steps=self.total_steps)
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        for key in ("order", "policy", "target", "total_steps"):
            if key == "total_steps" and self.total_steps is None:
                continue
            if state[key] != getattr(self, key):
                raise ValueError(f"state has {key}={state[key]!r} but this schedule has {key}={getattr(self, key)!r}")
        self.sequence = list(state["sequence"])
        self.total_steps = state["total_steps"]
        super().load_state_dict(state)
