"""Activation memory of gated MLPs (SwiGLU / GeGLU): keep g and u, rebuild the rest in backward.

A Llama-style MLP is ``down_proj(act(gate_proj(x)) * up_proj(x))``. For backward, eager PyTorch keeps three
(tokens × intermediate) tensors per layer: g (the activation's input), a = act(g) and u (the product's operands).
A LoRA adapter on ``down_proj`` adds a fourth, its input h = a·u, which dA = vᵀ h needs. On the 1.1B model of
the README's 1.1B model each of them is 8192 × 5632 bf16 = 88 MiB per layer, 1.9 GiB over 22 layers.

:func:`install_gated_mlp` replaces the forward of one MLP module with one that keeps only g and u:

* :class:`GatedActFunction` computes h = act(g)·u with the module's own activation (same kernels, so h is bitwise
  the eager value) and saves (g, u); its backward rebuilds a = act(g) (one elementwise pass) and returns the eager
  gradients (for SiLU the same ``silu_backward`` call eager autograd makes, so the gradients are bitwise equal too).
  On the Triton backend (CUDA) SiLU and tanh-GELU run :mod:`pyflex.kernels.gated_act` instead: one fused pass
  forward and one backward, eager's rounding points, within one 16-bit ulp of eager;
* while ``down_proj`` runs, a saved-tensor hook replaces every tensor it saves that *is* h (same storage, same
  number of elements) by a :class:`_RebuiltInput` recipe holding (g, u), which backward turns back into h; the
  rebuilt a is handed to the activation's backward, which runs right after, so a is computed once.

Cost with eager kernels: one extra elementwise pass over (M, I) per layer for a, one more for h when down_proj has
an adapter. With the fused SiLU kernels the MLP's elementwise traffic drops below eager's (3 + 5 passes instead of
5 + 9, plus 3 for the h rebuild). Saving: one (M, I) tensor per layer with a frozen down_proj, two with a LoRA
down_proj.

The hook is not pushed when another saved-tensor hook is already active (non-reentrant gradient checkpointing,
CPU offloading of activations, ...): that hook then owns every saved tensor, and keeping g and u alive in a recipe
would defeat it. Under ``torch.compile`` the eager MLP forward is traced instead: AOT autograd's partitioner makes
its own save-or-recompute choice for elementwise ops.

``act_mul`` is pluggable so that :func:`pyflex.fuse_model_ops` can put liger-kernel's fused SiLU·mul in place of
:class:`GatedActFunction` and the h recipe keeps working (it rebuilds h with the same function).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GatedActFunction", "gated_act", "check_gated_mlp", "install_gated_mlp", "uninstall_gated_mlp",
           "has_gated_mlp", "installed_kind", "GATED_MLP_KINDS", "set_model_act_mul", "model_act_mul"]

# kind → (projection attributes before the product, activation attribute)
GATED_MLP_KINDS = {
    "split": (("gate_proj", "up_proj"), ("act_fn",)),          # Llama, Mistral, Qwen2/3, Gemma2
    "fused": (("gate_up_proj",), ("activation_fn", "act_fn")),  # Phi-3: gate_up_proj then chunk(2)
}
_INSTALLED_ATTR = "_pyflex_gated_mlp"
# a model-wide act_mul that MLPs installed on this model later use (set by pyflex/integrations/liger.py)
_MODEL_ACT_MUL_ATTR = "_pyflex_gated_act_mul"


def set_model_act_mul(model: nn.Module, act_mul: Optional[Callable]) -> None:
    """Make ``act_mul(g, u, state)`` the product every gated MLP of ``model`` installed from now on computes."""
    object.__setattr__(model, _MODEL_ACT_MUL_ATTR, act_mul)


def model_act_mul(model: nn.Module) -> Optional[Callable]:
    """The act_mul set by :func:`set_model_act_mul` for ``model`` (None: the module's own activation)."""
    return getattr(model, _MODEL_ACT_MUL_ATTR, None)


class _State:
    """One MLP call: the act(g) rebuilt for the h recipe, kept for the activation's backward that runs next."""
    __slots__ = ("act",)

    def __init__(self):
        self.act = None


def _is_silu(act: Callable) -> bool:
    if isinstance(act, nn.SiLU) or act is F.silu:
        return True
    # transformers' SiLUActivation: forward is F.silu (checked by name: transformers is optional here)
    return type(act).__name__ == "SiLUActivation" and type(act).__module__.startswith("transformers")


def _is_gelu_tanh(act: Callable) -> bool:
    if isinstance(act, nn.GELU):
        return act.approximate == "tanh"
    # transformers' GELUTanh (gelu_pytorch_tanh): forward is F.gelu(approximate="tanh"), unless built with the
    # python formula, which rounds differently
    inner = getattr(act, "act", None)
    return (type(act).__name__ == "GELUTanh" and getattr(inner, "func", None) is F.gelu
            and getattr(inner, "keywords", {}) == {"approximate": "tanh"})


class _Fused:
    """pyflex.kernels.gated_act bound to one activation ('silu' or 'gelu_tanh')."""
    __slots__ = ("kernels", "act")

    def __init__(self, kernels, act: str):
        self.kernels, self.act = kernels, act

    def forward(self, g, u):
        return self.kernels.gated_mul(g, u, self.act)

    def backward(self, dh, g, u, need_g, need_u):
        return self.kernels.gated_mul_backward(dh, g, u, self.act, need_g, need_u)


def _fused_kernels(act: Callable, t: torch.Tensor) -> Optional[_Fused]:
    """The fused kernels when they serve this call (SiLU or tanh-GELU, fp16/bf16/fp32, and the op's backend for t's
    device is Triton: CUDA tensors by default, CPU tensors only when the 'triton' backend is forced), else None."""
    name = "silu" if _is_silu(act) else "gelu_tanh" if _is_gelu_tanh(act) else None
    if name is None or t.dtype == torch.float64:
        return None
    from pyflex.lora.backends import resolve_backend
    if resolve_backend(t.device, dtype=t.dtype)[0] != "triton":
        return None
    from pyflex.kernels import gated_act
    return _Fused(gated_act, name)


class GatedActFunction(torch.autograd.Function):
    """h = act(g) · u saving only g and u. Shapes: g, u (..., I) → h (..., I), same dtype.

    SiLU and tanh-GELU on the Triton backend run :mod:`pyflex.kernels.gated_act` (one pass forward, one backward,
    eager's rounding points); everything else runs the module's activation and eager's backward kernels."""

    @staticmethod
    def forward(ctx, g, u, act, state):
        ctx.act, ctx.state = act, state
        ctx.save_for_backward(g, u)
        kernels = _fused_kernels(act, g)
        ctx.kernels = kernels
        return kernels.forward(g, u) if kernels is not None else act(g) * u

    @staticmethod
    def backward(ctx, dh):
        g, u = ctx.saved_tensors
        need_g, need_u = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        a, ctx.state.act = ctx.state.act, None      # rebuilt by the h recipe, if down_proj saved h
        if ctx.kernels is not None:
            dg, du = ctx.kernels.backward(dh, g, u, need_g, need_u)
            return dg, du, None, None
        dg = du = None
        if need_g and not _is_silu(ctx.act):
            # any other activation: differentiate a recomputation with autograd (eager's own backward kernels)
            with torch.enable_grad():
                g_leaf = g.detach().requires_grad_(True)
                a_graph = ctx.act(g_leaf)
            dg = torch.autograd.grad(a_graph, g_leaf, dh * u)[0]
            a = a_graph.detach() if a is None else a
        elif need_g:
            dg = torch.ops.aten.silu_backward(dh * u, g)
        if need_u:
            if a is None:
                a = ctx.act(g)
            du = dh * a
        return dg, du, None, None


def gated_act(g: torch.Tensor, u: torch.Tensor, act: Callable, state: Optional[_State] = None) -> torch.Tensor:
    """act(g) · u through :class:`GatedActFunction` (saves g and u only)."""
    return GatedActFunction.apply(g, u, act, state if state is not None else _State())


class _RebuiltInput:
    """What down_proj's autograd keeps in place of h: the (g, u) the activation keeps anyway, and how to rebuild."""
    __slots__ = ("g", "u", "act_mul", "state", "shape")

    def __init__(self, g, u, act_mul, state, shape):
        self.g, self.u, self.act_mul, self.state, self.shape = g, u, act_mul, state, shape

    def rebuild(self) -> torch.Tensor:
        with torch.no_grad():
            return self.act_mul(self.g, self.u, self.state).view(self.shape)


def _default_act_mul(act: Callable):
    """act_mul(g, u, state): state None → no-grad forward (the fused kernels where they serve) or, under
    torch.compile, the eager expression; with grad → GatedActFunction; without grad (the h rebuild in backward)
    → act(g)·u, leaving act(g) in state for the activation's backward."""
    def act_mul(g, u, state):
        if state is None:
            kernels = None if torch.compiler.is_compiling() else _fused_kernels(act, g)
            return kernels.forward(g, u) if kernels is not None else act(g) * u
        if torch.is_grad_enabled():
            return gated_act(g, u, act, state)
        kernels = _fused_kernels(act, g)
        if kernels is not None:    # its backward recomputes act(g) itself
            return kernels.forward(g, u)
        state.act = act(g)         # the activation's backward, which runs next, reuses it
        return state.act * u
    return act_mul


def _saved_tensor_hooks(h: torch.Tensor, g, u, act_mul, state):
    ptr, numel, dtype = h.data_ptr(), h.numel(), h.dtype

    def pack(t):
        if t.data_ptr() == ptr and t.numel() == numel and t.dtype == dtype and t.is_contiguous():
            return _RebuiltInput(g, u, act_mul, state, t.shape)
        return t

    def unpack(obj):
        return obj.rebuild() if isinstance(obj, _RebuiltInput) else obj

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


def _another_hook_active() -> bool:
    # private but stable since torch 2.1 (AOT autograd uses it); a missing function means "assume one is active"
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is None or top(False) is not None


def _gated_forward(self, x):
    kind, act_mul = getattr(self, _INSTALLED_ATTR)
    if act_mul is None:  # looked up per call, so a deep copy of the model uses its own activation module
        act_mul = _default_act_mul(_activation(self, kind))
    if kind == "split":
        g, u = self.gate_proj(x), self.up_proj(x)
    else:
        g, u = self.gate_up_proj(x).chunk(2, dim=-1)
    if getattr(act_mul, "needs_contiguous", False):
        g, u = g.contiguous(), u.contiguous()
    if torch.compiler.is_compiling() or not torch.is_grad_enabled():
        return self.down_proj(act_mul(g, u, None))
    state = _State()
    h = act_mul(g, u, state)
    if _another_hook_active():
        return self.down_proj(h)
    with _saved_tensor_hooks(h, g, u, act_mul, state):
        return self.down_proj(h)


class _GatedForward:
    """The installed forward of one MLP. A callable object rather than ``MethodType(_gated_forward, mlp)``: pickle
    stores a bound method as ``getattr(mlp, "_gated_forward")``, which the MLP class does not have, so
    ``torch.save(model)`` / ``torch.load`` of a patched model failed; this object pickles (and deep-copies) with
    its module."""
    __slots__ = ("__self__",)   # named as a bound method's: the module it runs for
    __func__ = staticmethod(_gated_forward)

    def __init__(self, mlp: nn.Module):
        self.__self__ = mlp

    def __call__(self, x):
        return _gated_forward(self.__self__, x)


def _activation(mlp: nn.Module, kind: str):
    for name in GATED_MLP_KINDS[kind][1]:
        act = getattr(mlp, name, None)
        if act is not None:
            return act
    raise ValueError(f"{type(mlp).__name__} has none of {GATED_MLP_KINDS[kind][1]}; it is not a {kind!r} gated MLP")


def check_gated_mlp(mlp: nn.Module, kind: str) -> None:
    """Raise ValueError unless ``mlp`` has the modules and activation a ``kind`` gated MLP has."""
    if kind not in GATED_MLP_KINDS:
        raise ValueError(f"kind={kind!r} is not a gated MLP kind; allowed: {', '.join(GATED_MLP_KINDS)}")
    for name in GATED_MLP_KINDS[kind][0] + ("down_proj",):
        if not isinstance(getattr(mlp, name, None), nn.Module):
            raise ValueError(f"{type(mlp).__name__} has no module {name!r}; it is not a {kind!r} gated MLP")
    _activation(mlp, kind)


def install_gated_mlp(mlp: nn.Module, kind: str, act_mul: Optional[Callable] = None) -> None:
    """Give ``mlp`` (one layer's MLP module) the memory-light forward above. ``kind`` is 'split' (gate_proj,
    up_proj, act_fn, down_proj) or 'fused' (Phi-3: gate_up_proj, activation_fn, down_proj). ``act_mul(g, u, state)``
    computes act(g)·u (default: :class:`GatedActFunction` with the module's activation). Reinstalling replaces
    act_mul; :func:`uninstall_gated_mlp` restores the forward that was bound before pyflex's (the class forward,
    or e.g. liger's fused MLP forward when that was bound in between)."""
    check_gated_mlp(mlp, kind)
    current = mlp.__dict__.get("forward")  # None: the class forward
    if not isinstance(current, _GatedForward):
        # first install, or another patch (liger's fused MLP) rebound forward since: that is what to restore
        mlp._pyflex_previous_forward = current
    object.__setattr__(mlp, _INSTALLED_ATTR, (kind, act_mul))
    mlp.forward = _GatedForward(mlp)


def has_gated_mlp(mlp: nn.Module) -> bool:
    return getattr(mlp, _INSTALLED_ATTR, None) is not None


def installed_kind(mlp: nn.Module) -> Optional[str]:
    """The kind given to :func:`install_gated_mlp` ('split' / 'fused'), or None when not installed."""
    installed = getattr(mlp, _INSTALLED_ATTR, None)
    return None if installed is None else installed[0]


def uninstall_gated_mlp(mlp: nn.Module) -> None:
    """Put back the forward ``mlp`` had before :func:`install_gated_mlp` (no-op if not installed)."""
    if not has_gated_mlp(mlp):
        return
    previous = mlp.__dict__.pop("_pyflex_previous_forward", None)
    if previous is None:
        mlp.__dict__.pop("forward", None)
    else:
        mlp.forward = previous
    object.__delattr__(mlp, _INSTALLED_ATTR)
