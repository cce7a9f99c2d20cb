"""User methods as a recipe names them (``prune.method: "tests.custom_methods:..."``)."""

from __future__ import annotations

import torch

from snncompress.prune.scorer import Scorer


class FirstChannels(Scorer):
    """Keeps the lowest-numbered channels of every group: a method whose choice a test can predict."""

    def scores(self) -> dict[str, torch.Tensor]:
        return {g.name: -torch.arange(g.size, dtype=torch.float64) for g in self.groups}

    regrowth_scores = scores  # the regrowth share too


class Broken(Scorer):
    """A method with a bug: its scores name no group."""

    def scores(self) -> dict[str, torch.Tensor]:
        return {}
