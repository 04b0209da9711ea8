"""``python -m pyflex.demo``: pyflex's fine-tuning methods side by side on a tiny model, in about two minutes on CPU.

What it does, with nothing downloaded:

1. builds a tiny LLaMA-style model from a config (8 layers, hidden 64) and **pre-trains** it (full fine-tune) on a
   synthetic token task, *copy*: ``<bos> x1..xL <sep> x1..xL``;
2. **adapts** a fresh copy of that model to a related task, *sort*: ``<bos> x1..xL <sep> sorted(x)``, once per
   method (``--adapt-task reverse`` is harder: the layer-sparse methods barely move on it in 200 steps):

   ============  ==========================================================================================
   pyflex_lora   ``pyflex.patch_model`` LoRA (r=8, α=16) on q,k,v,o,gate,up,down
   pyflex_tau    the same plus the PEFT_S token mask (trainable τ per layer, ``pyflex.tau_param_groups``)
   ist           pyflex LoRA + ``ImportanceSchedule`` (IST: 25% of the layers train per step)
   lift          pyflex LoRA + ``LiftSchedule`` (LIFT: one block at a time, front to end)
   hlpt          ``apply_hlpt(variant="hlpt")``: gated LoRA on down_proj (bottom 3/4) + gated prefix (top 1/4)
   h2lpt         ``apply_hlpt(variant="h2lpt")``: bottom 3/8 and top 1/8 only
   peft_lora     Hugging Face PEFT LoRA with the same settings (the baseline; skipped only if peft is missing)
   ============  ==========================================================================================

3. prints a table (final train/eval loss, eval token accuracy, wall time, peak memory, τ sparsity, trainable
   parameters) and writes ``results.json`` and ``loss_curves.png`` to ``--out`` (default ``runs/demo``).

Every method sees the same pre-trained weights, the same batches in the same order and the same seed. Loss is taken
on the answer tokens only. Runs on the GPU when there is one (``--device``). ``--quick`` is a ~20 s smoke version.
A method that fails is reported as FAILED in the table and makes the command exit with status 1.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional

# Deterministic cuBLAS must be configured before CUDA initialises.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from pyflex.memory import CudaPeakMemory, step_peak_bytes  # noqa: E402
from pyflex.model.optim import clip_grad_norm_  # noqa: E402

__all__ = ["DemoConfig", "METHODS", "main", "run_demo"]

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


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
    # PEFT_S τ: the paper's τ lr (α·s = 4e-5) is tuned for thousands of steps; the demo runs ~200, so τ gets a
    # larger lr to show the mask at work in that time (tau_alpha · 4e-5).
    tau_alpha: float = 100.0
    lam: float = 1e-4
    seed: int = 0
    device: str = "auto"

    @classmethod
    def quick(cls) -> "DemoConfig":
        return cls(batch_size=16, pretrain_steps=60, adapt_steps=30, eval_every=10, eval_samples=64, warmup_steps=5)


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
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=cfg.digits + 2, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
                         num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                         num_key_value_heads=cfg.kv_heads, max_position_embeddings=128,
                         bos_token_id=cfg.digits + 1, eos_token_id=None, pad_token_id=None,
                         tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(config).to(device)


# --------------------------------------------------------------------------------------------------
# memory
# --------------------------------------------------------------------------------------------------
CPU_MEMORY_KIND = "tensor bytes: weights, grads, optimizer state + one forward/backward's peak (pyflex.memory)"


def memory_kind(device: torch.device) -> str:
    return CudaPeakMemory.kind if torch.device(device).type == "cuda" else CPU_MEMORY_KIND


# --------------------------------------------------------------------------------------------------
# methods: each takes a fresh copy of the pre-trained model and returns what the training loop needs
# --------------------------------------------------------------------------------------------------
@dataclass
class MethodSetup:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    schedule: Optional[object] = None        # has .step(batch) (IST, LIFT)
    sparsity: Optional[Callable[[], Optional[float]]] = None  # τ-mask sparsity of the last forward
    notes: str = ""


def _adamw(params, cfg: DemoConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)


def _tau_sparsity(model) -> Optional[float]:
    """Mean PEFT_S sparsity (eq. 23) over the τ-masked layers, for their last forward."""
    from pyflex.model.patch import get_registry

    values = [v for v in get_registry(model).tau_sparsity().values() if v is not None]
    return sum(values) / len(values) if values else None


def method_pyflex_lora(model, cfg: DemoConfig) -> MethodSetup:
    import pyflex

    pyflex.patch_model(model, r=cfg.r, alpha=cfg.alpha, target_modules=TARGET_MODULES)
    return MethodSetup(model, _adamw([p for p in model.parameters() if p.requires_grad], cfg))


def method_pyflex_tau(model, cfg: DemoConfig) -> MethodSetup:
    import pyflex

    pyflex.patch_model(model, r=cfg.r, alpha=cfg.alpha, target_modules=TARGET_MODULES, tau=True, lam=cfg.lam,
                       tau0=0.0)
    groups = pyflex.tau_param_groups(model, lr=cfg.lr, weight_decay=0.0, tau_alpha=cfg.tau_alpha)
    return MethodSetup(model, torch.optim.AdamW(groups), sparsity=lambda: _tau_sparsity(model),
                       notes=f"τ lr {groups[-1]['lr']:.0e}, λ {cfg.lam:g}")


def method_ist(model, cfg: DemoConfig) -> MethodSetup:
    import pyflex
    from pyflex.methods.ist import ImportanceSchedule

    pyflex.patch_model(model, r=cfg.r, alpha=cfg.alpha, target_modules=TARGET_MODULES)
    schedule = ImportanceSchedule(model, seed=cfg.seed)  # paper mode: N_u = 25%, T_c = 10, N_c = 3, β = 0.25
    optimizer = _adamw(schedule.trainable_parameters(), cfg)
    schedule.attach_optimizer(optimizer)
    return MethodSetup(model, optimizer, schedule, notes=f"{schedule.n_u}/{len(schedule.layers)} layers per step")


def method_lift(model, cfg: DemoConfig) -> MethodSetup:
    import pyflex
    from pyflex.methods.lift import LiftSchedule

    pyflex.patch_model(model, r=cfg.r, alpha=cfg.alpha, target_modules=TARGET_MODULES)
    schedule = LiftSchedule(model, total_steps=cfg.adapt_steps, order="front2end", policy="grouped",
                            target="lora", seed=cfg.seed)
    optimizer = _adamw(schedule.trainable_parameters(), cfg)
    schedule.attach_optimizer(optimizer)
    return MethodSetup(model, optimizer, schedule, notes="1 block at a time, front2end")


def _hlpt(model, cfg: DemoConfig, variant: str) -> MethodSetup:
    from pyflex.methods.hlpt import apply_hlpt

    apply_hlpt(model, variant=variant, r=cfg.r, alpha=cfg.alpha)
    plan = model.pyflex_plan
    return MethodSetup(model, _adamw([p for p in model.parameters() if p.requires_grad], cfg),
                       notes=f"LoRA {_span(plan.lora_layers)}, prefix {_span(plan.prefix_layers)}")


def method_hlpt(model, cfg: DemoConfig) -> MethodSetup:
    return _hlpt(model, cfg, "hlpt")


def method_h2lpt(model, cfg: DemoConfig) -> MethodSetup:
    return _hlpt(model, cfg, "h2lpt")


def method_peft_lora(model, cfg: DemoConfig) -> MethodSetup:
    import warnings

    from peft import LoraConfig, get_peft_model

    # transformers 5 warns from inside PEFT (is_gradient_checkpointing is deprecated); not the user's concern here
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

    model = get_peft_model(model, LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=0.0,
                                             target_modules=TARGET_MODULES))
    # PEFT's init is the same as pyflex's (A ~ kaiming_uniform(a=√5), B = 0), but PEFT draws A twice per module, so
    # the same seed gives other numbers. Redraw A in module order from the seed, as patch_model does: both runs then
    # start from identical adapters and their rows differ only by floating-point rounding.
    torch.manual_seed(cfg.seed)
    with torch.no_grad():
        for module in model.modules():
            lora_A = getattr(module, "lora_A", None)
            if isinstance(lora_A, torch.nn.ModuleDict) and "default" in lora_A:
                torch.nn.init.kaiming_uniform_(lora_A["default"].weight, a=math.sqrt(5))
    return MethodSetup(model, _adamw([p for p in model.parameters() if p.requires_grad], cfg),
                       notes="HF PEFT, lora_A drawn as pyflex_lora's")


def _span(indices) -> str:
    indices = list(indices)
    if not indices:
        return "none"
    return f"L{indices[0]}" if len(indices) == 1 else f"L{indices[0]}-{indices[-1]}"


METHODS: Dict[str, Callable[[torch.nn.Module, DemoConfig], MethodSetup]] = {
    "pyflex_lora": method_pyflex_lora,
    "pyflex_tau": method_pyflex_tau,
    "ist": method_ist,
    "lift": method_lift,
    "hlpt": method_hlpt,
    "h2lpt": method_h2lpt,
    "peft_lora": method_peft_lora,
}
# Methods that are skipped, with a note, when their optional dependency is missing. Every other method must run.
OPTIONAL = {"peft_lora": "peft"}


# --------------------------------------------------------------------------------------------------
# training and evaluation
# --------------------------------------------------------------------------------------------------
def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


def _count(params) -> int:
    return sum(p.numel() for p in params)


def train(setup: MethodSetup, train_batches: List[dict], eval_batches: List[dict], cfg: DemoConfig, device,
          steps: int, log: Callable[[str], None], label: str) -> dict:
    """The user's plain training loop; a schedule only adds ``schedule.step(batch)`` before the forward."""
    model, optimizer, schedule = setup.model, setup.optimizer, setup.schedule
    params = [p for g in optimizer.param_groups for p in g["params"]]
    warmup = max(1, cfg.warmup_steps)
    # linear warm-up, then linear decay to 10% (every param group, τ's included, so the mask settles at the end)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * (1.0 - 0.9 * s / max(1, steps)))
    model.train()
    curve, evals, sparsities, active_params, step_ms = [], [], [], [], []
    first = evaluate(model, eval_batches)
    evals.append({"step": 0, **first})
    train_seconds = 0.0
    for step in range(steps):
        batch = train_batches[step % len(train_batches)]
        _sync(device)
        t0 = time.perf_counter()
        if schedule is not None:
            schedule.step(batch)
        loss = model(**batch).loss
        loss.backward()
        if cfg.grad_clip:
            # every trainable parameter but τ, whose token-summed gradient would dominate the norm
            clip_grad_norm_(model, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lr_schedule.step()
        _sync(device)
        step_ms.append(1000.0 * (time.perf_counter() - t0))
        train_seconds += step_ms[-1] / 1000.0
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(f"{label}: training loss became {value} at step {step}")
        curve.append(value)
        active_params.append(_count(p for p in params if p.requires_grad))
        if setup.sparsity is not None:
            s = setup.sparsity()
            if s is not None:
                sparsities.append(s)
        if (step + 1) % cfg.eval_every == 0 or step + 1 == steps:
            ev = evaluate(model, eval_batches)
            evals.append({"step": step + 1, **ev})
            extra = f"  τ-sparsity {sparsities[-1]:.1%}" if sparsities else ""
            log(f"  {label:<12} step {step + 1:>4}/{steps}  train {value:.4f}  eval {ev['loss']:.4f}  "
                f"acc {ev['accuracy']:.1%}{extra}")
    tail = curve[-min(10, len(curve)):]
    return {
        "train_loss_curve": curve,
        "eval_curve": evals,
        "train_loss_start": curve[0],
        "train_loss_final": sum(tail) / len(tail),
        "eval_loss_start": evals[0]["loss"],
        "eval_loss_final": evals[-1]["loss"],
        "eval_accuracy_final": evals[-1]["accuracy"],
        "train_seconds": train_seconds,
        # the median is robust to one-time costs (lazy imports, kernel compilation) that the first method pays
        "ms_per_step": statistics.median(step_ms) if step_ms else 0.0,
        "tau_sparsity_curve": sparsities,
        "tau_sparsity_final": (sum(sparsities[-10:]) / len(sparsities[-10:])) if sparsities else None,
        "trainable_params_mean_per_step": sum(active_params) / max(len(active_params), 1),
    }


# --------------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name!r} was asked for, but torch.cuda.is_available() is False")
    return device


def _environment(device: torch.device) -> dict:
    import transformers

    from pyflex.lora.backends import current_backend_name, resolve_backend

    try:
        backend = resolve_backend(device)[0]
    except Exception as exc:  # noqa: BLE001 - report, do not fail the header
        backend = f"unavailable ({exc})"
    env = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
           else platform.processor() or platform.machine(), "cpu_threads": torch.get_num_threads(),
           "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "pyflex_backend": f"{current_backend_name()} -> {backend}"}
    try:
        import peft
        env["peft"] = peft.__version__
    except ImportError:
        env["peft"] = None
    return env


def run_demo(cfg: DemoConfig, methods: List[str], out_dir: str, log: Callable[[str], None] = print) -> dict:
    """Pre-train, adapt with every method, write results.json and loss_curves.png. Returns the results dict."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"methods {unknown} are not known; allowed: {', '.join(METHODS)}")
    device = resolve_device(cfg.device)
    torch.use_deterministic_algorithms(True, warn_only=True)
    os.makedirs(out_dir, exist_ok=True)
    started = time.perf_counter()
    env = _environment(device)
    log(f"pyflex demo on {device} ({env['device_name']}, {env['cpu_threads']} CPU threads), torch {env['torch']}, "
        f"transformers {env['transformers']}, peft {env['peft']}, pyflex backend {env['pyflex_backend']}")

    # 1. pre-train on the first task (full fine-tune)
    model = build_model(cfg, device)
    n_params = _count(model.parameters())
    log(f"model: LLaMA-style, {cfg.layers} layers, hidden {cfg.hidden}, {n_params / 1e3:.0f}k parameters; "
        f"tasks: {cfg.pretrain_task} -> {cfg.adapt_task} on {cfg.seq_len} digits")
    pre_batches = make_batches(cfg, cfg.pretrain_task, cfg.pretrain_steps, cfg.batch_size, cfg.seed + 1, device)
    pre_eval = make_batches(cfg, cfg.pretrain_task, max(1, cfg.eval_samples // 64), min(64, cfg.eval_samples),
                            cfg.seed + 2, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=0.0)
    setup = MethodSetup(model, optimizer)
    pre_cfg = dataclasses.replace(cfg, lr=cfg.pretrain_lr)
    log(f"[1/2] pre-training on '{cfg.pretrain_task}' (full fine-tune, {cfg.pretrain_steps} steps)")
    pretrain = train(setup, pre_batches, pre_eval, pre_cfg, device, cfg.pretrain_steps, log, "pretrain")
    pretrained_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    del model, optimizer, setup

    # 2. adapt to the second task with each method, from the same weights and on the same batches
    train_batches = make_batches(cfg, cfg.adapt_task, cfg.adapt_steps, cfg.batch_size, cfg.seed + 3, device)
    eval_batches = make_batches(cfg, cfg.adapt_task, max(1, cfg.eval_samples // 64), min(64, cfg.eval_samples),
                                cfg.seed + 4, device)
    log(f"[2/2] adapting to '{cfg.adapt_task}' with {len(methods)} methods, {cfg.adapt_steps} steps each "
        f"(lr {cfg.lr:g}, batch {cfg.batch_size})")
    results: Dict[str, dict] = {}
    for name in methods:
        results[name] = _run_method(name, cfg, device, pretrained_state, train_batches, eval_batches, log)

    payload = {"config": asdict(cfg), "environment": env, "methods": methods,
               "memory_kind": memory_kind(device), "pretrain": pretrain, "results": results,
               "total_seconds": time.perf_counter() - started}
    json_path = os.path.join(out_dir, "results.json")
    png_path = os.path.join(out_dir, "loss_curves.png")
    payload["plot"] = _plot(payload, png_path)
    with open(json_path, "w") as f:
        json.dump(payload, f, indent=1)
    log("")
    log(format_table(payload))
    log(f"\nwrote {json_path} and {png_path}  (total {payload['total_seconds']:.1f} s)")
    return payload


def _run_method(name, cfg, device, pretrained_state, train_batches, eval_batches, log) -> dict:
    dependency = OPTIONAL.get(name)
    if dependency is not None:
        try:
            __import__(dependency)
        except ImportError:
            log(f"  {name:<12} skipped: the optional package '{dependency}' is not installed")
            return {"status": "skipped", "error": f"{dependency} is not installed"}
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, device)
    model.load_state_dict(pretrained_state)
    try:
        with CudaPeakMemory(device) if device.type == "cuda" else contextlib.nullcontext() as memory:
            torch.manual_seed(cfg.seed)  # the same adapter initialisation draws for every method
            setup = METHODS[name](model, cfg)
            trainable = _count(p for g in setup.optimizer.param_groups for p in g["params"])
            record = train(setup, train_batches, eval_batches, cfg, device, cfg.adapt_steps, log, name)
        if memory is not None:
            peak = memory.peak_bytes
        else:
            # one more forward/backward on the first batch, counted exactly; no optimizer step, grads dropped, so
            # the trained adapters and the results above are untouched
            peak = step_peak_bytes(model, setup.optimizer, lambda: setup.model(**train_batches[0]).loss.backward())
            setup.optimizer.zero_grad(set_to_none=True)
        record.update(status="ok", peak_memory_mib=peak / 2**20, trainable_params=trainable, notes=setup.notes)
    except Exception as exc:  # noqa: BLE001 - every method gets its row; the command fails at the end
        log(f"  {name:<12} FAILED: {type(exc).__name__}: {exc}")
        record = {"status": "failed", "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    finally:
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return record


# --------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------
def format_table(payload: dict) -> str:
    head = (f"{'method':<12} {'train loss':>10} {'eval loss':>10} {'eval acc':>8} {'wall s':>7} {'ms/step':>8} "
            f"{'peak MiB':>9} {'τ sparsity':>10} {'trainable':>10} {'per step':>9}  notes")
    lines = [f"adaptation '{payload['config']['adapt_task']}' after pre-training on "
             f"'{payload['config']['pretrain_task']}' ({payload['config']['adapt_steps']} steps, eval loss at start "
             "is the pre-trained model's)", head, "-" * len(head)]
    for name in payload["methods"]:
        r = payload["results"][name]
        if r["status"] != "ok":
            lines.append(f"{name:<12} {r['status'].upper()}: {r['error']}")
            continue
        sparsity = "-" if r["tau_sparsity_final"] is None else f"{r['tau_sparsity_final']:.1%}"
        lines.append(
            f"{name:<12} {r['train_loss_final']:>10.4f} {r['eval_loss_final']:>10.4f} "
            f"{r['eval_accuracy_final']:>8.1%} {r['train_seconds']:>7.1f} {r['ms_per_step']:>8.1f} "
            f"{r['peak_memory_mib']:>9.1f} {sparsity:>10} {r['trainable_params']:>10,} "
            f"{r['trainable_params_mean_per_step']:>9,.0f}  {r['notes']}")
    ok = [payload["results"][n] for n in payload["methods"] if payload["results"][n]["status"] == "ok"]
    if ok:
        lines.append(f"eval loss at start (pre-trained model on the new task): {ok[0]['eval_loss_start']:.4f}")
    lines.append(f"memory: {payload['memory_kind']}"
                 + "; wall s: training steps only (no evaluation), ms/step: their median; "
                 "per step: parameters that train in an average step (IST/LIFT freeze layers per step)")
    return "\n".join(lines)


def _plot(payload: dict, path: str) -> Optional[str]:
    """Three panels: pre-training loss, adaptation train loss (smoothed), adaptation eval loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    pre = payload["pretrain"]["train_loss_curve"]
    axes[0].plot(range(1, len(pre) + 1), pre, color="black")
    axes[0].set(title=f"pre-training: {payload['config']['pretrain_task']} (full fine-tune)", xlabel="step",
                ylabel="train loss", yscale="log")
    for name in payload["methods"]:
        r = payload["results"][name]
        if r["status"] != "ok":
            continue
        curve = r["train_loss_curve"]
        k = max(1, len(curve) // 30)  # moving average over ~3% of the run
        smooth = [sum(curve[max(0, i - k + 1): i + 1]) / len(curve[max(0, i - k + 1): i + 1])
                  for i in range(len(curve))]
        axes[1].plot(range(1, len(curve) + 1), smooth, label=name)
        ev = r["eval_curve"]
        axes[2].plot([e["step"] for e in ev], [e["loss"] for e in ev], marker="o", ms=3, label=name)
    axes[1].set(title=f"adaptation: {payload['config']['adapt_task']} — train loss", xlabel="step", ylabel="loss",
                yscale="log")
    axes[2].set(title="adaptation — eval loss", xlabel="step", ylabel="loss", yscale="log")
    axes[2].legend(fontsize=8)
    env = payload["environment"]
    fig.suptitle(f"pyflex demo — {env['device']} ({env['device_name']}), torch {env['torch']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pyflex.demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="output directory for results.json and loss_curves.png")
    p.add_argument("--quick", action="store_true", help="a ~20 s smoke version (fewer, smaller steps)")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated subset of: {', '.join(METHODS)} (default: all)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pretrain-steps", type=int, default=None)
    p.add_argument("--adapt-steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None, help="adaptation learning rate (every method)")
    p.add_argument("--tau-alpha", type=float, default=None,
                   help="pyflex_tau: τ learning rate = tau_alpha × 4e-5 (paper: 1; demo default 100)")
    p.add_argument("--lam", type=float, default=None, help="pyflex_tau: PEFT_S λ (demo default 1e-4)")
    p.add_argument("--pretrain-task", choices=list(TASKS), default=None)
    p.add_argument("--adapt-task", choices=list(TASKS), default=None)
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    cfg = DemoConfig.quick() if args.quick else DemoConfig()
    cfg.device, cfg.seed = args.device, args.seed
    for arg, attr in (("pretrain_steps", "pretrain_steps"), ("adapt_steps", "adapt_steps"),
                      ("batch_size", "batch_size"), ("lr", "lr"), ("pretrain_task", "pretrain_task"),
                      ("adapt_task", "adapt_task"), ("tau_alpha", "tau_alpha"), ("lam", "lam")):
        value = getattr(args, arg)
        if value is not None:
            setattr(cfg, attr, value)
    for attr in ("pretrain_steps", "adapt_steps", "batch_size"):
        if getattr(cfg, attr) < 1:
            raise SystemExit(f"--{attr.replace('_', '-')}={getattr(cfg, attr)} is not allowed; it must be >= 1")
    return cfg


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = config_from_args(args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        print(f"--methods {args.methods!r}: unknown {unknown or 'empty list'}; allowed: {', '.join(METHODS)}",
              file=sys.stderr)
        return 2
    payload = run_demo(cfg, methods, args.out)
    failed = [m for m in methods if payload["results"][m]["status"] == "failed"]
    if failed:
        print(f"\n{len(failed)} method(s) failed: {', '.join(failed)} (tracebacks in results.json)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
