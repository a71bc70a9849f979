"""Denoisers and building blocks that diffusers lacks."""

from .semantic_unet import SemanticUNet
from .spade import SPADEGroupNorm, SPADEResBlock

__all__ = ["SemanticUNet", "SPADEGroupNorm", "SPADEResBlock"]
