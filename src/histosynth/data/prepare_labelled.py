"""Labelled regions into a patch store: :func:`prepare_nuclei` (NASDM Sec. 3.1) and :func:`write_regions`.

Each record (a nuclei-labelled region, or DISC's image + region mask) is stain-normalised once when asked, cut
into patches (:mod:`histosynth.data.patches`) and streamed into a :class:`~histosynth.data.store_writer.PatchStoreWriter`.
Hold-out: each region's 7.5 % block; where a region's block is smaller than one crop, whole regions are held out
instead (a note on stderr, store.json ``meta.whole_region_holdout``), so the test split is empty only when asked
(``holdout=0``).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from itertools import chain
from pathlib import Path

import numpy as np

from histosynth.atomic import refuse_existing
from histosynth.data.patches import choose_whole_regions, extract_patches, format_magnification
from histosynth.data.record import NucleiRecord, RegionRecord
from histosynth.data.store import PatchStore
from histosynth.data.store_writer import PatchStoreWriter, command_list
from histosynth.errors import DataError


def _progress(records: Iterable, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    total = len(records) if hasattr(records, "__len__") else None
    return tqdm(total=total, unit="region", desc="prepare", file=sys.stderr)


def prepare_nuclei(
    records: Iterable[NucleiRecord],
    out: str | Path,
    *,
    patch: int = 128,
    overlap: float = 0.5,
    magnification: str = "20x",
    holdout: float = 0.075,
    source_magnification: str | None = None,
    stain_normalizer=None,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    command: str | Sequence[str] | None = None,
    shard_size: int | None = None,
) -> PatchStore:
    """Stream labelled regions into a patch store (NASDM section 3.1) and open it. ``RegionRecord``s (DISC's image
    + region mask, :mod:`histosynth.data.regions`) make a region store; their patching and hold-out are the same.

    Records are consumed one at a time, so any reader's generator works. One Generator(seed) draws all
    hold-out blocks in record order: the same inputs and seed give the same split. Stain normalization
    (an object with .transform(rgb), e.g. from make_stain_normalizer) runs once per region, before patching.
    A record whose ``meta["tissue"]`` is a string (PanNuke's tissue types, or a source's tissue set by
    :mod:`histosynth.data.sources`) gives its patches' manifest rows ``"tissue"``, and store.json's meta
    ``"tissues"`` lists the distinct names. Several datasets with a class mapping:
    :func:`histosynth.data.sources.prepare_sources`.
    """
    out = Path(out)
    refuse_existing(out, overwrite)  # fail before reading any data
    iterator = iter(records)
    first = next(iterator, None)
    if first is None:
        raise DataError("no labelled regions to prepare", out)
    meta = nuclei_meta(patch, overlap, magnification, holdout, source_magnification, stain_normalizer, seed, command)
    bar = _progress(records, progress)
    try:
        regions = isinstance(first, RegionRecord)  # region records make a region store (image + region mask)
        with PatchStoreWriter(out, first.class_names, patch, magnification, meta, overwrite, shard_size,
                              labels=not regions, regions=regions) as writer:
            done = write_regions(writer, chain([first], iterator), np.random.default_rng(seed), overlap=overlap,
                                 holdout=holdout, source_magnification=source_magnification,
                                 stain_normalizer=stain_normalizer, bar=bar)
            if done.tissues:
                writer.meta["tissues"] = sorted(done.tissues)
    finally:
        if bar is not None:
            bar.close()
    return PatchStore(out)


def nuclei_meta(patch, overlap, magnification, holdout, source_magnification, stain_normalizer, seed, command) -> dict:
    """store.json's ``meta`` of a labelled store: how it was made (``args`` repeats the prepare options)."""
    return {
        "overlap": overlap,
        "holdout": holdout,
        "source_magnification": source_magnification,
        "stain_normalization": _stain_name(stain_normalizer),
        "stain_target": getattr(stain_normalizer, "target", None),
        "seed": seed,
        "command": command_list(command),
        "args": {
            "patch": patch,
            "overlap": overlap,
            "magnification": magnification,
            "holdout": holdout,
            "source_magnification": source_magnification,
            "seed": seed,
        },
    }


@dataclass
class RegionsWritten:
    """What :func:`write_regions` wrote: region sources in order, patches, distinct tissue names, and the regions
    held out whole because their hold-out block was smaller than one crop."""

    sources: list[str] = field(default_factory=list)
    patches: int = 0
    tissues: set[str] = field(default_factory=set)
    held_out_whole: list[str] = field(default_factory=list)


@dataclass
class _SmallBlock:
    """A region whose hold-out block holds no test tile: its patches are indices first..first+count-1."""

    source: str
    first: int
    count: int
    crop: int
    block: tuple[int, int]
    shape: tuple[int, int]
    magnification: str


WHOLE_REGION_META = "whole_region_holdout"


def write_regions(
    writer: PatchStoreWriter, records: Iterable[NucleiRecord], rng: np.random.Generator, *, overlap: float,
    holdout: float, source_magnification: str | None = None, stain_normalizer=None, bar=None,
) -> RegionsWritten:
    """Patch each record (hold-out blocks drawn from ``rng``) into ``writer``; patch size and target
    magnification are the writer's. A string ``record.meta["tissue"]`` becomes each patch's ``"tissue"``, a string
    ``record.meta["slide"]`` its ``"slide"`` (the slide several records were cut from).

    Regions whose hold-out block is smaller than one crop (no test tile fits in it) are written as train, then
    whole regions among them are held out as test (:func:`histosynth.data.patches.choose_whole_regions`, drawn
    from ``rng`` after the blocks): about ``holdout`` of their patches, at least one region when ``records``
    gave no other test patch. That is printed as a note (stderr) and appended to ``writer.meta``'s
    ``whole_region_holdout`` list.

    Raises DataError naming the record when its class names differ from the writer's, naming the sources
    when no patch at all could be cut from ``records``, and naming the region when a single region's block
    is too small for a test patch and no other region could be held out (pass holdout 0 to mean it).
    """
    done = RegionsWritten()
    small: list[_SmallBlock] = []
    test = train = 0  # patches of regions split in themselves (their block, or the dataset's own split)
    for record in records:
        _check_classes(record, writer.class_names)
        done.sources.append(record.source)
        tissue = (record.meta or {}).get("tissue")
        tissue = tissue if isinstance(tissue, str) else None
        slide = (record.meta or {}).get("slide")  # several regions of one slide (Gleason blocks, patches): MIL's bags
        region = _prepared(record, source_magnification, stain_normalizer)
        patches = extract_patches(region, writer.patch_size, overlap, writer.magnification, holdout, rng)
        first = len(writer)
        for p in patches:
            if tissue is not None:
                p.extra["tissue"] = tissue
            if isinstance(slide, str):
                p.extra["slide"] = slide
            writer.add(p)
            done.patches += 1
            if not patches.whole_region:
                test, train = test + (p.split == "test"), train + (p.split != "test")
        if patches.whole_region and len(writer) > first:
            small.append(_SmallBlock(record.source, first, len(writer) - first, patches.crop,
                                     patches.small_block[2:], region.image.shape[:2], str(region.magnification)))
        if tissue is not None:
            done.tissues.add(tissue)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(patches=len(writer))
    if done.patches == 0:
        only = done.sources[0] if len(done.sources) == 1 else None
        raise DataError(_empty_message(done.sources, writer.patch_size, writer.magnification), only)
    if small:
        _hold_out_whole_regions(writer, done, small, holdout, rng, need_test=test == 0, need_train=train == 0, bar=bar)
    return done


def _hold_out_whole_regions(writer: PatchStoreWriter, done: RegionsWritten, small: list[_SmallBlock], holdout: float,
                            rng: np.random.Generator, *, need_test: bool, need_train: bool, bar) -> None:
    """Make whole regions of ``small`` test (see :func:`write_regions`), say so, and record it in the meta."""
    pct = f"{holdout * 100:g} %"
    if len(small) == 1 and need_test and need_train:
        one = small[0]
        raise DataError(
            f"the {pct} hold-out block ({one.block[0]}x{one.block[1]} px) of this {one.shape[0]}x{one.shape[1]} px "
            f"region is smaller than one crop ({one.crop} px: {writer.patch_size} px patches at {writer.magnification} "
            f"from {format_magnification(one.magnification)}), so no test patch fits in it, and there is no other "
            "region to hold out whole: pass --holdout 0 to prepare it without a test split, or add regions",
            one.source,
        )
    chosen = choose_whole_regions([r.count for r in small], holdout, rng, at_least_one=need_test, keep_one=need_train)
    for i in chosen:
        writer.reassign_split(small[i].first, small[i].count, "test")
    done.held_out_whole = [small[i].source for i in chosen]
    held = sum(small[i].count for i in chosen)
    of = sum(r.count for r in small)
    crops = sorted({r.crop for r in small})
    entry = {
        "reason": f"the {pct} hold-out block of {len(small)} of {len(done.sources)} regions is smaller than one crop "
                  f"({'/'.join(map(str, crops))} px), so no test patch fits in it",
        "regions": len(small),
        "test_regions": done.held_out_whole,
        "test_patches": held,
        "patches": of,
        "test_fraction": round(held / of, 4),
    }
    writer.meta.setdefault(WHOLE_REGION_META, []).append(entry)
    regions = "region" if len(chosen) == 1 else "regions"
    note = (f"note: {entry['reason']}; held out {len(chosen)} whole {regions} of those instead ({held} of their "
            f"{of} patches, {held / of:.1%}), chosen by the seed (store.json meta.{WHOLE_REGION_META})")
    if bar is not None:
        bar.write(note, file=sys.stderr)
    else:
        print(note, file=sys.stderr)


def _stain_name(normalizer) -> str:
    if normalizer is None:
        return "none"
    return getattr(normalizer, "name", None) or type(normalizer).__name__


def _check_classes(record: NucleiRecord | RegionRecord, class_names: tuple[str, ...]) -> None:
    if tuple(record.class_names) != class_names:
        raise DataError(
            f"class names {tuple(record.class_names)} differ from the first region's {class_names}; "
            "one store holds one label set",
            record.source,
        )


def _prepared(record: NucleiRecord, source_magnification: str | None, normalizer) -> NucleiRecord:
    """The record as patched: magnification supplied/overridden, image stain-normalized once per region."""
    changes = {}
    if source_magnification is not None:
        changes["magnification"] = source_magnification
    if normalizer is not None:
        try:
            changes["image"] = normalizer.transform(record.image)
        except DataError as exc:
            raise DataError(f"stain normalization failed: {exc}", record.source) from None
    return replace(record, **changes) if changes else record


def _empty_message(sources: list[str], patch: int, magnification: str) -> str:
    shown = ", ".join(sources[:5]) + (f" and {len(sources) - 5} more" if len(sources) > 5 else "")
    return (
        f"no {patch} px patch at {magnification} could be cut from {shown}: "
        "are the regions smaller than one crop (patch x source/target magnification)?"
    )
