"""Quantisation-aware training of the deployed weights (``quant:`` in a recipe).

The weights a chip or an integer runtime holds are those of the deployed network: BatchNorm folded into the conv
before it (``w * gamma / sqrt(running_var + eps)``, one scale per output channel). So each conv and linear weight
is trained through a parametrization (:func:`torch.nn.utils.parametrize`) that quantises exactly that folded
weight, symmetrically to ``bits``-bit integers (one scale per output channel or per tensor, the scale from the
largest magnitude), and divides the BatchNorm scale back out: the network computes with the weights it will be
deployed with, and the gradient passes straight through the rounding (the straight-through estimator). In eval
mode the conv and BatchNorm then compute exactly the folded network whose weights are ``q * scale``.

Hand-written rather than ``torch.ao.quantization``: its QAT modules quantise activations too (spikes need no
quantiser: they are 0 or 1) and its ``ConvBn2d`` fusion does not know spikingjelly's multi-step layers.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from .config import QuantWeightsCfg
from .prune.gates import single_step_forward


def quantize(w: torch.Tensor, bits: int, granularity: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)`` with ``q`` integers in ``[-(2^(bits-1) - 1), 2^(bits-1) - 1]`` (as floats) and ``w ≈ q *
    scale``: one scale per output channel (dim 0) or one for the tensor, ``max|w| / qmax`` (1 where all are 0)."""
    qmax = 2 ** (bits - 1) - 1
    if granularity == "channel":
        amax = w.abs().amax(dim=tuple(range(1, w.dim())), keepdim=True)
    else:
        amax = w.abs().amax()
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    return torch.clamp(torch.round(w / scale), -qmax, qmax), scale


def bn_scale(bn: nn.BatchNorm2d) -> torch.Tensor:
    """What folding ``bn`` multiplies its conv's output channels by: ``gamma / sqrt(running_var + eps)``."""
    return bn.weight / torch.sqrt(bn.running_var + bn.eps)


class FakeQuant(nn.Module):
    """A weight's parametrization: the weight the deployed network holds (BatchNorm ``bn`` folded, if given)
    quantised to ``bits`` bits, its BatchNorm scale divided back out; the gradient is the identity."""

    def __init__(self, bits: int, granularity: str, bn: nn.BatchNorm2d | None = None):
        super().__init__()
        self.bits, self.granularity = bits, granularity
        self._bn = (bn,) if bn is not None else ()  # a tuple: the BatchNorm stays the model's module, not ours

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            s = torch.ones(()) if not self._bn else bn_scale(self._bn[0]).view(-1, *([1] * (w.dim() - 1)))
            s = torch.where(s == 0, torch.ones_like(s), s)  # gamma 0: the channel is beta whatever its weights
            q, scale = quantize(w * s, self.bits, self.granularity)
            deployed = q * scale / s
        return w + (deployed - w).detach()


def conv_bn_pairs(model: nn.Module, example: torch.Tensor) -> list[tuple[str, str]]:
    """``(conv, batchnorm)`` names of every BatchNorm that directly consumes a conv's output, found by tracing one
    single-step forward of ``example`` (``[T, B, ...]``) in eval mode (the model's mode and state are restored)."""
    from spikingjelly.activation_based import functional

    outputs: dict[int, tuple[str, torch.Tensor]] = {}  # tensors kept alive so that ids are not reused
    pairs: list[tuple[str, str]] = []
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    bns = {n: m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    handles = [m.register_forward_hook(lambda mod, a, out, n=n: outputs.__setitem__(id(out), (n, out)))
               for n, m in convs.items()]
    handles += [m.register_forward_pre_hook(lambda mod, a, n=n: pairs.append((outputs[id(a[0])][0], n))
                                            if id(a[0]) in outputs else None) for n, m in bns.items()]
    training = model.training
    try:
        with torch.no_grad():
            single_step_forward(model.eval(), example)
    finally:
        for h in handles:
            h.remove()
        model.train(training)
        functional.reset_net(model)
    return pairs


def attach_fake_quant(model: nn.Module, example: torch.Tensor, cfg: QuantWeightsCfg) -> None:
    """Train ``model``'s conv and linear weights quantised as ``cfg`` says (in place; the weights stay the same
    Parameter objects, so an optimiser keeps its state). Its state dict then names them
    ``...parametrizations.weight.original``: :func:`plain_state_dict` gives the usual names."""
    if is_fake_quant(model):
        return
    example = example.to(next(model.parameters()).device)
    bn_of = {conv: model.get_submodule(bn) for conv, bn in conv_bn_pairs(model, example)}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            parametrize.register_parametrization(m, "weight", FakeQuant(cfg.bits, cfg.granularity, bn_of.get(name)),
                                                 unsafe=True)


def detach_fake_quant(model: nn.Module, bake: bool = False) -> None:
    """Remove the parametrizations (in place): the weights become the trained float weights again, or with
    ``bake`` the quantised weights the network computes with (for inference and export)."""
    for m in model.modules():
        if parametrize.is_parametrized(m, "weight"):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=bake)


def is_fake_quant(model: nn.Module) -> bool:
    return any(parametrize.is_parametrized(m, "weight") for m in model.modules())


_ORIGINAL = "parametrizations.weight.original"


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with a parametrized weight under its own name (the trained float weight)."""
    return {k.replace(_ORIGINAL, "weight"): v for k, v in model.state_dict().items()}


def load_plain_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """``model.load_state_dict`` of a :func:`plain_state_dict`, whether or not ``model``'s weights are parametrized."""
    own = {k.replace(_ORIGINAL, "weight"): k for k in model.state_dict()}
    model.load_state_dict({own.get(k, k): v for k, v in state.items()})
