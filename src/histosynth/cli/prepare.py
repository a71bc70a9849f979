"""`histosynth prepare nuclei | regions | slides | captioned`: build a patch store from a labelled dataset, from region masks
(DISC: a region folder, the Gleason datasets SICAPv2 / Gleason2019 / PANDA in their native layouts,
:mod:`histosynth.data.gleason`, or regions derived from nuclei labels, :mod:`histosynth.data.regions`) or from whole
slides, or from a caption-paired image folder (`prepare captioned`, :mod:`histosynth.data.captioned_folder`).

The group :data:`prepare` is attached to the ``histosynth`` command in :mod:`histosynth.cli`. ``prepare nuclei`` is a
thin call into :func:`histosynth.data.sources.prepare_sources` (one dataset ``SRC --format F``, or several from
``--sources SOURCES.yaml``, each read by :mod:`histosynth.data.formats`, mapped onto one class list with a tissue
name; ``--append`` adds to an existing store; optional stain normalisation); ``prepare slides`` into
:func:`histosynth.data.slide_patches.prepare_slides` (one ``--magnification``) or, with ``--magnifications``,
:func:`histosynth.data.zoom_store.prepare_zoom_slides` (ZoomLDM's levels, each patch paired with its base
region). User errors (corrupt image, size mismatch, unknown class id, a class
map naming an unknown class, missing or corrupt slide, no resolution metadata, target above the slide's
magnification) print one line naming the file (or option) and exit with status 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from histosynth.cli.common import option_group, overwrite_option, seed_option, user_errors
from histosynth.errors import HistosynthError

__all__ = ["MAGNIFICATIONS", "captioned_cmd", "prepare", "prepare_nuclei_cmd", "prepare_regions_cmd", "slides_cmd"]

MAGNIFICATIONS = ["40x", "20x", "10x", "5x"]


def patch_option(default: int, help: str = "Patch size in pixels."):
    return click.option("--patch", default=default, show_default=True, type=click.IntRange(min=8), help=help)


def overlap_option(default: float, help: str = "Overlap of neighbouring patches, as a fraction of the patch."):
    return click.option("--overlap", default=default, show_default=True, type=click.FloatRange(0.0, 1.0, max_open=True),
                        help=help)


def labelled_store_options(kind: str):
    """What the two labelled stores (nuclei, regions) are cut with: the same tiler and hold-out."""
    return option_group(
        click.option("--out", required=True, type=click.Path(path_type=Path), help=f"The {kind} store to create."),
        patch_option(128),
        overlap_option(0.5, "Overlap of neighbouring patches, as a fraction of the patch (NASDM: 0.5)."),
        click.option("--magnification", default="20x", show_default=True, type=click.Choice(MAGNIFICATIONS)),
    )


HOLDOUT_HELP = ("Area fraction of each region held out as test, for datasets without their own split (NASDM: 7.5%). "
                "Regions whose hold-out block is smaller than a patch are held out whole instead (about this fraction "
                "of them, by --seed; said in a note); 0 = no test split.")
FORMATS = ["lizard", "conic", "pannuke", "consep", "folder", "polygons"]


@click.group()
def prepare():
    """Build a patch store from a dataset in its native format."""


@prepare.command("nuclei")
@click.argument("src", required=False, type=click.Path(path_type=Path))
@click.option("--format", "fmt", default=None, type=click.Choice(FORMATS), help="Format of SRC (one source).")
@click.option("--sources", "sources_file", type=click.Path(path_type=Path), default=None,
              help="YAML listing several datasets (path, format, tissue, class_map, ...) mapped into its classes: "
                   "list; instead of SRC --format.")
@labelled_store_options("patch")
@click.option("--source-magnification", type=click.Choice(MAGNIFICATIONS), default=None,
              help="Magnification of the source images (required for --format folder unless known).")
@click.option("--holdout", default=0.075, show_default=True, type=click.FloatRange(0.0, 1.0, max_open=True),
              help=HOLDOUT_HELP)
@click.option("--stain-normalize", type=click.Choice(["none", "vahadane", "macenko"]), default="none", show_default=True)
@click.option("--stain-target", type=click.Path(path_type=Path), default=None, help="Target image for stain normalization.")
@click.option("--class-names", default=None,
              help="Comma-separated class names for type ids 1..K (folder and polygons formats).")
@click.option("--polygon-classes", default=None,
              help="polygons format: annotation class names (QuPath classifications, HoVer-Net type ids) onto "
                   "--class-names, e.g. 'Tumor=neoplastic,Immune cells=inflammatory,Region*=drop', or a YAML/JSON file.")
@click.option("--consep-classes", type=click.Choice(["merged", "original", "merge-original"]), default="merged", show_default=True)
@click.option("--pannuke-test-folds", default="3", show_default=True, help="Comma-separated PanNuke folds used as test.")
@click.option("--tissue", default=None, help="Tissue name of SRC (e.g. colon), written into every patch's manifest row.")
@click.option("--class-map", default=None,
              help="Map SRC's classes onto --classes: 'neoplastic=epithelial,connective=spindle-shaped,dead=drop' "
                   "or a YAML/JSON file; unlisted classes keep their name.")
@click.option("--classes", default=None,
              help="Target class names in type-id order (e.g. epithelial,spindle-shaped,inflammatory,other).")
@click.option("--relabel-components", is_flag=True,
              help="Split instance ids made of several disconnected parts (e.g. an 8-bit instance PNG whose ids "
                   "wrapped past 255) into one nucleus per 8-connected part, each with its majority type, and give "
                   "typed pixels in no instance their own nuclei, instead of refusing such maps (every source).")
@click.option("--append", is_flag=True,
              help="Add the source(s) to the existing store at --out (its patches kept; same patch size, "
                   "magnification, classes, overlap, hold-out, seed, stain normalization, taken from it).")
@seed_option()
@overwrite_option()
@user_errors
def prepare_nuclei_cmd(src, fmt, sources_file, out, patch, overlap, magnification, source_magnification, holdout,
                       stain_normalize, stain_target, class_names, polygon_classes, consep_classes, pannuke_test_folds,
                       tissue, class_map, classes, relabel_components, append, seed, overwrite):
    """Tile SRC (a dataset in its native FORMAT), or every dataset of --sources, into a patch store with a manifest.

    With --tissue, --class-map / --classes or --sources, several datasets share one class scheme and each patch
    row names its tissue (see histosynth.data.sources). Every reader checks its format's layout and refuses
    instance maps that cannot be right (ids of several disconnected parts, typed pixels in no instance) unless
    --relabel-components is given (see histosynth.data.instance_check).
    """
    from histosynth.data.sources import prepare_sources, read_sources_file
    from histosynth.data.stain import make_stain_normalizer

    given = _given(click.get_current_context())
    if append:
        patch, magnification, overlap, holdout, seed, stain_normalize, stain_target = _store_settings(
            out, given, patch, magnification, overlap, holdout, seed, stain_normalize, stain_target)
    if sources_file is not None:
        _refuse_single_source_options(given, src)
        target, sources = read_sources_file(sources_file)
    else:
        target, sources = _single_source(src, fmt, given, source_magnification, class_names, consep_classes,
                                         pannuke_test_folds, tissue, class_map, classes, polygon_classes)
    if relabel_components:
        for source in sources:
            source.options["relabel_components"] = True
    if stain_normalize != "none" and stain_target is None:
        raise HistosynthError(f"--stain-normalize {stain_normalize} needs --stain-target IMAGE")
    normalizer = make_stain_normalizer(stain_normalize, stain_target)
    store = prepare_sources(
        sources, out, classes=target, patch=patch, overlap=overlap, magnification=magnification, holdout=holdout,
        stain_normalizer=normalizer, seed=seed, overwrite=overwrite, append=append, command=" ".join(sys.argv),
    )
    counts = {s: len(store.indices(s)) for s in ("train", "test")}
    click.echo(f"wrote {out}: {len(store)} patches ({counts['train']} train, {counts['test']} test), classes {list(store.class_names)}")
    tissues = store.meta.get("tissues")
    if tissues:
        click.echo(f"tissues: {', '.join(tissues)}")


SINGLE_SOURCE_OPTIONS = ("fmt", "source_magnification", "class_names", "consep_classes", "pannuke_test_folds",
                         "tissue", "class_map", "classes", "polygon_classes")


def _given(ctx: click.Context) -> set[str]:
    """Names of the parameters the user set (not their defaults)."""
    from click.core import ParameterSource

    return {name for name in ctx.params if ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, None)}


def _word(name: str) -> str:
    return "--format" if name == "fmt" else "--" + name.replace("_", "-")


def _refuse_single_source_options(given: set[str], src) -> None:
    if src is not None:
        raise HistosynthError(f"give either SRC ({src}) with --format, or --sources SOURCES.yaml, not both")
    for name in SINGLE_SOURCE_OPTIONS:
        if name in given:
            raise HistosynthError(f"{_word(name)} belongs to one source: with --sources, set it in SOURCES.yaml"
                                  + (" (classes: at its top)" if name == "classes" else " (per entry)"))


def _single_source(src, fmt, given, source_magnification, class_names, consep_classes, pannuke_test_folds, tissue,
                   class_map, classes, polygon_classes=None):
    """(target classes or None, [NucleiSource]) from SRC and the single-source options."""
    from histosynth.data.class_mapping import parse_class_list, parse_class_map
    from histosynth.data.sources import NucleiSource, check_tissue, reader_options

    if src is None or fmt is None:
        raise HistosynthError("give SRC with --format FORMAT (one dataset), or --sources SOURCES.yaml (several)")
    options = reader_options(
        fmt, class_names=class_names, consep_classes=consep_classes if "consep_classes" in given else None,
        pannuke_test_folds=pannuke_test_folds if "pannuke_test_folds" in given else None,
        polygon_classes=polygon_classes, source_magnification=source_magnification,
    )
    source = NucleiSource(path=src, format=fmt, tissue=check_tissue(tissue), class_map=parse_class_map(class_map),
                          source_magnification=source_magnification, options=options)
    return (None if classes is None else parse_class_list(classes)), [source]


def _store_settings(out, given, patch, magnification, overlap, holdout, seed, stain_normalize, stain_target):
    """--append: settings the user left at their defaults come from the store at --out (when there is one)."""
    from histosynth.data.store import STORE_JSON, PatchStore

    if not (Path(out) / STORE_JSON).is_file():
        return patch, magnification, overlap, holdout, seed, stain_normalize, stain_target
    store = PatchStore(out)
    meta = store.meta
    pick = lambda name, value, stored: value if name in given or stored is None else stored  # noqa: E731
    patch = pick("patch", patch, store.patch_size)
    magnification = pick("magnification", magnification, store.magnification)
    overlap, holdout, seed = (pick(k, v, meta.get(k)) for k, v in (("overlap", overlap), ("holdout", holdout),
                                                                  ("seed", seed)))
    if "stain_normalize" not in given:
        stain_normalize = meta.get("stain_normalization") or "none"
        if "stain_target" not in given and meta.get("stain_target"):
            stain_target = Path(meta["stain_target"])
    return patch, magnification, overlap, holdout, seed, stain_normalize, stain_target


REGION_FORMATS = ["folder", "nuclei-density", "sicapv2", "gleason2019", "panda"]
GLEASON_FORMATS = ("sicapv2", "gleason2019", "panda")
# options that belong to some --format values only (the rest are refused with them)
_REGION_OPTION_FORMATS = {
    "nuclei_format": ("nuclei-density",), "region_map": ("nuclei-density",), "sigma_um": ("nuclei-density",),
    "min_fraction": ("nuclei-density",), "labels": GLEASON_FORMATS, "label_map": GLEASON_FORMATS,
    "sicap_partition": ("sicapv2",), "sicap_mask_tolerance": ("sicapv2",), "gleason_pathologist": ("gleason2019",),
    "panda_providers": ("panda",), "panda_block": ("panda",),
}


@prepare.command("regions")
@click.argument("src", type=click.Path(path_type=Path))
@click.option("--format", "fmt", required=True, type=click.Choice(REGION_FORMATS),
              help="folder: images/ + masks/ + classes.txt. nuclei-density: regions derived from the nuclei labels of "
                   "a dataset read with --nuclei-format (the dominant nucleus group of each neighbourhood). sicapv2, "
                   "gleason2019, panda: the public Gleason datasets in their native layout (histosynth.data.gleason).")
@click.option("--nuclei-format", default=None, type=click.Choice(FORMATS),
              help="nuclei-density: the format of SRC's nuclei labels.")
@click.option("--region-map", default=None,
              help="nuclei-density: nucleus type → region label, e.g. epithelial=epithelial,neoplastic=epithelial,"
                   "spindle-shaped=stroma,connective=stroma,inflammatory=inflammatory,other=drop (default: that, for "
                   "the readers' class names). Label 0 is background.")
@click.option("--sigma-um", default=16.0, show_default=True, type=click.FloatRange(min=0.0, min_open=True),
              help="nuclei-density: the neighbourhood (Gaussian σ, µm).")
@click.option("--min-fraction", default=0.1, show_default=True, type=click.FloatRange(0.0, 1.0),
              help="nuclei-density: the share of the neighbourhood one group's nuclei must cover, else background.")
@click.option("--labels", default=None,
              help="sicapv2 / gleason2019 / panda: the region labels in label-id order "
                   "(default non-cancer,GG3,GG4,GG5: DISC's K = 4).")
@click.option("--label-map", default=None,
              help="sicapv2 / gleason2019 / panda: native mask value → label, e.g. '0=non-cancer,3=GG3', overriding the "
                   "format's default mapping value by value; panda: PROVIDER:VALUE=LABEL maps one provider's masks, "
                   "e.g. 'karolinska:2=GG3'.")
@click.option("--sicap-partition", default="test", show_default=True,
              type=click.Choice(["test", "val1", "val2", "val3", "val4"]),
              help="sicapv2: the partition whose Train.xlsx / Test.xlsx give the split (partition/Test or "
                   "partition/Validation/ValN).")
@click.option("--sicap-mask-tolerance", default=3, show_default=True, type=click.IntRange(0, 255),
              help="sicapv2: a JPEG mask's grey level within this many levels of a mapped value is that value "
                   "(compression noise); farther ones are errors.")
@click.option("--gleason-pathologist", default="majority", show_default=True,
              type=click.Choice(["majority", "1", "2", "3", "4", "5", "6"]),
              help="gleason2019: whose maps (Maps<N>_T), or the pixel-wise majority of the maps a core has (ties to "
                   "the lower grade).")
@click.option("--panda-providers", default="radboud,karolinska", show_default=True,
              help="panda: the data providers to read (Karolinska's ungraded cancer needs --label-map karolinska:2=...).")
@click.option("--panda-block", default=2048, show_default=True, type=click.IntRange(min=1),
              help="panda: the side of the aligned image / mask blocks read at --magnification (memory: one block).")
@labelled_store_options("region")
@click.option("--source-magnification", type=click.Choice(MAGNIFICATIONS), default=None,
              help="Magnification of SRC's pixels (required for a folder; sicapv2 is 10x, gleason2019 40x, a nuclei "
                   "dataset's reader may know it; panda: overrides the slides' level 0, else read from their metadata, else 20x).")
@click.option("--holdout", default=0.075, show_default=True, type=click.FloatRange(0.0, 1.0, max_open=True),
              help=HOLDOUT_HELP)
@seed_option()
@overwrite_option()
@user_errors
def prepare_regions_cmd(src, fmt, nuclei_format, region_map, sigma_um, min_fraction, labels, label_map,
                        sicap_partition, sicap_mask_tolerance, gleason_pathologist, panda_providers, panda_block, out,
                        patch, overlap, magnification, source_magnification, holdout, seed, overwrite):
    """Tile SRC's images and region masks (DISC's condition) into a region store: image + region mask per patch,
    masks cut with their image (nearest neighbour) at --magnification.
    """
    from dataclasses import replace

    from histosynth.data.regions import density_regions, parse_region_map, read_region_folder, region_labels
    from histosynth.data.prepare_labelled import prepare_nuclei

    given = _given(click.get_current_context())
    foreign = sorted(n for n in given if n in _REGION_OPTION_FORMATS and fmt not in _REGION_OPTION_FORMATS[n])
    if foreign:
        groups: dict[tuple[str, ...], list[str]] = {}
        for name in foreign:
            groups.setdefault(_REGION_OPTION_FORMATS[name], []).append(_word(name))
        raise HistosynthError("; ".join(f"{', '.join(words)}: only with --format {' / '.join(formats)}"
                                        for formats, words in groups.items()))
    if fmt == "folder":
        if source_magnification is None:
            raise HistosynthError("--format folder needs --source-magnification (a folder of images records none)")
        records = read_region_folder(src, source_magnification=source_magnification)
    elif fmt in GLEASON_FORMATS:
        records, source_magnification = _gleason_records(
            fmt, src, labels, label_map, sicap_partition, sicap_mask_tolerance, gleason_pathologist, panda_providers,
            panda_block, patch, magnification, source_magnification)
    else:
        if nuclei_format is None:
            raise HistosynthError("--format nuclei-density needs --nuclei-format (the format of SRC's nuclei labels)")
        from histosynth.data.formats import read_nuclei
        from histosynth.data.sources import reader_options

        mapping = parse_region_map(region_map)
        names = region_labels(mapping)
        options = reader_options(nuclei_format, source_magnification=source_magnification)
        records = (density_regions(replace(r, magnification=source_magnification or r.magnification), mapping, names,
                                   sigma_um=sigma_um, min_fraction=min_fraction)
                   for r in read_nuclei(nuclei_format, src, **options))
    store = prepare_nuclei(records, out, patch=patch, overlap=overlap, magnification=magnification, holdout=holdout,
                           source_magnification=source_magnification, seed=seed, overwrite=overwrite,
                           command=" ".join(sys.argv))
    counts = {s: len(store.indices(s)) for s in ("train", "test")}
    shares = _label_shares(store)
    click.echo(f"wrote {out}: {len(store)} patches ({counts['train']} train, {counts['test']} test), region labels "
               + ", ".join(f"{n} {f:.0%}" for n, f in shares.items()))


def _gleason_records(fmt, src, labels, label_map, sicap_partition, sicap_mask_tolerance, gleason_pathologist,
                     panda_providers, panda_block, patch, magnification, source_magnification):
    """(records, the source magnification prepare_nuclei should apply) of a Gleason dataset in its native format.

    sicapv2 / gleason2019 know their magnification (10x / 40x; --source-magnification overrides it); panda's
    records come out at --magnification already (read from the slides' pyramid), so nothing is applied to them.
    """
    from histosynth.data.gleason import parse_label_map, parse_labels, read_gleason_regions
    from histosynth.data.gleason.gleason2019 import GLEASON2019_MAGNIFICATION, parse_pathologist
    from histosynth.data.gleason.sicapv2 import SICAP_MAGNIFICATION

    options = {"labels": parse_labels(labels), "label_map": parse_label_map(label_map)}
    note = lambda line: click.echo(f"note: {line}", err=True)  # noqa: E731
    if fmt == "sicapv2":
        source_magnification = source_magnification or SICAP_MAGNIFICATION
        options.update(partition=sicap_partition, mask_tolerance=sicap_mask_tolerance,
                       source_magnification=source_magnification)
    elif fmt == "gleason2019":
        source_magnification = source_magnification or GLEASON2019_MAGNIFICATION
        options.update(pathologist=parse_pathologist(gleason_pathologist), source_magnification=source_magnification,
                       report=note)
    else:
        options.update(magnification=magnification, providers=panda_providers, block=panda_block, min_side=patch,
                       source_magnification=source_magnification, report=note)
        source_magnification = None  # the blocks are at --magnification already
    return read_gleason_regions(fmt, src, **options), source_magnification


def _label_shares(store) -> dict[str, float]:
    """Each region label's share of the store's pixels (from the manifest's per-patch fractions)."""
    totals = dict.fromkeys(store.class_names, 0.0)
    for row in store.records:
        for name, f in row.get("regions", {}).items():
            totals[name] += f
    n = max(1, len(store.records))
    return {name: t / n for name, t in totals.items()}


@prepare.command("slides")
@click.argument("slides", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="The patch store to create.")
@patch_option(256, "Patch size in pixels (PathLDM: 256).")
@click.option("--magnification", default="10x", show_default=True,
              help="Target magnification, any value up to the slide's (e.g. 40x, 20x, 10x, 2.5x; PathLDM: 10x).")
@click.option("--magnifications", default=None,
              help="Several levels instead of --magnification (ZoomLDM: 20x,10x,5x,2.5x,1.25x,0.625x,0.3125x,0.15625x): "
                   "the base first, then base/2^k for integers k >= 1, high to low; each patch is paired with its "
                   "region at the base.")
@overlap_option(0.0, "Overlap of neighbouring patches, as a fraction of the patch (not with --magnifications).")
@click.option("--tissue-threshold", default=0.5, show_default=True, type=click.FloatRange(0.0, 1.0),
              help="Keep a patch when at least this fraction of it is tissue (0 keeps every patch).")
@click.option("--source-magnification", default=None,
              help="Level-0 magnification of the slides, overriding their metadata (needed for files with neither "
                   "objective power nor microns per pixel, e.g. 20x).")
@click.option("--mpp", default=None, type=click.FloatRange(min=0.0, min_open=True),
              help="Level-0 pixel size in micrometres, overriding the slides' metadata (0.5 = 20x); PNG / JPEG "
                   "regions exported from a viewer need it (or --source-magnification).")
@overwrite_option("Replace an existing store.")
@user_errors
def slides_cmd(slides, out, patch, magnification, magnifications, overlap, tissue_threshold, source_magnification,
               mpp, overwrite):
    """Tile whole-slide images SLIDES (SVS / TIFF files, PNG / JPEG regions with --mpp, or folders of them) into a
    patch store.

    Each patch is read from the best pyramid level (resized when no level is at the target), background
    is skipped with a tissue detector, and the manifest keeps slide, level, level and level-0 coordinates,
    magnification and tissue fraction of every patch. With --magnifications, every level's patches go into
    one store, each row with its own magnification, zoom and base-grid tile (histosynth.data.zoom_store).
    """
    if magnifications is not None:
        given = _given(click.get_current_context())
        if "magnification" in given:
            raise HistosynthError("give --magnification (one level) or --magnifications (several levels), not both")
        if overlap > 0:
            raise HistosynthError("--overlap is not used with --magnifications: the patches of a level tile the base "
                                  "grid without overlap")
        from histosynth.data.zoom_store import prepare_zoom_slides

        store = prepare_zoom_slides(
            list(slides), out, patch=patch, magnifications=magnifications, tissue_threshold=tissue_threshold,
            source_magnification=source_magnification, mpp=mpp, overwrite=overwrite, command=" ".join(sys.argv),
            report=lambda line: click.echo(line, err=True),
        )
        per_level = ", ".join(f"{m}: {n}" for m, n in store.meta["patches_per_level"].items())
        click.echo(f"wrote {out}: {len(store)} patches of {store.patch_size} px ({per_level}) "
                   f"from {len(store.meta['slides'])} slides")
        return
    from histosynth.data.slide_patches import prepare_slides

    store = prepare_slides(
        list(slides), out, patch=patch, magnification=magnification, overlap=overlap,
        tissue_threshold=tissue_threshold, source_magnification=source_magnification, overwrite=overwrite,
        command=" ".join(sys.argv), mpp=mpp,
    )
    per_slide = ", ".join(f"{s['path']}: {s['patches']}" for s in store.meta.get("slides", [])[:10])
    more = len(store.meta.get("slides", [])) - 10
    click.echo(
        f"wrote {out}: {len(store)} patches of {store.patch_size} px at {store.magnification} "
        f"({per_slide}{f' and {more} more slides' if more > 0 else ''})"
    )


@prepare.command("captioned")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--captions", "table", required=True, type=click.Path(path_type=Path),
              help="CSV / TSV / JSON / JSONL table, one row per caption: an id column naming the image, a caption column.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="The image store to create (with captions.jsonl).")
@patch_option(256, "Patch size: each image's central square is resized to this (area averaging).")
@click.option("--magnification", default="20x", show_default=True, help="Magnification of the images (e.g. 20x).")
@click.option("--id-column", default="id", show_default=True,
              help="Column naming the image: its path relative to FOLDER, its file name or its stem.")
@click.option("--caption-column", default="caption", show_default=True)
@click.option("--label-column", "label_columns", multiple=True,
              help="Column copied into each caption row (repeat; e.g. class for the class-conditional recipe).")
@click.option("--group-column", default=None, help="Column whose values are held out together (e.g. slide).")
@click.option("--holdout", default=0.0, show_default=True, type=click.FloatRange(0.0, 1.0, max_open=True),
              help="Fraction of the images (or of the --group-column values) put in the test split.")
@seed_option("Seed of the hold-out draw.")
@click.option("--skip-unmatched", is_flag=True, help="Leave out rows naming no image and images without a caption.")
@click.option("--allow-upsampling", is_flag=True, help="Accept images smaller than --patch (Lanczos upsampling).")
@overwrite_option("Replace an existing store.")
@user_errors
def captioned_cmd(folder, table, out, patch, magnification, id_column, caption_column, label_columns, group_column,
                  holdout, seed, skip_unmatched, allow_upsampling, overwrite):
    """A caption-paired image FOLDER (text–image datasets: images + a table of id → caption) into an image store
    whose captions.jsonl a text-conditioned recipe trains on (`train --recipe pathldm-... --data OUT`)."""
    from histosynth.data.captioned_folder import CAPTIONS_FILE, prepare_captioned

    store = prepare_captioned(folder, table, out, patch=patch, magnification=magnification, id_column=id_column,
                              caption_column=caption_column, label_columns=label_columns, group_column=group_column,
                              holdout=holdout, seed=seed, skip_unmatched=skip_unmatched,
                              allow_upsampling=allow_upsampling, overwrite=overwrite, command=" ".join(sys.argv))
    rows = sum(1 for _ in open(store.path / CAPTIONS_FILE, encoding="utf-8"))
    click.echo(f"wrote {out}: {len(store)} patches of {store.patch_size} px at {store.magnification} "
               f"({len(store.indices('train'))} train, {len(store.indices('test'))} test) and {rows} captions in "
               f"{out}/{CAPTIONS_FILE}")
