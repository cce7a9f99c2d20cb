"""PNG figures of the bench report and of compare.

Drawn on matplotlib ``Figure`` objects with no pyplot: nothing needs a display, and the caller's
matplotlib backend and pyplot state are left as they were.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from .artifacts import atomic_path


def short_names(names: list[str]) -> list[str]:
    """Module names without the dotted prefix they all share (``features.conv1.conv`` -> ``conv1.conv`` when
    every name starts with ``features.``), whatever the model calls its parts."""
    parts = [n.split(".") for n in names]
    common = 0
    while parts and all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    return [".".join(p[common:]) for p in parts]


def _bars(ax, labels: list[str], series: dict[str, list[float]], ylabel: str, log: bool = False) -> None:
    width = 0.8 / max(1, len(series))
    x = np.arange(len(labels))
    for i, (name, values) in enumerate(series.items()):
        ax.bar(x + (i - (len(series) - 1) / 2) * width, values, width, label=name)
    ax.set_xticks(x, short_names(labels), rotation=45, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.legend(fontsize=8)


def _figure(width: float, height: float, cols: int = 1):
    fig = Figure(figsize=(width, height))
    return fig, fig.subplots(1, cols)


def _save(fig: Figure, path: Path, dpi: int = 110) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)


def write_plots(report: dict, out_dir: Path) -> dict[str, str]:
    """Channels per group, SOPs per layer, firing rate per neuron, latency per model; returns {title: file}."""
    models, out = report["models"], {}
    dense, slim = models["dense"], models["slim"]
    groups = list(slim["kept_per_group"])

    fig, ax = _figure(max(5, 0.5 * len(groups) + 3), 3.5)
    _bars(ax, groups, {"before": [dense["group_sizes"][g] for g in groups],
                       "after (slim)": [slim["kept_per_group"][g] for g in groups]}, "channels")
    ax.set_title("Channels per group")
    _save(fig, out_dir / "channels.png")
    out["Channels per group"] = "channels.png"

    layers = [n for n in dense["per_layer"]["sops"] if n in slim["per_layer"]["sops"]]
    fig, ax = _figure(max(5, 0.5 * len(layers) + 3), 3.5)
    _bars(ax, layers, {k: [models[k]["per_layer"]["sops"][n] for n in layers] for k in models
                       if all(n in models[k]["per_layer"]["sops"] for n in layers)}, "SOPs per inference", log=True)
    ax.set_title("Synaptic operations per layer")
    _save(fig, out_dir / "sops.png")
    out["SOPs per layer"] = "sops.png"

    neurons = [n for n in dense["per_layer"]["firing_rate"] if n in slim["per_layer"]["firing_rate"]]
    fig, ax = _figure(max(5, 0.5 * len(neurons) + 3), 3.5)
    _bars(ax, neurons, {k: [models[k]["per_layer"]["firing_rate"].get(n, 0.0) for n in neurons] for k in models},
          "spikes / neuron / step")
    ax.set_title("Firing rate per layer")
    _save(fig, out_dir / "firing.png")
    out["Firing rate per layer"] = "firing.png"

    batches = list(dense["latency_ms"])
    fig, axes = _figure(4 * len(batches), 3.2, len(batches))
    for ax, b in zip(np.atleast_1d(axes), batches):
        names = list(models)
        med = [models[n]["latency_ms"][b]["median"] for n in names]
        err = np.array([[m - models[n]["latency_ms"][b]["min"] for n, m in zip(names, med)],
                        [models[n]["latency_ms"][b]["max"] - m for n, m in zip(names, med)]])
        ax.bar(names, med, yerr=err, capsize=4, color=["tab:gray", "tab:green", "tab:blue"][:len(names)])
        ax.set_title(f"batch {b}")
        ax.set_ylabel("ms (median, min-max)")
    fig.suptitle("onnxruntime latency")
    _save(fig, out_dir / "latency.png")
    out["Latency"] = "latency.png"
    return out


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points not dominated (lower cost and higher accuracy), sorted by cost."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def plot_pareto(summary: list[dict], path: Path, title: str) -> None:
    """Accuracy vs SOPs and vs batch-1 latency (means with std error bars), with the Pareto front."""
    fig, axes = _figure(11, 4.5, 2)
    methods = list(dict.fromkeys(s["method"] for s in summary))
    colours = {m: colormaps["tab10"](i % 10) for i, m in enumerate(methods)}
    for ax, key, label in ((axes[0], "sops", "SOPs per inference (non-zero weights)"),
                           (axes[1], "latency_1", "latency, batch 1 (ms, onnxruntime)")):
        for m in methods:
            pts = [s for s in summary if s["method"] == m]
            ax.errorbar([s[key][0] for s in pts], [100 * s["accuracy"][0] for s in pts],
                        xerr=[s[key][1] for s in pts], yerr=[100 * s["accuracy"][1] for s in pts],
                        fmt="o", color=colours[m], label=m, capsize=3)
        points = [(s[key][0], s["accuracy"][0]) for s in summary]
        front = pareto_front(points)
        # hollow rings mark the front, so a one-point front is visible too
        ax.plot([points[i][0] for i in front], [100 * points[i][1] for i in front], "--o", color="grey",
                lw=1, ms=13, mfc="none", label="Pareto front")
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{title}: accuracy vs cost (mean ± std over seeds)")
    _save(fig, path, dpi=120)
