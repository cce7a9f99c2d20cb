"""What a channel costs in the unit of a budget (MACs, SOPs or latency), and the selection that keeps the
best-scoring channels under such a budget (docs/methods.md, "Budget units").

Every conv and linear layer ``l`` costs ``f_l(a, b)``: ``b`` is how many of its output channels are kept
(fixed for the classifier), ``a`` the kept part of its input channels (fixed for the image), each input
channel ``i`` weighted by ``w_l[i]``:

- ``macs``: ``f = macs_l * a/n_in * b/n_out`` with ``w = 1``: exact, MACs are bilinear in the two counts.
- ``sops``: ``f = a * b`` with ``w_l[i]`` the synaptic operations per inference that input channel ``i``
  makes on one output channel (its spikes times their border-aware fan-out, as spikingjelly's
  SynOpCounter counts them), measured on the training batches of each update window.
- ``latency``: ``f = T * (c * table_l(a, b) + e * b * P_l)``: a per-layer table of the conv measured on the
  deployment runtime, plus the element-wise work on the layer's ``b * P_l`` outputs (``P_l`` positions;
  the neuron's arithmetic, pooling, layout changes), ``c`` and ``e`` fitted to whole slim networks timed
  on that runtime (``snncompress.latency``).

A channel's marginal cost is then the change of its own layers' ``f`` (its conv's output) plus that of the
layers it feeds (their input): Torch-Pruning's dependency graph says which (``ChannelGroup.consumers``).
The selection is hand-written: Torch-Pruning ranks and prunes by importance but has no budget in MACs,
spikes or measured latency, and no SNN library does.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from ..errors import SnnCompressError
from .gates import ChannelGroup
from .scorer import model_device

COST_UNITS = ("macs", "sops", "latency")


def channel_block() -> int:
    """Output channels per SIMD block of onnxruntime's and OpenVINO's blocked conv layouts on this CPU:
    16 with AVX-512, 8 with AVX2 (NCHWc / nChw8c), 1 elsewhere (no blocked layout to fill).

    Detected from the instruction set PyTorch dispatches to on this machine (``torch.backends.cpu``),
    which both runtimes choose their blocks by as well.
    """
    cap = torch.backends.cpu.get_cpu_capability().upper()
    return 16 if cap.startswith("AVX512") else 8 if cap.startswith("AVX2") else 1


def resolve_round_to(round_to: int | str) -> int:
    """``prune.round_to`` as a number of channels (``auto``: :func:`channel_block`)."""
    return channel_block() if round_to == "auto" else int(round_to)


def ceil_to(n: int, block: int, cap: int) -> int:
    return min(cap, -(-n // block) * block) if n else 0


@dataclass
class Layer:
    """A conv or linear layer as the cost model sees it (sizes of one inference: batch 1, all T steps)."""

    name: str
    kind: str  # "conv" or "linear"
    in_group: str | None  # the channel group its input channels belong to (None: never pruned, e.g. the image)
    out_group: str | None  # the group of its output channels (None: never pruned, e.g. the classifier)
    n_in: int  # input channels (a linear layer after a flatten: the channels of its input, not the features)
    n_out: int
    macs: int  # dense MACs of one inference, as torch's FlopCounterMode counts them
    in_shape: tuple[int, ...]  # one sample's input in one step: (C, H, W) or (features,)
    conv: tuple = ()  # (kernel, stride, padding, dilation) of a conv

    @property
    def out_hw(self) -> tuple[int, int]:
        """Height and width of a conv's output ((1, 1) for a linear layer)."""
        if not self.conv:
            return 1, 1
        (kh, kw), stride, padding, dilation = self.conv
        h, w = self.in_shape[1:]
        return ((h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1,
                (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1)


def model_layers(model: nn.Module, example: torch.Tensor, groups: list[ChannelGroup]) -> list[Layer]:
    """Every conv and linear layer of a multi-step ``model`` with its groups and dense MACs (one forward, batch 1)."""
    out_group = {c: g.name for g in groups for c in g.convs}
    in_group = {c: g.name for g in groups for c in g.consumers}
    sizes = {g.name: g.size for g in groups}
    seen: dict[str, Layer] = {}

    def hook(name):
        def fn(module, args, out):
            x = args[0]
            if isinstance(module, nn.Conv2d):
                k = module.kernel_size[0] * module.kernel_size[1] // module.groups
                macs, shape = out.numel() * module.in_channels * k, tuple(x.shape[-3:])
                n_in, n_out = module.in_channels, module.out_channels
                conv = (module.kernel_size, module.stride, module.padding, module.dilation)
            else:
                macs, shape, conv = out.numel() * module.in_features, (module.in_features,), ()
                n_in, n_out = sizes.get(in_group.get(name), module.in_features), module.out_features
            if name in seen:  # a layer called again (shared) costs again
                seen[name].macs += macs
                return
            seen[name] = Layer(name, "conv" if conv else "linear", in_group.get(name), out_group.get(name),
                               n_in, n_out, macs, shape, conv)
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model(example[:, :1])
    finally:
        for h in handles:
            h.remove()
        from spikingjelly.activation_based import functional
        functional.reset_net(model)
    for layer in seen.values():
        if layer.in_group and layer.kind == "linear" and layer.in_shape[0] % layer.n_in:
            raise SnnCompressError(f"{layer.name}: {layer.in_shape[0]} input features are not a whole number of "
                                   f"channels of {layer.in_group} ({layer.n_in}); budgets in MACs, SOPs or latency "
                                   "need a flatten of whole channels")
    return list(seen.values())


class LatencyTable:
    """Milliseconds of one layer in one time step, measured at a grid of (input, output) channel counts.

    Runtimes compute a conv's channels in whole blocks (docs/methods.md, "Channel blocks"), so a count is
    first rounded up to the block it was measured with; between grid points the time is interpolated
    bilinearly. (Read at the true counts from a grid that starts at 1 channel, the slim models ran at
    1.5-2.4x their latency targets: a conv of 1 channel is no guide to one of 8.)
    """

    def __init__(self, grid_in: list[int], grid_out: list[int], ms: list[list[float]], block: int):
        self.grid_in, self.grid_out, self.ms, self.block = grid_in, grid_out, ms, block

    def __call__(self, a: float, b: float) -> float:
        if a <= 0 or b <= 0:
            return 0.0
        i, wi = self._locate(self.grid_in, a)
        j, wj = self._locate(self.grid_out, b)
        m, i1, j1 = self.ms, min(i + 1, len(self.grid_in) - 1), min(j + 1, len(self.grid_out) - 1)
        return (1 - wi) * ((1 - wj) * m[i][j] + wj * m[i][j1]) + wi * ((1 - wj) * m[i1][j] + wj * m[i1][j1])

    def rounded(self, n: float) -> int:
        """``n`` channels as the runtime computes them: rounded up to whole blocks."""
        return math.ceil(n / self.block - 1e-9) * self.block

    def _locate(self, grid: list[int], n: float) -> tuple[int, float]:
        """(index, weight) of ``n`` (rounded up to the block) between two grid points (clamped to the grid)."""
        n = min(grid[-1], max(grid[0], self.rounded(n)))
        if len(grid) == 1:
            return 0, 0.0
        k = min(len(grid) - 2, max(0, bisect.bisect_right(grid, n) - 1))
        return k, (n - grid[k]) / (grid[k + 1] - grid[k])

    def to_dict(self) -> dict:
        return {"grid_in": self.grid_in, "grid_out": self.grid_out, "ms": self.ms, "block": self.block}


def latency_terms(lay: Layer, table: LatencyTable, a: float, b: float, T: int) -> tuple[float, float]:
    """(ms of ``lay``'s table, elements it outputs) over all ``T`` steps with ``a`` input and ``b`` output
    channels: the two terms a latency cost weighs (``CostModel.set_latency``)."""
    h, w = lay.out_hw
    return T * table(a, b), T * table.rounded(b) * h * w


def table_grid(size: int, block: int, points: int = 8) -> list[int]:
    """Channel counts a latency table is measured at: block multiples, dense at small counts (where
    rounding matters most), about geometric above, always including ``size``; at most ``points``."""
    grid, n = set(), max(1, block)
    while n < size:
        grid.add(n)
        n = max(n + block, ceil_to(int(n * 1.6), block, size))
    grid.add(size)
    grid = sorted(grid)
    while len(grid) > points:  # thin the large end, never the first points or the size
        grid.pop(len(grid) - 2)
    return grid


class CostModel:
    """Cost of channel masks in one unit (see the module docstring); owns the SOP statistics it measures."""

    def __init__(self, unit: str, layers: list[Layer], groups: list[ChannelGroup], T: int, round_to: int = 1):
        if unit not in COST_UNITS:
            raise ValueError(f"unknown cost unit {unit!r}; allowed: {', '.join(COST_UNITS)}")
        self.unit, self.layers, self.T, self.round_to = unit, layers, T, round_to
        self.sizes = {g.name: g.size for g in groups}
        # input weights per layer: 1 per channel for MACs and latency; measured SOPs for sops
        self.weights = {lay.name: torch.ones(lay.n_in, dtype=torch.float64) for lay in layers}
        self.touching = {g: [i for i, lay in enumerate(layers) if g in (lay.in_group, lay.out_group)]
                         for g in self.sizes}
        self.tables: dict[str, LatencyTable] = {}
        self.scale, self.elem = 1.0, 0.0  # latency: weights of the tables and of the outputs (see set_latency)
        self.dense = float("nan") if unit != "macs" else float(sum(lay.macs for lay in layers))
        self._meter: SopMeter | None = None

    # --- measurement -------------------------------------------------------------------------------

    @property
    def needs_table(self) -> bool:
        return self.unit == "latency" and not self.tables

    def set_latency(self, tables: dict[str, LatencyTable], dense_ms: float, scale: float, elem: float) -> None:
        """Use measured per-layer tables: a network costs ``scale`` times the sum of its layers' tables plus
        ``elem`` ms per element its layers output in one step, of ``dense_ms`` for the dense network.

        ``scale`` and ``elem`` are fitted to whole slim networks (``snncompress.latency``): the tables time
        each conv with a spike, but the network also runs the rest of each neuron's update, pooling and
        layout changes, which grow with a layer's outputs, not with its inputs times its outputs. Spread
        over the tables in proportion instead, the slim networks of the quickstart VGG were predicted
        0.73-0.93 of their time; with a fixed overhead, 1.2-1.9x."""
        self.tables, self.dense, self.scale, self.elem = tables, dense_ms, scale, elem

    def attach(self, model: nn.Module) -> None:
        """SOPs: hook the layers to count the spikes reaching them (only while :meth:`activate` is on)."""
        if self.unit == "sops" and self._meter is None:
            self._meter = SopMeter(model, self.layers, self.T)

    def activate(self, on: bool) -> None:
        if self._meter is not None:
            self._meter.active = on

    def statistics(self) -> list[torch.Tensor]:
        return self._meter.tensors() if self._meter is not None else []

    def hold(self, masks: dict[str, torch.Tensor] | None) -> None:
        """SOPs: measure every training batch's SOPs under ``masks`` differentiably from now on
        (:meth:`batch_sops`); None stops."""
        if self._meter is None:
            return
        self._meter.batch = None
        self._meter.outputs = None if masks is None else {
            lay.name: (lay.n_out if lay.out_group is None else int(masks[lay.out_group].sum()))
            * bool(self.weights[lay.name].sum() > 0) for lay in self.layers}

    def batch_sops(self) -> torch.Tensor | None:
        """The SOPs per inference of the last training batch while holding (then forgotten), else None."""
        if self._meter is None:
            return None
        sops, self._meter.batch = self._meter.batch, None
        return sops

    def absorb(self, masks: dict[str, torch.Tensor]) -> None:
        """At an update: take the window's SOP measurements for the input channels that were open in it
        (a closed channel fires nothing; it keeps the weight it had when last open), then reset the sums.
        The dense reference is fixed at the first update, when every channel was open."""
        if self._meter is None:
            return
        measured = self._meter.per_inference()
        for lay in self.layers:
            w = measured[lay.name]
            if lay.in_group is None:
                self.weights[lay.name] = w
            else:
                open_ = masks[lay.in_group]
                self.weights[lay.name] = torch.where(open_, w, self.weights[lay.name])
        self._meter.reset()
        if math.isnan(self.dense):
            self.dense = self.dense_cost()

    def remove(self) -> None:
        if self._meter is not None:
            self._meter.remove()
            self._meter = None

    # --- cost --------------------------------------------------------------------------------------

    def layer_cost(self, lay: Layer, a: float, b: float) -> float:
        if self.unit == "macs":
            return lay.macs * (a / lay.n_in) * (b / lay.n_out)
        if self.unit == "sops":
            return a * b
        ms, elements = latency_terms(lay, self.tables[lay.name], a, b, self.T)
        return self.scale * ms + self.elem * elements

    def dense_cost(self) -> float:
        """Cost with every channel kept."""
        return self.cost({g: torch.ones(n, dtype=torch.bool) for g, n in self.sizes.items()})

    def cost(self, masks: dict[str, torch.Tensor]) -> float:
        """Cost of ``masks`` in the unit (kept counts rounded up to ``round_to`` as selection rounds them)."""
        return _Selection(self, masks).total()

    def state_dict(self) -> dict:
        return {"weights": {n: w.clone() for n, w in self.weights.items()}, "dense": self.dense,
                "scale": self.scale, "elem": self.elem, "tables": {n: t.to_dict() for n, t in self.tables.items()},
                "meter": self._meter.state_dict() if self._meter is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.weights = {n: w.clone() for n, w in state["weights"].items()}
        self.dense, self.scale, self.elem = state["dense"], state["scale"], state.get("elem", 0.0)
        self.tables = {n: LatencyTable(**t) for n, t in state["tables"].items()}
        if self._meter is not None and state["meter"] is not None:
            self._meter.load_state_dict(state["meter"])

    # --- selection ---------------------------------------------------------------------------------

    def ramp_budget(self, pick: Callable[[float], dict[str, torch.Tensor]], final: float,
                    scores: dict[str, torch.Tensor], remaining: float) -> float:
        """The budget of an update with ``remaining`` of the ramp still to go (1 dense, 0 at its end, where
        it is ``final``).

        The ramp schedules channels and the budget is what they cost: if the selection at ``final`` keeps
        ``n`` of the ``N`` channels, this update's budget is the cost of the method's selection of
        ``n + (N - n) * remaining`` channels. Ramped in the unit itself, the cubic ramp would remove few
        channels early and most in the last updates, since cost falls faster than channels (MACs about
        with their square): on MNIST-5k that cost 0.7 points of accuracy at the same final MACs
        (benchmarks/results/budget_accuracy.md).
        """
        if remaining <= 0:
            return final
        n, total = _kept(self.select(pick, final, scores)), sum(self.sizes.values())
        now = n + (total - n) * remaining
        return max(final, self.cost(pick(_largest(pick, lambda m: _kept(m) <= now + 1e-9))))

    def select(self, pick: Callable[[float], dict[str, torch.Tensor]], budget: float,
               scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Keep-masks that cost at most ``budget`` (each group's count rounded up to ``round_to``).

        ``pick(x)`` is the selection of the channel budget at scale ``x`` (a kept fraction of the channels,
        or the PQ shares' factor; its masks grow with ``x``): the largest ``x`` whose masks fit is found by
        bisection, so the channels kept are those the method's own ranking keeps first. What is left of the
        budget then goes to the best-scoring channels that still fit, in decreasing score: one that does
        not fit is passed over, and cheaper ones after it may still fit. A channel that costs nothing more
        (it fills a channel block the runtime computes anyway) is always kept.
        """
        sel = _Selection(self, pick(_largest(pick, lambda m: self.cost(m) <= budget + 1e-9 * abs(budget))))
        for g, i in _ranked(scores, sel.masks):
            total, now = sel.total_if(g, i), sel.total()
            if total <= budget + 1e-9 * abs(budget) or total <= now + 1e-12 * abs(now):
                sel.add(g, i)
        return sel.masks


def _largest(pick: Callable[[float], dict[str, torch.Tensor]], fits: Callable[[dict], bool]) -> float:
    """The largest scale ``x`` whose ``pick(x)`` fits (by bisection; the masks grow with ``x``)."""
    lo, hi = 0.0, 1.0
    while fits(masks := pick(hi)) and not all(bool(m.all()) for m in masks.values()):
        lo, hi = hi, hi * 2
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fits(pick(mid)) else (lo, mid)
    return lo


def _kept(masks: dict[str, torch.Tensor]) -> int:
    return sum(int(m.sum()) for m in masks.values())


def _ranked(signal: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> list[tuple[str, int]]:
    """(group, channel) of the channels not yet kept, by decreasing signal (ties: earlier group, lower index)."""
    names = list(signal)
    flat = torch.cat([signal[n].double().flatten().masked_fill(masks[n], -math.inf) for n in names])
    where = [(n, i) for n in names for i in range(signal[n].numel())]
    order = torch.sort(flat, descending=True, stable=True).indices.tolist()
    return [where[k] for k in order if flat[k] != -math.inf]


class _Selection:
    """Masks under construction with their cost kept up to date layer by layer (adds are O(layers touched))."""

    def __init__(self, model: CostModel, masks: dict[str, torch.Tensor]):
        self.m, self.masks = model, {g: m.clone() for g, m in masks.items()}
        self.counts = {g: int(m.sum()) for g, m in self.masks.items()}
        self.wsum = [float(model.weights[lay.name][self.masks[lay.in_group]].sum()) if lay.in_group
                     else float(model.weights[lay.name].sum()) for lay in model.layers]
        self.costs = [self._layer(k) for k in range(len(model.layers))]

    def _a(self, k: int, counts: dict[str, int], wsum: float) -> float:
        lay = self.m.layers[k]
        if lay.in_group is None:
            return wsum
        g = lay.in_group
        n, size = counts[g], self.m.sizes[g]
        extra = ceil_to(n, self.m.round_to, size) - n
        if not extra:
            return wsum
        w = self.m.weights[lay.name]
        # the channels rounding adds are not chosen yet: each counts at the mean weight of the closed ones
        return wsum + extra * (float(w.sum()) - wsum) / (size - n)

    def _b(self, k: int, counts: dict[str, int]) -> float:
        lay = self.m.layers[k]
        return lay.n_out if lay.out_group is None else ceil_to(counts[lay.out_group], self.m.round_to, lay.n_out)

    def _layer(self, k: int, counts: dict[str, int] | None = None, wsum: float | None = None) -> float:
        counts = self.counts if counts is None else counts
        wsum = self.wsum[k] if wsum is None else wsum
        return self.m.layer_cost(self.m.layers[k], self._a(k, counts, wsum), self._b(k, counts))

    def total(self) -> float:
        return sum(self.costs)

    def _changes(self, g: str, i: int) -> list[tuple[int, float, float]]:
        counts = {**self.counts, g: self.counts[g] + 1}
        out = []
        for k in self.m.touching[g]:
            lay = self.m.layers[k]
            wsum = self.wsum[k] + (float(self.m.weights[lay.name][i]) if lay.in_group == g else 0.0)
            out.append((k, wsum, self._layer(k, counts, wsum)))
        return out

    def total_if(self, g: str, i: int) -> float:
        changes = self._changes(g, i)
        return self.total() + sum(c - self.costs[k] for k, _, c in changes)

    def add(self, g: str, i: int) -> None:
        for k, wsum, c in self._changes(g, i):
            self.wsum[k], self.costs[k] = wsum, c
        self.counts[g] += 1
        self.masks[g][i] = True


class SopMeter:
    """Per input channel of every conv / linear layer: the synaptic operations its spikes cause on one output
    channel, summed over the samples of an update window (on the model's device; no host reads).

    A conv input spike at position p reaches ``F(p)`` output positions (fewer at the borders); a linear
    layer's input feature reaches one weight per output. Layers whose input is not binary (the image, an
    average pool) make no SOPs, as spikingjelly's SynOpCounter counts them.
    """

    def __init__(self, model: nn.Module, layers: list[Layer], T: int):
        device = model_device(model)
        self.T, self.active = T, False
        self.sums = {lay.name: torch.zeros(lay.n_in, dtype=torch.float64, device=device) for lay in layers}
        self.steps = torch.zeros((), dtype=torch.float64, device=device)  # sample-steps seen (per layer alike)
        self.analog = {lay.name: torch.zeros((), dtype=torch.float64, device=device) for lay in layers}
        self._fanout = {lay.name: self.fanout_map(lay, device) for lay in layers if lay.kind == "conv"}
        # holding (CostModel.hold): each layer's kept outputs (0 for one with a non-binary input), and the
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
            # per input channel: its spikes times the output positions each reaches (one output per feature)
            spikes = (per_pos * self._fanout[lay.name]).sum((-2, -1)) if lay.kind == "conv" \
                else per_pos.view(lay.n_in, -1).sum(1)
            if hold:
                sops = spikes.sum() * (self.outputs[lay.name] * self.T / x.shape[0])
                self.batch = sops if self.batch is None else self.batch + sops
            if self.active:
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


def build_cost(model: nn.Module, groups: list[ChannelGroup], example: torch.Tensor, unit: str,
               T: int) -> CostModel | None:
    """The cost model of ``prune.budget_unit`` (None for ``channels``: the count is the cost)."""
    return None if unit == "channels" else CostModel(unit, model_layers(model, example, groups), groups, T)
