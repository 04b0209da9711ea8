"""IST: importance-aware sparse tuning (docs/methods.md, "IST").

Paper mode (``mode="paper"``, the default and the spec):
    * importance I ∈ R^L, zero-initialised;
    * fractions of L become counts rounded half up, as Table 8 lists them (30 layers: N_u = 8, N_v = 15);
    * each step: p_i ~ U(0, sigmoid(I_i)) and the N_u layers with the largest p_i train (eq. 6-7);
    * every T_c steps (before the step's sampling, at steps T_c, 2T_c, ...): N_c candidate sets S_j of N_v layers
      are drawn with the same policy (p_i ~ U(0, sigmoid(I_i)), top N_v — the paper does not say how they are
      drawn); for each, a no-grad forward in which every layer *outside* S_j has its adapter response scaled by
      β (eq. 8) gives L_j; r_j = e^{−L_j} − mean_k e^{−L_k} (eq. 9); I_i += μ·r_j for i ∈ S_j (eq. 10).

Official-code mode (``mode="official"``, antgroup/importance-aware-sparse-tuning-IST-paper ``ist.py``), which
differs from the paper in these ways:
    * it keeps an "un-importance" score U (higher = less important; :attr:`ImportanceSchedule.importance`
      reports −U so that higher means more important in both modes);
    * candidate sets are the *suppressed* layers, drawn with ``multinomial(sigmoid(U), N_v)`` without replacement
      (redrawn while equal to an earlier set of the same round); layers in the set get β, the others 1;
    * U_i += μ·r_j·p_i(1−p_i) with p = sigmoid(U) taken before the round, for i in the suppressed set;
    * the active set is ``multinomial(sigmoid(−U), N_u)`` without replacement;
    * the importance batch comes from its own shuffled DataLoader over the training set (pass
      ``importance_data``; :class:`pyflex.integrations.trainer.PyflexCallback` builds an :class:`ImportanceBatches` over the
      Trainer's training set);
    * counts are ``int(L·fraction)``: 30 layers → N_u = 7, where the paper's Table 8 lists 8 (paper mode rounds
      half up: 32 → 8/16, 40 → 10/20, 28 → 7/14, 30 → 8/15).
    Both modes resample the active set every step (the paper's "in each training iteration"), and both run the
    importance forwards in eval mode (dropout off) under no_grad, restoring the train mode and every handle's
    previous response scale afterwards.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence

import torch

from pyflex.methods.schedule import LayerSchedule, resolve_count

MODES = ("paper", "official")


def _default_loss(model, batch) -> torch.Tensor:
    if isinstance(batch, Mapping):
        out = model(**batch)
    elif isinstance(batch, (tuple, list)):
        out = model(*batch)
    else:
        out = model(batch)
    loss = getattr(out, "loss", None)
    if loss is None and isinstance(out, Mapping):
        loss = out.get("loss")
    if loss is None:
        raise ValueError("the model output has no .loss for the importance batch; include labels in the batch or pass "
                         "loss_fn=(model, batch) -> loss to ImportanceSchedule")
    return loss


def _move(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _move(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_move(v, device) for v in batch)
    return batch


class ImportanceBatches:
    """Endless shuffled batches over a map-style dataset for IST's importance forwards, resumable exactly.

    Pass k visits the dataset in the order ``torch.randperm(len(dataset))`` drawn from a generator seeded from
    (``seed``, k), in batches of ``batch_size`` (the last one of a pass may be smaller), collated by ``collate_fn``
    (default: torch's ``default_collate``). The position — pass and batches drawn in it — is the whole state
    (:meth:`state_dict`), so a run resumed from a checkpoint draws the same batches as one that never stopped. It
    touches no global RNG: iterating a torch DataLoader draws its base seed from the global generator, which
    would shift the Trainer's own random stream (dropout, data order) against the uninterrupted run. Every process
    of a distributed run draws the same batch, so their importance scores stay equal.
    """

    def __init__(self, dataset, batch_size: int, collate_fn: Optional[Callable] = None, seed: int = 0):
        if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
            raise TypeError(f"dataset of type {type(dataset).__name__} is not map-style (needs __len__ and "
                            "__getitem__); pass IST an importance_data iterable of batches instead")
        if len(dataset) == 0:
            raise ValueError("dataset is empty; IST's importance forwards need at least one sample")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} is not allowed; it must be an int >= 1")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, int(seed)
        self.collate_fn = collate_fn or torch.utils.data.default_collate
        self.epoch, self.position = 0, 0
        self._order: Optional[torch.Tensor] = None

    def __iter__(self):
        return self

    def __next__(self):
        n = len(self.dataset)
        if self.position * self.batch_size >= n:
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
        if self._order is None:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % (2 ** 63))
            self._order = torch.randperm(n, generator=g)
        rows = self._order[self.position * self.batch_size:(self.position + 1) * self.batch_size].tolist()
        self.position += 1
        return self.collate_fn([self.dataset[i] for i in rows])

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "size": len(self.dataset),
                "batch_size": self.batch_size}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        """Continue where ``state`` was saved, with its seed (as a schedule's state overrides its seed)."""
        mine = {"size": len(self.dataset), "batch_size": self.batch_size}
        theirs = {k: state[k] for k in mine}
        if theirs != mine:
            raise ValueError(f"importance batches state was saved for {theirs}, this one has {mine}")
        self.seed, self.epoch, self.position = int(state["seed"]), int(state["epoch"]), int(state["position"])
        self._order = None


class ImportanceSchedule(LayerSchedule):
    """Importance-aware sparse tuning.

    Args:
        model: the patched model (needed for the importance forwards) — not just its registry.
        n_u: layers trained per step: fraction of the schedule's layers (0.25) or a count. A fraction is rounded
            half up in paper mode, truncated in official mode.
        n_v: layers per candidate set: fraction (0.5) or a count, rounded like ``n_u``.
        n_c: candidate sets per importance update (3).
        t_c: importance update interval in steps (10).
        beta: response suppression factor β (0.25).
        mu: importance updating rate μ (10).
        mode: "paper" (default) or "official" (see module docstring).
        loss_fn: ``loss_fn(model, batch) -> loss`` for the importance forwards; default ``model(**batch).loss``.
        importance_data: an iterable of batches (e.g. a shuffled DataLoader over the training set) to draw each
            importance batch from, cycled; default: the batch passed to :meth:`step` (the current training batch).
            Its position is part of :meth:`state_dict`: a source with ``state_dict``/``load_state_dict``
            (:class:`ImportanceBatches`, torchdata's StatefulDataLoader) restores its own; any other iterable is
            restarted and the batches already drawn in the current pass are skipped, which resumes exactly when
            each pass yields the same batches (a list, an unshuffled DataLoader).
        layers: registry indices to choose among (default: every layer with adapters).
        seed: seed of the private generator.

    Attributes:
        importance: (L,) float64, one score per schedule layer (``layers[k]`` ↔ ``importance[k]``).
        history: one dict per importance update: step, candidate sets, losses, rewards, importance after.
    """

    def __init__(self, model, *, n_u=0.25, n_v=0.5, n_c: int = 3, t_c: int = 10, beta: float = 0.25,
                 mu: float = 10.0, mode: str = "paper", loss_fn: Optional[Callable] = None,
                 importance_data: Optional[Iterable] = None, layers: Optional[Sequence[int]] = None, seed: int = 0):
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is not supported; allowed: {', '.join(MODES)}")
        if not isinstance(n_c, int) or n_c < 1:
            raise ValueError(f"n_c={n_c!r} is not allowed; it must be an int >= 1")
        if not isinstance(t_c, int) or t_c < 1:
            raise ValueError(f"t_c={t_c!r} is not allowed; it must be an int >= 1")
        if not 0.0 <= float(beta) <= 1.0:
            raise ValueError(f"beta={beta!r} is not allowed; β must be in [0, 1]")
        if not math.isfinite(float(mu)):
            raise ValueError(f"mu={mu!r} is not allowed; it must be finite")
        super().__init__(model, layers=layers, seed=seed)
        L = len(self.layers)
        rounding = "half_up" if mode == "paper" else "floor"
        self.n_u = resolve_count(n_u, L, "n_u", rounding)
        self.n_v = resolve_count(n_v, L, "n_v", rounding)
        self.n_c, self.t_c, self.beta, self.mu, self.mode = n_c, t_c, float(beta), float(mu), mode
        self.loss_fn = loss_fn or _default_loss
        self.importance_data = importance_data
        self._data_iter = None
        self._data_drawn = 0        # batches drawn from the current pass over importance_data
        self._data_resume = None    # the importance_data position of a loaded state, applied at the next draw
        self.scores = torch.zeros(L, dtype=torch.float64)  # I (paper) or U (official)
        self.history: List[Dict[str, Any]] = []

    # -- scores -----------------------------------------------------------------------------------
    @property
    def importance(self) -> torch.Tensor:
        """(L,) importance, higher = more important, in both modes (official mode: −U)."""
        return self.scores.clone() if self.mode == "paper" else -self.scores

    def _sample_top(self, k: int) -> List[int]:
        """Paper eq. 6-7: p_i ~ U(0, sigmoid(I_i)), the k largest. Returns positions into ``self.layers``."""
        p = torch.rand(len(self.layers), generator=self.generator, dtype=torch.float64) * torch.sigmoid(self.scores)
        return sorted(torch.topk(p, k).indices.tolist())

    def _multinomial(self, weights: torch.Tensor, k: int) -> List[int]:
        return sorted(torch.multinomial(weights, k, replacement=False, generator=self.generator).tolist())

    # -- per step ---------------------------------------------------------------------------------
    def _choose(self, batch: Any) -> List[int]:
        if self.step_count > 0 and self.step_count % self.t_c == 0:
            self.update_importance(batch)
        if self.mode == "paper":
            pos = self._sample_top(self.n_u)
        else:
            pos = self._multinomial(torch.sigmoid(-self.scores), self.n_u)
        return [self.layers[k] for k in pos]

    def _importance_batch(self, batch):
        if self.importance_data is not None:
            if self._data_iter is None:
                self._data_iter = self._start_data()
            try:
                batch = next(self._data_iter)
            except StopIteration:
                self._data_iter, self._data_drawn = iter(self.importance_data), 0
                batch = next(self._data_iter)
            self._data_drawn += 1
        if batch is None:
            raise ValueError("IST needs a batch for its importance update: pass the training batch to "
                             "schedule.step(batch), or give importance_data=<DataLoader> (the callback does this)")
        if self.model is not None:
            try:
                device = next(self.model.parameters()).device
                batch = _move(batch, device)
            except StopIteration:
                pass
        return batch

    def _start_data(self):
        """An iterator over ``importance_data`` at the position a loaded state recorded (else at its start)."""
        data, resume = self.importance_data, self._data_resume
        self._data_resume, self._data_drawn = None, 0
        if resume is not None and resume["kind"] == "stateful":
            data.load_state_dict(resume["state"])
            return iter(data)
        it = iter(data)
        if resume is not None:  # a plain iterable: replay the batches the saved run had drawn in this pass
            for _ in range(resume["drawn"]):
                next(it)
            self._data_drawn = resume["drawn"]
        return it

    def _data_state(self) -> Optional[Dict[str, Any]]:
        if self._data_iter is None:
            return self._data_resume
        if callable(getattr(self.importance_data, "state_dict", None)):
            return {"kind": "stateful", "state": self.importance_data.state_dict()}
        return {"kind": "position", "drawn": self._data_drawn}

    def _candidate_sets(self) -> List[List[int]]:
        sets: List[List[int]] = []
        for _ in range(self.n_c):
            if self.mode == "paper":
                sets.append(self._sample_top(self.n_v))
            else:
                weights = torch.sigmoid(self.scores)
                cand = self._multinomial(weights, self.n_v)
                # The official code redraws a set equal to an earlier one; bounded here, since with few layers
                # there may not be n_c distinct sets.
                for _ in range(100):
                    if cand not in sets:
                        break
                    cand = self._multinomial(weights, self.n_v)
                sets.append(cand)
        return sets

    @torch.no_grad()
    def update_importance(self, batch: Any = None) -> Dict[str, Any]:
        """One importance round (eq. 8-10, or the official variant). Returns the history record."""
        batch = self._importance_batch(batch)
        model = self.model
        sets = self._candidate_sets()
        handles = [self.registry[i] for i in self.layers]
        saved_scales = [h.response_scale for h in handles]
        was_training = model.training if model is not None else None
        losses: List[float] = []
        try:
            if model is not None:
                model.eval()
            for cand in sets:
                members = set(cand)
                for k, h in enumerate(handles):
                    suppressed = (k not in members) if self.mode == "paper" else (k in members)
                    h.response_scale = saved_scales[k] * (self.beta if suppressed else 1.0)
                loss = self.loss_fn(model, batch)
                losses.append(float(loss.detach().float().item() if isinstance(loss, torch.Tensor) else loss))
        finally:
            for h, s in zip(handles, saved_scales):
                h.response_scale = s
            if model is not None and was_training:
                model.train()
        rewards_raw = [math.exp(-l) for l in losses]
        mean = sum(rewards_raw) / len(rewards_raw)
        rewards = [r - mean for r in rewards_raw]
        if self.mode == "paper":
            for cand, r in zip(sets, rewards):
                for k in cand:
                    self.scores[k] += self.mu * r
        else:
            p = torch.sigmoid(self.scores)
            factor = p * (1 - p)
            for cand, r in zip(sets, rewards):
                for k in cand:
                    self.scores[k] += self.mu * r * factor[k]
        record = {"step": self.step_count, "candidates": [[self.layers[k] for k in c] for c in sets],
                  "losses": losses, "rewards": rewards, "importance": self.importance.tolist()}
        self.history.append(record)
        return record

    # -- state ------------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        state = super().state_dict()
        state.update(scores=self.scores.clone(), mode=self.mode, history=list(self.history),
                     hparams=dict(n_u=self.n_u, n_v=self.n_v, n_c=self.n_c, t_c=self.t_c, beta=self.beta, mu=self.mu),
                     importance_data=self._data_state())
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state.get("mode") != self.mode:
            raise ValueError(f"state has mode={state.get('mode')!r} but this schedule has mode={self.mode!r}")
        mine = dict(n_u=self.n_u, n_v=self.n_v, n_c=self.n_c, t_c=self.t_c, beta=self.beta, mu=self.mu)
        if state.get("hparams", mine) != mine:
            raise ValueError(f"state hyper-parameters {state['hparams']} differ from this schedule's {mine}")
        self.scores = state["scores"].clone().to(torch.float64)
        self.history = list(state.get("history", []))
        self._data_iter, self._data_resume = None, state.get("importance_data")
        super().load_state_dict(state)

    # -- plotting ---------------------------------------------------------------------------------
    def plot_importance(self, path: Optional[str] = None, ax=None):
        """Importance of every layer over the updates (one line per layer). Needs matplotlib (optional).
        Saves to ``path`` when given; returns the Axes."""
        try:
            import matplotlib
            if ax is None and path is not None:
                matplotlib.use("Agg", force=False)
            import matplotlib.pyplot as plt
        except ImportError as exc:
            raise ImportError("plot_importance needs matplotlib (pip install matplotlib)") from exc
        if ax is None:
            _, ax = plt.subplots(figsize=(7, 4))
        steps = [0] + [h["step"] for h in self.history]
        series = [[0.0] * len(self.layers)] + [h["importance"] for h in self.history]
        for k, layer in enumerate(self.layers):
            ax.plot(steps, [s[k] for s in series], label=f"layer {layer}")
        ax.set_xlabel("step")
        ax.set_ylabel("importance")
        ax.set_title(f"IST importance ({self.mode} mode)")
        if len(self.layers) <= 16:
            ax.legend(fontsize="small", ncol=2)
        if path is not None:
            ax.figure.savefig(path, bbox_inches="tight")
        return ax
