"""Slim vs dense-shaped latency in onnxruntime and/or OpenVINO, against the ideal (MAC ratio) and this machine's GEMM.

For each model and keep fraction, random channel masks (seeded) are applied to an untrained
spiking model (latency does not depend on the weights' values), the dense-shaped gated model and
its slim version are exported to ONNX the same way `snncompress export` does, and both are timed
on each runtime asked for (`--runtime`; OpenVINO compiled with a static batch per batch size, as
`snncompress bench` does); PyTorch eager is timed too.

    ideal      = dense MACs / slim MACs
    achieved   = dense latency / slim latency                    (medians)
    efficiency = (slim MACs per batch / slim latency) / (fp32 GEMM MACs per second)

The GEMM reference is a 2048x2048 fp32 MatMul run by onnxruntime with the same thread count.

    python benchmarks/speedup.py --quick --out results.json    # VGG, keep 0.25, batch 32, all cores
    python benchmarks/speedup.py --out results.json            # the full grid
    python benchmarks/speedup.py --quick --runtime both        # the same rows on onnxruntime and OpenVINO
    python benchmarks/speedup.py --blocks                      # keep 0.25/0.1, round-to 1 vs auto, both runtimes

    ideal, padded = dense MACs / MACs with every group padded to this CPU's channel block (what the
                    runtimes compute: onnxruntime's NCHWc and OpenVINO's blocked layouts)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np
import torch
from onnx import TensorProto, helper
from spikingjelly.activation_based import functional

import snncompress as sc
from snncompress.config import RUNTIMES
from snncompress.errors import SnnCompressError
from snncompress.export.fold import fold_batchnorm
from snncompress.export.onnx import unrolled_onnx
from snncompress.export.unroll import UnrolledSNN
from snncompress.prune.blocks import channel_block, resolve_round_to
from snncompress.runtime.sessions import ort_session, require_runtime, runtime_session, runtime_version
from snncompress.runtime.timing import time_call
from snncompress.prune.gates import attach_gates, set_masks
from snncompress.metrics import count_macs

MODELS = {  # CPU-sized: VGG-16 at half width, ResNet-19 at quarter width; CIFAR-shaped input, T = 4
    "vgg16": {"name": "vgg16", "width": 0.5},
    "resnet19": {"name": "resnet19", "width": 0.25},
}
T, SHAPE = 4, (3, 32, 32)


def gemm_macs_per_s(threads: int, n: int = 2048, repeats: int = 10) -> float:
    """fp32 MatMul throughput of onnxruntime on this machine (MACs per second)."""
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "gemm",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n]),
                               helper.make_tensor_value_info("b", TensorProto.FLOAT, [n, n])],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    sess = ort_session(proto.SerializeToString(), threads)
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    ms = time_call(lambda: sess.run(None, {"a": a, "b": a}), 2, repeats)["median"]
    return n ** 3 / (ms / 1e3)


def build_pair(model_name: str, keep: float, round_to: int, seed: int = 0):
    """(dense-shaped gated model, slim model) with random masks keeping ``keep`` of every group."""
    torch.manual_seed(seed)
    spec = MODELS[model_name]
    model = sc.create_model(spec["name"], in_channels=SHAPE[0], num_classes=10, width=spec["width"])
    example = torch.zeros(T, 2, *SHAPE)
    attach_gates(model, example)
    model.eval()
    groups = sc.channel_groups(model, example)
    gen = torch.Generator().manual_seed(seed)
    masks = {}
    for g in groups:
        k = max(1, round(keep * g.size))
        if round_to > 1:
            k = min(g.size, -(-k // round_to) * round_to)
        m = torch.zeros(g.size, dtype=torch.bool)
        m[torch.randperm(g.size, generator=gen)[:k]] = True
        masks[g.name] = m
    set_masks(model, groups, masks)
    return model, sc.slim(model, masks, example)


def measure(model_name: str, keep: float, batches: list[int], threads_list: list[int], repeats: int,
            round_to: int, gemm: dict[int, float], fold_bn: bool = False, lean: bool = True,
            ort_level: str = "all", order: str = "step", runtimes: tuple[str, ...] = ("onnxruntime",)) -> list[dict]:
    dense, slim = build_pair(model_name, keep, round_to)
    if fold_bn:
        for m in (dense, slim):
            fold_batchnorm(m, torch.zeros(T, 2, *SHAPE))
    x1 = torch.randn(1, *SHAPE)
    macs = {"dense": count_macs(dense, x1.unsqueeze(0).repeat(T, 1, 1, 1, 1)),
            "slim": count_macs(slim, x1.unsqueeze(0).repeat(T, 1, 1, 1, 1)),
            # what the runtime computes: every group's channels padded to this CPU's channel block
            "padded": count_macs(build_pair(model_name, keep, max(round_to, channel_block()))[1],
                                 x1.unsqueeze(0).repeat(T, 1, 1, 1, 1))}
    protos = {k: unrolled_onnx(m, torch.randn(2, *SHAPE), T, lean=lean, order=order)
              for k, m in (("dense", dense), ("slim", slim))}
    rows = []
    for threads in threads_list:
        torch.set_num_threads(threads)
        for b in batches:
            x = np.random.default_rng(1).standard_normal((b, *SHAPE), dtype=np.float32)
            eager_ms = {}
            for k, m in (("dense", dense), ("slim", slim)):
                net = UnrolledSNN(m, T).eval()
                xt = torch.from_numpy(x)

                def call(net=net):
                    with torch.no_grad():
                        net(xt)
                    functional.reset_net(net.net)
                eager_ms[k] = time_call(call, 2, max(5, repeats // 2))
            for runtime in runtimes:
                if runtime == "onnxruntime":  # --ort-level applies to onnxruntime alone
                    sessions = {k: (lambda xb, s=ort_session(p.SerializeToString(), threads, ort_level):
                                    s.run(None, {s.get_inputs()[0].name: xb})) for k, p in protos.items()}
                else:
                    sessions = {k: runtime_session(runtime, p.SerializeToString(), threads, batch=b)
                                for k, p in protos.items()}
                run_ms = {k: time_call(lambda s=s: s(x), 3, repeats) for k, s in sessions.items()}
                slim_s = run_ms["slim"]["median"] / 1e3
                rows.append({
                    "model": model_name, "keep": keep, "round_to": round_to, "fold_bn": fold_bn, "lean": lean,
                    "runtime": runtime, "ort_level": ort_level, "order": order, "batch": b, "threads": threads,
                    "dense_macs": macs["dense"], "slim_macs": macs["slim"],
                    "ideal": macs["dense"] / macs["slim"], "ideal_padded": macs["dense"] / macs["padded"],
                    "achieved": run_ms["dense"]["median"] / run_ms["slim"]["median"],
                    "efficiency": macs["slim"] * b / slim_s / gemm[threads],
                    "dense_efficiency": macs["dense"] * b / (run_ms["dense"]["median"] / 1e3) / gemm[threads],
                    "runtime_ms": run_ms, "eager_ms": eager_ms,
                    "runtime_vs_eager": {k: eager_ms[k]["median"] / run_ms[k]["median"] for k in run_ms},
                })
                r = rows[-1]
                print(f"{model_name:9s} keep {keep:<4} batch {b:>2} threads {threads} {runtime:11s}: ideal "
                      f"{r['ideal']:.2f}x achieved {r['achieved']:.2f}x ({r['achieved'] / r['ideal']:.2f} of ideal), "
                      f"efficiency {r['efficiency']:.2f} (dense {r['dense_efficiency']:.2f}); vs eager "
                      f"{r['runtime_vs_eager']['slim']:.1f}x", flush=True)
    return rows


def markdown(result: dict) -> str:
    m = result["machine"]
    versions = ", ".join(f"{rt} {m[rt]}" for rt in RUNTIMES if rt in m)
    lines = [f"Machine: {m['processor']}, {m['cpu_count']} cores; {versions}, torch {m['torch']}; "
             f"fp32 GEMM (onnxruntime MatMul 2048²): " + ", ".join(f"{t} thread(s) {v / 1e9:.1f} GMAC/s" for t, v in result["gemm_macs_per_s"].items())
             + f"; {result['repeats']} timed runs (median); onnxruntime graph optimisation: {result['rows'][0]['ort_level']}; "
             "OpenVINO: CPU, LATENCY hint, f32, static batch.", "",
             "| model | keep | round to | BN folded | lean neurons | unroll | runtime | batch | threads | ideal | ideal, padded | achieved | of ideal | of padded ideal | slim GEMM eff. | dense GEMM eff. | runtime vs eager (slim) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {r['keep']} | {r['round_to']} | {r['fold_bn']} | {r['lean']} | {r['order']} | {r['runtime']} | {r['batch']} | {r['threads']} | {r['ideal']:.2f}× | {r['ideal_padded']:.2f}× | {r['achieved']:.2f}× | "
                     f"{r['achieved'] / r['ideal']:.2f} | {r['achieved'] / r['ideal_padded']:.2f} | {r['efficiency']:.2f} | {r['dense_efficiency']:.2f} | {r['runtime_vs_eager']['slim']:.1f}× |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="VGG only, keep 0.25, batch 32, all cores")
    ap.add_argument("--out", type=Path, default=Path("speedup.json"))
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--round-to", nargs="+", default=["1"],
                    help="round kept channels up to a multiple of this (auto: this CPU's channel block); several: a row each")
    ap.add_argument("--blocks", action="store_true", help="the channel-block rows: VGG-16/2, keep 0.25 and 0.1, batch "
                    "32, all cores, round-to 1 and auto, both runtimes")
    ap.add_argument("--fold-bn", action="store_true", help="fold BatchNorm into the convs before export")
    ap.add_argument("--sj-neurons", action="store_true", help="export spikingjelly's neuron ops, not the lean form")
    ap.add_argument("--order", choices=["step", "layer"], default="step", help="how the time steps are unrolled")
    ap.add_argument("--ort-level", choices=["disable", "basic", "extended", "all"], default="all",
                    help="onnxruntime graph-optimisation level")
    ap.add_argument("--runtime", choices=[*RUNTIMES, "both"], default="onnxruntime",
                    help="the runtime(s) to time on (openvino: pip install 'snncompress[openvino]')")
    args = ap.parse_args()
    if args.blocks:
        args.round_to, args.runtime = ["1", "auto"], "both"
    runtimes = tuple(RUNTIMES) if args.runtime == "both" else (args.runtime,)
    round_tos = list(dict.fromkeys(resolve_round_to(r if r == "auto" else int(r)) for r in args.round_to))
    try:
        for rt in runtimes:
            require_runtime(rt)  # before minutes of measuring: a missing runtime fails at once
    except SnnCompressError as e:
        sys.exit(f"error: {e}")
    cores = os.cpu_count() or 1
    if args.quick:
        models, keeps, batches, threads = ["vgg16"], [0.25], [32], [cores]
    elif args.blocks:
        models, keeps, batches, threads = ["vgg16"], [0.25, 0.1], [32], [cores]
    else:
        models, keeps, batches, threads = list(MODELS), [0.75, 0.5, 0.25, 0.1], [1, 32], sorted({1, cores})
    gemm = {t: gemm_macs_per_s(t) for t in threads}
    rows = [r for name in models for keep in keeps for round_to in round_tos
            for r in measure(name, keep, batches, threads, args.repeats, round_to, gemm, args.fold_bn,
                             not args.sj_neurons, args.ort_level, args.order, runtimes)]
    result = {"machine": {"processor": platform.processor() or platform.machine(), "cpu_count": cores,
                          "platform": platform.platform(), "torch": torch.__version__,
                          **{rt: runtime_version(rt) for rt in dict.fromkeys(("onnxruntime", *runtimes))}},
              "repeats": args.repeats, "gemm_macs_per_s": {str(t): v for t, v in gemm.items()}, "rows": rows}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
