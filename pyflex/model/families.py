"""Per-family knowledge, in ONE table: where the layer list is, what the projections and modules are called, which
gated MLP a layer has.

Paths are relative to the *base model* (``model.base_model``: ``model`` for Llama-likes, ``transformer`` for GPT-2,
``gpt_neox``, ``bert``), so one entry serves ``XxxModel``, ``XxxForCausalLM``, ``XxxForSequenceClassification`` ...
Projection names are relative to one layer (block). ``full_layers_path`` is the path from a ``*ForCausalLM`` /
``*ForMaskedLM`` top model, for documentation and error messages.

Adding a family: add a :class:`FamilySpec` to ``FAMILIES``. A model outside the table can still be patched by passing
``layers_path=`` (dotted path of its layer ModuleList from the model you pass) and ``target_modules=`` by hand.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from torch import nn

__all__ = ["FamilySpec", "FAMILIES", "TASK_HEADS", "family_spec", "supported_families", "resolve_layers",
           "unknown_family_message"]

# Names transformers gives the task heads it creates newly initialised on top of a pretrained body, whatever the
# family: ``score`` (sequence/token classification of the decoder families), ``classifier`` (BERT-style
# sequence/token classification, GPT-2 token classification), ``qa_outputs`` (extractive QA). A fine-tune that
# leaves such a head frozen trains no head; patch_model warns unless it is targeted or in ``modules_to_save``.
TASK_HEADS = ("score", "classifier", "qa_outputs")


@dataclass(frozen=True)
class FamilySpec:
    """Everything pyflex needs to know about one model family; every other module asks this table.

    layers_path: dotted path of the decoder/encoder layer list, relative to ``model.base_model``.
    full_layers_path: the same path from the usual task model (e.g. ``model.layers`` from LlamaForCausalLM), tried
        when the base-model path does not resolve and named in errors.
    attention: attention projection names, relative to a layer ("attention" in target_modules).
    ffn: FFN projection names, relative to a layer ("ffn").
    ffn_down: the FFN down projection (W2; "ffn_down", and HLPT's gated LoRA goes here).
    attention_module: the layer's attention module (HLPT's prefix attaches to it; its ``forward`` receives the
        attention input after the layer's norm, which the prefix gate reads).
    ffn_module: the module whose input is the FFN block's input h_FN (HLPT's LoRA gate reads it, paper eq. 9).
    gated_mlp: the layer's ``mlp`` is a gated MLP of this pyflex/layers/gated_mlp.py kind ('split': gate_proj,
        up_proj, act_fn, down_proj; 'fused': Phi-3's gate_up_proj), or '' (not gated).
    liger_mlp: liger-kernel's name for the family's gated MLP ('swiglu', 'geglu'), or '' when liger does not
        patch the family (pyflex/integrations/liger.py).
    """
    model_types: Tuple[str, ...]
    layers_path: str
    full_layers_path: str
    attention: Tuple[str, ...]
    ffn: Tuple[str, ...]
    ffn_down: str
    attention_module: str
    ffn_module: str
    gated_mlp: str = ""
    liger_mlp: str = ""

    @property
    def projections(self) -> Tuple[str, ...]:
        return self.attention + self.ffn


_LLAMA_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
_LLAMA_FFN = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")

FAMILIES: Dict[str, FamilySpec] = {}


def _add(spec: FamilySpec) -> None:
    for model_type in spec.model_types:
        FAMILIES[model_type] = spec


_add(FamilySpec(("llama", "mistral", "qwen2", "qwen3"), "layers", "model.layers", _LLAMA_ATTN, _LLAMA_FFN,
                "mlp.down_proj", "self_attn", "mlp", gated_mlp="split", liger_mlp="swiglu"))
_add(FamilySpec(("gemma2",), "layers", "model.layers", _LLAMA_ATTN, _LLAMA_FFN,
                "mlp.down_proj", "self_attn", "mlp", gated_mlp="split", liger_mlp="geglu"))
# Phi-3 fuses projections: qkv_proj = [q; k; v], gate_up_proj = [gate; up]
_add(FamilySpec(("phi3",), "layers", "model.layers", ("self_attn.qkv_proj", "self_attn.o_proj"),
                ("mlp.gate_up_proj", "mlp.down_proj"), "mlp.down_proj", "self_attn", "mlp",
                gated_mlp="fused", liger_mlp="swiglu"))
# GPT-2's projections are Conv1D (weight stored (in, out)); c_attn = [q; k; v]
_add(FamilySpec(("gpt2",), "h", "transformer.h", ("attn.c_attn", "attn.c_proj"), ("mlp.c_fc", "mlp.c_proj"),
                "mlp.c_proj", "attn", "mlp"))
# GPT-NeoX: query_key_value interleaves [q; k; v] per head
_add(FamilySpec(("gpt_neox",), "layers", "gpt_neox.layers", ("attention.query_key_value", "attention.dense"),
                ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h"), "mlp.dense_4h_to_h", "attention", "mlp"))
# BERT is post-LN: the attention reads the layer input directly
_add(FamilySpec(("bert",), "encoder.layer", "bert.encoder.layer",
                ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"),
                ("intermediate.dense", "output.dense"), "output.dense", "attention.self", "intermediate"))


def supported_families() -> Tuple[str, ...]:
    return tuple(sorted(FAMILIES))


def unknown_family_message(model_type) -> str:
    return (f"model_type={model_type!r} is not in pyflex's family table; supported: {', '.join(supported_families())}. "
            "To patch another architecture pass both layers_path= (the dotted path of its layer ModuleList from the "
            "model you pass, e.g. 'model.layers') and target_modules= (a list of projection names such as "
            "['q_proj', 'v_proj'], or a regex fully matching module names).")


def family_spec(model: nn.Module) -> Optional[FamilySpec]:
    """The table entry for ``model.config.model_type``, or None when the family is unknown."""
    config = getattr(model, "config", None)
    return FAMILIES.get(getattr(config, "model_type", None))


def _get_path(root: nn.Module, path: str) -> nn.Module:
    module = root
    for part in path.split(".") if path else []:
        if not hasattr(module, part):
            raise AttributeError(part)
        module = getattr(module, part)
    return module


def resolve_layers(model: nn.Module, layers_path: Optional[str] = None):
    """Return ``(layers, spec)``: the model's layer ModuleList and its FamilySpec (None if unknown).

    ``layers_path`` (relative to ``model``) overrides the table. Errors name what is supported.
    """
    spec = family_spec(model)
    if layers_path is not None:
        try:
            layers = _get_path(model, layers_path)
        except AttributeError as exc:
            raise ValueError(f"layers_path={layers_path!r} does not exist in {type(model).__name__} "
                             f"(no attribute {exc.args[0]!r})") from None
    else:
        if spec is None:
            raise ValueError(unknown_family_message(getattr(getattr(model, "config", None), "model_type", None)))
        base = getattr(model, "base_model", model)
        try:
            layers = _get_path(base, spec.layers_path)
        except AttributeError:
            try:
                layers = _get_path(model, spec.full_layers_path)
            except AttributeError:
                raise ValueError(f"{type(model).__name__} (model_type={model.config.model_type!r}) has no layer list at "
                                 f"{spec.full_layers_path!r} or base_model.{spec.layers_path}; pass layers_path=") from None
    if not isinstance(layers, (nn.ModuleList, nn.Sequential)):
        raise ValueError(f"the layer list must be an nn.ModuleList or nn.Sequential, got {type(layers).__name__} "
                         f"(layers_path={layers_path!r})")
    return layers, spec
