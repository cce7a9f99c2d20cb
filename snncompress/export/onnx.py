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
