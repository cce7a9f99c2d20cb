"""Torch-Pruning's criteria as structured methods (tp_taylor, tp_lamp): they score our groups with Torch-Pruning's own
importance classes, on the training model's parameters and gradients, and train end to end."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torch_pruning as tp
from spikingjelly.activation_based import functional

import snncompress
from snncompress.config import parse_recipe
from snncompress.data import encode, load_dataset
from snncompress.errors import ModelError
from snncompress.prune.costs import build_unit
from snncompress.prune.groups import channel_groups, dependency_graph
from snncompress.prune.pruner import build_pruner
from snncompress.prune.tp_criteria import TPLampScorer, TPTaylorScorer
from snncompress.stages.train import make_optimizer, starting_model

from .conftest import TINY


def _tiny(method: str):
    """(gated tiny VGG, groups, optimiser, pruner, data) with ``method``, scoring from epoch 0."""
    recipe = parse_recipe({**TINY, "prune": {**TINY["prune"], "method": method, "warmup_epochs": 0}})
    data = load_dataset(recipe.data, recipe.seed)
    _, net, example, _ = starting_model(recipe, data)
    groups = channel_groups(net, example)
    opt = make_optimizer(net, recipe.train)
    pruner = build_pruner(net, groups, recipe.prune, recipe.train.epochs, recipe.seed, opt)
    pruner.begin_epoch(0)
    net.train()
    return net, groups, opt, pruner, data


def _backward(net, opt, data, step: int) -> None:
    x, y = encode(data.x_train[32 * step:32 * (step + 1)], 2), data.y_train[32 * step:32 * (step + 1)]
    loss = F.cross_entropy(net(x), y)
    functional.reset_net(net)
    opt.zero_grad()
    loss.backward()


def _reference(net, data):
    """An independent Torch-Pruning graph of a copy of ``net`` and a function giving, for the copy's current weights
    and gradients, one TP pruning group per conv name."""
    ref = copy.deepcopy(net)
    dg = dependency_graph(ref, encode(data.x_train[:1], 2))
    modules = dict(ref.named_modules())

    def group(conv: str, size: int) -> tp.Group:
        return dg.get_pruning_group(modules[conv], tp.prune_conv_out_channels, idxs=list(range(size)))

    def sync() -> None:  # the training weights and gradients into the copy
        params = dict(ref.named_parameters())
        for name, p in net.named_parameters():
            params[name].data.copy_(p.data)
            params[name].grad = None if p.grad is None else p.grad.clone()
    return group, sync


def test_tp_lamp_is_torch_prunings_lamp_on_each_group():
    net, groups, opt, pruner, data = _tiny("tp_lamp")
    assert isinstance(pruner.scorer, TPLampScorer)
    with pytest.raises(ModelError, match="first training forward"):
        pruner.scorer.scores()
    _backward(net, opt, data, 0)
    opt.step()
    group, sync = _reference(net, data)
    sync()
    scores = pruner.scorer.scores()
    assert list(scores) == [g.name for g in groups]
    for g in groups:
        expected = tp.importance.LAMPImportance()(group(g.convs[0], g.size)).double()
        s = scores[g.name]
        assert s.dtype == torch.float64 and s.device.type == "cpu" and s.shape == (g.size,)
        assert torch.isfinite(s).all() and s.std() > 0
        assert torch.allclose(s, expected, rtol=1e-6, atol=0), g.name
    # read when asked: later weights, later scores
    with torch.no_grad():
        net.features.conv1.conv.weight[0] *= 10
    assert not torch.equal(pruner.scorer.scores()[groups[0].name], scores[groups[0].name])
    pruner.remove()


def test_tp_taylor_is_the_window_mean_of_torch_prunings_taylor_after_each_backward():
    net, groups, opt, pruner, data = _tiny("tp_taylor")
    scorer = pruner.scorer
    assert isinstance(scorer, TPTaylorScorer)
    # one closed channel: its output gradient is 0, so is its Taylor score
    pruner.load_masks({g.name: torch.arange(g.size) != 1 if i == 0 else torch.ones(g.size, dtype=torch.bool)
                       for i, g in enumerate(groups)})
    group, sync = None, None
    by_hand = {g.name: torch.zeros(g.size, dtype=torch.float64) for g in groups}
    for step in range(2):
        _backward(net, opt, data, step)
        if group is None:
            group, sync = _reference(net, data)
        sync()
        for g in groups:
            by_hand[g.name] += tp.importance.GroupTaylorImportance()(group(g.convs[0], g.size)).double()
        pruner.after_backward()
        opt.step()
        pruner.after_step()
    assert net.training  # the trace ran on a copy
    # the scorer's graph reads the training model's own parameters (and so their gradients)
    twin = dict(scorer._twin.named_parameters())
    assert all(twin[n] is p for n, p in net.named_parameters())
    scores = scorer.scores()
    assert scorer._taylor.counts() == {g.name: 2 for g in groups}
    for g in groups:
        s = scores[g.name]
        assert s.dtype == torch.float64 and s.shape == (g.size,) and torch.isfinite(s).all()
        assert torch.allclose(s, by_hand[g.name] / 2, rtol=1e-6, atol=1e-12), g.name
        assert s.sum() > 0
    assert scores[groups[0].name][1] == 0.0

    # the window state round-trips (an exact resume) and a mask update starts a new window
    again = build_pruner(net, groups, pruner.cfg, 4, 0, opt)
    again.load_state_dict(pruner.state_dict(), pruner.masks, pruner.history)
    assert all(torch.equal(again.scorer.scores()[n], s) for n, s in scores.items())
    assert pruner.end_epoch(0) is not None
    assert all(c == 0 for c in scorer._taylor.counts().values())
    # switched off (warm-up, fine-tune) it lets its copy go; the next scoring stretch traces afresh
    pruner.begin_epoch(3)
    assert scorer._twin is None and scorer.tp_groups is None
    pruner.begin_epoch(1)
    _backward(net, opt, data, 2)
    assert scorer._twin is not None and all(dict(scorer._twin.named_parameters())[n] is p
                                            for n, p in net.named_parameters())
    pruner.remove()
    again.remove()


@pytest.mark.parametrize("method", ["tp_taylor", "tp_lamp"])
def test_tp_method_trains_to_the_budget(method, tmp_path):
    recipe = parse_recipe({**TINY, "prune": {**TINY["prune"], "method": method}})
    ckpt = torch.load(snncompress.train(recipe, tmp_path, progress=False).ckpt, weights_only=True)
    masks = ckpt["masks"]
    assert sum(int(m.sum()) for m in masks.values()) == 20  # of 40 channels (8 + 16 + 16)
    assert all(m.any() for m in masks.values())
    assert len(ckpt["history"]) == 2  # updates at the end of epochs 1 and 2
    assert ckpt["history"][0]["pruned"] > 0


def test_the_trace_reaches_no_hook_of_the_training_model():
    """The SOP budget counts spikes while active, in any mode: the trace (on the copy) must not add to it."""
    counted = {}
    for method in ("random", "tp_taylor"):
        torch.manual_seed(0)
        recipe = parse_recipe({**TINY, "prune": {**TINY["prune"], "method": method, "warmup_epochs": 0,
                                                 "budget_unit": "sops"}})
        data = load_dataset(recipe.data, recipe.seed)
        _, net, example, _ = starting_model(recipe, data)
        groups = channel_groups(net, example)
        unit = build_unit(net, groups, example, recipe)
        pruner = build_pruner(net, groups, recipe.prune, recipe.train.epochs, recipe.seed, unit=unit)
        pruner.begin_epoch(0)
        net.train()
        net(encode(data.x_train[:32], 2))
        functional.reset_net(net)
        counted[method] = [t.clone() for t in unit.statistics()]
        pruner.remove()
    assert pruner.scorer.tp_groups is not None  # tp_taylor traced
    assert all(torch.equal(a, b) for a, b in zip(counted["random"], counted["tp_taylor"]))
