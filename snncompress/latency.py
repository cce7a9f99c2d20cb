"""Latency of a network on the deployment runtime as a function of its channel counts, for
``prune.budget_unit: latency``.

As HALP and NetAdapt do, each conv / linear layer is timed on its own at a grid of (input, output) channel
counts (multiples of the runtime's channel block: ``snncompress.prune.cost.channel_block``), at the
recipe's deploy batch size and threads, in the graph the export writes for one time step (the conv, then
the neuron's compare and cast), less the time of a call that does nothing with the same input (which the
whole network pays once, not per layer and step). The network runs more than its convs: the rest of each
neuron's update, pooling and layout changes, which grow with each layer's outputs. So the dense network, the
smallest one a budget can choose and slim versions with random channel counts are timed whole, and two
weights are fitted to them (non-negative least squares): one for the tables and one per element the
layers output (``CostModel.set_latency``).
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper
from rich.progress import Progress
from scipy.optimize import nnls

from .config import DeployCfg
from .data import graph_input, to_steps
from .deploy import require_runtime, runtime_session, steps_unroll_exactly, time_call, unrolled_onnx
from .prune.cost import CostModel, Layer, LatencyTable, ceil_to, channel_block, latency_terms, table_grid
from .prune.surgery import slim

WARMUP, REPEATS = 3, 9  # per grid point: the median of 9 calls; the dense network: of 21
CALIBRATION, ROUNDS = 8, 5  # random slim networks timed whole, each in rounds of 15 calls alternating with the dense
OPSET = 17


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


def _time(runtime: str, model: bytes, x: np.ndarray, threads: int | None, repeats: int = REPEATS) -> float:
    run = runtime_session(runtime, model, threads, len(x))
    return time_call(lambda: run(x), WARMUP, repeats)["median"]


@dataclass
class LatencyFit:
    """What :func:`measure_latency` measured: the tables, the dense network's time (ms per batch), the
    fitted weights (see ``CostModel.set_latency``) and the calibration networks (kept channels, ms)."""

    tables: dict[str, LatencyTable]
    dense_ms: float
    scale: float
    elem: float
    calibration: list[dict]

    def apply(self, cost: CostModel) -> None:
        cost.set_latency(self.tables, self.dense_ms, self.scale, self.elem)

    def to_text(self) -> str:
        return json.dumps({**asdict(self), "tables": {n: t.to_dict() for n, t in self.tables.items()}})

    @classmethod
    def from_text(cls, text: str) -> "LatencyFit":
        data = json.loads(text)
        return cls(**{**data, "tables": {n: LatencyTable(**t) for n, t in data["tables"].items()}})


def measure_latency(cost: CostModel, model: nn.Module, x: torch.Tensor, T: int, encoding: str, deploy: DeployCfg,
                    show: bool = False) -> LatencyFit:
    """Every layer's table, the dense network's median latency (ms per batch) and the fitted weights, on
    ``deploy.runtime`` at ``deploy.batch_size``, from dataset samples ``x`` (repeated to fill a batch)."""
    require_runtime(deploy.runtime)
    model = copy.deepcopy(model).cpu()  # the runtimes are CPU ones, whatever device trains the model
    block, batch, threads = channel_block(), deploy.batch_size, deploy.threads
    rng = np.random.default_rng(0)
    grids = {lay.name: (table_grid(lay.n_in, block) if lay.in_group else [lay.n_in],
                        table_grid(lay.n_out, block) if lay.out_group else [lay.n_out]) for lay in cost.layers}
    tables = {}
    with Progress(transient=True, disable=not show) as bar:
        task = bar.add_task(f"latency tables on {deploy.runtime}, batch {batch}",
                            total=sum(len(i) * len(o) for i, o in grids.values()) + 3 + CALIBRATION)
        for lay in cost.layers:
            grid_in, grid_out = grids[lay.name]
            ms = []
            for a in grid_in:
                per = lay.in_shape[0] // lay.n_in if lay.kind == "linear" else 1
                shape = (batch, a, *lay.in_shape[1:]) if lay.kind == "conv" else (batch, a * per)
                spikes = (rng.random(shape) < 0.2).astype(np.float32)
                # a call costs something by itself (the runtime's dispatch, the input copy), which the whole
                # network pays once, not once per layer and step: it is taken off every entry
                call = _time(deploy.runtime, call_graph(list(shape)), spikes, threads)
                ms.append([max(0.0, _time(deploy.runtime, layer_graph(lay, a, b, batch), spikes, threads) - call)
                           for b in grid_out])
                bar.advance(task, len(grid_out))
            tables[lay.name] = LatencyTable(grid_in, grid_out, ms, block)
        # the samples' own generator: timing draws nothing from the global RNG the training goes on with
        inputs = graph_input(x[torch.arange(batch) % len(x)], T, encoding, torch.Generator().manual_seed(0))
        order = "step" if steps_unroll_exactly(model, inputs[:2], T, encoding) else "layer"

        def session(net: nn.Module):
            run = runtime_session(deploy.runtime, unrolled_onnx(net, inputs[:2], T, encoding, order=order)
                                  .SerializeToString(), threads, batch)
            return lambda repeats=REPEATS: time_call(lambda: run(inputs.numpy()), WARMUP, repeats)["median"]

        dense = session(model)
        dense_ms = dense(21)
        bar.advance(task)
        example, calibration = to_steps(inputs[:2], T, encoding), []
        # the dense network without gates, the smallest one a latency budget can choose, and random ones
        smallest = {g: min(block, n) for g, n in cost.sizes.items()}
        for counts in [cost.sizes, smallest, *(_random_counts(cost.sizes, block, rng) for _ in range(CALIBRATION))]:
            masks = {g: torch.arange(n) < counts[g] for g, n in cost.sizes.items()}
            with torch.enable_grad():  # Torch-Pruning traces the graph with autograd
                timed = session(slim(model, masks, example))
            # as a share of the dense network timed alongside: the machine's speed drifts between networks
            share = float(np.median([timed(15) / dense(15) for _ in range(ROUNDS)]))
            calibration.append({"kept": dict(counts), "ms": share * dense_ms})
            bar.advance(task)
    scale, elem = fit_weights(cost, tables, calibration)
    return LatencyFit(tables, dense_ms, scale, elem, calibration)


def _random_counts(sizes: dict[str, int], block: int, rng: np.random.Generator) -> dict[str, int]:
    """Whole blocks per group around a random overall width (0.05-1 of each group), uneven between groups
    as a pruned network is."""
    width = rng.uniform(0.05, 1.0)
    return {g: max(min(block, n), ceil_to(int(n * width * rng.uniform(0.3, 1.7)), block, n)) for g, n in sizes.items()}


def terms(cost: CostModel, tables: dict[str, LatencyTable], counts: dict[str, int]) -> tuple[float, float]:
    """(ms of the tables, elements output) of a network with ``counts`` channels per group, all T steps:
    the two quantities :func:`fit_weights` weighs."""
    per_layer = [latency_terms(lay, tables[lay.name], counts[lay.in_group] if lay.in_group else lay.n_in,
                               counts[lay.out_group] if lay.out_group else lay.n_out, cost.T) for lay in cost.layers]
    return sum(ms for ms, _ in per_layer), sum(n for _, n in per_layer)


def fit_weights(cost: CostModel, tables: dict[str, LatencyTable], calibration: list[dict]) -> tuple[float, float]:
    """``(scale, elem)``: non-negative weights of the tables and of the elements output that best give the
    calibration networks' measured times (least squares relative to each time, so small networks count
    as much as large ones)."""
    X = np.array([terms(cost, tables, c["kept"]) for c in calibration])
    y = np.array([c["ms"] for c in calibration])
    norm = X.max(0).clip(min=1e-12)  # the two columns differ by orders of magnitude
    coef, _ = nnls(X / norm / y[:, None], np.ones(len(y)))
    return float(coef[0] / norm[0]), float(coef[1] / norm[1])
