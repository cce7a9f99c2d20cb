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


# The integration tests that take longest; `pytest -m "not slow"` leaves them out (a quick lane),
# `make test` and CI run everything.
SLOW = {
    "test_slim_export_bench_commands", "test_killed_at_random_points_resumes_to_identical_weights_and_masks",
    "test_run_killed_mid_training_resumes_under_torchrun", "test_compare_command_writes_table_json_and_plot_and_resumes",
    "test_slim_and_onnx_equal_the_masked_residual_net", "test_pq_killed_and_resumed_matches_uninterrupted",
    "test_untrusted_factory_checkpoint_never_imports_its_module", "test_dense_training_and_export",
    "test_factory_checkpoint_needs_trust_in_every_command", "test_factory_model_runs_through_every_stage",
    "test_two_processes_pick_identical_masks_at_every_update", "test_pipeline_runs_on_real_formats",
    "test_resume_refuses_a_different_recipe", "test_resume_of_finished_training_changes_nothing",
    "test_unstructured_methods_agree_on_weight_masks_across_processes", "test_two_processes_reach_single_process_accuracy",
    "test_run_resume_skips_finished_stages_and_redoes_unfinished", "test_slim_checkpoints_load_without_torch_pruning",
    "test_step_unrolled_graph_has_no_per_layer_split_and_the_same_logits",
    "test_tutorial_style_multi_step_only_model_runs_through_every_stage",
    "test_run_from_trained_weights_through_slim_export_and_bench",
    "test_training_on_frames_is_the_same_with_dataloader_workers",
    "test_resume_mid_ramp_with_a_sop_budget_is_bitwise_identical", "test_cost_budgets_agree_across_processes",
}


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a long integration test (deselect with -m 'not slow')")


def pytest_collection_modifyitems(items):
    for item in items:
        if item.originalname in SLOW or item.name in SLOW:
            item.add_marker(pytest.mark.slow)
