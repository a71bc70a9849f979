"""`histosynth prepare nuclei | slides`: build a patch store from a labelled dataset or from whole slides.

The group :data:`prepare` is attached to the ``histosynth`` command in :mod:`histosynth.cli`. ``prepare nuclei`` is a
thin call into :func:`histosynth.data.store.prepare_nuclei` (a reader of :mod:`histosynth.data.formats`, optional
stain normalisation); ``prepare slides`` into :func:`histosynth.data.slides.prepare_slides`. User errors (corrupt
image, size mismatch, unknown class id, missing or corrupt slide, no resolution metadata, target above the slide's
magnification) print one line naming the file and exit with status 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from histosynth.cli.common import user_errors
from histosynth.errors import HistosynthError

__all__ = ["MAGNIFICATIONS", "prepare", "prepare_nuclei_cmd", "slides_cmd"]

MAGNIFICATIONS = ["40x", "20x", "10x", "5x"]


@click.group()
def prepare():
    """Build a patch store from a dataset in its native format."""


@prepare.command("nuclei")
@click.argument("src", type=click.Path(path_type=Path))
@click.option("--format", "fmt", required=True, type=click.Choice(["lizard", "conic", "pannuke", "consep", "folder"]))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="The patch store to create.")
@click.option("--patch", default=128, show_default=True, help="Patch size in pixels.")
@click.option("--overlap", default=0.5, show_default=True, help="Overlap of neighbouring patches (NASDM: 0.5).")
@click.option("--magnification", default="20x", show_default=True, type=click.Choice(MAGNIFICATIONS))
@click.option("--source-magnification", type=click.Choice(MAGNIFICATIONS), default=None,
              help="Magnification of the source images (required for --format folder unless known).")
@click.option("--holdout", default=0.075, show_default=True,
              help="Area fraction of each region held out as test, for datasets without their own split (NASDM: 7.5%).")
@click.option("--stain-normalize", type=click.Choice(["none", "vahadane", "macenko"]), default="none", show_default=True)
@click.option("--stain-target", type=click.Path(path_type=Path), default=None, help="Target image for stain normalization.")
@click.option("--class-names", default=None, help="Comma-separated class names for type ids 1..K (folder format).")
@click.option("--consep-classes", type=click.Choice(["merged", "original", "merge-original"]), default="merged", show_default=True)
@click.option("--pannuke-test-folds", default="3", show_default=True, help="Comma-separated PanNuke folds used as test.")
@click.option("--seed", default=0, show_default=True)
@click.option("--overwrite", is_flag=True)
@user_errors
def prepare_nuclei_cmd(src, fmt, out, patch, overlap, magnification, source_magnification, holdout, stain_normalize,
                       stain_target, class_names, consep_classes, pannuke_test_folds, seed, overwrite):
    """Tile SRC (a dataset in its native FORMAT) into a streaming patch store with a manifest."""
    from histosynth.data.formats import read_nuclei
    from histosynth.data.stain import make_stain_normalizer
    from histosynth.data.store import prepare_nuclei

    options = {}
    if fmt == "consep":
        options["classes"] = consep_classes
    elif fmt == "pannuke":
        test = tuple(int(f) for f in pannuke_test_folds.split(","))
        options.update(test_folds=test, train_folds=tuple(f for f in (1, 2, 3) if f not in test))
    elif fmt == "folder":
        if class_names:
            options["class_names"] = tuple(c.strip() for c in class_names.split(","))
        options["magnification"] = source_magnification
    if stain_normalize != "none" and stain_target is None:
        raise HistosynthError(f"--stain-normalize {stain_normalize} needs --stain-target IMAGE")
    normalizer = make_stain_normalizer(stain_normalize, stain_target)
    store = prepare_nuclei(
        read_nuclei(fmt, src, **options), out, patch=patch, overlap=overlap, magnification=magnification,
        holdout=holdout, source_magnification=source_magnification, stain_normalizer=normalizer, seed=seed,
        overwrite=overwrite, command=" ".join(sys.argv),
    )
    counts = {s: len(store.indices(s)) for s in ("train", "test")}
    click.echo(f"wrote {out}: {len(store)} patches ({counts['train']} train, {counts['test']} test), classes {list(store.class_names)}")


@prepare.command("slides")
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
