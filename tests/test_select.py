"""The selector's and schedule's arithmetic on small hand-computed cases."""

import pytest
import torch

from snncompress.prune.schedule import is_update_epoch, keep_fraction_at
from snncompress.prune.select import select_masks
from snncompress.config import PruneCfg


def test_global_selection_by_activity_with_min_per_group():
    act = {"a": torch.tensor([0.9, 0.8, 0.7, 0.6]), "b": torch.tensor([0.1, 0.05, 0.3, 0.2])}
    grow = {n: torch.zeros(4) for n in act}
    # keep 4 of 8; min 1 per group: b keeps its best (0.3 at idx 2), then the 3 globally best of the rest
    m = select_masks(act, grow, keep_fraction=0.5, regrow_fraction=0.0, min_channels=1)
    assert m["a"].tolist() == [True, True, True, False]
    assert m["b"].tolist() == [False, False, True, False]


def test_min_channels_keeps_every_layer_alive():
    act = {"a": torch.tensor([5.0, 4.0, 3.0, 2.0]), "b": torch.tensor([0.0, 0.0, 0.1, 0.0])}
    m = select_masks(act, {n: torch.zeros(4) for n in act}, keep_fraction=0.25, regrow_fraction=0.0, min_channels=1)
    assert m["a"].sum() == 1 and m["b"].tolist() == [False, False, True, False]


def test_regrowth_picks_largest_gradient_among_unselected():
    act = {"a": torch.tensor([0.9, 0.8, 0.0, 0.0]), "b": torch.tensor([0.7, 0.0, 0.0, 0.0])}
    grow = {"a": torch.tensor([100.0, 0.0, 0.2, 0.1]), "b": torch.tensor([0.0, 0.3, 0.0, 5.0])}
    # keep 4 of 8, regrow 1/8 of all channels = 1: activity takes a0, a1, b0; regrowth b3 (5.0)
    # (a0's large gradient does not count: it is already kept)
    m = select_masks(act, grow, keep_fraction=0.5, regrow_fraction=0.125, min_channels=1)
    assert m["a"].tolist() == [True, True, False, False]
    assert m["b"].tolist() == [True, False, False, True]


def test_ties_go_to_lower_index():
    act = {"a": torch.zeros(4)}
    m = select_masks(act, {"a": torch.zeros(4)}, keep_fraction=0.5, regrow_fraction=0.0, min_channels=1)
    assert m["a"].tolist() == [True, True, False, False]


def test_cubic_ramp_schedule():
    cfg = PruneCfg(keep=0.2, regrow=0.1, warmup_epochs=2, ramp_epochs=4, finetune_epochs=2)
    assert keep_fraction_at(cfg, 0) == 1.0 and keep_fraction_at(cfg, 1) == 1.0
    # epoch 2 is the first ramp step: t = 1/4 -> 0.2 + 0.8 * 0.75^3
    assert keep_fraction_at(cfg, 2) == pytest.approx(0.2 + 0.8 * 0.75 ** 3)
    assert keep_fraction_at(cfg, 5) == pytest.approx(0.2)
    assert keep_fraction_at(cfg, 9) == pytest.approx(0.2)
    updates = [e for e in range(10) if is_update_epoch(cfg, 10, e)]
    assert updates == [2, 3, 4, 5, 6, 7]  # none in warm-up, none in the last 2 (frozen fine-tune)


def test_round_masks_fills_up_to_the_multiple_with_best_scores():
    from snncompress.prune.select import round_masks

    masks = {"a": torch.tensor([True, False, False, False, True, False]), "b": torch.tensor([True] * 3 + [False] * 2)}
    scores = {"a": torch.tensor([9.0, 1.0, 5.0, 3.0, 8.0, 4.0]), "b": torch.zeros(5)}
    out = round_masks(masks, scores, 4)
    # a: 2 kept -> 4: add the best closed ones (5.0 at idx 2, 4.0 at idx 5); b: 3 -> 4 (size 5), lowest index on ties
    assert out["a"].tolist() == [True, False, True, False, True, True]
    assert out["b"].tolist() == [True, True, True, True, False]
    assert round_masks({"c": torch.ones(3, dtype=torch.bool)}, {"c": torch.zeros(3)}, 8)["c"].sum() == 3  # capped


def test_layer_allocation_keeps_the_same_fraction_of_every_group():
    # global ranking would give all 4 kept channels to a (scores 5..2 above b's); layer: 2 each, ranked within
    act = {"a": torch.tensor([5.0, 4.0, 3.0, 2.0]), "b": torch.tensor([0.1, 0.0, 0.3, 0.2])}
    grow = {n: torch.zeros(4) for n in act}
    assert select_masks(act, grow, 0.5, 0.0, 1)["b"].sum() == 1
    m = select_masks(act, grow, 0.5, 0.0, 1, allocation="layer")
    assert m["a"].tolist() == [True, True, False, False] and m["b"].tolist() == [False, False, True, True]
    # regrowth keeps its share of each group's kept channels: 1 of 2 in each
    grow = {"a": torch.tensor([0.0, 0.0, 0.0, 9.0]), "b": torch.tensor([7.0, 0.0, 0.0, 0.0])}
    m = select_masks(act, grow, 0.5, 0.25, 1, allocation="layer")
    assert m["a"].tolist() == [True, False, False, True] and m["b"].tolist() == [True, False, True, False]


def test_floor_as_a_fraction_of_each_group():
    from snncompress.prune.select import group_floor

    assert [group_floor(s, 2, 0.25) for s in (4, 8, 10, 64, 1)] == [2, 2, 3, 16, 1]
    act = {"a": torch.arange(8.0, 16.0), "b": torch.arange(8.0)}  # a outranks b everywhere
    m = select_masks(act, {n: torch.zeros(8) for n in act}, 0.5, 0.0, 1, min_fraction=0.25)
    assert m["b"].tolist() == [False] * 6 + [True, True] and m["a"].sum() == 6


def test_regrow_zero_and_the_method_defaults():
    assert PruneCfg(regrow=0).regrow_fraction == 0.0
    assert PruneCfg(keep=0.3).regrow_fraction == pytest.approx(0.1)  # as before: 0.1 of all channels ...
    assert PruneCfg(keep=0.09).regrow_fraction == pytest.approx(0.03)  # ... at most a third of keep
    assert PruneCfg(method="criticality", keep=0.2).regrow_fraction == pytest.approx(0.01)  # the paper's 5 % of kept


def test_random_method_keeps_a_uniform_random_draw():
    # every kept channel is random: the regrowth share is chosen by the same draw, not by |dL/dgate|
    import torch.nn as nn

    from snncompress.prune.baselines import RandomScorer
    from snncompress.prune.gates import ChannelGroup
    from snncompress.prune.structured import ChannelPruner

    groups = [ChannelGroup("g", 16, [], [], [])]
    cfg = PruneCfg(method="random", keep=0.5, regrow=0.25, warmup_epochs=0, ramp_epochs=1, finetune_epochs=0,
                   min_channels=1, recalibrate_bn=0)
    scorer = RandomScorer(nn.Linear(1, 1), groups, seed=3)
    draw = scorer.scores()["g"]
    pruner = ChannelPruner.__new__(ChannelPruner)  # only the selection: no model to gate
    pruner.cfg, pruner.budget, pruner.round_to = cfg, None, 1
    grow = {"g": torch.arange(16.0)}  # a gradient signal that would pick the last channels
    masks, _ = pruner._select(0.5, 0.0, {"g": draw}, scorer.regrowth_scores(), {"g": torch.ones(16, dtype=torch.bool)})
    assert masks["g"].tolist() == (draw >= draw.sort(descending=True).values[7]).tolist()
    mixed, _ = pruner._select(0.5, 0.0, {"g": draw}, grow, {"g": torch.ones(16, dtype=torch.bool)})
    assert not torch.equal(mixed["g"], masks["g"])


def test_layer_allocation_and_pq_budget_exclude_each_other():
    from snncompress.config import parse_recipe
    from snncompress.errors import RecipeError

    with pytest.raises(RecipeError, match="allocation: budget pq shares the budget"):
        parse_recipe({"prune": {"budget": "pq", "allocation": "layer"}})
