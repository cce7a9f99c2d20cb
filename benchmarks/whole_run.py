"""Whole training runs with and without the slim fine-tune (``train.slim_finetune``), back to back.

From trained weights: recipes/mnist5k-from-trained.yaml (criticality, one-shot to keep 0.2 at the end of
epoch 0, then 5 fine-tune epochs) from the weights of recipes/mnist5k-wide-dense.yaml (trained here once,
seed 0), for each seed with the slim fine-tune on and off. From scratch: recipes/mnist5k-vgg.yaml (SCA,
20 epochs, masks final after epoch 14) at keep 0.2, on and off, and the same recipe dense.

Each run is one ``snncompress train`` process, timed from start to exit (start-up, data, every epoch and
its evaluation). The pair of a seed runs back to back, in alternating order, so drift on this shared
machine falls on both alike. Writes JSON and markdown.

    python benchmarks/whole_run.py [--seeds 3] [--scratch-seeds 1] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def _recipe(name: str) -> dict:
    return yaml.safe_load((ROOT / "recipes" / name).read_text())


def _train(recipe: dict, work: Path, name: str) -> dict:
    """One ``snncompress train`` process: wall seconds, final test accuracy, seconds of the epochs before and
    after the surgery (``slim`` in metrics.jsonl)."""
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "snncompress", "train", str(path), "--out", str(work / name)],
                   check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (work / name / "metrics.jsonl").read_text().splitlines()]
    slim = [r["seconds"] for r in rows if r.get("slim")]
    gated = [r["seconds"] for r in rows if not r.get("slim")]
    print(f"{name}: {wall:.1f} s, accuracy {rows[-1]['test_acc']:.4f}", flush=True)
    return {"name": name, "seconds": wall, "accuracy": rows[-1]["test_acc"], "epochs": len(rows),
            "slim_epochs": len(slim), "epoch_s_gated": statistics.mean(gated) if gated else None,
            "epoch_s_slim": statistics.mean(slim) if slim else None}


def _with(recipe: dict, seed: int, slim: bool, **prune) -> dict:
    out = {**recipe, "seed": seed, "baseline": False, "train": {**recipe["train"], "slim_finetune": slim}}
    if prune:
        out["prune"] = {**recipe["prune"], **prune}
    return out


def _pairs(recipe: dict, seeds: int, work: Path, tag: str, **prune) -> list[dict]:
    rows = []
    for seed in range(seeds):
        order = (True, False) if seed % 2 == 0 else (False, True)
        pair = {slim: _train(_with(recipe, seed, slim, **prune), work, f"{tag}-{seed}-{'slim' if slim else 'masked'}")
                for slim in order}
        rows.append({"seed": seed, "slim": pair[True], "masked": pair[False],
                     "ratio": pair[True]["seconds"] / pair[False]["seconds"]})
    return rows


def _summary(rows: list[dict]) -> dict:
    def stat(xs):
        return {"mean": statistics.mean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0}
    return {"ratio": stat([r["ratio"] for r in rows]),
            "accuracy_slim": stat([r["slim"]["accuracy"] for r in rows]),
            "accuracy_masked": stat([r["masked"]["accuracy"] for r in rows]),
            "accuracy_diff": stat([r["slim"]["accuracy"] - r["masked"]["accuracy"] for r in rows])}


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"`benchmarks/whole_run.py`: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, one run at a time "
             f"(torch's default threads); total {result['minutes']:.1f} min. Seconds are whole `snncompress train` "
             "processes; `slim` fine-tunes the slim network after the surgery, `masked` the gated dense one.", "",
             "| run | seed | slim (s) | masked (s) | slim / masked | epoch s, gated / slim | accuracy slim | "
             "accuracy masked |", "|---|---|---|---|---|---|---|---|"]
    for tag, rows in (("from trained", result["from_trained"]), ("SCA from scratch", result["scratch"])):
        for r in rows:
            s, k = r["slim"], r["masked"]
            lines.append(f"| {tag} | {r['seed']} | {s['seconds']:.1f} | {k['seconds']:.1f} | {r['ratio']:.3f} | "
                         f"{s['epoch_s_gated']:.1f} / {s['epoch_s_slim']:.1f} | {100 * s['accuracy']:.2f} | "
                         f"{100 * k['accuracy']:.2f} |")
    for r in result["dense"]:
        lines.append(f"| dense, same epochs | {r['seed']} | – | {r['seconds']:.1f} | – | {r['epoch_s_gated']:.1f} / – "
                     f"| – | {100 * r['accuracy']:.2f} |")
    lines.append("")
    for tag, key in (("From trained", "from_trained_summary"), ("SCA from scratch", "scratch_summary")):
        s = result[key]
        lines.append(f"{tag}: slim / masked wall time {s['ratio']['mean']:.3f} ± {s['ratio']['std']:.3f}; accuracy "
                     f"slim {100 * s['accuracy_slim']['mean']:.2f} ± {100 * s['accuracy_slim']['std']:.2f}, masked "
                     f"{100 * s['accuracy_masked']['mean']:.2f} ± {100 * s['accuracy_masked']['std']:.2f}, paired "
                     f"difference {100 * s['accuracy_diff']['mean']:+.2f} ± {100 * s['accuracy_diff']['std']:.2f} "
                     "points (mean ± std over seeds).")
    lines.append(f"SCA from scratch with the slim fine-tune / dense run of the same epochs: "
                 f"{result['scratch_vs_dense']:.3f}.")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3, help="seeds of the from-trained pairs")
    ap.add_argument("--scratch-seeds", type=int, default=1, help="seeds of the from-scratch pairs (and dense runs)")
    ap.add_argument("--keep", type=float, default=0.2)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    import torch

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        dense = _train({**_recipe("mnist5k-wide-dense.yaml"), "seed": 0}, work, "wide-dense")
        trained = {**_recipe("mnist5k-from-trained.yaml")}
        trained["model"] = {**trained["model"], "weights": str(work / "wide-dense" / "ckpt.pt")}
        from_trained = _pairs(trained, args.seeds, work, "trained", keep=args.keep)
        scratch_recipe = _recipe("mnist5k-vgg.yaml")
        scratch = _pairs(scratch_recipe, args.scratch_seeds, work, "scratch", keep=args.keep,
                         regrow=round(args.keep / 3, 4))
        dense_runs = [{"seed": s, **_train({**scratch_recipe, "seed": s, "baseline": False, "prune": None}, work,
                                           f"scratch-dense-{s}")} for s in range(args.scratch_seeds)]
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": len(os.sched_getaffinity(0)),
                    "torch": torch.__version__, "threads": torch.get_num_threads()},
        "keep": args.keep, "dense_weights": dense, "from_trained": from_trained, "scratch": scratch,
        "dense": dense_runs, "from_trained_summary": _summary(from_trained), "scratch_summary": _summary(scratch),
        "scratch_vs_dense": statistics.mean(r["slim"]["seconds"] for r in scratch)
        / statistics.mean(r["seconds"] for r in dense_runs),
        "minutes": (time.perf_counter() - t0) / 60,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "whole_run.json").write_text(json.dumps(result, indent=1))
    (args.out / "whole_run.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
