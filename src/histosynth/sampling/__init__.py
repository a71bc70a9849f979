"""Sampling a trained model into a folder: each method's way of drawing its conditions (``masks``: a store's
nuclei masks; ``prompts``: a prompts file; ``counts``: nuclei counts per type and tissue), all written by the one :class:`~histosynth.sampling.writer.SampleWriter`."""

from histosynth.sampling.counts import sample_counts
from histosynth.sampling.masks import choose_patches, sample_store
from histosynth.sampling.prompts import image_seed, sample_prompts
from histosynth.sampling.writer import MANIFEST, SampleWriter, prepare_output_dir, run_settings

__all__ = ["MANIFEST", "SampleWriter", "choose_patches", "image_seed", "prepare_output_dir", "run_settings", "sample_counts",
           "sample_prompts", "sample_store"]
