"""Adapter-only checkpoints for a patched model: what :class:`pyflex.Trainer` (and pyflex's TRL trainers) write where
the HF Trainer would write the whole model, and read back when it resumes.

A checkpoint directory of a patched model holds (besides the Trainer's optimizer, scheduler, RNG and trainer state):

    pyflex_adapter.safetensors, pyflex_config.json   the adapter and every setting (:func:`pyflex.save_adapter`):
                                                     what a resume loads, and what ``pyflex.load_adapter`` reads
    adapter_model.safetensors, adapter_config.json   the same LoRA as a PEFT adapter, when PEFT can express it
                                                     (τ off, no HLPT gates or prefixes, β = 1, ...;
                                                     :func:`pyflex.save_peft_adapter`), so
                                                     ``peft.PeftModel.from_pretrained(base, dir)`` loads it
    pyflex_schedule.pt, pyflex_tau_optimizer.pt      written by :class:`pyflex.PyflexCallback` (schedule and τ's Adam)

and never another copy of the frozen base weights (no ``model.safetensors``, no ``config.json``: ``from_pretrained``
on the directory fails rather than building a model without its base).
"""
from __future__ import annotations

import logging
import os
from typing import Dict, List, Optional

import torch
from torch import nn

from pyflex.integrations.adapter_files import (ADAPTER_FILE, CONFIG_FILE, PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE,
                                               load_adapter, save_adapter, save_peft_adapter)
from pyflex.model.patch import _unwrap, is_patched

__all__ = ["save_checkpoint_adapter", "load_checkpoint_adapter", "has_checkpoint_adapter", "CHECKPOINT_FILES"]

logger = logging.getLogger(__name__)

CHECKPOINT_FILES = (ADAPTER_FILE, CONFIG_FILE)


def has_checkpoint_adapter(path: str) -> bool:
    """True when the directory ``path`` holds pyflex's adapter files."""
    return all(os.path.isfile(os.path.join(path, name)) for name in CHECKPOINT_FILES)


def save_checkpoint_adapter(model: nn.Module, path: str, *,
                            state_dict: Optional[Dict[str, torch.Tensor]] = None) -> List[str]:
    """Write the adapter of the patched ``model`` into the directory ``path`` as pyflex files, plus PEFT files when
    PEFT can express it; returns the names of the files written.

    ``state_dict``: the model's full state dict as the Trainer gathered it (sharded training); the pyflex files take
    their tensors from it. The PEFT copy reads the live parameters, so with a gathered state dict it is left out
    (logged).
    """
    inner = _unwrap(model)
    if not is_patched(inner):
        raise ValueError(f"{type(model).__name__} is not patched by pyflex; an adapter checkpoint needs a patched model")
    save_adapter(inner, path, state_dict=state_dict)
    written = list(CHECKPOINT_FILES)
    if state_dict is not None:
        logger.warning("pyflex: the Trainer passed a gathered state dict (sharded training); %s holds pyflex's adapter "
                       "files only, no PEFT copy", path)
        return written
    try:
        save_peft_adapter(inner, path)
    except ValueError as exc:  # raised before anything is written: the adapter has parts PEFT LoRA cannot hold
        logger.info("pyflex: no PEFT copy of the adapter in %s (%s); pyflex.load_adapter reads it", path, exc)
    else:
        written += [PEFT_WEIGHTS_FILE, PEFT_CONFIG_FILE]
    return written


def load_checkpoint_adapter(model: nn.Module, path: str) -> nn.Module:
    """Load the adapter files a checkpoint holds into the patched ``model`` (every setting is compared first, see
    :func:`pyflex.load_adapter`); a directory without them is an error naming the files it lacks."""
    missing = [name for name in CHECKPOINT_FILES if not os.path.isfile(os.path.join(path, name))]
    if missing:
        raise FileNotFoundError(f"checkpoint {path!r} has no {' and no '.join(missing)}: it was not written by "
                                "pyflex.Trainer (or pyflex's TRL trainers) for a patched model")
    return load_adapter(model, path)
