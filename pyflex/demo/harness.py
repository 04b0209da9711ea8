"""What ``python -m pyflex.demo`` and ``bench/profile_model.py`` share besides the method table
(:mod:`pyflex.demo.methods`): building the LLaMA-style model, the device and versions of a run, one timed training
step, peak memory, running a method in isolation, progress bars and text tables. Pictures are in
:mod:`pyflex.demo.plots`.
"""
from __future__ import annotations

import contextlib
import gc
import math
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from pyflex.demo.methods import MethodOptions, MethodSetup, method, missing_requirement

__all__ = ["ModelShape", "build_llama", "resolve_device", "check_flags", "environment", "PHASES", "PhaseTimer", "train_step",
           "run_method", "exit_status", "free_memory", "bars_enabled", "Progress", "Column", "format_rows"]


# --------------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------------
@dataclass
class ModelShape:
    """A LLaMA-style decoder's sizes."""
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    max_positions: int = 2048


def build_llama(shape: ModelShape, device, dtype: torch.dtype = torch.float32, seed: int = 0,
                **config_kwargs) -> nn.Module:
    """Random-init ``LlamaForCausalLM`` (SDPA attention, untied embeddings), built directly on ``device`` in
    ``dtype``: a 1.1B model never exists as an fp32 copy. The init draws from the CPU generator seeded with
    ``seed``, so on CPU the same seed gives the same weights. ``config_kwargs`` go to ``LlamaConfig`` (token ids)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                         num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.kv_heads, max_position_embeddings=shape.max_positions,
                         tie_word_embeddings=False, **config_kwargs)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.to(device=device, dtype=dtype)


# --------------------------------------------------------------------------------------------------
# device and versions
# --------------------------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    """``auto`` → cuda when available, else cpu; a CUDA device asked for without CUDA is a ValueError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name!r} was asked for, but torch.cuda.is_available() is False")
    return device


def check_flags(args, names: Sequence[str], minimum: int) -> None:
    """SystemExit naming the flag, its value and the bound when one of ``args.<name>`` is below ``minimum``."""
    for name in names:
        value = getattr(args, name)
        if value < minimum:
            raise SystemExit(f"--{name.replace('_', '-')}={value} is not allowed; it must be >= {minimum}")


def environment(device: torch.device) -> dict:
    """Device, versions, pyflex backend and date of a run, for its JSON and its headers."""
    import transformers

    from pyflex.lora.backends import current_backend_name, resolve_backend

    try:
        backend = resolve_backend(device)[0]
    except Exception as exc:  # noqa: BLE001 - report, do not fail the header
        backend = f"unavailable ({exc})"
    env = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
           else (platform.processor() or platform.machine()), "cpu_threads": torch.get_num_threads(),
           "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "pyflex_backend": f"{current_backend_name()} -> {backend}", "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    for module in ("peft", "triton"):
        try:
            env[module] = __import__(module).__version__
        except ImportError:
            env[module] = None
    return env


# --------------------------------------------------------------------------------------------------
# one training step, timed
# --------------------------------------------------------------------------------------------------
PHASES = ("schedule", "forward", "backward", "optimizer")


class PhaseTimer:
    """Marks between the phases of one step: CUDA events on GPU (no sync inside the step), perf_counter elsewhere."""

    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"
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

    def phases_ms(self) -> Dict[str, float]:
        """{schedule, forward, backward, optimizer, step} of a step marked by :func:`train_step`."""
        phases = dict(zip(PHASES, self.durations_ms()))
        phases["step"] = sum(phases.values())
        return phases


def train_step(setup: MethodSetup, batch: dict, timer: Optional[PhaseTimer] = None, *, clip: float = 0.0,
               schedule: bool = True) -> torch.Tensor:
    """The user's plain step: ``schedule.step(batch)`` (IST/LIFT) → forward (with the loss) → backward →
    [``pyflex.clip_grad_norm_``, τ left out of the norm] → optimizer step + zero_grad. Returns the loss (not synced).

    ``timer`` marks the four phases; ``schedule=False`` keeps the layers the schedule chose last (a measurement
    step after the run)."""
    from pyflex.model.optim import clip_grad_norm_

    mark = timer.mark if timer is not None else (lambda: None)
    model, optimizer = setup.model, setup.optimizer
    mark()
    if schedule and setup.schedule is not None:
        setup.schedule.step(batch)
    mark()
    loss = model(**batch).loss
    mark()
    loss.backward()
    mark()
    if optimizer is not None:
        if clip:
            clip_grad_norm_(model, clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    else:
        model.zero_grad(set_to_none=True)
    mark()
    return loss


# --------------------------------------------------------------------------------------------------
# one method, in isolation
# --------------------------------------------------------------------------------------------------
CPU_MEMORY_KIND = ("tensor bytes: weights, buffers, grads, optimizer state + the peak of one more training step "
                   "(pyflex.memory)")


def memory_kind(device: torch.device) -> str:
    from pyflex.memory import CudaPeakMemory

    return CudaPeakMemory.kind if torch.device(device).type == "cuda" else CPU_MEMORY_KIND


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def run_method(name: str, options: MethodOptions, device: torch.device, build_model: Callable[[], nn.Module],
               run: Callable[[MethodSetup], dict], measure_batch: dict) -> dict:
    """One method from a fresh model: ``build_model()``, seed, the table's build, ``run(setup)`` → its record.

    Adds ``status`` ("ok", "skipped" when an optional package is missing, "oom", "failed" with the traceback),
    ``trainable_params``, ``notes``, the method's :meth:`MethodSetup.summary` and the peak memory: on CUDA
    ``max_memory_allocated`` over everything here; elsewhere the exact tensor bytes of one more training step on
    ``measure_batch`` after ``run`` (the layers a schedule chose last; ``pyflex.memory.step_peak_bytes``).
    A failure never propagates: every method gets its row and the caller decides the exit status."""
    from pyflex.memory import CudaPeakMemory, step_peak_bytes

    missing = missing_requirement(name)
    if missing is not None:
        return {"status": "skipped", "error": f"the optional package '{missing}' is not installed"}
    free_memory(device)
    model = setup = None
    try:
        with CudaPeakMemory(device) if device.type == "cuda" else contextlib.nullcontext() as cuda_memory:
            model = build_model()
            torch.manual_seed(options.seed)  # the same adapter initialisation draws for every method
            setup = method(name).build(model, options)
            setup.model.train()
            record = run(setup)
            record.update(setup.summary())
            if cuda_memory is None:
                peak = step_peak_bytes(setup.model, setup.optimizer,
                                       lambda: train_step(setup, measure_batch, schedule=False))
        if cuda_memory is not None:
            peak = cuda_memory.peak_bytes
        record.update(status="ok", peak_bytes=peak, memory_kind=memory_kind(device),
                      trainable_params=setup.trainable_params(), notes=setup.notes)
        return record
    except torch.cuda.OutOfMemoryError as exc:
        return {"status": "oom", "error": f"CUDA out of memory: {str(exc).splitlines()[0]}"}
    except Exception as exc:  # noqa: BLE001 - every method gets its row; the command fails at the end
        return {"status": "failed", "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    finally:
        model = setup = None  # drop this frame's references before freeing
        free_memory(device)


def exit_status(names: Sequence[str], results: Dict[str, dict], json_path: str,
                fail_on: Sequence[str] = ("failed", "oom")) -> int:
    """The command's exit status: 1, with a line on stderr, when a method's status is in ``fail_on``; else 0."""
    bad = [n for n in names if results[n]["status"] in fail_on]
    if not bad:
        return 0
    listed = ", ".join(f"{n} ({results[n]['status']})" for n in bad)
    print(f"\n{len(bad)} method(s) did not run to the end: {listed}; errors (and tracebacks) in {json_path}",
          file=sys.stderr)
    return 1


# --------------------------------------------------------------------------------------------------
# progress bars
# --------------------------------------------------------------------------------------------------
def bars_enabled(stream=None) -> bool:
    """tqdm bars only where someone watches: ``stream`` (default stderr, where tqdm draws) is a terminal,
    transformers' progress bars are not disabled (``transformers.utils.logging.disable_progress_bar()``, or
    ``HF_HUB_DISABLE_PROGRESS_BARS=1`` before transformers is imported), and no test is running (pytest sets
    ``PYTEST_CURRENT_TEST``; with ``-s`` a bar would land in the test's output)."""
    if os.environ.get("PYTEST_CURRENT_TEST"):
        return False
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    if not (callable(isatty) and isatty()):
        return False
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        pass
    else:
        if not hf_logging.is_progress_bar_enabled():
            return False
    import importlib.util

    return importlib.util.find_spec("tqdm") is not None


class Progress:
    """An overall bar and, under it, one bar per task (a method); every call is a no-op when bars are off.

    ``write(line)`` prints a log line above the bars (tqdm.write) when they are on, a plain ``print`` otherwise."""

    def __init__(self, total: int, desc: str, unit: str = "step", enabled: Optional[bool] = None, file=None):
        self.file = sys.stderr if file is None else file
        self.enabled = bars_enabled(self.file) if enabled is None else enabled
        self._tqdm = None
        self.overall = None
        if self.enabled:
            from tqdm.auto import tqdm

            self._tqdm = tqdm
            self.overall = tqdm(total=total, desc=desc, unit=unit, position=0, dynamic_ncols=True, file=self.file)

    def task(self, name: str, total: int) -> "_Task":
        bar = None
        if self.enabled:
            bar = self._tqdm(total=total, desc=f"  {name}", unit="step", position=1, leave=False, dynamic_ncols=True,
                             file=self.file)
        return _Task(bar, self.overall, total)

    def write(self, line: str) -> None:
        if self.enabled:
            self._tqdm.write(line, file=sys.stdout)  # clears the bars, prints the line, redraws them
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.overall is not None:
            self.overall.close()
            self.overall = None


class _Task:
    def __init__(self, bar, overall, total: int):
        self.bar, self.overall, self.total, self.done = bar, overall, total, 0
        self.shown = bar is not None   # False: bars are off, the caller prints its own progress lines

    def update(self, n: int = 1, **postfix) -> None:
        self.done += n
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix({k: f"{v:.4g}" if isinstance(v, float) else v for k, v in postfix.items()},
                                     refresh=False)
            self.bar.update(n)
        if self.overall is not None:
            self.overall.update(n)

    def close(self) -> None:
        """Ends the task; the overall bar counts the steps it did not take (a failed or skipped method)."""
        if self.overall is not None and self.done < self.total:
            self.overall.update(self.total - self.done)
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# --------------------------------------------------------------------------------------------------
# text tables
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Column:
    """One column of a results table: header, width, and the cell text of a method's record."""
    header: str
    width: int
    cell: Callable[[dict], str]


def format_rows(names: Sequence[str], results: Dict[str, dict], columns: Sequence[Column],
                notes: Callable[[dict], str] = lambda r: r.get("notes", "")) -> List[str]:
    """Header, rule and one line per method: the name left-aligned, the columns right-aligned, then
    ``notes(record)``; a method that did not run gets ``NAME STATUS: error``."""
    width = max([12] + [len(n) for n in names])
    head = f"{'method':<{width}} " + " ".join(f"{c.header:>{c.width}}" for c in columns) + "  notes"
    lines = [head, "-" * len(head)]
    for name in names:
        r = results[name]
        if r["status"] != "ok":
            lines.append(f"{name:<{width}} {r['status'].upper()}: {r['error']}")
            continue
        cells = " ".join(f"{c.cell(r):>{c.width}}" for c in columns)
        lines.append(f"{name:<{width}} {cells}  {notes(r)}".rstrip())
    return lines


def fmt(value: Optional[float], spec: str, missing: str = "-") -> str:
    """``format(value, spec)``, or ``missing`` for None / NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    return format(value, spec)
