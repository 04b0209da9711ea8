"""What the papers claim, on the real model: every method fine-tunes SmolLM2-135M-Instruct on fortunes for the tier's
budget (40 steps of 4 × 64 tokens, AdamW lr 2e-3, clip 1.0, r = 8, α = 16; LoRA on q,k,v,o of all 30 layers) and is
scored by the held-out loss (32 rows × 64 tokens of fortunes it never trained on). The untrained model's held-out
loss is about 4.97 nats per token; the margins below were set from the measured results (docs/real_tier.md) with
room for thread-count rounding, and far above what a broken method (no adapter update, a gate stuck at 0, the
wrong layers) reaches.
"""
from __future__ import annotations

import statistics

import pytest


pytestmark = pytest.mark.real

SEEDS = (0, 1, 2)

# method → (settings, minimum held-out improvement over the untrained model in nats/token)
IMPROVES = {
    "lora": ({}, 0.5),
    "lora_s": ({}, 0.5),
    "lora_s_large_tau_step": ({"tau_alpha": 100.0}, 0.5),
    "ist_paper": ({"mode": "paper"}, 0.3),
    "ist_official": ({"mode": "official", "n_u": 8}, 0.3),
    "lift": ({}, 0.08),
    "hlpt": ({}, 0.4),
    "h2lpt": ({}, 0.3),
}
METHOD_OF = {"lora_s_large_tau_step": "lora_s", "ist_paper": "ist", "ist_official": "ist"}


@pytest.mark.parametrize("case", list(IMPROVES))
def test_method_lowers_heldout_loss(tier, runs, case):
    kw, margin = IMPROVES[case]
    run = runs.get(METHOD_OF.get(case, case), **kw)
    gain = tier.base_loss - run.heldout_loss
    assert run.losses[-1] < run.losses[0], f"{case}: the training loss did not go down"
    assert gain >= margin, (f"{case}: held-out loss {run.heldout_loss:.4f} vs untrained {tier.base_loss:.4f}: "
                            f"improvement {gain:.3f} < {margin}")


# -- LoRA_S ----------------------------------------------------------------------------------------------
# The paper's τ step (α·s = 1 · 4e-5) moves τ by at most ~4e-5 per Adam step: 1.6e-3 after 40 steps, below the
# ratio ρ of almost every token, so the mask stays open. pyflex's default τ lr, 0.4 × the adapters' lr (the paper's
# ratio; 8e-4 here), and a 100x step (tau_alpha=100) give the paper's kind of sparsity within the budget.
PAPER_TAU = {"tau_alpha": 1.0, "tau_s": 4e-5, "lam": 4.5e-5}
LARGE_TAU = {"tau_alpha": 100.0}
LARGE_TAU_MIN_SPARSITY = 0.40          # the paper's LoRA_S runs report 50-75 %
LORA_S_LOSS_MARGIN = 0.05               # nats/token above LoRA's held-out loss
TARGET_SPARSITY, TARGET_TOLERANCE = 0.5, 0.1


def test_lora_s_paper_tau_step_barely_masks(tier, runs):
    """With the paper's settings (α·s = 4e-5, λ = 4.5e-5) τ climbs at Adam's full rate (while no token is masked
    both parts of eq. 17 are >= 0) and still ends at ~40·4e-5, below the ratio ρ of almost every token, so almost
    nothing is masked: LoRA_S is LoRA at this length."""
    lora = runs.get("lora")
    run = runs.get("lora_s", **PAPER_TAU)
    taus = run.taus[-1]
    assert run.heldout_sparsity is not None
    # Adam's |m̂/√v̂| is ~1 for a gradient of constant sign (measured: τ = 1.57e-3 .. 1.70e-3 after 40 steps)
    assert max(taus) <= 1.25 * tier.cfg.steps * 4e-5, f"τ moved further than Adam's step bound: {max(taus):.2e}"
    assert min(taus) > 0.5 * tier.cfg.steps * 4e-5, f"τ did not climb (λ should dominate at first): {min(taus):.2e}"
    assert run.heldout_sparsity < 0.05, f"paper τ step gave sparsity {run.heldout_sparsity:.1%}"
    assert abs(run.heldout_loss - lora.heldout_loss) < 0.01


def test_lora_s_large_tau_step_reaches_sparsity_at_lora_quality(tier, runs):
    lora = runs.get("lora")
    run = runs.get("lora_s", **LARGE_TAU)
    assert run.heldout_sparsity >= LARGE_TAU_MIN_SPARSITY, (
        f"tau_alpha=100: held-out sparsity {run.heldout_sparsity:.1%} < {LARGE_TAU_MIN_SPARSITY:.0%}")
    assert run.heldout_loss <= lora.heldout_loss + LORA_S_LOSS_MARGIN, (
        f"tau_alpha=100: held-out {run.heldout_loss:.4f} vs LoRA {lora.heldout_loss:.4f}")


def test_lora_s_defaults_reach_sparsity_at_lora_quality(tier, runs):
    """LoRA_S with pyflex's defaults (no τ argument: τ lr 0.4 × 2e-3, λ 4.5e-5): the issue's claim — a stated
    sparsity at LoRA's quality."""
    lora = runs.get("lora")
    run = runs.get("lora_s")
    assert run.heldout_sparsity >= LARGE_TAU_MIN_SPARSITY, f"defaults: sparsity {run.heldout_sparsity:.1%}"
    assert run.heldout_loss <= lora.heldout_loss + LORA_S_LOSS_MARGIN, (
        f"defaults: held-out {run.heldout_loss:.4f} vs LoRA {lora.heldout_loss:.4f}")


def test_lora_s_target_sparsity_is_reached_at_lora_quality(tier, runs):
    """``target_sparsity=0.5`` (pyflex's option beyond the paper; its default τ lr, 2 × the adapters' lr): the
    held-out sparsity of the final τ's is within 0.1 of the target, at LoRA's quality. (With the λ default's 0.4 × lr
    τ is still climbing at step 40: 36 % masked; `study_real_tier.py target`.)"""
    lora = runs.get("lora")
    run = runs.get("lora_s", target_sparsity=TARGET_SPARSITY)
    assert abs(run.heldout_sparsity - TARGET_SPARSITY) <= TARGET_TOLERANCE, (
        f"target {TARGET_SPARSITY:.0%}: held-out sparsity {run.heldout_sparsity:.1%}")
    assert run.heldout_loss <= lora.heldout_loss + LORA_S_LOSS_MARGIN, (
        f"target {TARGET_SPARSITY:.0%}: held-out {run.heldout_loss:.4f} vs LoRA {lora.heldout_loss:.4f}")


# -- IST against random layers of the same budget --------------------------------------------------------
IST_TOLERANCE = 0.01   # nats/token: IST's mean held-out loss over the seeds may exceed random's by at most this


def _mean_heldout(runs, method, **kw):
    values = [runs.get(method, seed=s, **kw).heldout_loss for s in SEEDS]
    return statistics.fmean(values), values


@pytest.mark.parametrize("mode", ["paper", "official"])
def test_ist_matches_random_layers_of_the_same_budget(tier, runs, mode):
    """8 of 30 layers train per step in all three (official mode gets n_u=8 explicitly; its own int() rounding
    would give 7); seeds vary the adapter init and the layer draws, the same per seed for IST and random."""
    ist_mean, ist_values = _mean_heldout(runs, "ist", mode=mode, **({"n_u": 8} if mode == "official" else {}))
    rnd_mean, rnd_values = _mean_heldout(runs, "random_layers", n=8)
    print(f"\n[real] IST {mode}: held-out {[round(v, 4) for v in ist_values]} mean {ist_mean:.4f}; random layers "
          f"{[round(v, 4) for v in rnd_values]} mean {rnd_mean:.4f}")
    for s in SEEDS:
        run = runs.get("ist", seed=s, mode=mode, **({"n_u": 8} if mode == "official" else {}))
        assert all(len(a) == 8 for a in run.active), "IST did not train 8 layers per step"
        assert len(run.importance_history) == (tier.cfg.steps - 1) // 10, "IST's importance was not updated"
    assert ist_mean <= rnd_mean + IST_TOLERANCE, (
        f"IST {mode} mean held-out {ist_mean:.4f} is worse than random layers' {rnd_mean:.4f} by more than "
        f"{IST_TOLERANCE}")
