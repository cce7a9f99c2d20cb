"""SynSense Speck / DYNAP-CNN: 9 convolutional cores, each ``conv -> integrate-and-fire -> sum pooling``.

Every figure is sinabs's (SynSense's own PyTorch library; its mapper needs SynSense's ``samna``, which this
machine cannot install, so the check re-states its rules rather than calling it):

- per-core limits: sinabs ``synsense/sinabs: docs/speck/overview.md``, "DYNAP-CNN Layer / Feature": input map <= 128x128,
  output map <= 64x64, <= 1024 channels, 8-bit weights, kernel <= 16x16, stride 1/2/4/8, padding 0-7, sum
  pooling 1x1/2x2/4x4, fan-out 2; square kernels and pools (``config_builder`` and ``DynapcnnLayer`` refuse
  others); integrate-and-fire neurons only (``synsense/sinabs: docs/speck/faqs/available_algorithmic_operation.md``);
- memory per core (``backend/dynapcnn/chips/dynapcnn.py``, ``get_constraints``): kernel memory 16, 16, 16, 32,
  32, 64, 64, 16, 16 Ki entries; neuron memory 64, 64, 64, 32, 32, 16, 16, 16, 16 Ki; 1024 biases;
- what a layer needs (``DynapcnnLayer.memory_summary``): kernel ``c * 2^(ceil(log2(kx*ky)) + ceil(log2 f))``
  entries (the address encoding rounds both up to powers of two), neuron ``f * 2^(ceil(log2 fy) +
  ceil(log2 fx))`` (the overview's text gives ``f * fx * fy``; the code, which the mapper uses, rounds up);
  biases ``f``;
- the placement (``mapping.py``, ``get_valid_mapping``): every layer on a core of its own whose three memories
  it fits, found as a maximum bipartite matching.

An affine (linear) layer is the conv over its whole input map, as sinabs converts it.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import linear_sum_assignment

from ..registry import register_target
from .base import CoreLayer, Target, TargetReport

KI = 1024
KERNEL_MEMORY = [16 * KI, 16 * KI, 16 * KI, 32 * KI, 32 * KI, 64 * KI, 64 * KI, 16 * KI, 16 * KI]
NEURON_MEMORY = [64 * KI, 64 * KI, 64 * KI, 32 * KI, 32 * KI, 16 * KI, 16 * KI, 16 * KI, 16 * KI]
BIAS_MEMORY = 1024
MAX_CHANNELS, MAX_KERNEL, MAX_PADDING, MAX_IN, MAX_OUT, FANOUT = 1024, 16, 7, 128, 64, 2
STRIDES, POOLS, WEIGHT_BITS = (1, 2, 4, 8), (1, 2, 4), 8


def _log2_up(n: int) -> int:
    return math.ceil(math.log2(n)) if n > 1 else 0


def kernel_memory(c: int, f: int, kx: int, ky: int) -> int:
    """Kernel-memory entries of a conv with ``c`` inputs, ``f`` outputs and a ``kx`` x ``ky`` kernel."""
    return c * 2 ** (_log2_up(kx * ky) + _log2_up(f))


def neuron_memory(f: int, fx: int, fy: int) -> int:
    """Neuron-memory entries of ``f`` output maps of ``fx`` x ``fy``."""
    return f * 2 ** (_log2_up(fy) + _log2_up(fx))


def place(needs: list[tuple[int, int, int]]) -> list[int] | None:
    """A core for every layer (``needs``: kernel, neuron and bias entries), each core used once and every layer
    within its core's memories; None when there is none."""
    if len(needs) > len(KERNEL_MEMORY):
        return None
    fits = np.array([[k <= KERNEL_MEMORY[j] and n <= NEURON_MEMORY[j] and b <= BIAS_MEMORY
                      for j in range(len(KERNEL_MEMORY))] for k, n, b in needs], dtype=float)
    rows, cols = linear_sum_assignment(fits, maximize=True)  # a maximum matching of layers to cores
    if fits[rows, cols].sum() < len(needs):
        return None
    return [int(c) for _, c in sorted(zip(rows, cols))]


@register_target("speck")
class Speck(Target):
    name = "speck"
    source = "sinabs (SynSense) DYNAP-CNN backend: synsense/sinabs: docs/speck/overview.md, sinabs/backend/dynapcnn/chips/dynapcnn.py, dynapcnn_layer.py"

    def check(self, layers: list[CoreLayer], metadata: dict[str, str]) -> TargetReport:
        bad: list[str] = []
        notes: list[str] = []

        def over(layer: CoreLayer, what: str, value, limit: str) -> None:
            bad.append(f"{layer.name}: {what} {value} (speck: {limit})")

        for lay in layers:
            kx, ky = lay.kernel[1], lay.kernel[0]
            if lay.c > MAX_CHANNELS:
                over(lay, "input channels", lay.c, f"at most {MAX_CHANNELS}")
            if lay.f > MAX_CHANNELS:
                over(lay, "output channels", lay.f, f"at most {MAX_CHANNELS}")
            if kx != ky:
                over(lay, "kernel", f"{ky}x{kx}", "square kernels only")
            if max(kx, ky) > MAX_KERNEL:
                over(lay, "kernel", f"{ky}x{kx}", f"at most {MAX_KERNEL}x{MAX_KERNEL}")
            if any(s not in STRIDES for s in lay.stride):
                over(lay, "stride", "x".join(map(str, lay.stride)), "1, 2, 4 or 8")
            if max(lay.padding) > MAX_PADDING:
                over(lay, "padding", "x".join(map(str, lay.padding)), f"0 to {MAX_PADDING}")
            if lay.dilation != (1, 1) or lay.groups != 1:
                over(lay, "dilation/groups", f"{lay.dilation}/{lay.groups}", "plain convolutions only")
            if max(lay.in_hw) > MAX_IN:
                over(lay, "input map", "x".join(map(str, lay.in_hw)), f"at most {MAX_IN}x{MAX_IN}")
            if max(lay.out_hw) > MAX_OUT:
                over(lay, "output map", "x".join(map(str, lay.out_hw)), f"at most {MAX_OUT}x{MAX_OUT}")
            if lay.neuron is None:
                notes.append(f"{lay.name}: no spiking neuron after it (the readout): on the chip it needs "
                             "integrate-and-fire neurons whose spikes are counted")
            elif lay.neuron != "IF":
                over(lay, "neuron", lay.neuron, "integrate-and-fire (IF) neurons only: model.neuron.type: if")
            if lay.pool_before_neuron:
                over(lay, "pooling", "before its neuron", "conv, then neuron, then pooling")
            if len(lay.pools) > 1:
                over(lay, "poolings", len(lay.pools), "one sum pooling per core")
            for k, st in lay.pools:
                if k != st or k[0] != k[1] or k[0] not in POOLS:
                    over(lay, "pooling", f"{k[0]}x{k[1]} stride {st[0]}", "square sum pooling 1, 2 or 4, stride = size")
            if len(lay.destinations) > FANOUT:
                over(lay, "fan-out", len(lay.destinations), f"at most {FANOUT} destination cores")
        bits = metadata.get("weight_bits")
        if bits is None:
            notes.append("weights are floating point: sinabs discretises them to 8-bit integers when it converts "
                         "the network")
        elif not bits.isdigit() or int(bits) > WEIGHT_BITS:
            bad.append(f"weights: {bits} bits (speck: at most {WEIGHT_BITS})")
        needs = [(kernel_memory(x.c, x.f, x.kernel[1], x.kernel[0]), neuron_memory(x.f, x.out_hw[1], x.out_hw[0]), x.f)
                 for x in layers]
        cores = place(needs)
        if len(layers) > len(KERNEL_MEMORY):
            bad.append(f"model: {len(layers)} weighted layers (speck: {len(KERNEL_MEMORY)} cores, one layer each)")
        elif cores is None:
            fit = [[j for j in range(len(KERNEL_MEMORY)) if k <= KERNEL_MEMORY[j] and n <= NEURON_MEMORY[j]
                    and b <= BIAS_MEMORY] for k, n, b in needs]
            for lay, (k, n, _), cores_fit in zip(layers, needs, fit):
                if cores_fit:
                    continue
                if k > max(KERNEL_MEMORY):
                    over(lay, "kernel memory", f"{k:,} entries", f"at most {max(KERNEL_MEMORY):,} on a core")
                if n > max(NEURON_MEMORY):
                    over(lay, "neuron memory", f"{n:,} entries", f"at most {max(NEURON_MEMORY):,} on a core")
                if k <= max(KERNEL_MEMORY) and n <= max(NEURON_MEMORY):
                    over(lay, "kernel and neuron memory", f"{k:,} and {n:,} entries",
                         "no core has both: the cores with 64 Ki kernel entries have 16 Ki neuron entries")
            if all(fit):
                bad.append("model: no placement gives every layer a core of its own that holds its memories "
                           "(cores each layer fits: " + "; ".join(f"{x.name} {f}" for x, f in zip(layers, fit)) + ")")

        def use(v: int, mem: list[int], core: int | None) -> str:
            return f"{v:,}" if core is None else f"{v:,} / {mem[core] // KI} Ki ({v / mem[core]:.0%})"

        header = ["layer", "core", "in x out ch", "kernel", "out map", "pool", "kernel memory", "neuron memory"]
        rows = []
        for i, (lay, (k, n, _)) in enumerate(zip(layers, needs)):
            core = None if cores is None else cores[i]
            rows.append([lay.name, "-" if core is None else str(core), f"{lay.c} x {lay.f}",
                         f"{lay.kernel[0]}x{lay.kernel[1]}", f"{lay.out_hw[0]}x{lay.out_hw[1]}",
                         ",".join(f"{pk[0]}x{pk[1]}" for pk, _ in lay.pools) or "-",
                         use(k, KERNEL_MEMORY, core), use(n, NEURON_MEMORY, core)])
        return TargetReport(self.name, bad, header, rows, notes)
