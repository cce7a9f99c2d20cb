"""Slim shapes without Torch-Pruning: a network's tensors cut (or restored) along the indices a surgery kept.

Structured pruning cuts every tensor along whole dimensions: a conv weight loses output channels (dim 0) and
input channels (dim 1), a BatchNorm vector its channels, a classifier after a flatten the features of its
removed input channels. So one surgery is described, per tensor, by the indices it keeps along each cut
dimension (:data:`KeptIndex`). :mod:`snncompress.prune.surgery` finds them with Torch-Pruning; this module
applies them to weights, optimizer state and shapes, and undoes them (closed channels as zeros), with no
graph trace. Checkpoints store them as ``kept_index``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from spikingjelly.activation_based import functional

from ..errors import MaskError
from .gates import strip_gates

# tensor name -> per dimension: the kept indices (ascending), or None where the dimension is not cut
KeptIndex = dict[str, list[list[int] | None]]


def removed_channels(masks: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    """Per channel group, the channels a surgery removes (what ``removed`` of a checkpoint lists)."""
    return {g: (~m).nonzero().flatten().tolist() for g, m in masks.items()}


def gather(t: torch.Tensor, kept: list[list[int] | None]) -> torch.Tensor:
    """``t`` cut to the kept indices of each dimension."""
    for dim, idx in enumerate(kept):
        if idx is not None:
            t = t.index_select(dim, torch.as_tensor(idx, dtype=torch.long, device=t.device))
    return t


def scatter(t: torch.Tensor, kept: list[list[int] | None], shape: torch.Size) -> torch.Tensor:
    """The tensor of ``shape`` whose kept entries are ``t`` and whose removed entries are 0 (undoes :func:`gather`)."""
    for dim, idx in enumerate(kept):
        if idx is not None:
            grown = list(t.shape)
            grown[dim] = shape[dim]
            t = t.new_zeros(grown).index_copy_(dim, torch.as_tensor(idx, dtype=torch.long, device=t.device), t)
    return t


def follow_shapes(model: nn.Module) -> nn.Module:
    """Set the shape attributes that forward passes read (conv / linear channel counts, BatchNorm features) from
    the tensors' shapes, as Torch-Pruning sets them when it removes channels."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            module.out_channels, module.in_channels = module.weight.shape[0], module.weight.shape[1] * module.groups
        elif isinstance(module, nn.Linear):
            module.out_features, module.in_features = module.weight.shape
        elif isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
            module.num_features = module.running_mean.shape[0]
    return model


def _replace(model: nn.Module, make) -> None:
    """Replace every parameter and buffer ``t`` named ``name`` by ``make(name, t)`` (None: keep it), in place."""
    for prefix, module in model.named_modules():
        for table in (module._parameters, module._buffers):
            for key, t in table.items():
                new = None if t is None else make(f"{prefix}.{key}" if prefix else key, t)
                if new is not None:
                    table[key] = nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) \
                        else new


def resize_to(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """Give every parameter and buffer of ``model`` the shape it has in ``state_dict`` (in place), the shape
    attributes following. The values are left to ``load_state_dict``."""
    def make(name: str, t: torch.Tensor) -> torch.Tensor | None:
        target = state_dict.get(name)
        return None if target is None or target.shape == t.shape else \
            torch.empty(target.shape, dtype=t.dtype, device=t.device)
    _replace(model, make)
    return follow_shapes(model)


def apply_index(model: nn.Module, index: KeptIndex) -> nn.Module:
    """Cut ``model`` (in place) to ``index``: gates removed, every indexed tensor gathered, shapes following.

    The modules stay the same objects, so hooks and references to them (a scorer's, a cost unit's) stay valid;
    their parameters are new tensors (an optimiser must be pointed at them: :func:`slice_optimizer`).
    """
    strip_gates(model)  # every remaining gate is open: multiplying by 1 is dropped
    with torch.no_grad():
        _replace(model, lambda name, t: gather(t.detach(), index[name]) if name in index else None)
    functional.invalidate_reset_cache(model)  # modules changed: spikingjelly's cache of what to reset is stale
    return follow_shapes(model)


def slice_optimizer(opt: torch.optim.Optimizer, before: dict[str, nn.Parameter], after: dict[str, nn.Parameter],
                    index: KeptIndex) -> None:
    """Point ``opt`` at the parameters ``after`` a surgery (by name) and cut their state (momentum, Adam moments)
    as the surgery cut the parameters ``before`` it. Learning rates and step counts are kept."""
    name_of = {id(p): n for n, p in before.items()}
    state = {}
    for group in opt.param_groups:
        params = []
        for p in group["params"]:
            name = name_of[id(p)]
            params.append(after[name])
            if p in opt.state:
                state[after[name]] = {k: gather(v, index[name]) if name in index and torch.is_tensor(v)
                                      and v.shape == p.shape else v for k, v in opt.state[p].items()}
        group["params"] = params
    opt.state.clear()
    opt.state.update(state)


def dense_state(own: dict[str, torch.Tensor], slim: dict[str, torch.Tensor], index: object) -> dict[str, torch.Tensor]:
    """The slim state dict ``slim``, cut by ``index``, in the dense shapes of ``own`` (a model's state dict): every
    indexed tensor scattered back, its removed entries 0; the others as they are. A malformed index is refused
    (:class:`MaskError`, one line)."""
    problem = _index_problem(index, own, slim)
    if problem:
        raise MaskError(f"kept_index: {problem}")
    return {name: scatter(t, index[name], own[name].shape) if name in index else t for name, t in slim.items()}


def _index_problem(index: object, own: dict[str, torch.Tensor], slim: dict[str, torch.Tensor]) -> str | None:
    """What makes ``index`` unable to restore ``slim`` to the shapes of ``own`` (None if nothing)."""
    if not isinstance(index, dict):
        return f"must map tensor names to per-dimension kept indices, got {type(index).__name__}"
    for name, kept in index.items():
        if name not in own or not torch.is_tensor(slim.get(name)):
            return f"{name!r:.60} is not a tensor of this model's state dict"
        shape, cut = own[name].shape, slim[name].shape
        if not isinstance(kept, list) or len(kept) != len(shape):
            return f"{name}: expected one entry per dimension ({len(shape)})"
        for dim, idx in enumerate(kept):
            if idx is None:
                if cut[dim] != shape[dim]:
                    return f"{name}: dimension {dim} has {cut[dim]} entries, the model {shape[dim]}, and no index"
                continue
            if not (isinstance(idx, list) and len(idx) == cut[dim] and all(type(i) is int for i in idx)
                    and all(a < b for a, b in zip(idx, idx[1:])) and (not idx or 0 <= idx[0] <= idx[-1] < shape[dim])):
                return f"{name}: dimension {dim} must list {cut[dim]} ascending indices in [0, {shape[dim]})"
    return None
