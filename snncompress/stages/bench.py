"""The bench stage: measure dense-shaped vs slim (and baseline) models.

Params, dense MACs, SOPs (spikingjelly's op_counter, on the test set), firing rate, an energy estimate,
accuracy in PyTorch and onnxruntime, and onnxruntime latency at batch 1 and 32.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from .. import __version__
from ..artifacts import load_checkpoint, write_json, write_text
from ..checkpoint import model_from_checkpoint, recipe_of
from ..data import encode, eval_batches, load_dataset
from ..deploy import exported_from, ort_session, run_onnx
from ..errors import SnnCompressError
from ..evaluation import evaluate
from ..layout import RunLayout
from ..metrics import PJ_PER_AC, PJ_PER_MAC, count_macs, count_params, spike_stats, weight_counts
from ..neuromorphic import nir_exported_from
from ..prune.gates import kept_fraction

BATCHES = (1, 32)
BENCH_FORMAT = "snncompress.bench/1"


def available_cores() -> int:
    """Cores this process may run on (CPU affinity, e.g. taskset or a container's cpuset), not all the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


@dataclass
class BenchSettings:
    threads: int = field(default_factory=available_cores)  # onnxruntime intra-op threads
    warmup: int = 5
    repeats: int = 30


def onnx_latency(path: Path, x: np.ndarray, settings: BenchSettings) -> dict[str, dict[str, float]]:
    """Median/min/max milliseconds per call of an ONNX model at each batch size in ``BATCHES``.

    ``x`` holds real model inputs (test samples, encoded), repeated to fill a batch if needed.
    """
    sess = ort_session(path, settings.threads)
    name = sess.get_inputs()[0].name
    out = {}
    for b in BATCHES:
        xb = np.ascontiguousarray(np.resize(x, (b, *x.shape[1:])))  # real test images, repeated if needed
        out[str(b)] = time_call(lambda: sess.run(None, {name: xb}), settings.warmup, settings.repeats)
    return out


def time_call(fn, warmup: int, repeats: int) -> dict[str, float]:
    """Median/min/max milliseconds of ``fn()`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return {"median": float(np.median(times)), "min": float(np.min(times)), "max": float(np.max(times))}


def bench_model(ckpt_path: Path, onnx_path: Path, settings: BenchSettings, trust_factory: bool = False) -> dict:
    """Every figure of one model: counts and accuracy in PyTorch, accuracy and latency of its ONNX export."""
    if not exported_from(onnx_path, ckpt_path):  # a missing, stale or foreign file
        raise SnnCompressError(f"{onnx_path}: not an ONNX export of {ckpt_path}; export it first")
    ckpt = load_checkpoint(ckpt_path)
    model = model_from_checkpoint(ckpt, str(ckpt_path), trust_factory)
    recipe = recipe_of(ckpt)
    data = load_dataset(recipe.data, recipe.seed)
    T, enc = ckpt["data"]["T"], ckpt["data"]["encoding"]

    _, accuracy, _ = evaluate(model, data.x_test, data.y_test, T, enc)
    onnx_logits = run_onnx(ort_session(onnx_path, settings.threads), data.x_test, T, enc)
    masks = ckpt["masks"]
    kept = kept_fraction(masks)
    return {
        "checkpoint": str(ckpt_path), "onnx": str(onnx_path),
        "params": count_params(model),
        **weight_counts(model),
        "macs": count_macs(model, encode(data.x_test[:1], T, enc)),
        **spike_stats(model, data.x_test, T, enc),
        "accuracy": accuracy,
        "accuracy_onnx": float((torch.from_numpy(onnx_logits).argmax(1) == data.y_test).float().mean()),
        "kept_channels": kept,
        "kept_per_group": {g: int(torch.as_tensor(m).sum()) for g, m in masks.items()},
        "group_sizes": {g: len(m) for g, m in masks.items()},
        "latency_ms": onnx_latency(onnx_path, next(eval_batches(data.x_test, T, enc, batch_size=max(BATCHES))).numpy(),
                                   settings),
    }


def nir_figures(path: Path, slim: dict) -> dict:
    """What bench reports for the NIR file of the slim model: the same network (same spikes: the export verified
    it), so the slim model's SOPs, energy and firing; its nodes and neurons as the file holds them."""
    from ..neuromorphic import neuron_count, node_counts, read_nir

    graph = read_nir(path)
    return {"path": str(path), "same_network_as": "slim", "bytes": path.stat().st_size, "nodes": node_counts(graph),
            "neurons": neuron_count(graph), "neurons_slim": slim.get("neurons"),
            **{k: slim[k] for k in ("sops", "sops_effective", "firing_rate", "energy_uj") if k in slim}}


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "onnxruntime": ort.__version__,
            "snncompress": __version__}


def bench_models(models: dict[str, tuple[Path, Path]], out_dir: str | os.PathLike,
                 settings: BenchSettings | None = None, trust_factory: bool = False) -> dict:
    """Benchmark ``{"dense": (ckpt, onnx), "slim": (ckpt, onnx)[, "baseline": (ckpt, onnx)]}``: the dense-shaped
    masked checkpoint against its slim version (and an optional dense baseline), each with the ONNX file
    exported from it; write ``bench.json``, ``report.md`` and the plots into ``out_dir``; return the report.
    ``trust_factory``: see :func:`snncompress.load_model`."""
    settings = settings or BenchSettings()
    out_dir = Path(out_dir)
    measured = {k: bench_model(Path(ckpt), Path(onnx_path), settings, trust_factory)
                for k, (ckpt, onnx_path) in models.items()}
    speedup = {b: measured["dense"]["latency_ms"][b]["median"] / measured["slim"]["latency_ms"][b]["median"]
               for b in measured["dense"]["latency_ms"]}
    report = {
        "format": BENCH_FORMAT, "machine": machine(),
        "settings": {"threads": settings.threads, "warmup": settings.warmup, "repeats": settings.repeats,
                     "batches": list(BATCHES), "pj_per_mac": PJ_PER_MAC, "pj_per_ac": PJ_PER_AC,
                     "execution_provider": "CPUExecutionProvider", "graph_optimization": "ORT_ENABLE_ALL"},
        "units": {"params": "count", "macs": "dense multiply-accumulates per inference (all T steps)",
                  "macs_analog": "MACs on non-spike inputs per inference",
                  "macs_analog_effective": "MACs on non-spike inputs through non-zero weights per inference",
                  "sops": "synaptic operations per inference",
                  "sops_effective": "synaptic operations through non-zero weights per inference",
                  "connectivity": "fraction of conv + linear weights that are non-zero",
                  "energy_uj": "microjoules per inference", "latency_ms": "milliseconds per batch",
                  "accuracy": "fraction", "kept_channels": "fraction of conv channels", "firing_rate": "spikes per neuron per step"},
        "models": measured,
        "speedup": speedup,
    }
    layout = RunLayout(out_dir)
    if "slim" in models and nir_exported_from(layout.nir, Path(models["slim"][0])):
        report["nir"] = nir_figures(layout.nir, measured["slim"])
    from ..plots import write_plots  # matplotlib is slow to import; only the report needs it

    report["plots"] = write_plots(report, out_dir)
    write_json(report, layout.bench)
    write_text(render_markdown(report), layout.report)
    return report


ROWS = [("params", "Params", "{:,.0f}"), ("macs", "MACs / inference", "{:,.0f}"), ("sops", "SOPs / inference", "{:,.0f}"),
        ("sops_effective", "SOPs through non-zero weights", "{:,.0f}"), ("connectivity", "Connectivity", "{:.1%}"),
        ("firing_rate", "Firing rate", "{:.4f}"), ("energy_uj", "Energy (µJ)", "{:.3f}"),
        ("accuracy", "Accuracy (PyTorch)", "{:.2%}"), ("accuracy_onnx", "Accuracy (onnxruntime)", "{:.2%}"),
        ("kept_channels", "Kept conv channels", "{:.1%}")]


def table_rows(report: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the summary table (shared by the terminal and markdown renderers)."""
    names = list(report["models"])
    rows = [[label, *(fmt.format(report["models"][n][key]) for n in names)] for key, label, fmt in ROWS]
    for b in report["settings"]["batches"]:
        cells = []
        for n in names:
            lat = report["models"][n]["latency_ms"][str(b)]
            cells.append(f"{lat['median']:.2f} ({lat['min']:.2f}–{lat['max']:.2f})")
        rows.append([f"Latency batch {b} (ms, median (min–max))", *cells])
    return ["", *names], rows


def render_markdown(report: dict) -> str:
    header, rows = table_rows(report)
    s, m = report["settings"], report["machine"]
    lines = [
        "# snncompress bench report", "",
        "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
        *("| " + " | ".join(r) + " |" for r in rows), "",
        "Speedup of the slim over the dense-shaped model (median latency): "
        + ", ".join(f"batch {b}: **{v:.2f}×**" for b, v in report["speedup"].items()), "",
        f"Machine: {m['processor']}, {m['cpu_count']} cores, {m['platform']}; torch {m['torch']}, "
        f"onnxruntime {m['onnxruntime']} ({s['execution_provider']}, {s['graph_optimization']}), "
        f"{s['threads']} intra-op threads, {s['warmup']} warm-up + {s['repeats']} timed runs per batch size.",
        *(f"![{name}]({file})" for name, file in report.get("plots", {}).items()), "",
        *([f"NIR file `{Path(report['nir']['path']).name}`: the slim network (same spikes, so the slim column's SOPs "
           f"and energy), {report['nir']['neurons']:,} neurons, nodes: "
           + ", ".join(f"{v} {k}" for k, v in report["nir"]["nodes"].items()) + ".", ""] if "nir" in report else []),
        f"Energy estimate: {s['pj_per_mac']} pJ per MAC on non-spike inputs + {s['pj_per_ac']} pJ per SOP "
        "(45 nm, Horowitz ISSCC 2014). SOPs and MACs are per inference over all T steps, averaged over the test set "
        "(spikingjelly op_counter). `dense` is the trained model with its masks applied but all channels present; "
        "`slim` has the pruned channels physically removed.", "",
    ]
    return "\n".join(lines)
