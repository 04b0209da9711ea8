"""QLoRA training step: pyflex on a 4-bit (bitsandbytes NF4) base against PEFT's QLoRA and against pyflex on the
dense base, same model, same batches, same run: step time (median and minimum wall time, and the median of the
process's CPU time, which another process's load on a shared machine disturbs less; variants interleaved step by
step so that a busy machine slows them alike), weight bytes and the step's peak bytes.

    python bench/bench_qlora.py                                # CPU: Llama 256/704 x 4 layers, fp32, 2x64 tokens
    python bench/bench_qlora.py --dtype bfloat16 --steps 2     # CPU memory rows in bf16 (bf16 matmuls are slow on CPU)
    python bench/bench_qlora.py --device cuda --size 1b        # GPU: the 1.1B Llama, bf16, 8x1024 tokens

Rows: ``pyflex-qlora`` (pyflex.patch_model on the 4-bit model), ``peft-qlora`` (PEFT LoRA on the same 4-bit model,
bitsandbytes' MatMul4Bit), ``pyflex-dense`` (pyflex on the unquantized model in the same dtype). Ratios are against
``pyflex-dense`` and ``peft-qlora``. GPU targets (issue #14): pyflex-qlora ≤ 1.2× the pyflex-dense step time and
weight bytes ≤ 0.4× of bf16.

Peak bytes: on CPU ``pyflex.memory.step_peak_bytes`` (exact: the storages alive before the step + the peak the step
allocates, one measured step after the timed ones); on CUDA the model's own persistent bytes + what
``torch.cuda.max_memory_allocated`` rises by over one step (the run's other models stay resident and are left out). The
models are in train mode throughout (an eval-mode bitsandbytes forward on CPU repacks the weights in place); the
model is random-init (no hub), saved to a temporary directory and reloaded in 4-bit as a user would load one.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

SIZES = {
    "cpu": dict(hidden=256, intermediate=704, layers=4, heads=4, kv_heads=2, vocab=512, batch=2, seq=64),
    "1b": dict(hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4, vocab=32000, batch=8, seq=1024),
}
VARIANTS = ("pyflex-qlora", "peft-qlora", "pyflex-dense")


def save_model(args, path):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    conf = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                       num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
                       max_position_embeddings=max(256, args.seq), tie_word_embeddings=False)
    with torch.device("cpu"):
        model = LlamaForCausalLM(conf).to(getattr(torch, args.dtype))
    model.save_pretrained(path)
    del model


def build(args, variant, path):
    import pyflex
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    dtype = getattr(torch, args.dtype)
    kw = dict(device_map=args.device, dtype=dtype)
    if variant != "pyflex-dense":
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=not args.no_double_quant)
    model = AutoModelForCausalLM.from_pretrained(path, **kw)
    model.train()                                     # before any forward
    if variant == "peft-qlora":
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules="all-linear",
                                                 lora_dropout=0.0))
        model.train()
    else:
        pyflex.patch_model(model, r=args.r, alpha=2 * args.r, target_modules="all-linear")
    return model


def weight_bytes(model) -> int:
    """Bytes of the distinct storages of the frozen weights (parameters that need no grad, and buffers)."""
    tensors = [p for p in model.parameters() if not p.requires_grad] + list(model.buffers())
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


class Runner:
    def __init__(self, args, variant, path, batches):
        self.variant = variant
        torch.manual_seed(0)
        self.model = build(args, variant, path)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=1e-4)
        self.batches = batches
        self.device = args.device
        self.times, self.cpu_times = [], []
        self.weights = weight_bytes(self.model)

    def step(self, ids):
        loss = self.model(input_ids=ids, labels=ids).loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss

    def timed_step(self, ids):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        self.step(ids)
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - t0)
        self.cpu_times.append(time.process_time() - c0)

    def peak_bytes(self, ids) -> int:
        """This model's step peak: its own persistent bytes (weights, grads, optimizer state) + what the step adds
        at its worst moment (the other models of the run stay resident and are left out)."""
        from pyflex.memory import persistent_bytes, step_peak_bytes
        if self.device.startswith("cuda"):
            from pyflex.memory import CudaPeakMemory
            device = torch.device(self.device)
            torch.cuda.synchronize(device)
            before = torch.cuda.memory_allocated(device)
            own = persistent_bytes(self.model, self.opt)
            with CudaPeakMemory(device) as mem:
                self.step(ids)
            return own + mem.peak_bytes - before
        return step_peak_bytes(self.model, self.opt, lambda: self.step(ids))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", choices=list(SIZES), default=None, help="preset (default: cpu, or 1b on CUDA)")
    for key in SIZES["cpu"]:
        ap.add_argument(f"--{key}", type=int, default=None)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="weights and compute (default: float32 on CPU, bfloat16 on CUDA)")
    ap.add_argument("--no-double-quant", action="store_true")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-bytes step")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.size = args.size or ("1b" if cuda else "cpu")
    for key, value in SIZES[args.size].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    if args.hidden % 64 or args.intermediate % 64:
        ap.error("--hidden and --intermediate must be multiples of 64 (bitsandbytes' CPU 4-bit dequantization)")
    import bitsandbytes
    import peft
    import transformers

    variants = args.variants.split(",")
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(args.device)
               for _ in range(args.warmup + args.steps + 1)]
    with tempfile.TemporaryDirectory() as path:
        save_model(args, path)
        runners = [Runner(args, v, path, batches) for v in variants]
        for i, ids in enumerate(batches[:args.warmup + args.steps]):
            for runner in (runners if i % 2 == 0 else runners[::-1]):   # alternate the order: no variant always first
                runner.timed_step(ids)
        peaks = {}
        if not args.no_memory:
            for runner in runners:
                peaks[runner.variant] = runner.peak_bytes(batches[-1])
    rows = {}
    for runner in runners:
        times = runner.times[args.warmup:]
        rows[runner.variant] = dict(ms=1e3 * statistics.median(times), ms_min=1e3 * min(times),
                                    cpu_ms=1e3 * statistics.median(runner.cpu_times[args.warmup:]),
                                    weights=runner.weights, peak=peaks.get(runner.variant))
    mib = 2 ** 20
    versions = (f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
                f"bitsandbytes {bitsandbytes.__version__}")
    where = torch.cuda.get_device_name() if cuda else f"{platform.processor() or platform.machine()}, " \
                                                       f"{torch.get_num_threads()} threads"
    print(f"{args.device} ({where}); {versions}")
    print(f"Llama hidden {args.hidden} intermediate {args.intermediate} layers {args.layers} vocab {args.vocab}; "
          f"{args.batch}x{args.seq} tokens; r {args.r}; {args.dtype}; double quant {not args.no_double_quant}; "
          f"median of {args.steps} steps after {args.warmup} warm-up")
    print(f"{'variant':14s} {'ms/step':>9s} {'min ms':>8s} {'cpu ms':>8s} {'weights MiB':>12s} {'peak MiB':>9s}  ratios")
    for name, r in rows.items():
        ratios = []
        for other in ("pyflex-dense", "peft-qlora"):
            if other in rows and other != name:
                o = rows[other]
                text = (f"time {r['ms'] / o['ms']:.2f}x (min {r['ms_min'] / o['ms_min']:.2f}x, cpu "
                        f"{r['cpu_ms'] / o['cpu_ms']:.2f}x) weights {r['weights'] / o['weights']:.2f}x")
                if r["peak"] and o["peak"]:
                    text += f" peak {r['peak'] / o['peak']:.2f}x"
                ratios.append(f"vs {other}: {text}")
        peak = f"{r['peak'] / mib:9.2f}" if r["peak"] else f"{'-':>9s}"
        print(f"{name:14s} {r['ms']:9.1f} {r['ms_min']:8.1f} {r['cpu_ms']:8.1f} {r['weights'] / mib:12.2f} {peak}  "
              f"{'; '.join(ratios)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), versions=versions, device=where, rows=rows), f, indent=2)


if __name__ == "__main__":
    main()
