"""Models: offline loading (``load_model``), the MLP-neuron layout registry (``Site``) and tiny random models."""
from .layouts import LAYOUTS, MLPLayout, Site, register_layout
from .loading import DEFAULT_MODEL, LoadedModel, default_cache_dir, load_model, model_fingerprint, resolve_device
from .tiny import TINY_ARCHS, tiny_model

__all__ = [
    "load_model", "LoadedModel", "Site", "MLPLayout", "LAYOUTS", "register_layout", "tiny_model", "TINY_ARCHS",
    "DEFAULT_MODEL", "default_cache_dir", "model_fingerprint", "resolve_device",
]
