"""Measurements behind docs/real_tier.md that are not pass/fail tests: why PEFT_S's τ barely moves, and what IST's
importance does, on the real tier (SmolLM2-135M-Instruct, fortunes, CPU).

    python tests/real/study_real_tier.py tau [--steps 40] [--alphas 1,10,30,100]
    python tests/real/study_real_tier.py ist [--steps 200] [--modes paper,official]
    python tests/real/study_real_tier.py target [--steps 40] [--targets 0.5] [--ratios 0.4,2]

``tau``: LoRA_S runs with τ step α·s for each α (s = 4e-5), instrumented at every step, after backward and before
the optimizer step: per τ-masked module, the two parts of τ's gradient (eq. 17) — the μ part Σ_i 1[(μ_i≥0)=m_i]·μ_i
(what backward leaves in ``-τ.grad``) and the λ part λ·Σ_i m_i (what the optimizer pre-hook adds) — plus the
per-token |μ_i| (from the module's output gradient and its LoRA delta), the ratio ρ_i = ‖M(x_i)‖/‖W0x_i‖ (quantiles)
and τ itself. ``ist``: a long IST run per mode: the importance after every update, the candidate losses, the
rewards' size, and how often each layer trained.

Results go to ``runs/real_tier/study_<what>.json`` and a summary is printed. Uses pyflex's public API only
(``pyflex.FlexLinear`` instances' lora_A / lora_B / scaling / tau / last_mask / tau_count_sink).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402

try:
    import pyflex  # noqa: E402
except ImportError:  # a script's sys.path[0] is this folder: fall back to the checkout this file is in
    sys.path.insert(1, os.path.dirname(os.path.dirname(HERE)))
    import pyflex  # noqa: E402
import real_methods as R  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.dirname(HERE)), "runs", "real_tier")


def _q(t: torch.Tensor, qs=(0.1, 0.5, 0.9)):
    t = t.flatten().float()
    return [float(torch.quantile(t, q)) for q in qs]


class TauProbe:
    """Hooks on every τ-masked FlexLinear: per token ρ_i and μ_i = ⟨∂L/∂h_i, M(x_i)⟩ (eq. 10) of the last step."""

    def __init__(self, model):
        self.mods = [(n, m) for n, m in model.named_modules() if isinstance(m, pyflex.FlexLinear) and m.tau is not None]
        self.rho, self.mu = {}, {}
        self.active = False
        for name, m in self.mods:
            m.register_forward_hook(self._fwd(name))

    def _fwd(self, name):
        def hook(mod, args, out):
            if not (self.active and torch.is_grad_enabled()):
                return
            x = args[0].detach().reshape(-1, mod.in_features).float()
            with torch.no_grad():
                delta = (x @ mod.lora_A.float().t()) @ mod.lora_B.float().t() * mod.scaling * float(mod.response_scale)
                base = x @ mod.weight.float().t()
                self.rho[name] = delta.norm(dim=-1) / base.norm(dim=-1).clamp_min(1e-6)

            def grad_hook(gy, name=name, delta=delta):
                self.mu[name] = (gy.detach().reshape(-1, delta.shape[-1]).float() * delta).sum(-1)
            if out.requires_grad:
                out.register_hook(grad_hook)
        return hook


def study_tau(tier, alphas, steps, lam=None, every=1):
    cfg = tier.cfg
    results = {}
    for alpha in alphas:
        t0 = time.perf_counter()
        setup_ = R.m_lora_s(tier.fresh(), cfg, seed=0, tau_alpha=alpha, lam=lam)
        model = setup_.model
        probe = TauProbe(model)
        lam_value = probe.mods[0][1].lam
        tau_ids = {id(m.tau) for _, m in probe.mods}
        tau_lr = [g["lr"] for g in setup_.optimizer.param_groups if any(id(p) in tau_ids for p in g["params"])][0]
        log = []
        prev_tau = None

        def on_step(step, run):
            nonlocal prev_tau
            rec = {"step": step}
            mu_part, lam_part, mu_abs_tok, mu_neg_frac, rho_q, tau_now, agree_mu_mine = [], [], [], [], [], [], []
            for name, m in probe.mods:
                g = m.tau.grad
                mu_part.append(0.0 if g is None else -float(g))      # backward leaves τ.grad = −Σ agree·μ
                count = m.tau_count_sink.grad
                lam_part.append(0.0 if count is None else m.lam * float(count[0]))  # (active, real) tokens
                tau_now.append(float(m.tau))
                if name in probe.mu:
                    mu = probe.mu[name]
                    mask = m.last_mask.reshape(-1).bool()
                    mu_abs_tok.append(float(mu.abs().mean()))
                    mu_neg_frac.append(float((mu < 0).float().mean()))
                    agree = (mu >= 0) == mask
                    agree_mu_mine.append(float(torch.where(agree, mu, torch.zeros_like(mu)).sum()))
                if name in probe.rho:
                    rho_q.append(_q(probe.rho[name]))
            n_tok = tier.train[0]["input_ids"].numel()
            rec.update(
                tokens=n_tok,
                mu_part_mean=statistics.fmean(mu_part), mu_part_abs_mean=statistics.fmean(abs(v) for v in mu_part),
                lam_part_mean=statistics.fmean(lam_part),
                mu_token_abs_mean=statistics.fmean(mu_abs_tok) if mu_abs_tok else None,
                mu_neg_frac=statistics.fmean(mu_neg_frac) if mu_neg_frac else None,
                mu_part_check=(max(abs(a - b) for a, b in zip(agree_mu_mine, mu_part)) if agree_mu_mine else None),
                rho_q10=statistics.fmean(q[0] for q in rho_q) if rho_q else None,
                rho_median=statistics.fmean(q[1] for q in rho_q) if rho_q else None,
                rho_q90=statistics.fmean(q[2] for q in rho_q) if rho_q else None,
                tau_mean=statistics.fmean(tau_now), tau_max=max(tau_now), tau_min=min(tau_now),
                train_sparsity=R.tau_sparsity_now(model),
                frac_lam_dominates=statistics.fmean(1.0 if lp > abs(mp) else 0.0 for lp, mp in zip(lam_part, mu_part)),
            )
            if prev_tau is not None:
                rec["dtau_over_lr"] = statistics.fmean(abs(a - b) for a, b in zip(tau_now, prev_tau)) / tau_lr
            prev_tau = tau_now
            log.append(rec)
            probe.active = (step + 1) % every == 0
        probe.active = True
        run = R.train(setup_, tier.train, cfg, steps=steps, name=f"lora_s α={alpha}", on_step=on_step,
                      evaluate_on=tier.heldout)
        results[str(alpha)] = {"tau_alpha": alpha, "tau_lr": tau_lr, "lam": lam_value, "steps": steps,
                               "heldout_loss": run.heldout_loss, "heldout_sparsity": run.heldout_sparsity,
                               "final_taus": run.taus[-1] if run.taus else None, "log": log,
                               "seconds": time.perf_counter() - t0}
        last = log[-1]
        print(f"α={alpha:<6g} τ lr {tau_lr:.0e}: held-out {run.heldout_loss:.4f} (untrained {tier.base_loss:.4f}), "
              f"sparsity {run.heldout_sparsity:.1%}; τ mean {last['tau_mean']:.2e} (max {last['tau_max']:.2e}); "
              f"ρ median {last['rho_median']:.2e} [q10 {last['rho_q10']:.2e}, q90 {last['rho_q90']:.2e}]; "
              f"|Σμ| {last['mu_part_abs_mean']:.2e} vs λ·count {last['lam_part_mean']:.2e}; per-token |μ| "
              f"{last['mu_token_abs_mean']:.2e} vs λ {lam_value:.1e}; |Δτ|/lr {last.get('dtau_over_lr', float('nan')):.2f}"
              f" ({time.perf_counter() - t0:.0f} s)", flush=True)
    return results


def study_target(tier, targets, ratios, steps):
    """LoRA_S with ``target_sparsity``: per step the mean and spread over modules of the training sparsity, and
    the held-out sparsity per module at the end."""
    cfg = tier.cfg
    results = {}
    for target in targets:
        for ratio in ratios:
            t0 = time.perf_counter()
            setup_ = R.m_lora_s(tier.fresh(), cfg, seed=0, target_sparsity=target, tau_lr_ratio=ratio)
            mods = [m for m in setup_.model.modules() if isinstance(m, pyflex.FlexLinear) and m.tau is not None]
            log = []

            def on_step(step, run, mods=mods, log=log):
                per = sorted(m.last_sparsity for m in mods)
                log.append({"step": step, "mean": statistics.fmean(per), "q10": per[len(per) // 10],
                            "median": per[len(per) // 2], "q90": per[(9 * len(per)) // 10],
                            "tau_mean": statistics.fmean(float(m.tau) for m in mods)})
            run = R.train(setup_, tier.train, cfg, steps=steps, name=f"target {target} ratio {ratio}",
                          on_step=on_step, evaluate_on=tier.heldout)
            key = f"{target}/{ratio}"
            results[key] = {"target": target, "tau_lr_ratio": ratio, "steps": steps, "log": log,
                            "heldout_loss": run.heldout_loss, "heldout_sparsity": run.heldout_sparsity,
                            "seconds": time.perf_counter() - t0}
            at = {k: round(log[k - 1]["mean"], 3) for k in (10, 20, 30, 40, 60, 80, 120) if k <= len(log)}
            last = log[-1]
            print(f"target {target:.0%}, τ lr {ratio:g} × lr: held-out {run.heldout_loss:.4f}, held-out sparsity "
                  f"{run.heldout_sparsity:.1%}; training sparsity (mean over modules) by step {at}; last step "
                  f"q10/median/q90 over modules {last['q10']:.2f}/{last['median']:.2f}/{last['q90']:.2f}"
                  f" ({time.perf_counter() - t0:.0f} s)", flush=True)
    return results


def study_ist(tier, modes, steps, seed=0):
    cfg = tier.cfg
    results = {}
    for mode in modes:
        t0 = time.perf_counter()
        kw = {"mode": mode}
        if mode == "official":
            kw["n_u"] = 8   # the paper's count for 30 layers (official int() rounding would give 7)
        if mode == "random":
            setup_ = R.m_random_layers(tier.fresh(), cfg, seed=seed, n=8)
        else:
            setup_ = R.m_ist(tier.fresh(), cfg, seed=seed, **kw)
        run = R.train(setup_, tier.train, cfg, steps=steps, name=f"ist {mode}", evaluate_on=tier.heldout)
        sched = setup_.schedule
        counts = collections.Counter(i for act in run.active for i in act)
        n_layers = len(sched.layers)
        shares = sorted((counts.get(i, 0) / steps for i in sched.layers), reverse=True)
        entry = {"mode": mode, "steps": steps, "heldout_loss": run.heldout_loss, "train_losses": run.losses,
                 "layer_steps": {int(i): counts.get(i, 0) for i in sched.layers},
                 "top3_share_of_steps": shares[:3], "seconds": time.perf_counter() - t0}
        if hasattr(sched, "history"):
            hist = [{"step": h["step"], "importance": list(map(float, h["importance"])), "losses": h["losses"],
                     "rewards": h["rewards"]} for h in sched.history]
            entry["history"] = hist
            imp = hist[-1]["importance"] if hist else [0.0] * n_layers
            spread = max(imp) - min(imp)
            rewards = [abs(r) for h in hist for r in h["rewards"]]
            loss_gaps = [max(h["losses"]) - min(h["losses"]) for h in hist]
            p = torch.sigmoid(torch.tensor(imp if mode == "paper" else [-v for v in imp]))
            entry.update(final_importance=imp, importance_spread=spread, mean_abs_reward=statistics.fmean(rewards),
                         mean_candidate_loss_gap=statistics.fmean(loss_gaps), sigmoid_range=[float(p.min()),
                                                                                              float(p.max())])
            order = sorted(range(n_layers), key=lambda k: -imp[k])
            print(f"IST {mode}: held-out {run.heldout_loss:.4f}; {len(hist)} updates; importance spread {spread:.2e} "
                  f"(top layers {[sched.layers[k] for k in order[:3]]}); mean |r_j| {entry['mean_abs_reward']:.2e}, "
                  f"mean candidate-loss gap {entry['mean_candidate_loss_gap']:.3f}; sigmoid range "
                  f"{entry['sigmoid_range'][0]:.4f}–{entry['sigmoid_range'][1]:.4f}; share of steps of the 3 most "
                  f"trained layers {[round(s, 2) for s in shares[:3]]} (uniform {8 / n_layers:.2f})"
                  f" ({time.perf_counter() - t0:.0f} s)", flush=True)
        else:
            print(f"random layers: held-out {run.heldout_loss:.4f}; share of steps of the 3 most trained layers "
                  f"{[round(s, 2) for s in shares[:3]]} ({time.perf_counter() - t0:.0f} s)", flush=True)
        results[mode] = entry
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["tau", "ist", "target"])
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--alphas", default="1,10,30,100")
    ap.add_argument("--lam", type=float, default=None)
    ap.add_argument("--modes", default="paper,official,random")
    ap.add_argument("--targets", default="0.5")
    ap.add_argument("--ratios", default="0.4,2", help="target: τ lr as multiples of the adapters' lr")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    steps = args.steps or (200 if args.what == "ist" else 40)
    cfg = R.RealConfig()
    cfg.steps = steps
    tier = R.load_tier(cfg)
    print(f"untrained held-out loss {tier.base_loss:.4f}; {R.env_line()}", flush=True)
    if args.what == "tau":
        res = study_tau(tier, [float(a) for a in args.alphas.split(",")], steps, lam=args.lam)
    elif args.what == "target":
        res = study_target(tier, [float(t) for t in args.targets.split(",")],
                           [float(r) for r in args.ratios.split(",")], steps)
    else:
        res = study_ist(tier, args.modes.split(","), steps, seed=args.seed)
    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, f"study_{args.what}{args.tag}.json")
    with open(path, "w") as f:
        json.dump({"base_loss": tier.base_loss, "env": R.env_line(), "steps": steps, "results": res}, f)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
