"""What a model costs: parameters, dense MACs, SOPs and analog MACs (spikingjelly's op_counter, extended to
count through non-zero weights only), firing rates, and the energy estimate built from them."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from spikingjelly.activation_based import functional
from spikingjelly.activation_based.neuron import BaseNode
from spikingjelly.activation_based.op_counter import DispatchCounterMode, MACCounter, SynOpCounter
from spikingjelly.activation_based.op_counter.ac import _spike_nnz
from spikingjelly.activation_based.op_counter.mac import _is_spike
from torch.utils.flop_counter import FlopCounterMode

from .data import eval_batches, to_steps

PJ_PER_MAC = 4.6  # 45 nm, Horowitz ISSCC 2014
PJ_PER_AC = 0.9


def count_params(model: nn.Module) -> int:
    """Parameters that do work at inference (gates excluded: they are masks)."""
    return sum(p.numel() for n, p in model.named_parameters() if not n.endswith(".gate"))


@torch.no_grad()
def count_macs(model: nn.Module, x_seq: torch.Tensor) -> int:
    """Dense multiply-accumulates of one inference (all T steps, batch 1) as counted by torch."""
    with FlopCounterMode(display=False) as fc:
        model(x_seq[:, :1])
    functional.reset_net(model)
    return fc.get_total_flops() // 2


def _nonzero(t: torch.Tensor) -> torch.Tensor:
    return (t != 0).double()


def _uncounted(fn, *args):
    """Run an aten op outside the counting dispatch mode (as spikingjelly's own rules do)."""
    with torch.no_grad(), torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(torch._C.DispatchKey.Python)):
        return fn(*args)


def _nz_convolution(args, kwargs, out) -> int:
    x, w, _, stride, padding, dilation, transposed, output_padding, groups = args[:9]
    if _spike_nnz(x) is None:
        return 0
    # every output element sums the input spikes under the non-zero taps: the accumulations actually made
    res = _uncounted(torch.ops.aten.convolution.default, x.double(), _nonzero(w), None, stride, padding, dilation,
                     transposed, output_padding, groups)
    return int(res.sum().item())


def _nz_mm(x: torch.Tensor, y: torch.Tensor) -> int:
    if _spike_nnz(x) is not None:
        return int(_uncounted(torch.ops.aten.mm.default, x.double(), _nonzero(y)).sum().item())
    if _spike_nnz(y) is not None:
        return int(_uncounted(torch.ops.aten.mm.default, _nonzero(x), y.double()).sum().item())
    return 0


class NonzeroSynOpCounter(SynOpCounter):
    """spikingjelly's :class:`SynOpCounter` restricted to non-zero weights (unstructured sparsity).

    For a spike input, SynOpCounter counts every weight a spike fans out to (border-aware); this counter
    counts only the non-zero ones: ``sum(conv(spikes, W != 0))`` for convolutions, ``sum(spikes @ (W != 0))``
    for ``mm`` / ``addmm`` (linear layers); other ops keep SynOpCounter's rules. With no zero weight the two
    agree exactly.
    """

    def __init__(self, extra_ignore_modules: list[type[nn.Module]] | None = None):
        super().__init__(extra_ignore_modules=extra_ignore_modules)
        self.rules.update({
            torch.ops.aten.convolution.default: _nz_convolution,
            torch.ops.aten.mm.default: lambda args, kwargs, out: _nz_mm(args[0], args[1]),
            torch.ops.aten.addmm.default: lambda args, kwargs, out: _nz_mm(args[1], args[2]),
        })


def _nz_mac_convolution(args, kwargs, out) -> int:
    x, w, transposed = args[0], args[1], args[6]
    if _is_spike(x) or _is_spike(w):
        return 0
    return int(w.count_nonzero()) * math.prod(x.shape[2:] if transposed else out.shape[2:]) * x.shape[0]


def _nz_mac_mm(x: torch.Tensor, w: torch.Tensor) -> int:
    return 0 if _is_spike(x) or _is_spike(w) else int(w.count_nonzero()) * x.shape[0]


class NonzeroMACCounter(MACCounter):
    """spikingjelly's :class:`MACCounter` (MACs on analog, non-spike inputs) restricted to non-zero
    weights: a conv makes ``nonzero(W) x output positions`` multiply-accumulates (border taps counted as
    MACCounter counts them), a linear layer ``nonzero(W) x rows``. With no zero weight the two agree."""

    def __init__(self, extra_ignore_modules: list[type[nn.Module]] | None = None):
        super().__init__(extra_ignore_modules=extra_ignore_modules)
        self.rules.update({
            torch.ops.aten.convolution.default: _nz_mac_convolution,
            torch.ops.aten.mm.default: lambda args, kwargs, out: _nz_mac_mm(args[0], args[1]),
            torch.ops.aten.addmm.default: lambda args, kwargs, out: _nz_mac_mm(args[1], args[2]),
        })


def weight_counts(model: nn.Module) -> dict:
    """Conv + linear weights: total, non-zero, and ``connectivity`` = non-zero / total."""
    ws = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    total = sum(w.numel() for w in ws)
    nonzero = sum(int(w.count_nonzero()) for w in ws)
    return {"weights": total, "nonzero_weights": nonzero, "connectivity": nonzero / max(1, total)}


@torch.no_grad()
def spike_stats(model: nn.Module, x: torch.Tensor, T: int, encoding: str, batch_size: int = 32) -> dict:
    """SOPs (all weights, and through non-zero weights only) and analog MACs per inference (op_counter),
    and firing rates, over samples ``x``. Also per layer: SOPs of every conv/linear layer and the
    firing rate of every spiking neuron.
    """
    synops, macs = SynOpCounter(), MACCounter(extra_ignore_modules=[nn.BatchNorm2d])  # BN folds at deployment
    effective, macs_nz = NonzeroSynOpCounter(), NonzeroMACCounter(extra_ignore_modules=[nn.BatchNorm2d])
    fired: dict[str, float] = {}
    seen: dict[str, int] = {}

    def hook(name):
        def fn(module, args, out):
            fired[name] = fired.get(name, 0.0) + float(out.sum())
            seen[name] = seen.get(name, 0) + out.numel()
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, BaseNode)]
    model.eval()
    try:
        for inp in eval_batches(x, T, encoding, batch_size):
            with DispatchCounterMode([synops, macs, effective, macs_nz]):
                model(to_steps(inp, T, encoding))
            functional.reset_net(model)
    finally:
        for h in handles:
            h.remove()
    n = len(x)
    sops, analog, sops_nz = synops.get_total() / n, macs.get_total() / n, effective.get_total() / n
    analog_nz = macs_nz.get_total() / n
    # op_counter scopes are "<RootClass>.<module name>"
    root = type(model).__name__ + "."
    counts = {k.removeprefix(root): sum(v.values()) for k, v in synops.get_counts().items()}
    layers = [name for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return {"sops": sops, "sops_effective": sops_nz, "macs_analog": analog, "macs_analog_effective": analog_nz,
            "firing_rate": sum(fired.values()) / max(1, sum(seen.values())),
            "neurons": round(sum(seen.values()) / max(1, n * T)),  # spiking neurons (outputs per step)
            "energy_uj": (analog * PJ_PER_MAC + sops * PJ_PER_AC) * 1e-6,
            "energy_uj_effective": (analog_nz * PJ_PER_MAC + sops_nz * PJ_PER_AC) * 1e-6,
            "per_layer": {"sops": {name: counts.get(name, 0) / n for name in layers},
                          "firing_rate": {name: fired[name] / max(1, seen[name]) for name in fired}}}
