"""Pruning methods and baselines (issue 4): their arithmetic on small hand-computed cases, then training."""

import math

import pytest
import torch
import torch.nn as nn
from spikingjelly.activation_based import functional, layer, neuron, surrogate

import snncompress
from snncompress.errors import ModelError, RecipeError
from snncompress.models.neuron import make_neuron
from snncompress.prune.baselines import BNScorer, L1Scorer, RandomScorer
from snncompress.prune.pruner import build_pruner
from snncompress import registry
from snncompress.prune.criticality import CriticalityScorer, criticality, membrane_before_fire
from snncompress.prune.options import CriticalityOptions
from snncompress.prune.gates import ChannelGroup, attach_gates
from snncompress.prune.pq import pq_index, pq_prune_ratio
from snncompress.prune.select import pq_budgets, select_masks_budgeted
from snncompress.config import PruneCfg, parse_recipe

from .conftest import TINY

PI = math.pi


# --- PQ index and ratio ----------------------------------------------------------------------------

def test_pq_index_hand_cases():
    # p = 0.5, q = 1: I = 1 - d^(1 - 2) * ||w||_0.5 / ||w||_1 = 1 - ||w||_0.5 / (d ||w||_1)
    # one-hot, d = 4: ||w||_0.5 = 1, ||w||_1 = 1 -> 1 - 1/4 = 0.75
    assert pq_index(torch.tensor([0.0, 3.0, 0.0, 0.0])) == pytest.approx(0.75)
    # constant 2, d = 4: ||w||_0.5 = (4 sqrt 2)^2 = 32, ||w||_1 = 8 -> 1 - 32 / (4 * 8) = 0
    assert pq_index(torch.full((4,), 2.0)) == pytest.approx(0.0, abs=1e-12)
    # [1, 1, 0, 0]: ||w||_0.5 = (1 + 1)^2 = 4, ||w||_1 = 2 -> 1 - 4 / (4 * 2) = 0.5
    assert pq_index(torch.tensor([1.0, -1.0, 0.0, 0.0])) == pytest.approx(0.5)
    # [4, 1], d = 2: ||w||_0.5 = (2 + 1)^2 = 9, ||w||_1 = 5 -> 1 - 9 / 10 = 0.1 (and scale-free)
    assert pq_index(torch.tensor([4.0, 1.0])) == pytest.approx(0.1)
    assert pq_index(torch.tensor([40.0, 10.0])) == pytest.approx(0.1)
    # p = 1, q = 2 on [3, 4]: 1 - 2^(1/2 - 1) * 7 / 5 = 1 - 7 / (5 sqrt 2) = 0.0100505...
    assert pq_index(torch.tensor([3.0, 4.0]), p=1.0, q=2.0) == pytest.approx(1 - 7 / (5 * math.sqrt(2)))
    assert pq_index(torch.zeros(5)) == 0.0
    with pytest.raises(ValueError):
        pq_index(torch.ones(2, 2))


def test_pq_prune_ratio_formula():
    # defaults p = 0.5, q = 1, eta = 0, gamma = 1: r/d = (1 - I)^1, so ratio = I, capped at beta = 0.9
    assert pq_prune_ratio(0.5, 4) == pytest.approx(0.5)
    assert pq_prune_ratio(0.95, 4) == pytest.approx(0.9)
    assert pq_prune_ratio(0.0, 4) == pytest.approx(0.0)
    # eta = 0.001 (Shen et al.): r/d = 1.001^-2 * (1 - 0) -> ratio = 1 - 1/1.001^2 = 0.001997...
    assert pq_prune_ratio(0.0, 4, eta=0.001) == pytest.approx(1 - 1.001 ** -2)
    # p = 1, q = 2, eta = 1: q/(q-p) = 2, qp/(q-p) = 2 -> r/d = 2^-2 * (1 - 0.5)^2 = 0.0625
    assert pq_prune_ratio(0.5, 10, p=1.0, q=2.0, eta=1.0, beta=1.0) == pytest.approx(0.9375)
    assert pq_prune_ratio(0.5, 10, p=1.0, q=2.0, eta=1.0, beta=0.9) == pytest.approx(0.9)
    assert pq_prune_ratio(0.5, 10, p=1.0, q=2.0, eta=1.0, gamma=0.5, beta=1.0) == pytest.approx(0.46875)


@pytest.mark.parametrize("p, q", [(0.5, 1.0), (1.0, 2.0), (0.5, 2.0), (0.3, 0.7)])
def test_pq_ratio_of_k_equal_nonzeros_keeps_k(p, q):
    # k equal non-zeros of d: 1 - I = (k/d)^(1/p - 1/q), so r = d * (1 - I)^(pq/(q-p)) = k (eta = 0), ratio 1 - k/d
    w = torch.tensor([0.0, 2.0, 0.0, 2.0, 2.0, 0.0, 0.0, 0.0])  # k = 3, d = 8
    assert pq_prune_ratio(pq_index(w, p, q), 8, p, q, beta=1.0) == pytest.approx(1 - 3 / 8)


# --- PQ budgets -----------------------------------------------------------------------------------

def test_pq_budgets_scale_raw_budgets_to_the_schedule():
    # a one-hot (I = 0.75 -> ratio 0.75 -> raw ceil(0.25 * 4) = 1), b flat (I = 0 -> raw 4)
    s = {"a": torch.tensor([5.0, 0.0, 0.0, 0.0]), "b": torch.ones(4)}
    # K = 5 = 1 + 4: the raw budgets themselves (scale c = 1)
    assert pq_budgets(s, 0.625, min_channels=1) == {"a": 1, "b": 4}
    # K = 4: n = clamp(c * [1, 4], 1, 4); a is at its floor 1, so 1 + 4c = 4, c = 0.75 -> b = 3
    assert pq_budgets(s, 0.5, min_channels=1) == {"a": 1, "b": 3}
    # K = 6: b is capped at 4, so c = 2 -> a = 2
    assert pq_budgets(s, 0.75, min_channels=1) == {"a": 2, "b": 4}
    # K = 2 = the floor: one each; min_channels = 2 raises the floor of both
    assert pq_budgets(s, 0.25, min_channels=1) == {"a": 1, "b": 1}
    assert pq_budgets(s, 0.25, min_channels=2) == {"a": 2, "b": 2}
    assert pq_budgets(s, 1.0, min_channels=1) == {"a": 4, "b": 4}


def test_pq_budgets_rounding_and_proportions():
    # a, b: [1, 1, 0, 0] -> I = 0.5 -> raw 2 each; c: flat -> raw 4 (sizes 4, 4, 4)
    s = {"a": torch.tensor([1.0, 1.0, 0.0, 0.0]), "b": torch.tensor([0.0, 0.0, 3.0, 3.0]), "c": torch.ones(4)}
    # K = round(0.5 * 12) = 6 = c * (2 + 2 + 4) -> c = 0.75 -> 1.5, 1.5, 3: floors 1, 1, 3 (sum 5);
    # the leftover unit goes to the largest remainder, ties to the earlier group: a
    assert pq_budgets(s, 0.5, min_channels=1) == {"a": 2, "b": 1, "c": 3}
    # K = round(0.25 * 12) = 3 = the floor of one channel per group
    assert pq_budgets(s, 0.25, min_channels=1) == {"a": 1, "b": 1, "c": 1}
    # p = 1, q = 2 on [1, 1, 0, 0]: I = 1 - 4^(-1/2) * 2 / sqrt 2 = 1 - 1/sqrt 2, r/d = (1 - I)^2 = 1/2: still raw 2
    # (in floats the ratio is 0.4999999999999999: a plain ceil((1 - ratio) * 4) would give 3)
    assert pq_budgets(s, 8 / 12, min_channels=1, p=1.0, q=2.0) == {"a": 2, "b": 2, "c": 4}


def test_pq_budgets_follow_p_q_beta():
    # a = [4, 1, 1, 1], b flat (raw 4), K = round(0.875 * 8) = 7
    s = {"a": torch.tensor([4.0, 1.0, 1.0, 1.0]), "b": torch.ones(4)}
    # p = 0.5, q = 1: ||a||_0.5 = (2 + 1 + 1 + 1)^2 = 25, ||a||_1 = 7: I = 1 - 25/28 = 3/28 -> raw ceil(4 * 25/28) = 4
    # c * (4 + 4) = 7 -> 3.5, 3.5: floors 3, 3, the tie in remainders goes to a
    assert pq_budgets(s, 0.875, min_channels=1) == {"a": 4, "b": 3}
    # p = 1, q = 2: ||a||_2 = sqrt 19, 1 - I = 4^(-1/2) * 7 / sqrt 19, r/d = (1 - I)^2 = 49/76
    # -> raw ceil(4 * 49/76 = 2.58) = 3; c * (3 + 4) = 7 -> c = 1
    assert pq_budgets(s, 0.875, min_channels=1, p=1.0, q=2.0) == {"a": 3, "b": 4}
    # only open channels count: with a0 closed, a's open scores [1, 1, 1] are flat -> I = 0 -> raw 3 (its 3 open
    # channels); c * (3 + 4) = 7 -> c = 1
    masks = {"a": torch.tensor([False, True, True, True]), "b": torch.ones(4, dtype=torch.bool)}
    assert pq_budgets(s, 0.875, min_channels=1, masks=masks) == {"a": 3, "b": 4}
    # one-hot a with beta = 0.5: ratio min(0.75, 0.5) -> raw 2 (not 1); K = 5: c * (2 + 4) = 5 -> 1.67, 3.33 -> 2, 3
    s = {"a": torch.tensor([5.0, 0.0, 0.0, 0.0]), "b": torch.ones(4)}
    assert pq_budgets(s, 0.625, min_channels=1, beta=0.5) == {"a": 2, "b": 3}


def test_select_masks_budgeted_per_group():
    s = {"a": torch.tensor([0.9, 0.1, 0.5, 0.2]), "b": torch.tensor([0.3, 0.2, 0.1, 0.0])}
    grow = {"a": torch.tensor([100.0, 0.0, 0.0, 9.0]), "b": torch.tensor([0.0, 0.0, 0.0, 5.0])}
    # a keeps 3 with a regrowth share of 1/3: round(1) = 1 by regrowth (a3, since a0 is kept by score), 2 by score
    # b keeps 1: round(1/3) = 0 by regrowth (and never below min_channels by score anyway)
    m = select_masks_budgeted(s, grow, {"a": 3, "b": 1}, regrow_share=1 / 3, min_channels=1)
    assert m["a"].tolist() == [True, False, True, True]
    assert m["b"].tolist() == [True, False, False, False]


# --- criticality --------------------------------------------------------------------------------

def test_criticality_function_values():
    v = torch.tensor([1.0, 1.5, 0.5, 0.0])
    # ATan, alpha = 2: 1 / (1 + (pi (v - 1))^2): 1, 1/(1 + pi^2/4) = 0.28840 (both sides), 1/(1 + pi^2) = 0.09199
    expected = torch.tensor([1.0, 1 / (1 + PI ** 2 / 4), 1 / (1 + PI ** 2 / 4), 1 / (1 + PI ** 2)])
    assert torch.allclose(criticality(v, 1.0, 2.0), expected)
    # alpha = 4 doubles the slope: at v - 1 = 0.5 -> 1 / (1 + pi^2) = 0.09199
    assert criticality(torch.tensor(1.5), 1.0, 4.0).item() == pytest.approx(1 / (1 + PI ** 2))
    # Sigmoid, alpha = 4: 4 s (1 - s), s = sigmoid(4 x): 1 at x = 0; x = 0.5 -> s = sigmoid(2) = 0.880797 -> 0.419974
    assert criticality(torch.tensor(1.0), 1.0, 4.0, "sigmoid").item() == pytest.approx(1.0)
    assert criticality(torch.tensor(1.5), 1.0, 4.0, "sigmoid").item() == pytest.approx(0.419974, abs=1e-6)
    # ... and it is spikingjelly's surrogate derivative divided by its peak (alpha/2 for ATan, alpha/4 for Sigmoid)
    x = torch.linspace(-3, 3, 13)
    one = torch.ones_like(x)
    assert torch.allclose(criticality(x + 0.7, 0.7, 3.0), surrogate.ATan.backward(one, x, 3.0) / 1.5)
    assert torch.allclose(criticality(x + 0.7, 0.7, 3.0, "sigmoid"), surrogate.Sigmoid.backward(one, x, 3.0) / 0.75)


@pytest.mark.parametrize("reset, expected", [
    # LIF tau 2, threshold 1, x = [1.5, 1.5, 0.4, 3.0], v[-1] = 0
    # hard: H0 = 0.75; H1 = 0.75 + (1.5 - 0.75)/2 = 1.125 fire -> 0; H2 = 0.4/2 = 0.2; H3 = 0.2 + 2.8/2 = 1.6
    ("hard", [0.75, 1.125, 0.2, 1.6]),
    # soft: after H1 fires v = 0.125; H2 = 0.125 + (0.4 - 0.125)/2 = 0.2625; H3 = 0.2625 + 2.7375/2 = 1.63125
    ("soft", [0.75, 1.125, 0.2625, 1.63125]),
])
def test_membrane_before_fire_hand_lif(reset, expected):
    node = make_neuron({"tau": 2.0, "v_threshold": 1.0, "reset": reset})
    node.store_v_seq = True
    x = torch.tensor([1.5, 1.5, 0.4, 3.0]).view(4, 1)
    spikes = node(x)
    assert spikes.flatten().tolist() == [0.0, 1.0, 0.0, 1.0]
    assert torch.allclose(membrane_before_fire(node, x, node.v_seq).flatten(), torch.tensor(expected))


def test_membrane_before_fire_hand_if():
    # IF: H[t] = v[t-1] + x[t]: 0.6; 1.2 fire -> 0; 0.4; 3.4
    node = make_neuron({"type": "if"})
    node.store_v_seq = True
    x = torch.tensor([0.6, 0.6, 0.4, 3.0]).view(4, 1)
    node(x)
    assert torch.allclose(membrane_before_fire(node, x, node.v_seq).flatten(), torch.tensor([0.6, 1.2, 0.4, 3.4]))


@pytest.mark.parametrize("v_reset, decay_input", [(0.0, True), (None, True), (-0.3, True), (0.0, False), (None, False)])
def test_membrane_before_fire_matches_spikingjelly_charge(v_reset, decay_input):
    """H rebuilt from (x, v_seq) equals spikingjelly's own charge of v[t-1], and fire/reset of H give spikes/v."""
    torch.manual_seed(0)
    node = neuron.LIFNode(tau=1.7, decay_input=decay_input, v_threshold=0.8, v_reset=v_reset,
                          surrogate_function=surrogate.ATan(), step_mode="m", store_v_seq=True)
    x = torch.randn(6, 3, 4, 2, 2) * 1.5
    spikes = node(x)
    h = membrane_before_fire(node, x, node.v_seq)
    v_prev = torch.cat([torch.full_like(x[:1], 0.0 if v_reset is None else v_reset), node.v_seq[:-1]])
    for t in range(6):
        charged = functional.lif_charge(x[t], v_prev[t], 1.7, decay_input, v_reset)
        assert torch.allclose(h[t], charged, atol=1e-6)
    assert torch.equal(spikes, (h >= 0.8).float())
    after = h - 0.8 * spikes if v_reset is None else torch.where(spikes.bool(), torch.full_like(h, v_reset), h)
    assert torch.allclose(node.v_seq, after, atol=1e-6)
    assert spikes.sum() > 0 and (1 - spikes).sum() > 0  # both branches exercised


class _GateLIF(nn.Module):
    """gate -> LIF; ``bn`` only gives the scorer its |gamma| (not in the forward path)."""

    def __init__(self, channels: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.spike = make_neuron({"tau": 2.0, "v_threshold": 1.0, "reset": "hard"})
        attach_gates(self, torch.zeros(1, 1, channels, 1, 1))

    def forward(self, x):
        return self.spike(x)


def test_criticality_scorer_mean_t_max_space_mean_samples():
    # LIF tau 2, hard reset, ATan alpha 2 (c = 1 / (1 + (pi (H - 1))^2)), T = 2, constant input over T
    # input 2: H0 = 1 (fire, reset 0), H1 = 1 -> c = 1, 1 -> mean over T 1
    # input 1: H0 = 0.5, H1 = 0.75 -> c = 1/(1 + pi^2/4) = 0.288400, 1/(1 + pi^2/16) = 0.618503 -> 0.453451
    # input 0: H = 0 -> c = 1/(1 + pi^2) = 0.091999
    c_half, c_quarter, c_rest = 1 / (1 + PI ** 2 / 4), 1 / (1 + PI ** 2 / 16), 1 / (1 + PI ** 2)
    # [N = 2, C = 2, H = 1, W = 2]: sample 0: ch0 pixels (2, 0), ch1 (1, 0); sample 1: ch0 (0, 0), ch1 (0, 1)
    img = torch.tensor([[[[2.0, 0.0]], [[1.0, 0.0]]], [[[0.0, 0.0]], [[0.0, 1.0]]]])
    x = img.unsqueeze(0).repeat(2, 1, 1, 1, 1)
    net = _GateLIF(2)
    scorer = CriticalityScorer(net, [ChannelGroup("g", 2, ["conv"], ["bn"], ["spike.gate"])],
                               CriticalityOptions(measure="training"))
    # max over space per sample, then mean over samples: ch0 (1 + c_rest)/2, ch1 (m + m)/2 with m = 0.453451
    m = (c_half + c_quarter) / 2
    net.train()
    net(x)
    functional.reset_net(net)
    assert torch.allclose(scorer.criticality_scores()["g"], torch.tensor([(1 + c_rest) / 2, m], dtype=torch.float64))
    # a second batch of the window is averaged in per sample: one sample of all zeros
    net(torch.zeros(2, 1, 2, 1, 2))
    functional.reset_net(net)
    expected = torch.tensor([(1 + 2 * c_rest) / 3, (2 * m + c_rest) / 3], dtype=torch.float64)
    assert torch.allclose(scorer.regrowth_scores()["g"], expected)
    # a closed gate: the channel's neuron sees 0, but its criticality is that of the input it would get
    scorer.reset()
    net.spike.gate.set_mask(torch.tensor([False, True]))
    net(x)
    functional.reset_net(net)
    assert torch.allclose(scorer.criticality_scores()["g"], torch.tensor([(1 + c_rest) / 2, m], dtype=torch.float64))
    # not accumulated in eval; nothing at all after remove()
    scorer.reset()
    net.eval()
    net(x)
    net.train()
    scorer.remove()
    net(x)
    assert scorer.criticality_scores()["g"].sum().item() == 0.0


class _Tiny(nn.Module):
    """conv (1x1, 1 -> 4, zero weights) -> BN -> gate -> LIF: the neuron input is BN's beta exactly."""

    def __init__(self):
        super().__init__()
        self.conv = layer.Conv2d(1, 4, 1, bias=False, step_mode="m")
        self.bn = layer.BatchNorm2d(4, step_mode="m")
        self.spike = make_neuron({"tau": 2.0, "v_threshold": 1.0})
        nn.init.zeros_(self.conv.weight)
        attach_gates(self, torch.zeros(1, 1, 1, 2, 2))

    def forward(self, x):
        return self.spike(self.bn(self.conv(x)))


@pytest.mark.parametrize("method, measure, regrown", [("criticality", "update", 3), ("criticality", "training", 3),
                                                      ("bn", None, 2)])
def test_criticality_regrowth_uses_criticality(method, measure, regrown):
    # gamma = [4, 3, 2, 1]: |gamma| keeps ch0, ch1. beta = [0, 0, -5, 2]: ch3's input 2 puts H at threshold
    # (criticality 1), ch2's input -5 far below (H0 = -2.5 -> c ~ 0.008). The default regrowth signal
    # |dL/dgate| favours ch2 (100 vs 0). keep 3 of 4, regrow 1: criticality regrows ch3, bn ch2.
    # Criticality is measured either at the update over the training batches in eval mode (the BN then uses its
    # running statistics, 0 and 1: its output is beta again) or in the window's training steps.
    net = _Tiny()
    with torch.no_grad():
        net.bn.weight.copy_(torch.tensor([4.0, 3.0, 2.0, 1.0]))
        net.bn.bias.copy_(torch.tensor([0.0, 0.0, -5.0, 2.0]))
    groups = [ChannelGroup("conv", 4, ["conv"], ["bn"], ["spike.gate"])]
    cfg = PruneCfg(method=method, keep=0.75, regrow=0.25, warmup_epochs=0, ramp_epochs=1, finetune_epochs=0,
                   min_channels=1, options={"measure": measure} if measure else {}, recalibrate_bn=0)
    seen = []
    pruner = build_pruner(net, groups, cfg, epochs=1,
                          batches=lambda n: seen.append((n, net.training)) or [torch.ones(2, 3, 1, 2, 2)])
    net.train()
    net(torch.ones(2, 3, 1, 2, 2))
    functional.reset_net(net)
    net.spike.gate.gate.grad = torch.tensor([0.0, 0.0, 100.0, 0.0])
    pruner.after_backward()
    entry = pruner.end_epoch(0)
    expected = [True, True, False, False]
    expected[regrown] = True
    assert entry["masks"]["conv"].tolist() == expected
    assert seen == ([(None, False)] if measure == "update" else [])  # the whole training set, in eval mode
    pruner.remove()


def test_criticality_penalty_is_l1_on_gamma():
    net = _Tiny()
    with torch.no_grad():
        net.bn.weight.copy_(torch.tensor([4.0, -3.0, 2.0, 1.0]))
    groups = [ChannelGroup("conv", 4, ["conv"], ["bn"], ["spike.gate"])]
    pruner = build_pruner(net, groups, PruneCfg(method="criticality", options={"l1_gamma": 1e-3}), epochs=30)
    pen = pruner.penalty()  # 1e-3 * (4 + 3 + 2 + 1) = 0.01
    assert pen.item() == pytest.approx(0.01)
    pen.backward()
    assert torch.allclose(net.bn.weight.grad, torch.tensor([1e-3, -1e-3, 1e-3, 1e-3]))  # l1_gamma * sign(gamma)
    assert build_pruner(_Tiny(), groups, PruneCfg(method="bn"), epochs=30).penalty().item() == 0.0
    assert build_pruner(_Tiny(), groups, PruneCfg(method="criticality", options={"l1_gamma": 0}),
                        epochs=30).penalty().item() == 0.0


# --- baselines ----------------------------------------------------------------------------------

class _TwoConvs(nn.Module):
    """Two 1x2 convs (2 filters each) forming one coupled group, and one more single-conv group."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 2, (1, 2), bias=False)
        self.b = nn.Conv2d(1, 2, (1, 2), bias=False)
        self.c = nn.Conv2d(2, 3, 1, bias=False)
        self.bn_a, self.bn_b, self.bn_c = nn.BatchNorm2d(2), nn.BatchNorm2d(2), nn.BatchNorm2d(3)


def _two_convs():
    net = _TwoConvs()
    with torch.no_grad():
        net.a.weight.copy_(torch.tensor([[1.0, -2.0], [0.5, 0.5]]).view(2, 1, 1, 2))
        net.b.weight.copy_(torch.tensor([[1.0, 1.0], [-3.0, 0.0]]).view(2, 1, 1, 2))
        net.c.weight.copy_(torch.tensor([[1.0, -1.0], [0.0, 0.0], [0.25, 0.5]]).view(3, 2, 1, 1))
        net.bn_a.weight.copy_(torch.tensor([-1.0, 0.5]))
        net.bn_b.weight.copy_(torch.tensor([3.0, 0.5]))
        net.bn_c.weight.copy_(torch.tensor([0.1, -0.2, 0.0]))
    groups = [ChannelGroup("a", 2, ["a", "b"], ["bn_a", "bn_b"]), ChannelGroup("c", 3, ["c"], ["bn_c"])]
    return net, groups


def test_l1_scores_filter_norm_mean_over_members():
    net, groups = _two_convs()
    s = L1Scorer(net, groups).scores()
    # a: filters |1|+|-2| = 3, 0.5+0.5 = 1; b: 2, 3 -> mean (2.5, 2.0); c: 2, 0, 0.75
    assert s["a"].tolist() == [2.5, 2.0] and s["c"].tolist() == [2.0, 0.0, 0.75]
    assert s["a"].dtype == torch.float64
    with torch.no_grad():  # read at scores() time
        net.a.weight.zero_()
    assert L1Scorer(net, groups).scores()["a"].tolist() == [1.0, 1.5]


def test_bn_scores_abs_gamma_mean_over_members():
    net, groups = _two_convs()
    s = BNScorer(net, groups).scores()
    # a: |-1|, |0.5| and |3|, |0.5| -> (2, 0.5); c: 0.1, 0.2, 0
    assert s["a"].tolist() == [2.0, 0.5]
    assert torch.allclose(s["c"], torch.tensor([0.1, 0.2, 0.0], dtype=torch.float64))
    with pytest.raises(ModelError, match="BatchNorm"):
        BNScorer(net, [ChannelGroup("a", 2, ["a", "b"], [])])


def test_random_scores_seeded_fresh_each_window():
    net, groups = _two_convs()
    s1 = RandomScorer(net, groups, seed=7)
    s2 = RandomScorer(net, groups, seed=7)
    w1 = s1.scores()
    assert all(torch.equal(w1[n], s2.scores()[n]) for n in w1)
    assert all(torch.equal(w1[n], s1.scores()[n]) for n in w1)  # stable within a window
    s1.reset()
    assert not torch.equal(w1["c"], s1.scores()["c"])  # fresh next window ...
    s2.reset()
    assert torch.equal(s1.scores()["c"], s2.scores()["c"])  # ... and reproducible
    expected = torch.Generator().manual_seed(7)
    assert torch.equal(w1["a"], torch.rand(2, generator=expected, dtype=torch.float64))
    assert not torch.equal(w1["c"], RandomScorer(net, groups, seed=8).scores()["c"])


# --- recipe ------------------------------------------------------------------------------------

def test_recipe_fields_validated():
    r = parse_recipe({"prune": {"method": "criticality", "budget": "pq"}})
    assert r.prune.options == {"l1_gamma": 1e-4, "measure": "update", "batches": None} and (r.prune.pq.p, r.prune.pq.q, r.prune.pq.beta) == (0.5, 1.0, 0.9)
    assert {m for m in registry.list_methods() if registry.METHODS.meta(m)["family"] == "structured"} == \
        {"sca", "random", "l1", "bn", "criticality", "tp_taylor", "tp_lamp"}
    pq = {"method": "sca", "budget": "pq"}
    for bad, msg in [({**pq, "pq": {"p": 1.0, "q": 0.5}}, "prune.pq.q: must be > p (1.0), got 0.5"),
                     ({**pq, "pq": {"p": 0}}, "prune.pq.p: must be > 0"),
                     ({"method": "criticality", "options": {"l1_gamma": -1}},
                      "prune.options.l1_gamma: must be greater than or equal to 0"),
                     ({"method": "criticality", "options": {"l1": 1}}, "prune.options.l1: unknown key; allowed: l1_gamma"),
                     ({"method": "sca", "options": {"l1_gamma": 1}}, "prune.options: method sca has no options"),
                     ({**pq, "pq": {"eta": -0.1}}, "prune.pq.eta: must be >= 0"),
                     ({**pq, "pq": {"gamma": 0}}, "prune.pq.gamma: must be > 0"),
                     ({**pq, "pq": {"beta": 0}}, "prune.pq.beta: must be in (0, 1]"), ({"budget": "layer"}, "prune.budget"),
                     ({"pq": {"p": 0.4}}, "prune.pq: only for budget: pq"), ({"method": "magic"}, "prune.method"),
                     ({"budget_unit": "bytes"}, "prune.budget_unit: unknown budget unit 'bytes'; registered: channels")]:
        with pytest.raises(RecipeError) as e:
            parse_recipe({"prune": bad})
        assert msg in str(e.value)


def test_older_flat_method_fields_are_translated_once_or_refused_with_the_new_spelling():
    # a recipe (or a checkpoint's recipe) of snncompress <= 0.1.0 states every flat field; defaults are dropped
    old = {"method": "criticality", "l1_gamma": 1e-3, "weight_regrow": 0.5, "scope": "layer", "er_init": True,
           "pq_p": 0.5, "pq_q": 1.0, "pq_eta": 0.0, "pq_gamma": 1.0, "pq_beta": 0.9}
    assert parse_recipe({"prune": old}).prune.options == {"l1_gamma": 1e-3, "measure": "update", "batches": None}
    pq = parse_recipe({"prune": {"method": "pq", "sparsity": 0.5, "scope": "neuron", "pq_eta": 0.001,
                                 "warmup_epochs": 1}}).prune.options
    assert (pq["scope"], pq["eta"], pq["er_init"]) == ("neuron", 0.001, True)
    assert parse_recipe({"prune": {"method": "sca", "budget": "pq", "pq_q": 2.0}}).prune.pq.q == 2.0
    for bad, msg in [({"method": "sca", "l1_gamma": 0.1},
                      "prune.l1_gamma: now spelled prune.options.l1_gamma (method criticality); not an option of "
                      "method sca"),
                     ({"method": "sca", "pq_p": 0.4}, "prune.pq_p: now spelled prune.options.p (method pq) or "
                                                      "prune.pq.p (budget: pq)")]:
        with pytest.raises(RecipeError) as e:
            parse_recipe({"prune": bad})
        assert msg in str(e.value), str(e.value)


# --- end to end -----------------------------------------------------------------------------------

METHODS = ["sca", "random", "l1", "bn", "criticality"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, dict]:
    """The tiny recipe trained once per method (and SCA with the PQ budget); final checkpoints."""
    out = {}
    runs = [*((m, {"method": m}) for m in METHODS), ("sca+pq", {"method": "sca", "budget": "pq"}),
            ("criticality-l1", {"method": "criticality", "l1_gamma": 0.05})]
    for name, prune in runs:
        recipe = parse_recipe({**TINY, "prune": {**TINY["prune"], **prune}})
        res = snncompress.train(recipe, tmp_path_factory.mktemp(name.replace("+", "_")), progress=False)
        out[name] = torch.load(res.ckpt, weights_only=True)
    return out


@pytest.mark.parametrize("name", [*METHODS, "sca+pq"])
def test_every_method_trains_to_the_budget(trained, name):
    ckpt = trained[name]
    masks = ckpt["masks"]
    kept = sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    assert kept == pytest.approx(0.5)  # 20 of 40 channels (8 + 16 + 16)
    assert ckpt["metrics"]["kept_channels"] == pytest.approx(0.5)
    assert all(m.any() for m in masks.values())
    assert len(ckpt["history"]) == 2  # updates at the end of epochs 1 and 2 (warm-up 1, fine-tune 1)


def test_methods_choose_different_channels(trained):
    flat = {n: torch.cat([m for m in c["masks"].values()]) for n, c in trained.items() if n != "criticality-l1"}
    names = list(flat)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not torch.equal(flat[a], flat[b]), f"{a} and {b} chose the same channels"


def test_pq_budget_differs_from_global_per_layer(trained):
    # same total, but the per-layer split follows each layer's PQ index, not one global ranking
    glob = {n: int(m.sum()) for n, m in trained["sca"]["masks"].items()}
    pq = {n: int(m.sum()) for n, m in trained["sca+pq"]["masks"].items()}
    assert sum(glob.values()) == sum(pq.values()) == 20
    assert glob != pq


def test_l1_penalty_reaches_the_training_loss(trained):
    # criticality trains with l1_gamma * sum |gamma| in the loss: a strong penalty (0.05 vs 1e-4) shrinks gamma
    def mean_abs_gamma(ckpt):
        sd = ckpt["state_dict"]
        return torch.cat([sd[k].abs() for k in sd if k.endswith(".bn.weight")]).mean().item()
    assert mean_abs_gamma(trained["criticality-l1"]) < 0.9 * mean_abs_gamma(trained["criticality"])
