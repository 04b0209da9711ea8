"""The real tier's harness: each method set up on a fresh copy of SmolLM2-135M-Instruct, trained by one plain loop on
the same fortune batches, scored by held-out loss. Shared by ``tests/real/test_real_*.py``,
``tests/real/study_real_tier.py`` and ``bench/bench_real_model.py``.

Only pyflex's public top-level API is used (``import pyflex``).
"""
from __future__ import annotations

import copy
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch

import pyflex

try:  # imported as a module of tests/real (pytest puts the folder on sys.path) or from the bench (ditto)
    import setup_real_tier as setup
except ImportError:  # pragma: no cover
    from . import setup_real_tier as setup  # type: ignore

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


@dataclass
class RealConfig:
    """The tier's budget: 40 steps of 4 × 64 tokens (10,240 training tokens), held-out 32 rows × 64 tokens."""
    batch_size: int = 4
    seq_len: int = 64
    steps: int = 40
    eval_batches: int = 4
    eval_batch_size: int = 8
    lr: float = 2e-3           # every method (HLPT's paper lr is 3e-3; one lr keeps the comparison plain)
    r: int = 8
    alpha: float = 16.0
    clip: float = 1.0
    num_layers: Optional[int] = None   # None: all 30 layers
    threads: Optional[int] = None      # torch.set_num_threads; None: $PYFLEX_REAL_THREADS, else torch's default


@dataclass
class Tier:
    cfg: RealConfig
    tokenizer: Any
    base: torch.nn.Module              # the untouched base model; methods train deep copies
    train: List[Dict[str, torch.Tensor]]
    heldout: List[Dict[str, torch.Tensor]]
    base_loss: float                   # held-out loss of the untrained model

    def fresh(self) -> torch.nn.Module:
        model = copy.deepcopy(self.base)
        model.train()
        return model


def load_tier(cfg: Optional[RealConfig] = None, extra_train_batches: int = 0) -> Tier:
    cfg = cfg or RealConfig()
    threads = cfg.threads or int(os.environ.get("PYFLEX_REAL_THREADS", "0") or 0)
    if threads:
        # On a machine shared with other jobs, torch's OpenMP threads spin-wait for each other and a 2-thread step
        # can take 10x longer (measured: 1.3 s -> 12-16 s); 1 thread (or OMP_WAIT_POLICY=PASSIVE) avoids it.
        torch.set_num_threads(threads)
    tokenizer = setup.load_tokenizer()
    base = setup.load_model(cfg.num_layers)
    for p in base.parameters():
        p.requires_grad_(False)
    train_texts, held_texts = setup.split_fortunes(setup.read_fortunes())
    train = setup.lm_batches(tokenizer, train_texts, cfg.steps + extra_train_batches, cfg.batch_size, cfg.seq_len)
    heldout = setup.lm_batches(tokenizer, held_texts, cfg.eval_batches, cfg.eval_batch_size, cfg.seq_len)
    base_loss = setup.evaluate(base, heldout)
    return Tier(cfg, tokenizer, base, train, heldout, base_loss)


# --------------------------------------------------------------------------------------------------
# methods: each gets a fresh model and returns what the loop needs
# --------------------------------------------------------------------------------------------------
@dataclass
class Setup:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    schedule: Any = None               # .step(batch) before the forward
    notes: str = ""


class RandomLayers:
    """The IST baseline: every step, ``n`` layers drawn uniformly without replacement (a private seeded generator)
    train; the others are frozen through the layer handles' trainable switches (``registry.set_active``), the
    same mechanism IST's schedule uses."""

    def __init__(self, model, n: int, seed: int = 0):
        self.registry = pyflex.get_registry(model)
        self.layers = [h.index for h in self.registry.layers if len(list(h.parameters())) > 0]
        self.n = n
        self.generator = torch.Generator().manual_seed(seed)
        self.active_layers: List[int] = []

    def step(self, batch=None) -> List[int]:
        pick = torch.randperm(len(self.layers), generator=self.generator)[: self.n].tolist()
        self.active_layers = sorted(self.layers[k] for k in pick)
        self.registry.set_active(self.active_layers)
        return self.active_layers


def _adamw(model, cfg: RealConfig, lr: Optional[float] = None, **tau_kw) -> torch.optim.Optimizer:
    return torch.optim.AdamW(pyflex.tau_param_groups(model, lr=lr or cfg.lr, weight_decay=0.0, **tau_kw))


def m_lora(model, cfg, seed=0):
    torch.manual_seed(seed)
    pyflex.patch_model(model, r=cfg.r, alpha=cfg.alpha, target_modules=TARGETS)
    return Setup(model, _adamw(model, cfg))


def m_lora_s(model, cfg, seed=0, tau_alpha: Optional[float] = None, lam: Optional[float] = None,
             tau_s: Optional[float] = None, target_sparsity: Optional[float] = None,
             tau_lr_ratio: Optional[float] = None):
    """LoRA_S. ``tau_alpha``/``tau_s``/``lam`` None: pyflex's defaults (whatever they are at the time);
    ``target_sparsity``: τ steered to that fraction of masked tokens (no λ)."""
    torch.manual_seed(seed)
    kw = {k: v for k, v in (("lam", lam), ("target_sparsity", target_sparsity)) if v is not None}
    pyflex.patch_model(model, r=cfg.r, alpha=cfg.alpha, target_modules=TARGETS, tau=True, **kw)
    tau_kw = {k: v for k, v in (("tau_alpha", tau_alpha), ("tau_s", tau_s), ("tau_lr_ratio", tau_lr_ratio))
              if v is not None}
    opt = _adamw(model, cfg, **tau_kw)
    tau_lr = [g["lr"] for g in opt.param_groups if g.get("name") != "pyflex_params"]
    return Setup(model, opt, notes=f"τ lr {tau_lr[0]:.0e}" if tau_lr else "")


def m_ist(model, cfg, seed=0, mode="paper", **kw):
    torch.manual_seed(seed)
    pyflex.patch_model(model, r=cfg.r, alpha=cfg.alpha, target_modules=TARGETS)
    sched = pyflex.ImportanceSchedule(model, mode=mode, seed=seed, **kw)
    opt = torch.optim.AdamW(sched.trainable_parameters(), lr=cfg.lr, weight_decay=0.0)
    sched.attach_optimizer(opt)
    return Setup(model, opt, sched, notes=f"{sched.n_u}/{len(sched.layers)} layers per step, {mode}")


def m_random_layers(model, cfg, seed=0, n: int = 8):
    torch.manual_seed(seed)
    pyflex.patch_model(model, r=cfg.r, alpha=cfg.alpha, target_modules=TARGETS)
    opt = _adamw(model, cfg)          # built before any freezing: holds every adapter
    return Setup(model, opt, RandomLayers(model, n, seed=seed), notes=f"{n} random layers per step")


def m_lift(model, cfg, seed=0, order="front2end", policy="grouped"):
    torch.manual_seed(seed)
    pyflex.patch_model(model, r=cfg.r, alpha=cfg.alpha, target_modules=TARGETS)
    sched = pyflex.LiftSchedule(model, total_steps=cfg.steps, order=order, policy=policy, target="lora", seed=seed)
    opt = torch.optim.AdamW(sched.trainable_parameters(), lr=cfg.lr, weight_decay=0.0)
    sched.attach_optimizer(opt)
    return Setup(model, opt, sched, notes=f"1 block at a time, {order}, {policy}")


def m_hlpt(model, cfg, seed=0, variant="hlpt"):
    torch.manual_seed(seed)
    pyflex.apply_hlpt(model, variant=variant, r=cfg.r, alpha=cfg.alpha)
    plan = model.pyflex_plan
    return Setup(model, _adamw(model, cfg),
                 notes=f"LoRA on down_proj of {len(plan.lora_layers)} layers, prefix on {len(plan.prefix_layers)}")


def m_h2lpt(model, cfg, seed=0):
    return m_hlpt(model, cfg, seed, variant="h2lpt")


def m_peft(model, cfg, seed=0, init_from: Optional[torch.nn.Module] = None):
    """HF PEFT LoRA on the same targets. ``init_from``: a pyflex-patched model whose lora_A/lora_B are copied in
    (identical initial adapters); otherwise lora_A is redrawn in module order from ``seed`` as patch_model does."""
    import warnings

    from peft import LoraConfig, get_peft_model

    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    model = get_peft_model(model, LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=0.0,
                                             target_modules=TARGETS))
    copy_lora_into_peft(model, init_from, seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
    return Setup(model, opt, notes="HF PEFT LoRA")


def pyflex_lora_pairs(pyflex_model) -> Dict[str, torch.nn.Module]:
    """Qualified module name (e.g. ``model.layers.3.self_attn.q_proj``) → the FlexLinear there."""
    return {n: m for n, m in pyflex_model.named_modules() if isinstance(m, pyflex.FlexLinear)}


def peft_lora_modules(peft_model) -> Dict[str, torch.nn.Module]:
    """Same names → PEFT's LoRA layer (with ``lora_A["default"]``), the ``base_model.model.`` prefix removed."""
    out = {}
    for n, m in peft_model.named_modules():
        lora_A = getattr(m, "lora_A", None)
        if isinstance(lora_A, torch.nn.ModuleDict) and "default" in lora_A:
            out[n.removeprefix("base_model.model.")] = m
    return out


@torch.no_grad()
def copy_lora_into_peft(peft_model, pyflex_model=None, seed: int = 0) -> None:
    targets = peft_lora_modules(peft_model)
    if pyflex_model is None:
        torch.manual_seed(seed)
        for m in targets.values():
            torch.nn.init.kaiming_uniform_(m.lora_A["default"].weight, a=math.sqrt(5))
        return
    source = pyflex_lora_pairs(pyflex_model)
    if set(source) != set(targets):
        raise AssertionError(f"pyflex and PEFT target different modules: {sorted(set(source) ^ set(targets))[:4]}")
    for name, m in targets.items():
        m.lora_A["default"].weight.copy_(source[name].lora_A)
        m.lora_B["default"].weight.copy_(source[name].lora_B)


METHODS: Dict[str, Callable] = {
    "lora": m_lora, "lora_s": m_lora_s, "ist": m_ist, "random_layers": m_random_layers, "lift": m_lift,
    "hlpt": m_hlpt, "h2lpt": m_h2lpt, "peft": m_peft,
}


# --------------------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------------------
def tau_sparsity_now(model) -> Optional[float]:
    """Mean PEFT_S sparsity (eq. 23) of the τ-masked FlexLinears in their last forward; None without τ."""
    values = []
    for m in model.modules():
        if isinstance(m, pyflex.FlexLinear):
            v = m.last_sparsity            # a property (a method in older pyflex)
            v = v() if callable(v) else v
            if v is not None:
                values.append(float(v))
    return sum(values) / len(values) if values else None


def heldout_eval(model, batches) -> Dict[str, Optional[float]]:
    """Held-out loss and the τ sparsity over the held-out forwards (inference sparsity, eq. 23)."""
    was = model.training
    model.eval()
    total, count, sparsities = 0.0, 0, []
    with torch.no_grad():
        for b in batches:
            n = int(b["labels"][:, 1:].numel())
            total += float(model(**b).loss) * n
            count += n
            s = tau_sparsity_now(model)
            if s is not None:
                sparsities.append(s)
    model.train(was)
    return {"loss": total / count, "sparsity": (sum(sparsities) / len(sparsities)) if sparsities else None}


@dataclass
class Run:
    method: str
    losses: List[float] = field(default_factory=list)
    step_s: List[float] = field(default_factory=list)
    active: List[List[int]] = field(default_factory=list)
    train_sparsity: List[float] = field(default_factory=list)
    taus: List[List[float]] = field(default_factory=list)
    heldout_loss: float = float("nan")
    heldout_sparsity: Optional[float] = None
    notes: str = ""
    schedule: Any = None
    importance: Optional[List[List[float]]] = None            # IST: final importance (higher = more important)
    importance_history: Optional[List[Any]] = None            # IST: (step, importance, candidate losses) per update
    n_u: Optional[int] = None

    @property
    def ms_per_step(self) -> float:
        return 1000 * statistics.median(self.step_s) if self.step_s else float("nan")


def train(setup_: Setup, batches, cfg: RealConfig, steps: Optional[int] = None, name: str = "",
          on_step: Optional[Callable] = None, evaluate_on=None) -> Run:
    """Plain loop: schedule.step(batch) → forward → backward → clip (τ left out) → step. ``on_step(step, run)``
    runs after backward, before the optimizer step (instrumentation)."""
    model, opt, sched = setup_.model, setup_.optimizer, setup_.schedule
    run = Run(name, notes=setup_.notes, schedule=sched)
    steps = steps or cfg.steps
    model.train()
    for step in range(steps):
        batch = batches[step % len(batches)]
        t0 = time.perf_counter()
        if sched is not None:
            run.active.append(list(sched.step(batch)))
        loss = model(**batch).loss
        loss.backward()
        if on_step is not None:
            on_step(step, run)
        if cfg.clip:
            if isinstance(getattr(model, "peft_config", None), dict):
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.clip)
            else:
                pyflex.clip_grad_norm_(model, cfg.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        run.step_s.append(time.perf_counter() - t0)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"{name}: loss {value} at step {step}")
        run.losses.append(value)
        s = tau_sparsity_now(model)
        if s is not None:
            run.train_sparsity.append(s)
            run.taus.append([v for _, v in pyflex.tau_values(model)])
    if evaluate_on is not None:
        ev = heldout_eval(model, evaluate_on)
        run.heldout_loss, run.heldout_sparsity = ev["loss"], ev["sparsity"]
    return run


def run_method(tier: Tier, method: str, seed: int = 0, steps: Optional[int] = None, **kw) -> Run:
    setup_ = METHODS[method](tier.fresh(), tier.cfg, seed=seed, **kw)
    label = method + "".join(f" {k}={v}" for k, v in kw.items() if not isinstance(v, torch.nn.Module))
    run = train(setup_, tier.train, tier.cfg, steps=steps, name=label, evaluate_on=tier.heldout)
    sched = run.schedule
    if sched is not None and hasattr(sched, "history"):   # IST: keep its importance record, not the model
        run.importance = [list(map(float, sched.importance.tolist()))]
        run.importance_history = [(h["step"], list(h["importance"]), list(h["losses"])) for h in sched.history]
        run.n_u = sched.n_u
    run.schedule = None
    return run


def env_line() -> str:
    import platform

    import transformers
    try:
        import peft
        pv = peft.__version__
    except ImportError:
        pv = None
    return (f"torch {torch.__version__}, transformers {transformers.__version__}, peft {pv}, "
            f"pyflex backend {pyflex.current_backend_name()}, {torch.get_num_threads()} threads, "
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
