"""Speed and memory of whole training steps, per fine-tuning method, on a LLaMA-style model built from a config.

Default (GPU): the LLaMA-style 1.1B model — hidden 2048, intermediate 5632, 22 layers, 32 heads / 4 KV
heads, vocab 32000, random init, bf16, SDPA, batch 8 × 1024 tokens, LoRA r=16 α=32 on q,k,v,o,gate,up,down,
AdamW lr 1e-4, median step time of steps 3–12 (``--warmup 2 --steps 10``).
Without a CUDA device the tiny config is used instead (unless ``--size`` says otherwise), so CI can smoke-test it.

    python bench/profile_model.py                                   # all methods, 1.1B on GPU / tiny on CPU
    python bench/profile_model.py --methods hf_floor,peft,pyflex_lora --out runs/profile
    python bench/profile_model.py --size tiny --methods hf_floor,pyflex_lora,peft --steps 3 --warmup 1

Methods: the table in pyflex/demo/methods.py, which the demo (``python -m pyflex.demo``) runs too; each method
runs in a fresh model and memory is freed between them. By default: hf_floor (frozen model, no adapters, backward
through every layer: the floor), peft / peft_bf16 (HF PEFT LoRA with fp32 / base-dtype adapters), pyflex_lora
(gated-MLP recompute on), pyflex_lora_norecompute, pyflex_lora_fused (+ liger-kernel; CUDA), pyflex_tau (PEFT_S
τ mask; per-layer sparsity reported), ist (its importance forwards every T_c steps are part of the step time),
lift_f2e / lift_e2f, hlpt / h2lpt.

Timing: each step is split into schedule (IST/LIFT ``step(batch)``), forward (including the loss), backward and
optimizer (``step`` + ``zero_grad``); CUDA events on GPU, ``time.perf_counter`` on CPU. Peak memory:
``torch.cuda.max_memory_allocated`` over the method (model, adapters, activations, optimizer state) on GPU. On CPU,
tensor bytes counted exactly: the storages alive at the start of one extra, untimed step (weights, buffers,
optimizer state) plus the peak of what that step allocates (:class:`pyflex.memory.LiveTensorBytes`); the same
quantity ``max_memory_allocated`` measures, without the CUDA allocator's rounding, so methods compare as on a GPU.
Writes ``profile.json`` and ``profile.png`` (step time with its phases and peak memory per method, the HF floor
marked). On a terminal, progress bars show the run and the current method.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from typing import Dict, List

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from pyflex.demo import harness, plots  # noqa: E402
from pyflex.demo.harness import PHASES, Column, PhaseTimer, fmt  # noqa: E402
from pyflex.demo.methods import METHODS, PROFILE_METHODS, MethodOptions, method, parse_methods  # noqa: E402

SIZES = {
    # the LLaMA-style 1.1B model the README's GPU tables use
    "1b": dict(hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4, vocab=32000, batch=8, seq=1024),
    # CPU smoke test: same shape family, seconds per method on 2 cores
    "tiny": dict(hidden=128, intermediate=344, layers=4, heads=4, kv_heads=2, vocab=512, batch=2, seq=64),
}
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}


def method_options(args) -> MethodOptions:
    return MethodOptions(r=args.r, alpha=args.alpha, lr=args.lr, seed=args.seed,
                         total_steps=args.warmup + args.steps, tau0=args.tau0, lam=args.tau_lam)


def model_shape(args) -> harness.ModelShape:
    return harness.ModelShape(vocab=args.vocab, hidden=args.hidden, intermediate=args.intermediate,
                              layers=args.layers, heads=args.heads, kv_heads=args.kv_heads,
                              max_positions=max(2048, args.seq))


# --------------------------------------------------------------------------------------------------
# one method
# --------------------------------------------------------------------------------------------------
def run_method(name: str, args, device: torch.device, dtype: torch.dtype, batch: dict, task) -> dict:
    """Warm-up + timed steps of one method on ``batch`` (harness.run_method builds it and measures memory)."""
    total = args.warmup + args.steps

    def profile(setup) -> dict:
        steps: List[Dict[str, float]] = []
        losses: List[float] = []
        active: List[List[int]] = []
        for step in range(total):
            timer = PhaseTimer(device)
            loss = harness.train_step(setup, batch, timer)
            steps.append(timer.phases_ms())
            losses.append(float(loss.detach().float()))
            if setup.schedule is not None:
                active.append(setup.schedule.active_layers)
            task.update(ms=steps[-1]["step"])
            if not task.shown and step + 1 in (1, total):  # no bar (a log file): the first and last step
                print(f"  {name:<12} step {step + 1}/{total}  {steps[-1]['step']:.1f} ms", flush=True)
        timed = steps[args.warmup:]
        median = {k: statistics.median(s[k] for s in timed) for k in ("step",) + PHASES}
        record = {
            "step_ms_median": median["step"],
            "step_ms_mean": statistics.fmean(s["step"] for s in timed),
            "phase_ms_median": {k: median[k] for k in PHASES},
            "tokens_per_s": args.batch * args.seq / (median["step"] / 1000.0),
            "losses": losses,
            "loss_finite": all(math.isfinite(v) for v in losses),
            "step_ms_all": [s["step"] for s in steps],
        }
        if active:
            timed_layers = sorted({i for a in active[args.warmup:] for i in a})
            record["active_layers_per_step"] = active
            record["timed_layers"] = timed_layers
        return record

    record = harness.run_method(name, method_options(args), device,
                                lambda: harness.build_llama(model_shape(args), device, dtype, seed=args.seed),
                                profile, measure_batch=batch)
    if record["status"] == "ok":
        record["peak_gib"] = record["peak_bytes"] / 2**30
    return record


# --------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------
def format_table(payload: dict) -> str:
    results = payload["results"]
    floor = results.get("hf_floor", {})
    floor_ms = floor.get("step_ms_median") if floor.get("status") == "ok" else None
    columns = (
        Column("step ms", 9, lambda r: f"{r['step_ms_median']:.2f}"),
        Column("× floor", 8, lambda r: fmt(r["step_ms_median"] / floor_ms if floor_ms else None, ".2f")),
        Column("tokens/s", 10, lambda r: f"{r['tokens_per_s']:,.0f}"),
        Column("peak GiB", 9, lambda r: f"{r['peak_gib']:.3f}"),
        Column("fwd", 8, lambda r: f"{r['phase_ms_median']['forward']:.2f}"),
        Column("bwd", 8, lambda r: f"{r['phase_ms_median']['backward']:.2f}"),
        Column("optim", 7, lambda r: f"{r['phase_ms_median']['optimizer']:.2f}"),
        Column("sched", 7, lambda r: f"{r['phase_ms_median']['schedule']:.2f}"),
        Column("trainable", 12, lambda r: f"{r['trainable_params']:,}"),
    )
    return "\n".join(harness.format_rows(payload["methods"], results, columns, notes=_notes))


def _notes(r: dict) -> str:
    notes = r.get("notes", "")
    if r.get("timed_layers") is not None:
        notes += f"; timed steps trained layers {_ranges(r['timed_layers'])}"
    if r.get("tau_sparsity_mean") is not None:
        notes += f"; τ sparsity {r['tau_sparsity_mean']:.1%}"
    return notes


def _ranges(indices: List[int]) -> str:
    """[0, 1, 2, 5] → "0-2,5"."""
    runs: List[List[int]] = []
    for i in indices:
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=list(SIZES), default=None,
                   help="preset: 1b (default on GPU) or tiny (default without CUDA); the flags below override it")
    for flag in ("hidden", "layers", "intermediate", "heads", "kv-heads", "vocab", "batch", "seq"):
        p.add_argument(f"--{flag}", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10; 3 for tiny)")
    p.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 2; 1 for tiny)")
    cuda_only = [n for n, m in METHODS.items() if m.cuda_only]
    p.add_argument("--methods", default=None,
                   help=f"comma list of: {', '.join(METHODS)} (default: {', '.join(PROFILE_METHODS)}; without "
                        f"CUDA all but {', '.join(cuda_only)})")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bf16 on GPU, fp32 on CPU")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--tau0", type=float, default=0.0, help="pyflex_tau: initial τ (paper: 0)")
    p.add_argument("--tau-lam", type=float, default=1e-4, help="pyflex_tau: λ")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/profile", help="directory for profile.json and profile.png")
    return p.parse_args(argv)


def resolve_args(args) -> List[str]:
    """Fill defaults from the preset; returns notes to print (e.g. why the tiny config was chosen)."""
    notes = []
    try:
        device = harness.resolve_device(args.device)
    except ValueError as exc:
        raise SystemExit(str(exc)) from exc
    args.device = str(device)
    if args.size is None:
        args.size = "1b" if device.type == "cuda" else "tiny"
        if device.type != "cuda":
            notes.append("no CUDA device: using the tiny config (--size tiny) so the run takes seconds; "
                         "pass --size 1b to profile the 1.1B model on CPU anyway")
    for key, value in SIZES[args.size].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    tiny = args.size == "tiny"
    args.steps = args.steps if args.steps is not None else (3 if tiny else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if tiny else 2)
    if args.dtype is None:
        args.dtype = "bf16" if device.type == "cuda" else "fp32"
    harness.check_flags(args, ("hidden", "layers", "intermediate", "heads", "kv_heads", "vocab", "batch", "seq", "steps",
                               "r"), 1)
    harness.check_flags(args, ("warmup",), 0)
    if args.hidden % args.heads or args.heads % args.kv_heads:
        raise SystemExit(f"--hidden {args.hidden} must be a multiple of --heads {args.heads}, and --heads a multiple "
                         f"of --kv-heads {args.kv_heads}")
    return notes


def main(argv=None) -> int:
    args = parse_args(argv)
    notes = resolve_args(args)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if args.methods is None:
        # liger's kernels need CUDA (or the Triton interpreter, which cannot run all of them): by default a CPU run
        # leaves the fused method out instead of failing on it; naming it explicitly still runs it.
        skipped = [] if device.type == "cuda" else [m for m in PROFILE_METHODS if method(m).cuda_only]
        args.methods = ",".join(m for m in PROFILE_METHODS if m not in skipped)
        if skipped:
            notes.append(f"no CUDA device: leaving out {', '.join(skipped)} (name it in --methods to force)")
    try:
        methods = parse_methods(args.methods)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    for note in notes:
        print(f"note: {note}")
    env = harness.environment(device)
    config = {k: getattr(args, k) for k in ("size", "hidden", "intermediate", "layers", "heads", "kv_heads", "vocab",
                                            "batch", "seq", "steps", "warmup", "dtype", "r", "alpha", "lr", "tau0",
                                            "tau_lam", "seed")}
    print(f"profile: {args.size} (hidden {args.hidden}, {args.layers} layers, {args.heads}/{args.kv_heads} heads, "
          f"vocab {args.vocab}), batch {args.batch}×{args.seq}, {args.dtype}, LoRA r={args.r} α={args.alpha:g}, "
          f"median of steps {args.warmup + 1}–{args.warmup + args.steps}")
    print(f"device {env['device']} ({env['device_name']}), torch {env['torch']}, transformers {env['transformers']}, "
          f"peft {env['peft']}, triton {env['triton']}, pyflex backend {env['pyflex_backend']}", flush=True)

    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(device)
    batch = {"input_ids": ids, "labels": ids}
    results = {}
    started = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    json_path, png_path = os.path.join(args.out, "profile.json"), os.path.join(args.out, "profile.png")
    payload = {"config": config, "environment": env, "methods": methods, "results": results, "notes": notes}
    steps_per_method = args.warmup + args.steps
    progress = harness.Progress(steps_per_method * len(methods), "profile")
    try:
        for name in methods:
            task = progress.task(name, steps_per_method)
            results[name] = run_method(name, args, device, dtype, batch, task)
            task.close()
            if results[name]["status"] != "ok":
                progress.write(f"  {name:<12} {results[name]['status'].upper()}: {results[name]['error']}")
            payload["total_seconds"] = time.perf_counter() - started
            with open(json_path, "w") as f:  # after every method, so an interrupted run keeps what it measured
                json.dump({**payload, "methods": list(results)}, f, indent=1)
    finally:
        progress.close()
    payload["plot"] = plots.profile_chart(payload, png_path)
    with open(json_path, "w") as f:
        json.dump(payload, f, indent=1)
    print()
    print(format_table(payload))
    for name in methods:
        r = results[name]
        if r.get("tau_sparsity_per_layer"):
            per = ", ".join(f"L{k}:{fmt(v, '.0%')}" for k, v in r["tau_sparsity_per_layer"].items())
            print(f"{name}: τ sparsity per layer: {per}")
        if r.get("ist_importance"):
            print(f"{name}: IST importance per layer: "
                  + ", ".join(f"L{i}:{v:+.3f}" for i, v in zip(r["ist_layers"], r["ist_importance"])))
    written = f"{json_path} and {png_path}" if payload["plot"] else f"{json_path} (no method ran: no picture)"
    print(f"\nwrote {written} (total {payload['total_seconds']:.1f} s)")
    return harness.exit_status(methods, results, json_path, fail_on=("failed", "oom", "skipped"))


if __name__ == "__main__":
    sys.exit(main())
