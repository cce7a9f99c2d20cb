"""Baselines (docs/methods.md): random channels, filter L1 norm (Li et al. 2017), BN |gamma| (Liu et al. 2017).

They read the weights when asked (no hooks): the score is the state of the weights at the end of the
update window. A group with several member convs / BNs (residual coupling) gets the mean over members.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from pydantic import BaseModel

from ..errors import ModelError
from ..registry import register_method
from .gates import ChannelGroup
from .scorer import Scorer, member_modules


@register_method("random")
class RandomScorer(Scorer):
    """Uniform random scores, drawn afresh for each update window from a generator seeded by the recipe seed; the
    regrowth share is chosen by the same scores, so the kept channels are a uniform random draw.

    Drawn at construction and at :meth:`reset`, so :meth:`scores` is stable within a window and a run is
    reproducible.
    """

    def __init__(self, model: nn.Module, groups: list[ChannelGroup], options: BaseModel | None = None, seed: int = 0):
        super().__init__(model, groups, options, seed)
        self._gen = torch.Generator().manual_seed(seed)
        self.reset()

    def reset(self) -> None:
        self._scores = {g.name: torch.rand(g.size, generator=self._gen, dtype=torch.float64) for g in self.groups}

    def scores(self) -> dict[str, torch.Tensor]:
        return {n: s.clone() for n, s in self._scores.items()}

    def regrowth_scores(self) -> dict[str, torch.Tensor]:
        # the regrowth share is drawn from the same scores: every kept channel is random (a control that shares
        # no signal with the other methods, unlike the default |dL/dgate| regrowth)
        return self.scores()

    def state_dict(self) -> dict:
        return {"generator": self._gen.get_state(), "scores": self.scores()}

    def load_state_dict(self, state: dict) -> None:
        self._gen.set_state(state["generator"])
        self._scores = {n: s.clone() for n, s in state["scores"].items()}


@register_method("l1")
class L1Scorer(Scorer):
    """``sum |W[c, :, :, :]|`` of each output filter, mean over the group's member convs."""

    def __init__(self, model: nn.Module, groups: list[ChannelGroup], options: BaseModel | None = None, seed: int = 0):
        super().__init__(model, groups, options, seed)
        self._convs = {g.name: member_modules(model, g.convs) for g in groups}

    @torch.no_grad()
    def scores(self) -> dict[str, torch.Tensor]:
        return {n: torch.stack([c.weight.abs().flatten(1).sum(1) for c in convs]).mean(0).double().cpu()
                for n, convs in self._convs.items()}


@register_method("bn")
class BNScorer(Scorer):
    """``|gamma[c]|`` of the BatchNorm on each channel, mean over the group's member BNs (network slimming)."""

    def __init__(self, model: nn.Module, groups: list[ChannelGroup], options: BaseModel | None = None, seed: int = 0):
        super().__init__(model, groups, options, seed)
        self._bns = {g.name: member_modules(model, g.bns) for g in groups}
        bad = [n for n, bns in self._bns.items() if not bns or any(getattr(b, "weight", None) is None for b in bns)]
        if bad:
            raise ModelError(f"{type(self).__name__} needs an affine BatchNorm on every group; missing for {bad}")

    @torch.no_grad()
    def scores(self) -> dict[str, torch.Tensor]:
        return {n: torch.stack([b.weight.abs() for b in bns]).mean(0).double().cpu() for n, bns in self._bns.items()}
