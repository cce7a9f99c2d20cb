"""Does the pruning decision beat chance, and what does a compressed trained network lose? A protocol on MNIST-5k.

Phases (each reuses what an earlier run of the protocol left in --work):

dense     dense seeds of recipes/mnist5k-wide-dense.yaml (criticality's pre-training: L1 on BatchNorm gamma).
rank      (no fine-tuning) at each keep, every method scores the trained dense network (one scoring window of
          training batches, learning rate 0, criticality measured at the update as published), keeps the same
          number of channels in every group (prune.allocation: layer, regrow 0 but criticality's 5 %), BatchNorm
          recalibrated; against --random pure-random masks with the same per-group counts, recalibrated the same
          way. Accuracy right after pruning; per dense seed the difference to the mean of the random masks; over
          seeds the mean difference and its 95 % t-interval (paired by dense seed).
truth     per group, Spearman rho between each method's scores and the loss increase from closing that channel
          alone (eval mode, on fixed training batches), mean over seeds.
finetune  from trained weights (recipes/mnist5k-from-trained.yaml, one-shot; and the gradual recipe), every method
          and, for each, a random control that keeps the method's own per-group counts (so the same MACs), with
          the same pipeline (distillation, recalibration, slim fine-tune); paired differences over seeds with 95 %
          intervals; accuracy before and after fine-tuning; the best method against the dense network.

The test set has 1000 images (MNIST-5k, test_fraction 0.2): an accuracy near 97 % has a binomial sampling error of
about 0.54 points, which the tables state; the differences are paired on the same images and dense seeds.

    python benchmarks/quality.py [--quick] [--seeds 5] [--jobs 2] [--phases dense,rank,truth,finetune]

--quick: 1 dense seed of 4 epochs, keep 0.5, 5 random masks, one method and its control fine-tuned 3 epochs (under
10 minutes on 2 cores); written as quality-quick.*. Jobs run in --jobs spawned processes, one torch thread each.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch
import yaml
from pydantic import Field

import snncompress as sc
from snncompress.prune.options import MethodOptions
from snncompress.prune.scorer import Scorer

ROOT = Path(__file__).resolve().parent.parent
RANK_METHODS = ("sca", "bn", "l1", "criticality", "tp_taylor", "tp_lamp")
FINETUNE_METHODS = ("bn", "l1", "sca", "criticality", "tp_taylor")
SCORE_BATCHES = 16  # the scoring window of the rank phase (training batches of 64)
TRUTH_BATCHES = 2  # training batches the loss increase of a closed channel is measured on
RECALIBRATE = 8  # batches BatchNorm statistics are re-estimated on (the recipes' prune.recalibrate_bn)


class CountedRandom(Scorer):
    """The random control of a fine-tuned method: in each group, ``options.counts[group]`` channels drawn uniformly
    (seeded) score above 2, the others below 1; with ``keep`` = their total share and ``regrow: 0`` the selection
    keeps exactly those (every count is at least the floor)."""

    class Options(MethodOptions):
        counts: dict[str, int] = Field(default_factory=dict)

    def __init__(self, model, groups, options=None, seed: int = 0):
        super().__init__(model, groups, options, seed)
        gen = torch.Generator().manual_seed(10_007 + seed)
        self._scores = {}
        for g in groups:
            s = torch.rand(g.size, generator=gen, dtype=torch.float64)
            s[torch.randperm(g.size, generator=gen)[:self.options.counts[g.name]]] += 2.0
            self._scores[g.name] = s

    def scores(self):
        return {n: s.clone() for n, s in self._scores.items()}

    regrowth_scores = scores


sc.register_method("counted_random")(CountedRandom)


def _recipe(name: str) -> dict:
    return yaml.safe_load((ROOT / "recipes" / name).read_text())


def _threads() -> None:
    torch.set_num_threads(1)


# --- dense ----------------------------------------------------------------------------------------------------

def _train_job(recipe: dict, out: str) -> dict:
    """Train (or resume) one recipe; for a pruned one also the accuracy right after its last mask update."""
    from snncompress.config import parse_recipe

    t0 = time.perf_counter()
    r = parse_recipe(recipe)
    res = sc.train(r, out, resume=True, progress=False)
    ckpt = torch.load(res.ckpt, weights_only=True)
    updates = [m for m in res.metrics if m["mask_update"]]
    return {"accuracy": res.metrics[-1]["test_acc"], "seconds": time.perf_counter() - t0, "epochs": r.train.epochs,
            "after_prune": updates[-1]["test_acc"] if updates else None,
            "kept": {g: int(m.sum()) for g, m in ckpt["masks"].items()}, "ckpt": str(res.ckpt)}


# --- rank and truth -------------------------------------------------------------------------------------------

def _batches(data, recipe, n: int, start: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from snncompress.data import encode

    size = recipe.data.batch_size
    return [(encode(data.x_train[i:i + size], recipe.data.T, recipe.data.encoding), data.y_train[i:i + size])
            for i in range(start, start + n * size, size)]


def _rank_job(ckpt_path: str, keeps: list[float], methods: list[str], n_random: int, truth: bool) -> dict:
    """Everything of one dense seed: the methods' masks and accuracies at each keep, the random masks', and the
    per-channel loss increases with the methods' scores."""
    import torch.nn.functional as F
    from spikingjelly.activation_based import functional

    from snncompress.artifacts import load_checkpoint
    from snncompress.checkpoint import model_from_checkpoint, recipe_of
    from snncompress.config import PruneCfg
    from snncompress.data import encode, load_dataset
    from snncompress.evaluation import evaluate
    from snncompress.prune.gates import set_masks
    from snncompress.prune.groups import channel_groups
    from snncompress.prune.pruner import build_pruner
    from snncompress.prune.select import layer_budgets
    from snncompress.prune.structured import recalibrate_bn
    from snncompress.stages.train import train_step

    _threads()
    ckpt = load_checkpoint(ckpt_path)
    recipe = recipe_of(ckpt)
    data = load_dataset(recipe.data, recipe.seed)
    T, enc = recipe.data.T, recipe.data.encoding
    base = model_from_checkpoint(ckpt)
    groups = channel_groups(base, encode(data.x_train[:2], T, enc))
    calibration = [x for x, _ in _batches(data, recipe, RECALIBRATE)]
    scoring = _batches(data, recipe, SCORE_BATCHES)
    n_all = math.ceil(len(data.x_train) / recipe.data.batch_size)  # criticality measures over the training set
    accuracy = lambda m: evaluate(m, data.x_test, data.y_test, T, enc)[1]  # noqa: E731

    def recalibrated(model):
        def forward():
            model.train()
            with torch.no_grad():
                for x in calibration:
                    model(x)
                    functional.reset_net(model)
        recalibrate_bn(model, forward)
        return model

    out = {"dense": accuracy(base), "methods": {}, "random": {}, "scores": {}}
    for method in methods:
        for keep in keeps:
            model = copy.deepcopy(base)
            cfg = PruneCfg(method=method, keep=keep, regrow=None if method == "criticality" else 0.0,
                           allocation="layer", warmup_epochs=0, ramp_epochs=0, finetune_epochs=0,
                           recalibrate_bn=RECALIBRATE)
            opt = torch.optim.SGD([p for n, p in model.named_parameters() if not n.endswith(".gate")], lr=0.0)
            pruner = build_pruner(model, groups, cfg, 1, recipe.seed, opt,
                                  batches=lambda n: [x for x, _ in _batches(data, recipe, n or n_all)])
            pruner.begin_epoch(0)
            model.train()
            for x, y in scoring:  # the weights stay (learning rate 0); the scores and gradients accumulate
                train_step(model, x, y, opt, pruner, torch.autocast("cpu", enabled=False))
                functional.reset_net(model)
            if keep == keeps[0]:
                pruner.scorer.measure(pruner._forward)
                out["scores"][method] = {n: s.tolist() for n, s in pruner.scorer.scores().items()}
            entry = pruner.end_epoch(0)
            pruner.remove()
            out["methods"].setdefault(method, {})[str(keep)] = {"accuracy": accuracy(model), "kept": entry["kept"]}
    for keep in keeps:
        counts = layer_budgets({g.name: torch.zeros(g.size) for g in groups}, keep, 2)
        gen = torch.Generator().manual_seed(recipe.seed)
        accs = []
        for _ in range(n_random):
            masks = {g.name: torch.zeros(g.size, dtype=torch.bool) for g in groups}
            for g in groups:
                masks[g.name][torch.randperm(g.size, generator=gen)[:counts[g.name]]] = True
            model = copy.deepcopy(base)
            set_masks(model, groups, masks)
            accs.append(accuracy(recalibrated(model)))
        out["random"][str(keep)] = {"accuracies": accs, "kept": counts}
    if truth:
        batches = _batches(data, recipe, TRUTH_BATCHES, start=SCORE_BATCHES * recipe.data.batch_size)

        def loss(model) -> float:
            model.eval()
            total = 0.0
            with torch.no_grad():
                for x, y in batches:
                    total += F.cross_entropy(model(x), y, reduction="sum").item()
                    functional.reset_net(model)
            return total / sum(len(y) for _, y in batches)

        model = copy.deepcopy(base)
        full = {g.name: torch.ones(g.size, dtype=torch.bool) for g in groups}
        reference = loss(model)
        increase = {}
        for g in groups:
            rises = []
            for c in range(g.size):
                masks = {**full, g.name: full[g.name].clone()}
                masks[g.name][c] = False
                set_masks(model, groups, masks)
                rises.append(loss(model) - reference)
            increase[g.name] = rises
        set_masks(model, groups, full)
        out["increase"] = increase
    return out


# --- statistics -----------------------------------------------------------------------------------------------

def interval(values: list[float]) -> dict:
    """Mean, sample std and the 95 % t-interval of the mean."""
    from scipy import stats

    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")
    half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n) if n > 1 else float("nan")
    return {"mean": mean, "std": sd, "n": n, "low": mean - half, "high": mean + half}


def sampling_error(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n)


def summarise_rank(seeds: list[dict], keeps: list[float], methods: list[str]) -> list[dict]:
    rows = []
    for keep in keeps:
        k = str(keep)
        rand = [sum(s["random"][k]["accuracies"]) / len(s["random"][k]["accuracies"]) for s in seeds]
        for method in methods:
            acc = [s["methods"][method][k]["accuracy"] for s in seeds]
            above = [sum(a > r for r in s["random"][k]["accuracies"]) / len(s["random"][k]["accuracies"])
                     for a, s in zip(acc, seeds)]
            rows.append({"keep": keep, "method": method, "accuracy": interval(acc), "random": interval(rand),
                         "difference": interval([a - r for a, r in zip(acc, rand)]),
                         "share_of_random_below": sum(above) / len(above),
                         "kept": seeds[0]["methods"][method][k]["kept"]})
    return rows


def summarise_truth(seeds: list[dict], methods: list[str]) -> list[dict]:
    from scipy.stats import spearmanr

    rows = []
    for method in methods:
        per_group = {}
        for g in seeds[0]["increase"]:
            rhos = [spearmanr(s["scores"][method][g], s["increase"][g]).statistic for s in seeds]
            per_group[g] = interval([0.0 if math.isnan(r) else r for r in rhos])
        rows.append({"method": method, "rho": per_group})
    return rows


def summarise_finetune(runs: dict, methods: list[str], seeds: list[int], dense: list[float]) -> list[dict]:
    rows = []
    for variant in sorted({v for v, _ in runs}):
        for method in methods:
            mine = [runs[(variant, s)][method] for s in seeds if (variant, s) in runs and method in runs[(variant, s)]]
            ctrl = [runs[(variant, s)].get(f"random-{method}") for s in seeds if (variant, s) in runs]
            if not mine:
                continue
            acc = [r["accuracy"] for r in mine]
            row = {"variant": variant, "method": method, "accuracy": interval(acc),
                   "after_prune": interval([r["after_prune"] for r in mine]),
                   "to_dense": interval([a - d for a, d in zip(acc, dense)]), "kept": mine[0]["kept"],
                   "epochs": mine[0]["epochs"], "seconds": interval([r["seconds"] for r in mine])["mean"]}
            if all(c is not None for c in ctrl) and ctrl:
                row["random"] = interval([c["accuracy"] for c in ctrl])
                row["difference"] = interval([a - c["accuracy"] for a, c in zip(acc, ctrl)])
            rows.append(row)
    return rows


# --- report ---------------------------------------------------------------------------------------------------

def _pm(i: dict, scale: float = 100.0) -> str:
    return f"{scale * i['mean']:.2f} ± {scale * i['std']:.2f}" if i["n"] > 1 else f"{scale * i['mean']:.2f}"


def _ci(i: dict, scale: float = 100.0) -> str:
    return f"{scale * i['mean']:+.2f} [{scale * i['low']:+.2f}, {scale * i['high']:+.2f}]" if i["n"] > 1 \
        else f"{scale * i['mean']:+.2f}"


def markdown(result: dict) -> str:
    m, n_test = result["machine"], result["test_images"]
    dense = interval(result["dense"])
    lines = [f"Machine: {m['processor']}, {m['cpu_count']} cores, torch {m['torch']}; {result['jobs']} jobs, one torch "
             f"thread each; {result['minutes']:.1f} min. Dense recipe {result['dense_recipe']} "
             f"({result['dense_epochs']} epochs), seeds {result['seeds']}: {_pm(dense)} % on {n_test} test images "
             f"(binomial sampling error of one accuracy: ± {100 * sampling_error(dense['mean'], n_test):.2f} points; "
             "the differences below are paired on the same images and dense seeds). Intervals: 95 % t over seeds.",
             ""]
    if result.get("rank"):
        lines += ["## Ranking without fine-tuning (same per-group counts, BatchNorm recalibrated)", "",
                  f"Each method against {result['random_masks']} pure-random masks per dense seed with the same counts.",
                  "", "| keep | method | kept | accuracy | random (mean of masks) | method − random [95 % CI] | "
                  "random masks below |", "|---|---|---|---|---|---|---|"]
        for r in result["rank"]:
            kept = "/".join(str(v) for v in r["kept"].values())
            lines.append(f"| {r['keep']} | {r['method']} | {kept} | {_pm(r['accuracy'])} | {_pm(r['random'])} | "
                         f"{_ci(r['difference'])} | {100 * r['share_of_random_below']:.0f} % |")
        lines.append("")
    if result.get("truth"):
        groups = list(result["truth"][0]["rho"])
        lines += ["## Agreement with the truth: Spearman rho with the loss increase of closing one channel", "",
                  "| method | " + " | ".join(groups) + " |", "|---|" + "---|" * len(groups)]
        for r in result["truth"]:
            lines.append(f"| {r['method']} | " + " | ".join(_ci(r["rho"][g], 1.0) for g in groups) + " |")
        lines.append("")
    if result.get("finetune"):
        lines += ["## After fine-tuning, from the trained weights", "",
                  "Random control: the method's own per-group counts (the same MACs), drawn at random, same pipeline.",
                  "", "| variant | method | kept | epochs | right after pruning | after fine-tuning | − dense [95 % CI] "
                  "| random control | method − random [95 % CI] | s / run |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in result["finetune"]:
            kept = "/".join(str(v) for v in r["kept"].values())
            rnd = (_pm(r["random"]), _ci(r["difference"])) if "random" in r else ("–", "–")
            lines.append(f"| {r['variant']} | {r['method']} | {kept} | {r['epochs']} | {_pm(r['after_prune'])} | "
                         f"{_pm(r['accuracy'])} | {_ci(r['to_dense'])} | {rnd[0]} | {rnd[1]} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    rows = result.get("rank") or []
    for i, keep in enumerate(sorted({r["keep"] for r in rows}, reverse=True)):
        sel = [r for r in rows if r["keep"] == keep]
        xs = [j + 0.3 * i for j in range(len(sel))]
        ax.errorbar(xs, [100 * r["difference"]["mean"] for r in sel],
                    yerr=[100 * (r["difference"]["high"] - r["difference"]["mean"]) if r["difference"]["n"] > 1 else 0
                          for r in sel], fmt="o", capsize=3, label=f"keep {keep}")
        ax.set_xticks(range(len(sel)), [r["method"] for r in sel])
    ax.axhline(0, color="k", linewidth=0.8)
    ax.set_ylabel("accuracy − random masks (points), 95 % CI")
    ax.set_title("Right after pruning, same per-group counts, BN recalibrated")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# --- main -----------------------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--random", type=int, default=20, help="pure-random masks per dense seed and keep")
    ap.add_argument("--phases", default="dense,rank,truth,finetune")
    ap.add_argument("--ft-methods", default="", help="methods fine-tuned (default: " + ",".join(FINETUNE_METHODS) + ")")
    ap.add_argument("--gradual-methods", default="", help="of those, the ones also run gradually (default: all)")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "quality")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    phases = set(args.phases.split(","))
    seeds = [0] if args.quick else list(range(args.seeds))
    keeps = [0.5] if args.quick else [0.5, 0.3]
    n_random = 5 if args.quick else args.random
    rank_methods = ["bn", "sca"] if args.quick else list(RANK_METHODS)
    ft_methods = ["bn"] if args.quick else (args.ft_methods.split(",") if args.ft_methods else list(FINETUNE_METHODS))
    gradual_methods = args.gradual_methods.split(",") if args.gradual_methods else ft_methods
    dense_recipe = _recipe("mnist5k-wide-dense.yaml")
    if args.quick:
        dense_recipe["train"]["epochs"] = 4
    work = args.work / ("quick" if args.quick else "full")
    from snncompress.config import parse_recipe
    from snncompress.data import load_dataset

    t0 = time.perf_counter()
    stem = "quality-quick" if args.quick else "quality"
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{stem}.json"
    result = {"machine": {"processor": platform.machine(), "cpu_count": os.cpu_count(), "torch": torch.__version__},
              "jobs": args.jobs, "seeds": seeds, "dense_recipe": "recipes/mnist5k-wide-dense.yaml",
              "dense_epochs": dense_recipe["train"]["epochs"], "keeps": keeps, "random_masks": n_random,
              "score_batches": SCORE_BATCHES, "truth_batches": TRUTH_BATCHES, "recalibrate_batches": RECALIBRATE,
              "test_images": len(load_dataset(parse_recipe(dense_recipe).data, 0).y_test)}
    before = json.loads(path.read_text()) if path.exists() else {}
    if before.get("seeds") != seeds:  # phases run separately add up (the same seeds: the dense runs are reused)
        before = {}
    spent = before.get("minutes", 0.0)

    def save() -> None:
        result["minutes"] = spent + (time.perf_counter() - t0) / 60
        merged = {**before, **result}
        path.write_text(json.dumps(merged, indent=1))
        (args.out / f"{stem}.md").write_text(markdown(merged))
        plot(merged, args.out / f"{stem}.png")
        print(markdown(merged), flush=True)

    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn"), initializer=_threads) as pool:
        dense_jobs = {s: pool.submit(_train_job, {**dense_recipe, "seed": s}, str(work / f"dense-s{s}")) for s in seeds}
        dense = {s: f.result() for s, f in dense_jobs.items()}
        result["dense"] = [dense[s]["accuracy"] for s in seeds]
        print("dense", [f"{100 * a:.2f}" for a in result["dense"]], flush=True)
        if phases & {"rank", "truth"}:
            jobs = [pool.submit(_rank_job, dense[s]["ckpt"], keeps, rank_methods, n_random, "truth" in phases)
                    for s in seeds]
            per_seed = [f.result() for f in jobs]
            result["rank"] = summarise_rank(per_seed, keeps, rank_methods)
            result["rank_per_seed"] = [{k: v for k, v in p.items() if k not in ("scores", "increase")}
                                       for p in per_seed]
            if "truth" in phases:
                result["truth"] = summarise_truth(per_seed, rank_methods)
            save()
        if "finetune" in phases:
            result["finetune"] = _finetune(pool, dense, seeds, ft_methods, gradual_methods, work, args.quick)
            save()


def _finetune(pool, dense: dict, seeds: list[int], methods: list[str], gradual: list[str], work: Path,
              quick: bool) -> list[dict]:
    """Every method one-shot, ``gradual`` ones gradual too (with distillation), the first one-shot also without;
    then a random control with each run's own per-group counts."""
    variants = {"one-shot": _recipe("mnist5k-from-trained.yaml"), "gradual": _recipe("mnist5k-from-trained-gradual.yaml")}
    variants["one-shot, no distillation"] = {**variants["one-shot"],
                                             "train": {**variants["one-shot"]["train"], "distill": None}}
    if quick:
        variants = {k: v for k, v in variants.items() if k != "gradual"}
        for v in variants.values():
            v["train"] = {**v["train"], "epochs": 3}
            v["prune"] = {**v["prune"], "finetune_epochs": 2}
    jobs = {}
    for name, base in variants.items():
        for s in seeds:
            for method in {"one-shot": methods, "gradual": gradual}.get(name, methods[:1]):
                recipe = {**base, "seed": s, "baseline": False, "model": {**base["model"], "weights": dense[s]["ckpt"]},
                          "prune": {**base["prune"], "method": method, "options": {}, "regrow": None}}
                jobs[(name, s, method)] = (recipe, pool.submit(_train_job, recipe, str(work / f"{name}-{method}-s{s}")))
    runs: dict = {}
    controls = {}  # one per variant, seed and per-group counts (with prune.allocation: layer every method's are equal)
    for (name, s, method), (recipe, f) in jobs.items():
        res = runs.setdefault((name, s), {})[method] = f.result()
        key = (name, s, tuple(res["kept"].values()))
        if key not in controls:
            total = sum(res["kept"].values())
            size = sum(int(v) for v in _group_sizes(res["ckpt"]).values())
            ctrl = {**recipe, "prune": {**recipe["prune"], "method": "counted_random",
                                        "options": {"counts": res["kept"]}, "keep": total / size,
                                        "budget_unit": "channels", "allocation": "global", "regrow": 0.0,
                                        "min_fraction": 0.0, "budget": "global"}}
            tag = "-".join(map(str, key[2]))
            controls[key] = pool.submit(_train_job, ctrl, str(work / f"{name}-random-{tag}-s{s}"))
        print(name, s, method, f"{100 * res['accuracy']:.2f}", flush=True)
    for (name, s), by_method in runs.items():
        for method in list(by_method):
            by_method[f"random-{method}"] = controls[(name, s, tuple(by_method[method]["kept"].values()))].result()
    return summarise_finetune(runs, methods, seeds, [dense[s]["accuracy"] for s in seeds])


def _group_sizes(ckpt: str) -> dict[str, int]:
    return {g: m.numel() for g, m in torch.load(ckpt, weights_only=True)["masks"].items()}


if __name__ == "__main__":
    main()
