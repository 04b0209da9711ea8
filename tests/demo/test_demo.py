"""`python -m pyflex.demo --quick`: every method runs, learns, and the outputs are written."""
import json
import math

import pytest

import pyflex.demo.__main__ as demo

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
    assert set(payload["results"]) == set(demo.METHODS)
    for name, r in payload["results"].items():
        if name in demo.OPTIONAL and r["status"] == "skipped":
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
    # every method starts from the same pre-trained model; LoRA starts with B = 0, so the LoRA methods start from
    # exactly its loss (HLPT's prefixes change the output from step 0)
    starts = {round(r["eval_loss_start"], 5) for n, r in payload["results"].items()
              if r["status"] == "ok" and n not in ("hlpt", "h2lpt")}
    assert len(starts) == 1


def test_outputs_written(quick_run):
    _, out = quick_run
    png = out / "loss_curves.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    payload = json.loads((out / "results.json").read_text())
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
        setup = demo.METHODS[name](model, cfg)
        losses[name] = []
        for batch in batches:
            loss = setup.model(**batch).loss
            loss.backward()
            setup.optimizer.step()
            setup.optimizer.zero_grad()
            losses[name].append(loss.item())
    assert losses["pyflex_lora"] == pytest.approx(losses["peft_lora"], rel=1e-4, abs=1e-5)
    assert losses["pyflex_lora"][-1] < losses["pyflex_lora"][0]
