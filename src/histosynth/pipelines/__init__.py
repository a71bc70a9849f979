"""Sampling pipelines (diffusers ``DiffusionPipeline`` subclasses), one file per method, each read top to bottom."""
