"""What a pruning method is: a scorer of channel groups. The selector and gates do the rest."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..recipe import PruneCfg
from .gates import ChannelGroup


class Scorer:
    """Base of every pruning method, built as ``Scorer(model, groups, cfg, seed)``.

    :meth:`scores` (higher = keep) is the only required method; the defaults below are those of a
    method that needs no training-loss term and uses the selector's default regrowth signal
    (the accumulated ``|dL/dgate|``). Hooks, if any, accumulate only while ``module.training``.
    """

    def __init__(self, model: nn.Module, groups: list[ChannelGroup], cfg: PruneCfg | None = None, seed: int = 0):
        self.model, self.groups, self.seed = model, groups, seed
        self.cfg = cfg if cfg is not None else PruneCfg()

    def scores(self) -> dict[str, torch.Tensor]:
        """Per group, one float64 score per channel (higher = keep)."""
        raise NotImplementedError

    def regrowth_scores(self) -> dict[str, torch.Tensor] | None:
        """Scores that pick the regrowth share among pruned channels; None = the default ``|dL/dgate|``."""
        return None

    def penalty(self) -> torch.Tensor:
        """Term added to the training loss (e.g. an L1 penalty); 0 for most methods."""
        return torch.zeros(())

    def reset(self) -> None:
        """Start a new update window."""

    def accumulators(self) -> list["ChannelMeans"]:
        """The statistics this process gathered in the window; under torchrun they are summed over
        all processes before each selection. Default: every :class:`ChannelMeans` attribute (a
        scorer that accumulates in some other form overrides this)."""
        return [v for v in vars(self).values() if isinstance(v, ChannelMeans)]

    def remove(self) -> None:
        """Remove hooks."""

    def state_dict(self) -> dict:
        """What an exact resume in the middle of an update window needs (tensors and plain data)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class ChannelMeans:
    """Per-group running means of per-channel statistics over an update window."""

    def __init__(self, groups: list[ChannelGroup]):
        self.sum = {g.name: torch.zeros(g.size, dtype=torch.float64) for g in groups}
        self.count = {g.name: 0 for g in groups}

    def add(self, group: str, total: torch.Tensor, n: int) -> None:
        """Add ``total`` (per channel, summed over ``n`` observations)."""
        self.sum[group] += total.detach().double().cpu()
        self.count[group] += n

    def means(self) -> dict[str, torch.Tensor]:
        return {g: self.sum[g] / max(1, self.count[g]) for g in self.sum}

    def reset(self) -> None:
        for g in self.sum:
            self.sum[g].zero_()
            self.count[g] = 0

    def state_dict(self) -> dict:
        return {"sum": {g: t.clone() for g, t in self.sum.items()}, "count": dict(self.count)}

    def load_state_dict(self, state: dict) -> None:
        for g, t in state["sum"].items():
            self.sum[g].copy_(t)
        self.count.update(state["count"])


def member_modules(model: nn.Module, names: list[str]) -> list[nn.Module]:
    modules = dict(model.named_modules())
    return [modules[n] for n in names]
