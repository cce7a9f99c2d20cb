"""Budgets in MACs, SOPs and latency: does the slim model land on the target in its unit?

For each model, unit and keep: train with ``prune.budget_unit`` (a short SCA schedule), slim, and measure
the slim model with bench's counters:

    macs     slim MACs (torch's FlopCounterMode, as bench) / dense MACs
    sops     slim SOPs on the test set (spikingjelly's SynOpCounter, as bench) / the dense SOPs the
             training measured (its reference, recorded in the checkpoint's history)
    latency  slim / dense-shaped median latency of the exported ONNX models on deploy.runtime at
             deploy.batch_size, timed back to back (median of --repeats each) in 5 rounds: the median ratio

and report ``achieved / target`` (1.00 = on target). Also the accuracy, so units can be compared.

    python benchmarks/budget.py --quick                                   # quickstart VGG, macs/sops, keep 0.25
    python benchmarks/budget.py --out benchmarks/results/budget.json      # the full grid (16 min here)
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import snncompress as sc
from snncompress.data import encode, graph_input, load_dataset
from snncompress.metrics import count_macs, spike_stats

ROOT = Path(__file__).resolve().parents[1]
ROUNDS = 5  # latency: rounds of dense then slim
MODELS = {
    "vgg-quickstart": {"name": "vgg", "layers": [64, 128, "M", 256, "M", 256]},
    "resnet19-w0.25": {"name": "resnet19", "width": 0.25},
}


def recipe_for(model: str, unit: str, keep: float, epochs: int, seed: int) -> sc.Recipe:
    base = sc.load_recipe(ROOT / "recipes" / "quickstart.yaml").model_dump(mode="json")
    ramp = max(1, epochs - 4)
    base.update(name=f"{model}-{unit}-{keep}", seed=seed, baseline=False)
    base["model"] = {**MODELS[model], "neuron": base["model"]["neuron"]}
    base["train"]["epochs"] = epochs
    base["prune"].update(budget_unit=unit, keep=keep, regrow=min(0.1, keep / 3), warmup_epochs=1, ramp_epochs=ramp,
                         finetune_epochs=epochs - 1 - ramp)
    return sc.parse_recipe(base)


def measure(model: str, unit: str, keep: float, epochs: int, seed: int, repeats: int, work: Path) -> dict:
    recipe = recipe_for(model, unit, keep, epochs, seed)
    out = work / recipe.name
    t0 = time.perf_counter()
    res = sc.train(recipe, out, progress=False)
    train_s = time.perf_counter() - t0
    slim_path = out / "slim.pt"
    sc.slim_checkpoint(res.ckpt, slim_path)
    ckpt = sc.load_checkpoint(res.ckpt)
    budget = ckpt["history"][-1]["budget"]
    data = load_dataset(recipe.data, recipe.seed)
    T, enc = recipe.data.T, recipe.data.encoding
    slim, dense = sc.load_model(slim_path), sc.load_model(res.ckpt)
    row = {"model": model, "unit": unit, "keep": keep, "seed": seed, "epochs": epochs, "train_s": train_s,
           "budget": budget, "kept_per_group": ckpt["history"][-1]["kept"]}
    macs = count_macs(slim, encode(data.x_test[:1], T, enc)) / count_macs(dense, encode(data.x_test[:1], T, enc))
    stats = spike_stats(slim, data.x_test, T, enc)
    row["achieved"] = {"macs": macs, "sops": stats["sops"] / budget["dense"] if unit == "sops" else None}
    row["accuracy"] = sc.evaluate(slim, data.x_test, data.y_test, T, enc)[1]
    if unit == "latency":
        from snncompress.export.onnx import unrolled_onnx
        from snncompress.runtime.sessions import runtime_session
        from snncompress.runtime.timing import time_call

        runtime, batch = recipe.deploy.runtime, recipe.deploy.batch_size
        x = graph_input(data.x_test[torch.arange(batch) % len(data.x_test)], T, enc).numpy()
        # the graphs export writes (step order, lean neurons), unverified: a masked model can flip a spike at
        # the threshold in step order and fail export's check, which says nothing about its speed
        sessions = [runtime_session(runtime, unrolled_onnx(m, torch.from_numpy(x[:2]), T, enc).SerializeToString(),
                                    recipe.deploy.threads, batch) for m in (dense, slim)]
        # in rounds of `repeats` calls of each, dense then slim, and the median of the rounds' ratios: the
        # machine's load drifts (one run measured the dense model at 10.8 ms, the next at 8.8). Not call by
        # call: an idle onnxruntime session's threads spin for a while after a call and slow the other down
        rounds = [[time_call(lambda s=s: s(x), 5, repeats)["median"] for s in sessions] for _ in range(ROUNDS)]
        row["achieved"]["latency"] = float(np.median([s / d for d, s in rounds]))
        row["latency_ms"] = {"dense": float(np.median([d for d, _ in rounds])),
                             "slim": float(np.median([s for _, s in rounds])), "runtime": runtime, "batch": batch,
                             "rounds": ROUNDS, "table_dense": budget["dense"],
                             "fit": {k: ckpt["train_state"]["pruner"]["cost"][k] for k in ("scale", "elem")}}
    row["on_target"] = row["achieved"][unit] / keep
    return row


def render(rows: list[dict], meta: dict) -> str:
    lines = ["# Budgets in their units: achieved / target", "",
             f"{meta['machine']}; torch {meta['torch']}; {meta['epochs']} epochs SCA per row, seed {meta['seed']}.", "",
             "| model | unit | keep | achieved | achieved / target | MACs ratio | accuracy | kept per group |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['unit']} | {r['keep']} | {r['achieved'][r['unit']]:.4f} | "
                     f"{r['on_target']:.3f} | {r['achieved']['macs']:.4f} | {r['accuracy']:.4f} | "
                     f"{list(r['kept_per_group'].values())} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="quickstart VGG, macs and sops, keep 0.25")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--units", nargs="+", default=["macs", "sops", "latency"])
    ap.add_argument("--keeps", nargs="+", type=float, default=[0.5, 0.25, 0.1])
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=25)
    ap.add_argument("--out", type=Path, default=Path("budget.json"))
    args = ap.parse_args()
    if args.quick:
        args.models, args.units, args.keeps = ["vgg-quickstart"], ["macs", "sops"], [0.25]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            for unit in args.units:
                for keep in args.keeps:
                    rows.append(measure(model, unit, keep, args.epochs, args.seed, args.repeats, Path(tmp)))
                    r = rows[-1]
                    print(f"{model} {unit} keep {keep}: achieved {r['achieved'][unit]:.4f} "
                          f"({r['on_target']:.3f} of target), accuracy {r['accuracy']:.4f}, {r['train_s']:.0f} s",
                          flush=True)
    meta = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
            "torch": torch.__version__, "epochs": args.epochs, "seed": args.seed}
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    args.out.with_suffix(".md").write_text(render(rows, meta))
    print(render(rows, meta))


if __name__ == "__main__":
    main()
