"""The spiking neuron of the registered models (their ``neuron`` option)."""

from __future__ import annotations

from typing import Literal

import torch.nn as nn
from spikingjelly.activation_based import neuron, surrogate

from ..schema import AboveOne, Positive, Section

SURROGATES = {"atan": surrogate.ATan, "sigmoid": surrogate.Sigmoid}


class NeuronCfg(Section):
    """The spiking neuron that follows every conv + BN (``model.neuron`` of a registered model)."""

    type: Literal["lif", "if"] = "lif"
    tau: AboveOne = 2.0
    v_threshold: Positive = 1.0
    reset: Literal["hard", "soft"] = "hard"  # hard: to 0; soft: subtract the threshold
    surrogate: Literal["atan", "sigmoid"] = "atan"
    alpha: Positive = 2.0
    detach_reset: bool = True


def make_neuron(cfg: NeuronCfg | dict | None = None) -> nn.Module:
    """A multi-step spikingjelly LIF or IF neuron (``cfg``: a :class:`NeuronCfg` or its fields as a dict)."""
    c = cfg if isinstance(cfg, NeuronCfg) else NeuronCfg.model_validate(cfg or {})
    common = dict(
        v_threshold=c.v_threshold,
        v_reset=0.0 if c.reset == "hard" else None,
        surrogate_function=SURROGATES[c.surrogate](alpha=c.alpha),
        detach_reset=c.detach_reset,
        step_mode="m",
    )
    return neuron.LIFNode(tau=c.tau, **common) if c.type == "lif" else neuron.IFNode(**common)
