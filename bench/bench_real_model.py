"""Training-step time of each pyflex method against HF PEFT LoRA on a real model, CPU, in one run.

    python bench/bench_real_model.py [--batch-size 4] [--seq-len 64] [--steps 10] [--warmup 2] [--threads N]

The model is SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, vocab 49152, fp32) converted once by
``python tests/real/setup_real_tier.py``; the text is the fortunes of the real tier. Every method gets its own copy
of the model and its own AdamW, r = 8, α = 16 (LoRA on q,k,v,o of every layer; HLPT/H²LPT: their own placement).
One step = ``schedule.step(batch)`` (IST/LIFT) + forward + backward + clip + optimizer step + zero_grad, on the same
batches. Steps are interleaved across methods (round k runs step k of every method, in a rotating order) so that a
machine whose load drifts slows every method alike; the table gives the median and the mean over the timed steps
(IST's mean includes its importance update, three no-grad forwards every 10 steps; LIFT uses order="random" so that
its timed steps are a fair sample of its blocks) and the ratio of the median to
PEFT LoRA's. A script, not a test.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests", "real"))

import torch  # noqa: E402

try:
    import pyflex  # noqa: E402,F401
except ImportError:  # run as a script from anywhere: use this checkout
    sys.path.insert(1, ROOT)
    import pyflex  # noqa: E402,F401

import real_methods as R  # noqa: E402
import setup_real_tier  # noqa: E402

METHODS = [
    ("peft_lora", "peft", {}),
    ("pyflex_lora", "lora", {}),
    ("pyflex_lora_s", "lora_s", {}),                                   # pyflex's defaults: τ lr 0.4 × lr
    ("pyflex_lora_s_target", "lora_s", {"target_sparsity": 0.5}),
    ("ist_paper", "ist", {"mode": "paper"}),
    ("ist_official", "ist", {"mode": "official"}),
    ("lift", "lift", {"order": "random"}),
    ("hlpt", "hlpt", {}),
    ("h2lpt", "h2lpt", {}),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per method")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per method first")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--methods", default=",".join(m[0] for m in METHODS))
    args = ap.parse_args(argv)
    if not setup_real_tier.model_ready():
        print("the real model is not set up: " + "; ".join(setup_real_tier.missing()))
        return 1
    if args.threads:
        torch.set_num_threads(args.threads)
    wanted = args.methods.split(",")
    total = args.warmup + args.steps
    cfg = R.RealConfig(batch_size=args.batch_size, seq_len=args.seq_len, steps=total, eval_batches=1,
                       eval_batch_size=1, threads=args.threads)
    t0 = time.perf_counter()
    tier = R.load_tier(cfg)
    print(f"SmolLM2-135M-Instruct, batch {args.batch_size} x {args.seq_len} tokens, {args.warmup} warm-up + "
          f"{args.steps} timed steps per method, interleaved; {R.env_line()} (set-up {time.perf_counter() - t0:.0f} s)")

    setups = {}
    for label, method, kw in METHODS:
        if label not in wanted:
            continue
        # LIFT's schedule needs total_steps >= its 30 blocks; with order="random" the timed steps train blocks drawn
        # uniformly, so their mean is LIFT's mean step over a run (front2end would time only the first, deepest
        # backward blocks)
        mcfg = dataclasses.replace(cfg, steps=max(total, 64)) if method == "lift" else cfg
        setups[label] = R.METHODS[method](tier.fresh(), mcfg, seed=0, **kw)
    times = {label: [] for label in setups}
    trainable = {label: [] for label in setups}
    labels = list(setups)
    for step in range(total):
        order = labels[step % len(labels):] + labels[:step % len(labels)]
        batch = tier.train[step % len(tier.train)]
        for label in order:
            s = setups[label]
            params = [p for g in s.optimizer.param_groups for p in g["params"]]
            t = time.perf_counter()
            if s.schedule is not None:
                s.schedule.step(batch)
            loss = s.model(**batch).loss
            loss.backward()
            if isinstance(getattr(s.model, "peft_config", None), dict):
                torch.nn.utils.clip_grad_norm_([p for p in s.model.parameters() if p.requires_grad], cfg.clip)
            else:
                pyflex.clip_grad_norm_(s.model, cfg.clip)
            s.optimizer.step()
            s.optimizer.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t
            if step >= args.warmup:
                times[label].append(dt)
                trainable[label].append(sum(p.numel() for p in params if p.requires_grad))
        print(f"  round {step + 1}/{total} done", flush=True)

    ref = statistics.median(times["peft_lora"]) if "peft_lora" in times else None
    head = f"{'method':<14} {'median ms':>10} {'mean ms':>9} {'vs PEFT':>8} {'trainable/step':>15}  notes"
    print("\n" + head + "\n" + "-" * len(head))
    for label in labels:
        med, mean = statistics.median(times[label]) * 1e3, statistics.fmean(times[label]) * 1e3
        ratio = f"{med / (ref * 1e3):.2f}x" if ref else "-"
        print(f"{label:<14} {med:>10.0f} {mean:>9.0f} {ratio:>8} {statistics.fmean(trainable[label]):>15,.0f}  "
              f"{setups[label].notes}")
    print("vs PEFT: median step time / PEFT LoRA's median (below 1 = faster than PEFT)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
