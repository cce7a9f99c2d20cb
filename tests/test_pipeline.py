"""Every command through the real CLI, on a real (tiny) digits run."""

import json
import shutil

import numpy as np
import pytest
import onnx
import torch

import snncompress as sc
from snncompress.export.onnx import read_onnx_metadata
from snncompress.runtime.sessions import ort_session

from .conftest import TINY, cli, write_recipe


def test_run_writes_every_artifact(run_dir):
    for f in ["train/ckpt.pt", "train/best.pt", "train/metrics.jsonl", "baseline/ckpt.pt", "slim.pt",
              "model.onnx", "dense.onnx", "baseline.onnx", "bench.json", "report.md",
              "channels.png", "sops.png", "firing.png", "latency.png"]:
        assert (run_dir / f).is_file(), f
    assert not list(run_dir.rglob("*.tmp"))  # atomic writes leave no temporaries
    rows = [json.loads(line) for line in (run_dir / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3]
    assert rows[0]["kept_channels"] == 1.0 and rows[-1]["kept_channels"] <= 0.55


def test_bench_json_schema(run_dir):
    report = json.loads((run_dir / "bench.json").read_text())
    for name in ("dense", "slim", "baseline"):
        m = report["models"][name]
        for key in ("params", "macs", "sops", "accuracy", "kept_channels", "firing_rate", "energy_uj"):
            assert isinstance(m[key], (int, float)), (name, key)
        assert 0 <= m["accuracy"] <= 1 and 0 < m["kept_channels"] <= 1
        for b in ("1", "32"):
            lat = m["latency_ms"][b]
            assert 0 < lat["min"] <= lat["median"] <= lat["max"]
    d, s = report["models"]["dense"], report["models"]["slim"]
    assert s["params"] < d["params"] and s["macs"] < d["macs"]
    assert s["accuracy"] == d["accuracy"] == s["accuracy_onnx"]  # slim and ONNX are exact
    assert report["models"]["baseline"]["kept_channels"] == 1.0
    assert set(report["speedup"]) == {"1", "32"} and report["settings"]["threads"] >= 1
    assert "Speedup" in (run_dir / "report.md").read_text()
    assert "![Latency](latency.png)" in (run_dir / "report.md").read_text()
    assert (run_dir / "sops.png").read_bytes()[:4] == b"\x89PNG"
    per_layer = report["models"]["slim"]["per_layer"]
    assert abs(sum(per_layer["sops"].values()) - report["models"]["slim"]["sops"]) < 1e-6 * max(1, s["sops"])
    assert set(per_layer["firing_rate"]) == {"features.conv1.spike", "features.conv2.spike", "features.conv3.spike"}


def test_checkpoint_round_trip_weights_only(run_dir):
    raw = torch.load(run_dir / "train" / "ckpt.pt", weights_only=True)
    assert raw["format"] == "snncompress.ckpt/1" and raw["history"] and raw["masks"]
    model = sc.load_model(run_dir / "train" / "ckpt.pt")
    assert not model.training
    for gate_name, gate in ((n, m) for n, m in model.named_modules() if isinstance(m, sc.ChannelGate)):
        group = gate_name.replace(".spike.gate", ".conv")
        assert torch.equal(gate.mask, raw["masks"][group])
    slim = sc.load_model(run_dir / "slim.pt")
    raw_slim = torch.load(run_dir / "slim.pt", weights_only=True)
    assert sum(p.numel() for p in slim.parameters()) == sum(t.numel() for k, t in raw_slim["state_dict"].items()
                                                            if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))


@pytest.mark.slow
def test_slim_export_bench_commands(run_dir, tmp_path):
    res = cli("slim", run_dir / "train" / "ckpt.pt", "-o", tmp_path / "s.pt")
    assert res.returncode == 0, res.stderr
    assert "params" in res.stdout and "->" in res.stdout and "MACs" in res.stdout
    # exported under the name the run layout gives the slim model, so bench measures this very file
    res = cli("export", tmp_path / "s.pt", "--onnx", "-o", tmp_path / "model.onnx")
    assert res.returncode == 0, res.stderr
    meta = read_onnx_metadata(tmp_path / "model.onnx")
    assert meta["T"] == str(TINY["data"]["T"]) and json.loads(meta["input_shape"]) == ["batch", 1, 8, 8]
    assert len(json.loads(meta["classes"])) == 10 and len(meta["source_sha256"]) == 64
    exported = (tmp_path / "model.onnx").stat().st_mtime_ns
    res = cli("bench", "--dense", run_dir / "train" / "ckpt.pt", "--slim", tmp_path / "s.pt", "-o", tmp_path, "--repeats", "20")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "bench.json").is_file() and "speedup" in res.stdout
    assert (tmp_path / "model.onnx").stat().st_mtime_ns == exported  # reused, not exported again
    assert (tmp_path / "dense.onnx").is_file()  # exported because it was missing
    # bench RUN_DIR on a copy of the shared run (its ONNX files are reused: same checkpoints)
    copy = shutil.copytree(run_dir, tmp_path / "run")
    res = cli("bench", copy, "--repeats", "20")
    assert res.returncode == 0, res.stderr
    assert "baseline" in json.loads((copy / "bench.json").read_text())["models"]


def test_exported_onnx_matches_pytorch_with_dynamic_batch(run_dir):
    model = sc.load_model(run_dir / "slim.pt")
    sess = ort_session(run_dir / "model.onnx")
    x = torch.randn(7, 1, 8, 8)
    from snncompress.export.unroll import UnrolledSNN

    with torch.no_grad():
        ref = UnrolledSNN(model, TINY["data"]["T"])(x).numpy()
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert got.shape == (7, 10) and np.abs(got - ref).max() <= 1e-4
    onnx.checker.check_model(onnx.load(run_dir / "model.onnx"))


@pytest.mark.slow
def test_dense_training_and_export(tmp_path):
    recipe = write_recipe(tmp_path / "dense.yaml", {**TINY, "prune": None, "train": {"epochs": 2}})
    res = cli("train", recipe, "--out", tmp_path / "d")
    assert res.returncode == 0, res.stderr
    res = cli("export", tmp_path / "d" / "ckpt.pt", "--onnx")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "d" / "ckpt.onnx").is_file()


def test_info_lists_models_and_versions():
    res = cli("info")
    assert res.returncode == 0 and "vgg" in res.stdout and "spikingjelly 2." in res.stdout


def test_export_with_folded_batchnorm(run_dir, tmp_path):
    res = cli("export", run_dir / "slim.pt", "--onnx", "--fold-bn", "-o", tmp_path / "f.onnx")
    assert res.returncode == 0, res.stderr
    assert "BatchNorm folded" in res.stdout and "predictions unchanged" in res.stdout
    ops = {n.op_type for n in onnx.load(tmp_path / "f.onnx").graph.node}
    assert "BatchNormalization" not in ops and "Conv" in ops
    assert "BatchNormalization" in {n.op_type for n in onnx.load(run_dir / "model.onnx").graph.node}
    assert read_onnx_metadata(tmp_path / "f.onnx")["bn_folded"] == "True"
