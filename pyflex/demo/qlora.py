"""QLoRA with pyflex: a tiny Llama saved to a temporary directory, reloaded in 4-bit (bitsandbytes NF4, double
quantization) the way a 7B model is loaded on one GPU, patched by pyflex and fine-tuned on a synthetic counting task.

    python -m pyflex.demo.qlora                     # CPU, 40 steps, ~15 s on 2 cores
    python -m pyflex.demo.qlora --device cuda --steps 100

What a QLoRA script adds to use pyflex (README, "QLoRA"): after loading the model in 4-bit,

    model.train()                                              # before any forward (bitsandbytes repacks in eval)
    model = pyflex.patch_model(model, r=16, alpha=32, target_modules="all-linear")
    optimizer = torch.optim.AdamW(pyflex.tau_param_groups(model, lr=2e-4))

Every targeted ``Linear4bit`` becomes a QuantizedFlexLinear (pyflex/layers/quantized.py) that owns the packed 4-bit
bytes and runs the fused op, dequantizing per call (docs/op.md, "Quantized base"). Needs bitsandbytes
(``pip install bitsandbytes``), transformers and torch.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Callable, Dict, List, Optional

import torch

import pyflex


def save_tiny_llama(path: str, *, hidden: int = 128, intermediate: int = 256, layers: int = 2, vocab: int = 128,
                    seed: int = 0) -> None:
    """Write a randomly initialised tiny Llama (a stand-in for a downloaded checkpoint) to ``path``. hidden and
    intermediate are multiples of 64 (bitsandbytes' CPU dequantization needs K % 64 == 0)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    if hidden % 64 or intermediate % 64:
        raise ValueError(f"hidden={hidden} and intermediate={intermediate} must be multiples of 64 (bitsandbytes' CPU "
                         "4-bit dequantization is wrong otherwise)")
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=max(1, hidden // 32), num_key_value_heads=max(1, hidden // 64),
                         vocab_size=vocab, max_position_embeddings=256, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(path)


def load_4bit(path: str, *, device: str = "cpu", double_quant: bool = True,
              compute_dtype: Optional[torch.dtype] = None):
    """The checkpoint at ``path`` in 4-bit NF4 (bitsandbytes), in train mode. compute_dtype: bf16 on CUDA, fp32 on
    CPU (where bf16 matmuls are slow) unless given."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    compute_dtype = compute_dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
                                bnb_4bit_compute_dtype=compute_dtype)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map=device,
                                                 dtype=compute_dtype)
    return model.train()   # an eval-mode forward would let bitsandbytes repack the weights in place on some CPUs


def counting_batches(steps: int, batch: int, seq: int, vocab: int, device: str, seed: int = 0):
    """(input_ids, labels) per step: sequences that count up from a random token (t, t+1, t+2, ... mod vocab); the
    next token follows from the current one, so the loss falls as the adapters learn the successor map."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        start = torch.randint(0, vocab, (batch, 1), generator=g)
        ids = (start + torch.arange(seq)) % vocab
        yield ids.to(device), ids.to(device)


def run(steps: int = 40, *, hidden: int = 128, intermediate: int = 256, layers: int = 2, vocab: int = 128,
        seq: int = 32, batch: int = 8, r: int = 16, alpha: float = 32, lr: float = 1e-2, double_quant: bool = True,
        device: str = "cpu", path: Optional[str] = None, log: Callable[[str], None] = print) -> Dict[str, object]:
    """Save (unless ``path`` holds a checkpoint), reload in 4-bit, patch, train ``steps`` AdamW steps. Returns the
    per-step losses, ms per step (steps 2+), the number of 4-bit layers pyflex runs and their bytes."""
    with tempfile.TemporaryDirectory() as tmp:
        path = path or tmp
        if not os.path.exists(os.path.join(path, "config.json")):
            save_tiny_llama(path, hidden=hidden, intermediate=intermediate, layers=layers, vocab=vocab)
        model = load_4bit(path, device=device, double_quant=double_quant)
        # --- the pyflex lines ---
        model = pyflex.patch_model(model, r=r, alpha=alpha, target_modules="all-linear")
        optimizer = torch.optim.AdamW(pyflex.tau_param_groups(model, lr=lr))
        # -------------------------
        from pyflex.layers.quantized import QuantizedFlexLinear
        quantized = [m for m in model.modules() if isinstance(m, QuantizedFlexLinear)]
        nf4_bytes = sum(m.nf4_weight.nbytes for m in quantized)
        dense_bytes = sum(m.nf4_weight.numel * 2 for m in quantized)
        log(f"pyflex QLoRA: {len(quantized)} 4-bit layers ({nf4_bytes / 2**10:.1f} KiB, bf16 would be "
            f"{dense_bytes / 2**10:.1f} KiB), {sum(p.numel() for p in model.parameters() if p.requires_grad):,} "
            f"trainable parameters, device {device}")
        losses: List[float] = []
        times: List[float] = []
        for step, (ids, labels) in enumerate(counting_batches(steps, batch, seq, vocab, device)):
            t0 = time.perf_counter()
            loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            pyflex.clip_grad_norm_(model, 1.0)
            optimizer.step()
            optimizer.zero_grad()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            losses.append(float(loss.detach()))
            if step % 10 == 0 or step == steps - 1:
                log(f"step {step:4d}  loss {losses[-1]:.4f}")
    ms = 1e3 * sum(times[1:]) / max(1, len(times) - 1)
    log(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} in {steps} steps, {ms:.1f} ms/step")
    return dict(losses=losses, ms_per_step=ms, quantized_layers=len(quantized), nf4_bytes=nf4_bytes)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--no-double-quant", action="store_true")
    args = ap.parse_args(argv)
    run(args.steps, layers=args.layers, hidden=args.hidden, intermediate=2 * args.hidden,
        double_quant=not args.no_double_quant, device=args.device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
