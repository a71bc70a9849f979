"""`histosynth prepare slides`: tile whole-slide images into an image-only patch store.

Registered in the ``prepare`` group of :mod:`histosynth.cli` (``prepare.add_command(slides_cmd)`` or
``register(prepare)``). A thin call into :func:`histosynth.data.slides.prepare_slides`; user errors (missing
or corrupt slide, no resolution metadata, target above the slide's magnification) print one line naming
the file and exit with status 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from histosynth.cli_common import user_errors

__all__ = ["COMMANDS", "register", "slides_cmd"]


@click.command("slides")
@click.argument("slides", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="The patch store to create.")
@click.option("--patch", default=256, show_default=True, type=click.IntRange(min=1), help="Patch size in pixels (PathLDM: 256).")
@click.option("--magnification", default="10x", show_default=True,
              help="Target magnification, any value up to the slide's (e.g. 40x, 20x, 10x, 2.5x; PathLDM: 10x).")
@click.option("--overlap", default=0.0, show_default=True, type=click.FloatRange(0.0, 1.0, max_open=True),
              help="Overlap of neighbouring patches, as a fraction of the patch.")
@click.option("--tissue-threshold", default=0.5, show_default=True, type=click.FloatRange(0.0, 1.0),
              help="Keep a patch when at least this fraction of it is tissue (0 keeps every patch).")
@click.option("--source-magnification", default=None,
              help="Level-0 magnification of the slides, overriding their metadata (needed for files with neither "
                   "objective power nor microns per pixel, e.g. 20x).")
@click.option("--overwrite", is_flag=True, help="Replace an existing store.")
@user_errors
def slides_cmd(slides, out, patch, magnification, overlap, tissue_threshold, source_magnification, overwrite):
    """Tile whole-slide images SLIDES (SVS / TIFF files, or folders of them) into a patch store.

    Each patch is read from the best pyramid level (resized when no level is at the target), background
    is skipped with a tissue detector, and the manifest keeps slide, level, level and level-0 coordinates,
    magnification and tissue fraction of every patch.
    """
    from histosynth.data.slides import prepare_slides

    store = prepare_slides(
        list(slides), out, patch=patch, magnification=magnification, overlap=overlap,
        tissue_threshold=tissue_threshold, source_magnification=source_magnification, overwrite=overwrite,
        command=" ".join(sys.argv),
    )
    per_slide = ", ".join(f"{s['path']}: {s['patches']}" for s in store.meta.get("slides", [])[:10])
    more = len(store.meta.get("slides", [])) - 10
    click.echo(
        f"wrote {out}: {len(store)} patches of {store.patch_size} px at {store.magnification} "
        f"({per_slide}{f' and {more} more slides' if more > 0 else ''})"
    )


COMMANDS = [slides_cmd]


def register(group: click.Group) -> click.Group:
    """Add the commands of this module to a click group (the `prepare` group of histosynth.cli)."""
    for cmd in COMMANDS:
        group.add_command(cmd)
    return group
