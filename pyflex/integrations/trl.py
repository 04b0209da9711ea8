"""TRL's ``SFTTrainer`` and ``DPOTrainer`` for pyflex-patched models (``pyflex.SFTTrainer``, ``pyflex.DPOTrainer``).

A PEFT user's TRL script switches by its import line:

    from pyflex import SFTTrainer            # was: from trl import SFTTrainer
    trainer = SFTTrainer(model=model, args=SFTConfig(...), train_dataset=ds, peft_config=LoraConfig(...))

Each class is TRL's, with :class:`pyflex.integrations.trainer.PyflexTrainerMixin` in front (a default
:class:`~pyflex.PyflexCallback`, pyflex's metrics in ``report_to``, adapter-only checkpoints that resume exactly), and:

* ``peft_config`` (and ``pyflex_config``): where TRL would wrap the model with ``peft.get_peft_model``, the model
  is patched with ``pyflex.patch_model(model, peft_config, pyflex_config)`` instead (a ``peft.LoraConfig`` and
  pyflex's own options, e.g. ``pyflex.PyflexConfig(tau=True)``; a dict ``peft_config`` is taken as
  ``patch_model``'s keyword arguments), after seeding with ``args.seed`` as TRL does, so the adapter's
  initialisation is reproducible. Without either the model is used as given (patched already, or not at all).
* DPO's reference: TRL computes a PEFT model's reference log-probabilities with the adapter disabled instead of
  keeping a second model, but it recognises PEFT models by ``isinstance(model, peft.PeftModel)`` (accelerate's
  ``is_peft_model``), which a patched model is not; for any other model with ``ref_model=None`` it loads a full
  second copy from ``config._name_or_path``. :class:`DPOTrainer` therefore passes TRL an :class:`AdaptersDisabled`
  view of the patched policy as ``ref_model``: calling it runs the policy under :func:`pyflex.disable_adapters`
  (exactly the base model, no second copy of any weight).

SFTTrainer accepts a model id (``model="org/name"``): TRL loads it, then it is patched. DPOTrainer with
``peft_config`` needs the loaded model object (its reference view is built before TRL's constructor runs).
"""
from __future__ import annotations

import transformers
import trl
from torch import nn

from pyflex.integrations.trainer import PyflexTrainerMixin
from pyflex.model.disable import adapter_switches, disable_adapters
from pyflex.model.patch import get_registry, is_patched, patch_model

__all__ = ["AdaptersDisabled", "DPOTrainer", "SFTTrainer"]


def _patch(model: nn.Module, peft_config, pyflex_config, seed: int) -> nn.Module:
    if is_patched(model):
        raise ValueError(f"peft_config={peft_config!r} / pyflex_config={pyflex_config!r} were given together with a "
                         "model pyflex has patched already; pass either the patched model or the unpatched model "
                         "with the configs")
    transformers.set_seed(seed)  # the adapter's initial values depend on the RNG, as under TRL's get_peft_model
    if isinstance(peft_config, dict):
        return patch_model(model, pyflex_config=pyflex_config, **peft_config)
    return patch_model(model, peft_config, pyflex_config)


class AdaptersDisabled(nn.Module):
    """The base model of a patched ``model``, as a module TRL can use as ``ref_model``: calling it calls ``model``
    inside :func:`pyflex.disable_adapters` (so LoRA, τ, HLPT gates and prefixes are off; what cannot be the base
    model is refused here, at construction).

    It owns nothing: ``model`` is held, not registered, so ``.eval()``, ``.to()``, dropout switches or an optimizer
    applied to the view never reach the policy, and ``parameters()`` is empty. ``state_dict()`` is the policy's
    state without its adapters (what TRL hashes to key its cache of precomputed reference log-probabilities), and
    ``config`` is the policy's. Calls bypass any ``forward`` set on the instance (TRL installs its fused LM head on
    the reference model): the policy's own forward, with TRL's fused head when TRL installed it there, runs.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        adapter_switches(model)  # raises now for a model whose base cannot be recovered
        object.__setattr__(self, "policy", model)

    @property
    def config(self):
        return self.policy.config

    def forward(self, *args, **kwargs):
        with disable_adapters(self.policy):
            return self.policy(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        return type(self).forward(self, *args, **kwargs)

    def state_dict(self, *args, **kwargs):
        adapters = set(get_registry(self.policy).named_adapter_parameters())
        return {k: v for k, v in self.policy.state_dict(*args, **kwargs).items() if k not in adapters}

    def extra_repr(self) -> str:
        return f"policy={type(self.policy).__name__}"


class SFTTrainer(PyflexTrainerMixin, trl.SFTTrainer):
    """``trl.SFTTrainer`` for pyflex: ``peft_config`` patches the model with pyflex (module docstring). Same arguments
    as TRL's."""

    def __init__(self, model, *args, peft_config=None, pyflex_config=None, **kwargs):
        super().__init__(model, *args, **kwargs)
        if peft_config is not None or pyflex_config is not None:
            # after TRL's constructor, which loads a model given by id
            _patch(self.model, peft_config, pyflex_config, self.args.seed)
            self._pyflex_attach_callback()


class DPOTrainer(PyflexTrainerMixin, trl.DPOTrainer):
    """``trl.DPOTrainer`` for pyflex: ``peft_config`` patches the model with pyflex, and with ``ref_model=None`` the
    reference is the patched policy with its adapters disabled (:class:`AdaptersDisabled`; module docstring). Same
    arguments as TRL's."""

    def __init__(self, model, ref_model=None, args=None, *rest, peft_config=None, pyflex_config=None, **kwargs):
        if peft_config is not None or pyflex_config is not None:
            if isinstance(model, str):
                raise ValueError(f"model={model!r}: pyflex.DPOTrainer with peft_config needs the loaded model "
                                 "(AutoModelForCausalLM.from_pretrained(...)), since its reference view is built "
                                 "before TRL's constructor runs")
            seed = args.seed if args is not None else trl.DPOConfig.__dataclass_fields__["seed"].default
            model = _patch(model, peft_config, pyflex_config, seed)
        if ref_model is None and isinstance(model, nn.Module) and is_patched(model):
            if args is not None and getattr(args, "sync_ref_model", False):
                raise ValueError("sync_ref_model=True copies the policy into the reference model, but the reference of "
                                 "a pyflex-patched policy is the policy with its adapters disabled (no copy to sync); "
                                 "set sync_ref_model=False or pass a ref_model")
            ref_model = AdaptersDisabled(model)
        super().__init__(model, ref_model, args, *rest, **kwargs)
