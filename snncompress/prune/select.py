"""Selectors: turn channel scores into keep-masks under a budget (global, per group from the PQ index, rounded)."""

from __future__ import annotations

import itertools
import math

import torch

from .pq import pq_index, pq_prune_ratio


def group_floor(size: int, min_channels: int, min_fraction: float = 0.0) -> int:
    """Channels a group of ``size`` always keeps: ``min_channels``, or ``ceil(min_fraction * size)`` if more (never
    more than the group)."""
    return min(size, max(min_channels, math.ceil(min_fraction * size - 1e-9)))


def select_masks(
    activity: dict[str, torch.Tensor],
    regrowth: dict[str, torch.Tensor],
    keep_fraction: float,
    regrow_fraction: float,
    min_channels: int,
    min_fraction: float = 0.0,
    allocation: str = "global",
) -> dict[str, torch.Tensor]:
    """Keep-masks: the most active channels, plus the best regrowth candidates.

    ``keep_fraction`` of all channels is kept, ``regrow_fraction`` of all channels of them by the regrowth signal
    (the same share of the kept ones in every group). ``allocation="layer"``: every group keeps the same fraction
    of its own channels (:func:`layer_budgets`) and ranks only its own (:func:`select_masks_budgeted`).
    ``"global"``: first every group keeps its floor (:func:`group_floor`) of most active channels (so no layer
    dies); the rest of the activity share (``keep_fraction - regrow_fraction``) goes to the globally most active
    channels; the remaining budget to the channels with the largest regrowth signal among those not yet kept.
    Ties break towards the lower channel index.
    """
    if allocation == "layer":
        budgets = layer_budgets(activity, keep_fraction, min_channels, min_fraction)
        share = regrow_fraction / keep_fraction if keep_fraction > 0 else 0.0
        return select_masks_budgeted(activity, regrowth, budgets, share, min_channels, min_fraction)
    names = list(activity)
    sizes = [activity[n].numel() for n in names]
    total = sum(sizes)
    floors = [group_floor(s, min_channels, min_fraction) for s in sizes]
    floor = sum(floors)
    n_keep = min(total, max(floor, round(keep_fraction * total)))
    n_regrow = min(round(regrow_fraction * total), n_keep - floor)

    act = torch.cat([activity[n].double().flatten() for n in names])
    grow = torch.cat([regrowth[n].double().flatten() for n in names])
    keep = torch.zeros(total, dtype=torch.bool)
    offsets = [0, *itertools.accumulate(sizes)]

    for i, k in enumerate(floors):
        top = top_k(act[offsets[i]:offsets[i + 1]], k)
        keep[offsets[i] + top] = True

    n_act = n_keep - n_regrow - int(keep.sum())
    if n_act > 0:
        keep[top_k(act.masked_fill(keep, -math.inf), n_act)] = True
    if n_regrow > 0:
        keep[top_k(grow.masked_fill(keep, -math.inf), n_regrow)] = True
    return {n: keep[offsets[i]:offsets[i + 1]].clone() for i, n in enumerate(names)}


def pq_budgets(
    scores: dict[str, torch.Tensor],
    keep_fraction: float,
    min_channels: int,
    p: float = 0.5,
    q: float = 1.0,
    eta: float = 0.0,
    gamma: float = 1.0,
    beta: float = 0.9,
    masks: dict[str, torch.Tensor] | None = None,
    min_fraction: float = 0.0,
) -> dict[str, int]:
    """Channels each group keeps: its PQ budget (docs/methods.md, our structured extension), scaled to the schedule.

    For group l of size d_l, with o_l open channels (``masks``; all if None) and m_l its floor (:func:`group_floor`):
    ``ratio_l = pq_prune_ratio(pq_index(scores_l[open]), o_l)`` -- the index over the unmasked entries, as
    Diao et al. and Shen et al. compute it, so the stale or zero scores of closed channels do not count --
    and the raw budget is ``b_l = max(m_l, ceil((1 - ratio_l) * o_l))``: the part of the open channels
    worth keeping. The total is the schedule's, ``K = clamp(round(keep_fraction * sum d_l), sum m_l, sum d_l)``,
    shared in proportion to the raw budgets: ``n_l = clamp(c * b_l, m_l, d_l)`` with the one scale ``c >= 0``
    (found by bisection; sum n_l is non-decreasing in c) for which ``sum n_l = K``; then rounded to integers
    by largest remainder (ties to the earlier group), so the integer budgets sum to K exactly. A group whose
    scores are concentrated on few channels (high PQ index) thus keeps a smaller share than one with flat scores.
    """
    names = list(scores)
    sizes, lo, raw = pq_raw_budgets(scores, min_channels, p, q, eta, gamma, beta, masks, min_fraction)
    k = min(sum(sizes), max(sum(lo), round(keep_fraction * sum(sizes))))

    def shares(c: float) -> list[float]:
        return pq_shares(c, sizes, lo, raw)

    c_lo, c_hi = 0.0, max(d / b for d, b in zip(sizes, raw))  # sum(shares(c_hi)) = sum d >= k
    for _ in range(100):
        mid = (c_lo + c_hi) / 2
        c_lo, c_hi = (mid, c_hi) if sum(shares(mid)) <= k else (c_lo, mid)
    real = shares(c_lo)  # sum <= k, within rounding of k
    out = [math.floor(x + 1e-9) for x in real]
    order = sorted(range(len(names)), key=lambda i: (-(real[i] - out[i]), i))
    while sum(out) < k:
        for i in order:
            if sum(out) < k and out[i] < sizes[i]:
                out[i] += 1
    return dict(zip(names, out))


def pq_raw_budgets(scores: dict[str, torch.Tensor], min_channels: int, p: float, q: float, eta: float, gamma: float,
                   beta: float, masks: dict[str, torch.Tensor] | None,
                   min_fraction: float = 0.0) -> tuple[list[int], list[int], list[int]]:
    """``(d_l, m_l, b_l)`` per group of :func:`pq_budgets`: sizes, floors and raw PQ budgets."""
    sizes = [s.numel() for s in scores.values()]
    lo = [group_floor(d, min_channels, min_fraction) for d in sizes]
    open_scores = [s.flatten()[masks[n]] if masks is not None else s.flatten() for n, s in scores.items()]
    ratios = [pq_prune_ratio(pq_index(s, p, q), s.numel(), p, q, eta, gamma, beta) for s in open_scores]
    # ceil with a tolerance: a 2-sparse flat vector has ratio 0.5 in exact arithmetic, 0.4999999999999999 in floats
    raw = [max(m, math.ceil((1 - r) * s.numel() - 1e-9)) for r, s, m in zip(ratios, open_scores, lo)]
    return sizes, lo, raw


def pq_shares(c: float, sizes: list[int], lo: list[int], raw: list[int]) -> list[float]:
    """Real-valued channels per group at scale ``c``: ``clamp(c * b_l, m_l, d_l)``."""
    return [min(d, max(m, c * b)) for d, m, b in zip(sizes, lo, raw)]


def select_masks_budgeted(
    scores: dict[str, torch.Tensor],
    regrowth: dict[str, torch.Tensor],
    budgets: dict[str, int],
    regrow_share: float,
    min_channels: int,
    min_fraction: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Per-group keep-masks with a fixed number of channels per group (e.g. from :func:`pq_budgets`).

    Group l keeps ``budgets[l]`` channels: ``r_l = min(round(regrow_share * budgets[l]), budgets[l] - m_l)``
    (m_l its floor, :func:`group_floor`) of them chosen by the regrowth signal among the channels not chosen
    by score, the others by score. ``regrow_share`` is the regrowth part of the kept channels
    (``regrow / keep``), the same in every group. Ties break towards the lower channel index.
    """
    out = {}
    for n, s in scores.items():
        size, n_keep = s.numel(), budgets[n]
        n_regrow = max(0, min(round(regrow_share * n_keep), n_keep - group_floor(size, min_channels, min_fraction)))
        keep = torch.zeros(size, dtype=torch.bool)
        keep[top_k(s.double().flatten(), n_keep - n_regrow)] = True
        if n_regrow > 0:
            keep[top_k(regrowth[n].double().flatten().masked_fill(keep, -math.inf), n_regrow)] = True
        out[n] = keep
    return out


def layer_budgets(scores: dict[str, torch.Tensor], keep_fraction: float, min_channels: int,
                  min_fraction: float = 0.0) -> dict[str, int]:
    """Channels each group keeps when every group keeps the same fraction: ``round(keep_fraction * d_l)`` (halves
    up), at least its floor (:func:`group_floor`)."""
    return {n: max(group_floor(s.numel(), min_channels, min_fraction), math.floor(keep_fraction * s.numel() + 0.5))
            for n, s in scores.items()}


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest entries of a 1-D tensor; stable, so ties go to the lower index."""
    return torch.sort(scores, descending=True, stable=True).indices[:k]


def round_masks(masks: dict[str, torch.Tensor], scores: dict[str, torch.Tensor], multiple: int) -> dict[str, torch.Tensor]:
    """Round every group's kept-channel count up to a multiple of ``multiple`` (capped at its size).

    Convolutions whose channel counts are multiples of the SIMD width (8 or 16 floats) run closer to
    the machine's GEMM speed; the extra channels are the closed ones with the best scores.
    """
    out = {}
    for name, mask in masks.items():
        kept = int(mask.sum())
        target = min(mask.numel(), -(-kept // multiple) * multiple)
        mask = mask.clone()
        if target > kept:
            mask[top_k(scores[name].double().masked_fill(mask, -math.inf), target - kept)] = True
        out[name] = mask
    return out
