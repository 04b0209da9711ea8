"""Which tokens of the current forward are real: the padding mask, captured once per forward of the model.

The τ gradient and sparsity (PEFT_S) and HLPT's pooled gates must ignore padding (attention_mask 0). The layers
that need it (FlexLinear, the gates) never see the mask: transformers hands it to the model, not to the linears.
:func:`install_token_context` puts a forward pre-hook on the model's *base model* (``LlamaModel``, ``BertModel``,
``GPT2Model`` ...: the module that receives the user's mask before it is turned into a 4-D attention bias) and
records the mask there, with the number of tokens already in the KV cache.

Accepted masks: 2-D (B, S_total) 0/1 or bool, and 4-D (B, 1, Q, S_total) bool (True = attend) or additive float
(0 = attend); a key column that no query attends to is padding. Anything else counts every token as real.

Per-sample state kept across the forwards of one cached sequence (HLPT's pooled gates keep running sums) registers
with :meth:`TokenContext.add_batch_state`: when ``generate`` reorders, selects or repeats the batch rows of the KV
cache (beam search), the context applies the same edit to that state.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from pyflex.compat import cache_from_call, cache_length, watch_cache_batch_edits

CONTEXT_ATTR = "_pyflex_token_context"


def key_padding_mask(attention_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """(B, S_total) bool (True = real token) from a 2-D or 4-D attention mask, or None when it cannot tell."""
    if not isinstance(attention_mask, torch.Tensor):
        return None
    if attention_mask.dim() == 2:
        return attention_mask.bool() if attention_mask.dtype == torch.bool or not attention_mask.is_floating_point() \
            else attention_mask > 0.5
    if attention_mask.dim() == 4:
        if attention_mask.dtype == torch.bool:
            attended = attention_mask
        else:  # additive bias: 0 where attended, a large negative number where not
            attended = attention_mask > torch.finfo(attention_mask.dtype).min / 2
        return attended.any(dim=2).any(dim=1)
    return None


class TokenContext:
    """The padding mask of the current forward of one model.

    Attributes:
        real_tokens: (B, S_total) bool, True for real tokens, or None when the forward carried no usable mask.
            With a KV cache S_total = cached + current tokens; :meth:`token_mask` returns the current ones.
        past_length: tokens already in the KV cache when the forward started (0 starts a new sequence).
    """

    def __init__(self):
        self.real_tokens: Optional[torch.Tensor] = None
        self.past_length: int = 0
        # objects with .apply_batch_edit(row_op), told when generate edits the batch rows of the KV cache
        self._batch_states: list = []

    @property
    def new_sequence(self) -> bool:
        return self.past_length == 0

    def begin_forward(self, attention_mask: Optional[torch.Tensor], past_length: int, cache=None) -> None:
        """Record one forward of the model: its attention mask, the tokens already in its KV cache and the cache
        itself (watched for batch-row edits, see :meth:`add_batch_state`)."""
        self.real_tokens = key_padding_mask(attention_mask)
        self.past_length = int(past_length)
        if cache is not None and self._batch_states and not torch.compiler.is_compiling():
            watch_cache_batch_edits(cache, self._apply_batch_edit)  # (not traced: beam search runs eagerly)

    def add_batch_state(self, state) -> None:
        """Register ``state`` (an object with ``apply_batch_edit(row_op)``): whenever ``generate`` reorders,
        selects or repeats the batch rows of a KV cache this context has seen, ``state.apply_batch_edit(row_op)`` is
        called with ``row_op(t)`` doing the same to a tensor whose first dimension is the batch."""
        if not any(s is state for s in self._batch_states):
            self._batch_states.append(state)

    def _apply_batch_edit(self, row_op) -> None:
        for state in self._batch_states:
            state.apply_batch_edit(row_op)

    def token_mask(self, batch: int, seq: int) -> Optional[torch.Tensor]:
        """(batch, seq) bool of the current tokens (True = real), or None when unknown or of another shape
        (e.g. a layer called outside the model's forward)."""
        mask = self.real_tokens
        if mask is None or mask.shape[0] != batch or mask.shape[1] < seq:
            return None
        return mask[:, mask.shape[1] - seq:]


class _CapturePadding:
    """The base model's forward pre-hook. A class, not a closure, so that deepcopy/pickle of the model rebinds it
    to the copied context."""

    def __init__(self, context: TokenContext):
        self.context = context

    def __call__(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1 and isinstance(args[1], torch.Tensor):
            mask = args[1]  # (input_ids, attention_mask, ...) called positionally
        cache = cache_from_call(args, kwargs)
        self.context.begin_forward(mask, cache_length(cache), cache)


def _base_model(model: nn.Module) -> nn.Module:
    base = getattr(model, "base_model", None)
    return base if isinstance(base, nn.Module) else model


def install_token_context(model: nn.Module) -> TokenContext:
    """The model's :class:`TokenContext`, created (with its pre-hook on ``model.base_model``) on first use."""
    base = _base_model(model)
    ctx = getattr(base, CONTEXT_ATTR, None)
    if ctx is not None:
        return ctx
    ctx = TokenContext()
    object.__setattr__(base, CONTEXT_ATTR, ctx)
    base._pyflex_token_context_hook = base.register_forward_pre_hook(_CapturePadding(ctx), with_kwargs=True)
    return ctx


def remove_token_context(model: nn.Module) -> None:
    """Undo :func:`install_token_context` (used by unpatch)."""
    base = _base_model(model)
    handle = getattr(base, "_pyflex_token_context_hook", None)
    if handle is not None:
        handle.remove()
        del base._pyflex_token_context_hook
    if CONTEXT_ATTR in base.__dict__:
        del base.__dict__[CONTEXT_ATTR]
