"""Is a MAC budget better spent than a channel budget? SCA from scratch on MNIST-5k (the quality benchmark's
setting: recipes/mnist5k-wide-dense.yaml with a pruning schedule), for each seed:

    channels   prune.budget_unit: channels, keep 0.2
    macs       prune.budget_unit: macs, keep = the MAC fraction the channels run of the same seed produced

Both slim models are measured as in benchmarks/quality.py (test accuracy, MACs, SOPs, kept channels).

    python benchmarks/budget_accuracy.py [--seeds 3] [--keep 0.2] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from quality import ROOT, _job, _recipe, _scratch, _stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--keep", type=float, default=0.2)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--channels-from", type=Path, help="a previous budget_accuracy.json: reuse its channels runs "
                    "(seeded CPU runs repeat exactly) and train only the MAC-budget ones")
    args = ap.parse_args()
    dense, base = _recipe("mnist5k-wide-dense.yaml"), _recipe("mnist5k-from-trained.yaml")
    epochs = 2 * base["train"]["epochs"]  # as quality.py's "sca (scratch)"
    work = Path(tempfile.mkdtemp(prefix="snnc-budget-"))
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        if args.channels_from:
            old = json.loads(args.channels_from.read_text())["runs"]
            channels = {r["seed"]: r for r in old if r["unit"] == "channels" and r["seed"] < args.seeds}
        else:
            channels = {s: pool.submit(_job, _scratch(dense, args.keep, s, epochs), str(work / f"channels-{s}"))
                        for s in range(args.seeds)}
            channels = {s: f.result() for s, f in channels.items()}
        dense_macs = _dense_macs(dense)
        macs = {}
        for s, row in channels.items():
            fraction = row["macs"] / dense_macs
            recipe = _scratch(dense, fraction, s, epochs)
            recipe["prune"]["budget_unit"] = "macs"
            macs[s] = pool.submit(_job, recipe, str(work / f"macs-{s}"))
        macs = {s: f.result() for s, f in macs.items()}
    rows = [{**{k: v for k, v in r.items() if k != "ckpt"}, "unit": "channels", "seed": s} for s, r in channels.items()]
    rows += [{"unit": "macs", "seed": s, **{k: v for k, v in r.items() if k != "ckpt"}} for s, r in macs.items()]
    summary = {}
    for unit in ("channels", "macs"):
        rs = [r for r in rows if r["unit"] == unit]
        summary[unit] = {"accuracy": _stats([r["accuracy"] for r in rs]), "macs": _stats([r["macs"] for r in rs]),
                         "sops": _stats([r["sops"] for r in rs])}
    import torch

    result = {"machine": {"processor": platform.processor() or platform.machine(),
                          "cpu_count": len(os.sched_getaffinity(0)), "torch": torch.__version__},
              "keep_channels": args.keep, "epochs": epochs, "dense_macs": dense_macs,
              "minutes": (time.perf_counter() - t0) / 60, "summary": summary, "runs": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "budget_accuracy.json").write_text(json.dumps(result, indent=1))
    lines = [f"SCA from scratch, MNIST-5k, VGG 32-M-64-M-128, {epochs} epochs, {args.seeds} seeds; "
             f"{result['minutes']:.0f} min on {result['machine']['cpu_count']} cores.", "",
             "| budget | accuracy (%) | MACs (M) | SOPs (M) | kept channels (seed 0) |", "|---|---|---|---|---|"]
    for unit, s in summary.items():
        kept = next(r["kept"] for r in rows if r["unit"] == unit and r["seed"] == 0)
        label = f"channels, keep {args.keep}" if unit == "channels" else "macs, the same MACs per seed"
        lines.append(f"| {label} | {100 * s['accuracy'][0]:.2f} ± {100 * s['accuracy'][1]:.2f} | "
                     f"{s['macs'][0] / 1e6:.3f} | {s['sops'][0] / 1e6:.3f} | {'/'.join(map(str, kept.values()))} |")
    (args.out / "budget_accuracy.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _dense_macs(recipe: dict) -> int:
    """MACs of the dense model of ``recipe`` (what a MAC budget is a fraction of)."""
    from snncompress.config import parse_recipe
    from snncompress.data import encode, load_dataset
    from snncompress.metrics import count_macs
    from snncompress.stages.train import starting_model

    r = parse_recipe({**recipe, "prune": None})
    data = load_dataset(r.data, r.seed)
    _, model, _, _ = starting_model(r, data)
    return count_macs(model, encode(data.x_test[:1], r.data.T, r.data.encoding))


if __name__ == "__main__":
    main()
