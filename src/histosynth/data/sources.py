"""Several labelled datasets in one patch store: a shared class scheme and a tissue name per source.

A :class:`NucleiSource` is one dataset (path, format, reader options) with an optional tissue name, class map
(:mod:`histosynth.data.class_mapping`) and source magnification. :func:`prepare_sources` maps every source
onto one target class list and tiles them all into one store (``histosynth prepare nuclei --sources
SOURCES.yaml``, or one source with ``--tissue`` / ``--class-map`` / ``--classes``):

- every manifest row of a source with a tissue gets ``"tissue": NAME`` (without one, a record's own string
  ``meta["tissue"]`` is used, e.g. PanNuke's per-image tissue types); store.json's ``meta`` gets
  ``"tissues"`` (sorted distinct names, present when any patch has one) and ``"sources"``: one entry per source,
  ``{path, format, tissue, class_map (every source class → target class or null = dropped), source_magnification,
  options, regions, patches}``;
- source i draws its hold-out blocks from ``Generator(seed)`` for i = 0 and ``Generator([seed, i])`` after, so
  the first source's patches are those of a one-source store, and appending a source to a store
  (``append=True``, ``--append``) gives the store a one-command build of all sources would;
- every source is opened (files checked, first region read, class map checked against its classes) before
  any patch is written; errors are one line naming the file and the option or YAML entry.

Appending builds a new store (old patches copied unchanged, same splits and rows, then the new sources) under a
hidden name and swaps it in, so an interrupted append leaves the old store intact. It requires the store's patch
size, magnification, classes, overlap, hold-out, seed and stain normalisation.

The sources YAML (relative paths are relative to the file)::

    classes: [epithelial, spindle-shaped, inflammatory, other]   # target type ids 1..K, in this order
    sources:
      - {path: consep, format: consep, tissue: colon}
      - path: hgsc
        format: folder
        tissue: ovary
        source_magnification: 20x
        class_names: [connective, inflammatory, neoplastic]     # folder option (else its classes.txt)
        class_map: {neoplastic: epithelial, connective: spindle-shaped}   # or "a=b,c=d", or a file

Per-format options use the command's words: ``class_names`` (folder), ``consep_classes`` (consep),
``pannuke_test_folds`` (pannuke). ``relabel_components: true`` (any format; ``--relabel-components`` on the command
line, for every source) splits instance ids made of several disconnected parts instead of refusing them
(:mod:`histosynth.data.instance_check`).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from itertools import chain
from pathlib import Path

import numpy as np
import yaml

from histosynth.atomic import refuse_existing
from histosynth.data.class_mapping import ClassMapping, parse_class_list, parse_class_map
from histosynth.data.formats import READERS, read_nuclei
from histosynth.data.patches import Patch, format_magnification, parse_magnification
from histosynth.data.record import NucleiRecord
from histosynth.data.prepare_labelled import nuclei_meta, write_regions
from histosynth.data.store import ROW_KEYS, PatchStore
from histosynth.data.store_writer import PatchStoreWriter
from histosynth.errors import DataError, HistosynthError

__all__ = ["NucleiSource", "prepare_sources", "read_sources_file", "reader_options"]

FORMAT_OPTIONS = {"folder": ("class_names",), "consep": ("consep_classes",), "pannuke": ("pannuke_test_folds",),
                  "polygons": ("class_names", "polygon_classes")}
SOURCE_KEYS = ("path", "format", "tissue", "class_map", "source_magnification", "relabel_components",
               *(k for keys in FORMAT_OPTIONS.values() for k in keys))
FILE_KEYS = ("classes", "sources")
# store settings an appended source must share with the store, and the command-line words for them
APPEND_SETTINGS = {"patch": "--patch", "magnification": "--magnification", "overlap": "--overlap",
                   "holdout": "--holdout", "seed": "--seed", "stain_normalization": "--stain-normalize",
                   "stain_target": "--stain-target"}


def _cli_word(key: str) -> str:
    return "--" + key.replace("_", "-")


def reader_options(fmt: str, *, class_names=None, consep_classes=None, pannuke_test_folds=None, polygon_classes=None,
                   source_magnification: str | None = None, relabel_components=None, word=_cli_word, where: str = "",
                   path: str | Path | None = None) -> dict:
    """Keyword arguments of ``read_nuclei(fmt, ...)`` from the command's per-format options (None: not given).

    ``word`` spells an option for errors (``--class-names`` on the command line, ``class_names`` in YAML);
    ``where`` prefixes messages, ``path`` is the file they name. Raises DataError for an option of another
    format. consep_classes defaults to "merged", pannuke_test_folds to "3" (the other folds train).
    ``relabel_components`` (every format; true/false) appears in the options only when true.
    """
    options = _format_options(fmt, class_names, consep_classes, pannuke_test_folds, source_magnification, word,
                              where, path, polygon_classes)
    if relabel_components is not None and not isinstance(relabel_components, bool):
        raise DataError(f"{where}{word('relabel_components')}: expected true or false, got {relabel_components!r}",
                        path)
    if relabel_components:
        options["relabel_components"] = True
    return options


def _format_options(fmt, class_names, consep_classes, pannuke_test_folds, source_magnification, word, where,
                    path, polygon_classes=None) -> dict:
    given = {"class_names": class_names, "consep_classes": consep_classes, "pannuke_test_folds": pannuke_test_folds,
             "polygon_classes": polygon_classes}
    for key, value in given.items():
        if value is not None and key not in FORMAT_OPTIONS.get(fmt, ()):
            owner = next(f for f, keys in FORMAT_OPTIONS.items() if key in keys)
            raise DataError(f"{where}{word(key)} is an option of format {owner}, not {fmt}", path)
    if fmt == "consep":
        return {"classes": consep_classes or "merged"}
    if fmt == "pannuke":
        test = _folds(pannuke_test_folds if pannuke_test_folds is not None else "3", word, where, path)
        return {"test_folds": test, "train_folds": tuple(f for f in (1, 2, 3) if f not in test)}
    if fmt in ("folder", "polygons"):
        options = {"magnification": source_magnification}
        if polygon_classes is not None:  # annotation class names -> the classes (polygons.py parses and checks it)
            options["class_map"] = polygon_classes
        if class_names is not None:  # folder.py checks them (empty, repeated) and names the folder
            names = class_names.split(",") if isinstance(class_names, str) else class_names
            if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
                raise DataError(f"{where}{word('class_names')}: expected class names, got {class_names!r}", path)
            options["class_names"] = tuple(n.strip() for n in names)
        return options
    return {}


def _folds(value, word, where, path) -> tuple[int, ...]:
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    try:
        folds = tuple(int(str(f).strip()) for f in items)
    except ValueError:
        folds = ()
    if not folds or any(f not in (1, 2, 3) for f in folds):
        raise DataError(f"{where}{word('pannuke_test_folds')}: expected folds among 1,2,3, got {value!r}", path)
    return folds


@dataclass
class NucleiSource:
    """One labelled dataset going into a store.

    path, format:  the dataset and its reader (a key of ``histosynth.data.formats.READERS``).
    tissue:        tissue name written into every patch's manifest row (None: the records' own, if any).
    class_map:     ``{source class: target class or None (drop)}``, applied when the store has target classes.
    source_magnification: overrides the records' magnification ("40x", ...); required where a format has none.
    options:       the reader's keyword arguments (see :func:`reader_options`); shown in store.json.
    where:         how errors name this source's settings: "" (command line: ``--class-map``) or
                   ``"sources[2]."`` (YAML: ``sources[2].class_map``); ``file`` the YAML, if any.
    """

    path: Path
    format: str
    tissue: str | None = None
    class_map: dict[str, str | None] = field(default_factory=dict)
    source_magnification: str | None = None
    options: dict = field(default_factory=dict)
    where: str = ""
    file: str | None = None

    def word(self, key: str) -> str:
        """The option as the user wrote it: ``--class-map`` or ``sources[2].class_map``."""
        return f"{self.where}{key}" if self.where else _cli_word(key)


@dataclass
class _Opened:
    """A source whose first record has been read: the mapped record stream and its store.json entry."""

    records: Iterator[NucleiRecord]
    class_names: tuple[str, ...]
    entry: dict


def _open(source: NucleiSource, classes: tuple[str, ...] | None) -> _Opened:
    """Check the files, read the first region, check the class map against its classes; nothing is patched."""
    records = iter(read_nuclei(source.format, source.path, **source.options))
    first = next(records, None)
    if first is None:
        raise DataError("no labelled regions in this dataset", source.path)
    mapping = None
    if classes is not None:
        mapping = ClassMapping(classes, source.class_map, where=source.word("class_map"), path=source.file)
        resolved = mapping.resolved(first.class_names, first.source)  # unknown / unmapped classes fail here
    else:
        resolved = {c: c for c in first.class_names}
    entry = {
        "path": str(source.path), "format": source.format, "tissue": source.tissue, "class_map": resolved,
        "source_magnification": source.source_magnification, "options": _jsonable(source.options),
    }
    stream = (_adapted(r, source, mapping) for r in chain([first], records))
    return _Opened(stream, mapping.classes if mapping else tuple(first.class_names), entry)


def _adapted(record: NucleiRecord, source: NucleiSource, mapping: ClassMapping | None) -> NucleiRecord:
    """The record in the target classes, with the source's magnification and tissue."""
    if mapping is not None:
        record = mapping.apply(record)
    changes = {}
    if source.source_magnification is not None:
        changes["magnification"] = source.source_magnification
    if source.tissue is not None:
        changes["meta"] = {**(record.meta or {}), "tissue": source.tissue}
    return replace(record, **changes) if changes else record


def _jsonable(options: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}


def _source_rng(seed: int, index: int) -> np.random.Generator:
    """Hold-out draws of the index-th source: Generator(seed) for the first, Generator([seed, index]) after."""
    return np.random.default_rng(seed if index == 0 else [seed, index])


def prepare_sources(
    sources: Sequence[NucleiSource],
    out: str | Path,
    *,
    classes: Sequence[str] | None = None,
    patch: int = 128,
    overlap: float = 0.5,
    magnification: str = "20x",
    holdout: float = 0.075,
    stain_normalizer=None,
    seed: int = 0,
    overwrite: bool = False,
    append: bool = False,
    progress: bool = True,
    command: str | Sequence[str] | None = None,
    shard_size: int | None = None,
) -> PatchStore:
    """Tile every source, mapped onto ``classes``, into one store at ``out`` and open it.

    classes: target class names (type ids 1..K); None keeps the data's own classes, allowed for one source
    (or, with ``append``, the store's classes). ``append``: ``out`` is an existing labelled store whose
    patches are kept as they are, and the new sources are added after them. Raises OutputExistsError /
    DataError / HistosynthError (one line naming the file and the option) before any patch is written for
    every problem found up front; see the module docstring for rows, meta and hold-out draws.
    """
    out = Path(out)
    if not sources:
        raise HistosynthError("no sources to prepare")
    old = _store_to_extend(out, overwrite) if append else None
    if old is None:
        refuse_existing(out, overwrite)
    if classes is None and old is not None:
        classes = old.class_names
    if classes is None and len(sources) > 1:
        raise HistosynthError("several sources need the target classes they are mapped into (classes: a,b,c)")
    classes = None if classes is None else parse_class_list(list(classes))
    for source in sources:
        if source.class_map and classes is None:
            raise HistosynthError(f"{source.word('class_map')} needs the target classes (--classes a,b,c)")
    new_meta = nuclei_meta(patch, overlap, magnification, holdout, _common_magnification(sources),
                           stain_normalizer, seed, command)
    if old is not None:
        _check_append(old, new_meta, patch, magnification, classes, sources)
    opened = [_open(s, classes) for s in sources]
    meta, first_index = _meta_after(old, new_meta)
    old_tissues = _row_tissues(old)
    bar = _progress(progress)
    try:
        with PatchStoreWriter(out, opened[0].class_names, patch, magnification, meta, overwrite or append,
                              shard_size) as writer:
            for p in stored_patches(old) if old is not None else ():
                writer.add(p)
            tissues = set(old_tissues)
            for i, (source, item) in enumerate(zip(sources, opened)):
                done = write_regions(writer, item.records, _source_rng(seed, first_index + i), overlap=overlap,
                                     holdout=holdout, stain_normalizer=stain_normalizer, bar=bar)
                item.entry.update(regions=len(done.sources), patches=done.patches)
                tissues |= done.tissues
            writer.meta["sources"] = [*meta.get("sources", []), *(item.entry for item in opened)]
            if tissues:
                writer.meta["tissues"] = sorted(tissues)
    finally:
        if bar is not None:
            bar.close()
    return PatchStore(out)


def stored_patches(store: PatchStore) -> Iterator[Patch]:
    """Every patch of a labelled store as a :class:`Patch` (manifest keys beyond ROW_KEYS in ``extra``), in
    index order: re-adding them to a writer of the same patch size, magnification and classes reproduces them."""
    for i in range(len(store)):
        item = store[i]
        yield Patch(
            image=item["image"], inst_map=item["inst_map"], type_map=item["type_map"], split=item["split"],
            y=item["y"], x=item["x"], crop=item["crop"], source=item["source"],
            extra={k: v for k, v in store.records[i].items() if k not in ROW_KEYS},
        )


def _progress(enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(unit="region", desc="prepare", file=sys.stderr)


def _common_magnification(sources: Sequence[NucleiSource]) -> str | None:
    """The sources' --source-magnification when they all share one (store.json's top-level value), else None."""
    values = {s.source_magnification for s in sources}
    return values.pop() if len(values) == 1 else None


def _store_to_extend(out: Path, overwrite: bool) -> PatchStore:
    if overwrite:
        raise HistosynthError("--append adds to the store at --out; it cannot be combined with --overwrite")
    if not out.exists():
        raise DataError("--append: no store here to add to (leave out --append to create it)", out)
    store = PatchStore(out)
    if not store.has_labels:
        raise DataError("--append: this store holds images only; sources with nuclei labels need a labelled store", out)
    return store


def _check_append(old: PatchStore, new_meta: dict, patch: int, magnification: str,
                  classes: tuple[str, ...], sources: Sequence[NucleiSource]) -> None:
    """The appended sources must be cut like the store's patches and mapped into its classes."""
    if classes != old.class_names:
        raise DataError(f"--append: --classes {','.join(classes)} differ from the store's {','.join(old.class_names)}",
                        old.path)
    have = {"patch": old.patch_size, "magnification": old.magnification,
            **{k: old.meta.get(k) for k in ("overlap", "holdout", "seed", "stain_normalization", "stain_target")}}
    want = {"patch": int(patch), "magnification": format_magnification(magnification),
            **{k: new_meta[k] for k in ("overlap", "holdout", "seed", "stain_normalization", "stain_target")}}
    for key, word in APPEND_SETTINGS.items():
        if want[key] != have[key]:
            raise DataError(f"--append: {word} {want[key]} differs from the store's {have[key]} "
                            "(appended sources are cut like the store's patches)", old.path)
    known = {_same(s.get("path")): i for i, s in enumerate(old.meta.get("sources", [])) if s.get("path")}
    for source in sources:
        if _same(source.path) in known:
            raise DataError(f"--append: this dataset is already the store's sources[{known[_same(source.path)]}]",
                            source.path)


def _same(path) -> str:
    """A path in the form two spellings of one folder share (absolute, symlinks resolved)."""
    return str(Path(path).resolve())


def _meta_after(old: PatchStore | None, new_meta: dict) -> tuple[dict, int]:
    """store.json meta to write, and the source index of the first new source (its hold-out generator)."""
    if old is None:
        return new_meta, 0
    meta = dict(old.meta)
    meta["appended"] = [*meta.get("appended", []), {"command": new_meta["command"],
                                                     "first_source": len(meta.get("sources", []))}]
    return meta, max(1, len(meta.get("sources", [])))


def _row_tissues(store: PatchStore | None) -> set[str]:
    if store is None:
        return set()
    return {r["tissue"] for r in store.records if isinstance(r.get("tissue"), str)}


# ------------------------------------------------------------------------------------------- the YAML file
def read_sources_file(path: str | Path) -> tuple[tuple[str, ...], list[NucleiSource]]:
    """(target classes, sources) from a sources YAML (see the module docstring); paths relative to its folder.

    Raises DataError naming the file and the entry (``sources[1]: ...``) for a missing or unreadable file, an
    unknown or missing key, an unknown format, a bad magnification, class list, class map or tissue name, or
    two entries with the same path. The datasets themselves are read later, by :func:`prepare_sources`.
    """
    path = Path(path)
    data = _load_yaml(path)
    unknown = sorted(set(data) - set(FILE_KEYS))
    if unknown or "sources" not in data or "classes" not in data:
        what = f"unknown key {unknown[0]!r}" if unknown else "'classes' and 'sources' are both required"
        raise DataError(f"{what} (the file holds classes: [..] and sources: [..])", path)
    classes = parse_class_list(data["classes"], "classes", path)
    entries = data["sources"]
    if not isinstance(entries, list) or not entries:
        raise DataError("sources: expected a non-empty list of {path, format, ...} entries", path)
    sources = [_source_entry(e, i, path) for i, e in enumerate(entries)]
    seen: dict[str, int] = {}
    for i, s in enumerate(sources):
        if _same(s.path) in seen:
            raise DataError(f"sources[{i}]: path {s.path} is already sources[{seen[_same(s.path)]}]", path)
        seen[_same(s.path)] = i
    return classes, sources


def _load_yaml(path: Path) -> dict:
    if not path.is_file():
        raise DataError("--sources: file not found", path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise DataError(f"--sources: cannot read: {exc}", path) from None
    if not isinstance(data, dict):
        raise DataError("--sources: expected a mapping with classes: [..] and sources: [..]", path)
    return data


def _source_entry(entry, i: int, file: Path) -> NucleiSource:
    where = f"sources[{i}]."
    if not isinstance(entry, dict):
        raise DataError(f"sources[{i}]: expected a mapping {{path, format, ...}}, got {entry!r}", file)
    unknown = sorted(set(entry) - set(SOURCE_KEYS))
    if unknown:
        raise DataError(f"sources[{i}]: unknown key {unknown[0]!r} (known: {', '.join(SOURCE_KEYS)})", file)
    for key in ("path", "format"):
        if not isinstance(entry.get(key), str) or not entry[key].strip():
            raise DataError(f"sources[{i}].{key} is required (a string)", file)
    fmt = entry["format"]
    if fmt not in READERS:
        raise DataError(f"sources[{i}].format {fmt!r} is not one of {', '.join(READERS)}", file)
    magnification = _magnification(entry.get("source_magnification"), f"sources[{i}].source_magnification", file)
    options = reader_options(fmt, class_names=entry.get("class_names"), consep_classes=entry.get("consep_classes"),
                             pannuke_test_folds=entry.get("pannuke_test_folds"),
                             polygon_classes=entry.get("polygon_classes"), source_magnification=magnification,
                             relabel_components=entry.get("relabel_components"), word=lambda k: k, where=where,
                             path=file)
    return NucleiSource(
        path=file.parent / entry["path"], format=fmt, tissue=check_tissue(entry.get("tissue"), f"{where}tissue", file),
        class_map=parse_class_map(entry.get("class_map"), f"{where}class_map", file, base=file.parent),
        source_magnification=magnification, options=options, where=where, file=str(file),
    )


def _magnification(value, where: str, file) -> str | None:
    if value is None:
        return None
    try:
        return format_magnification(parse_magnification(value))
    except DataError:
        raise DataError(f"{where}: cannot read magnification {value!r}; expected e.g. 20x", file) from None


def check_tissue(value, where: str = "--tissue", path: str | Path | None = None) -> str | None:
    """A tissue name: a non-empty string (stripped), or None. Raises DataError naming ``where`` otherwise."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: expected a tissue name (e.g. colon), got {value!r}", path)
    return value.strip()
