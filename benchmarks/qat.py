"""What quantisation-aware training costs: the pruned network at float32 against 8, 4 and 2 bits, paired over seeds.

Every quantised run quantises its slim fine-tune (quant.start: finetune, one scale per output channel), so up to
the last mask update it is the float run of its seed, step for step: the same masks, and the difference to the
float run of the same seed is the quantisation's alone.

quickstart  recipes/quickstart.yaml as shipped (digits, 360 test images): SCA to 30 % of the channels, 16 epochs.
mnist5k     recipes/mnist5k-from-trained.yaml (1000 test images) from the dense networks the quality benchmark
            trained (runs/quality/full/dense-s{seed}/ckpt.pt; trained here if missing): 20 % of the channels, 6 epochs.

Per bit width: accuracy (mean over seeds), the paired difference to float32 with its 95 % t-interval, and the
weight memory of the slim model (conv and linear weights at the bit width plus 32-bit biases) against the dense
float32 model of the same seed. Written to benchmarks/results/qat.{json,md}.

    python benchmarks/qat.py [--seeds 3] [--jobs 2] [--settings quickstart,mnist5k] [--bits 8,4,2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch

from quality import _recipe, _threads, interval, sampling_error

ROOT = Path(__file__).resolve().parent.parent


def _job(recipe: dict, out: str) -> dict:
    """Train, slim, and the slim model's weight memory at its bits and the dense model's at 32."""
    import snncompress as sc
    from snncompress.prune.costs.memory import model_weight_bytes

    t0 = time.perf_counter()
    r = sc.parse_recipe(recipe)
    res = sc.train(r, out, resume=True, progress=False)
    slim = sc.slim_checkpoint(res.ckpt, Path(out) / "slim.pt")
    dense_ckpt = r.model.weights or res.ckpt  # from trained weights: the network it started from
    return {"accuracy": res.metrics[-1]["test_acc"], "bits": r.weight_bits, "seconds": time.perf_counter() - t0,
            "slim_bytes": model_weight_bytes(sc.load_model(slim.path), r.weight_bits),
            "dense_fp32_bytes": model_weight_bytes(sc.load_model(dense_ckpt), 32),
            "kept": {g: k for g, (k, _) in slim.kept.items()}}


def _variants(setting: str, seed: int, bits: list[int], work: Path, dense: dict[int, str]) -> dict:
    if setting == "quickstart":
        base = {**_recipe("quickstart.yaml"), "baseline": False}
    else:
        base = _recipe("mnist5k-from-trained.yaml")
        base = {**base, "baseline": False, "model": {**base["model"], "weights": dense[seed]}}
    out = {}
    for b in [32, *bits]:
        quant = {} if b == 32 else {"quant": {"weights": {"bits": b, "granularity": "channel"}, "start": "finetune"}}
        out[b] = ({**base, "seed": seed, **quant}, str(work / f"{setting}-b{b}-s{seed}"))
    return out


def summarise(runs: dict, bits: list[int], seeds: list[int], n_test: int) -> list[dict]:
    rows = []
    for b in [32, *bits]:
        acc = [runs[(s, b)]["accuracy"] for s in seeds]
        row = {"bits": b, "accuracy": interval(acc), "sampling_error": sampling_error(sum(acc) / len(acc), n_test),
               "memory_ratio": interval([runs[(s, b)]["slim_bytes"] / runs[(s, b)]["dense_fp32_bytes"] for s in seeds]),
               "slim_bytes": runs[(seeds[0], b)]["slim_bytes"], "minutes": sum(runs[(s, b)]["seconds"] for s in seeds) / 60}
        if b != 32:
            row["diff"] = interval([runs[(s, b)]["accuracy"] - runs[(s, 32)]["accuracy"] for s in seeds])
        rows.append(row)
    return rows


def markdown(result: dict) -> str:
    lines = ["# Quantisation-aware training after pruning (`benchmarks/qat.py`)", "",
             f"Machine: {result['machine']}; {result['jobs']} jobs of one thread; seeds {result['seeds']}; "
             f"{result['minutes']:.1f} min. Each quantised run quantises the slim fine-tune of the float run of its seed "
             "(same masks); differences are paired by seed, 95 % t-intervals.", ""]
    for setting, rows in result["settings"].items():
        lines += [f"## {setting} ({result['test_images'][setting]} test images)", "",
                  "| weights | accuracy (mean ± sd) | vs float32, paired (95 % CI) | slim weight memory vs dense fp32 |",
                  "|---|---|---|---|"]
        for r in rows:
            a, d = r["accuracy"], r.get("diff")
            diff = "–" if d is None else f"{100 * d['mean']:+.2f} [{100 * d['low']:+.2f}, {100 * d['high']:+.2f}]"
            name = "float32" if r["bits"] == 32 else f"int{r['bits']}"
            lines.append(f"| {name} | {100 * a['mean']:.2f} ± {100 * a['std']:.2f} (sampling error "
                         f"{100 * r['sampling_error']:.2f}) | {diff} | {r['memory_ratio']['mean']:.4f} "
                         f"({r['slim_bytes']:,} bytes) |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--settings", default="quickstart,mnist5k")
    ap.add_argument("--bits", default="8,4,2")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "qat")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    seeds, bits, settings = list(range(args.seeds)), [int(b) for b in args.bits.split(",")], args.settings.split(",")
    t0 = time.perf_counter()
    dense = {s: str(ROOT / "runs" / "quality" / "full" / f"dense-s{s}" / "ckpt.pt") for s in seeds}
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}", "jobs": args.jobs,
              "seeds": seeds, "bits": bits, "settings": {}, "test_images": {"quickstart": 360, "mnist5k": 1000}}
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn"), initializer=_threads) as pool:
        if "mnist5k" in settings:
            dense_recipe = _recipe("mnist5k-wide-dense.yaml")
            missing = {s: pool.submit(_dense, {**dense_recipe, "seed": s}, str(Path(dense[s]).parent))
                       for s in seeds if not Path(dense[s]).exists()}
            for f in missing.values():
                f.result()
        futures = {(setting, s, b): pool.submit(_job, recipe, out) for setting in settings for s in seeds
                   for b, (recipe, out) in _variants(setting, s, bits, args.work, dense).items()}
        for setting in settings:
            runs = {(s, b): futures[(setting, s, b)].result() for s in seeds for b in [32, *bits]}
            result["settings"][setting] = summarise(runs, bits, seeds, result["test_images"][setting])
    result["minutes"] = (time.perf_counter() - t0) / 60
    args.out.mkdir(parents=True, exist_ok=True)
    before = json.loads((args.out / "qat.json").read_text()) if (args.out / "qat.json").exists() else {}
    if before.get("seeds") == seeds and before.get("bits") == bits:  # settings run separately add up
        result["settings"] = {**before["settings"], **result["settings"]}
        result["minutes"] += before["minutes"]
    (args.out / "qat.json").write_text(json.dumps(result, indent=1))
    (args.out / "qat.md").write_text(markdown(result))
    print(markdown(result))


def _dense(recipe: dict, out: str) -> None:
    import snncompress as sc

    sc.train(sc.parse_recipe(recipe), out, resume=True, progress=False)


if __name__ == "__main__":
    main()
