"""`histosynth embed STORE --encoder ENCODER`: SSL embeddings of the base tiles under a ZoomLDM store's patches.

The command :data:`embed` is attached to the ``histosynth`` command in :mod:`histosynth.cli`; a thin call into
:func:`histosynth.conditions.embed_store.embed_store` (ZoomLDM Sec. 3 / Fig. 1: each patch's condition is the
embedding matrix of the 20x tiles under it). User errors (not a multi-magnification slide store, a missing or
corrupt slide or tile, an encoder that does not match partial embeddings of that name, complete embeddings without
--overwrite, an unknown encoder or device) print one line naming the file and exit with status 2.
"""

from __future__ import annotations

from pathlib import Path

import click

from histosynth.cli.common import overwrite_option, user_errors

__all__ = ["embed"]


@click.command("embed")
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--encoder", default="efficientnet-lite0", show_default=True,
              help="Tile encoder: efficientnet-lite0 (offline ImageNet stand-in), a timm hub id (e.g. "
                   "hf-hub:MahmoodLab/UNI; downloaded once), or a local TorchScript file / timm folder.")
@click.option("--name", default=None,
              help="Folder under STORE/embeddings (default: from the encoder, e.g. efficientnet-lite0).")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True, help="Tiles per encoder call.")
@click.option("--device", default="cpu", show_default=True, help="Torch device of the encoder (cpu, cuda, cuda:1).")
@overwrite_option("Recompute existing embeddings of that name from scratch.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@user_errors
def embed(store, encoder, name, batch_size, device, overwrite, no_progress):
    """Embed the base tiles (the store's highest magnification, normally 20x) under every patch of a
    multi-magnification slide STORE, once per slide.

    Writes STORE/embeddings/NAME/ (embeddings.json + one float16 slide-NNNNN.npy per slide); an interrupted run
    resumes where it stopped when run again with the same encoder.
    """
    from histosynth.conditions.embed_store import embed_store

    result = embed_store(store, encoder, name=name, batch_size=batch_size, device=device,
                         progress=not no_progress, overwrite=overwrite)
    tiles = sum(int(s["tiles_needed"]) for s in result.slides)
    click.echo(f"wrote {result.path} ({len(result.slides)} slides, {tiles} tiles, C = {result.dim}, "
               f"encoder {result.encoder})")
