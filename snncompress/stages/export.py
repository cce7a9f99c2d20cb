"""The export stage: unroll the T time steps into a static ONNX graph, simplify, verify with onnxruntime; or
lay the network out as a NIR graph for neuromorphic hardware, verified by reading the file back."""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn as nn

from .. import __version__
from ..artifacts import atomic_path, check_output, load_checkpoint, sha256
from ..checkpoint import checkpoint_quant, model_from_checkpoint, recipe_of
from ..config import FLOAT_BITS, QuantWeightsCfg
from ..data import eval_batches, graph_input, load_dataset, to_steps
from ..errors import SnnCompressError, VerificationError, first_line
from ..evaluation import TOLERANCE, batch_logits, evaluate, runtime_agreement
from ..export.fold import fold_batchnorm
from ..export.onnx import ONNX_FORMAT, integer_convs, unrolled_onnx
from ..export.unroll import UNROLL_ORDERS, UnrolledSNN, steps_unroll_exactly
from ..runtime.sessions import runtime_session


@dataclass
class ExportResult:
    path: Path
    n_samples: int
    max_abs_diff: float  # onnxruntime vs the exported PyTorch model
    nodes: int
    order: str  # how the time steps were unrolled: step or layer
    fold_agreement: float | None = None  # with fold_bn: share of test predictions unchanged by the fold
    integer_convs: int = 0  # a quantised checkpoint's: conv nodes on spikes written as integer convs
    weight_bits: int = 32


def _source(ckpt_path: str | os.PathLike, out_path: str | os.PathLike | None, suffix: str,
            trust_factory: bool) -> tuple[Path, Path, dict, nn.Module]:
    """``(checkpoint path, output path (default: the checkpoint's with suffix), checkpoint, model)`` of an export."""
    ckpt_path = Path(ckpt_path)
    out_path = check_output(out_path or ckpt_path.with_suffix(suffix), directory=False, inputs=(ckpt_path,))
    ckpt = load_checkpoint(ckpt_path)
    return ckpt_path, out_path, ckpt, model_from_checkpoint(ckpt, str(ckpt_path), trust_factory)


def _onnxruntime(model: Path | bytes):
    """An onnxruntime session of an ONNX file or its bytes, taking a batch of model inputs as a tensor."""
    session = runtime_session("onnxruntime", model)
    return lambda inp: session(inp.numpy())


def export_onnx(ckpt_path: str | os.PathLike, out_path: str | os.PathLike | None = None, *, fold_bn: bool = False,
                lean: bool = True, order: str = "auto", trust_factory: bool = False) -> ExportResult:
    """Export a dense or slim checkpoint to ONNX and verify it with onnxruntime on the test set.

    onnxruntime must give the same predictions as PyTorch and |Δlogit| ≤ 1e-4 on every test sample but at
    most 1 % (a spike float rounding flipped at the threshold: :func:`~snncompress.evaluation.runtime_agreement`),
    else :class:`VerificationError` and nothing is written. ``fold_bn`` folds BatchNorms into their convs
    first (fewer, cheaper ops; the result reports how many test predictions the fold left unchanged).
    ``lean`` exports IF/LIF neurons as :class:`~snncompress.export.unroll.LeanNeuron` (about half the ONNX ops per
    step, same spikes); ``order`` is how the time steps are unrolled (see :class:`~snncompress.export.unroll.UnrolledSNN`):
    ``auto`` takes ``step`` unless the model cannot be run step by step (its forward fails in single-step
    mode, or its readout is not the mean over the steps: checked in PyTorch before exporting), then
    ``layer``; a failed verification is never retried in another order. The verification always compares
    with the original spikingjelly model. A checkpoint trained with ``quant`` is exported with BatchNorm folded and
    its convs on spikes as integer convs (:func:`~snncompress.export.onnx.integer_convs`), verified the same way.
    ``trust_factory``: see :func:`snncompress.load_model`.
    """
    if order not in ("auto", *UNROLL_ORDERS):
        raise SnnCompressError(f"unroll order {order!r}: allowed auto, {', '.join(UNROLL_ORDERS)}")
    ckpt_path, out_path, ckpt, model = _source(ckpt_path, out_path, ".onnx", trust_factory)
    quant = checkpoint_quant(ckpt, str(ckpt_path))
    fold_bn = fold_bn or quant is not None  # the integers are those of the folded weights
    meta = ckpt["data"]
    T, enc = meta["T"], meta["encoding"]
    recipe = recipe_of(ckpt)
    data = load_dataset(recipe.data, recipe.seed)
    fold_agreement = None
    if fold_bn:
        before = evaluate(model, data.x_test, data.y_test, T, enc)[2].argmax(1)
        fold_batchnorm(model, to_steps(graph_input(data.x_test[:2], T, enc), T, enc))
        after = evaluate(model, data.x_test, data.y_test, T, enc)[2].argmax(1)
        fold_agreement = float((before == after).float().mean())
    reference = batch_logits(UnrolledSNN(model, T, enc).eval(), data.x_test, T, enc)  # the model as trained
    example = graph_input(data.x_test[:2], T, enc)
    used = order
    if order == "auto":
        used = "step" if steps_unroll_exactly(model, graph_input(data.x_test[:8], T, enc), T, enc) else "layer"
    proto, got, diff, n_int = _export_verified(model, example, reference, data.x_test, T, enc, lean, used, ckpt_path,
                                               quant)
    direct = meta["encoding"] == "direct"
    props = {"format": ONNX_FORMAT, "snncompress_version": __version__, "T": str(meta["T"]),
             "encoding": meta["encoding"],
             "input_layout": "NCHW (one image; the graph repeats it over T)" if direct
             else "NTCHW (the spike or frame sequence)",
             "input_shape": json.dumps(["batch", *([] if direct else [meta["T"]]), *meta["input_shape"]]),
             "normalisation": json.dumps({"mean": meta["mean"], "std": meta["std"], "formula": "(x - mean) / std"}),
             "classes": json.dumps(meta["classes"]), "source_checkpoint": ckpt_path.name,
             "source_sha256": sha256(ckpt_path), "source_format": ckpt["format"], "bn_folded": str(fold_bn),
             "lean_neurons": str(lean), "unroll_order": used,
             **({} if quant is None else {"weight_bits": str(quant.bits), "weight_granularity": quant.granularity,
                                          "integer_convs": "QDQ: int8 weights and uint8 spike inputs"})}
    onnx.helper.set_model_props(proto, props)
    with atomic_path(out_path) as tmp:
        onnx.save(proto, str(tmp))
    return ExportResult(out_path, len(got), diff, len(proto.graph.node), used, fold_agreement, n_int,
                        quant.bits if quant is not None else FLOAT_BITS)


def _export_verified(model: nn.Module, example: torch.Tensor, reference: np.ndarray, x: torch.Tensor, T: int,
                     encoding: str, lean: bool, order: str, source: Path,
                     quant: QuantWeightsCfg | None = None) -> tuple[onnx.ModelProto, np.ndarray, float, int]:
    """(ONNX model, its logits on ``x``, max |Δlogit| against ``reference``, integer convs) or an error.
    ``quant``: the model's weights are quantised; its convs on spikes are written as integer convs
    (:func:`integer_convs`)."""
    try:
        proto = unrolled_onnx(model, example, T, encoding, lean, order)
    except torch.onnx.OnnxExporterError as e:  # a model (a factory's) the exporter cannot express; one line
        raise SnnCompressError(f"{source}: ONNX export failed ({first_line(e)})") from e
    n_int = integer_convs(proto, quant.bits, quant.granularity) if quant is not None else 0
    got = batch_logits(_onnxruntime(proto.SerializeToString()), x, T, encoding)
    check = runtime_agreement(got, reference)
    if not check["ok"]:
        raise VerificationError(f"onnxruntime disagrees with PyTorch (max |Δlogit| {check['max_abs_diff']:.3g} "
                                f"in {check['samples_off']} of {check['samples']} samples, same predictions: "
                                f"{check['same_predictions']}, unrolled by {order}); nothing written"
                                + ("; --unroll layer exports the model as trained" if order == "step" else ""))
    return proto, got, check["max_abs_diff"], n_int




@dataclass
class NirExportResult:
    path: Path
    n_samples: int
    max_abs_diff: float  # spikingjelly's simulation of the file read back vs the exported PyTorch network
    nodes: dict[str, int]  # NIR nodes per type
    neurons: int
    bytes: int
    fold_max_abs_diff: float  # the exported network (BatchNorm and gates folded) vs the model as trained
    fold_agreement: float  # share of test predictions the fold left unchanged
    fold_float64_exact: bool | None  # where float32 rounding flipped a spike: the fold re-checked in float64
    seconds: dict[str, float]  # export, verification


def export_nir(ckpt_path: str | os.PathLike, out_path: str | os.PathLike | None = None, *,
               trust_factory: bool = False) -> NirExportResult:
    """Export a dense or slim checkpoint to NIR (neuromorphic hardware) and verify the file on the test set.

    The network is laid out for NIR (:func:`snncompress.export.nir.nir_body`: BatchNorm folded into the
    convs, closed gates folded into zero weights, average pools as sum pools), exported with spikingjelly's
    exporter, written, read back with ``nir.read`` and simulated with spikingjelly's importer with the
    checkpoint's encoding and T. The simulation must give the exported network's predictions and max
    |Δlogit| ≤ 1e-4, else :class:`VerificationError` naming the first layer that disagrees and nothing is
    written. The fold itself is checked against the model as trained (in float64 where float32 rounding flips
    a spike at the threshold, as the slim stage does). What NIR cannot express is refused up front, in one line.
    """
    from ..export.nir import (Simulator, body_logits, first_disagreeing_layer, integer_weights, neuron_count, nir_body,
                              nir_metadata, node_counts, read_nir, simulate, to_nir_graph)

    t0 = time.perf_counter()
    ckpt_path, out_path, ckpt, model = _source(ckpt_path, out_path, ".nir", trust_factory)
    meta = ckpt["data"]
    T, enc = meta["T"], meta["encoding"]
    example = torch.zeros(2, *meta["input_shape"])  # one time step, whatever the encoding
    body = nir_body(model, example)  # refuses what NIR cannot express before the data is loaded
    recipe = recipe_of(ckpt)
    data = load_dataset(recipe.data, recipe.seed)
    trained = evaluate(model, data.x_test, data.y_test, T, enc)[2].numpy()
    reference = body_logits(body, data.x_test, T, enc)
    fold_diff = float(np.abs(reference - trained).max())
    fold_agreement = float((reference.argmax(1) == trained.argmax(1)).mean())
    fold64 = None
    if fold_agreement < 1 or fold_diff > TOLERANCE:  # as the slim stage: float64 tells rounding from a wrong fold
        m64 = copy.deepcopy(model).double()
        x64 = data.x_test.double()
        b64 = body_logits(nir_body(m64, example.double()), x64, T, enc)
        t64 = evaluate(m64, x64, data.y_test, T, enc)[2].numpy()
        fold64 = bool((b64.argmax(1) == t64.argmax(1)).all() and np.abs(b64 - t64).max() <= TOLERANCE)
        if not fold64:
            raise VerificationError(f"{ckpt_path}: folding BatchNorm and gates for NIR changed the network (max "
                                    f"|Δlogit| {fold_diff:.3g}, {fold_agreement:.2%} of predictions unchanged, also "
                                    "in float64); nothing written")
    extra = {"snncompress_version": __version__, "source_checkpoint": ckpt_path.name,
             "source_sha256": sha256(ckpt_path), "source_format": ckpt["format"], "bn_folded": "True",
             "pooling": "average pools as SumPool2d, their 1/(kh*kw) folded into the next layer's weights",
             "neuron_mapping": "spikingjelly's mapping: LIF tau = tau_steps * dt, r = 1, v_leak = v_reset; IF r = 1 / dt"}
    graph = to_nir_graph(body, example, nir_metadata(meta, extra))
    quant = checkpoint_quant(ckpt, str(ckpt_path))
    if quant is not None:  # trained quantised: integer weights, each layer's scale in its neuron
        graph.metadata.update(integer_weights(graph, quant.bits, quant.granularity))
    t_export = time.perf_counter() - t0
    with atomic_path(out_path) as tmp:
        import nir

        nir.write(tmp, graph)
        t1 = time.perf_counter()
        sim = Simulator(read_nir(tmp))
        got = simulate(sim, data.x_test, T, enc)
        diff = float(np.abs(got - reference).max())
        same = bool((got.argmax(1) == reference.argmax(1)).all())
        if not same or diff > TOLERANCE:
            first = next(eval_batches(data.x_test, T, enc))
            layer = first_disagreeing_layer(body, sim, to_steps(first, T, enc), TOLERANCE)
            raise VerificationError(f"the NIR file read back and simulated by spikingjelly disagrees with PyTorch "
                                    f"(max |Δlogit| {diff:.3g}, same predictions: {same}); first differing layer: "
                                    f"{layer}; nothing written")
        size = tmp.stat().st_size
        graph_back = read_nir(tmp)
    return NirExportResult(out_path, len(got), diff, node_counts(graph_back), neuron_count(graph_back), size,
                           fold_diff, fold_agreement, fold64,
                           {"export": t_export, "verification": time.perf_counter() - t1})
