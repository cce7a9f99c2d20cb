"""Spiking model builders and their registry."""

from . import resnet, vgg  # noqa: F401  (registers the builders)
from .registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model"]
