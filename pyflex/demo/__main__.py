"""``python -m pyflex.demo``: pyflex's fine-tuning methods side by side on a tiny model, in about two minutes on CPU.

What it does, with nothing downloaded:

1. builds a tiny LLaMA-style model from a config (8 layers, hidden 64) and **pre-trains** it (full fine-tune) on a
   synthetic token task, *copy*: ``<bos> x1..xL <sep> x1..xL``;
2. **adapts** a fresh copy of that model to a related task, *sort*: ``<bos> x1..xL <sep> sorted(x)``, once per
   method (``--adapt-task reverse`` is harder: the layer-sparse methods barely move on it in 200 steps):

   ============  ==========================================================================================
   pyflex_lora   ``pyflex.patch_model`` LoRA (r=8, α=16) on q,k,v,o,gate,up,down
   pyflex_tau    the same plus the PEFT_S token mask (trainable τ per layer, ``pyflex.tau_param_groups``)
   pyflex_tau_target  the same with ``target_sparsity=0.5``: τ steered to mask half the tokens (beyond the paper)
   ist           pyflex LoRA + ``ImportanceSchedule`` (IST: 25% of the layers train per step)
   lift          pyflex LoRA + ``LiftSchedule`` (LIFT: one block at a time, front to end)
   hlpt          ``apply_hlpt(variant="hlpt")``: gated LoRA on down_proj (bottom 3/4) + gated prefix (top 1/4)
   h2lpt         ``apply_hlpt(variant="h2lpt")``: bottom 3/8 and top 1/8 only
   peft_lora     Hugging Face PEFT LoRA with the same settings (the baseline; skipped only if peft is missing)
   ============  ==========================================================================================

   ``--methods`` also takes the other training methods of the table the profiler uses (pyflex/demo/methods.py:
   pyflex_lora_norecompute, lift_e2f, peft_bf16, ...).
3. prints a table (final train/eval loss, eval token accuracy, wall time, peak memory, τ sparsity, trainable
   parameters) and writes to ``--out`` (default ``runs/demo``): ``results.json``, ``loss_curves.png``,
   ``layer_schedules.png`` (IST's importance per layer over the steps; the layers IST and LIFT train at each step)
   and ``tau_sparsity.png`` (τ-mask sparsity per layer over the steps).

Every method sees the same pre-trained weights, the same batches in the same order and the same seed. Loss is taken
on the answer tokens only. Runs on the GPU when there is one (``--device``). ``--quick`` is a ~20 s smoke version.
On a terminal, progress bars show the run and the current method (off when output is redirected or transformers'
progress bars are disabled). A method that fails is reported as FAILED in the table and makes the command exit
with status 1.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional

# Deterministic cuBLAS must be configured before CUDA initialises.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from pyflex.demo import harness, plots  # noqa: E402
from pyflex.demo.harness import Column, PhaseTimer, fmt  # noqa: E402
from pyflex.demo.methods import ALIASES, DEMO_METHODS, METHODS, MethodOptions, MethodSetup, parse_methods  # noqa: E402

__all__ = ["DemoConfig", "METHODS", "DEMO_METHODS", "main", "run_demo", "train", "make_batches", "build_model"]


# --------------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------------
@dataclass
class DemoConfig:
    # data: digits 0..vocab-1, then <sep>, <bos>
    digits: int = 16
    seq_len: int = 8                # L, digits per sequence (the answer has L tokens too)
    pretrain_task: str = "copy"
    adapt_task: str = "sort"
    # model (LLaMA-style)
    hidden: int = 64
    intermediate: int = 128
    layers: int = 8
    heads: int = 4
    kv_heads: int = 2
    # training
    batch_size: int = 32
    pretrain_steps: int = 150
    pretrain_lr: float = 3e-3
    adapt_steps: int = 200
    lr: float = 3e-3                # every method (HLPT's paper lr is also 3e-3)
    warmup_steps: int = 10
    grad_clip: float = 1.0
    eval_every: int = 20
    eval_samples: int = 256
    # adapters
    r: int = 8
    alpha: float = 16.0
    # PEFT_S τ: None = pyflex's default τ lr, 0.4 × lr (tau_alpha · 4e-5 when given; the paper's α·s is 1 · 4e-5)
    tau_alpha: Optional[float] = None
    lam: float = 1e-4
    target_sparsity: float = 0.5
    seed: int = 0
    device: str = "auto"

    @classmethod
    def quick(cls) -> "DemoConfig":
        return cls(batch_size=16, pretrain_steps=60, adapt_steps=30, eval_every=10, eval_samples=64, warmup_steps=5)

    def method_options(self) -> MethodOptions:
        """What the method table's builds read (pyflex/demo/methods.py)."""
        return MethodOptions(r=self.r, alpha=self.alpha, lr=self.lr, seed=self.seed, total_steps=self.adapt_steps,
                             tau0=0.0, lam=self.lam, tau_alpha=self.tau_alpha, target_sparsity=self.target_sparsity)


# --------------------------------------------------------------------------------------------------
# data: synthetic token tasks
# --------------------------------------------------------------------------------------------------
TASKS: Dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
    "copy": lambda x, v: x,
    "reverse": lambda x, v: x.flip(1),
    "shift": lambda x, v: (x + 3) % v,          # copy with every digit +3 (mod digits)
    "sort": lambda x, v: x.sort(1).values,
}


def make_batches(cfg: DemoConfig, task: str, n_batches: int, batch_size: int, seed: int, device) -> List[dict]:
    """``n_batches`` dicts of input_ids / attention_mask / labels, each (batch_size, 2L+2) int64.

    Sequence: ``<bos> x1..xL <sep> y1..yL`` with y = TASKS[task](x); labels are -100 except on y.
    """
    if task not in TASKS:
        raise ValueError(f"task={task!r} is not a task; allowed: {', '.join(TASKS)}")
    g = torch.Generator().manual_seed(seed)
    sep, bos, L = cfg.digits, cfg.digits + 1, cfg.seq_len
    batches = []
    for _ in range(n_batches):
        x = torch.randint(0, cfg.digits, (batch_size, L), generator=g)
        y = TASKS[task](x, cfg.digits)
        ids = torch.cat([torch.full((batch_size, 1), bos), x, torch.full((batch_size, 1), sep), y], dim=1)
        labels = ids.clone()
        labels[:, : L + 2] = -100
        batches.append({"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
                        "labels": labels.to(device)})
    return batches


def build_model(cfg: DemoConfig, device) -> torch.nn.Module:
    shape = harness.ModelShape(vocab=cfg.digits + 2, hidden=cfg.hidden, intermediate=cfg.intermediate,
                               layers=cfg.layers, heads=cfg.heads, kv_heads=cfg.kv_heads, max_positions=128)
    return harness.build_llama(shape, device, seed=cfg.seed, bos_token_id=cfg.digits + 1, eos_token_id=None,
                               pad_token_id=None)


# --------------------------------------------------------------------------------------------------
# training and evaluation
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model, batches: List[dict]) -> Dict[str, float]:
    """Mean loss and token accuracy over the answer tokens of ``batches``."""
    was_training = model.training
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for batch in batches:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits, labels = logits[:, :-1].float(), batch["labels"][:, 1:]
        keep = labels != -100
        loss_sum += torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum").item()
        correct += (logits.argmax(-1)[keep] == labels[keep]).sum().item()
        count += int(keep.sum().item())
    model.train(was_training)
    return {"loss": loss_sum / max(count, 1), "accuracy": correct / max(count, 1)}


def _mean(values) -> Optional[float]:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def train(setup: MethodSetup, train_batches: List[dict], eval_batches: List[dict], cfg: DemoConfig, device,
          steps: int, log: Callable[[str], None], label: str, task=None) -> dict:
    """The user's plain training loop (``harness.train_step``: a schedule only adds ``schedule.step(batch)`` before
    the forward), with a warm-up/decay learning rate, evaluation every ``cfg.eval_every`` steps and, after each
    step, what the pictures show (``setup.observe()``). ``task``: a progress bar (``harness.Progress.task``)."""
    model, optimizer = setup.model, setup.optimizer
    warmup = max(1, cfg.warmup_steps)
    # linear warm-up, then linear decay to 10% (every param group, τ's included, so the mask settles at the end)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * (1.0 - 0.9 * s / max(1, steps)))
    model.train()
    curve, evals, seen, phases = [], [], [], []
    evals.append({"step": 0, **evaluate(model, eval_batches)})
    for step in range(steps):
        batch = train_batches[step % len(train_batches)]
        timer = PhaseTimer(device)
        # every trainable parameter but τ is clipped: τ's token-summed gradient would dominate the norm
        loss = harness.train_step(setup, batch, timer, clip=cfg.grad_clip)
        lr_schedule.step()
        phases.append(timer.phases_ms())
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(f"{label}: training loss became {value} at step {step}")
        curve.append(value)
        seen.append(setup.observe())
        if task is not None:
            task.update(loss=value)
        if (step + 1) % cfg.eval_every == 0 or step + 1 == steps:
            ev = evaluate(model, eval_batches)
            evals.append({"step": step + 1, **ev})
            sparsity = _mean(seen[-1].get("tau_sparsity", {}).values())
            extra = f"  τ-sparsity {sparsity:.1%}" if sparsity is not None else ""
            log(f"  {label:<12} step {step + 1:>4}/{steps}  train {value:.4f}  eval {ev['loss']:.4f}  "
                f"acc {ev['accuracy']:.1%}{extra}")
    tail = curve[-min(10, len(curve)):]
    sparsities = [s for s in (_mean(o.get("tau_sparsity", {}).values()) for o in seen) if s is not None]
    record = {
        "train_loss_curve": curve,
        "eval_curve": evals,
        "train_loss_start": curve[0],
        "train_loss_final": sum(tail) / len(tail),
        "eval_loss_start": evals[0]["loss"],
        "eval_loss_final": evals[-1]["loss"],
        "eval_accuracy_final": evals[-1]["accuracy"],
        "train_seconds": sum(p["step"] for p in phases) / 1000.0,
        # the median is robust to one-time costs (lazy imports, kernel compilation) that the first method pays
        "ms_per_step": statistics.median(p["step"] for p in phases) if phases else 0.0,
        "phase_ms_median": {k: statistics.median(p[k] for p in phases) for k in harness.PHASES} if phases else {},
        "tau_sparsity_curve": sparsities,
        "tau_sparsity_final": (sum(sparsities[-10:]) / len(sparsities[-10:])) if sparsities else None,
        "trainable_params_mean_per_step": sum(o["active_params"] for o in seen) / max(len(seen), 1),
    }
    if seen and "tau_sparsity" in seen[0]:
        layers = sorted(seen[0]["tau_sparsity"])
        record["tau_sparsity_per_layer_curve"] = {"layers": layers,
                                                  "values": [[o["tau_sparsity"][i] for i in layers] for o in seen]}
    if seen and "active_layers" in seen[0]:
        record["active_layers_per_step"] = [o["active_layers"] for o in seen]
    if seen and "importance" in seen[0]:
        record["ist_importance_per_step"] = [o["importance"] for o in seen]
    return record


# --------------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------------
def run_demo(cfg: DemoConfig, methods: List[str], out_dir: str, log: Callable[[str], None] = print) -> dict:
    """Pre-train, adapt with every method, write results.json and the pictures. Returns the results dict."""
    parse_methods(",".join(methods), arg="methods", training_only=True)  # raises for an unknown name
    device = harness.resolve_device(cfg.device)
    torch.use_deterministic_algorithms(True, warn_only=True)
    os.makedirs(out_dir, exist_ok=True)
    started = time.perf_counter()
    env = harness.environment(device)
    progress = harness.Progress(cfg.pretrain_steps + cfg.adapt_steps * len(methods), "pyflex demo")
    say = progress.write if log is print else log   # with bars on, lines are printed above them
    say(f"pyflex demo on {device} ({env['device_name']}, {env['cpu_threads']} CPU threads), torch {env['torch']}, "
        f"transformers {env['transformers']}, peft {env['peft']}, pyflex backend {env['pyflex_backend']}")
    try:
        # 1. pre-train on the first task (full fine-tune)
        model = build_model(cfg, device)
        n_params = sum(p.numel() for p in model.parameters())
        say(f"model: LLaMA-style, {cfg.layers} layers, hidden {cfg.hidden}, {n_params / 1e3:.0f}k parameters; "
            f"tasks: {cfg.pretrain_task} -> {cfg.adapt_task} on {cfg.seq_len} digits")
        pre_batches = make_batches(cfg, cfg.pretrain_task, cfg.pretrain_steps, cfg.batch_size, cfg.seed + 1, device)
        pre_eval = make_batches(cfg, cfg.pretrain_task, max(1, cfg.eval_samples // 64), min(64, cfg.eval_samples),
                                cfg.seed + 2, device)
        setup = MethodSetup(model, torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=0.0))
        say(f"[1/2] pre-training on '{cfg.pretrain_task}' (full fine-tune, {cfg.pretrain_steps} steps)")
        task = progress.task("pretrain", cfg.pretrain_steps)
        pretrain = train(setup, pre_batches, pre_eval, dataclasses.replace(cfg, lr=cfg.pretrain_lr), device,
                         cfg.pretrain_steps, say, "pretrain", task)
        task.close()
        pretrained_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        del model, setup

        # 2. adapt to the second task with each method, from the same weights and on the same batches
        train_batches = make_batches(cfg, cfg.adapt_task, cfg.adapt_steps, cfg.batch_size, cfg.seed + 3, device)
        eval_batches = make_batches(cfg, cfg.adapt_task, max(1, cfg.eval_samples // 64), min(64, cfg.eval_samples),
                                    cfg.seed + 4, device)
        say(f"[2/2] adapting to '{cfg.adapt_task}' with {len(methods)} methods, {cfg.adapt_steps} steps each "
            f"(lr {cfg.lr:g}, batch {cfg.batch_size})")

        def pretrained_model():
            model = build_model(cfg, device)
            model.load_state_dict(pretrained_state)
            return model

        results: Dict[str, dict] = {}
        for name in methods:
            task = progress.task(name, cfg.adapt_steps)
            record = harness.run_method(
                name, cfg.method_options(), device, pretrained_model,
                lambda setup: train(setup, train_batches, eval_batches, cfg, device, cfg.adapt_steps, say, name,
                                    task),
                measure_batch=train_batches[0])
            task.close()
            if record["status"] == "ok":
                record["peak_memory_mib"] = record["peak_bytes"] / 2**20
            else:
                say(f"  {name:<12} {record['status'].upper()}: {record['error']}")
            results[name] = record
    finally:
        progress.close()

    payload = {"config": asdict(cfg), "environment": env, "methods": methods,
               "memory_kind": harness.memory_kind(device), "pretrain": pretrain, "results": results,
               "total_seconds": time.perf_counter() - started}
    json_path = os.path.join(out_dir, "results.json")
    pictures = {"loss_curves": plots.loss_curves(payload, os.path.join(out_dir, "loss_curves.png")),
                "layer_schedules": plots.layer_schedules(payload, os.path.join(out_dir, "layer_schedules.png")),
                "tau_sparsity": plots.tau_sparsity(payload, os.path.join(out_dir, "tau_sparsity.png"))}
    payload["plot"] = pictures["loss_curves"]
    payload["plots"] = {k: v for k, v in pictures.items() if v is not None}
    with open(json_path, "w") as f:
        json.dump(payload, f, indent=1)
    log("")
    log(format_table(payload))
    written = ", ".join(os.path.basename(p) for p in [json_path, *payload["plots"].values()])
    log(f"\nwrote {written} to {out_dir}  (total {payload['total_seconds']:.1f} s)")
    return payload


# --------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------
TABLE_COLUMNS = (
    Column("train loss", 10, lambda r: f"{r['train_loss_final']:.4f}"),
    Column("eval loss", 10, lambda r: f"{r['eval_loss_final']:.4f}"),
    Column("eval acc", 8, lambda r: f"{r['eval_accuracy_final']:.1%}"),
    Column("wall s", 7, lambda r: f"{r['train_seconds']:.1f}"),
    Column("ms/step", 8, lambda r: f"{r['ms_per_step']:.1f}"),
    Column("peak MiB", 9, lambda r: f"{r['peak_memory_mib']:.1f}"),
    Column("τ sparsity", 10, lambda r: fmt(r["tau_sparsity_final"], ".1%")),
    Column("trainable", 10, lambda r: f"{r['trainable_params']:,}"),
    Column("per step", 9, lambda r: f"{r['trainable_params_mean_per_step']:,.0f}"),
)


def format_table(payload: dict) -> str:
    config = payload["config"]
    lines = [f"adaptation '{config['adapt_task']}' after pre-training on '{config['pretrain_task']}' "
             f"({config['adapt_steps']} steps, eval loss at start is the pre-trained model's)"]
    lines += harness.format_rows(payload["methods"], payload["results"], TABLE_COLUMNS)
    ok = [payload["results"][n] for n in payload["methods"] if payload["results"][n]["status"] == "ok"]
    if ok:
        lines.append(f"eval loss at start (pre-trained model on the new task): {ok[0]['eval_loss_start']:.4f}")
    lines.append(f"memory: {payload['memory_kind']}"
                 + "; wall s: training steps only (no evaluation), ms/step: their median; "
                 "per step: parameters that train in an average step (IST/LIFT freeze layers per step)")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pyflex.demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="output directory for results.json and the pictures")
    p.add_argument("--quick", action="store_true", help="a ~20 s smoke version (fewer, smaller steps)")
    default = [ALIASES.get(n, n) for n in DEMO_METHODS]
    more = [n for n, m in METHODS.items() if m.trains and n not in default]
    p.add_argument("--methods", default=",".join(DEMO_METHODS),
                   help=f"comma-separated (default: {','.join(DEMO_METHODS)}); also: {', '.join(more)} "
                        f"(from pyflex/demo/methods.py; {', '.join(f'{a} = {n}' for a, n in ALIASES.items())})")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pretrain-steps", type=int, default=None)
    p.add_argument("--adapt-steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None, help="adaptation learning rate (every method)")
    p.add_argument("--tau-alpha", type=float, default=None,
                   help="pyflex_tau: τ learning rate = tau_alpha × 4e-5 (paper: 1; default: pyflex's, 0.4 × --lr)")
    p.add_argument("--lam", type=float, default=None, help="pyflex_tau: PEFT_S λ (demo default 1e-4)")
    p.add_argument("--target-sparsity", type=float, default=None,
                   help="pyflex_tau_target: fraction of tokens τ is steered to mask (default 0.5)")
    p.add_argument("--pretrain-task", choices=list(TASKS), default=None)
    p.add_argument("--adapt-task", choices=list(TASKS), default=None)
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    cfg = DemoConfig.quick() if args.quick else DemoConfig()
    cfg.device, cfg.seed = args.device, args.seed
    for attr in ("pretrain_steps", "adapt_steps", "batch_size", "lr", "pretrain_task", "adapt_task", "tau_alpha",
                 "lam", "target_sparsity"):
        value = getattr(args, attr)
        if value is not None:
            setattr(cfg, attr, value)
    harness.check_flags(cfg, ("pretrain_steps", "adapt_steps", "batch_size"), 1)
    return cfg


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = config_from_args(args)
    try:
        methods = parse_methods(args.methods, training_only=True)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    payload = run_demo(cfg, methods, args.out)
    # a method skipped for a missing optional package (peft) is not a failure of the demo
    return harness.exit_status(methods, payload["results"], os.path.join(args.out, "results.json"))


if __name__ == "__main__":
    sys.exit(main())
