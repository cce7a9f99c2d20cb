"""`snncompress compare`: budget mapping, variant recipes, aggregation, and a real (tiny) compare run."""

import json
import math
from pathlib import Path

import pytest

from snncompress.compare import compare, render_compare_markdown, summarise, variant_recipe, weight_density_for_keep
from snncompress.errors import SnnCompressError
from snncompress.plots import pareto_front
from snncompress.config import parse_recipe

from .conftest import TINY, cli, write_recipe


def test_weight_density_for_keep_hand():
    # TINY: vgg [8, 16, M, 16] on 1-channel 8x8 digits, 10 classes, min_channels 1
    # full: 1*8*9 + 8*16*9 + 16*16*9 + 16*10 = 72 + 1152 + 2304 + 160 = 3688 weights
    r = parse_recipe(TINY)
    # keep 0.5: 4, 8, 8 channels -> 1*4*9 + 4*8*9 + 8*8*9 + 8*10 = 36 + 288 + 576 + 80 = 980
    assert weight_density_for_keep(r, 0.5) == pytest.approx(980 / 3688)
    # keep 0.1: round_half_up(0.8, 1.6, 1.6) = 1, 2, 2 -> 9 + 18 + 36 + 20 = 83
    assert weight_density_for_keep(r, 0.1) == pytest.approx(83 / 3688)
    assert weight_density_for_keep(r, 1.0) == 1.0


def test_variant_recipes_map_keep_per_family():
    base = parse_recipe({**TINY, "prune": {**TINY["prune"], "budget": "pq"}})  # sca, keep 0.5, regrow 0.1
    v = variant_recipe(base, "random", 0.25, seed=3)
    assert (v.prune.method, v.prune.keep, v.seed, v.baseline) == ("random", 0.25, 3, False)
    assert v.prune.regrow == pytest.approx(0.05)  # the recipe's share of the kept channels: 0.1 / 0.5
    assert v.prune.budget == "pq" and v.name == "tiny-random-keep0.25-seed3"
    u = variant_recipe(base, "pq", 0.25, seed=0, density=0.2)
    assert u.prune.sparsity == pytest.approx(0.8) and u.prune.keep == 0.3 and u.prune.budget == "global"
    assert u.prune.warmup_epochs == base.prune.warmup_epochs and u.prune.min_channels == 1
    # an unstructured recipe: pq's own options carry over to pq only; structured variants get the default share
    pq = parse_recipe({**TINY, "prune": {"method": "pq", "sparsity": 0.9, "options": {"scope": "neuron", "eta": 0.001},
                                         "warmup_epochs": 1, "ramp_epochs": 2, "finetune_epochs": 1}})
    assert variant_recipe(pq, "pq", 0.5, 0, density=0.3).prune.options["scope"] == "neuron"
    c = variant_recipe(pq, "criticality_unstructured", 0.5, 0, density=0.3)
    assert c.prune.options == {"weight_regrow": 0.5} and c.prune.sparsity == pytest.approx(0.7)
    s = variant_recipe(pq, "sca", 0.5, 0)
    assert s.prune.sparsity is None and s.prune.regrow is None  # the method default: min(0.1, keep / 3)
    with pytest.raises(SnnCompressError, match="unknown method 'magic'"):
        variant_recipe(base, "magic", 0.5, 0)


def test_summary_mean_and_sample_std():
    def row(method, acc, sops):
        return {"method": method, "keep": 0.5, "family": "structured", "accuracy": acc, "kept_channels": 0.5,
                "connectivity": 0.3, "sops": sops, "macs": 10, "params": 100, "latency_ms": {"1": 1.0, "32": 8.0}}
    s = summarise([row("a", 0.9, 100), row("b", 0.5, 10), row("a", 0.8, 300)])
    assert [x["method"] for x in s] == ["a", "b"] and s[0]["n"] == 2
    assert s[0]["accuracy"] == pytest.approx((0.85, math.sqrt(0.005)))  # sample std of (0.9, 0.8)
    assert s[0]["sops"] == pytest.approx((200, math.sqrt(20000))) and s[1]["accuracy"] == (0.5, 0.0)
    # a variant that failed (e.g. slim verification) is left out of the statistics and listed under the table
    failed = {"method": "a", "keep": 0.5, "seed": 7, "run_dir": "x", "error": "slim model differs"}
    rows = [row("a", 0.9, 100), failed]
    s = summarise(rows)
    assert s[0]["n"] == 1 and s[0]["accuracy"] == (0.9, 0.0)
    md = render_compare_markdown({"recipe": {"name": "r"}, "seeds": [0], "density_for_keep": {}, "rows": rows}, s)
    assert "| a | 0.5 | 1 | 90.00 ± 0.00 |" in md and "- a keep 0.5 seed 7: slim model differs" in md


def test_pareto_front_hand():
    # (cost, accuracy): b is dominated by a (costlier, less accurate); d by c
    pts = [(1.0, 0.5), (2.0, 0.4), (3.0, 0.9), (4.0, 0.9), (0.5, 0.1)]
    assert pareto_front(pts) == [4, 0, 2]


@pytest.mark.slow
def test_compare_command_writes_table_json_and_plot_and_resumes(tmp_path):
    recipe = write_recipe(tmp_path / "tiny.yaml", TINY)
    out = tmp_path / "cmp"
    res = cli("compare", recipe, "--methods", "random,pq", "--keep", "0.5", "--seeds", "1", "--no-baseline",
              "-o", out)
    assert res.returncode == 0, res.stderr + res.stdout
    result = json.loads((out / "compare.json").read_text())
    assert [(r["method"], r["keep"], r["seed"]) for r in result["rows"]] == [("random", 0.5, 0), ("pq", 0.5, 0)]
    assert result["density_for_keep"]["0.5"] == pytest.approx(980 / 3688)
    rnd, pq = result["rows"]
    for r in result["rows"]:
        for key in ("accuracy", "kept_channels", "connectivity", "sops", "macs", "params"):
            assert isinstance(r[key], (int, float)), key
        assert set(r["latency_ms"]) == {"1", "32"} and (out / f"{r['method']}-keep0.5-seed0" / "bench.json").is_file()
    assert rnd["family"] == "structured" and rnd["kept_channels"] == pytest.approx(0.5)
    assert pq["family"] == "unstructured" and pq["sparsity"] == pytest.approx(1 - 980 / 3688)
    assert pq["connectivity"] < 0.3 and pq["sops"] < pq["sops_all_weights"]
    md = (out / "compare.md").read_text()
    assert "| random | 0.5 | 1 |" in md and "±" in md and "| pq | 0.5 | 1 |" in md
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ckpt_mtime = (out / "pq-keep0.5-seed0" / "train" / "ckpt.pt").stat().st_mtime_ns
    again = cli("compare", recipe, "--methods", "random,pq", "--keep", "0.5", "--no-baseline", "-o", out)
    assert again.returncode == 0 and "pq: train: done, skipped" in again.stdout
    assert (out / "pq-keep0.5-seed0" / "train" / "ckpt.pt").stat().st_mtime_ns == ckpt_mtime


@pytest.mark.parametrize("args, msg", [(["--methods", "sca,magic"], "unknown method(s) magic"),
                                       (["--keep", "0.5,x"], "--keep: expected a comma-separated list"),
                                       (["--keep", "1.5"], "every keep must be in (0, 1]")])
def test_compare_refuses_bad_arguments(tmp_path, args, msg):
    recipe = write_recipe(tmp_path / "tiny.yaml", TINY)
    res = cli("compare", recipe, *args, "-o", tmp_path / "c")
    assert res.returncode == 1 and msg in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "c" / "compare.json").exists()


@pytest.mark.slow
def test_compare_jobs_2_gives_the_rows_of_jobs_1_in_the_same_order(tmp_path):
    recipe = parse_recipe(TINY)
    rows, logs = {}, {}
    for jobs in (2, 1):
        logs[jobs] = []
        rows[jobs] = compare(recipe, tmp_path / f"jobs{jobs}", ["random", "pq"], [0.5], progress=False,
                             baseline=False, log=logs[jobs].append, jobs=jobs)["rows"]
    # everything but wall time (latency) and the output directory is the same, row for row
    def same(r):
        return {**{k: v for k, v in r.items() if k not in ("latency_ms", "run_dir")}, "run_dir": Path(r["run_dir"]).name}
    assert [same(r) for r in rows[2]] == [same(r) for r in rows[1]]
    assert [(r["method"], r["keep"], r["seed"]) for r in rows[2]] == [("random", 0.5, 0), ("pq", 0.5, 0)]
    assert all("error" not in r and set(r["latency_ms"]) == {"1", "32"} for r in rows[2])
    # the parent logs every variant's start and end (the workers' stages are not shown)
    assert sorted(logs[2]) == sorted([f"random keep 0.5 seed 0 -> {tmp_path / 'jobs2' / 'random-keep0.5-seed0'}",
                                      f"pq keep 0.5 seed 0 -> {tmp_path / 'jobs2' / 'pq-keep0.5-seed0'}",
                                      "random keep 0.5 seed 0: done", "pq keep 0.5 seed 0: done"])
    assert "random: train" in logs[1] and logs[1][-1] == "pq keep 0.5 seed 0: done"


@pytest.mark.parametrize("jobs", ["0", "257"])
def test_compare_refuses_jobs_out_of_range_in_one_line(tmp_path, jobs):
    recipe = write_recipe(tmp_path / "tiny.yaml", TINY)
    res = cli("compare", recipe, "--jobs", jobs, "-o", tmp_path / "c")
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().splitlines() == [f"error: compare: --jobs must be an integer from 1 to 256, got {jobs}"]
    assert not (tmp_path / "c").exists()


@pytest.mark.slow
def test_compare_jobs_raises_a_workers_error_as_itself_and_starts_no_more_variants(tmp_path):
    # the starting weights are read when a variant runs: in the worker, which fails at once
    recipe = parse_recipe({**TINY, "model": {**TINY["model"], "weights": str(tmp_path / "missing.pt")}})
    errors, logs = {}, {}
    for jobs in (1, 2):
        logs[jobs] = []
        with pytest.raises(SnnCompressError) as e:
            compare(recipe, tmp_path / f"jobs{jobs}", ["random", "l1", "criticality"], [0.5], progress=False,
                    baseline=False, log=logs[jobs].append, jobs=jobs)
        errors[jobs] = (type(e.value), str(e.value))
    assert type(e.value.__cause__).__name__ == "_RemoteTraceback"  # jobs 2: raised in a worker, its traceback kept
    assert errors[2] == errors[1] and "missing.pt" in errors[1][1]
    assert not any(line.startswith("criticality") for line in logs[2])  # the third variant never started
    assert not (tmp_path / "jobs2" / "compare.json").exists()
