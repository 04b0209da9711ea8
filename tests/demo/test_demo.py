"""`python -m pyflex.demo --quick`: every method runs, learns, and the outputs are written."""
import json
import math

import pytest

import pyflex
import pyflex.demo.__main__ as demo
from pyflex.demo import methods

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    status = demo.main(["--quick", "--out", str(out), "--device", "cpu"])
    return status, out


def test_quick_demo_exits_cleanly(quick_run):
    status, _ = quick_run
    assert status == 0, "a method failed; see results.json for its traceback"


def test_every_method_present_and_learning(quick_run):
    _, out = quick_run
    payload = json.loads((out / "results.json").read_text())
    assert payload["methods"] == list(methods.DEMO_METHODS) and set(payload["results"]) == set(methods.DEMO_METHODS)
    for name, r in payload["results"].items():
        if methods.method(name).requires and r["status"] == "skipped":
            continue
        assert r["status"] == "ok", f"{name}: {r.get('error')}"
        losses = r["train_loss_curve"] + [e["loss"] for e in r["eval_curve"]]
        assert all(math.isfinite(v) for v in losses), name
        assert len(r["train_loss_curve"]) == payload["config"]["adapt_steps"]
        # adaptation lowers the loss on the new task, both on its training batches and on held-out data
        assert r["eval_loss_final"] < r["eval_loss_start"], name
        assert r["train_loss_final"] < r["train_loss_start"], name
        assert r["train_seconds"] > 0
        assert r["trainable_params"] > 0
    assert payload["results"]["pyflex_tau"]["tau_sparsity_final"] is not None
    assert payload["results"]["pyflex_tau_target"]["tau_sparsity_final"] is not None
    assert "target 50%" in payload["results"]["pyflex_tau_target"]["notes"]
    # every method starts from the same pre-trained model; LoRA starts with B = 0, so the LoRA methods start from
    # exactly its loss (HLPT's prefixes change the output from step 0)
    starts = {round(r["eval_loss_start"], 5) for n, r in payload["results"].items()
              if r["status"] == "ok" and n not in ("hlpt", "h2lpt")}
    assert len(starts) == 1


def test_outputs_written(quick_run):
    _, out = quick_run
    payload = json.loads((out / "results.json").read_text())
    pictures = ("loss_curves", "layer_schedules", "tau_sparsity")
    assert set(payload["plots"]) == set(pictures)
    for name in pictures:
        png = out / f"{name}.png"
        assert payload["plots"][name] == str(png)
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert payload["environment"]["device"] == "cpu"
    assert payload["memory_kind"].startswith("tensor bytes")
    # CPU memory is counted exactly: every method holds something, and LIFT (one block trains; the layers below it
    # run without saving activations) holds less than LoRA on all layers
    mem = {n: r["peak_memory_mib"] for n, r in payload["results"].items() if r["status"] == "ok"}
    assert all(v > 0 for v in mem.values())
    assert mem["lift"] < mem["pyflex_lora"]
    if "peft_lora" in mem:  # PEFT keeps the down_proj input and act(gate) that pyflex rebuilds (recompute_mlp)
        assert mem["pyflex_lora"] < mem["peft_lora"]


def test_bad_method_is_rejected(tmp_path, capsys):
    assert demo.main(["--quick", "--methods", "nope", "--out", str(tmp_path)]) == 2
    assert "allowed" in capsys.readouterr().err


def test_pyflex_lora_and_peft_rows_start_identical():
    """The demo gives PEFT the same lora_A draws as pyflex, so the first steps of the two runs agree to rounding:
    any gap in the table's final losses is rounding amplified by training, not a different method."""
    pytest.importorskip("peft")
    import torch

    cfg = demo.DemoConfig.quick()
    batches = demo.make_batches(cfg, "sort", 6, 8, seed=3, device="cpu")
    losses = {}
    for name in ("pyflex_lora", "peft_lora"):
        model = demo.build_model(cfg, "cpu")
        torch.manual_seed(cfg.seed)  # as the demo does before each method's setup
        setup = methods.method(name)(model, cfg)
        losses[name] = []
        for batch in batches:
            loss = setup.model(**batch).loss
            loss.backward()
            setup.optimizer.step()
            setup.optimizer.zero_grad()
            losses[name].append(loss.item())
    assert losses["pyflex_lora"] == pytest.approx(losses["peft_lora"], rel=1e-4, abs=1e-5)
    assert losses["pyflex_lora"][-1] < losses["pyflex_lora"][0]


def test_traces_for_the_pictures(quick_run):
    """Per step: the layers IST and LIFT trained, IST's importance, τ sparsity per layer — as the schedules and the
    registry report them (LIFT's against pyflex.lift_sequence, IST's against its importance updates)."""
    _, out = quick_run
    payload = json.loads((out / "results.json").read_text())
    steps, layers = payload["config"]["adapt_steps"], payload["config"]["layers"]

    lift = payload["results"]["lift"]
    expected = pyflex.lift_sequence(list(range(layers)), steps, order="front2end", policy="grouped")
    assert lift["active_layers_per_step"] == [[block] for block in expected]

    ist = payload["results"]["ist"]
    assert len(ist["active_layers_per_step"]) == steps
    assert all(len(active) == 2 for active in ist["active_layers_per_step"])  # N_u = 25 % of 8
    importance = ist["ist_importance_per_step"]
    assert len(importance) == steps and ist["ist_layers"] == list(range(layers))
    # importance moves only at the updates, every T_c = 10 steps (before the 11th, 21st, ... step's choice)
    changes = [t for t in range(1, steps) if importance[t] != importance[t - 1]]
    assert changes and set(changes) <= set(range(10, steps, 10))
    assert importance[0] == [0.0] * layers and importance[-1] == ist["ist_importance"]
    assert ist["ist_updates"] == (steps - 1) // 10

    tau = payload["results"]["pyflex_tau"]
    per_layer = tau["tau_sparsity_per_layer_curve"]
    assert per_layer["layers"] == list(range(layers)) and len(per_layer["values"]) == steps
    for row, mean in zip(per_layer["values"], tau["tau_sparsity_curve"]):
        assert sum(row) / len(row) == pytest.approx(mean)
    assert max(per_layer["values"][-1]) > 0        # the mask is at work by the end of the run
    # the summary is the last forward's: the evaluation on held-out batches after the last step
    assert set(tau["tau_sparsity_per_layer"]) == {str(i) for i in range(layers)}
    assert 0 < tau["tau_sparsity_mean"] < 1
