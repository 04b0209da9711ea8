"""Model patching: the one per-family table (families.py), ``patch_model`` / ``unpatch`` / ``merge`` (patch.py), the
layer handles methods act on (registry.py), the frozen-prefix skip (frozen_prefix.py), and optimizer helpers for a
patched model (optim.py)."""
