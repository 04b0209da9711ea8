"""Modules built on the op: ``FlexLinear`` (linear.py), the memory-light gated MLP (gated_mlp.py), and the padding
mask captured once per forward (token_context.py). They know nothing of model families (docs/architecture.md)."""
