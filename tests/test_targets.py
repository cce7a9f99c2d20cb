"""Hardware targets: Speck / DYNAP-CNN's limits and memory formulas (sinabs's), on real NIR graphs and the CLI."""

import nir
import numpy as np
import pytest
import torch

import snncompress as sc
from snncompress.errors import SnnCompressError
from snncompress.export.nir import nir_body, to_nir_graph
from snncompress.prune.gates import attach_gates
from snncompress.registry import TARGETS
from snncompress.stages.check import check_target
from snncompress.targets import core_layers
from snncompress.targets.speck import kernel_memory, neuron_memory, place

from .conftest import cli

KI = 1024


def test_memory_formulas_match_hand_computed_cases():
    # sinabs docs/speck/overview.md's example: Conv2d(16, 32, 3x3) on 64x64 needs 8 Ki kernel and 128 Ki neuron entries
    assert kernel_memory(16, 32, 3, 3) == 8 * KI
    assert neuron_memory(32, 64, 64) == 128 * KI
    # not powers of two: 3 * 2^(ceil(log2 25) + ceil(log2 20)) = 3 * 2^(5 + 5); 10 * 2^(5 + 5) for a 30x30 map
    assert kernel_memory(3, 20, 5, 5) == 3 * 2 ** 10
    assert neuron_memory(10, 30, 30) == 10 * 2 ** 10
    assert kernel_memory(12, 1, 1, 1) == 12 and neuron_memory(1, 1, 1) == 1  # log2(1) = 0


def test_placement_is_a_matching_of_layers_to_cores():
    # 40 Ki kernel entries fit only cores 5 and 6 (64 Ki): two such layers fit, three do not
    big, small = (40 * KI, 1, 8), (1, 1, 8)
    assert sorted(place([big, big, small])[:2]) == [5, 6]
    assert place([big, big, big]) is None
    assert place([small] * 9) is not None and place([small] * 10) is None
    # 48 Ki neurons fit cores 0-2 only; a 20 Ki kernel needs cores 3-6: together they need cores 3 or 4 for the kernel
    assert place([(20 * KI, 48 * KI, 8)]) is None


def _graph(*layers, shape=(2, 16, 16)):
    """A sequential NIR graph from ``("conv", f, k, stride, pad) | ("if",) | ("lif",) | ("pool", k) | ("flatten",)
    | ("affine", f)`` specs."""
    nodes, c = {"in": nir.Input({"input": np.array(shape)})}, list(shape)
    for i, spec in enumerate(layers):
        kind = spec[0]
        if kind == "conv":
            f, k, s, p = spec[1:]
            nodes[f"conv{i}"] = nir.Conv2d((c[1], c[2]), np.zeros((f, c[0], k, k), np.float32), s, p, 1, 1,
                                           np.zeros(f, np.float32))
            c = [f, (c[1] + 2 * p - k) // s + 1, (c[2] + 2 * p - k) // s + 1]
        elif kind in ("if", "lif"):
            one = np.ones(c, np.float32)
            nodes[f"n{i}"] = nir.IF(one, one) if kind == "if" else nir.LIF(one * 1e-4, one, 0 * one, one)
        elif kind == "pool":
            k = np.array([spec[1], spec[1]])
            nodes[f"pool{i}"] = nir.SumPool2d(k, k, np.zeros(2, int))
            c = [c[0], c[1] // spec[1], c[2] // spec[1]]
        elif kind == "flatten":
            nodes[f"flat{i}"] = nir.Flatten({"input": np.array(c)}, 0)
            c = [int(np.prod(c))]
        else:
            nodes[f"fc{i}"] = nir.Affine(np.zeros((spec[1], c[0]), np.float32), np.zeros(spec[1], np.float32))
            c = [spec[1]]
    nodes["out"] = nir.Output({"output": np.array(c)})
    names = list(nodes)
    return nir.NIRGraph(nodes, list(zip(names, names[1:])), type_check=False)


def _check(graph, metadata=None):
    return TARGETS.get("speck")().check(core_layers(graph), metadata or {})


def test_a_network_within_every_limit_fits_with_its_core_use():
    g = _graph(("conv", 8, 3, 1, 1), ("if",), ("pool", 2), ("conv", 16, 3, 2, 1), ("if",), ("flatten",),
               ("affine", 10), ("if",))
    r = _check(g)
    assert r.fits and r.violations == []
    assert [row[:1] + row[2:6] for row in r.rows] == [["conv0", "2 x 8", "3x3", "16x16", "2x2"],
                                                      ["conv3", "8 x 16", "3x3", "4x4", "-"],
                                                      ["fc6", "16 x 10", "4x4", "1x1", "-"]]
    assert len({row[1] for row in r.rows}) == 3  # a core each
    # the affine layer is the conv over its whole 16 x 4 x 4 input: 16 * 2^(4 + 4) kernel entries
    assert r.rows[2][6].startswith(f"{16 * 2 ** 8:,} / ")
    assert any("floating point" in n for n in r.notes)


@pytest.mark.parametrize("spec, expected", [
    (("conv", 8, 17, 1, 0), "conv0: kernel 17x17 (speck: at most 16x16)"),
    (("conv", 8, 3, 3, 1), "conv0: stride 3x3 (speck: 1, 2, 4 or 8)"),
    (("conv", 8, 3, 1, 8), "conv0: padding 8x8 (speck: 0 to 7)"),
    (("conv", 1100, 1, 1, 0), "conv0: output channels 1100 (speck: at most 1024)"),
])
def test_each_violated_limit_is_one_line_naming_layer_value_and_limit(spec, expected):
    r = _check(_graph(spec, ("if",), shape=(2, 16, 16)))
    assert expected in r.violations and not r.fits


def test_neurons_pooling_maps_bits_and_memory_are_checked():
    r = _check(_graph(("conv", 8, 3, 1, 1), ("lif",), ("pool", 3)), {"weight_bits": "16"})
    assert "conv0: neuron LIF (speck: integrate-and-fire (IF) neurons only: model.neuron.type: if)" in r.violations
    assert "conv0: pooling 3x3 stride 3 (speck: square sum pooling 1, 2 or 4, stride = size)" in r.violations
    assert "weights: 16 bits (speck: at most 8)" in r.violations
    r = _check(_graph(("conv", 4, 3, 1, 1), ("if",), shape=(1, 130, 130)))
    assert {"conv0: input map 130x130 (speck: at most 128x128)",
            "conv0: output map 130x130 (speck: at most 64x64)"} <= set(r.violations)
    # sinabs's example: 32 maps of 64x64 need 128 Ki neuron entries; the largest neuron memory holds 64 Ki
    r = _check(_graph(("conv", 32, 3, 1, 1), ("if",), shape=(16, 64, 64)))
    assert r.violations == ["conv0: neuron memory 131,072 entries (speck: at most 65,536 on a core)"]
    r = _check(_graph(*[s for _ in range(10) for s in (("conv", 4, 3, 1, 1), ("if",))], shape=(4, 8, 8)))
    assert r.violations == ["model: 10 weighted layers (speck: 9 cores, one layer each)"]


def test_a_fan_out_above_two_is_a_violation():
    one = np.ones((4, 8, 8), np.float32)
    conv = lambda c: nir.Conv2d((8, 8), np.zeros((4, c, 3, 3), np.float32), 1, 1, 1, 1, np.zeros(4, np.float32))  # noqa: E731
    nodes = {"in": nir.Input({"input": np.array([2, 8, 8])}), "a": conv(2), "na": nir.IF(one, one),
             **{f"b{i}": conv(4) for i in range(3)}, **{f"nb{i}": nir.IF(one, one) for i in range(3)},
             "out": nir.Output({"output": np.array([4, 8, 8])})}
    edges = [("in", "a"), ("a", "na"), *[e for i in range(3) for e in (("na", f"b{i}"), (f"b{i}", f"nb{i}"),
                                                                       (f"nb{i}", "out"))]]
    r = _check(nir.NIRGraph(nodes, edges, type_check=False))
    assert r.violations == ["a: fan-out 3 (speck: at most 2 destination cores)"]


def _if_model_nir(tmp_path):
    m = sc.create_model("vgg", in_channels=1, num_classes=10, layers=[8, 16, "M", 16], pool="avg",
                        neuron={"type": "if"})
    attach_gates(m, torch.zeros(2, 2, 1, 8, 8))
    x = torch.zeros(2, 1, 8, 8)
    path = tmp_path / "m.nir"
    nir.write(path, to_nir_graph(nir_body(m.eval(), x), x, {}))
    return path


def test_cli_check_prints_the_core_use_of_a_fitting_file_and_refuses_what_does_not_fit(tmp_path):
    path = _if_model_nir(tmp_path)
    res = cli("check", path, "--target", "speck")
    assert res.returncode == 0, res.stderr
    assert "on speck: fits" in res.stdout and "features_conv2_conv" in res.stdout
    bad = tmp_path / "bad.nir"
    nir.write(bad, _graph(("conv", 8, 3, 3, 1), ("lif",)))
    res = cli("check", bad)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "conv0: stride 3x3 (speck: 1, 2, 4 or 8)" in res.stdout
    assert res.stderr.strip().splitlines() == [f"error: {bad} does not fit speck: 2 violations (listed above)"]
    res = cli("check", path, "--target", "loihi")
    assert res.returncode == 2 and res.stderr.strip().splitlines() == ["error: unknown target 'loihi'; allowed: speck"]


def test_a_checkpoint_is_checked_as_its_nir_export_and_max_pooling_is_refused(run_dir):
    # the shared run's VGG uses max pooling, which no chip (and no NIR) has: refused in one line
    with pytest.raises(SnnCompressError, match="NIR has no max pooling"):
        check_target(run_dir / "slim.pt")


def test_a_graph_the_check_cannot_read_is_one_line(tmp_path):
    g = _graph(("conv", 8, 3, 1, 1), ("if",))
    g.nodes["n1"] = nir.Scale(np.ones((8, 16, 16), np.float32))  # a node kind no DYNAP-CNN core has
    path = tmp_path / "scale.nir"
    nir.write(path, g)
    res = cli("check", path)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == [
        "error: NIR graph: node n1 is a Scale, which the hardware check does not read; it reads Input, Conv2d, "
        "Affine/Linear, neurons (IF, LIF, ...), SumPool2d/AvgPool2d, Flatten and Output"]
    (tmp_path / "junk.nir").write_bytes(b"not hdf5")
    res = cli("check", tmp_path / "junk.nir")
    assert res.returncode == 1 and len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
