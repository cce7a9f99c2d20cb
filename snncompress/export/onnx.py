"""The unrolled graph in ONNX: torch's dynamo exporter, onnxsim's constant folding, snncompress metadata."""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
import torch
import torch.nn as nn

from .. import artifacts
from ..errors import SnnCompressError
from .unroll import UnrolledSNN, lean_neurons

ONNX_FORMAT = "snncompress.onnx/1"


@contextlib.contextmanager
def quiet_loggers(*names: str, level: int = logging.ERROR) -> Iterator[None]:
    """Raise the level of the named loggers (the root logger for ``""``) for the block, then restore them."""
    loggers = [logging.getLogger(n or None) for n in names]
    saved = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(level)
    try:
        yield
    finally:
        for lg, lvl in zip(loggers, saved):
            lg.setLevel(lvl)


def unrolled_onnx(model: nn.Module, example: torch.Tensor, T: int, encoding: str = "direct", lean: bool = True,
                  order: str = "step") -> onnx.ModelProto:
    """The ONNX graph of a multi-step ``model`` with its T steps unrolled (built on a copy: ``model``
    is left as it is), unverified; the export stage verifies it."""
    net = copy.deepcopy(model)
    if lean:
        lean_neurons(net)
    return to_onnx(UnrolledSNN(net, T, encoding, order).eval(), example)


def to_onnx(model: nn.Module, example: torch.Tensor) -> onnx.ModelProto:
    """Dynamo export (the TorchScript exporter cannot handle spikingjelly 2.0 neurons) + onnxsim."""
    import onnxsim

    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), quiet_loggers("torch.onnx"):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (example,), dynamo=True, dynamic_shapes={"x": {0: batch}},
                                    input_names=["input"], output_names=["logits"], verbose=False)
    proto = program.model_proto
    # onnxsim's graph-optimisation passes reorder float arithmetic in the neuron update; a membrane
    # potential sitting at the threshold then flips a spike (measured: |Δlogit| 0.57 on digits).
    # Constant folding and shape inference alone keep onnxruntime bit-exact with PyTorch.
    simplified, ok = onnxsim.simplify(proto, perform_optimization=False)
    if ok:
        proto = simplified
    onnx.checker.check_model(proto)
    return proto


def read_onnx_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata snncompress wrote into an ONNX file; refuses files it did not write."""
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf and onnx raise many types on a file that is not ONNX
        raise SnnCompressError(f"{path}: not a readable ONNX file ({type(e).__name__})") from e
    props = {p.key: p.value for p in proto.metadata_props}
    if props.get("format") != ONNX_FORMAT:
        raise SnnCompressError(f"{path}: not an ONNX model written by snncompress (no '{ONNX_FORMAT}' metadata)")
    return props


def exported_from(onnx_path: Path, ckpt_path: Path) -> bool:
    """Whether ``onnx_path`` is an snncompress ONNX export of exactly ``ckpt_path`` (``artifacts.exported_from``)."""
    return artifacts.exported_from(onnx_path, ckpt_path, read_onnx_metadata)


# ops whose output holds the values of their (first) input: spikes stay spikes through them
_SPIKE_PRESERVING = {"MaxPool", "Reshape", "Flatten", "Identity", "Squeeze", "Unsqueeze", "Transpose"}
_BOOLEAN = {"GreaterOrEqual", "Greater", "LessOrEqual", "Less", "Equal", "Not", "And", "Or", "Xor"}


def _spike_scale(name: str, producer: dict[str, onnx.NodeProto]) -> float | None:
    """``s`` where tensor ``name`` only holds ``s`` times integers in [0, 255] (spikes: ``s = 1``; spikes through a
    k x k average pool: ``1/k²``), None where the graph does not guarantee it."""
    node = producer.get(name)
    if node is None:
        return None
    if node.op_type == "Cast":
        src = producer.get(node.input[0])
        return 1.0 if src is not None and src.op_type in _BOOLEAN else None
    if node.op_type in _SPIKE_PRESERVING:
        return _spike_scale(node.input[0], producer)
    if node.op_type == "AveragePool":
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        k = attrs.get("kernel_shape", [])
        if any(attrs.get("pads", [0])) or len(k) != 2 or k[0] * k[1] > 255:
            return None
        s = _spike_scale(node.input[0], producer)
        return None if s is None else s / (k[0] * k[1])
    if node.op_type == "Concat":
        scales = {_spike_scale(i, producer) for i in node.input}
        return scales.pop() if len(scales) == 1 else None
    return None


def integer_convs(proto: onnx.ModelProto, bits: int, granularity: str) -> int:
    """Rewrite every conv whose input is spikes as an integer conv in QDQ form (in place); returns how many.

    A conv's weights, trained quantised with BatchNorm folded in (``quant``), are ``q * scale``: they become an int8
    initializer ``q`` behind a ``DequantizeLinear(scale)`` (per output channel), and its spike input goes through
    ``QuantizeLinear``/``DequantizeLinear`` to uint8 with scale 1 (or 1/k² after a k x k average pool): exact,
    spikes are 0 or 1. OpenVINO runs such a conv as a u8 x i8 convolution with an int32 accumulator and a float
    output; onnxruntime fuses QDQ only when the output is quantised too (8 bits: not exact), so it dequantises and
    runs the float conv. The first conv (its input is the image) and the readout stay float.
    """
    from onnx import helper, numpy_helper

    from ..quant import quantize

    graph = proto.graph
    producer = {o: n for n in graph.node for o in n.output}
    inits = {i.name: i for i in graph.initializer}
    weights: dict[str, str] = {}  # float initializer -> its dequantised int8 version (shared by the unrolled steps)
    inputs: dict[str, str] = {}  # spike tensor -> its QDQ version
    nodes, done = [], 0
    for node in graph.node:
        if node.op_type == "Conv" and node.input[1] in inits:
            scale_in = _spike_scale(node.input[0], producer)
            if scale_in is not None:
                w_name = node.input[1]
                if w_name not in weights:
                    w = numpy_helper.to_array(inits[w_name]).astype(np.float64)
                    q, scale = quantize(torch.from_numpy(w), bits, granularity)
                    scale = scale.reshape(-1).expand(w.shape[0]).numpy()
                    if np.abs(q.numpy() * scale.reshape(-1, 1, 1, 1) - w).max() > 1e-5 * max(1.0, np.abs(w).max()):
                        raise SnnCompressError(f"conv {node.name}: its weights are not {bits}-bit integers times a "
                                               "scale (was the checkpoint trained with quant?)")
                    graph.initializer.extend([
                        numpy_helper.from_array(q.numpy().astype(np.int8), f"{w_name}_int8"),
                        numpy_helper.from_array(scale.astype(np.float32), f"{w_name}_scale"),
                        numpy_helper.from_array(np.zeros(w.shape[0], np.int8), f"{w_name}_zero")])
                    weights[w_name] = f"{w_name}_dq"
                    nodes.append(helper.make_node("DequantizeLinear", [f"{w_name}_int8", f"{w_name}_scale",
                                                                      f"{w_name}_zero"], [weights[w_name]], axis=0))
                x_name = node.input[0]
                if x_name not in inputs:
                    inputs[x_name] = f"{x_name}_dq"
                    graph.initializer.extend([numpy_helper.from_array(np.array(scale_in, np.float32), f"{x_name}_s"),
                                              numpy_helper.from_array(np.array(0, np.uint8), f"{x_name}_z")])
                    nodes += [helper.make_node("QuantizeLinear", [x_name, f"{x_name}_s", f"{x_name}_z"], [f"{x_name}_u8"]),
                              helper.make_node("DequantizeLinear", [f"{x_name}_u8", f"{x_name}_s", f"{x_name}_z"],
                                               [inputs[x_name]])]
                node.input[0], node.input[1] = inputs[x_name], weights[w_name]
                done += 1
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    unused = {i.name for i in graph.initializer} - {i for n in graph.node for i in n.input}
    kept = [i for i in graph.initializer if i.name not in unused]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    onnx.checker.check_model(proto)
    return done
