import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

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


def cli(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run the real console entry point in a subprocess."""
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "snncompress", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, env=env)


@pytest.fixture
def tiny_recipe(tmp_path: Path) -> Path:
    return write_recipe(tmp_path / "tiny.yaml", TINY)


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory) -> Path:
    """One real `snncompress run` of the tiny recipe (with baseline), shared by the tests that read it."""
    d = tmp_path_factory.mktemp("run")
    recipe = write_recipe(d / "tiny.yaml", {**TINY, "baseline": True})
    res = cli("run", recipe, "--out", d / "out")
    assert res.returncode == 0, res.stderr + res.stdout
    return d / "out"
