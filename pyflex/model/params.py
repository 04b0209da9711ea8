"""How many parameters train: ``pyflex.trainable_parameters(model)`` and ``pyflex.print_trainable_parameters(model)``.

Counted as ``PeftModel.get_nb_trainable_parameters`` counts (peft 0.21), so a script that switches from
``get_peft_model`` to ``pyflex.patch_model`` with the same LoraConfig prints the same numbers: every parameter of
the model once (tied weights once), a bitsandbytes 4-bit parameter as the number of weights it packs
(``numel · 2 · element size``: two 4-bit codes per byte of storage), a DeepSpeed ZeRO-3 placeholder as its
``ds_numel``. A FlexLinear whose base weight is held quantized outside the parameters counts its in·out weights too.
Two differences remain, both in what the models hold, not in the counting: PEFT trains a *copy* of each module to
save (its parameters count twice in PEFT's "all params", once here), and τ (``tau=True``) adds one trainable
parameter per adapted module.

With a layer schedule (IST, LIFT) the optimizer holds every parameter the schedule may train while each step trains
only the active layers: pass the schedule to also get ``this_step``, the parameters that require grad now (after
``schedule.step()``: the active layers' adapters plus what always trains).
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Optional

from torch import nn

from pyflex.layers.linear import FlexLinear
from pyflex.model.patch import _unwrap, get_registry

__all__ = ["TrainableParameters", "trainable_parameters", "print_trainable_parameters", "parameter_count"]


class TrainableParameters(NamedTuple):
    """trainable: parameters that train (with a schedule: that any step may train); all: every parameter;
    this_step: with a schedule, the parameters that train in the current step (else None)."""

    trainable: int
    all: int
    this_step: Optional[int] = None

    @property
    def percent(self) -> float:
        """100 · trainable / all (0 for a model without parameters)."""
        return 100.0 * self.trainable / self.all if self.all else 0.0


def parameter_count(param: nn.Parameter) -> int:
    """How many weights ``param`` stands for, as PEFT counts them (module docstring)."""
    count = param.numel()
    if count == 0 and hasattr(param, "ds_numel"):  # DeepSpeed ZeRO-3 keeps an empty placeholder
        count = int(param.ds_numel)
    if type(param).__name__ == "Params4bit":  # bitsandbytes: 4-bit codes packed into a wider storage dtype
        count = count * 2 * param.element_size()
    return count


def _quantized_base_weights(model: nn.Module, counted: Dict[int, nn.Parameter]) -> int:
    """in·out of each FlexLinear whose base weight is not one of the model's parameters (a quantized base kept as
    buffers): those weights exist and PEFT counts them (through bitsandbytes' parameter)."""
    total = 0
    for module in model.modules():
        if isinstance(module, FlexLinear):
            weight = getattr(module, "weight", None)
            if not (isinstance(weight, nn.Parameter) and id(weight) in counted):
                total += module.in_features * module.out_features
    return total


def trainable_parameters(model: nn.Module, schedule=None) -> TrainableParameters:
    """(trainable, all[, this_step]) parameter counts of ``model`` (a DDP/accelerate wrapper is fine).

    Without ``schedule``: trainable = the parameters with ``requires_grad``, PEFT's figure. With ``schedule`` (an
    IST / LIFT schedule driving this model): trainable = those plus every parameter the schedule may switch on,
    this_step = those that require grad now. Works on any nn.Module (an unpatched one counts its own flags)."""
    inner = _unwrap(model)
    params = {id(p): p for p in inner.parameters()}  # each parameter once, as named_parameters() lists them
    everything = sum(parameter_count(p) for p in params.values()) + _quantized_base_weights(inner, params)
    now = sum(parameter_count(p) for p in params.values() if p.requires_grad)
    if schedule is None:
        return TrainableParameters(now, everything)
    registry = getattr(schedule, "registry", None)
    if registry is None or not callable(getattr(schedule, "trainable_parameters", None)):
        raise TypeError(f"schedule={type(schedule).__name__} is not a pyflex layer schedule (ImportanceSchedule, "
                        "LiftSchedule, ...)")
    if registry is not get_registry(inner):
        raise ValueError("schedule drives another model's layer registry than this model's; pass the schedule built "
                         "on this model")
    may_train = {id(p) for p in schedule.trainable_parameters()}
    trainable = sum(parameter_count(p) for i, p in params.items() if p.requires_grad or i in may_train)
    return TrainableParameters(trainable, everything, now)


def print_trainable_parameters(model: nn.Module, schedule=None) -> None:
    """Print PEFT's line, ``trainable params: 65,536 || all params: 1,234,567 || trainable%: 5.3087``, for ``model``
    (see :func:`trainable_parameters`); with ``schedule``, followed by `` || trainable this step: 16,384``."""
    counts = trainable_parameters(model, schedule)
    line = (f"trainable params: {counts.trainable:,d} || all params: {counts.all:,d} || "
            f"trainable%: {counts.percent:.4f}")
    if counts.this_step is not None:
        line += f" || trainable this step: {counts.this_step:,d}"
    print(line)
