"""Integer ONNX (QDQ: int8 weights, uint8 spike inputs) against float32, on onnxruntime and OpenVINO.

The slim VGG-16/2 (CIFAR-shaped input, T = 4) at keep 0.25 with random masks (latency does not depend on the
weights' values) is quantised as quantisation-aware training leaves it (8 bits, one scale per output channel,
BatchNorm folded), then exported twice the way `snncompress export` does: float32, and with every conv on spikes
as an integer conv (`snncompress.export.onnx.integer_convs`). The dense-shaped float32 model is the whole
compression's reference. All three are timed back to back in one process on each runtime (batch 32, 2 threads,
median of --repeats), and the integer graph's logits are checked against PyTorch's quantised network.

    python benchmarks/integer.py [--keep 0.25] [--batch 32] [--threads 2] [--repeats 20]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
from pathlib import Path

import numpy as np
import torch

from snncompress.config import RUNTIMES, QuantWeightsCfg
from snncompress.evaluation import TOLERANCE
from snncompress.export.fold import fold_batchnorm
from snncompress.export.onnx import integer_convs, unrolled_onnx
from snncompress.export.unroll import UnrolledSNN
from snncompress.quant import attach_fake_quant, detach_fake_quant
from snncompress.runtime.sessions import runtime_session, runtime_version
from snncompress.runtime.timing import time_call
from speedup import SHAPE, T, build_pair

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--keep", type=float, default=0.25)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--bits", type=int, default=8)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dense, slim = build_pair("vgg16", args.keep, 1)
    example = torch.zeros(T, 2, *SHAPE)
    attach_fake_quant(slim, example, QuantWeightsCfg(bits=args.bits))
    detach_fake_quant(slim.eval(), bake=True)  # what a quantised checkpoint loads as
    for m in (dense, slim):
        fold_batchnorm(m, example)
    x = np.random.default_rng(1).standard_normal((args.batch, *SHAPE), dtype=np.float32)
    with torch.no_grad():
        reference = UnrolledSNN(copy.deepcopy(slim), T).eval()(torch.from_numpy(x)).numpy()
    protos = {name: unrolled_onnx(m, torch.randn(2, *SHAPE), T) for name, m in (("dense fp32", dense),
                                                                                  ("slim fp32", slim))}
    protos["slim int8"] = copy.deepcopy(protos["slim fp32"])
    n_int = integer_convs(protos["slim int8"], args.bits, "channel")
    rows, checks = [], {}
    for runtime in RUNTIMES:
        sessions = {k: runtime_session(runtime, p.SerializeToString(), args.threads, batch=args.batch)
                    for k, p in protos.items()}
        got = sessions["slim int8"](x)
        diff = float(np.abs(got - reference).max())
        checks[runtime] = {"max_abs_diff": diff, "same_predictions": bool((got.argmax(1) == reference.argmax(1)).all()),
                           "within_tolerance": diff <= TOLERANCE}
        ms = {k: time_call(lambda s=s: s(x), 3, args.repeats) for k, s in sessions.items()}
        row = {"runtime": runtime, "version": runtime_version(runtime), "ms": ms,
               "int8_vs_slim_fp32": ms["slim fp32"]["median"] / ms["slim int8"]["median"],
               "int8_vs_dense_fp32": ms["dense fp32"]["median"] / ms["slim int8"]["median"],
               "slim_fp32_vs_dense_fp32": ms["dense fp32"]["median"] / ms["slim fp32"]["median"]}
        rows.append(row)
        print(runtime, {k: round(v["median"], 2) for k, v in ms.items()}, f"int8 vs slim fp32 "
              f"{row['int8_vs_slim_fp32']:.2f}x, vs dense fp32 {row['int8_vs_dense_fp32']:.2f}x; check {checks[runtime]}",
              flush=True)
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
              "model": "vgg16 width 0.5, CIFAR-shaped input, T = 4", "keep": args.keep, "batch": args.batch,
              "threads": args.threads, "repeats": args.repeats, "bits": args.bits, "integer_convs": n_int,
              "rows": rows, "checks": checks}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "integer.json").write_text(json.dumps(result, indent=1))
    lines = ["# Integer ONNX against float32 (`benchmarks/integer.py`)", "",
             f"{result['model']}, keep {args.keep} (random masks), batch {args.batch}, {args.threads} threads, median of "
             f"{args.repeats}; {result['machine']}; {n_int} conv nodes on spikes as int8 x uint8 (QDQ), the first "
             "conv (on the image) and the readout float.", "",
             "| runtime | dense fp32 (ms) | slim fp32 (ms) | slim int8 (ms) | int8 vs slim fp32 | int8 vs dense fp32 | "
             "int8 logits vs PyTorch (max abs diff, same predictions) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        c = checks[r["runtime"]]
        lines.append(f"| {r['runtime']} {r['version']} | {r['ms']['dense fp32']['median']:.2f} | "
                     f"{r['ms']['slim fp32']['median']:.2f} | {r['ms']['slim int8']['median']:.2f} | "
                     f"{r['int8_vs_slim_fp32']:.2f}x | {r['int8_vs_dense_fp32']:.2f}x | {c['max_abs_diff']:.2g}, "
                     f"{c['same_predictions']} |")
    (args.out / "integer.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
