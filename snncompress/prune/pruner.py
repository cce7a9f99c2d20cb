"""The one interface the training loop sees: :class:`Pruner`, and how a recipe's method becomes one.

A structured method is a :class:`~snncompress.prune.scorer.Scorer` (it only scores channels);
:class:`~snncompress.prune.structured.ChannelPruner` turns its scores into channel masks with the shared
selection, schedule, regrowth and gates. An unstructured method implements :class:`Pruner` itself
(see :mod:`snncompress.prune.unstructured`). Both are found by name in :data:`snncompress.registry.METHODS`,
or imported from a trusted ``package.module:Class`` string.
"""

from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

import torch
import torch.nn as nn

from ..config import PruneCfg
from ..schema import validate_options
from ..errors import SnnCompressError
from ..registry import METHODS
from .costs.unit import CostUnit
from .gates import ChannelGroup
from .options import MethodOptions
from .scorer import Scorer
from .structured import Batches, ChannelPruner

Reduce = Callable[[list[torch.Tensor]], None]  # sums tensors over processes in place (torchrun)


@runtime_checkable
class Pruner(Protocol):
    """What the training loop calls, in this order, every training step and epoch.

    ``begin_epoch(epoch)`` at the start of each epoch (a method gathers statistics only in epochs whose
    statistics a mask update will read); ``penalty()`` is added to the loss; ``after_backward()`` runs after ``loss.backward()``;
    ``after_step()`` after the optimiser step; ``end_epoch(epoch, reduce)`` at the end of each epoch
    (if it updates the masks it first sums ``statistics()`` over all processes with ``reduce``, when
    given; it returns the history entry of an update, else None).
    """

    history: list[dict]

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """Channel keep-masks per group (what slim removes)."""

    def kept_fraction(self) -> float: ...

    def at_target(self) -> bool:
        """True once the masks have reached the final budget (the best checkpoint is only taken then)."""

    def begin_epoch(self, epoch: int) -> None: ...

    def penalty(self) -> torch.Tensor: ...

    def after_backward(self) -> None: ...

    def after_step(self) -> None: ...

    def statistics(self) -> list[torch.Tensor]:
        """Per-process statistics of the current window (summed over processes before a selection)."""

    def end_epoch(self, epoch: int, reduce: Reduce | None = None) -> dict | None: ...

    def freeze(self, epoch: int) -> dict[str, torch.Tensor] | None:
        """Called before each epoch: the channel masks, final, if no epoch from ``epoch`` on can change them
        and the method lets the training remove the closed channels (the slim fine-tune, ``train.slim_finetune``);
        else None. Once it has returned masks, the pruner must not read the gates (they are gone) and the
        network's closed channels are no longer there."""

    def agreement(self) -> dict[str, torch.Tensor]:
        """The masks every process must hold identically after an update (hashed and compared)."""

    def metrics(self) -> dict[str, float]:
        """Extra per-epoch metrics (e.g. connectivity)."""

    def checkpoint_entries(self) -> dict:
        """Extra checkpoint entries (e.g. bit-packed weight masks)."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict, masks: dict[str, torch.Tensor], history: list[dict]) -> None: ...

    def remove(self) -> None: ...


def resolve_method(method: str, trust: bool = False) -> type:
    """The class a recipe's ``prune.method`` names: registered, or user code (imported only if trusted)."""
    return METHODS.resolve(method, "prune.method", trust)


def build_pruner(model: nn.Module, groups: list[ChannelGroup], cfg: PruneCfg, epochs: int, seed: int = 0,
                 optimizer: torch.optim.Optimizer | None = None, trust: bool = False,
                 unit: CostUnit | None = None, batches: Batches | None = None) -> Pruner:
    """The training-time pruner of ``cfg.method`` on a gated model, with the method's own options
    (``prune.options``, checked by its ``Options`` model) and the cost ``unit`` of ``prune.budget_unit``
    (:func:`~snncompress.prune.costs.build_unit`; None for channels). ``batches(n)`` gives the first ``n`` training
    batches (None: all), encoded, on the model's device: a structured method measures on them at an update
    (criticality) and re-estimates BatchNorm statistics after one (``prune.recalibrate_bn``)."""
    cls = resolve_method(cfg.method, trust)
    options = validate_options(getattr(cls, "Options", MethodOptions), cfg.options, "prune.options")
    if isinstance(cls, type) and issubclass(cls, Scorer):
        if cfg.sparsity is not None:
            raise SnnCompressError(f"prune.sparsity: method {cfg.method} is structured (a Scorer): set keep, not "
                                   "sparsity")
        return ChannelPruner(model, groups, cfg, epochs, seed, cls, unit, options, batches)
    if unit is not None:
        raise SnnCompressError(f"prune.budget_unit {cfg.budget_unit}: method {cfg.method} selects its own masks; "
                               "budgets in a cost unit need a Scorer (e.g. sca, criticality, random)")
    if isinstance(cls, type) and all(hasattr(cls, m) for m in ("begin_epoch", "end_epoch", "after_backward", "masks")):
        return cls(model, groups, cfg, epochs, seed, optimizer, options)
    raise SnnCompressError(f"prune.method {cfg.method!r}: not a Scorer subclass or a Pruner class "
                           f"(got {type(cls).__name__})")
