"""Per-family knowledge, in ONE table: where the layer list is and what the projections are called.

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
    """What pyflex needs to know about one model family.

    layers_path: dotted path of the decoder/encoder layer list, relative to ``model.base_model``.
    full_layers_path: the same path from the usual task model (e.g. ``model.layers`` from LlamaForCausalLM).
    attention: attention projection names, relative to a layer.
    ffn: FFN projection names, relative to a layer.
    ffn_down: the FFN down projection (W2; HLPT's gated LoRA goes here).
    attn_norm: the norm whose output is the attention input (HLPT's prefix gate reads it); None when the family
        is post-LN and the attention reads the layer input directly (BERT).
    conv1d: the projections are GPT-2 ``Conv1D`` (weight stored (in, out)) rather than ``nn.Linear``.
    lm_head: names of output heads that "all-linear" never touches (relative to the top model).
    fused: human note about fused projections (Phi-3 qkv_proj / gate_up_proj, GPT-2 c_attn, NeoX query_key_value).
    gated_mlp: the layer's ``mlp`` is a gated MLP of this :data:`pyflex.gated_mlp.GATED_MLP_KINDS` kind ('split':
        gate_proj/up_proj/act_fn/down_proj, 'fused': Phi-3's gate_up_proj), or '' (not gated).
    """
    model_types: Tuple[str, ...]
    layers_path: str
    full_layers_path: str
    attention: Tuple[str, ...]
    ffn: Tuple[str, ...]
    ffn_down: str
    attn_norm: Optional[str]
    conv1d: bool = False
    lm_head: Tuple[str, ...] = ("lm_head",)
    fused: str = ""
    gated_mlp: str = ""

    @property
    def projections(self) -> Tuple[str, ...]:
        return self.attention + self.ffn


_LLAMA_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
_LLAMA_FFN = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")

FAMILIES: Dict[str, FamilySpec] = {}


def _add(spec: FamilySpec) -> None:
    for model_type in spec.model_types:
        FAMILIES[model_type] = spec


_add(FamilySpec(("llama", "mistral", "qwen2", "qwen3", "gemma2"), "layers", "model.layers",
                _LLAMA_ATTN, _LLAMA_FFN, "mlp.down_proj", "input_layernorm", gated_mlp="split"))
_add(FamilySpec(("phi3",), "layers", "model.layers",
                ("self_attn.qkv_proj", "self_attn.o_proj"), ("mlp.gate_up_proj", "mlp.down_proj"),
                "mlp.down_proj", "input_layernorm", fused="qkv_proj = [q; k; v], gate_up_proj = [gate; up]",
                gated_mlp="fused"))
_add(FamilySpec(("gpt2",), "h", "transformer.h",
                ("attn.c_attn", "attn.c_proj"), ("mlp.c_fc", "mlp.c_proj"),
                "mlp.c_proj", "ln_1", conv1d=True, fused="c_attn = [q; k; v] (Conv1D)"))
_add(FamilySpec(("gpt_neox",), "layers", "gpt_neox.layers",
                ("attention.query_key_value", "attention.dense"), ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
                "mlp.dense_4h_to_h", "input_layernorm", lm_head=("embed_out",),
                fused="query_key_value = per-head interleaved [q; k; v]"))
_add(FamilySpec(("bert",), "encoder.layer", "bert.encoder.layer",
                ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"),
                ("intermediate.dense", "output.dense"),
                "output.dense", None, lm_head=("cls.predictions.decoder", "classifier", "qa_outputs")))


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
