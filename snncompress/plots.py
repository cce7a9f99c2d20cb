"""PNG figures for the bench report (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .artifacts import atomic_path  # noqa: E402


def _bars(ax, labels: list[str], series: dict[str, list[float]], ylabel: str, log: bool = False) -> None:
    width = 0.8 / max(1, len(series))
    x = np.arange(len(labels))
    for i, (name, values) in enumerate(series.items()):
        ax.bar(x + (i - (len(series) - 1) / 2) * width, values, width, label=name)
    ax.set_xticks(x, [label.removeprefix("features.") for label in labels], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.legend(fontsize=8)


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def write_plots(report: dict, out_dir: Path) -> dict[str, str]:
    """Channels per group, SOPs per layer, firing rate per neuron, latency per model; returns {title: file}."""
    models, out = report["models"], {}
    dense, slim = models["dense"], models["slim"]
    groups = list(slim["kept_per_group"])

    fig, ax = plt.subplots(figsize=(max(5, 0.5 * len(groups) + 3), 3.5))
    _bars(ax, groups, {"before": [dense["group_sizes"][g] for g in groups],
                       "after (slim)": [slim["kept_per_group"][g] for g in groups]}, "channels")
    ax.set_title("Channels per group")
    _save(fig, out_dir / "channels.png")
    out["Channels per group"] = "channels.png"

    layers = [n for n in dense["per_layer"]["sops"] if n in slim["per_layer"]["sops"]]
    fig, ax = plt.subplots(figsize=(max(5, 0.5 * len(layers) + 3), 3.5))
    _bars(ax, layers, {k: [models[k]["per_layer"]["sops"][n] for n in layers] for k in models
                       if all(n in models[k]["per_layer"]["sops"] for n in layers)}, "SOPs per inference", log=True)
    ax.set_title("Synaptic operations per layer")
    _save(fig, out_dir / "sops.png")
    out["SOPs per layer"] = "sops.png"

    neurons = [n for n in dense["per_layer"]["firing_rate"] if n in slim["per_layer"]["firing_rate"]]
    fig, ax = plt.subplots(figsize=(max(5, 0.5 * len(neurons) + 3), 3.5))
    _bars(ax, neurons, {k: [models[k]["per_layer"]["firing_rate"].get(n, 0.0) for n in neurons] for k in models},
          "spikes / neuron / step")
    ax.set_title("Firing rate per layer")
    _save(fig, out_dir / "firing.png")
    out["Firing rate per layer"] = "firing.png"

    batches = list(dense["latency_ms"])
    fig, axes = plt.subplots(1, len(batches), figsize=(4 * len(batches), 3.2))
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
