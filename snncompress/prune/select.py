"""Selectors: turn channel scores into keep-masks under a budget, and the budget's schedule."""

from __future__ import annotations

import itertools
import math

import torch

from ..recipe import PruneCfg


def keep_fraction_at(cfg: PruneCfg, epoch: int) -> float:
    """Target keep fraction for the mask update made at the end of ``epoch`` (0-based).

    Dense (1.0) during warm-up, then a cubic ramp (Zhu & Gupta 2017) that reaches ``cfg.keep`` after
    ``ramp_epochs`` epochs and stays there.
    """
    if epoch < cfg.warmup_epochs:
        return 1.0
    t = min(1.0, (epoch - cfg.warmup_epochs + 1) / cfg.ramp_epochs)
    return cfg.keep + (1.0 - cfg.keep) * (1.0 - t) ** 3


def is_update_epoch(cfg: PruneCfg, epochs: int, epoch: int) -> bool:
    """Masks are recomputed at the end of this epoch (not during warm-up or the frozen fine-tune)."""
    if epoch < cfg.warmup_epochs or epoch >= epochs - cfg.finetune_epochs:
        return False
    return (epoch - cfg.warmup_epochs) % cfg.update_every == 0


def select_masks(
    activity: dict[str, torch.Tensor],
    regrowth: dict[str, torch.Tensor],
    keep_fraction: float,
    regrow_fraction: float,
    min_channels: int,
) -> dict[str, torch.Tensor]:
    """Global keep-masks: the most active channels, plus the best regrowth candidates.

    ``keep_fraction`` of all channels is kept. First every group keeps its ``min_channels`` most
    active channels (so no layer dies); the rest of the activity share
    (``keep_fraction - regrow_fraction``) goes to the globally most active channels; the remaining
    budget (``regrow_fraction`` of all channels) to the channels with the largest regrowth signal
    among those not yet kept. Ties break towards the lower channel index.
    """
    names = list(activity)
    sizes = [activity[n].numel() for n in names]
    total = sum(sizes)
    floor = sum(min(min_channels, s) for s in sizes)
    n_keep = min(total, max(floor, round(keep_fraction * total)))
    n_regrow = min(round(regrow_fraction * total), n_keep - floor)

    act = torch.cat([activity[n].double().flatten() for n in names])
    grow = torch.cat([regrowth[n].double().flatten() for n in names])
    keep = torch.zeros(total, dtype=torch.bool)
    offsets = [0, *itertools.accumulate(sizes)]

    for i, size in enumerate(sizes):
        k = min(min_channels, size)
        top = _top(act[offsets[i]:offsets[i + 1]], k)
        keep[offsets[i] + top] = True

    n_act = n_keep - n_regrow - int(keep.sum())
    if n_act > 0:
        keep[_top(act.masked_fill(keep, -math.inf), n_act)] = True
    if n_regrow > 0:
        keep[_top(grow.masked_fill(keep, -math.inf), n_regrow)] = True
    return {n: keep[offsets[i]:offsets[i + 1]].clone() for i, n in enumerate(names)}


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores; stable, so ties go to the lower index."""
    return torch.sort(scores, descending=True, stable=True).indices[:k]

