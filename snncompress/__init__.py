"""snncompress: train spiking networks with dynamic structured pruning, slim, export and benchmark them.

    import snncompress as sc
    recipe = sc.load_recipe("recipes/quickstart.yaml")
    result = sc.train(recipe, "runs/q")               # ckpt.pt with masks
    sc.slim_checkpoint(result.ckpt, "runs/q/slim.pt") # channels removed, verified
    sc.export_onnx("runs/q/slim.pt", "runs/q/model.onnx")
    sc.export_nir("runs/q/slim.pt", "runs/q/model.nir")  # neuromorphic hardware (model.pool: avg)
    sc.check_target("runs/q/model.nir", "speck")         # a chip's published limits
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"  # the one version source: pyproject.toml reads it (tool.setuptools.dynamic)

# The public API, imported on first use (PEP 562): `snncompress --help` or a recipe error then
# answers without importing torch, onnxruntime, scikit-learn and matplotlib.
_API = {
    "RecipeError": "errors", "SnnCompressError": "errors", "VerificationError": "errors",
    "Recipe": "config", "load_recipe": "config", "parse_recipe": "config",
    "register_model": "registry", "register_method": "registry", "register_budget_unit": "registry",
    "register_target": "registry", "Target": "targets", "check_target": "stages.check",
    "list_models": "registry", "list_methods": "registry", "trusted": "registry", "RunLayout": "layout",
    "CostUnit": "prune.costs",
    "create_model": "models", "ChannelGate": "prune.gates", "ChannelGroup": "prune.gates",
    "channel_groups": "prune.groups", "Scorer": "prune.scorer", "Pruner": "prune.pruner",
    "load_checkpoint": "artifacts", "load_model": "checkpoint", "evaluate": "evaluation",
    "train": "stages.train", "slim_checkpoint": "stages.slim", "slim": "prune.surgery",
    "export_onnx": "stages.export", "export_nir": "stages.export", "BenchSettings": "stages.bench", "bench": "run", "run_pipeline": "run",
    "compare": "compare",
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'snncompress' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
