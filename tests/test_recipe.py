import pytest

from snncompress.errors import RecipeError
from snncompress.config import load_recipe, parse_recipe

from .conftest import TINY, cli, write_recipe


def _error(data: dict) -> str:
    with pytest.raises(RecipeError) as e:
        parse_recipe(data)
    return str(e.value)


def test_defaults_are_valid():
    r = parse_recipe({})
    assert r.prune.keep == 0.3 and r.model.name == "vgg"


def test_keep_out_of_range_names_field_and_range():
    msg = _error({"prune": {"keep": 1.5}})
    assert "prune.keep: must be in (0, 1], got 1.5" in msg


def test_keep_zero_rejected():
    assert "prune.keep: must be in (0, 1], got 0" in _error({"prune": {"keep": 0}})


def test_unknown_key_lists_allowed_keys():
    msg = _error({"prune": {"kep": 0.3}})
    assert "prune.kep: unknown key" in msg and "keep" in msg and "regrow" in msg


def test_unknown_top_level_section():
    assert "trian: unknown key" in _error({"trian": {}})


def _model_error(model: dict) -> str:
    """The error the model's own builder gives for its options (checked before any data is read)."""
    from snncompress.checkpoint import check_model_options

    with pytest.raises(RecipeError) as e:
        check_model_options(parse_recipe({"model": model}))
    return str(e.value)


def test_bad_literal_lists_choices():
    msg = _model_error({"neuron": {"surrogate": "relu"}})
    assert "model.neuron.surrogate" in msg and "'atan'" in msg and "'relu'" in msg


def test_negative_lr_and_zero_T():
    msg = _error({"train": {"optimizer": {"lr": -1}}, "data": {"T": 0}})
    assert "train.optimizer.lr: must be > 0" in msg and "data.T: must be > 0" in msg


def test_bad_layer_entry():
    assert "model.layers.1: must be a conv width (an int in [1, 16,384]) or 'M'" in _model_error({"layers": [8, "X"]})
    assert "model.layers: needs at least one conv width" in _model_error({"layers": ["M"]})


def test_a_bad_model_option_exits_2_in_one_line_before_anything_is_written(tmp_path):
    bad = write_recipe(tmp_path / "bad.yaml", {**TINY, "model": {"name": "resnet20", "layres": [8]}})
    res = cli("train", bad, "--out", tmp_path / "out")
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        "error: model.layres: unknown key; allowed: neuron, width (model resnet20)"], res.stderr
    assert not (tmp_path / "out").exists()


def test_regrow_must_fit_inside_keep():
    assert "regrow: must be < keep" in _error({"prune": {"keep": 0.2, "regrow": 0.3}})


def test_schedule_must_fit_in_epochs():
    msg = _error({"train": {"epochs": 5}, "prune": {"warmup_epochs": 2, "ramp_epochs": 3, "finetune_epochs": 1}})
    assert "must be <= train.epochs" in msg


def test_prune_null_is_dense():
    assert parse_recipe({"prune": None}).prune is None


def test_yaml_syntax_error(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("prune: {keep: [\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(p)


def test_cli_typo_exits_2_one_line_no_traceback(tmp_path):
    bad = write_recipe(tmp_path / "bad.yaml", {**TINY, "prune": {**TINY["prune"], "keep": 1.5}})
    out = tmp_path / "out"
    res = cli("train", bad, "--out", out)
    assert res.returncode == 2
    assert "prune.keep: must be in (0, 1], got 1.5" in res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    assert len(res.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_cli_debug_shows_traceback(tmp_path):
    bad = write_recipe(tmp_path / "bad.yaml", {**TINY, "trian": {}})
    res = cli("--debug", "train", bad)
    assert res.returncode != 0 and "Traceback" in res.stderr


def test_cli_missing_recipe(tmp_path):
    res = cli("run", tmp_path / "nope.yaml", "--out", tmp_path / "out")
    assert res.returncode == 2 and "no such recipe file" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("path", sorted(__import__("pathlib").Path(__file__).parent.parent.joinpath("recipes").glob("*.yaml")))
def test_shipped_recipes_are_valid(path):
    r = load_recipe(path)
    assert r.name == path.stem
    assert r.prune is not None or path.stem.endswith("-dense")  # a dense recipe is step 1 of compressing
