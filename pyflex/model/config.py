"""pyflex's own options (:class:`PyflexConfig`) and how a PEFT ``LoraConfig`` becomes a pyflex patch (:class:`LoraPlan`).

``patch_model(model, peft.LoraConfig(...))`` must adapt exactly the modules, ranks and scalings that
``peft.get_peft_model`` would, so this module implements PEFT's selection rules (which module a ``target_modules``
entry, ``exclude_modules``, ``layers_to_transform`` / ``layers_pattern``, ``modules_to_save`` and ``task_type``
select; how ``rank_pattern`` / ``alpha_pattern`` keys pick a module's r and α) on plain module names. peft itself is
never imported here: a LoraConfig is read through its dataclass fields, an ``adapter_config.json`` as a dict, with one
rule table (:data:`LORA_FIELDS`) that says, for every field of the installed peft's LoraConfig, whether pyflex applies
it, records it or refuses a non-default value. A field this table does not know (a newer peft) is refused when it
differs from its default, so no setting is ever dropped silently. tests/integrations/test_peft_config.py checks the
rules against ``get_peft_model`` itself.

The resulting :class:`LoraPlan` (exact module names with their r and α, plus the LoRA settings) is what
:func:`pyflex.patch_model` applies, whichever way its arguments came in (keywords or a LoraConfig).
"""
from __future__ import annotations

import dataclasses
import math
import re
import warnings
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from pyflex.layers.linear import FlexLinear, is_linear_like
from pyflex.lora.tau import check_target_sparsity

__all__ = ["PyflexConfig", "LoraPlan", "LORA_FIELDS", "is_peft_config", "lora_config_fields", "lora_plan_from_config",
           "pattern_value", "check_pattern", "peft_targets", "DTYPE_NAMES"]

DTYPE_NAMES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
               "float64": torch.float64}


# ------------------------------------------------------------------------------------------------------------------
# pyflex's own options
# ------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PyflexConfig:
    """What pyflex adds on top of LoRA; pass it to :func:`pyflex.patch_model` next to a ``peft.LoraConfig`` (or alone,
    with the LoRA options as keywords). Each field is the ``patch_model`` keyword of the same name (see its docstring):

    tau: the PEFT_S token mask with a trainable threshold τ. lam: PEFT_S λ, only with ``tau=True`` (None: the default,
    :data:`pyflex.model.patch.DEFAULT_LAM`). target_sparsity: a fraction of tokens τ is steered to mask instead of
    λ (only with ``tau=True``, not with ``lam``). tau0: τ's initial value. adapter_dtype: dtype of lora_A / lora_B (a
    torch.dtype or its name, e.g. "bfloat16"; None: fp32 on 16-bit bases, the base dtype otherwise). recompute_mlp:
    the memory-light gated MLP (None: on for gated families). layers_path: dotted path of the layer list, for families
    outside pyflex.model.families.
    """

    tau: bool = False
    lam: Optional[float] = None
    target_sparsity: Optional[float] = None
    tau0: float = 0.0
    adapter_dtype: Optional[torch.dtype] = None
    recompute_mlp: Optional[bool] = None
    layers_path: Optional[str] = None

    def __post_init__(self):
        if not isinstance(self.tau, bool):
            raise TypeError(f"PyflexConfig tau={self.tau!r} must be True or False")
        if self.lam is not None and not self.tau:
            raise ValueError(f"lam={self.lam!r} is given with tau={self.tau!r}: λ only acts through the PEFT_S τ mask; "
                             "pass tau=True as well, or leave lam out")
        if self.target_sparsity is not None:
            check_target_sparsity(self.target_sparsity, self.tau, self.lam)
        for name in ("lam", "tau0"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise TypeError(f"PyflexConfig {name}={value!r} must be a number")
        dtype = self.adapter_dtype
        if isinstance(dtype, str):
            if dtype.replace("torch.", "") not in DTYPE_NAMES:
                raise ValueError(f"PyflexConfig adapter_dtype={dtype!r} is not allowed; allowed: "
                                 f"{', '.join(DTYPE_NAMES)} or a torch.dtype")
            object.__setattr__(self, "adapter_dtype", DTYPE_NAMES[dtype.replace("torch.", "")])
        elif dtype is not None and not isinstance(dtype, torch.dtype):
            raise TypeError(f"PyflexConfig adapter_dtype={dtype!r} must be None, a torch.dtype or its name")
        if self.recompute_mlp not in (None, True, False):
            raise TypeError(f"recompute_mlp={self.recompute_mlp!r} must be None, True or False")
        if self.layers_path is not None and not isinstance(self.layers_path, str):
            raise TypeError(f"PyflexConfig layers_path={self.layers_path!r} must be None or a dotted path string")

    def to_dict(self) -> Dict[str, Any]:
        """JSON-able fields (adapter_dtype by name)."""
        out = dataclasses.asdict(self)
        if self.adapter_dtype is not None:
            out["adapter_dtype"] = str(self.adapter_dtype).replace("torch.", "")
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PyflexConfig":
        """The inverse of :meth:`to_dict`; an unknown key is an error naming it."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"PyflexConfig has no field {unknown[0]!r}; fields: {', '.join(sorted(known))}")
        return cls(**dict(data))


# ------------------------------------------------------------------------------------------------------------------
# rank / alpha patterns (PEFT's rule)
# ------------------------------------------------------------------------------------------------------------------
def _pattern_matches(key: str, module_name: str) -> bool:
    # A key is a regex for the tail of the qualified name, starting at a dot boundary (PEFT's rule for
    # rank_pattern / alpha_pattern): "q_proj" and "layers.1.self_attn.q_proj" both select model.layers.1.self_attn.q_proj.
    return re.match(r"(?:.*\.)?(?:" + key + r")$", module_name) is not None


def pattern_value(pattern: Optional[Mapping[str, Any]], module_name: str, default):
    """The value of the first key of ``pattern`` (in its order) that selects ``module_name``, else ``default``."""
    for key, value in (pattern or {}).items():
        if _pattern_matches(key, module_name):
            return value
    return default


def check_pattern(pattern, arg: str) -> Dict[str, Any]:
    """Validate a rank_pattern (``arg="rank_pattern"``: int ≥ 1 values) or alpha_pattern (numbers > 0); returns a
    plain dict in the given order. Each key must be a valid regex."""
    if pattern is None:
        return {}
    if not isinstance(pattern, Mapping):
        raise TypeError(f"{arg}={pattern!r} must be a dict {{module name pattern: value}}")
    out = {}
    for key, value in pattern.items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"{arg} keys must be non-empty str, got {key!r}")
        try:
            re.compile(key)
        except re.error as exc:
            raise ValueError(f"{arg} key {key!r} is not a valid regex ({exc})") from None
        if arg == "rank_pattern":
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"rank_pattern[{key!r}]={value!r} is not allowed; a LoRA rank must be an int >= 1")
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"alpha_pattern[{key!r}]={value!r} is not allowed; α must be a finite number > 0")
        out[key] = value
    return out


def used_pattern(pattern: Mapping[str, Any], names: Sequence[str]) -> Dict[str, Any]:
    """The keys of ``pattern`` that select at least one of ``names`` (order kept): the same r/α for every name."""
    return {k: v for k, v in pattern.items() if any(_pattern_matches(k, n) for n in names)}


# ------------------------------------------------------------------------------------------------------------------
# the plan patch_model applies
# ------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class LoraPlan:
    """Exactly which modules get which LoRA: the output of argument resolution, the input of patching.

    targets: qualified module names, in model order; ranks / alphas: r and α of each target.
    r, alpha, rank_pattern, alpha_pattern: the defaults and patterns they came from (recorded, replayed on load).
    modules_to_save: qualified names of the modules that train fully.
    init_lora_weights: True (A kaiming-uniform, B = 0), "gaussian" (A ~ N(0, 1/r²), B = 0) or False (B random too).
    inference_mode: leave every adapter frozen (PEFT's ``inference_mode=True``).
    lora_config: the LoraConfig it came from, as a JSON-able dict (None for keyword arguments).
    """

    targets: List[str]
    ranks: Dict[str, int]
    alphas: Dict[str, float]
    r: int = 8
    alpha: float = 16.0
    rslora: bool = False
    dropout: float = 0.0
    bias: str = "none"
    modules_to_save: Optional[List[str]] = None
    rank_pattern: Dict[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: Dict[str, float] = dataclasses.field(default_factory=dict)
    init_lora_weights: Union[bool, str] = True
    inference_mode: bool = False
    lora_config: Optional[Dict[str, Any]] = None


# ------------------------------------------------------------------------------------------------------------------
# LoraConfig fields
# ------------------------------------------------------------------------------------------------------------------
def _empty(value) -> bool:
    return value is None or value is False or (isinstance(value, (dict, list, tuple, set, str)) and len(value) == 0)


def _not_none(value) -> bool:
    return value is None


def _false(value) -> bool:
    return value is None or value is False


def _runtime_default(value) -> bool:
    return value is None or not (value.get("ephemeral_gpu_offload") if isinstance(value, Mapping)
                                 else getattr(value, "ephemeral_gpu_offload", False))


# What pyflex does with each field of peft's LoraConfig (peft 0.21). "apply": patch_model follows it as
# get_peft_model does. "record": no effect on what is adapted or computed; kept in the saved config. A callable:
# the only values pyflex accepts (what the field's default means: the feature is off); anything else is refused
# with the field's name and value, before the model is touched.
LORA_FIELDS: Dict[str, Any] = {
    # applied
    "r": "apply", "lora_alpha": "apply", "lora_dropout": "apply", "use_rslora": "apply", "bias": "apply",
    "target_modules": "apply", "exclude_modules": "apply", "layers_to_transform": "apply", "layers_pattern": "apply",
    "rank_pattern": "apply", "alpha_pattern": "apply", "modules_to_save": "apply", "init_lora_weights": "apply",
    "inference_mode": "apply", "task_type": "apply", "peft_type": "apply",
    # the layout comes from the module itself (GPT-2 Conv1D stores (in, out)); a mismatch warns, as in PEFT
    "fan_in_fan_out": "apply",
    # metadata
    "auto_mapping": "record", "peft_version": "record", "base_model_name_or_path": "record", "revision": "record",
    # only read by features refused below (Megatron layers, QALoRA)
    "megatron_core": "record", "qalora_group_size": "record",
    # features pyflex does not implement: only their "off" value is accepted
    "use_dora": _false, "use_qalora": _false, "lora_bias": _false, "ensure_weight_tying": _false,
    "loftq_config": _empty, "megatron_config": _not_none, "trainable_token_indices": _not_none,
    "layer_replication": _not_none, "target_parameters": _not_none, "alora_invocation_tokens": _not_none,
    "use_bdlora": _not_none, "eva_config": _not_none, "corda_config": _not_none, "lora_ga_config": _not_none,
    "velora_config": _not_none, "monteclora_config": _not_none, "arrow_config": _not_none,
    "kasa_config": _not_none, "runtime_config": _runtime_default,
}
_INIT_CHOICES = (True, False, "gaussian")
_TASK_TYPES = (None, "CAUSAL_LM", "SEQ_CLS", "SEQ_2_SEQ_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
# heads PEFT adds to modules_to_save per task type, and whether it does so before choosing the LoRA targets (which
# then leave them out) or after (PeftModelForTokenClassification / ForQuestionAnswering)
_TASK_HEADS = {"SEQ_CLS": (("classifier", "score"), True), "TOKEN_CLS": (("classifier", "score"), False),
               "QUESTION_ANS": (("qa_outputs",), False)}
_SEQ_CLS_HEADS = ("score", "classifier")  # the head "all-linear" leaves out for SEQ_CLS when there is no LM head


def is_peft_config(obj) -> bool:
    """True for a peft config object (any PEFT method), without importing peft."""
    return type(obj).__module__.split(".")[0] == "peft" and hasattr(obj, "peft_type")


def _plain(value):
    """JSON-able copy of a config value (enums by value, sets as sorted lists, dataclasses as dicts)."""
    value = getattr(value, "value", value) if type(value).__module__.split(".")[0] == "peft" and hasattr(
        value, "value") else value
    if isinstance(value, (set, frozenset)):
        return sorted(_plain(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


def lora_config_fields(config, *, source: str = "LoraConfig") -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(fields, defaults) of a peft LoraConfig object or an ``adapter_config.json`` dict. For a dict the defaults are
    unknown ({}): an unknown key is then accepted only when its value is empty (None, False, {}, [])."""
    if isinstance(config, Mapping):
        return dict(config), {}
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise TypeError(f"{source} must be a peft.LoraConfig or an adapter_config.json dict, got {type(config).__name__}")
    fields, defaults = {}, {}
    for f in dataclasses.fields(config):
        fields[f.name] = getattr(config, f.name)
        if f.default is not dataclasses.MISSING:
            defaults[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            defaults[f.name] = f.default_factory()  # type: ignore[misc]
    return fields, defaults


def check_lora_fields(fields: Mapping[str, Any], defaults: Mapping[str, Any], source: str) -> None:
    """Refuse every field pyflex cannot honour, naming it and its value (see :data:`LORA_FIELDS`)."""
    peft_type = _plain(fields.get("peft_type", "LORA"))
    if peft_type != "LORA":
        raise ValueError(f"{source} peft_type={peft_type!r} is not supported: pyflex adapts with LoRA only "
                         "(peft.LoraConfig)")
    for name, value in fields.items():
        rule = LORA_FIELDS.get(name)
        if rule is None:  # a field this pyflex does not know (a newer peft)
            unchanged = (name in defaults and _plain(value) == _plain(defaults[name])) or (
                name not in defaults and _empty(value))
            if not unchanged:
                raise ValueError(f"{source} {name}={value!r} is not supported: pyflex does not know this LoraConfig "
                                 "field (a newer peft?) and will not ignore it; leave it at its default")
        elif callable(rule) and not rule(value):
            raise ValueError(f"{source} {name}={value!r} is not supported by pyflex; leave it at its default "
                             f"({_plain(defaults.get(name))!r})")
    init = fields.get("init_lora_weights", True)
    if not (init is True or init is False or (isinstance(init, str) and init.lower() == "gaussian")):
        raise ValueError(f"{source} init_lora_weights={init!r} is not supported; pyflex initialises LoRA as PEFT does "
                         "for True (A kaiming-uniform, B = 0), 'gaussian' (A ~ N(0, 1/r²), B = 0) and False")
    task = _plain(fields.get("task_type"))
    if task not in _TASK_TYPES:
        raise ValueError(f"{source} task_type={task!r} is not supported; allowed: {', '.join(map(str, _TASK_TYPES))}")
    bias = fields.get("bias", "none")
    if bias not in ("none", "all", "lora_only"):
        raise ValueError(f"{source} bias={bias!r} is not allowed; allowed: none, all, lora_only")
    dropout = fields.get("lora_dropout", 0.0) or 0.0
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"{source} lora_dropout={dropout!r} is not allowed; it must be in [0, 1)")


# ------------------------------------------------------------------------------------------------------------------
# PEFT's module selection
# ------------------------------------------------------------------------------------------------------------------
def _linear_like(module: nn.Module) -> bool:
    # a FlexLinear counts as the linear it wraps, so the rules also run on an already patched model (export checks)
    return isinstance(module, FlexLinear) or is_linear_like(module)


def _layer_index(name: str, layers_pattern) -> Optional[int]:
    """The layer index in a qualified module name, as PEFT reads it for layers_to_transform."""
    if not layers_pattern:
        # no pattern: the first all-digit name segment that has at least two segments before it and one after it
        parts = name.split(".")
        for i in range(2, len(parts) - 1):
            if re.fullmatch(r"\d+", parts[i]):
                return int(parts[i])
        return None
    for pattern in ([layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern)):
        # the pattern names the layer list; the index is the segment after it (first occurrence)
        found = re.match(r"(?:^|.*?\.)" + pattern + r"\.(?P<pyflex_layer_index>\d+)\.", name)
        if found is not None:
            return int(found.group("pyflex_layer_index"))
    return None


def _all_linear(model: nn.Module, modules: List[Tuple[str, nn.Module]], task_type) -> set:
    """PEFT's "all-linear": every Linear / Conv1D except a transformers model's output layer (for SEQ_CLS without
    one, its score / classifier head)."""
    names = {n for n, m in modules if _linear_like(m)}
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        PreTrainedModel = ()
    if isinstance(model, PreTrainedModel):
        output = model.get_output_embeddings()
        if output is not None:
            names -= {n for n, m in modules if m is output}
        elif task_type == "SEQ_CLS":
            for head_name in _SEQ_CLS_HEADS:
                head = getattr(model, head_name, None)
                if head is not None:
                    names -= {n for n, m in modules if m is head}
                    break
    return names


def _as_collection(value, field: str, source: str):
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, set, frozenset)):
        bad = [v for v in value if not isinstance(v, str)]
        if bad:
            raise TypeError(f"{source} {field} entries must be str, got {bad[0]!r}")
        return set(value)
    raise TypeError(f"{source} {field}={value!r} must be None, a str or a list of str")


def peft_targets(model: nn.Module, fields: Mapping[str, Any], modules_to_save: Sequence[str], source: str) -> List[str]:
    """The qualified names ``get_peft_model`` gives a LoRA layer for these LoraConfig ``fields`` (model order).

    Every selected module must be an nn.Linear or GPT-2 Conv1D (PEFT would also adapt embeddings and convolutions,
    which pyflex does not): anything else is an error naming it.
    """
    target = _as_collection(fields.get("target_modules"), "target_modules", source)
    if target is None:
        from pyflex import compat
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        defaults = compat.peft_default_lora_targets(model_type)
        if defaults is None:
            raise ValueError(f"{source} target_modules=None: PEFT has no default target modules for "
                             f"model_type={model_type!r}; name them in target_modules")
        target = set(defaults)
    exclude = _as_collection(fields.get("exclude_modules"), "exclude_modules", source)
    layer_indexes = fields.get("layers_to_transform")
    layers_pattern = fields.get("layers_pattern")
    if isinstance(target, str) and (layer_indexes is not None or layers_pattern):
        raise ValueError(f"{source} layers_to_transform / layers_pattern cannot be used with a str target_modules "
                         f"({target!r}), as in PEFT")
    if layers_pattern and layer_indexes is None:
        raise ValueError(f"{source} layers_pattern={layers_pattern!r} needs layers_to_transform, as in PEFT")
    use_indexes = layer_indexes is not None and not (isinstance(layer_indexes, (list, tuple)) and not layer_indexes)
    modules = list(model.named_modules())
    if isinstance(target, str) and target.lower() == "all-linear":
        target = _all_linear(model, modules, _plain(fields.get("task_type")))
    found = []
    for name, module in modules:
        if not name:
            continue
        if exclude:
            if (re.fullmatch(exclude, name) if isinstance(exclude, str)
                    else name in exclude or any(name.endswith("." + e) for e in exclude)):
                continue
        # a module to save, or anything inside one, never gets a LoRA (the entry is a regex for whole name segments)
        if any(re.match(r"(?:^|.*\.)" + m + r"(?:$|\..*)", name) for m in modules_to_save):
            continue
        if isinstance(target, str):
            hit = re.fullmatch(target, name) is not None
        else:
            hit = name in target or any(name.endswith("." + t) for t in target)
            if hit and use_indexes:
                index = _layer_index(name, layers_pattern)
                wanted = [layer_indexes] if isinstance(layer_indexes, int) else list(layer_indexes)
                hit = index is not None and index in wanted
        if hit:
            found.append((name, module))
    if not found:
        raise ValueError(f"{source} target_modules={_plain(fields.get('target_modules'))!r} matches no module of "
                         f"{type(model).__name__}" + (f" in layers {layer_indexes}" if use_indexes else ""))
    bad = [(n, m) for n, m in found if not _linear_like(m)]
    if bad:
        name, module = bad[0]
        raise ValueError(f"{source} target_modules={_plain(fields.get('target_modules'))!r} selects {name!r} of type "
                         f"{type(module).__name__}: pyflex adapts nn.Linear and GPT-2 Conv1D only"
                         + (f" ({len(bad) - 1} more such modules)" if len(bad) > 1 else ""))
    return [n for n, _ in found]


def _peft_modules_to_save(model: nn.Module, entries: Sequence[str], user_entries: Sequence[str],
                          source: str) -> List[str]:
    """Qualified names PEFT wraps for modules_to_save: every module whose name ends with an entry (plain suffix, no
    dot boundary), outermost only, parameter-less ones dropped (wrapping them trains nothing). A user entry that
    matches nothing is skipped, as PEFT does, with a warning."""
    names = [n for n, _ in model.named_modules(remove_duplicate=False) if n]
    unmatched = [e for e in dict.fromkeys(user_entries) if not any(n.endswith(e) for n in names)]
    if unmatched:
        warnings.warn(f"{source} modules_to_save entry {unmatched[0]!r} matches no module of {type(model).__name__}; "
                      "PEFT skips it and so does pyflex", UserWarning, stacklevel=4)
    hits = [n for n in names if any(n.endswith(e) for e in entries)]
    hits = [n for n in dict.fromkeys(hits) if not any(n.startswith(o + ".") for o in hits)]
    return [n for n in hits if next(model.get_submodule(n).parameters(), None) is not None]


def lora_plan_from_config(model: nn.Module, config, *, source: str = "LoraConfig",
                          apply_inference_mode: bool = True) -> LoraPlan:
    """The :class:`LoraPlan` ``get_peft_model(model, config)`` amounts to, for a peft LoraConfig or an
    ``adapter_config.json`` dict. Unsupported fields raise (naming field and value) before anything is selected.

    ``apply_inference_mode=False`` ignores ``inference_mode`` (PEFT writes True into every saved adapter_config.json;
    loading decides trainability by itself).
    """
    fields, defaults = lora_config_fields(config, source=source)
    check_lora_fields(fields, defaults, source)
    task = _plain(fields.get("task_type"))
    raw_save = fields.get("modules_to_save")
    if isinstance(raw_save, str):
        raise TypeError(f"{source} modules_to_save={raw_save!r} must be a list of module names")
    _as_collection(raw_save, "modules_to_save", source)  # type check
    user_save = list(dict.fromkeys(raw_save or ()))
    heads, before_targets = _TASK_HEADS.get(task, ((), True))
    save_entries = user_save + [h for h in heads if h not in user_save]
    targets = peft_targets(model, fields, save_entries if before_targets else user_save, source)
    saved = _peft_modules_to_save(model, save_entries, user_save, source)
    r, alpha = fields.get("r", 8), fields.get("lora_alpha", 8)
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"{source} r={r!r} is not allowed; the LoRA rank must be an int >= 1")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"{source} lora_alpha={alpha!r} is not allowed; it must be a finite number > 0")
    rank_pattern = check_pattern(fields.get("rank_pattern"), "rank_pattern")
    alpha_pattern = check_pattern(fields.get("alpha_pattern"), "alpha_pattern")
    ranks = {n: pattern_value(rank_pattern, n, r) for n in targets}
    alphas = {n: float(pattern_value(alpha_pattern, n, alpha)) for n in targets}
    _check_fan_in_fan_out(model, targets, fields.get("fan_in_fan_out", False), source)
    init = fields.get("init_lora_weights", True)
    return LoraPlan(
        targets=targets, ranks=ranks, alphas=alphas, r=int(r), alpha=float(alpha),
        rslora=bool(fields.get("use_rslora", False)), dropout=float(fields.get("lora_dropout", 0.0) or 0.0),
        bias=fields.get("bias", "none"), modules_to_save=saved or None,
        rank_pattern=used_pattern(rank_pattern, targets), alpha_pattern=used_pattern(alpha_pattern, targets),
        init_lora_weights=init.lower() if isinstance(init, str) else bool(init),
        inference_mode=bool(fields.get("inference_mode", False)) and apply_inference_mode,
        lora_config={k: _plain(v) for k, v in fields.items()})


def _check_fan_in_fan_out(model: nn.Module, targets: List[str], fan_in_fan_out, source: str) -> None:
    """PEFT takes the weight layout from the module and warns when fan_in_fan_out says otherwise; so does pyflex."""
    for name in targets:
        module = model.get_submodule(name)
        conv1d = module.conv1d if isinstance(module, FlexLinear) else not isinstance(module, nn.Linear)
        if bool(fan_in_fan_out) != conv1d:
            warnings.warn(f"{source} fan_in_fan_out={fan_in_fan_out!r}, but {name!r} is "
                          f"{'a GPT-2 Conv1D (weight stored (in, out))' if conv1d else 'an nn.Linear'}: its own layout "
                          f"is used (fan_in_fan_out={conv1d}), as PEFT does", UserWarning, stacklevel=4)
            return
