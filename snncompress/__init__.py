"""snncompress: train spiking networks with dynamic structured pruning, slim, export and benchmark them.

    import snncompress as sc
    recipe = sc.load_recipe("recipes/quickstart.yaml")
    result = sc.train(recipe, "runs/q")               # ckpt.pt with masks
    sc.slim_checkpoint(result.ckpt, "runs/q/slim.pt") # channels removed, verified
    sc.export_onnx("runs/q/slim.pt", "runs/q/model.onnx")
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# The public API, imported on first use (PEP 562): `snncompress --help` or a recipe error then
# answers without importing torch, onnxruntime, scikit-learn and matplotlib.
_API = {
    "load_checkpoint": "artifacts", "BenchSettings": "benchmark", "bench": "benchmark",
    "load_model": "checkpoint", "compare": "compare", "RecipeError": "errors",
    "SnnCompressError": "errors", "VerificationError": "errors", "export_onnx": "export",
    "create_model": "models", "list_models": "models", "register_model": "models",
    "ChannelGate": "prune.gates", "ChannelGroup": "prune.gates", "channel_groups": "prune.gates",
    "slim": "prune.surgery", "Recipe": "recipe", "load_recipe": "recipe", "parse_recipe": "recipe",
    "run_pipeline": "run", "slim_checkpoint": "slimming", "evaluate": "training", "train": "training",
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
