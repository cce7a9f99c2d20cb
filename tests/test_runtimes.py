"""Deployment runtimes (onnxruntime, OpenVINO as an optional extra) and the pruning budget in bench reports.

Real sessions of both runtimes on the tiny trained run; OpenVINO's absence is simulated in a subprocess
(``sys.modules["openvino"] = None``), never by uninstalling it.
"""

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from importlib.metadata import version

import numpy as np
import pytest
import torch

import snncompress as sc
from snncompress.config import RUNTIMES, DeployCfg, parse_recipe
from snncompress.data import load_dataset
from snncompress.runtime.sessions import require_runtime, runtime_session, runtime_version
from snncompress.runtime.timing import time_call
from snncompress.errors import EXIT_USAGE, SnnCompressError, UsageError
from snncompress.evaluation import TOLERANCE, batch_logits, evaluate
from snncompress.metrics import count_macs
from snncompress.stages.bench import BenchSettings, budget_figures, timed_batches

from .conftest import TINY, cli, write_recipe

EXTRA = "pip install 'snncompress[openvino]'"
# runs the CLI with openvino unimportable, as on a machine without the extra
NO_OPENVINO = "import sys; sys.modules['openvino'] = None; sys.argv = ['snncompress', *sys.argv[1:]]; " \
              "from snncompress.cli import main; main()"


def _no_openvino_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", NO_OPENVINO, *map(str, args)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "COLUMNS": "200"})


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_each_runtime_gives_pytorchs_logits_on_the_exported_model(run_dir, runtime):
    T, enc = TINY["data"]["T"], "direct"
    data = load_dataset(parse_recipe(TINY).data, TINY["seed"])
    refs = {}
    for ckpt, onnx_file in (("slim.pt", "model.onnx"), ("train/ckpt.pt", "dense.onnx")):
        ref = refs[onnx_file] = evaluate(sc.load_model(run_dir / ckpt), data.x_test, data.y_test, T, enc)[2].numpy()
        session = runtime_session(runtime, run_dir / onnx_file, threads=1)
        got = batch_logits(lambda inp: session(inp.numpy()), data.x_test, T, enc)
        assert got.dtype == np.float32 and got.shape == ref.shape
        assert (got.argmax(1) == ref.argmax(1)).all() and np.abs(got - ref).max() <= TOLERANCE, (runtime, ckpt)
    # a static batch (OpenVINO compiles for it; onnxruntime ignores it), fed from the model's bytes
    x = data.x_test[:5].numpy()
    static = runtime_session(runtime, (run_dir / "model.onnx").read_bytes(), threads=1, batch=5)
    assert np.abs(static(x) - refs["model.onnx"][:5]).max() <= TOLERANCE
    assert np.array_equal(static(x.astype(np.float64)), static(x))  # any float input is fed as float32


def test_a_runtime_session_leaves_global_state_as_found(run_dir):
    def state():
        return (dict(os.environ), os.sched_getaffinity(0), torch.get_num_threads(),
                {n: logging.getLogger(n).level for n in ["", *logging.root.manager.loggerDict]})

    before = state()
    for runtime in RUNTIMES:
        session = runtime_session(runtime, run_dir / "model.onnx", threads=1, batch=2)
        session(np.zeros((2, 1, 8, 8), np.float32))
    after = state()
    assert after[:3] == before[:3]
    # loggers that existed keep their levels (importing openvino may add its own, at NOTSET)
    assert {n: lvl for n, lvl in after[3].items() if n in before[3]} == before[3]


def test_require_runtime_refuses_an_unknown_runtime_in_one_line():
    with pytest.raises(UsageError, match=r"^unknown runtime 'tensorrt'; allowed: onnxruntime, openvino$"):
        require_runtime("tensorrt")
    for runtime in RUNTIMES:
        require_runtime(runtime)  # both are installed in the development environment
    assert runtime_version("openvino") == version("openvino")
    res = cli("bench", "runs/none", "--runtime", "tensorrt")
    assert res.returncode == EXIT_USAGE and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == ["error: unknown runtime 'tensorrt'; allowed: onnxruntime, openvino"]


def test_a_missing_openvino_is_one_line_naming_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if not installed
    with pytest.raises(SnnCompressError, match=r"runtime openvino is not installed; install the extra: "
                                               r"pip install 'snncompress\[openvino\]'"):
        require_runtime("openvino")
    require_runtime("onnxruntime")
    # the CLI: one line on stderr, exit 1, no traceback; checked before anything is read
    res = _no_openvino_cli("bench", tmp_path / "no-such-run", "--runtime", "openvino")
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.strip().splitlines() == [f"error: runtime openvino is not installed; install the extra: {EXTRA}"]
    # a recipe that deploys on openvino fails before training, leaving nothing behind
    recipe = write_recipe(tmp_path / "ov.yaml", {**TINY, "deploy": {"runtime": "openvino"}})
    res = _no_openvino_cli("run", recipe, "--out", tmp_path / "out")
    assert res.returncode == 1 and "Traceback" not in res.stderr and EXTRA in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_bench_on_openvino_through_the_cli_states_the_runtime_and_the_budget(run_dir, tmp_path):
    copy = shutil.copytree(run_dir, tmp_path / "run")
    res = cli("bench", copy, "--runtime", "openvino", "--threads", "1", "--repeats", "20")
    assert res.returncode == 0, res.stderr
    assert "openvino" in res.stdout and "budget: keep 50.0% of the channels" in res.stdout
    report = json.loads((copy / "bench.json").read_text())
    s = report["settings"]
    assert s["runtime"] == "openvino" and s["runtime_version"] == version("openvino") == report["machine"]["openvino"]
    assert s["runtime_options"]["PERFORMANCE_HINT"] == "LATENCY" and s["runtime_options"]["INFERENCE_NUM_THREADS"] == 1
    assert s["threads"] == 1 and s["static_batch"] and s["batches"] == [1, 32]
    for name, m in report["models"].items():
        check = m["runtime_check"]
        assert check["runtime"] == "openvino" and check["enforced"] and check["agreement"] == 1
        assert check["max_abs_diff"] <= TOLERANCE and m["accuracy_onnx"] == m["accuracy"], name

    budget = report["budget"]  # TINY: keep 0.5 of the channels, latency measured at deploy.batch_size 32
    assert budget["unit"] == "channels" and budget["target"] == 0.5 and budget["latency_batch"] == 32
    assert budget["achieved"] == budget["ratios"]["channels"] == 0.5  # 20 of TINY's 40 channels
    macs = [count_macs(sc.load_model(copy / p), torch.zeros(2, 1, 1, 8, 8)) for p in ("slim.pt", "train/ckpt.pt")]
    assert budget["ratios"]["macs"] == macs[0] / macs[1] < 1  # as torch counts the two models
    assert budget["ratios"]["sops"] is None  # a channel budget records no dense SOPs to compare with
    md = (copy / "report.md").read_text()
    assert f"Runtime: **openvino {version('openvino')}**" in md and "Accuracy (openvino)" in md
    assert "Pruning budget: keep 50.0% of the dense model's conv channels (`prune.budget_unit: channels`" in md


def test_a_latency_budget_is_timed_at_the_recipes_deploy_batch(run_dir, tmp_path):
    # the dense checkpoint as a recipe with a latency budget at batch 8 would have written it
    ckpt = torch.load(run_dir / "train" / "ckpt.pt", weights_only=True)
    ckpt["recipe"]["prune"]["budget_unit"] = "latency"
    ckpt["recipe"]["deploy"] = {"runtime": "onnxruntime", "batch_size": 8, "threads": 1}
    torch.save(ckpt, tmp_path / "ckpt.pt")
    shutil.copy(run_dir / "slim.pt", tmp_path / "slim.pt")
    shutil.copy(run_dir / "model.onnx", tmp_path / "model.onnx")  # dense.onnx is exported: a new checkpoint
    report = sc.bench(tmp_path / "ckpt.pt", tmp_path / "slim.pt", tmp_path)  # settings from the recipe
    s = report["settings"]
    assert s["runtime"] == "onnxruntime" and s["threads"] == 1 and s["batches"] == [1, 8, 32]
    assert set(report["speedup"]) == {"1", "8", "32"}
    slim, budget = report["models"]["slim"], report["budget"]
    assert budget["unit"] == "latency" and budget["latency_batch"] == 8 and "8" in slim["latency_ms"]
    md = (tmp_path / "report.md").read_text()
    assert "keep 50.0% of the dense model's latency (`prune.budget_unit: latency`" in md
    assert "in the other units: conv channels" in md and "(latency: the median at batch 8 on onnxruntime)" in md


def test_budget_figures_by_hand():
    lat = lambda ms: {"median": ms, "min": ms, "max": ms}  # noqa: E731
    dense = {"kept_channels": 0.25, "macs": 1000, "sops": 400.0, "weight_bytes": 800,
             "latency_ms": {"1": lat(2.0), "16": lat(10.0)}}
    slim = {"kept_channels": 0.25, "macs": 300, "sops": 100.0, "weight_bytes": 200,
            "latency_ms": {"1": lat(1.0), "16": lat(4.0)}}
    recipe = parse_recipe({**TINY, "prune": {**TINY["prune"], "keep": 0.3, "budget_unit": "macs"},
                           "deploy": {"batch_size": 16}})
    assert timed_batches(recipe) == [1, 16, 32]
    assert budget_figures(recipe, dense, slim) == {
        "unit": "macs", "target": 0.3, "achieved": 0.3, "latency_batch": 16, "trained": None,
        "ratios": {"channels": 0.25, "macs": 0.3, "sops": None, "latency": 0.4, "memory": 0.25}}
    # SOPs: against the dense SOPs the training measured (the dense-shaped model's closed channels fire nothing)
    trained = {"unit": "sops", "dense": 500.0, "target": 125.0, "selected": 120.0}
    sops = parse_recipe({**TINY, "prune": {**TINY["prune"], "keep": 0.25, "budget_unit": "sops"}, "deploy": {"batch_size": 16}})
    got = budget_figures(sops, {**dense, "trained_budget": trained}, slim)
    assert got["achieved"] == got["ratios"]["sops"] == 0.2 and got["trained"] == trained
    assert budget_figures(parse_recipe({**TINY, "prune": None}), dense, slim) is None  # a dense run: no budget
    unstructured = parse_recipe({**TINY, "prune": {"method": "pq", "sparsity": 0.5, "warmup_epochs": 1,
                                                   "finetune_epochs": 1}})
    assert budget_figures(unstructured, dense, slim) is None  # its budget is weights: connectivity says it


AFFINITY = "import os, sys; os.sched_setaffinity(0, {0}); from snncompress.stages.bench import BenchSettings; " \
           "print(os.cpu_count(), BenchSettings().threads)"


def test_bench_settings_follow_the_recipes_deploy_section():
    assert BenchSettings().runtime == "onnxruntime"
    # threads: the cores this process may run on, not the machine's (a process pinned to one core)
    cores, threads = subprocess.run([sys.executable, "-c", AFFINITY], capture_output=True, text=True,
                                    check=True).stdout.split()
    assert threads == "1" and (int(cores) > 1 or pytest.skip("a one-core machine cannot tell the two apart"))
    s = BenchSettings.from_deploy(DeployCfg(runtime="openvino", threads=1))
    assert (s.runtime, s.threads, s.repeats) == ("openvino", 1, 30)
    s = BenchSettings.from_deploy(DeployCfg(runtime="openvino"), runtime="onnxruntime", threads=None, repeats=20)
    assert (s.runtime, s.threads, s.repeats) == ("onnxruntime", len(os.sched_getaffinity(0)), 20)


def test_time_call_reports_milliseconds():
    calls = []
    t = time_call(lambda: (calls.append(1), time.sleep(0.002)), warmup=2, repeats=5)
    assert len(calls) == 7 and 2 <= t["min"] and t["max"] < 1e3  # milliseconds: each call sleeps 2 ms
