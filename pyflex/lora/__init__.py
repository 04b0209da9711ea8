"""The op: the τ-masked LoRA linear (docs/op.md).

contract.py (what a backend receives, returns and supports; the registry) → reference.py (the spec in plain PyTorch)
→ backends.py (reference, C++ and Triton registered; dispatch by device and capability) → autograd.py (``flex_lora``:
validation and the one autograd path, eager and under torch.compile); tau.py and tau_lambda.py train τ.
"""
