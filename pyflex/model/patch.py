"""`patch_model` / `unpatch` / `merge` / `get_registry`: swap target linears for FlexLinear in place.

Per-family knowledge (layer list, projection names) comes from :mod:`pyflex.model.families`; nothing here is family-specific.
"""
from __future__ import annotations

import dataclasses
import math
import re
import warnings
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Union

import torch
from torch import nn

from pyflex.layers import gated_mlp
from pyflex.model.registry import REGISTRY_ATTR, LayerRegistry
from pyflex.layers.linear import FlexLinear, is_linear_like
from pyflex.layers.quantized import flex_linear_for
from pyflex.model.config import (LoraPlan, PyflexConfig, check_pattern, is_peft_config, lora_plan_from_config,
                                 pattern_value, used_pattern)
from pyflex.model.families import FAMILIES, TASK_HEADS, resolve_layers, supported_families
from pyflex.layers.token_context import install_token_context, remove_token_context

__all__ = ["patch_model", "unpatch", "merge", "get_registry", "is_patched", "find_targets", "DEFAULT_LAM"]

_BIAS_MODES = ("none", "all", "lora_only")
_ROLE_TARGETS = ("attention", "ffn", "ffn_down")

# PEFT_S λ when tau=True and lam is not given: the paper's value for LoRA_S on LLaMA3-8B (Table 1), the run whose
# ratio of τ's step to the adapters' lr (4e-5 / 1e-4) is pyflex's default τ lr ratio (pyflex.lora.tau.TAU_LR_RATIO).
# Every experiment of the paper has λ > 0, chosen from [1e-7, 1e-3]; λ = 0 drops eq. 15's pressure towards sparsity.
DEFAULT_LAM = 4.5e-5


def _unwrap(model: nn.Module) -> nn.Module:
    # DistributedDataParallel / DataParallel / accelerate wrappers keep the model in `.module`.
    while not hasattr(model, REGISTRY_ATTR) and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def is_patched(model: nn.Module) -> bool:
    return getattr(_unwrap(model), REGISTRY_ATTR, None) is not None


def get_registry(model: nn.Module) -> LayerRegistry:
    """The :class:`~pyflex.model.registry.LayerRegistry` that :func:`patch_model` attached to ``model``."""
    registry = getattr(_unwrap(model), REGISTRY_ATTR, None)
    if registry is None:
        raise ValueError(f"{type(model).__name__} is not patched by pyflex (no layer registry); "
                         "call pyflex.patch_model(model, ...) first")
    return registry


def _layer_indices(layers, num_layers: int) -> List[int]:
    if layers is None:
        return list(range(num_layers))
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    try:
        indices = [int(i) for i in layers]
    except (TypeError, ValueError):
        raise TypeError(f"layers={layers!r} must be None, an int, a range or a list of layer indices") from None
    for i in indices:
        if not 0 <= i < num_layers:
            raise ValueError(f"layers contains {i}, out of range: the model has {num_layers} layers (0..{num_layers - 1})")
    if not indices:
        raise ValueError("layers=[] selects no layer; pass None for all layers")
    return sorted(set(indices))


def _name_matches(module_name: str, target: str) -> bool:
    return module_name == target or module_name.endswith("." + target)


def find_targets(model: nn.Module, target_modules: Union[str, Sequence[str]] = "all-linear", layers=None,
                 layers_path: Optional[str] = None) -> List[str]:
    """Qualified names of the modules :func:`patch_model` would replace (see its docstring for the rules)."""
    layer_list, spec = resolve_layers(model, layers_path)
    names_by_id = {id(m): n for n, m in model.named_modules()}
    block_names = [names_by_id[id(b)] for b in layer_list]
    indices = _layer_indices(layers, len(layer_list))
    selected_prefixes = tuple(block_names[i] + "." for i in indices)
    restrict = layers is not None

    all_modules = [(n, m) for n, m in model.named_modules() if n]
    linears = [(n, m) for n, m in all_modules if is_linear_like(m) and not isinstance(m, FlexLinear)]
    in_layers = [n for n, _ in linears if n.startswith(selected_prefixes)]
    scope = in_layers if restrict else [n for n, _ in linears]
    where = f" in layers {indices}" if restrict else ""

    if isinstance(target_modules, str) and target_modules in ("all-linear",) + _ROLE_TARGETS:
        if target_modules == "all-linear":
            # Every Linear/Conv1D inside the selected layers; output heads live outside the layers.
            found = in_layers
        else:
            if spec is None:
                raise ValueError(f"target_modules={target_modules!r} needs a known family; "
                                 f"supported: {', '.join(supported_families())}")
            rel = {"attention": spec.attention, "ffn": spec.ffn, "ffn_down": (spec.ffn_down,)}[target_modules]
            found = [n for n in in_layers if any(n == p + r for p in selected_prefixes for r in rel)]
        if not found:
            raise ValueError(f"target_modules={target_modules!r} matched no nn.Linear/Conv1D module{where}")
        return found
    if isinstance(target_modules, str):
        try:
            pattern = re.compile(target_modules)
        except re.error as exc:
            raise ValueError(f"target_modules={target_modules!r} is neither 'all-linear', one of {_ROLE_TARGETS}, "
                             f"nor a valid regex ({exc})") from None
        found = [n for n in scope if pattern.fullmatch(n)]
        if not found:
            examples = ", ".join(scope[:4])
            raise ValueError(f"target_modules regex {target_modules!r} fully matches no nn.Linear/Conv1D module{where}; "
                             f"module names look like: {examples}")
        return found
    if isinstance(target_modules, (list, tuple, set, frozenset)) and target_modules:
        found: List[str] = []
        for target in target_modules:
            if not isinstance(target, str) or not target:
                raise TypeError(f"target_modules entries must be non-empty str, got {target!r}")
            hits = [n for n, _ in all_modules if _name_matches(n, target)
                    and (not restrict or n.startswith(selected_prefixes))]
            if not hits:
                raise ValueError(f"target_modules entry {target!r} matches no module{where}; it must equal a module "
                                 f"name or its dotted suffix (e.g. 'q_proj' or 'self_attn.q_proj')")
            modules = dict(all_modules)
            bad = [n for n in hits if not is_linear_like(modules[n])]
            if bad:
                raise ValueError(f"target_modules entry {target!r} matches {bad[0]!r} of type "
                                 f"{type(modules[bad[0]]).__name__}; only nn.Linear and GPT-2 Conv1D can be patched")
            found.extend(h for h in hits if h not in found)
        order = {n: i for i, (n, _) in enumerate(all_modules)}
        return sorted(found, key=order.__getitem__)
    raise TypeError(f"target_modules={target_modules!r} must be 'all-linear', one of {_ROLE_TARGETS}, a regex string "
                    "or a non-empty list of module names")


class _Default:
    """A keyword's default value, told apart from the same value passed on purpose (a LoraConfig or PyflexConfig next
    to a keyword that would override it is an error; a default is not a keyword given). Shows as the value itself in
    ``help(patch_model)``."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def __repr__(self) -> str:
        return repr(self.value)


def _value(argument):
    return argument.value if isinstance(argument, _Default) else argument


# patch_model keywords that a peft.LoraConfig sets, and those a PyflexConfig sets
_LORA_KEYWORDS = ("r", "alpha", "rslora", "dropout", "target_modules", "layers", "bias", "train_bias",
                  "modules_to_save", "rank_pattern", "alpha_pattern")
_PYFLEX_KEYWORDS = tuple(f.name for f in dataclasses.fields(PyflexConfig))


def _split_configs(config, pyflex_config):
    """(LoraConfig or None, PyflexConfig or None) from patch_model's two positional slots."""
    lora_config = None
    if isinstance(config, PyflexConfig):
        if pyflex_config is not None:
            raise TypeError("patch_model got two PyflexConfig objects; pass one (and a peft.LoraConfig, if any, first)")
        config, pyflex_config = None, config
    elif config is not None:
        if not is_peft_config(config):
            raise TypeError(f"patch_model's second argument must be a peft.LoraConfig or a pyflex.PyflexConfig, got "
                            f"{type(config).__name__}; LoRA options can also be given as keywords (r=..., alpha=...)")
        lora_config = config
    if pyflex_config is not None and not isinstance(pyflex_config, PyflexConfig):
        raise TypeError(f"pyflex_config must be a pyflex.PyflexConfig, got {type(pyflex_config).__name__}")
    return lora_config, pyflex_config


def patch_model(model: nn.Module, config=None, pyflex_config: Optional[PyflexConfig] = None, *,
                r: int = _Default(8), alpha: float = _Default(16), rslora: bool = _Default(False),
                dropout: float = _Default(0.0), target_modules: Union[str, Sequence[str]] = _Default("all-linear"),
                layers: Union[None, int, Iterable[int]] = None, tau: bool = _Default(False),
                lam: Optional[float] = None, target_sparsity: Optional[float] = None, tau0: float = _Default(0.0),
                bias: str = _Default("none"),
                adapter_dtype: Optional[torch.dtype] = None, train_bias: bool = _Default(False),
                layers_path: Optional[str] = None, recompute_mlp: Optional[bool] = None,
                modules_to_save: Optional[Sequence[str]] = None, rank_pattern: Optional[Dict[str, int]] = None,
                alpha_pattern: Optional[Dict[str, float]] = None) -> nn.Module:
    """Replace the target linears of ``model`` by :class:`~pyflex.FlexLinear` in place and return ``model``.

    Three ways to say what to adapt (they give the same patch for the same settings):

        patch_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))   # what get_peft_model takes
        patch_model(model, lora_config, pyflex.PyflexConfig(tau=True))                          # + pyflex's own options
        patch_model(model, r=16, alpha=32, target_modules="all-linear", tau=True)               # keywords

    With a ``peft.LoraConfig`` the adapted modules, their r and α (``rank_pattern`` / ``alpha_pattern``), dropout,
    rsLoRA, bias mode, ``modules_to_save``, ``init_lora_weights`` (True, "gaussian", False) and ``inference_mode``
    are exactly what ``peft.get_peft_model(model, config)`` would set up (PEFT's rules, including its "all-linear":
    every Linear/Conv1D except the output layer; :mod:`pyflex.model.config`); a field pyflex does not implement
    (DoRA, LoftQ, other inits, layer replication, LoRA biases, ...) is an error naming it. The LoRA keywords below
    (r, alpha, rslora, dropout, target_modules, layers, bias, train_bias, modules_to_save, rank_pattern,
    alpha_pattern) cannot be combined with a LoraConfig. pyflex's own options (tau, lam, target_sparsity, tau0,
    adapter_dtype, recompute_mlp, layers_path) come as keywords or as one :class:`pyflex.PyflexConfig`, not both. The configs
    given are recorded in ``get_registry(model).config`` (``lora_config``, ``pyflex_config``) and written by
    :func:`pyflex.save_adapter`.

    Afterwards only the adapter parameters (lora_A, lora_B, tau) require grad, plus biases and the modules to save
    if asked. Base parameter names and values are unchanged (``...q_proj.weight`` stays ``...q_proj.weight``). Each
    FlexLinear takes the train/eval mode of the module it replaces (so a model patched in eval mode applies no
    dropout).

    Args:
        r, alpha, rslora, dropout: LoRA rank, α, rsLoRA scaling (α/√r), dropout on the LoRA input (as PEFT).
        target_modules:
            ``"all-linear"``  every nn.Linear / GPT-2 Conv1D inside the decoder/encoder layers (never the LM head,
                              nor anything outside the layers: e.g. BERT's pooler, unlike PEFT's "all-linear",
                              which a LoraConfig gets);
            ``"attention"`` / ``"ffn"`` / ``"ffn_down"``: the family's projections from pyflex.model.families;
            a list of names: a module matches when its qualified name equals an entry or ends with ``"." + entry``
                              (PEFT's rule); every entry must match, and only Linear/Conv1D may match;
            any other string: a regex that must fully match the qualified module name (PEFT's rule), tried on
                              Linear/Conv1D modules only.
        layers: None (all), an int, a range or list of layer indices: only modules inside these layers.
        rank_pattern, alpha_pattern: per-module r / α, PEFT's rule: ``{key: value}`` where the first key (in order)
            that matches the end of a module's qualified name at a dot boundary (``key`` is a regex; "q_proj" and
            "layers.1.self_attn.q_proj" both select ``model.layers.1.self_attn.q_proj``) gives its value, else
            ``r`` / ``alpha``. Every key must select a patched module.
        tau: PEFT_S token mask with a trainable threshold τ, initial value ``tau0``.
        lam: PEFT_S λ (eq. 15), only with ``tau=True`` (passing it otherwise is an error). None means
            :data:`DEFAULT_LAM` = 4.5e-5, the paper's λ for LoRA_S on LLaMA3-8B (Table 1, the run whose τ step / lr
            ratio is pyflex's default, :func:`pyflex.tau_param_groups`); the paper uses λ > 0 in every experiment,
            from [1e-7, 1e-3]. The resolved value is ``get_registry(model).config["lam"]`` (0.0 when τ is off or a
            target sparsity is set) and is what
            :func:`pyflex.save_adapter` saves.
        target_sparsity: instead of λ, a fraction in (0, 1) of real tokens each τ is steered to mask (a compute
            budget: every τ-masked layer skips the delta of about that fraction; pyflex/lora/tau_lambda.py). Only with
            ``tau=True`` and without ``lam`` (λ is then 0).
        bias: "none" (all biases frozen), "all" (every bias in the model trains), "lora_only" (biases of patched
            linears train). ``train_bias=True`` is the same as ``bias="lora_only"``.
        adapter_dtype: dtype of lora_A/lora_B; default: FlexLinear's.
        layers_path: dotted path (from ``model``) of the layer ModuleList, for families outside pyflex.model.families.
        recompute_mlp: gated-MLP activation memory (:mod:`pyflex.layers.gated_mlp`): every layer's MLP keeps only the
            gate and up outputs for backward and rebuilds act(gate) and down_proj's input there (bitwise equal to
            eager with eager's kernels; on CUDA, SiLU / tanh-GELU run pyflex's fused kernels, within one 16-bit ulp).
            None (default): on for families with a gated MLP (Llama, Mistral, Qwen2/3, Gemma2, Phi-3), off
            otherwise; True: required (error for other families); False: off. Saves one (tokens × intermediate)
            tensor per layer, two where down_proj has an adapter.
        modules_to_save: names of whole modules that train fully, e.g. ``["score"]`` for a classification head.
            Keywords: the qualified name equals an entry or ends with ``"." + entry`` (a LoraConfig uses PEFT's own
            rule, a plain suffix); every entry must match a module with parameters, none may hold or be a target,
            and none may share a parameter with a module outside it (tied weights). All their parameters require
            grad; they are registry adapters (of their layer's handle, or ``extra_adapters`` outside the layers), so
            ``registry.adapter_parameters()``, :func:`pyflex.save_adapter` / :func:`pyflex.load_adapter` and the PEFT
            export (PEFT's ``modules_to_save``) include them. They train in place (PEFT trains a copy):
            :func:`unpatch` restores their ``requires_grad``, not their values.

    A task head transformers creates newly initialised (a module named as in :data:`pyflex.model.families.TASK_HEADS`:
    ``score``, ``classifier``, ``qa_outputs``) that is neither targeted nor in ``modules_to_save`` would stay
    frozen: patch_model warns, naming it.

    Saving: :func:`pyflex.save_adapter` (or ``pyflex.Trainer``'s checkpoints) writes the adapter alone;
    ``model.save_pretrained`` is left as transformers defines it (the patched state dict, adapter keys included).

    Patching twice is an error: call :func:`unpatch` (or :func:`merge`) first, then patch with the new settings.
    Every check runs before the model is touched: a call that raises leaves it as it was.
    """
    if is_patched(model) or any(isinstance(m, FlexLinear) for m in model.modules()):
        raise RuntimeError("model is already patched by pyflex; patching twice is not supported. "
                           "Call pyflex.unpatch(model) (or pyflex.merge(model)) first, then patch again")
    lora_config, pyflex_config = _split_configs(config, pyflex_config)
    arguments = dict(r=r, alpha=alpha, rslora=rslora, dropout=dropout, target_modules=target_modules, layers=layers,
                     bias=bias, train_bias=train_bias, modules_to_save=modules_to_save, rank_pattern=rank_pattern,
                     alpha_pattern=alpha_pattern, tau=tau, lam=lam, target_sparsity=target_sparsity, tau0=tau0,
                     adapter_dtype=adapter_dtype,
                     layers_path=layers_path, recompute_mlp=recompute_mlp)
    given = {k: v for k, v in arguments.items() if not isinstance(v, _Default) and v is not None}
    for keywords, other, what in ((_LORA_KEYWORDS, lora_config, "peft.LoraConfig"),
                                  (_PYFLEX_KEYWORDS, pyflex_config, "pyflex.PyflexConfig")):
        clash = [f"{k}={given[k]!r}" for k in keywords if k in given]
        if other is not None and clash:
            raise ValueError(f"patch_model got a {what} and the keyword argument{'s' if len(clash) > 1 else ''} "
                             f"{', '.join(clash)}, which the {what} sets: give each option once (in the config)")
    if pyflex_config is None:
        pyflex_config = PyflexConfig(**{k: _value(arguments[k]) for k in _PYFLEX_KEYWORDS})
    if lora_config is not None:
        plan = lora_plan_from_config(model, lora_config)
    else:
        plan = _plan_from_keywords(model, pyflex_config.layers_path, **{k: _value(arguments[k]) for k in _LORA_KEYWORDS})
    return _apply_plan(model, plan, pyflex_config, stacklevel=3)


def _plan_from_keywords(model: nn.Module, layers_path: Optional[str], *, r, alpha, rslora, dropout, target_modules,
                        layers, bias, train_bias, modules_to_save, rank_pattern, alpha_pattern) -> LoraPlan:
    """The :class:`~pyflex.model.config.LoraPlan` of patch_model's LoRA keywords (pyflex's target rules)."""
    if bias not in _BIAS_MODES:
        raise ValueError(f"bias={bias!r} is not allowed; allowed: {', '.join(_BIAS_MODES)}")
    if train_bias:
        if bias == "all":
            raise ValueError("train_bias=True conflicts with bias='all'; use one of them")
        bias = "lora_only"
    targets = find_targets(model, target_modules, layers, layers_path)
    patterns = {}
    for arg, pattern in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
        patterns[arg] = check_pattern(pattern, arg)
        unused = [k for k in patterns[arg] if k not in used_pattern(patterns[arg], targets)]
        if unused:
            raise ValueError(f"{arg} key {unused[0]!r} selects none of the patched modules (e.g. {targets[0]!r}); a key "
                             "matches the end of a qualified module name at a dot boundary")
    return LoraPlan(targets=targets, ranks={n: pattern_value(patterns["rank_pattern"], n, r) for n in targets},
                    alphas={n: float(pattern_value(patterns["alpha_pattern"], n, alpha)) for n in targets},
                    r=r, alpha=alpha, rslora=rslora, dropout=dropout, bias=bias, modules_to_save=modules_to_save,
                    rank_pattern=patterns["rank_pattern"], alpha_pattern=patterns["alpha_pattern"])


def _initialise(layers: Iterable[FlexLinear], init_lora_weights) -> None:
    """PEFT's LoRA inits other than FlexLinear's own (True: A kaiming-uniform(a=√5), B = 0)."""
    with torch.no_grad():
        for layer in layers:
            if init_lora_weights == "gaussian":
                nn.init.normal_(layer.lora_A, std=1.0 / layer.r)
            elif init_lora_weights is False:  # B left as nn.Linear(r, out) would start: kaiming-uniform too
                nn.init.kaiming_uniform_(layer.lora_B, a=math.sqrt(5))


def _apply_plan(model: nn.Module, plan: LoraPlan, pyflex_config: PyflexConfig, stacklevel: int = 2) -> nn.Module:
    """Patch ``model`` as ``plan`` says, with pyflex's options; every check runs before the model is touched."""
    if plan.bias not in _BIAS_MODES:
        raise ValueError(f"bias={plan.bias!r} is not allowed; allowed: {', '.join(_BIAS_MODES)}")
    if plan.init_lora_weights not in (True, False, "gaussian"):
        raise ValueError(f"init_lora_weights={plan.init_lora_weights!r} is not allowed; allowed: True, False, 'gaussian'")
    tau, tau0, adapter_dtype = pyflex_config.tau, pyflex_config.tau0, pyflex_config.adapter_dtype
    layers_path = pyflex_config.layers_path
    target_sparsity = pyflex_config.target_sparsity
    lam = (DEFAULT_LAM if pyflex_config.lam is None else pyflex_config.lam) if tau and target_sparsity is None else 0.0
    rslora, dropout, bias = plan.rslora, plan.dropout, plan.bias
    targets = list(plan.targets)
    saved = _resolve_modules_to_save(model, plan.modules_to_save, targets)
    layer_list, spec = resolve_layers(model, layers_path)
    mlp_kind = _gated_mlp_kind(model, spec, pyflex_config.recompute_mlp, layer_list)
    names_by_id = {id(m): n for n, m in model.named_modules()}
    block_names = [names_by_id[id(b)] for b in layer_list]
    orig_requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    # Build every FlexLinear before touching the model, so a bad argument leaves the model unchanged.
    modules = dict(model.named_modules())
    flex: Dict[str, FlexLinear] = {
        # a 4-bit NF4 base (bitsandbytes Linear4bit, torchao NF4Tensor) becomes a QuantizedFlexLinear; an unsupported
        # quantized weight is an error naming the module
        name: flex_linear_for(modules[name], name, r=plan.ranks[name], alpha=plan.alphas[name], rslora=rslora,
                              dropout=dropout, tau=tau, lam=lam, target_sparsity=target_sparsity, tau0=tau0,
                              adapter_dtype=adapter_dtype).train(modules[name].training)
        for name in targets
    }
    _initialise(flex.values(), plan.init_lora_weights)
    taus = [layer.tau for layer in flex.values() if layer.tau is not None]
    for layer in flex.values():
        if layer.tau is not None:
            layer.tau_peers = taus
    for p in model.parameters():
        p.requires_grad_(False)
    for name, layer in flex.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
    for name in saved:
        modules[name].requires_grad_(True)
    if mlp_kind:
        act_mul = gated_mlp.model_act_mul(model)
        for block in layer_list:
            gated_mlp.install_gated_mlp(block.mlp, mlp_kind, act_mul)
    if bias == "all":
        for n, p in model.named_parameters():
            if n == "bias" or n.endswith(".bias"):
                p.requires_grad_(True)
    elif bias == "lora_only":
        for layer in flex.values():
            if layer.bias is not None:
                layer.bias.requires_grad_(True)

    registry = LayerRegistry(model, list(layer_list), block_names, spec=spec,
                             layers_path=layers_path or _common_prefix(block_names))
    for name, module in [*flex.items(), *((n, modules[n]) for n in saved)]:
        for handle in registry.layers:
            if name.startswith(handle.name + "."):
                handle.add_adapter(name, module)
                break
        else:
            registry.extra_adapters[name] = module
    if plan.inference_mode:  # PEFT's inference_mode: the adapters and modules to save stay frozen (biases do not)
        for p in registry.adapter_parameters():
            p.requires_grad_(False)
    registry.config = dict(r=plan.r, alpha=float(plan.alpha), rslora=bool(rslora), dropout=float(dropout),
                           tau=bool(tau), lam=float(lam), target_sparsity=target_sparsity, tau0=float(tau0),
                           bias=bias,
                           adapter_dtype=None if adapter_dtype is None else str(adapter_dtype).replace("torch.", ""),
                           target_modules=list(targets), layers_path=registry.layers_path,
                           recompute_mlp=bool(mlp_kind), modules_to_save=list(saved),
                           model_type=getattr(getattr(model, "config", None), "model_type", None),
                           rank_pattern=dict(plan.rank_pattern), alpha_pattern=dict(plan.alpha_pattern),
                           lora_config=plan.lora_config, pyflex_config=pyflex_config.to_dict())
    registry._orig_requires_grad = orig_requires_grad
    registry.frozen_prefix.attach()
    token_context = install_token_context(model)
    for layer in flex.values():
        layer.token_context = token_context
    object.__setattr__(model, REGISTRY_ATTR, registry)
    heads = _frozen_task_heads(model, targets + saved)
    if heads:
        leaves = [h.rpartition(".")[2] for h in heads]
        warnings.warn(f"pyflex.patch_model: {', '.join(map(repr, heads))} looks like a newly initialised task head and "
                      "is neither targeted nor in modules_to_save, so it stays frozen and this fine-tune trains no "
                      f"head. Pass modules_to_save={leaves!r} to train it fully (PEFT's modules_to_save), or name it "
                      "in target_modules for a LoRA on it", UserWarning, stacklevel=stacklevel)
    return model


def _resolve_modules_to_save(model: nn.Module, modules_to_save, targets: List[str]) -> List[str]:
    """Qualified names of the modules ``modules_to_save`` selects (outermost ones, in model order); every check runs
    before the model is touched."""
    if modules_to_save is None:
        return []
    if isinstance(modules_to_save, str) or not isinstance(modules_to_save, (list, tuple, set, frozenset)):
        raise TypeError(f"modules_to_save={modules_to_save!r} must be None or a list of module names, e.g. ['score']")
    all_modules = [(n, m) for n, m in model.named_modules() if n]
    found: List[str] = []
    for entry in modules_to_save:
        if not isinstance(entry, str) or not entry:
            raise TypeError(f"modules_to_save entries must be non-empty str, got {entry!r}")
        hits = [n for n, _ in all_modules if _name_matches(n, entry)]
        if not hits:
            raise ValueError(f"modules_to_save entry {entry!r} matches no module; it must equal a module name or its "
                             "dotted suffix (e.g. 'score' or 'classifier')")
        found.extend(h for h in hits if h not in found)
    found = [n for n in found if not any(n.startswith(outer + ".") for outer in found)]  # trains with its parent
    modules = dict(all_modules)
    for name in found:
        own = {id(p) for p in modules[name].parameters()}
        if not own:
            raise ValueError(f"modules_to_save selects {name!r} ({type(modules[name]).__name__}), which has no "
                             "parameters to train")
        clash = next((t for t in targets if t == name or t.startswith(name + ".")), None)
        if clash is not None:
            raise ValueError(f"modules_to_save selects {name!r} and target_modules selects {clash!r}: a module either "
                             "trains fully or gets a LoRA; take it out of one of them")
        shared = next((n for n, p in model.named_parameters(remove_duplicate=False)
                       if id(p) in own and not n.startswith(name + ".")), None)
        if shared is not None:
            raise ValueError(f"modules_to_save selects {name!r}, which shares a parameter with {shared!r} (tied "
                             "weights): training it in place would change that module too. Untie the weights first "
                             "(e.g. config.tie_word_embeddings=False) or leave it out")
    order = {n: i for i, (n, _) in enumerate(all_modules)}
    return sorted(found, key=order.__getitem__)


def _frozen_task_heads(model: nn.Module, covered: List[str]) -> List[str]:
    """Task heads (:data:`pyflex.model.families.TASK_HEADS`, outermost) that no name in ``covered`` is, holds or lies in."""
    heads = [n for n, m in model.named_modules()
             if n.rpartition(".")[2] in TASK_HEADS and next(m.parameters(), None) is not None
             and not any(c == n or c.startswith(n + ".") or n.startswith(c + ".") for c in covered)]
    return [n for n in heads if not any(n.startswith(outer + ".") for outer in heads)]


def _gated_mlp_kind(model: nn.Module, spec, recompute_mlp: Optional[bool], layer_list) -> str:
    """The gated-MLP kind to install on every layer ('' for none); validates before the model is touched."""
    if recompute_mlp not in (None, True, False):
        raise TypeError(f"recompute_mlp={recompute_mlp!r} must be None, True or False")
    kind = spec.gated_mlp if spec is not None else ""
    if recompute_mlp is True and not kind:
        gated = sorted(t for t, s in FAMILIES.items() if s.gated_mlp)
        raise ValueError(f"recompute_mlp=True needs a gated-MLP family, but model_type="
                         f"{getattr(getattr(model, 'config', None), 'model_type', None)!r} has none in pyflex's table; "
                         f"gated families: {', '.join(gated)}. Pass recompute_mlp=None or False")
    if recompute_mlp is False or not kind:
        return ""
    for i, block in enumerate(layer_list):
        mlp = getattr(block, "mlp", None)
        if not isinstance(mlp, nn.Module):
            raise ValueError(f"layer {i} ({type(block).__name__}) has no 'mlp' module; pass recompute_mlp=False")
        gated_mlp.check_gated_mlp(mlp, kind)
    return kind


def _common_prefix(block_names: List[str]) -> str:
    return block_names[0].rpartition(".")[0] if block_names else ""


# plan type name → function that removes what the plan added beyond patch_model (registered by the plan's module)
_PLAN_REMOVERS: Dict[str, Callable[[nn.Module], None]] = {}


def register_plan_remover(plan_type: type, remove: Callable[[nn.Module], None]) -> None:
    """Make :func:`unpatch` call ``remove(model)`` for a model whose ``pyflex_plan`` is a ``plan_type``."""
    _PLAN_REMOVERS[plan_type.__name__] = remove


def unpatch(model: nn.Module) -> nn.Module:
    """Put the original nn.Linear / Conv1D modules back (same objects, same weights), drop the adapters and the
    registry, and restore every base parameter's original ``requires_grad``. Returns ``model``.

    A plan applied on top of the patch (``model.pyflex_plan``, e.g. HLPT's gates and prefixes and its attention
    implementation) is removed too, so the model computes its base model again. Modules to save keep their
    (trained) values.
    """
    model = _unwrap(model)
    registry = get_registry(model)
    plan = getattr(model, "pyflex_plan", None)
    if plan is not None:
        remove_plan = _PLAN_REMOVERS.get(type(plan).__name__)
        if remove_plan is None:
            raise RuntimeError(f"the model carries a {type(plan).__name__} (model.pyflex_plan) that unpatch does not "
                               "know how to remove; import the module that applied it first")
        remove_plan(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, FlexLinear):
            base = module.base_module
            # .to()/.half() may have replaced the Parameter objects FlexLinear owns; hand the current ones back.
            base.weight = module.weight
            if module.bias is not None:
                base.bias = module.bias
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, base)
    registry.frozen_prefix.detach()
    remove_token_context(model)
    for module in model.modules():
        gated_mlp.uninstall_gated_mlp(module)
    orig = getattr(registry, "_orig_requires_grad", {})
    for n, p in model.named_parameters():
        if n in orig:
            p.requires_grad_(orig[n])
    delattr(model, REGISTRY_ATTR)
    return model


def merge(model: nn.Module) -> nn.Module:
    """Fold every LoRA delta into its base weight (W0 += s·β·B A; Conv1D transposed) and :func:`unpatch`.

    Refuses, before changing anything, when any FlexLinear has the τ mask or a gate (the delta is per token
    there), or when the registry holds adapters other than FlexLinear and the modules to save (e.g. prefixes).
    The modules to save keep their trained values.
    """
    model = _unwrap(model)
    registry = get_registry(model)
    saved = set(registry.config.get("modules_to_save", ()))
    for name, module in registry.adapter_modules().items():
        if name not in saved and not isinstance(module, FlexLinear):
            raise RuntimeError(f"cannot merge: adapter {name!r} is a {type(module).__name__}, which has no weight to "
                               "fold into; remove it first")
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, FlexLinear)]
    for name, layer in layers:
        try:
            layer._check_mergeable()
        except RuntimeError as exc:
            raise RuntimeError(f"{name}: {exc}") from None
    for _, layer in layers:
        if not layer.merged:
            layer.merge()
    return unpatch(model)
