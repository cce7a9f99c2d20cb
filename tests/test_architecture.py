"""The architecture's rules, checked: imports point one way, the schema is torch-free, methods plug in by
name (and user code runs only when trusted), slim checkpoints describe themselves, library calls leave
global state alone, errors tell bugs from bad input, recipes are bounded, dependencies are declared."""

from __future__ import annotations

import ast
import logging
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

import snncompress as sc
from snncompress import registry

from .conftest import TINY, cli, write_recipe

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "snncompress"

# layer of every top-level module / package of snncompress (see docs/design.md)
LAYERS = {"errors": 0, "registry": 0, "legacy": 0, "schema": 0, "config": 0, "layout": 0, "artifacts": 1, "distributed": 1, "models": 1,
          "data": 1, "prune": 2, "quant": 2, "checkpoint": 3, "evaluation": 3, "metrics": 3, "plots": 3, "export": 3, "runtime": 3, "targets": 3,
          "stages": 4, "run": 5, "compare": 5, "cli": 6, "__init__": 7, "__main__": 7}
STAGES = {"train", "slim", "export", "bench", "check"}


def _imports() -> dict[str, set[str]]:
    """``{module: {snncompress modules it imports}}`` (dotted, relative imports resolved), lazy ones too."""
    out = {}
    for path in PKG.rglob("*.py"):
        mod = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
                for a in node.names if base.startswith("snncompress") else []:
                    # `from pkg import module` imports the module, else pkg itself
                    sub = PKG.parent / base.replace(".", "/") / a.name
                    found.add(f"{base}.{a.name}" if sub.is_dir() or sub.with_suffix(".py").exists() else base)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("snncompress"))
        out[mod] = found
    return out


def _top(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_imports_point_down_and_no_stage_imports_another():
    bad = []
    for mod, deps in _imports().items():
        for dep in deps:
            if dep == "snncompress":  # `from .. import __version__`
                continue
            if LAYERS[_top(dep)] > LAYERS[_top(mod)]:
                bad.append(f"{mod} -> {dep} (up)")
            stage, other = mod.split(".")[-1], dep.split(".")[-1]
            if _top(mod) == _top(dep) == "stages" and stage in STAGES and other in STAGES and stage != other:
                bad.append(f"{mod} -> {dep} (stage to stage)")
    assert not bad, bad


def test_schema_and_recipe_errors_import_no_torch(tmp_path):
    bad = write_recipe(tmp_path / "bad.yaml", {**TINY, "modle": {}})
    code = ("import sys\nimport snncompress.config as c\nassert 'torch' not in sys.modules\n"
            f"try:\n    c.load_recipe({str(bad)!r})\nexcept c.RecipeError as e:\n    print(e)\n"
            "assert 'torch' not in sys.modules and 'spikingjelly' not in sys.modules, 'torch imported'\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert "modle: unknown key" in res.stdout
    for command in ("train", "run", "compare"):  # the CLI too answers before importing torch
        code = (f"import sys\nsys.argv = ['snncompress', {command!r}, {str(bad)!r}]\nfrom snncompress.cli import main\n"
                "try:\n    main()\nexcept SystemExit as e:\n    assert e.code == 2, e.code\n"
                "assert 'torch' not in sys.modules, 'torch imported'\n")
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
        assert res.returncode == 0 and "modle: unknown key" in res.stderr, (command, res.stderr)


def test_builtin_registrations_resolve_to_the_decorated_objects():
    for reg in (registry.MODELS, registry.METHODS, registry.BUDGET_UNITS, registry.TARGETS):
        for name, (code, meta) in reg._lazy.items():
            obj = reg.get(name)
            module, attr = code.split(":")
            assert obj is getattr(sys.modules[module], attr), name
            assert reg.meta(name) == meta, name


def test_info_lists_models_and_methods():
    res = cli("info")
    assert res.returncode == 0, res.stderr
    for m in ("sca (structured)", "criticality (structured)", "pq (unstructured)", "random", "l1", "bn",
              "hardware targets: speck"):
        assert m in res.stdout
    assert "resnet19" in res.stdout and "budget units: channels, latency, macs, memory, sops" in res.stdout


def test_custom_method_from_a_module_trains_through_the_cli(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", {**TINY, "prune": {**TINY["prune"],
                                                                  "method": "tests.custom_methods:FirstChannels"}})
    res = cli("train", recipe, "--out", tmp_path / "out", cwd=ROOT)
    assert res.returncode == 0, res.stderr
    ck = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    assert ck["recipe"]["prune"]["method"] == "tests.custom_methods:FirstChannels"
    for name, mask in ck["masks"].items():  # the method's choice: the first channels of every group
        k = int(mask.sum())
        assert 0 < k < len(mask) and mask[:k].all() and not mask[k:].any(), (name, mask)


def test_a_bug_in_code_is_an_internal_error_not_a_user_error(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", {**TINY, "prune": {**TINY["prune"], "method": "tests.custom_methods:Broken"}})
    res = cli("train", recipe, "--out", tmp_path / "out", cwd=ROOT)
    assert res.returncode == 3, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("internal error: ValueError: ") and "--debug" in lines[0], res.stderr
    res = cli("--debug", "train", recipe, "--out", tmp_path / "out2", cwd=ROOT)
    assert res.returncode != 0 and "Traceback" in res.stderr


def test_a_checkpoint_naming_an_untrusted_method_never_imports_it(run_dir, tmp_path, monkeypatch):
    sentinel = tmp_path / "imported"
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "sentinel_method.py").write_text(f"open({str(sentinel)!r}, 'w').close()\nclass Evil:\n    pass\n")
    monkeypatch.syspath_prepend(str(pkg))
    monkeypatch.setenv("PYTHONPATH", f"{pkg}:{os.environ.get('PYTHONPATH', '')}")
    ck = torch.load(run_dir / "train" / "ckpt.pt", weights_only=True)
    ck["recipe"]["prune"]["method"] = "sentinel_method:Evil"
    torch.save(ck, tmp_path / "ckpt.pt")
    from snncompress.prune.pruner import resolve_method

    with pytest.raises(registry.UntrustedCodeError, match="'sentinel_method:Evil' is not trusted"):
        resolve_method(sc.load_checkpoint(tmp_path / "ckpt.pt")["recipe"]["prune"]["method"])
    res = cli("info", tmp_path / "ckpt.pt")
    assert res.returncode == 0 and "sentinel_method:Evil (user code, not imported)" in res.stdout, res.stderr
    assert cli("slim", tmp_path / "ckpt.pt").returncode == 0  # slimming never needs the method
    assert not sentinel.exists() and "sentinel_method" not in sys.modules
    resolve_method("sentinel_method:Evil", trust=True)  # with trust it is imported: the sentinel is a real witness
    assert sentinel.exists()


NO_TORCH_PRUNING = """
import sys
sys.modules["torch_pruning"] = None  # any import of it fails
import snncompress as sc
for path in sys.argv[1:]:
    model = sc.load_model(path)
    print(path, sum(p.numel() for p in model.parameters()))
assert "torch_pruning" not in [m for m in sys.modules if sys.modules[m] is not None]
"""


@pytest.mark.slow
def test_slim_checkpoints_load_without_torch_pruning(run_dir, tmp_path):
    resnet = {**TINY, "model": {"name": "resnet20", "width": 0.25}, "train": {"epochs": 2},
              "prune": {**TINY["prune"], "warmup_epochs": 0, "ramp_epochs": 1}}
    res = sc.train(sc.parse_recipe(resnet), tmp_path / "resnet", progress=False)
    slim = sc.slim_checkpoint(res.ckpt, tmp_path / "resnet" / "slim.pt")
    assert any(k < n for k, n in slim.kept.values())
    out = subprocess.run([sys.executable, "-c", NO_TORCH_PRUNING, str(run_dir / "slim.pt"), str(slim.path)],
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert f"{slim.path} {slim.params[1]}" in out.stdout


def test_library_calls_leave_global_state_as_they_found_it(run_dir, tmp_path):
    import matplotlib

    backend, root_level = matplotlib.get_backend(), logging.getLogger().level
    onnx_level = logging.getLogger("torch.onnx").level
    deterministic, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    sc.export_onnx(run_dir / "slim.pt", tmp_path / "m.onnx")
    from snncompress.plots import write_plots

    import json

    write_plots(json.loads((run_dir / "bench.json").read_text()), tmp_path)
    assert (tmp_path / "channels.png").stat().st_size > 0
    assert matplotlib.get_backend() == backend
    assert logging.getLogger().level == root_level and logging.getLogger("torch.onnx").level == onnx_level
    assert torch.are_deterministic_algorithms_enabled() == deterministic and torch.get_num_threads() == threads


def test_train_restores_the_deterministic_algorithms_flag_and_trusts_the_recipes_code_only_while_it_runs(tmp_path):
    before = torch.are_deterministic_algorithms_enabled()
    method = "tests.custom_methods:FirstChannels"
    recipe = {**TINY, "train": {"epochs": 2}, "prune": {**TINY["prune"], "method": method, "warmup_epochs": 0,
                                                        "ramp_epochs": 1, "finetune_epochs": 0}}
    sc.train(sc.parse_recipe(recipe), tmp_path, progress=False)  # imports and runs the recipe's own method
    assert torch.are_deterministic_algorithms_enabled() == before
    assert not registry.is_trusted(method)  # the trust ended with the call: a checkpoint cannot reuse it
    with pytest.raises(registry.UntrustedCodeError, match="is not trusted"):
        registry.import_code(method, "prune.method")


def test_an_alias_bomb_or_a_huge_file_is_refused_as_a_recipe(tmp_path):
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    for prev, cur in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{cur}: &{cur} [" + ",".join([f"*{prev}"] * 9) + "]")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    res = cli("train", bomb, "--out", tmp_path / "out", timeout=60)
    assert res.returncode == 2 and "aliases expand to more than 100,000 nodes" in res.stderr, res.stderr
    huge = tmp_path / "huge.yaml"
    huge.write_text("name: x\n" + "# padding\n" * 200_000)
    res = cli("train", huge, "--out", tmp_path / "out", timeout=60)
    assert res.returncode == 2 and "too large for a recipe" in res.stderr, res.stderr
    assert not (tmp_path / "out").exists()


def _dist_name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_imported_package_is_declared():
    from importlib.metadata import packages_distributions

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    # the runtime extras count (imported only when asked for); the test extra does not
    declared = {_dist_name(re.split(r"[<>=!~ \[;]", d)[0])
                for d in project["dependencies"] + project["optional-dependencies"]["openvino"]}
    dists = packages_distributions()
    stdlib = set(sys.stdlib_module_names)
    missing = set()
    for path in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            for name in names:
                top = name.split(".")[0]
                if top in stdlib or top == "snncompress":
                    continue
                if not {_dist_name(d) for d in dists.get(top, [top])} & declared:
                    missing.add(f"{top} ({path.relative_to(ROOT)})")
    assert not missing, f"imported but not declared in pyproject.toml: {sorted(missing)}"


def test_no_large_files_and_docs_references_resolve():
    tracked = subprocess.run(["git", "ls-files"], capture_output=True, text=True, cwd=ROOT).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout")
    assert [f for f in tracked if (ROOT / f).is_file() and (ROOT / f).stat().st_size > 1 << 20] == []
    for f in tracked:
        if f.endswith((".py", ".md")):
            for ref in re.findall(r"docs/[\w-]+\.md", (ROOT / f).read_text()):
                assert (ROOT / ref).is_file(), f"{f} cites {ref}"
    assert not re.search(r"\b(METHODS|DESIGN)\.md", "".join((ROOT / f).read_text() for f in tracked
                                                            if f.endswith((".py", ".md"))))


def test_unroll_auto_never_retries_after_a_failed_verification(run_dir, tmp_path, monkeypatch):
    import snncompress.stages.export as export

    orders = []
    real = export.unrolled_onnx

    def spy(model, example, T, encoding, lean, order):
        orders.append(order)
        return real(model, example, T, encoding, lean, order)

    monkeypatch.setattr(export, "unrolled_onnx", spy)
    real_session = export._onnxruntime
    monkeypatch.setattr(export, "_onnxruntime", lambda m: lambda inp, run=real_session(m): run(inp) + 1.0)  # disagrees
    with pytest.raises(sc.VerificationError, match="unrolled by step"):
        export.export_onnx(run_dir / "slim.pt", tmp_path / "m.onnx", order="auto")
    assert orders == ["step"] and not (tmp_path / "m.onnx").exists()
