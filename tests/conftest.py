import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from filelock import FileLock

# a tiny but real recipe: trains on digits in a few seconds
TINY = {
    "name": "tiny",
    "seed": 0,
    "model": {"name": "vgg", "layers": [8, 16, "M", 16]},
    "data": {"name": "digits", "T": 2, "batch_size": 128},
    "train": {"epochs": 4, "optimizer": {"name": "sgd", "lr": 0.1}},
    "prune": {"method": "sca", "keep": 0.5, "regrow": 0.1, "warmup_epochs": 1, "ramp_epochs": 2,
              "finetune_epochs": 1, "min_channels": 1},
}


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


# Under pytest-xdist every worker runs torch (and the CLI processes it starts) on one thread, so the
# workers share the cores instead of oversubscribing them (measured: 25 % more CPU time otherwise).
if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def cli(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run the real console entry point in a subprocess."""
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "snncompress", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, env=env)


def kill_training_after(recipe: Path, out: Path, epochs: int) -> None:
    """Run ``train`` in a subprocess and SIGKILL it once ``epochs`` epochs are logged (inside the next one)."""
    proc = subprocess.Popen([sys.executable, "-m", "snncompress", "train", str(recipe), "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline and \
            (not metrics.exists() or len(metrics.read_text().splitlines()) < epochs):
        time.sleep(0.01)
    assert proc.poll() is None, "training finished before it could be killed: the test would prove nothing"
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL


@pytest.fixture
def tiny_recipe(tmp_path: Path) -> Path:
    return write_recipe(tmp_path / "tiny.yaml", TINY)


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory) -> Path:
    """One real `snncompress run` of the tiny recipe (with baseline), shared by the tests that read it.

    Under pytest-xdist the workers share it too: the first builds it under a file lock, the others reuse it.
    """
    shared = tmp_path_factory.getbasetemp().parent if os.environ.get("PYTEST_XDIST_WORKER") \
        else tmp_path_factory.getbasetemp()
    d = shared / "shared-run"
    with FileLock(str(shared / "shared-run.lock")):
        if not (d / "out" / "bench.json").exists():
            d.mkdir(exist_ok=True)
            recipe = write_recipe(d / "tiny.yaml", {**TINY, "baseline": True})
            res = cli("run", recipe, "--out", d / "out")
            assert res.returncode == 0, res.stderr + res.stdout
    return d / "out"


@pytest.fixture(scope="session")
def measurement(tmp_path_factory):
    """``measurement(name, make)``: a cost unit's measurement before training (the latency unit times layers and
    networks for about 15 s), made once per session and unit across the xdist workers: ``make()``'s JSON."""
    shared = tmp_path_factory.getbasetemp().parent if os.environ.get("PYTEST_XDIST_WORKER") \
        else tmp_path_factory.getbasetemp()

    def get(name: str, make) -> dict:
        path = shared / f"measurement-{name}.json"
        with FileLock(str(path) + ".lock"):
            if not path.exists():
                path.write_text(json.dumps(make()))
        return json.loads(path.read_text())
    return get
