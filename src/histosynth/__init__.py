"""histosynth: labelled histopathology image synthesis with diffusion models."""

__version__ = "0.1.0"
