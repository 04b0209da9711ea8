"""Speed and memory of whole training steps, per fine-tuning method, on a LLaMA-style model built from a config.

Default (GPU): the LLaMA-style 1.1B model — hidden 2048, intermediate 5632, 22 layers, 32 heads / 4 KV
heads, vocab 32000, random init, bf16, SDPA, batch 8 × 1024 tokens, LoRA r=16 α=32 on q,k,v,o,gate,up,down,
AdamW lr 1e-4, median step time of steps 3–12 (``--warmup 2 --steps 10``).
Without a CUDA device the tiny config is used instead (unless ``--size`` says otherwise), so CI can smoke-test it.

    python bench/profile_model.py                                   # all methods, 1.1B on GPU / tiny on CPU
    python bench/profile_model.py --methods hf_floor,peft,pyflex_lora --out runs/profile
    python bench/profile_model.py --size tiny --methods hf_floor,pyflex_lora,peft --steps 3 --warmup 1

Methods (each in a fresh model; memory is freed between them):
    hf_floor     frozen model, no adapters, backward through every layer (the embeddings' output requires grad)
    peft         HF PEFT LoRA, default (fp32 adapters on the bf16 model)
    peft_bf16    HF PEFT LoRA with bf16 adapters (autocast_adapter_dtype=False)
    pyflex_lora  pyflex.patch_model LoRA (gated-MLP recompute on: the default, see pyflex.layers.gated_mlp)
    pyflex_lora_norecompute  the same with patch_model(recompute_mlp=False): the MLP keeps what eager keeps
    pyflex_lora_fused  pyflex LoRA + pyflex.fuse_model_ops (liger-kernel RMSNorm, SwiGLU, fused linear CE; CUDA)
    pyflex_tau   pyflex LoRA + PEFT_S τ mask (pyflex.tau_param_groups); reports per-layer sparsity
    ist          pyflex LoRA + ImportanceSchedule (its importance forwards every T_c steps are part of the step time)
    lift_f2e     pyflex LoRA + LiftSchedule(order="front2end")
    lift_e2f     pyflex LoRA + LiftSchedule(order="end2front")
    hlpt, h2lpt  pyflex.apply_hlpt(variant=...)

Timing: each step is split into schedule (IST/LIFT ``step(batch)``), forward (including the loss), backward and
optimizer (``step`` + ``zero_grad``); CUDA events on GPU, ``time.perf_counter`` on CPU. Peak memory:
``torch.cuda.max_memory_allocated`` over the method (model, adapters, activations, optimizer state) on GPU. On CPU,
tensor bytes counted exactly: the storages alive at the start of one extra, untimed step (weights, buffers,
optimizer state) plus the peak of what that step allocates (:class:`pyflex.memory.LiveTensorBytes`); the same
quantity ``max_memory_allocated`` measures, without the CUDA allocator's rounding, so methods compare as on a GPU.
Writes ``profile.json`` and ``profile.png``.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
import warnings  # noqa: E402

# transformers 5 warns from inside PEFT on every get_peft_model; not the user's concern here
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

SIZES = {
    # the LLaMA-style 1.1B model the README's GPU tables use
    "1b": dict(hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4, vocab=32000, batch=8, seq=1024),
    # CPU smoke test: same shape family, seconds per method on 2 cores
    "tiny": dict(hidden=128, intermediate=344, layers=4, heads=4, kv_heads=2, vocab=512, batch=2, seq=64),
}
METHOD_NAMES = ("hf_floor", "peft", "peft_bf16", "pyflex_lora", "pyflex_lora_norecompute", "pyflex_tau", "ist",
                "lift_f2e", "lift_e2f", "hlpt", "h2lpt", "pyflex_lora_fused")
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}
PHASES = ("schedule", "forward", "backward", "optimizer")


# --------------------------------------------------------------------------------------------------
# model and methods
# --------------------------------------------------------------------------------------------------
def build_model(args, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Random-init LlamaForCausalLM, built directly on ``device`` in ``dtype`` (no fp32 copy of a 1.1B model)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=max(2048, args.seq),
                         tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    torch.manual_seed(args.seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.to(device=device, dtype=dtype)


@dataclass
class Setup:
    model: torch.nn.Module
    optimizer: Optional[torch.optim.Optimizer]
    schedule: Optional[object] = None
    report: Optional[Callable[[], dict]] = None   # method-specific extras for the JSON, read after the last step
    notes: str = ""


def _adamw(params, args) -> torch.optim.Optimizer:
    params = list(params)
    # fused AdamW on CUDA is what a tuned user would pick; foreach elsewhere
    fused = bool(params) and params[0].is_cuda
    return torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, fused=fused)


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def setup_hf_floor(model, args) -> Setup:
    for p in model.parameters():
        p.requires_grad_(False)
    # A frozen model with inputs that need no grad would not run backward at all; making the embeddings' output
    # require grad makes backward traverse every layer (dX only), which is the floor any adapter method pays.
    model.get_input_embeddings().register_forward_hook(lambda module, inputs, output: output.requires_grad_(True))
    return Setup(model, None, notes="no adapters, dX through every layer")


def _setup_peft(model, args, bf16_adapters: bool) -> Setup:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=0.0,
                                             target_modules=TARGET_MODULES),
                           autocast_adapter_dtype=not bf16_adapters)
    dtypes = sorted({str(p.dtype).replace("torch.", "") for p in _trainable(model)})
    return Setup(model, _adamw(_trainable(model), args), notes=f"adapters {'/'.join(dtypes)}")


def setup_peft(model, args) -> Setup:
    return _setup_peft(model, args, bf16_adapters=False)


def setup_peft_bf16(model, args) -> Setup:
    return _setup_peft(model, args, bf16_adapters=True)


def _patch(model, args, **kwargs):
    import pyflex

    return pyflex.patch_model(model, r=args.r, alpha=args.alpha, target_modules=TARGET_MODULES, **kwargs)


def setup_pyflex_lora(model, args) -> Setup:
    _patch(model, args)
    return Setup(model, _adamw(_trainable(model), args))


def setup_pyflex_lora_norecompute(model, args) -> Setup:
    _patch(model, args, recompute_mlp=False)
    return Setup(model, _adamw(_trainable(model), args), notes="recompute_mlp=False")


def setup_pyflex_lora_fused(model, args) -> Setup:
    import pyflex

    pyflex.fuse_model_ops(model)  # liger-kernel RMSNorm + SwiGLU + fused linear cross-entropy (no logits in training)
    _patch(model, args)
    fused = pyflex.fused_ops(model)
    return Setup(model, _adamw(_trainable(model), args),
                 notes="fused " + ", ".join(k for k in ("rms_norm", "swiglu", "cross_entropy") if fused.get(k)))


def _per_layer_sparsity(model) -> Dict[str, Optional[float]]:
    """Mean τ-mask sparsity of each layer's FlexLinears (last forward), keyed by layer index."""
    import pyflex

    return {str(index): value for index, value in pyflex.get_registry(model).tau_sparsity().items()}


def setup_pyflex_tau(model, args) -> Setup:
    import pyflex

    _patch(model, args, tau=True, lam=args.tau_lam, tau0=args.tau0)
    optimizer = torch.optim.AdamW(pyflex.tau_param_groups(model, lr=args.lr, weight_decay=0.0))

    def report():
        per_layer = _per_layer_sparsity(model)
        values = [v for v in per_layer.values() if v is not None]
        return {"tau_sparsity_per_layer": per_layer,
                "tau_sparsity_mean": sum(values) / len(values) if values else None,
                "tau_values": dict(pyflex.tau_values(model))}
    return Setup(model, optimizer, report=report, notes=f"τ0={args.tau0:g}, λ={args.tau_lam:g}")


def setup_ist(model, args) -> Setup:
    from pyflex.methods.ist import ImportanceSchedule

    _patch(model, args)
    schedule = ImportanceSchedule(model, seed=args.seed)
    optimizer = _adamw(schedule.trainable_parameters(), args)
    schedule.attach_optimizer(optimizer)

    def report():
        return {"ist_importance": [float(v) for v in schedule.importance.tolist()],
                "ist_layers": list(schedule.layers), "ist_updates": len(schedule.history)}
    return Setup(model, optimizer, schedule, report,
                 notes=f"{schedule.n_u}/{len(schedule.layers)} layers/step, importance every {schedule.t_c} steps")


def _setup_lift(model, args, order: str) -> Setup:
    import pyflex
    from pyflex.methods.lift import LiftSchedule

    _patch(model, args)
    n_layers = len(pyflex.get_registry(model))
    # LIFT needs ⌊t/N⌋ >= 1 steps per block; with fewer profiled steps than blocks the sequence is one step per
    # block, so the profiled steps cover the first warmup+steps blocks of the order (listed in the JSON).
    total = max(args.warmup + args.steps, n_layers)
    schedule = LiftSchedule(model, total_steps=total, order=order, seed=args.seed)
    optimizer = _adamw(schedule.trainable_parameters(), args)
    schedule.attach_optimizer(optimizer)
    covered = list(schedule.sequence[:args.warmup + args.steps])

    def report():
        return {"lift_blocks_per_step": covered, "lift_total_steps": total}
    return Setup(model, optimizer, schedule, report,
                 notes=f"blocks {covered[args.warmup]}..{covered[-1]} in the timed steps")


def setup_lift_f2e(model, args) -> Setup:
    return _setup_lift(model, args, "front2end")


def setup_lift_e2f(model, args) -> Setup:
    return _setup_lift(model, args, "end2front")


def _setup_hlpt(model, args, variant: str) -> Setup:
    from pyflex.methods.hlpt import apply_hlpt

    apply_hlpt(model, variant=variant, r=args.r, alpha=args.alpha)
    plan = model.pyflex_plan
    return Setup(model, _adamw(_trainable(model), args),
                 notes=f"LoRA on down_proj L{plan.lora_layers[0]}-{plan.lora_layers[-1]}, "
                       f"prefix {len(plan.prefix_layers)} layers")


def setup_hlpt(model, args) -> Setup:
    return _setup_hlpt(model, args, "hlpt")


def setup_h2lpt(model, args) -> Setup:
    return _setup_hlpt(model, args, "h2lpt")


CUDA_ONLY_METHODS = ("pyflex_lora_fused",)
SETUPS: Dict[str, Callable] = {name: globals()[f"setup_{name}"] for name in METHOD_NAMES}


# --------------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------------
class PhaseTimer:
    """Marks between phases of one step: CUDA events on GPU (no sync inside the step), perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: List = []

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def durations_ms(self) -> List[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [1000.0 * (b - a) for a, b in zip(self.marks, self.marks[1:])]


def _train_step(model, setup: Setup, batch: dict, timer: Optional["PhaseTimer"] = None) -> torch.Tensor:
    mark = timer.mark if timer is not None else (lambda: None)
    mark()
    if setup.schedule is not None:
        setup.schedule.step(batch)
    mark()
    loss = model(**batch).loss
    mark()
    loss.backward()
    mark()
    if setup.optimizer is not None:
        setup.optimizer.step()
        setup.optimizer.zero_grad(set_to_none=True)
    else:
        model.zero_grad(set_to_none=True)
    mark()
    return loss


def run_method(name: str, args, device: torch.device, dtype: torch.dtype, batch: dict, progress) -> dict:
    from pyflex.memory import CudaPeakMemory, step_peak_bytes

    _free(device)
    model = setup = None
    try:
        with CudaPeakMemory(device) if device.type == "cuda" else contextlib.nullcontext() as memory:
            model = build_model(args, device, dtype)
            torch.manual_seed(args.seed)
            setup = SETUPS[name](model, args)
            model = setup.model
            model.train()
            params = [] if setup.optimizer is None else [p for g in setup.optimizer.param_groups for p in g["params"]]
            trainable = sum(p.numel() for p in params)
            steps: List[Dict[str, float]] = []
            losses: List[float] = []
            for step in range(args.warmup + args.steps):
                timer = PhaseTimer(device)
                loss = _train_step(model, setup, batch, timer)
                phases = dict(zip(PHASES, timer.durations_ms()))
                phases["step"] = sum(phases.values())
                steps.append(phases)
                losses.append(float(loss.detach().float()))
                progress(name, step + 1, args.warmup + args.steps, phases["step"])
            extras = setup.report() if setup.report is not None else {}
            if memory is None:  # CPU: one extra, untimed step counted exactly
                peak_bytes = step_peak_bytes(model, setup.optimizer, lambda: _train_step(model, setup, batch))
                memory_kind = "tensor bytes (persistent + one step's peak, pyflex.memory.LiveTensorBytes)"
        if memory is not None:
            peak_bytes, memory_kind = memory.peak_bytes, memory.kind
        timed = steps[args.warmup:]
        median = {k: statistics.median(s[k] for s in timed) for k in ("step",) + PHASES}
        tokens = args.batch * args.seq
        return {
            "status": "ok",
            "step_ms_median": median["step"],
            "step_ms_mean": statistics.fmean(s["step"] for s in timed),
            "phase_ms_median": {k: median[k] for k in PHASES},
            "tokens_per_s": tokens / (median["step"] / 1000.0),
            "peak_gib": peak_bytes / 2**30,
            "memory_kind": memory_kind,
            "trainable_params": trainable,
            "losses": losses,
            "loss_finite": all(math.isfinite(v) for v in losses),
            "step_ms_all": [s["step"] for s in steps],
            "notes": setup.notes,
            **extras,
        }
    except torch.cuda.OutOfMemoryError as exc:
        return {"status": "oom", "error": f"CUDA out of memory: {str(exc).splitlines()[0]}"}
    except Exception as exc:  # noqa: BLE001 - every method gets its row; the command fails at the end
        return {"status": "failed", "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    finally:
        del model, setup
        _free(device)


def _free(device: torch.device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _progress_printer(total_methods: int):
    tqdm = None
    if sys.stdout.isatty():  # a bar in a log file is noise; plain lines there
        try:
            from tqdm.auto import tqdm
        except ImportError:
            pass
    bars = {}

    def progress(name, step, total, step_ms):
        if tqdm is not None:
            bar = bars.get(name)
            if bar is None:
                bar = bars[name] = tqdm(total=total, desc=f"{name:<12}", unit="step", leave=True, file=sys.stdout)
            bar.set_postfix_str(f"{step_ms:.1f} ms")
            bar.update(1)
            if step == total:
                bar.close()
        elif step == total or step == 1:
            print(f"  {name:<12} step {step}/{total}  {step_ms:.1f} ms", flush=True)
    return progress


# --------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------
def format_table(payload: dict) -> str:
    results = payload["results"]
    floor = results.get("hf_floor", {}).get("step_ms_median") if results.get("hf_floor", {}).get("status") == "ok" \
        else None
    width = max([12] + [len(n) for n in payload["methods"]])
    head = (f"{'method':<{width}} {'step ms':>9} {'× floor':>8} {'tokens/s':>10} {'peak GiB':>9} {'fwd':>8} "
            f"{'bwd':>8} {'optim':>7} {'sched':>7} {'trainable':>12}  notes")
    lines = [head, "-" * len(head)]
    for name in payload["methods"]:
        r = results[name]
        if r["status"] != "ok":
            lines.append(f"{name:<{width}} {r['status'].upper()}: {r['error']}")
            continue
        ph = r["phase_ms_median"]
        ratio = f"{r['step_ms_median'] / floor:.2f}" if floor else "-"
        extra = ""
        if r.get("tau_sparsity_mean") is not None:
            extra = f"; τ sparsity {r['tau_sparsity_mean']:.1%}"
        lines.append(f"{name:<{width}} {r['step_ms_median']:>9.2f} {ratio:>8} {r['tokens_per_s']:>10,.0f} "
                     f"{r['peak_gib']:>9.3f} {ph['forward']:>8.2f} {ph['backward']:>8.2f} {ph['optimizer']:>7.2f} "
                     f"{ph['schedule']:>7.2f} {r['trainable_params']:>12,}  {r['notes']}{extra}")
    return "\n".join(lines)


def plot(payload: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in payload["methods"] if payload["results"][n]["status"] == "ok"]
    if not names:
        return
    res = payload["results"]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(max(10, 1.3 * len(names) + 4), 4.8))
    bottom = [0.0] * len(names)
    for phase, color in zip(PHASES, ("#bbbbbb", "#4c72b0", "#dd8452", "#55a868")):
        values = [res[n]["phase_ms_median"][phase] for n in names]
        ax_t.bar(names, values, bottom=bottom, label=phase, color=color)
        bottom = [b + v for b, v in zip(bottom, values)]
    for i, n in enumerate(names):
        ax_t.text(i, bottom[i], f"{res[n]['step_ms_median']:.1f}", ha="center", va="bottom", fontsize=8)
    if "hf_floor" in names:
        ax_t.axhline(res["hf_floor"]["step_ms_median"], color="black", ls="--", lw=0.8, label="HF floor")
    ax_t.set(title="median step time (phase medians stacked)", ylabel="ms")
    ax_t.legend(fontsize=8)
    mem = [res[n]["peak_gib"] for n in names]
    ax_m.bar(names, mem, color="#8172b2")
    for i, v in enumerate(mem):
        ax_m.text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    on_cuda = payload["environment"]["device"].startswith("cuda")
    ax_m.set(title="peak memory" + (" (cuda max_memory_allocated)" if on_cuda else " (tensor bytes)"),
             ylabel="GiB")
    for ax in (ax_t, ax_m):
        ax.tick_params(axis="x", rotation=35)
    c = payload["config"]
    env = payload["environment"]
    fig.suptitle(f"{c['size']}: hidden {c['hidden']}, {c['layers']} layers, batch {c['batch']}×{c['seq']}, "
                 f"{c['dtype']}, r={c['r']} — {env['device_name']}, torch {env['torch']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
    p.add_argument("--methods", default=None,
                   help=f"comma list of: {', '.join(METHOD_NAMES)} (default: all; without CUDA all but "
                        f"{', '.join(CUDA_ONLY_METHODS)})")
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
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available")
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
    for key in ("hidden", "layers", "intermediate", "heads", "kv_heads", "vocab", "batch", "seq", "steps", "r"):
        if getattr(args, key) < 1:
            raise SystemExit(f"--{key.replace('_', '-')}={getattr(args, key)} is not allowed; it must be >= 1")
    if args.warmup < 0:
        raise SystemExit(f"--warmup={args.warmup} is not allowed; it must be >= 0")
    if args.hidden % args.heads or args.heads % args.kv_heads:
        raise SystemExit(f"--hidden {args.hidden} must be a multiple of --heads {args.heads}, and --heads a multiple "
                         f"of --kv-heads {args.kv_heads}")
    return notes


def _environment(device: torch.device) -> dict:
    import transformers

    import pyflex

    env = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
           else (platform.processor() or platform.machine()), "cpu_threads": torch.get_num_threads(),
           "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "pyflex_backend": f"{pyflex.current_backend_name()} -> {pyflex.resolve_backend(device)[0]}",
           "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    for mod in ("peft", "triton"):
        try:
            env[mod] = __import__(mod).__version__
        except ImportError:
            env[mod] = None
    return env


def main(argv=None) -> int:
    args = parse_args(argv)
    notes = resolve_args(args)
    if args.methods is None:
        # liger's kernels need CUDA (or the Triton interpreter, which cannot run all of them): by default a CPU run
        # leaves the fused method out instead of failing on it; naming it explicitly still runs it.
        on_cuda = torch.device(args.device).type == "cuda"
        args.methods = ",".join(m for m in METHOD_NAMES if on_cuda or m not in CUDA_ONLY_METHODS)
        if not on_cuda:
            notes.append(f"no CUDA device: leaving out {', '.join(CUDA_ONLY_METHODS)} (name it in --methods to force)")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in SETUPS]
    if unknown or not methods:
        print(f"--methods {args.methods!r}: unknown {unknown or 'empty list'}; allowed: {', '.join(METHOD_NAMES)}",
              file=sys.stderr)
        return 2
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    for note in notes:
        print(f"note: {note}")
    env = _environment(device)
    config = {k: getattr(args, k) for k in ("size", "hidden", "intermediate", "layers", "heads", "kv_heads", "vocab",
                                            "batch", "seq", "steps", "warmup", "dtype", "r", "alpha", "lr", "tau0",
                                            "tau_lam", "seed")}
    print(f"profile: {args.size} (hidden {args.hidden}, {args.layers} layers, {args.heads}/{args.kv_heads} heads, "
          f"vocab {args.vocab}), batch {args.batch}×{args.seq}, {args.dtype}, LoRA r={args.r} α={args.alpha:g}, "
          f"median of steps {args.warmup + 1}–{args.warmup + args.steps}")
    print(f"device {env['device']} ({env['device_name']}), torch {env['torch']}, transformers {env['transformers']}, "
          f"peft {env['peft']}, triton {env['triton']}, pyflex backend {env['pyflex_backend']}")

    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(device)
    batch = {"input_ids": ids, "labels": ids}
    progress = _progress_printer(len(methods))
    results = {}
    started = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    json_path, png_path = os.path.join(args.out, "profile.json"), os.path.join(args.out, "profile.png")
    payload = {"config": config, "environment": env, "methods": methods, "results": results, "notes": notes}
    for name in methods:
        results[name] = run_method(name, args, device, dtype, batch, progress)
        if results[name]["status"] != "ok":
            print(f"  {name:<12} {results[name]['status'].upper()}: {results[name]['error']}", flush=True)
        payload["total_seconds"] = time.perf_counter() - started
        with open(json_path, "w") as f:  # after every method, so an interrupted run keeps what it measured
            json.dump({**payload, "methods": list(results)}, f, indent=1)
    plot(payload, png_path)
    with open(json_path, "w") as f:
        json.dump(payload, f, indent=1)
    print()
    print(format_table(payload))
    for name in methods:
        r = results[name]
        if r.get("tau_sparsity_per_layer"):
            per = ", ".join(f"L{k}:{'-' if v is None else f'{v:.0%}'}" for k, v in r["tau_sparsity_per_layer"].items())
            print(f"{name}: τ sparsity per layer: {per}")
        if r.get("ist_importance"):
            print(f"{name}: IST importance per layer: "
                  + ", ".join(f"L{i}:{v:+.3f}" for i, v in zip(r["ist_layers"], r["ist_importance"])))
    print(f"\nwrote {json_path} and {png_path} (total {payload['total_seconds']:.1f} s)")
    bad = [m for m in methods if results[m]["status"] != "ok"]
    if bad:
        print(f"{len(bad)} method(s) did not run: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
