"""What a structured pruning method is: a scorer of channel groups. Selection, schedule and gates are shared.

A new method is a :class:`Scorer` subclass registered by name::

    @sc.register_method("my_method")
    class MyScorer(Scorer):
        def scores(self):  # per group, one score per channel (higher = keep)
            ...

or named in a recipe as ``prune.method: "package.module:MyScorer"`` (imported only when trusted). Its options,
if any, are a pydantic model ``Options`` read from the recipe's ``prune.options``.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
from pydantic import BaseModel

from .gates import ChannelGroup
from .options import MethodOptions


class Scorer:
    """Base of every structured method, built as ``Scorer(model, groups, options, seed)``.

    :meth:`scores` (higher = keep) is the only required method; the defaults below are those of a
    method that needs no training-loss term and uses the selector's default regrowth signal
    (the accumulated ``|dL/dgate|``). Hooks, if any, accumulate only while ``self.active`` and
    ``module.training``: the pruner turns a scorer off (:meth:`activate`) in epochs whose statistics
    no mask update reads (warm-up, frozen fine-tune). ``options`` is an instance of the class's
    ``Options`` (the recipe's ``prune.options``; None: its defaults).
    """

    Options: type[BaseModel] = MethodOptions
    active = True
    regrow_share: float | None = None  # the default regrowth part of the kept channels (None: prune.regrow's default)

    def __init__(self, model: nn.Module, groups: list[ChannelGroup], options: BaseModel | None = None, seed: int = 0):
        self.model, self.groups, self.seed = model, groups, seed
        self.options = options if options is not None else self.Options()

    def scores(self) -> dict[str, torch.Tensor]:
        """Per group, one score per channel (higher = keep)."""
        raise NotImplementedError

    def regrowth_scores(self) -> dict[str, torch.Tensor] | None:
        """Scores that pick the regrowth share among pruned channels; None = the default ``|dL/dgate|``."""
        return None

    def penalty(self) -> torch.Tensor:
        """Term added to the training loss (e.g. an L1 penalty); 0 for most methods."""
        return torch.zeros(())

    def measure(self, forward: Callable[[int | None, bool], None]) -> None:
        """Called at each mask update before :meth:`scores`: a method that scores from a pass over training data at
        the update (criticality) calls ``forward(batches, train)``, which runs the network without gradient over
        the first ``batches`` training batches (None: all) in train or eval mode."""

    def after_backward(self) -> None:
        """Called after every training backward of a scoring epoch, with the gradients on the parameters (averaged
        over processes under torchrun), before the optimiser steps: a gradient-based score accumulates here."""

    def activate(self, on: bool) -> None:
        """Gather statistics (``on``) or not; a scorer whose hooks cost extra (stored potentials, a twin
        neuron) turns that cost off here."""
        self.active = on

    # The defaults below cover a scorer whose window state is its ChannelMeans attributes.
    def _means(self) -> dict[str, ChannelMeans]:
        return {k: v for k, v in vars(self).items() if isinstance(v, ChannelMeans)}

    def reset(self) -> None:
        """Start a new update window."""
        for m in self._means().values():
            m.reset()

    def statistics(self) -> list[torch.Tensor]:
        """The statistics this process gathered in the window (summed over all processes under torchrun
        before each selection)."""
        return [t for m in self._means().values() for t in m.tensors()]

    def remove(self) -> None:
        """Remove the scorer's hooks (those it keeps in ``self._handles``)."""
        for h in getattr(self, "_handles", []):
            h.remove()

    def state_dict(self) -> dict:
        """What an exact resume in the middle of an update window needs (tensors and plain data)."""
        return {k: m.state_dict() for k, m in self._means().items()}

    def load_state_dict(self, state: dict) -> None:
        for k, m in self._means().items():
            m.load_state_dict(state[k])


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


class ChannelMeans:
    """Per-group running means of per-channel statistics over an update window.

    The sums and counts stay on the model's device (float64): adding to them never waits for the
    device; they reach the host only when a mask update or a checkpoint reads them.
    """

    def __init__(self, groups: list[ChannelGroup], device: torch.device | str = "cpu"):
        self.sum = {g.name: torch.zeros(g.size, dtype=torch.float64, device=device) for g in groups}
        self._index = {g.name: i for i, g in enumerate(groups)}
        self.count = torch.zeros(len(groups), dtype=torch.float64, device=device)

    def add(self, group: str, total: torch.Tensor, n: int) -> None:
        """Add ``total`` (per channel, summed over ``n`` observations)."""
        self.sum[group] += total.detach()
        self.count[self._index[group]] += n

    def means(self) -> dict[str, torch.Tensor]:
        """Per group, the mean per channel (on the host, float64)."""
        counts = self.count.cpu()
        return {g: self.sum[g].cpu() / max(1.0, float(counts[i])) for g, i in self._index.items()}

    def counts(self) -> dict[str, int]:
        return {g: int(c) for g, c in zip(self._index, self.count.cpu().tolist())}

    def tensors(self) -> list[torch.Tensor]:
        """Every accumulator tensor (what is summed across processes)."""
        return [*self.sum.values(), self.count]

    def reset(self) -> None:
        for t in self.tensors():
            t.zero_()

    def state_dict(self) -> dict:
        return {"sum": {g: t.cpu().clone() for g, t in self.sum.items()}, "count": self.counts()}

    def load_state_dict(self, state: dict) -> None:
        for g, t in state["sum"].items():
            self.sum[g].copy_(t)
        for g, c in state["count"].items():
            self.count[self._index[g]] = c


def member_modules(model: nn.Module, names: list[str]) -> list[nn.Module]:
    modules = dict(model.named_modules())
    return [modules[n] for n in names]
