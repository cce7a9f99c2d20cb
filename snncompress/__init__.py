"""snncompress: train spiking networks with dynamic structured pruning, slim, export and benchmark them.

    import snncompress as sc
    recipe = sc.load_recipe("recipes/quickstart.yaml")
    result = sc.train(recipe, "runs/q")               # ckpt.pt with masks
    sc.slim_checkpoint(result.ckpt, "runs/q/slim.pt") # channels removed, verified
    sc.export_onnx("runs/q/slim.pt", "runs/q/model.onnx")
"""

__version__ = "0.1.0"

from .artifacts import load_checkpoint  # noqa: E402
from .benchmark import BenchSettings, bench  # noqa: E402
from .checkpoint import load_model  # noqa: E402
from .compare import compare  # noqa: E402
from .errors import RecipeError, SnnCompressError, VerificationError  # noqa: E402
from .export import export_onnx  # noqa: E402
from .models import create_model, list_models, register_model  # noqa: E402
from .prune.gates import ChannelGate, ChannelGroup, channel_groups  # noqa: E402
from .prune.surgery import slim  # noqa: E402
from .recipe import Recipe, load_recipe, parse_recipe  # noqa: E402
from .run import run_pipeline  # noqa: E402
from .slimming import slim_checkpoint  # noqa: E402
from .training import evaluate, train  # noqa: E402

__all__ = [
    "BenchSettings", "ChannelGate", "ChannelGroup", "Recipe", "RecipeError", "SnnCompressError",
    "VerificationError", "bench", "channel_groups", "compare", "create_model", "evaluate", "export_onnx",
    "list_models", "load_checkpoint", "load_model", "load_recipe", "parse_recipe", "register_model",
    "run_pipeline", "slim", "slim_checkpoint", "train",
]
