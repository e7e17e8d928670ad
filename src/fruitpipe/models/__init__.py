"""Backbones: a registry of model specs, download with sha256 verification, and the onnxruntime runner."""

from fruitpipe.models.fetch import ResolvedModel, resolve_model
from fruitpipe.models.registry import REGISTRY, ModelSpec, get_spec
from fruitpipe.models.runner import make_predict_fn

__all__ = ["REGISTRY", "ModelSpec", "ResolvedModel", "get_spec", "make_predict_fn", "resolve_model"]
