"""Training under torchrun: 2 real processes, DDP over gloo on loopback, a short digits run.

Masks identical on both ranks at every update, accuracy like a single process, resume after a kill,
`run` (rank 0 alone slims, exports and benches), and a clear error when ranks disagree. Every
process is bounded in time, and the tests check that none is left behind.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from snncompress.distributed import check_masks_agree, masks_sha256

from .conftest import TINY, write_recipe

pytestmark = [
    pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="process-tree checks read Linux /proc"),
    pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                       reason="torch without gloo"),
]

# data.batch_size is per process: 2 x 32 here has the global batch (and the steps) of 1 x 64
DDP = {**TINY, "name": "ddp", "model": {"name": "vgg", "layers": [16, 32, "M", 32]},
       "data": {"name": "digits", "T": 2, "batch_size": 32},
       "train": {"epochs": 8, "optimizer": {"name": "sgd", "lr": 0.2}},
       "prune": {**TINY["prune"], "warmup_epochs": 2, "ramp_epochs": 3, "finetune_epochs": 3}}
SINGLE = {**DDP, "data": {**DDP["data"], "batch_size": 64}}
UPDATES = [2, 3, 4]  # mask updates end epochs 2..4 (warm-up 2, ramp 3, fine-tune 3 of 8)
# Accuracy on the 360 test digits after 8 epochs moves by several points with anything that changes
# the order of the samples, and a 2-process run visits them in another order (DistributedSampler),
# with BatchNorm statistics of 32 samples. Measured over seeds 0-4: one process ends at 0.85-0.94,
# two at 0.84-0.90, the largest difference at one seed 0.04. The tolerance is the spread over seeds
# (another CPU's float rounding is much like another seed) plus a margin.
ACC_TOLERANCE = 0.12
TIMEOUT = 240  # seconds per launch: generous for 2 shared CPU cores, yet a hang cannot stall CI
LOG_LINE = re.compile(r"\[rank (\d+)\] epoch (\d+): masks sha256 ([0-9a-f]{64})")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    # loopback only: gloo would otherwise pick the interface of the host name
    return {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, start time) of a process, None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1]), int(fields[19])


def _descendants(root: int) -> set[tuple[int, int]]:
    """(pid, start time) of every live descendant of ``root``."""
    children: dict[int, list[tuple[int, int]]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (st := _stat(int(entry.name))) and st[0] != "Z":
            children.setdefault(st[1], []).append((int(entry.name), st[2]))
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child[0])
    return found


def _alive(proc: tuple[int, int]) -> bool:
    st = _stat(proc[0])
    return st is not None and st[0] != "Z" and st[2] == proc[1]  # same start time: not a reused pid


class Job:
    """A process tree (torchrun and its workers, which torchrun puts in sessions of their own)."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None):
        self.log = log
        with open(log, "w") as f:  # a file, not a pipe: an orphaned worker cannot block the reader
            self.proc = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, env=env or _env(),
                                         start_new_session=True)
        self.seen: set[tuple[int, int]] = set()

    def wait(self, timeout: float = TIMEOUT, until=None) -> int | None:
        """Exit code; None once ``until()`` holds first. Kills the whole tree on timeout."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            self.seen |= _descendants(self.proc.pid)
            if until is not None and until():
                return None
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"{self.proc.args} ran past {timeout} s; killed. Output:\n{self.output()}")
            time.sleep(0.02)
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL torchrun and every worker (by pid, all of them started by this job)."""
        for pid, _ in self.seen | _descendants(self.proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def survivors(self) -> list[int]:
        time.sleep(0.2)  # reaping by the parent is not instantaneous
        return [pid for pid, start in self.seen if _alive((pid, start))]

    def output(self) -> str:
        return self.log.read_text()


@pytest.fixture
def jobs():
    """Started jobs; whatever a failing test leaves running is killed."""
    started: list[Job] = []
    yield started
    for job in started:
        if job.proc.poll() is None or job.survivors():
            job.kill()


def torchrun(jobs: list[Job], log: Path, *args: str) -> Job:
    job = Job([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={_free_port()}", "-m", "snncompress", *map(str, args)], log)
    jobs.append(job)
    return job


def _mask_logs(output: str) -> dict[int, dict[int, str]]:
    """{rank: {epoch: sha256}} from the lines each rank writes to its stderr at a mask update."""
    logs: dict[int, dict[int, str]] = {}
    for r, epoch, digest in LOG_LINE.findall(output):
        logs.setdefault(int(r), {})[int(epoch)] = digest
    return logs


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory) -> tuple[Path, str]:
    """One uninterrupted 2-process `train` of DDP: (out dir, combined output of torchrun and ranks)."""
    d = tmp_path_factory.mktemp("ddp")
    recipe = write_recipe(d / "ddp.yaml", DDP)
    started: list[Job] = []
    try:
        job = torchrun(started, d / "log.txt", "train", recipe, "--out", d / "out")
        code = job.wait()
        assert code == 0, job.output()
        assert job.survivors() == []
        return d / "out", job.output()
    finally:
        for j in started:
            if j.proc.poll() is None:
                j.kill()


@pytest.mark.slow
def test_two_processes_pick_identical_masks_at_every_update(two_process_run):
    out, output = two_process_run
    logs = _mask_logs(output)
    assert sorted(logs) == [0, 1], output
    assert sorted(logs[0]) == UPDATES and logs[0] == logs[1]
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert [h["epoch"] for h in ckpt["history"]] == UPDATES
    for h in ckpt["history"]:  # the agreed hash is the hash of the masks rank 0 saved
        assert h["mask_sha256"] == logs[1][h["epoch"]] == masks_sha256(h["masks"])
    # only rank 0 wrote, and completely: no second copy, no temporary file
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "ckpt.pt", "metrics.jsonl"]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == list(range(8)) and all(m["world_size"] == 2 for m in metrics)
    assert output.count("test accuracy") == 1  # the summary comes from rank 0 alone
    # both ranks removed the same channels after the last update and trained the slim network (re-wrapped)
    assert [m["slim"] for m in metrics] == [False] * 5 + [True] * 3 and "kept_index" in ckpt
    assert ckpt["state_dict"]["features.conv2.conv.weight"].shape[0] == int(ckpt["masks"]["features.conv2.conv"].sum())


@pytest.mark.slow
def test_two_processes_reach_single_process_accuracy(two_process_run, tmp_path, jobs):
    out, _ = two_process_run
    t0 = time.monotonic()
    job = Job([sys.executable, "-m", "snncompress", "train", str(write_recipe(tmp_path / "single.yaml", SINGLE)),
               "--out", str(tmp_path / "single")], tmp_path / "single.txt")
    jobs.append(job)
    assert job.wait() == 0, job.output()
    single = [json.loads(line) for line in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    double = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    a1, a2 = single[-1]["test_acc"], double[-1]["test_acc"]
    print(f"final test accuracy: 1 process {a1:.4f}, 2 processes {a2:.4f} ({time.monotonic() - t0:.1f} s single run)")
    assert a1 > 0.7 and a2 > 0.7  # both learned
    assert abs(a1 - a2) <= ACC_TOLERANCE
    # train metrics are reduced over both ranks: every sample of the epoch is counted once
    assert double[0]["samples_per_s"] * double[0]["seconds"] == pytest.approx(1438)  # 1437, padded to 2 x 719


@pytest.mark.slow
def test_run_killed_mid_training_resumes_under_torchrun(two_process_run, tmp_path, jobs):
    reference, _ = two_process_run
    recipe = write_recipe(tmp_path / "ddp.yaml", DDP)
    ckpt = tmp_path / "run" / "train" / "ckpt.pt"
    job = torchrun(jobs, tmp_path / "killed.txt", "run", recipe, "--out", tmp_path / "run")
    assert job.wait(until=ckpt.exists) is None, job.output()  # the first checkpoint is written ...
    job.kill()  # ... and every process of the job dies at once, mid-training
    assert job.survivors() == []
    killed_at = torch.load(ckpt, weights_only=True)["epoch"]
    assert killed_at < 7

    job = torchrun(jobs, tmp_path / "resumed.txt", "run", recipe, "--out", tmp_path / "run", "--resume")
    assert job.wait() == 0, job.output()
    assert job.survivors() == []
    status = json.loads((tmp_path / "run" / "run.json").read_text())
    assert {s: v["status"] for s, v in status["stages"].items()} == dict.fromkeys(
        ["train", "slim", "export", "bench"], "done")
    assert job.output().count("speedup (slim vs dense-shaped") == 1  # slim/export/bench on rank 0 only
    # the resumed run ends exactly where the uninterrupted one did: same weights, masks, history
    a, b = torch.load(reference / "ckpt.pt", weights_only=True), torch.load(ckpt, weights_only=True)
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"]), f"killed at {killed_at}"
    assert [h["mask_sha256"] for h in a["history"]] == [h["mask_sha256"] for h in b["history"]]
    metrics = [json.loads(line) for line in (tmp_path / "run" / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == list(range(8))


# A rank's view of the job, with torchrun's environment contract: two processes that build
# rank-dependent statistics and masks, then call the real reductions and the real check.
WORKER = r"""
import sys, torch
from snncompress import distributed
from snncompress.errors import SnnCompressError
from snncompress.prune.gates import ChannelGroup
from snncompress.prune.scorer import ChannelMeans

with distributed.session():
    r = distributed.rank()
    acc = ChannelMeans([ChannelGroup("a", 2, ["c"]), ChannelGroup("b", 3, ["d"])])
    acc.add("a", torch.tensor([1.0, 2.0]) * (r + 1), 2 + r)
    acc.add("b", torch.full((3,), 0.5), 1)
    distributed.sum_across_ranks(acc.tensors())
    assert acc.sum["a"].tolist() == [3.0, 6.0] and acc.sum["b"].tolist() == [1.0] * 3, acc.sum
    assert acc.counts() == {"a": 5, "b": 2}, acc.counts()
    distributed.gather_on_main(acc.tensors())  # rank 0 holds the sum over ranks, the others nothing
    assert acc.counts() == ({"a": 10, "b": 4} if r == 0 else {"a": 0, "b": 0}), acc.counts()
    try:
        distributed.check_agree(str(5 * r), "the epoch to start from")
    except SnnCompressError as e:
        print("epochs:", e, flush=True)
    same = {"conv1": torch.tensor([True, False, True])}
    print("agreed", distributed.check_masks_agree(same, 2), flush=True)
    differ = {"conv1": torch.tensor([True, r == 0, True]), "conv2": torch.ones(4, dtype=torch.bool)}
    try:
        distributed.check_masks_agree(differ, 5)
    except SnnCompressError as e:
        print("error:", e, flush=True)
        sys.exit(3)
print("no error", flush=True)
"""


def test_mask_mismatch_stops_every_rank_with_a_clear_error(tmp_path, jobs):
    port = _free_port()
    ranks = []
    for r in range(2):
        env = {**_env(), "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        ranks.append(Job([sys.executable, "-c", WORKER], tmp_path / f"rank{r}.txt", env))
    jobs.extend(ranks)
    codes = [job.wait(timeout=120) for job in ranks]
    outputs = [job.output() for job in ranks]
    assert codes == [3, 3], outputs
    same = masks_sha256({"conv1": torch.tensor([True, False, True])})
    differ = [masks_sha256({"conv1": torch.tensor([True, r == 0, True]), "conv2": torch.ones(4, dtype=torch.bool)})
              for r in range(2)]
    for r, out in enumerate(outputs):
        assert "epochs: the epoch to start from differs across ranks (rank 0: 0; rank 1: 5); stopped" in out
        assert f"agreed {same}" in out and f"[rank {r}] epoch 2: masks sha256 {same}" in out
        assert f"[rank {r}] epoch 5: masks sha256 {differ[r]}" in out
        error = next(line for line in out.splitlines() if line.startswith("error:"))
        assert "keep-masks (sha256) of the update at the end of epoch 5 differs across ranks" in error
        assert f"rank 0: {differ[0][:12]}" in error and f"rank 1: {differ[1][:12]}" in error and "stopped" in error
    assert all(job.survivors() == [] for job in ranks)


def test_mask_hash_outside_torchrun():
    a = {"g1": torch.tensor([True, False]), "g2": torch.tensor([True, True, False])}
    flipped = {"g1": torch.tensor([True, False]), "g2": torch.tensor([True, False, False])}
    assert check_masks_agree(a, 0) == masks_sha256(a) == masks_sha256({k: v.clone() for k, v in a.items()})
    assert masks_sha256(flipped) != masks_sha256(a)


FAILING_RANK = r"""
import torch
from snncompress import distributed

with distributed.session():
    if distributed.rank() == 1:
        raise RuntimeError("rank 1 fails before the collective")
    distributed.all_reduce_sum(torch.ones(1))  # rank 0 waits for a rank that will never come
"""


def test_a_failing_rank_stops_the_job_without_a_hang(tmp_path, jobs):
    script = tmp_path / "fail.py"
    script.write_text(FAILING_RANK)
    job = Job([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={_free_port()}", str(script)], tmp_path / "fail.txt")
    jobs.append(job)
    t0 = time.monotonic()
    assert job.wait(timeout=90) != 0
    assert "rank 1 fails before the collective" in job.output()
    assert time.monotonic() - t0 < 60 and job.survivors() == []


@pytest.mark.parametrize("method", ["criticality_unstructured", "pq"])
@pytest.mark.slow
def test_unstructured_methods_agree_on_weight_masks_across_processes(method, tmp_path, jobs):
    # criticality is gathered per process from its own shard: without the all-reduce the ranks
    # would rank different weights and the mask check would stop the job
    recipe = write_recipe(tmp_path / "u.yaml", {**DDP, "train": {**DDP["train"], "epochs": 4}, "prune": {
        "method": method, "sparsity": 0.8, "warmup_epochs": 1, "ramp_epochs": 2, "finetune_epochs": 1}})
    job = torchrun(jobs, tmp_path / "log.txt", "train", recipe, "--out", tmp_path / "out")
    assert job.wait() == 0, job.output()
    logs = _mask_logs(job.output())
    assert sorted(logs) == [0, 1] and logs[0] == logs[1] and len(logs[0]) >= 2, job.output()
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    assert ckpt["weight_masks"] and ckpt["metrics"]["connectivity"] < 0.5


@pytest.mark.parametrize("unit", ["sops", "latency"])
@pytest.mark.slow
def test_cost_budgets_agree_across_processes(unit, tmp_path, jobs):
    # SOPs are measured per process on its shard and summed; the latency table is measured by rank 0 alone
    # and sent: either way every rank must select the same masks under the same budget
    recipe = write_recipe(tmp_path / "b.yaml", {**DDP, "train": {**DDP["train"], "epochs": 4}, "prune": {
        **DDP["prune"], "budget_unit": unit, "keep": 0.4, "warmup_epochs": 1, "ramp_epochs": 2,
        "finetune_epochs": 1}, "deploy": {"batch_size": 8}})
    job = torchrun(jobs, tmp_path / "log.txt", "train", recipe, "--out", tmp_path / "out")
    assert job.wait() == 0, job.output()
    logs = _mask_logs(job.output())
    assert sorted(logs) == [0, 1] and logs[0] == logs[1] and len(logs[0]) == 2, job.output()
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    budget = ckpt["history"][-1]["budget"]
    assert budget["unit"] == unit and budget["dense"] > 0
    if unit == "sops":
        assert budget["selected"] <= budget["target"]
    else:  # 16-32 channels in blocks of 8 or 16 cannot reach every target: the table is what must agree
        assert ckpt["train_state"]["pruner"]["cost"]["tables"]


@pytest.mark.slow
def test_quantisation_aware_training_under_torchrun(tmp_path, jobs):
    # quant from the first epoch through the slim fine-tune's surgery (re-attached, DDP re-wrapped), with a
    # memory budget counted at 4 bits: the ranks agree on the masks and the checkpoint holds the quantised network
    recipe = write_recipe(tmp_path / "q.yaml", {**DDP, "train": {**DDP["train"], "epochs": 4}, "prune": {
        **DDP["prune"], "budget_unit": "memory", "keep": 0.4, "warmup_epochs": 1, "ramp_epochs": 1,
        "finetune_epochs": 2}, "quant": {"weights": {"bits": 4}, "start": "begin"}})
    job = torchrun(jobs, tmp_path / "log.txt", "train", recipe, "--out", tmp_path / "out")
    assert job.wait() == 0, job.output()
    logs = _mask_logs(job.output())
    assert sorted(logs) == [0, 1] and logs[0] == logs[1], job.output()
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    assert ckpt["quant"] == {"bits": 4, "granularity": "channel"} and "kept_index" in ckpt
    assert ckpt["history"][-1]["budget"]["selected"] <= ckpt["history"][-1]["budget"]["target"]
