"""Seconds per training epoch: dense vs SCA vs criticality vs pq, on whatever device is present.

VGG-16 (CIFAR-sized 32x32 input, T = 4, batch 128) on synthetic data written in the CIFAR-10 binary
layout (the timing does not depend on the data). Each variant trains 2 epochs in its own process
(`snncompress train`): epoch 0 scores channels and ends with a mask update, epoch 1 is a frozen
fine-tune (no scoring), so the table shows what scoring costs and what a fine-tune epoch costs.
Seconds per epoch include the (small) test-set evaluation.

    python benchmarks/train_speed.py --out train_speed.json [--width 0.25] [--images 10000]

On a GPU run it at width 1; on the 2-core CPU machine at width 0.25.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from resources import write_cifar_bin  # noqa: E402  (a sibling script)

PRUNE = {"warmup_epochs": 0, "ramp_epochs": 1, "finetune_epochs": 1, "update_every": 1}
VARIANTS = {
    "dense": None,
    "sca": {"method": "sca", "keep": 0.5, "regrow": 0.05, **PRUNE},
    "criticality": {"method": "criticality", "keep": 0.5, "regrow": 0.05, **PRUNE},
    "pq": {"method": "pq", "sparsity": 0.5, **PRUNE},
}


def device_info() -> dict:
    """The device, the training dtype, and the spikingjelly neuron kernel that runs (read from the profiler)."""
    import torch
    from spikingjelly.activation_based import neuron

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    node = neuron.LIFNode(step_mode="m").to(dev)
    x = torch.rand(4, 8, 16, device=dev, requires_grad=True)
    with torch.profiler.profile() as prof:
        node(x).sum().backward()
    kernels = sorted({e.key for e in prof.key_averages() if "sj_" in e.key or "triton" in e.key.lower()})
    name = torch.cuda.get_device_name() if dev == "cuda" else (platform.processor() or platform.machine())
    return {"device": dev, "name": name, "dtype": "bf16 autocast" if dev == "cuda" else "fp32",
            "torch": torch.__version__, "neuron_kernels": kernels or ["python loop (no spikingjelly kernel op)"],
            "cpu_count": len(os.sched_getaffinity(0))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("train_speed.json"))
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--images", type=int, default=10_000, help="training images (the test set has 500)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="snnc-train-speed-"))
    write_cifar_bin(work / "cifar", n_train=args.images, n_test=500)
    rows = {}
    for label in args.variants:
        recipe = {"name": f"train-speed-{label}", "model": {"name": "vgg16", "width": args.width},
                  "data": {"name": "cifar10", "root": str(work / "cifar"), "T": 4, "batch_size": 128},
                  "train": {"epochs": 2, "device": "auto"}, "prune": VARIANTS[label]}
        path = work / f"{label}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "snncompress", "train", str(path), "--out", str(work / label)],
                              stdout=subprocess.DEVNULL)
        if proc.returncode:
            raise SystemExit(f"{label}: snncompress train failed ({proc.returncode})")
        metrics = [json.loads(line) for line in (work / label / "metrics.jsonl").read_text().splitlines()]
        rows[label] = {"scoring_epoch_s": metrics[0]["seconds"], "finetune_epoch_s": metrics[1]["seconds"],
                       "process_s": time.perf_counter() - t0}
        print(label, rows[label], flush=True)
    dense = rows.get("dense")
    for r in rows.values():
        if dense:
            r["scoring_vs_dense"] = r["scoring_epoch_s"] / dense["scoring_epoch_s"]
            r["finetune_vs_dense"] = r["finetune_epoch_s"] / dense["finetune_epoch_s"]
    result = {"machine": device_info(), "model": f"vgg16 width {args.width}", "input": "32x32, T=4, batch 128",
              "train_images": args.images, "rows": rows}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    m = result["machine"]
    lines = [f"Device: {m['device']} ({m['name']}), {m['dtype']}, torch {m['torch']}, neuron kernels: "
             f"{', '.join(m['neuron_kernels'])}; {m['cpu_count']} cores. VGG-16 width {args.width}, "
             f"{args.images} images 32x32, T = 4, batch 128.", "",
             "| variant | scoring epoch (s) | vs dense | fine-tune epoch (s) | vs dense |", "|---|---|---|---|---|"]
    for label, r in rows.items():
        lines.append(f"| {label} | {r['scoring_epoch_s']:.1f} | {r.get('scoring_vs_dense', float('nan')):.3f} | "
                     f"{r['finetune_epoch_s']:.1f} | {r.get('finetune_vs_dense', float('nan')):.3f} |")
    md = "\n".join(lines) + "\n"
    args.out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
