"""``prune.budget_unit: sops``: the synaptic operations the dense model makes, measured on training batches."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ...config import PruneCfg
from ...registry import register_budget_unit
from ..gates import ChannelGroup
from ..scorer import model_device
from .layers import Layer
from .unit import CostUnit


@register_budget_unit("sops")
class SopCost(CostUnit):
    """``a * b`` with ``weights[l][i]`` the synaptic operations per inference that input channel ``i`` of layer
    ``l`` makes on one output channel: its spikes times their border-aware fan-out, as spikingjelly's
    SynOpCounter counts them, measured by :class:`SopMeter` on the training batches of each update window.

    A closed channel fires nothing, so it keeps the weight it had when last open. The dense reference is
    fixed at the first update, when every channel was open. Once the masks reach the target, the same hooks
    also sum each training batch's SOPs differentiably and :meth:`penalty` is
    ``prune.sop_hold * (SOPs / target - 1)^2``: the training after the selection moves the firing.
    """

    label = "SOPs"

    def __init__(self, layers: list[Layer], groups: list[ChannelGroup], T: int, cfg: PruneCfg | None = None):
        super().__init__(layers, groups, T, cfg)
        self._dense = math.nan  # set at the first update
        self._meter: SopMeter | None = None
        self._target = math.nan

    def layer_cost(self, layer: Layer, a: float, b: float) -> float:
        return a * b

    @property
    def dense(self) -> float:
        return self._dense

    @staticmethod
    def achieved(dense: dict, slim: dict, batch: int, trained: dict | None) -> float | None:
        # the dense-shaped model cannot stand in for the dense SOPs: its closed channels fire nothing
        return slim["sops"] / trained["dense"] if trained else None

    def attach(self, model: nn.Module) -> None:
        if self._meter is None:
            self._meter = SopMeter(model, self.layers, self.T)

    def activate(self, on: bool) -> None:
        if self._meter is not None:
            self._meter.active = on

    def statistics(self) -> list[torch.Tensor]:
        return self._meter.tensors() if self._meter is not None else []

    def absorb(self, masks: dict[str, torch.Tensor]) -> None:
        if self._meter is None:
            return
        measured = self._meter.per_inference()
        for lay in self.layers:
            w = measured[lay.name]
            self.weights[lay.name] = w if lay.in_group is None else torch.where(masks[lay.in_group], w,
                                                                                self.weights[lay.name])
        self._meter.reset()
        if math.isnan(self._dense):
            self._dense = super().dense

    def hold(self, masks: dict[str, torch.Tensor] | None, target: float) -> None:
        if self._meter is None or not self.cfg.sop_hold:
            return
        self._meter.batch, self._target = None, target
        self._meter.outputs = None if masks is None else {
            lay.name: (lay.n_out if lay.out_group is None else int(masks[lay.out_group].sum()))
            * bool(self.weights[lay.name].sum() > 0) for lay in self.layers}

    def batch_sops(self) -> torch.Tensor | None:
        """The SOPs per inference of the last training batch while holding (then forgotten), else None."""
        if self._meter is None:
            return None
        sops, self._meter.batch = self._meter.batch, None
        return sops

    def penalty(self) -> torch.Tensor | None:
        sops = self.batch_sops()
        return None if sops is None else self.cfg.sop_hold * (sops / self._target - 1) ** 2

    def remove(self) -> None:
        if self._meter is not None:
            self._meter.remove()
            self._meter = None

    def state_dict(self) -> dict:
        return {"weights": {n: w.clone() for n, w in self.weights.items()}, "dense": self._dense,
                "meter": self._meter.state_dict() if self._meter is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.weights = {n: w.clone() for n, w in state["weights"].items()}
        self._dense = state["dense"]
        if self._meter is not None and state["meter"] is not None:
            self._meter.load_state_dict(state["meter"])


class SopMeter:
    """Per input channel of every conv / linear layer: the synaptic operations its spikes cause on one output
    channel, summed over the samples of an update window (on the model's device; no host reads).

    A conv input spike at position p reaches ``F(p)`` output positions (fewer at the borders); a linear
    layer's input feature reaches one weight per output. Layers whose input is not binary (the image, an
    average pool) make no SOPs, as spikingjelly's SynOpCounter counts them. Hand-written: SynOpCounter counts
    a whole model's operations after the fact, not per input channel and not differentiably in training.
    """

    def __init__(self, model: nn.Module, layers: list[Layer], T: int):
        device = model_device(model)
        self.T, self.active = T, False
        self.sums = {lay.name: torch.zeros(lay.n_in, dtype=torch.float64, device=device) for lay in layers}
        self.steps = torch.zeros((), dtype=torch.float64, device=device)  # sample-steps seen (per layer alike)
        self.analog = {lay.name: torch.zeros((), dtype=torch.float64, device=device) for lay in layers}
        self._fanout = {lay.name: self.fanout_map(lay, device) for lay in layers if lay.kind == "conv"}
        # holding (SopCost.hold): each layer's kept outputs (0 for one with a non-binary input), and the
        # SOPs per inference of the training batch in flight, differentiable through the surrogate spikes
        self.outputs: dict[str, int] | None = None
        self.batch: torch.Tensor | None = None
        self._first = layers[0].name if layers else None
        modules = dict(model.named_modules())
        self._handles = [modules[lay.name].register_forward_pre_hook(self._hook(lay)) for lay in layers]

    def _hook(self, lay: Layer):
        def fn(module, args):
            hold = bool(self.outputs and self.outputs[lay.name]) and module.training and torch.is_grad_enabled()
            if not (self.active or hold):
                return
            x = args[0] if hold else args[0].detach()
            x = x.reshape(-1, *x.shape[-3:]) if lay.kind == "conv" else x.reshape(-1, x.shape[-1])
            per_pos = x.sum(0, dtype=torch.float64)  # [C, H, W] or [features]
            # each spike times the output positions it reaches (one output per feature of a linear layer); the
            # channels may be fewer than the layer's dense ones (train's slim fine-tune): only holding sees that
            spikes = (per_pos * self._fanout[lay.name]).sum((-2, -1)) if lay.kind == "conv" else per_pos
            if hold:
                sops = spikes.sum() * (self.outputs[lay.name] * self.T / x.shape[0])
                self.batch = sops if self.batch is None else self.batch + sops
            if self.active:
                if lay.kind != "conv":  # per input channel
                    spikes = spikes.view(lay.n_in, -1).sum(1)
                with torch.no_grad():
                    self.sums[lay.name] += spikes.detach()
                    self.analog[lay.name] += ((x != 0) & (x != 1)).any()
                    if lay.name == self._first:
                        self.steps += x.shape[0]
        return fn

    @staticmethod
    def fanout_map(lay: Layer, device: torch.device) -> torch.Tensor:
        """How many output positions each input position of a conv feeds (fewer at the borders): the input
        gradient of the sum of a ones-kernel conv."""
        (kh, kw), stride, padding, dilation = lay.conv
        _, h, w = lay.in_shape
        ones = torch.ones((1, 1, *lay.out_hw), dtype=torch.float64, device=device)
        kernel = torch.ones((1, 1, kh, kw), dtype=torch.float64, device=device)
        return torch.nn.grad.conv2d_input((1, 1, h, w), kernel, ones, stride, padding, dilation)[0, 0]

    def per_inference(self) -> dict[str, torch.Tensor]:
        """SOPs per output channel per inference (all T steps), per input channel, on the CPU."""
        steps = float(self.steps)
        if steps == 0:
            raise RuntimeError("SOP budget: no training batch was measured in this update window")
        return {n: s.cpu() * self.T / steps * (float(self.analog[n]) == 0) for n, s in self.sums.items()}

    def tensors(self) -> list[torch.Tensor]:
        return [*self.sums.values(), *self.analog.values(), self.steps]

    def reset(self) -> None:
        for t in self.tensors():
            t.zero_()

    def state_dict(self) -> dict:
        return {"sums": {n: s.cpu().clone() for n, s in self.sums.items()},
                "analog": {n: s.cpu().clone() for n, s in self.analog.items()}, "steps": self.steps.cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        for n, s in state["sums"].items():
            self.sums[n].copy_(s)
        for n, s in state["analog"].items():
            self.analog[n].copy_(s)
        self.steps.copy_(state["steps"])

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
