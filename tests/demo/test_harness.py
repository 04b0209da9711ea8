"""The harness the demo and bench/profile_model.py share: the one method table, the training step, running a method
in isolation, progress bars, and the pictures (checked on their drawn data, not their pixels)."""
import io
import math

import pytest
import torch

from pyflex.demo import harness, methods, plots

TINY = harness.ModelShape(vocab=32, hidden=32, intermediate=64, layers=4, heads=4, kv_heads=2, max_positions=64)


def _batch(seed=1, batch=2, seq=12):
    ids = torch.randint(0, TINY.vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


# --------------------------------------------------------------------------------------------------
# the table
# --------------------------------------------------------------------------------------------------
def test_both_tools_draw_from_the_one_table():
    for name in methods.DEMO_METHODS + methods.PROFILE_METHODS:
        row = methods.method(name)
        assert row is methods.METHODS[methods.canonical_name(name)]
        assert plots.style(name) == plots.STYLES[row.name]
    assert set(plots.STYLES) == set(methods.METHODS)        # every row can be drawn
    assert set(methods.ALIASES.values()) <= set(methods.METHODS)
    assert not methods.method("hf_floor").trains and methods.method("pyflex_lora_fused").cuda_only


@pytest.mark.parametrize("text, training_only, complaint", [
    ("pyflex_lora,nope", False, "unknown nope"),
    (" , ", False, "empty list"),
    ("hf_floor", True, "unknown hf_floor"),
])
def test_parse_methods_names_the_argument_value_and_allowed(text, training_only, complaint):
    with pytest.raises(ValueError) as info:
        methods.parse_methods(text, arg="--methods", training_only=training_only)
    message = str(info.value)
    assert message.startswith(f"--methods {text!r}") and complaint in message and "allowed: " in message
    allowed = message.split("allowed: ")[1].split(", ")
    assert ("hf_floor" in allowed) is (not training_only) and "lift" in allowed and "peft_bf16" in allowed


def test_aliases_keep_their_names():
    assert methods.parse_methods("lift, peft_lora,hlpt") == ["lift", "peft_lora", "hlpt"]


def test_a_row_takes_a_config_with_method_options():
    class Config:
        def method_options(self):
            return methods.MethodOptions(r=2, alpha=4.0)

    model = harness.build_llama(TINY, "cpu")
    setup = methods.method("pyflex_lora")(model, Config())
    assert {p.shape[0] for n, p in setup.model.named_parameters() if n.endswith("lora_A")} == {2}
    with pytest.raises(TypeError, match="MethodOptions"):
        methods.method("pyflex_lora")(harness.build_llama(TINY, "cpu"), object())


def test_lift_short_run_covers_the_first_blocks():
    """LIFT needs a step per block; a run shorter than the model (a short profile) gets one step per block."""
    setup = methods.method("lift_f2e").build(harness.build_llama(TINY, "cpu"),
                                             methods.MethodOptions(total_steps=2))
    assert list(setup.schedule.sequence) == [0, 1, 2, 3]


def test_check_flags_names_the_flag_value_and_bound():
    import types

    harness.check_flags(types.SimpleNamespace(adapt_steps=1, warmup=0), ("adapt_steps",), 1)
    with pytest.raises(SystemExit, match=r"^--adapt-steps=0 is not allowed; it must be >= 1$"):
        harness.check_flags(types.SimpleNamespace(adapt_steps=0), ("adapt_steps",), 1)
    with pytest.raises(SystemExit, match=r"^--warmup=-1 is not allowed; it must be >= 0$"):
        harness.check_flags(types.SimpleNamespace(warmup=-1), ("warmup",), 0)


# --------------------------------------------------------------------------------------------------
# one step
# --------------------------------------------------------------------------------------------------
def test_train_step_is_the_plain_loop():
    """harness.train_step = forward → backward → clip → AdamW step, as written out with plain PyTorch."""
    batch = _batch()
    options = methods.MethodOptions(r=4, alpha=8.0, lr=1e-2)
    runs = []
    for use_harness in (True, False):
        model = harness.build_llama(TINY, "cpu", seed=3)
        torch.manual_seed(0)
        setup = methods.method("pyflex_lora").build(model, options)
        with torch.no_grad():  # lora_B ≠ 0 so that every adapter has a gradient to clip
            for n, p in model.named_parameters():
                if n.endswith("lora_B"):
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.1)
        for _ in range(2):
            if use_harness:
                timer = harness.PhaseTimer("cpu")
                harness.train_step(setup, batch, timer, clip=1e-3)
                phases = timer.phases_ms()
                assert set(phases) == set(harness.PHASES) | {"step"}
                assert phases["forward"] > 0 and phases["backward"] > 0
                assert phases["step"] == pytest.approx(sum(phases[k] for k in harness.PHASES))
            else:
                model(**batch).loss.backward()
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1e-3)
                setup.optimizer.step()
                setup.optimizer.zero_grad()
        runs.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    for name, value in runs[0].items():
        torch.testing.assert_close(value, runs[1][name], rtol=0, atol=0, msg=name)


def test_observe_and_summary_read_the_model_and_schedule():
    options = methods.MethodOptions(r=4, alpha=8.0, lr=1e-2, tau0=0.0, lam=1e-4, tau_alpha=100.0)
    setup = methods.method("pyflex_tau").build(harness.build_llama(TINY, "cpu"), options)
    with torch.no_grad():
        for n, p in setup.model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.5)
            if n.endswith("tau") and n.startswith("model.layers.1."):
                p.fill_(1e6)                      # ρ < τ for every token: layer 1 is masked out, the others not
    harness.train_step(setup, _batch())
    seen = setup.observe()
    # independent reference: each layer's τ-masked linears, 1 − mean(mask) over the tokens, averaged
    layers = setup.model.model.layers
    for index, layer in enumerate(layers):
        masks = [m.last_mask for m in layer.modules() if getattr(m, "last_mask", None) is not None]
        expected = sum(1.0 - m.float().mean().item() for m in masks) / len(masks)
        assert seen["tau_sparsity"][index] == pytest.approx(expected, abs=1e-6)
    assert seen["tau_sparsity"] == {0: 0.0, 1: 1.0, 2: 0.0, 3: 0.0}
    assert seen["active_params"] == setup.trainable_params() > 0
    summary = setup.summary()
    assert summary["tau_sparsity_per_layer"] == {str(i): v for i, v in seen["tau_sparsity"].items()}
    assert len(summary["tau_values"]) == 7 * len(layers)

    ist = methods.method("ist").build(harness.build_llama(TINY, "cpu"), methods.MethodOptions(r=4))
    for _ in range(11):                           # the 11th step runs the first importance update (T_c = 10)
        harness.train_step(ist, _batch())
    seen = ist.observe()
    assert seen["active_layers"] == ist.schedule.active_layers and len(seen["active_layers"]) == ist.schedule.n_u
    assert seen["importance"] == ist.schedule.history[-1]["importance"]
    assert any(v != 0 for v in seen["importance"])
    assert seen["active_params"] < ist.trainable_params()
    assert ist.summary()["ist_updates"] == 1


# --------------------------------------------------------------------------------------------------
# one method, isolated
# --------------------------------------------------------------------------------------------------
def test_run_method_records_failures_and_skips(monkeypatch):
    def broken(model, options):
        raise RuntimeError("boom")

    monkeypatch.setitem(methods.METHODS, "pyflex_lora", methods.Method("pyflex_lora", "x", "x", broken))
    record = harness.run_method("pyflex_lora", methods.MethodOptions(), torch.device("cpu"),
                                lambda: harness.build_llama(TINY, "cpu"), lambda setup: {}, _batch())
    assert record["status"] == "failed" and record["error"] == "RuntimeError: boom"
    assert "broken" in record["traceback"]
    monkeypatch.setitem(methods.METHODS, "peft", methods.Method("peft", "x", "x", broken,
                                                                requires="a_package_that_is_not_installed"))
    record = harness.run_method("peft_lora", methods.MethodOptions(), torch.device("cpu"),
                                lambda: harness.build_llama(TINY, "cpu"), lambda setup: {}, _batch())
    assert record == {"status": "skipped",
                      "error": "the optional package 'a_package_that_is_not_installed' is not installed"}


def test_run_method_counts_memory_of_one_more_step():
    """CPU peak = the persistent tensors + one more training step's peak, with the layers the schedule chose last."""
    from pyflex.memory import step_peak_bytes

    batch = _batch()
    kept = {}

    def run(setup):
        harness.train_step(setup, batch)
        kept["setup"] = setup
        return {"ran": True}

    record = harness.run_method("hf_floor", methods.MethodOptions(), torch.device("cpu"),
                                lambda: harness.build_llama(TINY, "cpu"), run, batch)
    assert record["status"] == "ok" and record["ran"] and record["trainable_params"] == 0
    setup = kept["setup"]
    expected = step_peak_bytes(setup.model, None, lambda: harness.train_step(setup, batch))
    assert record["peak_bytes"] == expected
    assert record["memory_kind"].startswith("tensor bytes")


# --------------------------------------------------------------------------------------------------
# progress bars
# --------------------------------------------------------------------------------------------------
class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_bars_only_on_a_terminal_outside_tests(monkeypatch):
    from transformers.utils import logging as hf_logging

    assert not harness.bars_enabled(_Terminal())            # PYTEST_CURRENT_TEST is set in here
    monkeypatch.delenv("PYTEST_CURRENT_TEST")
    assert harness.bars_enabled(_Terminal())
    assert not harness.bars_enabled(io.StringIO())           # output redirected
    hf_logging.disable_progress_bar()
    try:
        assert not harness.bars_enabled(_Terminal())
    finally:
        hf_logging.enable_progress_bar()


def test_progress_draws_bars_when_on_and_prints_plain_lines_when_off(capsys):
    screen = _Terminal()
    progress = harness.Progress(5, "run", enabled=True, file=screen)
    task = progress.task("ist", 3)
    for _ in range(3):
        task.update(loss=0.5)
    assert task.bar.n == 3 and task.bar.postfix == "loss=0.5"   # drawn at tqdm's refresh rate
    task.close()
    skipped = progress.task("peft", 2)
    skipped.close()                                           # a method that did not run still moves the run on
    progress.close()
    drawn = screen.getvalue()
    assert "ist:" in drawn and "run: 100%" in drawn and "5/5" in drawn

    quiet = harness.Progress(5, "run")                        # default: off here (a test, not a terminal)
    assert not quiet.enabled and not quiet.task("ist", 5).shown
    quiet.write("a log line")
    captured = capsys.readouterr()
    assert captured.out == "a log line\n" and captured.err == ""


# --------------------------------------------------------------------------------------------------
# pictures
# --------------------------------------------------------------------------------------------------
ENV = {"device": "cpu", "device_name": "x86_64", "cpu_threads": 2, "torch": "t", "transformers": "t", "peft": "p"}


def _demo_payload():
    steps, layers = 40, 4
    curve = lambda scale: [scale * 3.0 * math.exp(-t / 15) + 0.3 for t in range(steps)]  # noqa: E731
    results = {}
    for k, name in enumerate(["pyflex_lora", "peft_lora", "ist", "lift", "pyflex_tau"]):
        train = curve(1.0 if name in ("pyflex_lora", "peft_lora") else 1.0 + 0.1 * k)  # the first two overlap
        results[name] = {"status": "ok", "train_loss_curve": train, "notes": "",
                         "eval_curve": [{"step": t, "loss": train[max(0, t - 1)]} for t in range(0, steps + 1, 10)]}
    results["ist"].update(ist_layers=[0, 1, 2, 3],
                          ist_importance_per_step=[[0.0, 0.0, 0.0, 0.0]] * 10 + [[0.1, -0.2, 0.3, -0.4]] * 30,
                          active_layers_per_step=[[t % 4] for t in range(steps)])
    results["lift"]["active_layers_per_step"] = [[t // 10] for t in range(steps)]
    results["pyflex_tau"]["tau_sparsity_per_layer_curve"] = {
        "layers": [0, 1, 2, 3], "values": [[0.01 * t, None if t < 5 else 0.5, 0.0, 0.2] for t in range(steps)]}
    return {"config": {"pretrain_task": "copy", "adapt_task": "sort", "adapt_steps": steps, "layers": layers},
            "environment": ENV, "methods": list(results), "results": results,
            "pretrain": {"train_loss_curve": curve(1.0), "eval_curve": [{"step": 0, "loss": 3.3}]}}


def test_loss_curves_show_every_method_on_every_panel():
    import matplotlib.pyplot as plt

    payload = _demo_payload()
    fig = plots.loss_curves_figure(payload)
    try:
        pre, train, evaluation = fig.axes
        for ax in (train, evaluation):
            lines = {line.get_label(): line for line in ax.get_lines()}
            assert set(lines) == set(payload["methods"])
            looks = {(line.get_color(), str(line.get_linestyle()), line.get_marker()) for line in lines.values()}
            assert len(looks) == len(lines)               # overlapping curves stay distinguishable
            assert {t.get_text() for t in ax.get_legend().get_texts()} == set(payload["methods"])
        assert pre.get_legend() is not None
        for ax in fig.axes:                              # log axes labelled with plain numbers at 1, 2, 5 × 10^k
            assert ax.get_yscale() == "log"
            fig.canvas.draw()
            labels = {t.get_text() for t in ax.get_yticklabels() if ax.get_ylim()[0] <= t.get_position()[1]
                      <= ax.get_ylim()[1]}
            assert {"0.5", "1", "2"} <= labels, labels
    finally:
        plt.close(fig)


def test_layer_schedule_and_tau_pictures_hold_the_run_data(tmp_path):
    import matplotlib.pyplot as plt
    import numpy as np

    payload = _demo_payload()
    fig = plots.layer_schedules_figure(payload)
    try:
        panels = [ax for ax in fig.axes if ax.get_images()]
        titles = [ax.get_title(loc="left") for ax in panels]
        assert [t.split(":")[0] for t in titles] == ["ist", "ist", "lift"]
        importance = panels[0].get_images()[0].get_array()
        np.testing.assert_allclose(importance[:, -1], [0.1, -0.2, 0.3, -0.4])
        np.testing.assert_allclose(importance[:, 0], 0.0)
        ist_active = np.asarray(panels[1].get_images()[0].get_array())
        lift_active = np.asarray(panels[2].get_images()[0].get_array())
        for t in range(40):
            assert list(np.flatnonzero(ist_active[:, t])) == [t % 4]
            assert list(np.flatnonzero(lift_active[:, t])) == [t // 10]
    finally:
        plt.close(fig)
    fig = plots.tau_sparsity_figure(payload)
    try:
        values = fig.axes[0].get_images()[0].get_array()
        assert values.shape == (4, 40) and values[0, 7] == pytest.approx(7.0)
        assert np.ma.getmaskarray(values)[1, 0]           # no τ value yet: drawn as a gap
        np.testing.assert_allclose(fig.axes[2].get_lines()[0].get_ydata()[-1], 100 * (0.39 + 0.5 + 0.0 + 0.2) / 4)
    finally:
        plt.close(fig)
    # a run without IST, LIFT or τ has no such pictures
    payload["methods"] = ["pyflex_lora"]
    assert plots.layer_schedules(payload, str(tmp_path / "a.png")) is None
    assert plots.tau_sparsity(payload, str(tmp_path / "b.png")) is None


def test_profile_chart_marks_the_hf_floor():
    import matplotlib.pyplot as plt

    def row(step, peak):
        return {"status": "ok", "step_ms_median": step, "peak_gib": peak,
                "phase_ms_median": {"schedule": 0.0, "forward": step / 4, "backward": step / 2, "optimizer": step / 4}}

    payload = {"methods": ["hf_floor", "pyflex_lora", "peft"], "environment": ENV,
               "results": {"hf_floor": row(100.0, 15.0), "pyflex_lora": row(150.0, 18.0), "peft": row(200.0, 27.0)},
               "config": {"size": "1b", "hidden": 2048, "layers": 22, "batch": 8, "seq": 1024, "dtype": "bf16", "r": 16}}
    fig = plots.profile_chart_figure(payload)
    try:
        time_ax, memory_ax = fig.axes
        for ax, floor in ((time_ax, 100.0), (memory_ax, 15.0)):
            dashed = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
            assert len(dashed) == 1 and list(dashed[0].get_ydata()) == [floor, floor]
            assert dashed[0].get_label().startswith("HF floor")
        texts = [t.get_text() for t in time_ax.texts]
        assert texts == ["100", "150\n×1.50", "200\n×2.00"]
        stacked = {}
        for bar in time_ax.patches:                     # the four phases of each method, stacked
            x = round(bar.get_x() + bar.get_width() / 2)
            stacked[x] = stacked.get(x, 0.0) + bar.get_height()
        assert stacked == pytest.approx({0: 100.0, 1: 150.0, 2: 200.0})
        assert [p.get_height() for p in memory_ax.patches] == [15.0, 18.0, 27.0]
    finally:
        plt.close(fig)
