"""Dynamic structured pruning during training: scorer -> selector -> gates, plus regrowth and freezing."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..distributed import sum_across_ranks
from ..recipe import PruneCfg
from .baselines import BNScorer, L1Scorer, RandomScorer
from .criticality import CriticalityScorer
from .gates import ChannelGroup, gate_modules, get_masks, kept_fraction, set_masks
from .sca import ActivityScorer
from .select import is_update_epoch, keep_fraction_at, pq_budgets, round_masks, select_masks, select_masks_budgeted

SCORERS = {"sca": ActivityScorer, "random": RandomScorer, "l1": L1Scorer, "bn": BNScorer,
           "criticality": CriticalityScorer}


class DynamicPruner:
    """Owns the masks of a gated model while it trains.

    Call :meth:`after_backward` after each ``loss.backward()`` (accumulates the regrowth signal
    ``|dL/dgate|`` and clears gate gradients), :meth:`after_step` after each optimiser step (restores
    the frozen weights of closed channels, so a regenerated channel resumes where it left off), and
    :meth:`end_epoch` once per epoch (recomputes the masks when the schedule says so); :meth:`penalty`
    is the method's term of the training loss.
    """

    def __init__(self, model: nn.Module, groups: list[ChannelGroup], cfg: PruneCfg, epochs: int, seed: int = 0):
        self.model, self.groups, self.cfg, self.epochs = model, groups, cfg, epochs
        self.scorer = SCORERS[cfg.method](model, groups, cfg, seed)
        self._gates = gate_modules(model)
        self._regrowth = {g.name: torch.zeros(g.size, dtype=torch.float64) for g in groups}
        self._frozen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.history: list[dict] = []

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        return get_masks(self.model, self.groups)

    def kept_fraction(self) -> float:
        return kept_fraction(self.masks)

    def at_target(self) -> bool:
        """True once the masks have reached the final budget (the best checkpoint is only taken then)."""
        return bool(self.history) and self.history[-1]["keep_target"] <= self.cfg.keep + 1e-9

    def penalty(self) -> torch.Tensor:
        """The method's term of the training loss (criticality: L1 on BN gamma); 0 for the others."""
        return self.scorer.penalty()

    def after_backward(self) -> None:
        for g in self.groups:
            for name in g.gates:
                gate = self._gates[name].gate
                if gate.grad is not None:
                    self._regrowth[g.name] += gate.grad.detach().abs().double().cpu()
                    gate.grad = None

    @torch.no_grad()
    def after_step(self) -> None:
        for tensor, idx, values in self._frozen:
            tensor[idx] = values

    def end_epoch(self, epoch: int) -> dict | None:
        """Recompute masks if this epoch ends an update window; return the history entry."""
        if not is_update_epoch(self.cfg, self.epochs, epoch):
            return None
        keep = keep_fraction_at(self.cfg, epoch)
        old = self.masks
        # under torchrun every rank selects from the statistics of all ranks (so all pick the same
        # masks); _regrowth needs no reduction: DDP already averaged the gate gradients behind it
        sum_across_ranks(self.scorer.accumulators())
        scores, grow = self.scorer.scores(), self.scorer.regrowth_scores()
        grow = self._regrowth if grow is None else grow
        if self.cfg.budget == "pq":
            c = self.cfg
            budgets = pq_budgets(scores, keep, c.min_channels, c.pq_p, c.pq_q, c.pq_eta, c.pq_gamma, c.pq_beta, old)
            new = select_masks_budgeted(scores, grow, budgets, c.regrow / c.keep, c.min_channels)
        else:
            new = select_masks(scores, grow, keep, self.cfg.regrow * keep / self.cfg.keep, self.cfg.min_channels)
        if self.cfg.round_to > 1:
            new = round_masks(new, scores, self.cfg.round_to)
        set_masks(self.model, self.groups, new)
        self._freeze_closed(new)
        self.scorer.reset()
        for r in self._regrowth.values():
            r.zero_()
        entry = {
            "epoch": epoch,
            "keep_target": keep,
            "kept": {n: int(m.sum()) for n, m in new.items()},
            "pruned": sum(int((old[n] & ~new[n]).sum()) for n in new),
            "regrown": sum(int((~old[n] & new[n]).sum()) for n in new),
            "masks": {n: m.clone() for n, m in new.items()},
        }
        self.history.append(entry)
        return entry

    def _freeze_closed(self, masks: dict[str, torch.Tensor]) -> None:
        """Snapshot the per-channel parameters and BN statistics of closed channels."""
        modules = dict(self.model.named_modules())
        self._frozen = []
        for g in self.groups:
            idx = (~masks[g.name]).nonzero().flatten()
            if idx.numel() == 0:
                continue
            for name in g.convs + g.bns:
                m = modules[name]
                for t in (getattr(m, "weight", None), getattr(m, "bias", None),
                          getattr(m, "running_mean", None), getattr(m, "running_var", None)):
                    if t is not None:
                        self._frozen.append((t.data, idx, t.data[idx].clone()))

    def load_masks(self, masks: dict[str, torch.Tensor]) -> None:
        set_masks(self.model, self.groups, masks)
        self._freeze_closed(masks)

    def state_dict(self) -> dict:
        """Accumulated scores of the current update window (masks and history live in the checkpoint)."""
        return {"scorer": self.scorer.state_dict(), "regrowth": {n: r.clone() for n, r in self._regrowth.items()}}

    def load_state_dict(self, state: dict, masks: dict[str, torch.Tensor], history: list[dict]) -> None:
        # the frozen snapshots are re-taken from the loaded weights: closed channels never moved
        self.load_masks(masks)
        self.history = [dict(h) for h in history]
        self.scorer.load_state_dict(state["scorer"])
        for n, r in state["regrowth"].items():
            self._regrowth[n].copy_(r)

    def remove(self) -> None:
        self.scorer.remove()
