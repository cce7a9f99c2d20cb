"""Weight-level (unstructured) masks: which weights, how a mask is enforced and stored, ER densities.

A mask covers the ``weight`` of every ``Conv2d`` and ``Linear`` of the model. It is enforced three ways,
so that neither the forward pass, the gradient, nor the optimiser state can revive a pruned weight:

- a forward pre-hook zeroes the pruned entries in place before every forward (the stored weights are
  therefore plain tensors with the zeros baked in: ``state_dict``, slim and ONNX need nothing special);
- :meth:`WeightMasks.mask_grads` zeroes their gradient after ``backward`` (so momentum and weight decay,
  which act on ``w = 0`` and ``g = 0``, leave them at 0);
- :meth:`WeightMasks.reset_optimizer_state` zeroes the optimiser state (momentum, Adam moments) of the
  entries whose mask changed, so a regrown weight starts from 0 with no stale momentum.

The masks are not parameters or buffers (the optimiser and ``state_dict`` never see them); checkpoints
store them bit-packed (:func:`pack_masks`), loadable with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn

from ..errors import MaskError
from .gates import ChannelGroup


def maskable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The ``Conv2d`` and ``Linear`` modules of ``model`` (their ``weight`` is masked), in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def pack_masks(masks: dict[str, torch.Tensor]) -> dict[str, dict]:
    """Bit-pack bool masks: ``{name: {"shape": [...], "bits": uint8[ceil(numel / 8)]}}`` (8x smaller than bool)."""
    return {n: {"shape": list(m.shape), "bits": torch.from_numpy(np.packbits(m.flatten().cpu().numpy()))}
            for n, m in masks.items()}


def unpack_masks(packed: dict[str, dict]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`pack_masks`."""
    out = {}
    for n, p in packed.items():
        numel = math.prod(p["shape"])
        bits = np.unpackbits(p["bits"].numpy(), count=numel)
        out[n] = torch.from_numpy(bits.astype(bool)).view(p["shape"])
    return out


def round_half_up(x: float) -> int:
    """``floor(x + 0.5)``: the rounding used for every weight count (Python's ``round`` rounds half to even)."""
    return math.floor(x + 0.5)


class WeightMasks:
    """Owns one bool mask per maskable layer and enforces it (see the module docstring)."""

    def __init__(self, layers: dict[str, nn.Module]):
        self.layers = layers
        self.masks = {n: torch.ones_like(m.weight, dtype=torch.bool) for n, m in layers.items()}
        self._handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in layers.items()]

    def _hook(self, name: str):
        def hook(module: nn.Module, args) -> None:
            with torch.no_grad():
                module.weight.masked_fill_(~self.masks[name], 0.0)
        return hook

    def set(self, masks: dict[str, torch.Tensor]) -> None:
        """Replace the masks (same shapes) and zero the newly pruned weights."""
        for n, m in masks.items():
            if m.shape != self.masks[n].shape:
                raise MaskError(f"weight mask for {n}: expected shape {tuple(self.masks[n].shape)}, got {tuple(m.shape)}")
            self.masks[n] = m.to(device=self.layers[n].weight.device, dtype=torch.bool).clone()
        self.apply()

    @torch.no_grad()
    def apply(self) -> None:
        """Zero every pruned weight in place."""
        for n, m in self.layers.items():
            m.weight.masked_fill_(~self.masks[n], 0.0)

    @torch.no_grad()
    def mask_grads(self) -> None:
        for n, m in self.layers.items():
            if m.weight.grad is not None:
                m.weight.grad.masked_fill_(~self.masks[n], 0.0)

    @torch.no_grad()
    def reset_optimizer_state(self, optimizer: torch.optim.Optimizer | None, changed: dict[str, torch.Tensor]) -> None:
        """Zero the per-weight optimiser state (momentum, Adam moments) where the mask changed."""
        if optimizer is None:
            return
        for n, m in self.layers.items():
            state = optimizer.state.get(m.weight, {})
            for value in state.values():
                if torch.is_tensor(value) and value.shape == m.weight.shape:
                    value.masked_fill_(changed[n].to(value.device), 0)

    def density(self) -> float:
        """Fraction of maskable weights kept."""
        return sum(int(m.sum()) for m in self.masks.values()) / sum(m.numel() for m in self.masks.values())

    def cpu(self) -> dict[str, torch.Tensor]:
        return {n: m.cpu().clone() for n, m in self.masks.items()}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def channel_masks(masks: dict[str, torch.Tensor], groups: list[ChannelGroup]) -> dict[str, torch.Tensor]:
    """A group's channel is open iff its filter has a kept weight in at least one member conv.

    A channel whose filters are entirely pruned outputs the constant BN bias; closing its gate (so it
    never fires) is what makes removing it exact, so this is the channel mask the gates get.
    """
    return {g.name: torch.stack([masks[c].flatten(1).any(1).cpu() for c in g.convs]).any(0) for g in groups}


def ensure_rows(mask: torch.Tensor, score: torch.Tensor, min_rows: int) -> torch.Tensor:
    """Make at least ``min(min_rows, rows)`` output rows (filters) non-empty.

    While too few rows keep a weight, the empty row with the largest ``score`` entry gets that one entry
    back (ties: lower index). Keeps a layer from dying under a global ranking; adds at most ``min_rows``.
    """
    mask = mask.clone()
    flat_m, flat_s = mask.view(mask.shape[0], -1), score.reshape(score.shape[0], -1).double()
    need = min(min_rows, mask.shape[0]) - int(flat_m.any(1).sum())
    if need <= 0:
        return mask
    row_best, col = flat_s.max(1)
    empty = ~flat_m.any(1)
    order = torch.sort(row_best.masked_fill(~empty, -math.inf), descending=True, stable=True).indices[:need]
    flat_m[order, col[order]] = True
    return mask


def er_densities(shapes: list[tuple[int, ...]], density: float) -> list[float]:
    """Per-layer densities of the Erdős–Rényi-kernel distribution (Evci et al. 2020, RigL) at total ``density``.

    Layer l (weight shape ``(n_out, n_in, k_h, k_w)`` or ``(n_out, n_in)``) gets
    ``d_l = eps * sum(shape_l) / prod(shape_l)``, with the one ``eps`` for which
    ``sum_l d_l * n_l = density * sum_l n_l`` (n_l = prod(shape_l)). A layer whose d_l would exceed 1 is
    made dense and eps is solved again for the others, largest first (RigL's procedure).
    """
    sizes = [math.prod(s) for s in shapes]
    raw = [sum(s) / n for s, n in zip(shapes, sizes)]
    target = density * sum(sizes)
    dense: set[int] = set()
    while True:
        rest = [i for i in range(len(shapes)) if i not in dense]
        budget = target - sum(sizes[i] for i in dense)
        scale = sum(raw[i] * sizes[i] for i in rest)
        eps = budget / scale if scale > 0 else 0.0
        over = [i for i in rest if eps * raw[i] > 1]
        if not over:
            return [1.0 if i in dense else eps * raw[i] for i in range(len(shapes))]
        dense.add(max(over, key=lambda i: raw[i]))


def random_masks(shapes: dict[str, tuple[int, ...]], densities: dict[str, float], generator: torch.Generator,
                 min_rows: int) -> dict[str, torch.Tensor]:
    """Masks with ``round_half_up(d_l * n_l)`` kept weights per layer at uniformly random positions.

    ``min_rows`` non-empty rows are then ensured (:func:`ensure_rows`, by a fresh random score).
    """
    out = {}
    for n, shape in shapes.items():
        numel = math.prod(shape)
        k = min(numel, round_half_up(densities[n] * numel))
        flat = torch.zeros(numel, dtype=torch.bool)
        flat[torch.randperm(numel, generator=generator)[:k]] = True
        out[n] = ensure_rows(flat.view(shape), torch.rand(shape, generator=generator), min_rows)
    return out
