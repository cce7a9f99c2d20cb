"""Physical channel removal with Torch-Pruning (train's slim fine-tune, the slim stage and the latency calibration
run it; loading a checkpoint does not).

Torch-Pruning decides which entries of which tensors go (residual couplings, a classifier's features after a
flatten); it runs on a probe, a float64 copy of the network whose every entry holds its own position, so the
surgery's result reads back as per-dimension kept indices (:data:`~snncompress.prune.shapes.KeptIndex`). The
real weights, an optimiser's state and a checkpoint's description are all cut by those same indices.
"""

from __future__ import annotations

import copy
import math
from itertools import chain

import torch
import torch.nn as nn
import torch_pruning as tp
from spikingjelly.activation_based import functional

from ..errors import MaskError, ModelError
from .gates import strip_gates
from .groups import dependency_graph, groups_of_graph
from .shapes import KeptIndex, apply_index, gather


def remove_channels(model: nn.Module, keep: dict[str, torch.Tensor], example_input: torch.Tensor) -> nn.Module:
    """Cut ``model``'s group channels to ``keep`` with Torch-Pruning, in place (gates stripped).

    ``keep`` maps a group name (see :func:`~snncompress.prune.groups.channel_groups`) to a bool tensor over its
    channels; groups not named keep all channels. The graph is traced in single-step mode.
    """
    dg = dependency_graph(model, example_input)
    groups = {g.name: g for g in groups_of_graph(model, dg)}
    unknown = set(keep) - set(groups)
    if unknown:
        raise MaskError(f"unknown channel group(s) {sorted(unknown)}; groups: {', '.join(groups)}")
    modules = dict(model.named_modules())
    for name, mask in keep.items():
        g = groups[name]
        mask = torch.as_tensor(mask, dtype=torch.bool)
        if mask.shape != (g.size,):
            raise MaskError(f"{name}: mask has shape {tuple(mask.shape)}, the group has {g.size} channels")
        if not mask.any():
            raise MaskError(f"{name}: mask keeps no channel (at least one is required)")
        removed = (~mask).nonzero().flatten().tolist()
        if removed:
            dg.get_pruning_group(modules[g.convs[0]], tp.prune_conv_out_channels, idxs=removed).prune()
    strip_gates(model)
    functional.invalidate_reset_cache(model)
    return model


def kept_index(model: nn.Module, keep: dict[str, torch.Tensor], example_input: torch.Tensor) -> KeptIndex:
    """Per tensor of ``model`` that cutting its groups to ``keep`` reshapes: the indices kept along each dimension.

    Found by running the surgery on a probe whose entries are their own flat positions (exact in float64), in
    eval mode so that the trace's forward updates no BatchNorm statistics.
    """
    probe = copy.deepcopy(model).to("cpu", torch.float64).eval()
    shapes = {}
    with torch.no_grad():
        for name, t in chain(probe.named_parameters(), probe.named_buffers()):
            if t.is_floating_point():
                shapes[name] = t.shape
                t.copy_(torch.arange(t.numel(), dtype=torch.float64).view(t.shape))
    remove_channels(probe, keep, example_input.to(torch.float64))
    index: KeptIndex = {}
    for name, t in chain(probe.named_parameters(), probe.named_buffers()):
        if name not in shapes or t.shape == shapes[name]:
            continue
        coords = torch.unravel_index(t.detach().flatten().long(), shapes[name])
        kept = [coords[d].view(t.shape).movedim(d, 0).reshape(t.shape[d], -1)[:, 0].tolist()
                if t.shape[d] != shapes[name][d] else None for d in range(t.dim())]
        positions = torch.arange(math.prod(shapes[name]), dtype=torch.float64).view(shapes[name])
        if not torch.equal(gather(positions, kept), t.detach()):
            raise ModelError(f"{name}: Torch-Pruning's cut is not a cut along whole dimensions")
        index[name] = kept
    return index


def slim(model: nn.Module, keep: dict[str, torch.Tensor], example_input: torch.Tensor) -> nn.Module:
    """Return a copy of ``model`` without gates, whose group channels are cut to ``keep``.

    ``keep`` maps a group name (see :func:`~snncompress.prune.groups.channel_groups`) to a bool tensor over
    its channels; groups not named keep all channels. Conv/BN output channels and every consumer's input
    channels (residual couplings included) are removed as Torch-Pruning removes them (:func:`kept_index`).
    """
    return apply_index(copy.deepcopy(model), kept_index(model, keep, example_input))
