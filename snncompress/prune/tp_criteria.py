"""Torch-Pruning's importance criteria as structured methods: baselines from the most used pruning library.

A comparison should include what a practitioner would get from Torch-Pruning (Fang et al., *DepGraph: Towards
Any Structural Pruning*, CVPR 2023), so its criteria score our channel groups here, unchanged. The formulas are
Torch-Pruning's own, in ``torch_pruning/pruner/importance.py`` (not re-implemented here):

- ``tp_taylor``: ``GroupTaylorImportance`` (alias ``TaylorImportance``; Molchanov et al., CVPR 2019):
  ``|w * dL/dw|`` summed per channel over every layer of the coupled group (the convs' output filters, the
  consumers' input slices, the classifier's features after a flatten), mean over the layers, divided by its mean
  over the group's channels. Computed after every training backward of an update window (:meth:`after_backward`)
  and averaged over the window.
- ``tp_lamp``: ``LAMPImportance`` (Lee et al., *Layer-adaptive Sparsity for the Magnitude-based Pruning*, ICLR
  2021): the group's squared L2 magnitudes (BatchNorm scales included), each divided by the sum of those not
  smaller, read from the weights when the masks are updated (like ``l1`` and ``bn``).

Both are constructed with Torch-Pruning's defaults. Each scorer traces Torch-Pruning's dependency graph (as
:mod:`snncompress.prune.groups` does: single-step mode, gates taught to Torch-Pruning) on a copy of the training
model that shares its parameters, so the importance reads the training weights and the gradients training leaves
on them, and the training model itself runs no extra forward. The trace runs once per stretch of scoring epochs,
at its first training forward, whose first sample is the example input (the scorer is not given one). A group's pruning group is Torch-Pruning's
``get_pruning_group(first conv, prune_conv_out_channels, all channels)``; the gates in it are not parameters the
criteria read.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch_pruning as tp
from torch.nn.utils import parametrize
from pydantic import BaseModel
from spikingjelly.activation_based import functional

from ..errors import ModelError
from ..registry import register_method
from .gates import ChannelGroup, _gate_input
from .groups import dependency_graph
from .scorer import ChannelMeans, Scorer, model_device


def parameter_sharing_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters are ``model``'s own (weights and their ``.grad``; a quantised weight's
    float original), with no forward hook but the gates'.

    Buffers and neuron states are copies. The hooks others keep on the model (a scorer's, a cost unit's, counting
    while active) must not see the trace: the copy shares their callables (a bound method's object is not copied)
    and then drops them.
    """
    memo: dict[int, object] = {id(p): p for p in model.parameters()}
    for m in model.modules():
        for name, hooks in vars(m).items():
            if name.endswith("hooks") and isinstance(hooks, dict):
                memo.update({id(h): h for h in hooks.values()})
    twin = copy.deepcopy(model, memo)
    for m in twin.modules():
        if parametrize.is_parametrized(m, "weight"):  # quant: Torch-Pruning reads the trained (float) weight
            # by hand: remove_parametrizations would edit the class the copy shares with the model's module
            original = m.parametrizations.weight.original
            m.__class__ = m.__class__.__bases__[0]  # parametrize subclassed the module's own class
            del m.parametrizations
            m.weight = original
        for key in [k for k, h in m._forward_pre_hooks.items() if h is not _gate_input]:
            del m._forward_pre_hooks[key]
            m._forward_pre_hooks_with_kwargs.pop(key, None)
        m._forward_hooks.clear()
        m._forward_hooks_with_kwargs.clear()
        m._forward_hooks_always_called.clear()
    return twin


class TorchPruningScorer(Scorer):
    """Scores each channel group with a Torch-Pruning importance ``importance()`` applied to its pruning group.

    The dependency graph is traced at the first training forward of a scoring stretch (its input gives the example)
    and kept while the scorer is on; switched off (warm-up, the frozen or slim fine-tune) it lets the copy go, whose
    parameters a surgery may have replaced. Until a trace there are no pruning groups (:meth:`scores` refuses).
    """

    importance: type[tp.importance.Importance]

    def __init__(self, model: nn.Module, groups: list[ChannelGroup], options: BaseModel | None = None, seed: int = 0):
        super().__init__(model, groups, options, seed)
        self.imp = self.importance()
        self.tp_groups: dict[str, tp.Group] | None = None
        self._twin: nn.Module | None = None  # the copy the pruning groups' modules belong to
        # a function, not a bound method: a deepcopy of the model (a surgery's probe) shares it, never copies self
        self._handles = [model.register_forward_pre_hook(lambda module, args: self._first_forward(module, args))]

    def _first_forward(self, module: nn.Module, args: tuple) -> None:
        if self.tp_groups is None and self.active and module.training and torch.is_grad_enabled() and args \
                and isinstance(args[0], torch.Tensor):
            x = args[0]
            self.build((x[:, :1] if x.dim() == 5 else x[:1]).detach())

    def activate(self, on: bool) -> None:
        super().activate(on)
        if not on:
            self.tp_groups, self._twin = None, None

    def build(self, example_input: torch.Tensor) -> None:
        """Trace the dependency graph on a parameter-sharing copy of the model and take each group's pruning group
        (``example_input``: one sample, ``[T, 1, ...]`` or ``[1, ...]``)."""
        twin = parameter_sharing_copy(self.model)
        device = model_device(self.model)
        with torch.enable_grad(), torch.autocast(device.type, enabled=False):
            dg = dependency_graph(twin, example_input.to(device))
        functional.reset_net(twin)
        modules = dict(twin.named_modules())
        self.tp_groups = {g.name: dg.get_pruning_group(modules[g.convs[0]], tp.prune_conv_out_channels,
                                                       idxs=list(range(g.size))) for g in self.groups}
        self._twin = twin

    def group_scores(self) -> dict[str, torch.Tensor]:
        """Per group, Torch-Pruning's importance of each channel now (on the model's device); a group whose
        importance is not finite (e.g. a ``mean`` normaliser over all-zero scores) scores 0."""
        if self.tp_groups is None:
            raise ModelError(f"{type(self).__name__}: the dependency graph is traced at the first training forward "
                             "while scoring; none ran yet")
        out = {}
        for g in self.groups:
            s = self.imp(self.tp_groups[g.name])
            if s is None or s.shape != (g.size,):
                raise ModelError(f"{g.name}: Torch-Pruning's {type(self.imp).__name__} gave "
                                 f"{None if s is None else tuple(s.shape)} scores for {g.size} channels")
            out[g.name] = torch.where(torch.isfinite(s).all(), s, torch.zeros_like(s))  # no wait for a GPU
        return out


@register_method("tp_taylor")
class TPTaylorScorer(TorchPruningScorer):
    """Torch-Pruning's ``GroupTaylorImportance`` after every training backward, averaged over the update window.

    A closed channel's output gradient is 0, so it scores 0 (its reopening is the regrowth signal's job)."""

    importance = tp.importance.GroupTaylorImportance

    def __init__(self, model: nn.Module, groups: list[ChannelGroup], options: BaseModel | None = None, seed: int = 0):
        super().__init__(model, groups, options, seed)
        self._taylor = ChannelMeans(groups, model_device(model))

    def after_backward(self) -> None:
        if not self.active or self.tp_groups is None:
            return
        for name, s in self.group_scores().items():
            self._taylor.add(name, s, 1)

    def scores(self) -> dict[str, torch.Tensor]:
        return self._taylor.means()


@register_method("tp_lamp")
class TPLampScorer(TorchPruningScorer):
    """Torch-Pruning's ``LAMPImportance`` of the weights at the end of the update window."""

    importance = tp.importance.LAMPImportance

    @torch.no_grad()
    def scores(self) -> dict[str, torch.Tensor]:
        return {n: s.double().cpu() for n, s in self.group_scores().items()}
