"""The real-model tier (``python -m pytest -m real tests/real``).

Its tests fine-tune SmolLM2-135M-Instruct on real text (BSD fortunes) on the CPU for several minutes, so:

* a run that does not ask for them skips them: the default ``python -m pytest -q`` (and CI) reports them as skipped
  with the command that runs them. They are asked for by a ``-m`` expression that selects the ``real`` marker
  (``-m real``, ``-m "real or slow"``) or by ``PYFLEX_REAL=1``;
* asked for but not set up (no converted model, no fortunes) they fail, naming the set-up command
  (``python tests/real/setup_real_tier.py``): a tier that was asked for never passes by skipping.

The model, the batches and every method's run are built once per session (:func:`tier`, :func:`runs`), so each
method trains once however many tests read its result.
"""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import setup_real_tier  # noqa: E402

REAL_HELP = ("real-model tier: run it with `python -m pytest -m real tests/real` "
             "(set-up once: `python tests/real/setup_real_tier.py`)")


def _real_selected(config) -> bool:
    if os.environ.get("PYFLEX_REAL", "").strip() not in ("", "0"):
        return True
    expr = (config.getoption("markexpr", "") or "").strip()
    if not expr:
        return False
    try:
        from _pytest.mark.expression import Expression
        return bool(Expression.compile(expr).evaluate(lambda name, **kw: name == "real"))
    except Exception:  # pragma: no cover - pytest internals moved: a plain reading of the expression
        return "real" in expr.replace("not real", "")


def pytest_collection_modifyitems(config, items):
    real_items = [item for item in items if item.get_closest_marker("real") is not None]
    if not real_items:
        return
    if not _real_selected(config):
        skip = pytest.mark.skip(reason=REAL_HELP)
        for item in real_items:
            item.add_marker(skip)
        return


@pytest.fixture(scope="session")
def tier():
    """The loaded model, tokenizer, fixed train/held-out batches and the untrained held-out loss. Every real test
    uses it, so a tier that was asked for but not set up fails here, naming what is missing."""
    import real_methods

    gone = setup_real_tier.missing()
    if gone:
        pytest.fail("the real tier was asked for but is not set up; missing: " + "; ".join(gone)
                    + ". Run `python tests/real/setup_real_tier.py` once.", pytrace=False)

    return real_methods.load_tier()


class _Runs:
    """Each (method, seed, settings) trained once per session, on demand."""

    def __init__(self, tier):
        self.tier = tier
        self.cache = {}

    def get(self, method: str, seed: int = 0, **kw):
        import real_methods

        key = (method, seed, tuple(sorted(kw.items())))
        if key not in self.cache:
            run = real_methods.run_method(self.tier, method, seed=seed, **kw)
            self.cache[key] = run
            print(f"\n[real] {run.method:<36} seed {seed}: held-out {run.heldout_loss:.4f} "
                  f"(untrained {self.tier.base_loss:.4f})"
                  + ("" if run.heldout_sparsity is None else f", sparsity {run.heldout_sparsity:.1%}")
                  + f", {run.ms_per_step:.0f} ms/step")
        return self.cache[key]


def _table(tier, cache) -> str:
    lines = ["| method | seed | held-out loss | Δ vs untrained | τ sparsity (held-out) | ms/step (median) | notes |",
             "|---|---|---|---|---|---|---|"]
    for (method, seed, kw), run in cache.items():
        sparsity = "–" if run.heldout_sparsity is None else f"{run.heldout_sparsity:.1%}"
        lines.append(f"| {run.method} | {seed} | {run.heldout_loss:.4f} | {tier.base_loss - run.heldout_loss:+.3f} | "
                     f"{sparsity} | {run.ms_per_step:.0f} | {run.notes} |")
    return "\n".join(lines)


@pytest.fixture(scope="session")
def runs(tier, request):
    """Every method run of the session; at the end they go to ``runs/real_tier/results.json`` and ``results.md``
    (or ``$PYFLEX_REAL_OUT``): the table in docs/real_tier.md is made from them."""
    import json
    import time

    import real_methods

    r = _Runs(tier)
    started = time.time()
    yield r
    if not r.cache:
        return
    out = os.environ.get("PYFLEX_REAL_OUT") or os.path.join(str(request.config.rootpath), "runs", "real_tier")
    os.makedirs(out, exist_ok=True)
    payload = {"env": real_methods.env_line(), "config": vars(tier.cfg), "base_loss": tier.base_loss,
               "seconds": time.time() - started, "runs": []}
    for (method, seed, kw), run in r.cache.items():
        payload["runs"].append({"method": method, "label": run.method, "seed": seed, "settings": dict(kw),
                                "heldout_loss": run.heldout_loss, "heldout_sparsity": run.heldout_sparsity,
                                "ms_per_step": run.ms_per_step, "train_losses": run.losses,
                                "final_taus": run.taus[-1] if run.taus else None,
                                "layer_choices": run.active or None, "importance": run.importance,
                                "importance_history": run.importance_history, "notes": run.notes})
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(payload, f)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(f"untrained held-out loss {tier.base_loss:.4f}; {payload['env']}\n\n{_table(tier, r.cache)}\n")
