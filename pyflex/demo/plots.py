"""Pictures of a demo run (``python -m pyflex.demo``) and of a profile (``bench/profile_model.py``).

Every function takes the run's JSON payload (as written to results.json / profile.json), draws with matplotlib's
Agg backend (no display needed), writes a PNG and returns its path, or None when the run holds nothing to draw
(e.g. no IST method ran); its ``*_figure`` twin returns the open matplotlib Figure instead. Each method keeps one colour, line style and marker in every picture (:data:`STYLES`),
so curves that lie on top of each other (pyflex LoRA and PEFT LoRA start from the same adapters) stay visible.

demo: :func:`loss_curves`, :func:`layer_schedules` (IST importance per layer over steps, the layers IST and LIFT
train at each step), :func:`tau_sparsity` (PEFT_S sparsity per layer over steps); profile: :func:`profile_chart`.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

from pyflex.demo.methods import ALIASES

__all__ = ["STYLES", "style", "loss_curves", "layer_schedules", "tau_sparsity", "profile_chart", "loss_curves_figure",
           "layer_schedules_figure", "tau_sparsity_figure", "profile_chart_figure"]

# name → colour, line style, marker (tab10 colours; the pairs that overlap differ in line style and marker too)
STYLES: Dict[str, dict] = {
    "hf_floor": dict(color="#222222", linestyle="-", marker="o"),
    "pyflex_lora": dict(color="#1f77b4", linestyle="-", marker="o"),
    "pyflex_lora_norecompute": dict(color="#6baed6", linestyle="--", marker="o"),
    "pyflex_lora_fused": dict(color="#08306b", linestyle="-.", marker="o"),
    "pyflex_tau": dict(color="#ff7f0e", linestyle="-", marker="s"),
    "pyflex_tau_target": dict(color="#ffbb78", linestyle="--", marker="s"),
    "ist": dict(color="#2ca02c", linestyle="-", marker="^"),
    "lift_f2e": dict(color="#d62728", linestyle="-", marker="v"),
    "lift_e2f": dict(color="#f28e8e", linestyle="--", marker="v"),
    "hlpt": dict(color="#9467bd", linestyle="-", marker="D"),
    "h2lpt": dict(color="#8c564b", linestyle="--", marker="D"),
    "peft": dict(color="#e377c2", linestyle=(0, (5, 3)), marker="x"),
    "peft_bf16": dict(color="#bcbd22", linestyle=":", marker="x"),
}


def style(name: str) -> dict:
    """Colour, line style and marker of a method (aliases share their method's)."""
    return dict(STYLES[ALIASES.get(name, name)])


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _log_y(ax) -> None:
    """Log y axis with labelled ticks at 1, 2, 5 × 10^k written as plain numbers (0.2, 0.5, 1, 2): a loss range
    under one decade otherwise shows no labelled tick, or 2×10⁻¹-style labels."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.grid(True, which="major", alpha=0.3)


def _caption(env: dict) -> str:
    return (f"{env['device']} ({env['device_name']}, {env.get('cpu_threads', '?')} threads), torch {env['torch']}, "
            f"transformers {env['transformers']}, peft {env.get('peft')}")


def _finish(fig, title: str):
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def _write(fig, path: str) -> Optional[str]:
    """Save ``fig`` (None: nothing to draw) as a PNG at ``path`` and close it; returns the path or None."""
    if fig is None:
        return None
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def _ok(payload: dict) -> List[str]:
    return [n for n in payload["methods"] if payload["results"][n]["status"] == "ok"]


def _smooth(curve: Sequence[float], window: int) -> List[float]:
    out, total = [], 0.0
    for i, v in enumerate(curve):
        total += v
        if i >= window:
            total -= curve[i - window]
        out.append(total / min(i + 1, window))
    return out


# --------------------------------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------------------------------
def loss_curves(payload: dict, path: str) -> str:
    """:func:`loss_curves_figure` written to ``path``."""
    return _write(loss_curves_figure(payload), path)


def loss_curves_figure(payload: dict):
    """Three panels: pre-training loss; adaptation train loss (moving average over ~3 % of the run); adaptation
    eval loss. Log y axes, a legend on each panel."""
    plt = _pyplot()
    config = payload["config"]
    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    pre = payload["pretrain"]
    steps = range(1, len(pre["train_loss_curve"]) + 1)
    axes[0].plot(steps, pre["train_loss_curve"], color="#999999", lw=0.8, label="train loss (per step)")
    axes[0].plot(steps, _smooth(pre["train_loss_curve"], max(1, len(steps) // 30)), color="black", lw=1.6,
                 label="train loss (moving average)")
    axes[0].plot([e["step"] for e in pre["eval_curve"]], [e["loss"] for e in pre["eval_curve"]], "o", ms=4,
                 color="black", mfc="white", label="eval loss")
    axes[0].set(title=f"pre-training: {config['pretrain_task']} (full fine-tune)", xlabel="step", ylabel="loss")
    names = _ok(payload)
    for k, name in enumerate(names):
        r = payload["results"][name]
        s = style(name)
        curve = r["train_loss_curve"]
        every = max(1, len(curve) // 8)
        # markers at staggered steps, so two curves on top of each other still show both marker shapes
        axes[1].plot(range(1, len(curve) + 1), _smooth(curve, max(1, len(curve) // 30)), label=name, lw=1.4,
                     markevery=(min(len(curve) - 1, k * max(1, every // len(names))), every), ms=5, **s)
        ev = r["eval_curve"]
        axes[2].plot([e["step"] for e in ev], [e["loss"] for e in ev], label=name, lw=1.4, ms=5,
                     mfc="none" if k % 2 else s["color"], **s)
    axes[1].set(title=f"adaptation: {config['adapt_task']} — train loss (moving average)", xlabel="step",
                ylabel="loss")
    axes[2].set(title=f"adaptation: {config['adapt_task']} — eval loss (held-out batches)", xlabel="step",
                ylabel="loss")
    for ax in axes:
        _log_y(ax)
        ax.legend(fontsize=8, framealpha=0.85)
    return _finish(fig, f"pyflex demo: {config['adapt_steps']} adaptation steps per method, same batches and "
                            f"seed — {_caption(payload['environment'])}")


def _schedule_rows(payload: dict) -> List[tuple]:
    rows = []
    for name in _ok(payload):
        r = payload["results"][name]
        if r.get("ist_importance_per_step"):
            rows.append(("importance", name, r))
        if r.get("active_layers_per_step"):
            rows.append(("active", name, r))
    return rows


def layer_schedules(payload: dict, path: str) -> Optional[str]:
    """:func:`layer_schedules_figure` written to ``path``; None when no IST or LIFT method ran."""
    return _write(layer_schedules_figure(payload), path)


def layer_schedules_figure(payload: dict):
    """One row per picture, steps on a shared x axis, layers on y: IST's importance I of each layer after each
    step (diverging colours around 0; it changes every T_c steps), then for each scheduled method (IST, LIFT)
    the layers that trained at each step, with each layer's share of the steps on the right."""
    rows = _schedule_rows(payload)
    if not rows:
        return None
    import numpy as np

    plt = _pyplot()
    layers = payload["config"]["layers"]
    fig = plt.figure(figsize=(13, 1.0 + 0.32 * layers * len(rows)))
    # a narrow second column on every row (the colour bar, or the share of steps) keeps the step axes aligned
    grid_spec = fig.add_gridspec(len(rows), 2, width_ratios=[60, 1])
    axes = []
    for k, (kind, name, r) in enumerate(rows):
        ax = fig.add_subplot(grid_spec[k, 0], sharex=axes[0] if axes else None)
        axes.append(ax)
        if kind == "importance":
            values = np.array(r["ist_importance_per_step"], dtype=float).T      # (schedule layers, steps)
            grid = np.full((layers, values.shape[1]), np.nan)
            grid[r["ist_layers"], :] = values
            bound = max(1e-9, float(np.nanmax(np.abs(grid))))
            image = ax.imshow(grid, aspect="auto", origin="lower", cmap="RdBu_r", vmin=-bound, vmax=bound,
                              interpolation="nearest", extent=(0.5, grid.shape[1] + 0.5, -0.5, layers - 0.5))
            fig.colorbar(image, cax=fig.add_subplot(grid_spec[k, 1])).set_label("importance I", fontsize=8)
            ax.set_title(f"{name}: importance of each layer after each step (paper eq. 8–10; red = more "
                         "important, sampled more often)", fontsize=9, loc="left")
        else:
            steps = r["active_layers_per_step"]
            grid = np.zeros((layers, len(steps)))
            for t, active in enumerate(steps):
                grid[active, t] = 1.0
            color = style(name)["color"]
            from matplotlib.colors import ListedColormap

            ax.imshow(grid, aspect="auto", origin="lower", cmap=ListedColormap(["#f4f4f4", color]), vmin=0, vmax=1,
                      interpolation="nearest", extent=(0.5, len(steps) + 0.5, -0.5, layers - 0.5))
            share = grid.mean(axis=1)
            for layer in range(layers):
                ax.text(len(steps) + 1.5, layer, f"{100 * share[layer]:.3g}%", va="center", fontsize=7)
            per_step = sorted({len(a) for a in steps})
            ax.set_title(f"{name}: layers that train at each step ({'/'.join(map(str, per_step))} of {layers} per "
                         "step; share of steps on the right)", fontsize=9, loc="left")
        ax.set_ylabel("layer")
        ax.set_yticks(range(layers))
        ax.tick_params(axis="y", labelsize=7)
        ax.tick_params(axis="x", labelbottom=k == len(rows) - 1)
    axes[-1].set_xlabel("step")
    return _finish(fig, f"layer schedules in the demo — {_caption(payload['environment'])}")


def tau_sparsity(payload: dict, path: str) -> Optional[str]:
    """:func:`tau_sparsity_figure` written to ``path``; None when no τ method ran."""
    return _write(tau_sparsity_figure(payload), path)


def tau_sparsity_figure(payload: dict):
    """PEFT_S τ-mask sparsity (the share of tokens whose adapter output is masked, eq. 23) of each layer after
    each step, per τ method: a heatmap (layers × steps) over the mean over layers."""
    runs = [(n, payload["results"][n]) for n in _ok(payload)
            if payload["results"][n].get("tau_sparsity_per_layer_curve")]
    if not runs:
        return None
    import numpy as np

    plt = _pyplot()
    fig = plt.figure(figsize=(13, 4.6 * len(runs)))
    grid_spec = fig.add_gridspec(2 * len(runs), 2, height_ratios=[3, 1.2] * len(runs), width_ratios=[40, 1])
    for k, (name, r) in enumerate(runs):
        curve = r["tau_sparsity_per_layer_curve"]
        values = np.array([[np.nan if v is None else v for v in step] for step in curve["values"]], dtype=float).T
        ax = fig.add_subplot(grid_spec[2 * k, 0])
        image = ax.imshow(100 * values, aspect="auto", origin="lower", cmap="viridis", vmin=0,
                          vmax=max(1.0, 100 * float(np.nanmax(values))), interpolation="nearest",
                          extent=(0.5, values.shape[1] + 0.5, -0.5, values.shape[0] - 0.5))
        fig.colorbar(image, cax=fig.add_subplot(grid_spec[2 * k, 1])).set_label("masked tokens %", fontsize=8)
        ax.set_yticks(range(values.shape[0]))
        ax.set_yticklabels([str(layer) for layer in curve["layers"]], fontsize=7)
        ax.set_ylabel("layer")
        ax.set_title(f"{name}: τ-mask sparsity of each layer after each step ({r.get('notes', '')})", fontsize=9,
                     loc="left")
        ax.tick_params(labelbottom=False)
        mean_ax = fig.add_subplot(grid_spec[2 * k + 1, 0], sharex=ax)
        mean = np.nanmean(values, axis=0)
        mean_ax.plot(range(1, len(mean) + 1), 100 * mean, color=style(name)["color"], lw=1.2,
                     label="mean over layers")
        mean_ax.set(xlabel="step", ylabel="%")
        mean_ax.grid(True, alpha=0.3)
        mean_ax.legend(fontsize=8, loc="lower right")
    return _finish(fig, f"τ sparsity per layer in the demo — {_caption(payload['environment'])}")


# --------------------------------------------------------------------------------------------------
# profile
# --------------------------------------------------------------------------------------------------
def _number(value: float) -> str:
    """1234.5 → "1,234"; 12.34 → "12.3"; 0.01234 → "0.0123" (no 1.23e+03 on a bar)."""
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


PHASE_COLORS = {"schedule": "#bbbbbb", "forward": "#4c72b0", "backward": "#dd8452", "optimizer": "#55a868"}


def profile_chart(payload: dict, path: str) -> Optional[str]:
    """:func:`profile_chart_figure` written to ``path``; None when no method ran."""
    return _write(profile_chart_figure(payload), path)


def profile_chart_figure(payload: dict):
    """Two panels: per method, the median step time split into its phases, and the peak memory; the HF floor
    (frozen model, backward through every layer) is a dashed line on both and each bar says its multiple of it.

    A bar is as tall as the median step; its phases take their share of it in proportion to the phases' own
    medians (medians of parts do not add up to the median of the whole)."""
    names = _ok(payload)
    if not names:
        return None
    plt = _pyplot()
    res = payload["results"]
    floor = res["hf_floor"] if "hf_floor" in names else None
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(max(11, 1.4 * len(names) + 5), 5.2))
    x = list(range(len(names)))
    bottom = [0.0] * len(names)
    for phase, color in PHASE_COLORS.items():
        values = []
        for n in names:
            phases = res[n]["phase_ms_median"]
            values.append(res[n]["step_ms_median"] * phases[phase] / max(sum(phases.values()), 1e-12))
        ax_t.bar(x, values, bottom=bottom, label=phase, color=color, edgecolor="white", lw=0.5)
        bottom = [b + v for b, v in zip(bottom, values)]
    # small models (a CPU smoke run) in MiB, so the bars do not read 0.0136
    memory_unit, per_gib = ("GiB", 1.0) if max(res[n]["peak_gib"] for n in names) >= 1 else ("MiB", 1024.0)
    mem = [res[n]["peak_gib"] * per_gib for n in names]
    bars = ax_m.bar(x, mem, color=[style(n)["color"] for n in names])
    for ax, values, unit in ((ax_t, bottom, "ms"), (ax_m, mem, memory_unit)):
        floor_value = None if floor is None else values[names.index("hf_floor")]
        for i, n in enumerate(names):
            text = _number(values[i])
            if floor_value and n != "hf_floor":
                text += f"\n×{values[i] / floor_value:.2f}"
            ax.text(i, values[i], text, ha="center", va="bottom", fontsize=7,
                    bbox=dict(facecolor="white", edgecolor="none", pad=0.6, alpha=0.85))
        if floor_value is not None:
            ax.axhline(floor_value, color="black", ls="--", lw=0.9, label=f"HF floor ({_number(floor_value)} {unit})")
        ax.set_xticks(x)
        ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
        ax.set_ylim(0, 1.18 * max(values))
        ax.grid(True, axis="y", alpha=0.3)
    if floor is not None:
        bars[names.index("hf_floor")].set_hatch("//")
    ax_t.set(title="median step time, split by the phases' medians", ylabel="ms")
    on_cuda = payload["environment"]["device"].startswith("cuda")
    ax_m.set(title="peak memory" + (" (cuda max_memory_allocated)" if on_cuda else " (tensor bytes, exact)"),
             ylabel=memory_unit)
    ax_t.legend(fontsize=8, loc="upper left")
    ax_m.legend(fontsize=8, loc="upper left")
    c = payload["config"]
    return _finish(fig, f"{c['size']}: hidden {c['hidden']}, {c['layers']} layers, batch {c['batch']}×{c['seq']}, "
                            f"{c['dtype']}, LoRA r={c['r']} — {_caption(payload['environment'])}")
