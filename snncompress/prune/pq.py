"""PQ index (Diao et al., ICLR 2023) and its adaptive pruning ratio, as used by Shen et al. (ICLR 2025).

The index measures how compressible a vector is: 0 when all entries are equal, towards 1 when a few
entries carry all the mass. Here it is applied to a layer's channel scores to set that layer's channel
budget (``prune.budget: pq``, see :func:`snncompress.prune.select.pq_budgets`).
"""

from __future__ import annotations

import torch


def pq_index(w: torch.Tensor, p: float = 0.5, q: float = 1.0) -> float:
    """``I(w) = 1 - d^(1/q - 1/p) * ||w||_p / ||w||_q`` over the d entries of a 1-D ``w`` (0 < p < q).

    In [0, 1 - d^(1/q - 1/p)]: 0 for a constant vector, the upper end for a one-hot one. The zero
    vector (and the empty one) has index 0: nothing to tell apart.
    """
    if w.dim() != 1:
        raise ValueError(f"pq_index: expected a 1-D tensor, got shape {tuple(w.shape)}")
    if not 0 < p < q:
        raise ValueError(f"pq_index: needs 0 < p < q, got p={p}, q={q}")
    a = w.detach().double().abs()
    d = a.numel()
    if d == 0 or not bool(a.any()):
        return 0.0
    norm_p = a.pow(p).sum().pow(1 / p)
    norm_q = a.pow(q).sum().pow(1 / q)
    return max(0.0, float(1 - d ** (1 / q - 1 / p) * norm_p / norm_q))  # >= 0 up to rounding (power means)


def pq_prune_ratio(index: float, d: int, p: float = 0.5, q: float = 1.0, eta: float = 0.0, gamma: float = 1.0,
                   beta: float = 0.9) -> float:
    """Diao's adaptive pruning ratio from a PQ index over ``d`` entries.

    ``r = d * (1 + eta)^(-q/(q-p)) * (1 - I)^(q*p/(q-p))`` is the number of entries worth keeping;
    the ratio pruned is ``clamp(gamma * (1 - r/d), 0, beta)``. With the defaults (p = 0.5, q = 1,
    eta = 0, gamma = 1) this is simply ``min(I, beta)``.
    """
    r = d * (1 + eta) ** (-q / (q - p)) * (1 - index) ** (q * p / (q - p))
    return min(max(gamma * (1 - r / d), 0.0), beta)
