"""Smoke test of bench/profile_model.py on a tiny CPU config."""
import importlib.util
import json
import math
import pathlib
import sys

import pytest

import pyflex

pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _load():
    spec = importlib.util.spec_from_file_location("profile_model", ROOT / "bench" / "profile_model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def profile_run(tmp_path_factory):
    module = _load()
    out = tmp_path_factory.mktemp("profile")
    methods = ["hf_floor", "pyflex_lora", "pyflex_lora_norecompute", "pyflex_tau", "peft", "lift_f2e"]
    status = module.main(["--size", "tiny", "--device", "cpu", "--layers", "2", "--hidden", "64", "--intermediate",
                          "128", "--seq", "32", "--steps", "2", "--warmup", "1", "--methods", ",".join(methods),
                          "--out", str(out)])
    return module, status, out, methods


def test_profile_runs(profile_run):
    _, status, out, methods = profile_run
    assert status == 0
    payload = json.loads((out / "profile.json").read_text())
    assert payload["methods"] == methods
    assert payload["config"]["layers"] == 2 and payload["config"]["dtype"] == "fp32"
    for name in methods:
        r = payload["results"][name]
        assert r["status"] == "ok", f"{name}: {r.get('error')}"
        assert r["step_ms_median"] > 0 and r["tokens_per_s"] > 0
        assert set(r["phase_ms_median"]) == {"schedule", "forward", "backward", "optimizer"}
        assert r["phase_ms_median"]["forward"] > 0 and r["phase_ms_median"]["backward"] > 0
        assert len(r["step_ms_all"]) == 3
        assert r["loss_finite"] and all(math.isfinite(v) for v in r["losses"])
        assert r["peak_gib"] > 0 and r["memory_kind"].startswith("tensor bytes")
    assert payload["results"]["hf_floor"]["trainable_params"] == 0
    assert payload["results"]["pyflex_lora"]["trainable_params"] == payload["results"]["peft"]["trainable_params"] > 0
    assert set(payload["results"]["pyflex_tau"]["tau_sparsity_per_layer"]) == {"0", "1"}
    # CPU memory is counted exactly: the gated-MLP recompute keeps 2 (tokens × intermediate) fp32 tensors less per
    # layer (2 layers, batch 2 × 32 tokens, intermediate 128), and the floor holds no adapter state at all
    peak = {name: payload["results"][name]["peak_gib"] * 2**30 for name in methods}
    saved = 2 * 2 * (2 * 32) * 128 * 4
    assert peak["pyflex_lora_norecompute"] - peak["pyflex_lora"] == pytest.approx(saved, rel=0.05)
    assert peak["hf_floor"] < peak["pyflex_lora_norecompute"]
    assert (out / "profile.png").read_bytes()[:4] == b"\x89PNG" and payload["plot"] == str(out / "profile.png")
    # LIFT over 3 steps on 2 blocks (grouped, front to end), the last 2 of them timed
    lift = payload["results"]["lift_f2e"]
    assert lift["lift_blocks_per_step"] == pyflex.lift_sequence([0, 1], 3) == [0, 1, 1]
    assert lift["active_layers_per_step"] == [[0], [1], [1]] and lift["timed_layers"] == [1]


def test_table_reports_floor_ratio_and_schedule(profile_run):
    module, _, out, methods = profile_run
    payload = json.loads((out / "profile.json").read_text())
    lines = module.format_table(payload).splitlines()
    rows = {line.split()[0]: line for line in lines[2:]}
    assert list(rows) == methods
    floor = payload["results"]["hf_floor"]["step_ms_median"]
    for name in methods:
        ratio = rows[name].split()[2]
        assert float(ratio) == pytest.approx(payload["results"][name]["step_ms_median"] / floor, abs=0.006)
    assert "timed steps trained layers 1" in rows["lift_f2e"] and "τ sparsity" in rows["pyflex_tau"]


def test_cpu_defaults_to_tiny(profile_run):
    module = profile_run[0]
    args = module.parse_args(["--device", "cpu"])
    notes = module.resolve_args(args)
    assert args.size == "tiny" and args.hidden == module.SIZES["tiny"]["hidden"]
    assert any("tiny" in n for n in notes)
    big = module.parse_args(["--device", "cpu", "--size", "1b"])
    module.resolve_args(big)
    shape = (big.hidden, big.intermediate, big.layers, big.heads, big.kv_heads, big.vocab)
    assert shape == (2048, 5632, 22, 32, 4, 32000)


def test_unknown_method(profile_run, capsys):
    """The profiler takes its names from the table the demo uses (pyflex/demo/methods.py), aliases included."""
    from pyflex.demo.methods import ALIASES, METHODS

    module = profile_run[0]
    assert module.main(["--device", "cpu", "--methods", "hf_floor,nope", "--out", "unused"]) == 2
    err = capsys.readouterr().err
    assert "unknown nope" in err
    assert set(err.strip().split("allowed: ")[1].split(", ")) == set(METHODS) | set(ALIASES)
