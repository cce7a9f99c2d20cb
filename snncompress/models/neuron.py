"""Spiking neurons from the recipe's neuron section."""

from __future__ import annotations

import torch.nn as nn
from spikingjelly.activation_based import neuron, surrogate

SURROGATES = {"atan": surrogate.ATan, "sigmoid": surrogate.Sigmoid}


def make_neuron(type: str = "lif", tau: float = 2.0, v_threshold: float = 1.0, reset: str = "hard",
                surrogate: str = "atan", alpha: float = 2.0, detach_reset: bool = True) -> nn.Module:
    """A multi-step spikingjelly LIF or IF neuron. ``reset='hard'`` resets to 0, ``'soft'`` subtracts."""
    common = dict(
        v_threshold=v_threshold,
        v_reset=0.0 if reset == "hard" else None,
        surrogate_function=SURROGATES[surrogate](alpha=alpha),
        detach_reset=detach_reset,
        step_mode="m",
    )
    if type == "lif":
        return neuron.LIFNode(tau=tau, **common)
    if type == "if":
        return neuron.IFNode(**common)
    raise ValueError(f"unknown neuron type {type!r}; allowed: lif, if")
