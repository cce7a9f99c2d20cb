import torch
import torch.nn as nn
from spikingjelly.activation_based import functional

from snncompress.models.neuron import make_neuron
from snncompress.prune.gates import ChannelGroup, attach_gates
from snncompress.prune.sca import ActivityScorer


def test_activity_score_is_mean_of_spikes_plus_abs_membrane():
    # gate -> LIF (tau 2, hard reset to 0, threshold 1), 2 channels, input constant over T = 2 steps:
    # channel 0 gets 1.5: v1 = 0.75 (no spike), v2 = 0.75 + (1.5 - 0.75)/2 = 1.125 -> spike, reset 0
    #   score = mean(s + |v|) over t = ((0 + 0.75) + (1 + 0)) / 2 = 0.875
    # channel 1 gets -1: v1 = -0.5, v2 = -0.75 -> score (0.5 + 0.75) / 2 = 0.625
    net = nn.Sequential()
    net.add_module("spike", make_neuron({"tau": 2.0, "v_threshold": 1.0, "reset": "hard"}))
    attach_gates(net, torch.zeros(1, 1, 2, 1, 1))
    scorer = ActivityScorer(net, [ChannelGroup("g", 2, ["conv"], gates=["spike.gate"])])
    x = torch.tensor([1.5, -1.0]).view(1, 1, 2, 1, 1).repeat(2, 1, 1, 1, 1)  # [T, B, C, H, W]
    net.train()
    net(x)
    functional.reset_net(net)
    assert torch.allclose(scorer.scores()["g"], torch.tensor([0.875, 0.625], dtype=torch.float64))
    # a closed gate feeds 0: the neuron neither fires nor polarises
    net.spike.gate.set_mask(torch.tensor([True, False]))
    scorer.reset()
    net(x)
    assert scorer.scores()["g"][1].item() == 0.0


def test_scores_not_accumulated_in_eval():
    net = nn.Sequential()
    net.add_module("spike", make_neuron())
    attach_gates(net, torch.zeros(1, 1, 1, 1, 1))
    scorer = ActivityScorer(net, [ChannelGroup("g", 1, ["conv"], gates=["spike.gate"])])
    net.eval()
    net(torch.ones(2, 1, 1, 1, 1))
    assert scorer.scores()["g"].item() == 0.0
