"""histosynth: labelled histopathology image synthesis with diffusion models.

Heavy classes are imported lazily so that `histosynth --help` stays fast; diffusers' loaders find
models and pipelines by name on this module (model_index.json says ["histosynth", "SemanticUNet"]).
"""

__version__ = "0.1.0"

_LAZY = {
    "SemanticUNet": "histosynth.models",
    "NASDMPipeline": "histosynth.pipelines.nasdm",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'histosynth' has no attribute {name!r}")
