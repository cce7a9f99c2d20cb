"""User model factories for the tests, as a user would write them: plain spikingjelly, no snncompress imports."""

from __future__ import annotations

import torch
import torch.nn as nn
from spikingjelly.activation_based import functional, layer, neuron


class SmallSNN(nn.Module):
    """conv-BN-LIF x 2, a max-pool, global average pool and a linear readout averaged over T."""

    def __init__(self, in_channels: int, num_classes: int, hidden: int = 8, groups: int = 1,
                 node: type = neuron.LIFNode):
        super().__init__()
        self.body = nn.Sequential(
            layer.Conv2d(in_channels, hidden, 3, padding=1, bias=False), layer.BatchNorm2d(hidden), node(),
            layer.MaxPool2d(2, 2),
            layer.Conv2d(hidden, 2 * hidden, 3, padding=1, bias=False, groups=groups), layer.BatchNorm2d(2 * hidden),
            node(),
            layer.AdaptiveAvgPool2d((1, 1)), layer.Flatten(start_dim=1),
        )
        self.readout = layer.Linear(2 * hidden, num_classes)
        functional.set_step_mode(self, "m")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.readout(self.body(x))
        return y.mean(0) if y.dim() == 3 else y  # [T, B, classes] in multi-step mode, [B, classes] in single-step


def small_snn(in_channels: int, num_classes: int, hidden: int = 8) -> SmallSNN:
    return SmallSNN(in_channels, num_classes, hidden)


def grouped_conv(in_channels: int, num_classes: int) -> SmallSNN:
    return SmallSNN(in_channels, num_classes, hidden=8, groups=2)


def qif_neurons(in_channels: int, num_classes: int) -> SmallSNN:
    return SmallSNN(in_channels, num_classes, node=neuron.QIFNode)


def not_a_module(in_channels: int, num_classes: int) -> dict:
    return {"in_channels": in_channels}


def no_mean_over_t(in_channels: int, num_classes: int) -> nn.Module:
    """Returns [T, B, classes]: forgets to average the readout over T."""

    class NoMean(SmallSNN):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.readout(self.body(x))

    return NoMean(in_channels, num_classes)


def no_data_kwargs() -> SmallSNN:
    """Takes neither in_channels nor num_classes: fixed to 1-channel, 10-class inputs."""
    return SmallSNN(1, 10)


NOT_CALLABLE = 42


def analog_head(in_channels: int, num_classes: int) -> SmallSNN:
    """The last conv + BN feeds the readout directly, with no spiking neuron in between."""
    model = SmallSNN(in_channels, num_classes)
    model.body[6] = nn.Identity()
    return model


def summed_readout(in_channels: int, num_classes: int) -> SmallSNN:
    """Sums the readout over the time steps instead of averaging it."""

    class Summed(SmallSNN):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.readout(self.body(x))
            return y.sum(0) if y.dim() == 3 else y

    return Summed(in_channels, num_classes)


def diverging(in_channels: int, num_classes: int) -> SmallSNN:
    """Its logits turn NaN while it trains (as an exploding loss does)."""

    class Diverging(SmallSNN):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = super().forward(x)
            return y * float("nan") if self.training else y

    return Diverging(in_channels, num_classes)


def time_axis_by_hand(in_channels: int, num_classes: int) -> nn.Module:
    """Folds the time axis into the batch by hand with plain torch layers: it cannot run on one step."""

    class ByHand(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(in_channels, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.node, self.fc = neuron.LIFNode(step_mode="m"), nn.Linear(8, num_classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            T, B = x.shape[:2]
            y = self.bn(self.conv(x.flatten(0, 1)))
            s = self.node(y.view(T, B, *y.shape[1:]))
            return self.fc(s.mean((3, 4))).mean(0)

    return ByHand()
