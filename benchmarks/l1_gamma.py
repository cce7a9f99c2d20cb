"""How strong must the L1 penalty on BatchNorm gamma be to make gamma sparse (criticality's dense pre-training)?

Trains recipes/mnist5k-wide-dense.yaml with each lambda (train.l1_gamma) and BatchNorm gamma/beta free of weight
decay (train.optimizer.bn_decay: false), plus the same recipe without the penalty and with weight decay on BN (the
control), and reports per run: test accuracy, and the fraction of |gamma| below 1 % of its layer's maximum (what a
keep of k needs: at least 1 - k of them).

    python benchmarks/l1_gamma.py [--lambdas 0.003,0.01,0.03] [--seeds 1] [--jobs 2] [--epochs 10]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def _job(recipe: dict, out: str) -> dict:
    import torch

    torch.set_num_threads(1)
    import snncompress as sc
    from snncompress.config import parse_recipe

    t0 = time.perf_counter()
    res = sc.train(parse_recipe(recipe), out, progress=False)
    state = torch.load(res.ckpt, weights_only=True)["state_dict"]
    gammas = {k[:-len(".weight")]: v.abs() for k, v in state.items()
              if k.endswith(".weight") and k[:-len(".weight")] + ".running_var" in state}
    sparse = {k: float((g < 0.01 * g.max()).float().mean()) for k, g in gammas.items()}
    total = sum(int((g < 0.01 * g.max()).sum()) for g in gammas.values()) / sum(g.numel() for g in gammas.values())
    return {"accuracy": res.metrics[-1]["test_acc"], "sparse_by_layer": sparse, "sparse": total,
            "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lambdas", default="0.003,0.01,0.03")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    base = yaml.safe_load((ROOT / "recipes" / "mnist5k-wide-dense.yaml").read_text())
    variants = [("control: l1 1e-4, weight decay on BN", 1e-4, True)]
    variants += [(f"l1 {lam:g}, no weight decay on BN", lam, False) for lam in map(float, args.lambdas.split(","))]
    t0 = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp, ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        futures = []
        for seed in range(args.seeds):
            for name, lam, decay in variants:
                train = {**base["train"], "epochs": args.epochs, "l1_gamma": lam,
                         "optimizer": {**base["train"]["optimizer"], "bn_decay": decay}}
                recipe = {**base, "seed": seed, "train": train}
                futures.append(((name, seed), pool.submit(_job, recipe, f"{tmp}/{len(futures)}")))
        for (name, seed), f in futures:
            rows.append({"variant": name, "seed": seed, **f.result()})
            print(name, seed, f"{100 * rows[-1]['accuracy']:.2f} %", f"sparse {rows[-1]['sparse']:.2f}", flush=True)
    result = {"machine": {"processor": platform.machine(), "cpu_count": __import__("os").cpu_count()},
              "epochs": args.epochs, "jobs": args.jobs, "minutes": (time.perf_counter() - t0) / 60, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "l1_gamma.json").write_text(json.dumps(result, indent=1))
    lines = [f"recipes/mnist5k-wide-dense.yaml, {args.epochs} epochs, {args.jobs} runs at a time, one thread each, "
             f"{result['minutes']:.1f} min. Sparse: |gamma| < 1 % of its layer's max (all layers / per layer).", "",
             "| variant | seed | accuracy | sparse | per layer |", "|---|---|---|---|---|"]
    for r in rows:
        per = " / ".join(f"{v:.2f}" for v in r["sparse_by_layer"].values())
        lines.append(f"| {r['variant']} | {r['seed']} | {100 * r['accuracy']:.2f} | {r['sparse']:.2f} | {per} |")
    (args.out / "l1_gamma.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
