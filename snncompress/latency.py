"""Per-layer latency tables measured on the deployment runtime, for ``prune.budget_unit: latency``.

As HALP and NetAdapt do, each conv / linear layer is timed on its own at a grid of (input, output) channel
counts (multiples of the runtime's channel block: ``snncompress.prune.cost.channel_block``), at the
recipe's deploy batch size and threads, in the graph the export writes for one time step (the conv, then
the neuron's compare and cast), less the time of a call that does nothing with the same input (which the
whole network pays once, not per layer and step). The whole dense network is timed once, and the tables
are scaled so that their sum is its time (``CostModel.set_latency``).
"""

from __future__ import annotations

import copy
import json

import numpy as np
import torch
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper
from rich.progress import Progress

from .config import DeployCfg
from .data import graph_input
from .deploy import require_runtime, runtime_session, steps_unroll_exactly, time_call, unrolled_onnx
from .prune.cost import CostModel, Layer, LatencyTable, channel_block, table_grid

WARMUP, REPEATS = 3, 9  # per grid point: the median of 9 calls; the dense network: of 21
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


def measure_latency(cost: CostModel, model: nn.Module, x: torch.Tensor, T: int, encoding: str, deploy: DeployCfg,
                    show: bool = False) -> tuple[dict[str, LatencyTable], float]:
    """``(tables, dense_ms)``: every layer's table and the dense network's median latency (ms per batch)
    on ``deploy.runtime`` at ``deploy.batch_size``, from dataset samples ``x`` (repeated to fill a batch)."""
    require_runtime(deploy.runtime)
    model = copy.deepcopy(model).cpu()  # the runtimes are CPU ones, whatever device trains the model
    block, batch, threads = channel_block(), deploy.batch_size, deploy.threads
    rng = np.random.default_rng(0)
    grids = {lay.name: (table_grid(lay.n_in, block) if lay.in_group else [lay.n_in],
                        table_grid(lay.n_out, block) if lay.out_group else [lay.n_out]) for lay in cost.layers}
    tables = {}
    with Progress(transient=True, disable=not show) as bar:
        task = bar.add_task(f"latency table on {deploy.runtime}, batch {batch}",
                            total=sum(len(i) * len(o) for i, o in grids.values()) + 1)
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
        idx = torch.arange(batch) % len(x)
        inputs = graph_input(x[idx], T, encoding)
        order = "step" if steps_unroll_exactly(model, inputs[:2], T, encoding) else "layer"
        proto = unrolled_onnx(model, inputs[:2], T, encoding, order=order)
        dense_ms = _time(deploy.runtime, proto.SerializeToString(), inputs.numpy(), threads, repeats=21)
        bar.advance(task)
    return tables, dense_ms


def tables_to_text(tables: dict[str, LatencyTable], dense_ms: float) -> str:
    return json.dumps({"dense_ms": dense_ms, "tables": {n: t.to_dict() for n, t in tables.items()}})


def tables_from_text(text: str) -> tuple[dict[str, LatencyTable], float]:
    data = json.loads(text)
    return {n: LatencyTable(**t) for n, t in data["tables"].items()}, data["dense_ms"]
