"""Layer plans: which layers get which adapter (HLPT, H²LPT)."""
from .hlpt import HLPT_LR, HLPTPlan, apply_hlpt, hlpt_layer_counts

__all__ = ["HLPT_LR", "HLPTPlan", "apply_hlpt", "hlpt_layer_counts"]
