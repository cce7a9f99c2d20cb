"""Resume: a run killed at random points and resumed ends bitwise identical to an uninterrupted one."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from snncompress import parse_recipe, train

from .conftest import TINY, cli, write_recipe

# 8 epochs with a mask update every 2 epochs, so kills also land inside a score-accumulation window
RESUMABLE = {**TINY, "train": {"epochs": 8, "optimizer": {"name": "sgd", "lr": 0.1}},
             "prune": {**TINY["prune"], "warmup_epochs": 1, "ramp_epochs": 4, "finetune_epochs": 2,
                       "update_every": 2}}


def _same_checkpoints(a, b):
    ca, cb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert ca["epoch"] == cb["epoch"]
    for k in ca["state_dict"]:
        assert torch.equal(ca["state_dict"][k], cb["state_dict"][k]), k
    for g in ca["masks"]:
        assert torch.equal(ca["masks"][g], cb["masks"][g]), g
    assert [h["epoch"] for h in ca["history"]] == [h["epoch"] for h in cb["history"]]
    for ha, hb in zip(ca["history"], cb["history"]):
        assert all(torch.equal(ha["masks"][g], hb["masks"][g]) for g in ha["masks"])


@pytest.mark.slow
def test_killed_at_random_points_resumes_to_identical_weights_and_masks(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", RESUMABLE)
    ref = cli("train", recipe, "--out", tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr

    rng = random.Random(1234)
    out = tmp_path / "killed"
    metrics = out / "metrics.jsonl"
    lines = lambda: len(metrics.read_text().splitlines()) if metrics.exists() else 0  # noqa: E731
    kill_points = []  # (epochs logged when killed, seconds after that epoch's line appeared)
    for _ in range(4):
        proc = subprocess.Popen([sys.executable, "-m", "snncompress", "train", str(recipe), "--out", str(out),
                                 "--resume"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        start_lines = lines()
        # let this attempt make progress (one more epoch), then kill it at a random moment
        deadline = time.monotonic() + 120
        while proc.poll() is None and lines() <= start_lines and time.monotonic() < deadline:
            time.sleep(0.01)
        delay = rng.uniform(0.0, 0.2)
        time.sleep(delay)
        if proc.poll() is not None:
            break  # finished before the kill
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        kill_points.append((lines(), round(delay, 3)))
    final = cli("train", recipe, "--out", out, "--resume")
    assert final.returncode == 0, final.stderr
    print("kill points (epochs logged, seconds into the next):", kill_points)
    assert len(kill_points) >= 3
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))
    _same_checkpoints(tmp_path / "ref" / "ckpt.pt", out / "ckpt.pt")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == list(range(8))
    ref_metrics = [json.loads(line) for line in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    assert [m["train_loss"] for m in metrics] == [m["train_loss"] for m in ref_metrics]


@pytest.mark.slow
def test_resume_refuses_a_different_recipe(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", {**TINY, "train": {"epochs": 2}, "prune": None})
    assert cli("train", recipe, "--out", tmp_path / "o").returncode == 0
    other = write_recipe(tmp_path / "o.yaml", {**TINY, "train": {"epochs": 2, "optimizer": {"lr": 0.05}},
                                                "prune": None})
    res = cli("train", other, "--out", tmp_path / "o", "--resume")
    assert res.returncode == 1 and "train.optimizer.lr" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.slow
def test_resume_of_finished_training_changes_nothing(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", {**TINY, "train": {"epochs": 2}, "prune": None})
    assert cli("train", recipe, "--out", tmp_path / "o").returncode == 0
    before = (tmp_path / "o" / "ckpt.pt").read_bytes()
    assert cli("train", recipe, "--out", tmp_path / "o", "--resume").returncode == 0
    assert (tmp_path / "o" / "ckpt.pt").read_bytes() == before


@pytest.mark.slow
def test_run_resume_skips_finished_stages_and_redoes_unfinished(run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    recipe = write_recipe(tmp_path / "tiny.yaml", {**TINY, "baseline": True})
    status = json.loads((run / "run.json").read_text())
    assert all(s["status"] == "done" for s in status["stages"].values())
    # pretend the run was killed during export: export and bench must be redone, nothing else
    status["stages"]["export"]["status"] = "running"
    (run / "run.json").write_text(json.dumps(status))
    (run / "model.onnx").unlink()
    slim_mtime = (run / "slim.pt").stat().st_mtime_ns
    ckpt_mtime = (run / "train" / "ckpt.pt").stat().st_mtime_ns
    time.sleep(0.01)
    res = cli("run", recipe, "--out", run, "--resume")
    assert res.returncode == 0, res.stderr
    assert "train: done, skipped" in res.stdout and "slim: done, skipped" in res.stdout
    assert (run / "model.onnx").is_file()
    assert (run / "slim.pt").stat().st_mtime_ns == slim_mtime
    assert (run / "train" / "ckpt.pt").stat().st_mtime_ns == ckpt_mtime
    assert all(s["status"] == "done" for s in json.loads((run / "run.json").read_text())["stages"].values())


def test_a_run_removes_what_a_killed_write_left_behind(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    stale, other = out / ".ckpt.pt.k3x_9q2b.tmp", out / ".notes.tmp"  # a SIGKILLed save; not one of ours
    stale.write_bytes(b"half a checkpoint")
    other.write_text("the user's")
    train(parse_recipe({**TINY, "train": {**TINY["train"], "epochs": 1}, "prune": None}), out, progress=False)
    assert not stale.exists() and other.exists()
