"""Property-based fuzzing (Hypothesis) of the two files a user hands snncompress: recipes and checkpoints.

Whatever a field is replaced by, the command ends with exit 0, 1 or 2 and one line of error: never an internal
error (exit 3), never a traceback. The commands run in-process (the CLI's own entry point with its error
handling), so a case costs milliseconds unless the mutated file is still valid and the command does its work.
The slow lane runs many more cases.
"""

import math
import os

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snncompress import cli
from snncompress.config import load_recipe
from snncompress.errors import SnnCompressError

from .conftest import TINY

QUICK = settings(max_examples=25, deadline=None, database=None, derandomize=True,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
# SNNCOMPRESS_FUZZ=N: N random cases per slow test instead of the same 300 (to explore, not for CI)
MANY = settings(QUICK, max_examples=int(os.environ.get("SNNCOMPRESS_FUZZ", 300)),
                derandomize=not os.environ.get("SNNCOMPRESS_FUZZ"))

# what a field may be replaced by: anything YAML or a pickle-free checkpoint can hold, weighted to the edges
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.sampled_from([0, -1, 1, 2**31, 2**63, 10**9]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([math.inf, -math.inf, math.nan, 0.0, -0.0, 1e308]),
    st.text(max_size=12), st.sampled_from(["[/]", "[bold]x", "\x1b[2J", "../..", "M", "auto", "", "lif", "sca"]))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                      max_leaves=6)

RECIPE = {**TINY, "train": {"epochs": 1, "optimizer": {"name": "sgd", "lr": 0.1}},
          "prune": {**TINY["prune"], "warmup_epochs": 0, "ramp_epochs": 0, "finetune_epochs": 0}}


def _paths(tree: dict, prefix: tuple = ()) -> list[tuple]:
    out = []
    for k, v in tree.items():
        out.append((*prefix, k))
        if isinstance(v, dict):
            out += _paths(v, (*prefix, k))
    return out


RECIPE_PATHS = _paths(RECIPE) + [("model", "width"), ("model", "neuron", "tau"), ("model", "neuron", "v_threshold"),
                                 ("data", "workers"), ("data", "encoding"), ("prune", "budget_unit"),
                                 ("prune", "options"), ("train", "slim_finetune"), ("deploy", "runtime")]


def _set(tree: dict, path: tuple, value) -> dict:
    tree = dict(tree)
    head, *rest = path
    node = tree.get(head)
    tree[head] = _set(node if isinstance(node, dict) else {}, tuple(rest), value) if rest else value
    return tree


def _run(capsys, *argv) -> tuple[int, str]:
    """(exit code, stderr) of the CLI run in this process."""
    try:
        cli._main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    err = capsys.readouterr().err
    return code, err


def _assert_handled(code: int, err: str, case) -> None:
    assert code in (0, 1, 2), (case, err)
    assert "Traceback (most recent call last)" not in err and not err.startswith("internal error:"), (case, err)
    assert code == 0 or len(err.strip().splitlines()) == 1, (case, err)


def _recipe_case(tmp_path, capsys, mutations) -> None:
    recipe = RECIPE
    for path, value in mutations:
        recipe = _set(recipe, path, value)
    file = tmp_path / "r.yaml"
    try:
        file.write_text(yaml.safe_dump(recipe, allow_unicode=True))
    except (yaml.YAMLError, ValueError):  # not representable in YAML: nothing to feed
        return
    if _trains_big(file):
        return
    code, err = _run(capsys, "train", file, "--out", tmp_path / "out")
    _assert_handled(code, err, mutations)


def _trains_big(file) -> bool:
    """A valid recipe that would really train something large (many workers, steps or channels): not run here,
    where only the refusals and a tiny training are wanted."""
    try:
        r = load_recipe(file)
    except SnnCompressError:
        return False
    layers, width = r.model.options.get("layers", []), r.model.options.get("width", 1)
    # (model options are checked by the builder when train starts: here they may still be anything)
    widths = [v for v in layers if isinstance(v, int)] if isinstance(layers, list) else []
    return (r.data.workers > 1 or r.data.T > 8 or r.data.batch_size > 512 or r.train.epochs > 2
            or len(widths) > 8 or sum(widths) > 256 or (isinstance(width, (int, float)) and width > 2))


MUTATIONS = st.lists(st.tuples(st.sampled_from(RECIPE_PATHS), VALUES), min_size=1, max_size=3)


@QUICK
@given(mutations=MUTATIONS)
def test_mutated_recipes_end_in_a_handled_exit(tmp_path, capsys, mutations):
    _recipe_case(tmp_path, capsys, mutations)


@pytest.mark.slow
@MANY
@given(mutations=MUTATIONS)
def test_many_mutated_recipes_end_in_a_handled_exit(tmp_path, capsys, mutations):
    _recipe_case(tmp_path, capsys, mutations)


CKPT_FIELDS = ["masks", "history", "epoch", "data", "recipe", "model", "state_dict", "metrics", "format",
               "kept_index", "weights", "train_state", ("data", "T"), ("data", "input_shape"), ("data", "classes"),
               ("data", "encoding"), ("recipe", "name"), ("recipe", "data"), ("model", "kwargs"), ("model", "name")]
TENSORS = st.sampled_from([torch.zeros(3, dtype=torch.bool), torch.ones(0), torch.tensor([math.nan]),
                           torch.ones(2, 2, dtype=torch.int64), torch.ones(16, dtype=torch.bool)])


def _checkpoint_case(run_dir, tmp_path, capsys, field, value) -> None:
    ckpt = torch.load(run_dir / "train" / "ckpt.pt", weights_only=True)
    if isinstance(field, tuple):
        ckpt[field[0]] = {**ckpt[field[0]], field[1]: value} if isinstance(ckpt[field[0]], dict) else value
    else:
        ckpt[field] = value
    path = tmp_path / "c.pt"
    torch.save(ckpt, path)
    for argv in (("info", path), ("slim", path, "-o", tmp_path / "slim.pt")):
        code, err = _run(capsys, *argv)
        _assert_handled(code, err, (field, value, argv[0]))


FIELD_VALUES = st.one_of(VALUES, TENSORS, st.dictionaries(st.text(max_size=20), TENSORS, max_size=3))


@QUICK
@given(field=st.sampled_from(CKPT_FIELDS), value=FIELD_VALUES)
def test_mutated_checkpoint_fields_end_in_a_handled_exit(run_dir, tmp_path, capsys, field, value):
    _checkpoint_case(run_dir, tmp_path, capsys, field, value)


@pytest.mark.slow
@MANY
@given(field=st.sampled_from(CKPT_FIELDS), value=FIELD_VALUES)
def test_many_mutated_checkpoint_fields_end_in_a_handled_exit(run_dir, tmp_path, capsys, field, value):
    _checkpoint_case(run_dir, tmp_path, capsys, field, value)
