"""``prune.budget_unit: latency``: a network's latency on the deployment runtime as a function of its channel
counts (docs/methods.md, "Budget units").

As HALP and NetAdapt do, each conv / linear layer is timed on its own at a grid of (input, output) channel
counts (multiples of the runtime's channel block: ``snncompress.prune.blocks.channel_block``), at the
recipe's deploy batch size and threads, in the graph the export writes for one time step (the conv, then
the neuron's compare and cast), less the time of a call that does nothing with the same input (which the
whole network pays once, not per layer and step). The network runs more than its convs: the rest of each
neuron's update, pooling and layout changes, which grow with each layer's outputs. So the dense network, the
smallest one a budget can choose and slim versions with random channel counts are timed whole, and two
weights are fitted to them (non-negative least squares): one for the tables and one per element the
layers output. The unit lives here, with the runtimes it measures on; the selection only sees its costs.
"""

from __future__ import annotations

import bisect
import copy
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper
from rich.progress import Progress
from scipy.optimize import nnls

from ..config import DeployCfg, Recipe
from ..data import graph_input, to_steps
from ..errors import SnnCompressError
from ..export.onnx import unrolled_onnx
from ..export.unroll import steps_unroll_exactly
from ..prune.blocks import ceil_to, channel_block
from ..prune.costs.layers import Layer, model_layers
from ..prune.costs.unit import CostUnit
from ..prune.gates import ChannelGroup
from ..prune.surgery import slim
from ..registry import register_budget_unit
from .sessions import require_runtime
from .timing import timer

WARMUP, REPEATS = 3, 9  # per grid point: the median of 9 calls; the dense network: of 21
CALIBRATION, ROUNDS = 8, 5  # random slim networks timed whole, each in rounds of 15 calls alternating with the dense
OPSET = 17


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
    channels: the two terms a latency cost weighs (:class:`LatencyCost`)."""
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


@dataclass
class LatencyFit:
    """What :func:`measure_latency` measured: the tables, the dense network's time (ms per batch), the
    fitted weights (see :class:`LatencyCost`) and the calibration networks (kept channels, ms)."""

    tables: dict[str, LatencyTable]
    dense_ms: float
    scale: float
    elem: float
    calibration: list[dict]

    def to_dict(self) -> dict:
        return {**asdict(self), "tables": {n: t.to_dict() for n, t in self.tables.items()}}

    @classmethod
    def from_dict(cls, data: dict) -> "LatencyFit":
        return cls(**{**data, "tables": {n: LatencyTable(**t) for n, t in data["tables"].items()}})


@register_budget_unit("latency")
class LatencyCost(CostUnit):
    """``T * (scale * table_l(a, b) + elem * b * P_l)`` ms: a layer's table plus the element-wise work on its
    ``b * P_l`` outputs (``P_l`` positions; the neuron's arithmetic, pooling, layout changes), with ``scale``
    and ``elem`` fitted to whole slim networks timed on ``deploy.runtime`` (module docstring). The dense
    reference is the dense-shaped network as trained, timed whole.

    Spread over the tables in proportion instead, the slim networks of the quickstart VGG were predicted
    0.73-0.93 of their time; with a fixed overhead, 1.2-1.9x.
    """

    label = "latency"

    def __init__(self, layers: list[Layer], groups: list[ChannelGroup], T: int, cfg=None,
                 deploy: DeployCfg | None = None):
        super().__init__(layers, groups, T, cfg)
        self.sizes = {g.name: g.size for g in groups}
        self.deploy = deploy if deploy is not None else DeployCfg()
        self.fit: LatencyFit | None = None

    @classmethod
    def build(cls, model: nn.Module, groups: list[ChannelGroup], example: torch.Tensor, recipe: Recipe
              ) -> "LatencyCost":
        require_runtime(recipe.deploy.runtime)  # before anything is written
        return cls(model_layers(model, example, groups), groups, recipe.data.T, recipe.prune, recipe.deploy)

    def layer_cost(self, layer: Layer, a: float, b: float) -> float:
        ms, elements = latency_terms(layer, self.fit.tables[layer.name], a, b, self.T)
        return self.fit.scale * ms + self.fit.elem * elements

    @property
    def dense(self) -> float:
        return self.fit.dense_ms

    @staticmethod
    def achieved(dense: dict, slim: dict, batch: int, trained: dict | None) -> float:
        return slim["latency_ms"][str(batch)]["median"] / dense["latency_ms"][str(batch)]["median"]

    @property
    def needs_measurement(self) -> bool:
        return self.fit is None

    def measure(self, model: nn.Module, samples: torch.Tensor, recipe: Recipe, show: bool) -> dict:
        with torch.no_grad():
            return measure_latency(self, model, samples, recipe.data.T, recipe.data.encoding, self.deploy,
                                   show).to_dict()

    def load_measurement(self, data: dict) -> None:
        self._check({**data, "dense": data.get("dense_ms")})
        self.fit = LatencyFit.from_dict(data)

    def state_dict(self) -> dict:
        f = self.fit
        return {"dense": f.dense_ms, "scale": f.scale, "elem": f.elem,
                "tables": {n: t.to_dict() for n, t in f.tables.items()}, "calibration": f.calibration}

    def load_state_dict(self, state: dict) -> None:
        self._check(state)
        self.fit = LatencyFit({n: LatencyTable(**t) for n, t in state["tables"].items()}, state["dense"],
                              state["scale"], state["elem"], state.get("calibration", []))

    def _check(self, state: object) -> None:
        """Refuse measured latencies (a checkpoint's) that no selection can use, naming what is wrong."""
        problem = _fit_problem(state, [lay.name for lay in self.layers])
        if problem:
            raise SnnCompressError(f"latency tables: {problem}")


def _fit_problem(state: object, layers: list[str]) -> str | None:
    finite = lambda v, lo=0.0: type(v) in (int, float) and math.isfinite(v) and v >= lo  # noqa: E731
    if not isinstance(state, dict) or not isinstance(state.get("tables"), dict):
        return "must be a mapping with tables per layer"
    if not all(finite(state.get(k)) for k in ("dense", "scale", "elem")) or not state["dense"] > 0:
        return "dense (> 0), scale and elem must be finite numbers >= 0"
    missing = [n for n in layers if n not in state["tables"]]
    if missing:
        return f"no table for layer {missing[0]}"
    for name, t in state["tables"].items():
        if not (isinstance(t, dict) and set(t) == {"grid_in", "grid_out", "ms", "block"}):
            return f"{name}: a table holds grid_in, grid_out, ms and block"
        grids = t["grid_in"], t["grid_out"]
        if not all(isinstance(g, list) and g and all(type(v) is int and v > 0 for v in g)
                   and all(a < b for a, b in zip(g, g[1:])) for g in grids):
            return f"{name}: grid_in and grid_out must be non-empty ascending lists of channel counts"
        ms = t.get("ms")
        if not (isinstance(ms, list) and len(ms) == len(grids[0]) and all(
                isinstance(row, list) and len(row) == len(grids[1]) and all(finite(v) for v in row) for row in ms)):
            return f"{name}: ms must be a grid_in x grid_out table of finite times >= 0"
        if not (type(t.get("block")) is int and t["block"] >= 1):
            return f"{name}: block must be an int >= 1"
    return None


def layer_graph(layer: Layer, a: int, b: int, batch: int) -> bytes:
    """ONNX bytes of one step of ``layer`` with ``a`` input and ``b`` output channels, then a spike."""
    rng = np.random.default_rng(0)
    if layer.kind == "conv":
        (kh, kw), stride, pad, dil = layer.conv
        shape = [batch, a, *layer.in_shape[1:]]
        weight = numpy_helper.from_array(rng.standard_normal((b, a, kh, kw), dtype=np.float32), "w")
        core = helper.make_node("Conv", ["x", "w", "bias"], ["y"], strides=list(stride), dilations=list(dil),
                                pads=[pad[0], pad[1], pad[0], pad[1]])
    else:
        per = layer.in_shape[0] // layer.n_in  # features per input channel (a flatten)
        shape = [batch, a * per]
        weight = numpy_helper.from_array(rng.standard_normal((a * per, b), dtype=np.float32), "w")
        core = helper.make_node("Gemm", ["x", "w", "bias"], ["y"])
    consts = [weight, numpy_helper.from_array(np.zeros(b, np.float32), "bias"),
              numpy_helper.from_array(np.array(0.5, np.float32), "decay"),
              numpy_helper.from_array(np.array(1.0, np.float32), "threshold")]
    nodes = [core, helper.make_node("Mul", ["y", "decay"], ["h"]),
             helper.make_node("GreaterOrEqual", ["h", "threshold"], ["fire"]),
             helper.make_node("Cast", ["fire"], ["s"], to=TensorProto.FLOAT)]
    return _model(nodes, consts, shape, layer.name)


def call_graph(shape: list[int]) -> bytes:
    """ONNX bytes of a graph that only takes an input of ``shape`` back: the cost of a call itself."""
    return _model([helper.make_node("Identity", ["x"], ["s"])], [], shape, "call")


def _model(nodes: list, consts: list, shape: list[int], name: str) -> bytes:
    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("s", TensorProto.FLOAT, None)], consts)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=9).SerializeToString()


def measure_latency(unit: LatencyCost, model: nn.Module, x: torch.Tensor, T: int, encoding: str, deploy: DeployCfg,
                    show: bool = False) -> LatencyFit:
    """Every layer's table, the dense network's median latency (ms per batch) and the fitted weights, on
    ``deploy.runtime`` at ``deploy.batch_size``, from dataset samples ``x`` (repeated to fill a batch)."""
    require_runtime(deploy.runtime)
    model = copy.deepcopy(model).cpu()  # the runtimes are CPU ones, whatever device trains the model
    block, batch, threads, runtime = channel_block(), deploy.batch_size, deploy.threads, deploy.runtime
    rng = np.random.default_rng(0)
    grids = {lay.name: (table_grid(lay.n_in, block) if lay.in_group else [lay.n_in],
                        table_grid(lay.n_out, block) if lay.out_group else [lay.n_out]) for lay in unit.layers}
    tables = {}
    with Progress(transient=True, disable=not show) as bar:
        task = bar.add_task(f"latency tables on {runtime}, batch {batch}",
                            total=sum(len(i) * len(o) for i, o in grids.values()) + 3 + CALIBRATION)
        for lay in unit.layers:
            grid_in, grid_out = grids[lay.name]
            ms = []
            for a in grid_in:
                per = lay.in_shape[0] // lay.n_in if lay.kind == "linear" else 1
                shape = (batch, a, *lay.in_shape[1:]) if lay.kind == "conv" else (batch, a * per)
                spikes = (rng.random(shape) < 0.2).astype(np.float32)
                # a call costs something by itself (the runtime's dispatch, the input copy), which the whole
                # network pays once, not once per layer and step: it is taken off every entry
                call = timer(runtime, call_graph(list(shape)), spikes, threads, WARMUP)(REPEATS)["median"]
                ms.append([max(0.0, timer(runtime, layer_graph(lay, a, b, batch), spikes, threads, WARMUP)(REPEATS)
                               ["median"] - call) for b in grid_out])
                bar.advance(task, len(grid_out))
            tables[lay.name] = LatencyTable(grid_in, grid_out, ms, block)
        # the samples' own generator: timing draws nothing from the global RNG the training goes on with
        inputs = graph_input(x[torch.arange(batch) % len(x)], T, encoding, torch.Generator().manual_seed(0))
        order = "step" if steps_unroll_exactly(model, inputs[:2], T, encoding) else "layer"

        def timed(net: nn.Module):
            graph = unrolled_onnx(net, inputs[:2], T, encoding, order=order).SerializeToString()
            run = timer(runtime, graph, inputs.numpy(), threads, WARMUP)
            return lambda repeats=REPEATS: run(repeats)["median"]

        dense = timed(model)
        dense_ms = dense(21)
        bar.advance(task)
        example, calibration = to_steps(inputs[:2], T, encoding), []
        # the dense network without gates, the smallest one a latency budget can choose, and random ones
        smallest = {g: min(block, n) for g, n in unit.sizes.items()}
        for counts in [unit.sizes, smallest, *(_random_counts(unit.sizes, block, rng) for _ in range(CALIBRATION))]:
            masks = {g: torch.arange(n) < counts[g] for g, n in unit.sizes.items()}
            with torch.enable_grad():  # Torch-Pruning traces the graph with autograd
                net = timed(slim(model, masks, example))
            # as a share of the dense network timed alongside: the machine's speed drifts between networks
            share = float(np.median([net(15) / dense(15) for _ in range(ROUNDS)]))
            calibration.append({"kept": dict(counts), "ms": share * dense_ms})
            bar.advance(task)
    scale, elem = fit_weights(unit, tables, calibration)
    return LatencyFit(tables, dense_ms, scale, elem, calibration)


def _random_counts(sizes: dict[str, int], block: int, rng: np.random.Generator) -> dict[str, int]:
    """Whole blocks per group around a random overall width (0.05-1 of each group), uneven between groups
    as a pruned network is."""
    width = rng.uniform(0.05, 1.0)
    return {g: max(min(block, n), ceil_to(int(n * width * rng.uniform(0.3, 1.7)), block, n)) for g, n in sizes.items()}


def terms(unit: CostUnit, tables: dict[str, LatencyTable], counts: dict[str, int]) -> tuple[float, float]:
    """(ms of the tables, elements output) of a network with ``counts`` channels per group, all T steps:
    the two quantities :func:`fit_weights` weighs."""
    per_layer = [latency_terms(lay, tables[lay.name], counts[lay.in_group] if lay.in_group else lay.n_in,
                               counts[lay.out_group] if lay.out_group else lay.n_out, unit.T) for lay in unit.layers]
    return sum(ms for ms, _ in per_layer), sum(n for _, n in per_layer)


def fit_weights(unit: CostUnit, tables: dict[str, LatencyTable], calibration: list[dict]) -> tuple[float, float]:
    """``(scale, elem)``: non-negative weights of the tables and of the elements output that best give the
    calibration networks' measured times (least squares relative to each time, so small networks count
    as much as large ones)."""
    X = np.array([terms(unit, tables, c["kept"]) for c in calibration])
    y = np.array([c["ms"] for c in calibration])
    norm = X.max(0).clip(min=1e-12)  # the two columns differ by orders of magnitude
    coef, _ = nnls(X / norm / y[:, None], np.ones(len(y)))
    return float(coef[0] / norm[0]), float(coef[1] / norm[1])
