"""histosynth: labelled histopathology image synthesis with diffusion models.

Heavy classes are imported lazily so that `histosynth --help` stays fast. Every registered method's pipeline is
an attribute of this module (``histosynth.NASDMPipeline``, ``histosynth.PathLDMPipeline``, ...), found through the
method registry; diffusers' loaders also find models by name here (model_index.json says
["histosynth", "SemanticUNet"]).
"""

__version__ = "0.1.0"

#: model classes diffusers finds by name when loading a pipeline (model_index.json: ["histosynth", NAME])
_MODELS = {"SemanticUNet": "histosynth.models", "JointVQModel": "histosynth.models.joint_autoencoder",
           "CountConditioner": "histosynth.conditions.counts"}
_REGISTRY = ("Method", "register_method", "get_method", "load_pipeline")  # histosynth.methods is the module


def __getattr__(name):
    import importlib

    if name in _MODELS:
        return getattr(importlib.import_module(_MODELS[name]), name)
    if name.startswith("_"):
        raise AttributeError(name)
    # importlib, not `from histosynth import methods`: that would look the submodule up through this very function
    registry = importlib.import_module("histosynth.methods")

    if name in _REGISTRY:
        return getattr(registry, name)
    for method in registry.methods():
        if method.pipeline is not None and method.pipeline.__name__ == name:
            return method.pipeline
    raise AttributeError(f"module 'histosynth' has no attribute {name!r}")
