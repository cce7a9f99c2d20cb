"""What each pruning method gives on real data: MNIST-5k, from scratch and from the same trained weights.

For each seed: a dense training (recipes/mnist5k-wide-dense.yaml: VGG 32-M-64-M-128 with an L1
penalty on BatchNorm gamma); SCA from scratch (the dense recipe's epochs with a pruning schedule); and,
from that seed's trained dense weights, SCA, criticality, random, L1 and BN with the same fine-tuning
budget (recipes/mnist5k-from-trained.yaml: one-shot pruning, then fine-tuning). Every pruned run is
slimmed (verified equal to its masked model) and the slim model measured: test accuracy, kept
channels per layer, MACs and SOPs per image. Writes JSON, markdown and an accuracy-vs-MACs plot.

    python benchmarks/quality.py [--quick] [--out benchmarks/results] [--jobs 2]

--quick: keep 0.2, seed 0 only (under 10 minutes on 2 cores). Runs go to a process pool of --jobs
workers with one torch thread each; wall times are per run under that load.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
FROM_TRAINED = ("sca", "criticality", "random", "l1", "bn")
KEEPS = {0.3: 2, 0.2: 3, 0.1: 2}  # keep -> seeds (the outer keeps with fewer, as the middle one is the target)


def _recipe(name: str) -> dict:
    return yaml.safe_load((ROOT / "recipes" / name).read_text())


def _job(recipe: dict, out: str) -> dict:
    """Train one recipe into ``out``; slim and measure it if it prunes. Runs in a worker process."""
    import torch

    torch.set_num_threads(1)
    import snncompress as sc
    from snncompress.config import parse_recipe
    from snncompress.data import encode, load_dataset
    from snncompress.metrics import count_macs, spike_stats

    t0 = time.perf_counter()
    r = parse_recipe(recipe)
    res = sc.train(r, out, progress=False)
    seconds = time.perf_counter() - t0
    ckpt = torch.load(res.ckpt, weights_only=True)
    row = {"seconds": seconds, "epochs": r.train.epochs, "ckpt": str(res.ckpt)}
    if r.prune is None:
        return {**row, "accuracy": res.metrics[-1]["test_acc"]}
    sc.slim_checkpoint(res.ckpt, Path(out) / "slim.pt")
    model = sc.load_model(Path(out) / "slim.pt")
    data = load_dataset(r.data, r.seed)
    T, enc = r.data.T, r.data.encoding
    _, acc, _ = sc.evaluate(model, data.x_test, data.y_test, T, enc)
    stats = spike_stats(model, data.x_test, T, enc)
    return {**row, "accuracy": acc, "kept": {g: int(m.sum()) for g, m in ckpt["masks"].items()},
            "macs": count_macs(model, encode(data.x_test[:1], T, enc)), "sops": stats["sops"]}


def _scratch(dense: dict, keep: float, seed: int, epochs: int) -> dict:
    return {**dense, "name": f"sca-scratch-{keep}", "seed": seed, "train": {**dense["train"], "epochs": epochs},
            "prune": {"method": "sca", "keep": keep, "regrow": round(keep / 4, 4), "warmup_epochs": 1,
                      "ramp_epochs": epochs - 3, "finetune_epochs": 2, "min_channels": 2}}


def _from_trained(base: dict, method: str, keep: float, seed: int, weights: str) -> dict:
    return {**base, "name": f"{method}-{keep}", "seed": seed, "baseline": False,
            "model": {**base["model"], "weights": weights},
            "prune": {**base["prune"], "method": method, "keep": keep, "regrow": round(keep / 4, 4)}}


def _stats(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, sd


def summarise(rows: list[dict]) -> list[dict]:
    """Mean ± std per (keep, variant), and whether the mean beats random's by more than the combined SE."""
    table = []
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["keep"], r["variant"]), []).append(r)
    for (keep, variant), rs in sorted(groups.items(), key=lambda kv: (-(kv[0][0] or 1), kv[0][1])):
        acc, sd = _stats([r["accuracy"] for r in rs])
        entry = {"keep": keep, "variant": variant, "n": len(rs), "accuracy": acc, "std": sd,
                 "epochs": rs[0]["epochs"], "seconds": _stats([r["seconds"] for r in rs])[0]}
        if "macs" in rs[0]:
            entry.update(macs=_stats([r["macs"] for r in rs])[0], sops=_stats([r["sops"] for r in rs])[0],
                         kept=rs[0]["kept"])
        table.append(entry)
    for e in table:
        rand = next((r for r in table if r["keep"] == e["keep"] and r["variant"] == "random (trained)"), None)
        if rand is not None and e is not rand:
            se = math.sqrt(e["std"] ** 2 / e["n"] + rand["std"] ** 2 / rand["n"])
            e["beats_random"] = e["accuracy"] - rand["accuracy"] > se
    return table


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"Machine: {m['processor']}, {m['cpu_count']} cores, torch {m['torch']}; {result['jobs']} runs at a time, "
             f"one torch thread each. Total {result['total_minutes']:.1f} min. Dense: "
             f"{result['dense_recipe']}; from trained: {result['from_trained_recipe']} (same fine-tuning budget "
             "for every method). Accuracy of the slim model on the 1000 test images, mean ± std over seeds; "
             "kept channels of seed " f"{result['seeds'][0]}; MACs and SOPs per image.", "",
             "| keep | variant | seeds | accuracy | kept channels | MACs (M) | SOPs (M) | epochs | s / run "
             "| > random |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for e in result["table"]:
        kept = "/".join(str(v) for v in e["kept"].values()) if "kept" in e else "all"
        macs = f"{e['macs'] / 1e6:.2f}" if "macs" in e else f"{result['dense_macs'] / 1e6:.2f}"
        sops = f"{e['sops'] / 1e6:.2f}" if "sops" in e else "–"
        beats = {True: "yes", False: "no"}.get(e.get("beats_random"), "–")
        lines.append(f"| {e['keep'] if e['keep'] else '–'} | {e['variant']} | {e['n']} | "
                     f"{100 * e['accuracy']:.2f} ± {100 * e['std']:.2f} | {kept} | {macs} | {sops} | {e['epochs']} | "
                     f"{e['seconds']:.0f} | {beats} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    variants = sorted({e["variant"] for e in result["table"] if "macs" in e})
    for v in variants:
        pts = sorted((e["macs"] / 1e6, 100 * e["accuracy"], 100 * e["std"])
                     for e in result["table"] if e["variant"] == v)
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3, label=v)
    dense = next(e for e in result["table"] if e["variant"] == "dense")
    ax.axhline(100 * dense["accuracy"], color="k", linestyle="--",
               label=f"dense ({result['dense_macs'] / 1e6:.1f} M MACs)")
    ax.set_xlabel("MACs per image (M), slim model")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("MNIST-5k, VGG 32-M-64-M-128: accuracy vs compute")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="keep 0.2, one seed")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--work", type=Path, help="where the runs go (default: a temporary directory)")
    args = ap.parse_args()
    keeps = {0.2: 1} if args.quick else KEEPS
    seeds = list(range(max(keeps.values())))
    work = args.work or Path(tempfile.mkdtemp(prefix="snnc-quality-"))
    dense, base = _recipe("mnist5k-wide-dense.yaml"), _recipe("mnist5k-from-trained.yaml")
    t0 = time.perf_counter()
    rows: list[dict] = []

    def collect(futures: dict) -> None:
        for fut, meta in futures.items():
            row = {**meta, **fut.result()}
            rows.append(row)
            print(f"[{(time.perf_counter() - t0) / 60:5.1f} min] {meta['variant']:<20} keep {meta['keep']} "
                  f"seed {meta['seed']}: accuracy {row['accuracy']:.4f} ({row['seconds']:.0f} s)", flush=True)

    with ProcessPoolExecutor(args.jobs, mp_context=__import__("multiprocessing").get_context("spawn")) as pool:
        first = {pool.submit(_job, {**dense, "seed": s}, str(work / f"dense-{s}")):
                 {"variant": "dense", "keep": None, "seed": s} for s in seeds}
        # from scratch with twice the epochs of the fine-tuning from trained weights
        scratch_epochs = 2 * base["train"]["epochs"]
        first.update({pool.submit(_job, _scratch(dense, k, s, scratch_epochs), str(work / f"scratch-{k}-{s}")):
                      {"variant": "sca (scratch)", "keep": k, "seed": s} for k, n in keeps.items() for s in range(n)})
        collect(first)
        weights = {r["seed"]: r["ckpt"] for r in rows if r["variant"] == "dense"}
        collect({pool.submit(_job, _from_trained(base, m, k, s, weights[s]), str(work / f"{m}-{k}-{s}")):
                 {"variant": f"{m} (trained)", "keep": k, "seed": s}
                 for k, n in keeps.items() for s in range(n) for m in FROM_TRAINED})

    import torch
    import snncompress as sc
    from snncompress.data import encode, load_dataset
    from snncompress.metrics import count_macs

    d = sc.load_model(weights[0])
    r = sc.config.parse_recipe(dense)
    dense_macs = count_macs(d, encode(load_dataset(r.data, r.seed).x_test[:1], r.data.T, r.data.encoding))
    result = {"machine": {"processor": platform.processor() or platform.machine(),
                          "cpu_count": len(os.sched_getaffinity(0)), "platform": platform.platform(),
                          "torch": torch.__version__},
              "jobs": args.jobs, "quick": args.quick, "seeds": seeds, "keeps": keeps,
              "dense_recipe": "recipes/mnist5k-wide-dense.yaml",
              "from_trained_recipe": "recipes/mnist5k-from-trained.yaml",
              "total_minutes": (time.perf_counter() - t0) / 60, "dense_macs": dense_macs,
              "table": summarise(rows), "runs": [{k: v for k, v in r.items() if k != "ckpt"} for r in rows]}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "quality-quick" if args.quick else "quality"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(result))
    plot(result, args.out / f"{stem}.png")
    print(markdown(result))


if __name__ == "__main__":
    main()
