"""Plug-ins: every registered method satisfies the Pruner protocol and every registered budget unit the CostUnit
protocol, and the examples of docs/methods.md ("Adding a method", "Adding a budget unit") run as documented."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from spikingjelly.activation_based import functional

import snncompress as sc
from snncompress import registry
from snncompress.config import parse_recipe
from snncompress.data import encode, load_dataset
from snncompress.metrics import weight_counts
from snncompress.prune.budget import Budget
from snncompress.prune.costs import CostUnit, Layer, build_unit
from snncompress.prune.groups import channel_groups
from snncompress.prune.pruner import Pruner, build_pruner
from snncompress.stages.train import make_optimizer, starting_model

from .conftest import TINY

DOCS = Path(__file__).resolve().parents[1] / "docs" / "methods.md"
MODEL = {"name": "vgg", "layers": [16, 32, "M", 32]}


def tiny(prune: dict | None = None, deploy: dict | None = None):
    """(recipe, data, gated model, example, groups) of TINY's data with MODEL and ``prune`` merged in."""
    recipe = parse_recipe({**TINY, "model": MODEL, "prune": {**TINY["prune"], **(prune or {})},
                           "deploy": deploy or {"batch_size": 4}})
    data = load_dataset(recipe.data, recipe.seed)
    _, net, example, _ = starting_model(recipe, data)
    return recipe, data, net, example, channel_groups(net, example)


def tiny_unit(name: str, measurement):
    """(unit, groups, measured) of a budget unit built on the tiny model, measured where it needs it (once per
    session: ``measurement``)."""
    recipe, data, net, example, groups = tiny({"budget_unit": name})
    unit = build_unit(net, groups, example, recipe)
    measured = unit is not None and unit.needs_measurement
    if measured:
        def make() -> dict:
            before = {k: v.clone() for k, v in net.state_dict().items()}
            measured = unit.measure(net, data.x_train[:4], recipe, False)
            assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())  # timed on copies
            return measured
        unit.load_measurement(measurement(name, make))
    return unit, groups, measured


@pytest.mark.parametrize("name", registry.METHODS.names())
def test_every_registered_method_is_a_pruner_that_updates_and_resumes(name):
    family = registry.METHODS.meta(name)["family"]
    prune = {"method": name, "warmup_epochs": 0, "ramp_epochs": 1, "finetune_epochs": 1}
    if family == "unstructured":
        prune.update(keep=0.3, regrow=None, sparsity=0.5)  # keep and regrow back to their defaults
    recipe, data, net, example, groups = tiny(prune)
    opt = make_optimizer(net, recipe.train)
    batches = lambda n: [encode(data.x_train[:32], 2)]  # noqa: E731  (what train gives: the first training batches)
    pruner = build_pruner(net, groups, recipe.prune, 2, 0, opt, batches=batches)
    assert isinstance(pruner, Pruner), name
    pruner.begin_epoch(0)
    x, y = encode(data.x_train[:32], 2), data.y_train[:32]
    loss = F.cross_entropy(net(x), y) + pruner.penalty()
    functional.reset_net(net)
    opt.zero_grad()
    loss.backward()
    pruner.after_backward()
    opt.step()
    pruner.after_step()
    entry = pruner.end_epoch(0)
    masks = pruner.masks
    assert entry is not None and pruner.at_target() and set(masks) == {g.name for g in groups}
    assert 0 < pruner.kept_fraction() <= 1 and (family == "unstructured" or pruner.kept_fraction() < 1), name
    # its state resumes into a fresh pruner: the same masks and the same checkpoint state
    state = pruner.state_dict()
    again = build_pruner(net, groups, recipe.prune, 2, 0, opt, batches=batches)
    again.load_state_dict(state, masks, pruner.history)
    assert all(torch.equal(again.masks[g], masks[g]) for g in masks) and again.at_target()
    pruner.remove()
    again.remove()


@pytest.mark.parametrize("name", registry.BUDGET_UNITS.names())
def test_every_registered_budget_unit_satisfies_the_protocol(name, measurement):
    cls = registry.BUDGET_UNITS.get(name)
    assert issubclass(cls, CostUnit) and isinstance(cls.label, str) and cls.label
    unit, groups, measured = tiny_unit(name, measurement)
    figures = {"kept_channels": 0.5, "macs": 100, "sops": 10.0, "weights": 1000, "params": 1000,
               "latency_ms": {"4": {"median": 2.0}}}
    achieved = cls.achieved(figures, {**figures, "kept_channels": 0.25}, 4, None)
    assert achieved is None or 0 < achieved <= 1
    if unit is None:  # the channel count itself is the budget
        return
    assert isinstance(unit, CostUnit) and all(isinstance(lay, Layer) for lay in unit.layers)
    budget = Budget(unit, groups)
    all_kept = {g.name: torch.ones(g.size, dtype=torch.bool) for g in groups}
    assert math.isfinite(budget.cost(all_kept)) and budget.cost(all_kept) > 0
    gen = torch.Generator().manual_seed(0)
    masks = {g.name: torch.rand(g.size, generator=gen) < 0.5 for g in groups}
    for g in groups:
        masks[g.name][0] = True
    before = budget.cost(masks)
    # keeping a channel more never costs less (a measured cost may: its tables hold timing noise)
    for g in [] if measured else groups:
        closed = (~masks[g.name]).nonzero().flatten()
        if len(closed):
            more = {**masks, g.name: masks[g.name].clone()}
            more[g.name][closed[0]] = True
            assert budget.cost(more) >= before - 1e-12 * abs(before), (name, g.name)
    # a checkpoint's state gives back the same costs
    fresh = tiny_unit(name, measurement)[0]
    fresh.load_state_dict(unit.state_dict())
    assert Budget(fresh, groups).cost(masks) == before


def _example(section: str) -> str:
    """The first python code block under the heading ``section`` of docs/methods.md."""
    text = DOCS.read_text()
    body = text[text.index(f"## {section}\n"):]
    return re.search(r"```python\n(.*?)```", body, re.S).group(1)


@pytest.fixture
def documented(monkeypatch):
    """Runs a documented example in a namespace of its own; its registrations end with the test."""
    for reg in (registry.METHODS, registry.BUDGET_UNITS):
        monkeypatch.setattr(reg, "_objects", dict(reg._objects))
        monkeypatch.setattr(reg, "_meta", dict(reg._meta))

    def run(section: str) -> dict:
        namespace = {"__name__": "docs_example"}
        exec(compile(_example(section), f"{DOCS}:{section}", "exec"), namespace)
        return namespace
    return run


def test_the_documented_method_takes_its_options_from_the_recipe_and_trains(documented, tmp_path):
    documented("Adding a method")
    with pytest.raises(sc.RecipeError, match="prune.options.p: must be greater than 0"):
        parse_recipe({**TINY, "prune": {**TINY["prune"], "method": "filter_norm", "options": {"p": -1}}})
    with pytest.raises(sc.RecipeError, match="prune.options.q: unknown key; allowed: p"):
        parse_recipe({**TINY, "prune": {**TINY["prune"], "method": "filter_norm", "options": {"q": 1}}})
    recipe, data, net, example, groups = tiny({"method": "filter_norm", "options": {"p": 1.0}})
    assert recipe.prune.options == {"p": 1.0}
    pruner = build_pruner(net, groups, recipe.prune, 4)
    assert pruner.scorer.options.p == 1.0
    conv = net.features.conv1.conv.weight.detach()
    assert torch.allclose(pruner.scorer.scores()[groups[0].name], (conv.flatten(1).abs().sum(1) / conv[0].numel())
                          .double())
    pruner.remove()
    res = sc.train(recipe, tmp_path, progress=False)
    assert torch.load(res.ckpt, weights_only=True)["recipe"]["prune"]["options"] == {"p": 1.0}
    assert res.metrics[-1]["kept_channels"] == pytest.approx(0.5, abs=0.02)


def test_the_documented_budget_unit_selects_the_weights_the_slim_model_has(documented, tmp_path):
    documented("Adding a budget unit")
    recipe, data, *_ = tiny({"budget_unit": "params", "keep": 0.4})
    res = sc.train(recipe, tmp_path, progress=False)
    budget = res.budget
    assert budget["unit"] == "params" and 0.85 * budget["target"] <= budget["selected"] <= budget["target"]
    sc.slim_checkpoint(res.ckpt, tmp_path / "slim.pt")
    dense, slim = (weight_counts(sc.load_model(p)) for p in (res.ckpt, tmp_path / "slim.pt"))
    assert slim["weights"] == budget["selected"] and dense["weights"] == budget["dense"]
