"""Hardware targets: a chip's published limits, checked on a model before it is exported to it.

One file per target, registered by name (:func:`snncompress.register_target`); the built-in is ``speck``
(SynSense Speck / DYNAP-CNN). :mod:`.base` reads a NIR graph into the layers a target checks.
"""

from .base import CoreLayer, Target, TargetReport, core_layers

__all__ = ["CoreLayer", "Target", "TargetReport", "core_layers"]
