"""Denoisers and building blocks that diffusers lacks, and the shared pretrained-network helpers.

Imported lazily: ``histosynth.models.efficientnet_lite0`` (used by the evaluation extractors) must not pull in
diffusers through ``SemanticUNet``.
"""

__all__ = ["SemanticUNet", "SPADEGroupNorm", "SPADEResBlock"]

_WHERE = {"SemanticUNet": "semantic_unet", "SPADEGroupNorm": "spade", "SPADEResBlock": "spade"}


def __getattr__(name):
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
