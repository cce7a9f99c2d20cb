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

    def remove(self) -> None:
        """Remove hooks."""


def member_modules(model: nn.Module, names: list[str]) -> list[nn.Module]:
    modules = dict(model.named_modules())
    return [modules[n] for n in names]
