"""Map a dataset's nucleus classes onto one shared type scheme (several datasets in one store).

A :class:`ClassMapping` is built from the target scheme (class names in type-id order: the first name is type
id 1) and an optional ``{source class name: target class name}`` map. Applied to a :class:`NucleiRecord`
(:func:`ClassMapping.apply`), each source class goes to

- the target class the map names (several source classes may go to one target: a merge);
- its own name, when the map does not list it and that name is in the target scheme
  (``other`` is an ordinary class name like any other);
- nowhere, when the map says ``drop`` (or YAML ``null``): every nucleus whose majority type is that class
  is removed from both the instance and the type map (its pixels become background; the image keeps the
  nucleus, so drop only classes you want the model to treat as unlabelled tissue, else map them to
  ``other``). Stray pixels of a dropped class inside a kept nucleus become untyped (type 0).

A source class neither listed nor in the target, a map key that is not one of the source's classes, and a
map value that is neither a target class nor ``drop`` are errors naming the class and the file. The
remapping is one lookup table indexed by the type map, built once per distinct source class list.

Maps are written inline (``"neoplastic=epithelial,connective=spindle-shaped,dead=drop"``) or as a YAML/JSON
file holding one mapping (:func:`parse_class_map`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import yaml

from histosynth.data.patches import relabel_contiguous
from histosynth.data.record import NucleiRecord
from histosynth.errors import DataError

__all__ = ["DROP", "ClassMapping", "parse_class_list", "parse_class_map"]

DROP = "drop"  # a map value that removes the class's nuclei; reserved, so no target class may be called so


def parse_class_list(value, where: str = "--classes", path: str | Path | None = None) -> tuple[str, ...]:
    """Target class names from ``"a,b,c"`` or a list of strings: stripped, non-empty, distinct, not ``drop``.

    Raises DataError (message starting with ``where``, naming ``path`` when given) on anything else.
    """
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, (list, tuple)) or not all(isinstance(n, str) for n in value):
        raise DataError(f"{where}: expected a list of class names, got {value!r}", path)
    names = [n.strip() for n in value]
    if not names or names == [""]:
        raise DataError(f"{where}: no class names given", path)
    if "" in names:
        raise DataError(f"{where}: class name {names.index('') + 1} is empty (name k is type id k)", path)
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DataError(f"{where}: class names repeat: {', '.join(repeated)}", path)
    if DROP in names:
        raise DataError(f"{where}: '{DROP}' is reserved (a class map's 'drop' removes a class's nuclei)", path)
    if len(names) > 255:
        raise DataError(f"{where}: {len(names)} classes; type maps are stored as uint8, at most 255", path)
    return tuple(names)


def parse_class_map(
    value: str | Mapping | None, where: str = "--class-map", path: str | Path | None = None,
    base: str | Path | None = None,
) -> dict[str, str | None]:
    """``{source: target or None}`` from a mapping, an inline ``"a=b,c=drop"`` string or a YAML/JSON file path.

    A value ``drop`` or null becomes None (drop). A relative file path is relative to ``base`` (default: the
    working directory). Raises DataError naming ``where`` and ``path`` (or the map file) on a missing or
    unreadable file, a malformed ``a=b`` item, a repeated source class or a non-string name.
    """
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return _checked_map(value.items(), where, path)
    if not isinstance(value, str):
        raise DataError(f"{where}: expected SOURCE=TARGET pairs, a mapping or a file, got {value!r}", path)
    text = value.strip()
    if "=" in text:
        return _checked_map(_inline_items(text, where, path), where, path)
    file = Path(base or ".") / text
    return _checked_map(_file_items(file, where), where, file)


def _inline_items(text: str, where: str, path) -> list[tuple[str, str]]:
    items = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        source, sep, target = part.partition("=")
        if not sep or not source.strip() or not target.strip():
            raise DataError(f"{where}: {part!r} is not SOURCE=TARGET (e.g. neoplastic=epithelial, dead=drop)", path)
        items.append((source.strip(), target.strip()))
    return items


def _file_items(path: Path, where: str) -> list[tuple]:
    if not path.is_file():
        raise DataError(f"{where}: neither SOURCE=TARGET pairs nor an existing YAML/JSON file", path)
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            data = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as exc:
        raise DataError(f"{where}: cannot read the class map: {exc}", path) from None
    if not isinstance(data, Mapping):
        raise DataError(f"{where}: the file must hold one mapping of source class: target class", path)
    return list(data.items())


def _checked_map(items, where: str, path) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for source, target in items:
        if not isinstance(source, str) or not (target is None or isinstance(target, str)):
            raise DataError(f"{where}: {source!r}: {target!r} is not a class name mapped to a class name or drop", path)
        source = source.strip()
        if source in out:
            raise DataError(f"{where}: class {source!r} is mapped twice", path)
        target = None if target is None or target.strip() == DROP else target.strip()
        out[source] = target
    return out


@dataclass
class ClassMapping:
    """Source class names → the target scheme ``classes``; see the module docstring for the rules.

    classes:   target class names, type ids 1..K in this order.
    class_map: ``{source class: target class or None (drop)}``; unlisted classes keep their own name.
    where:     how the user wrote the map, for errors (``--class-map``, ``sources[2].class_map``).
    path:      the file that holds the map (a sources YAML), named by errors found at construction.
    Raises DataError at construction when ``classes`` is not a valid list (:func:`parse_class_list`) or a map
    value is not a target class.
    """

    classes: tuple[str, ...]
    class_map: dict[str, str | None] = field(default_factory=dict)
    where: str = "--class-map"
    path: str | None = None
    _luts: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        self.classes = parse_class_list(list(self.classes), "classes", self.path)
        for source, target in self.class_map.items():
            if target is not None and target not in self.classes:
                raise DataError(
                    f"{self.where}: class {source!r} maps to {target!r}, which is not a target class "
                    f"({', '.join(self.classes)}) nor '{DROP}'", self.path,
                )

    def lut(self, source_classes: Sequence[str], source: str) -> np.ndarray:
        """int32 (K_src + 1,): target type id of each source type id; 0 → 0, -1 for a dropped class.

        Raises DataError naming ``source`` for a map key that is not a source class or a source class that
        is neither mapped nor a target class.
        """
        key = tuple(source_classes)
        if key not in self._luts:
            self._luts[key] = self._build_lut(key, source)
        return self._luts[key]

    def _build_lut(self, source_classes: tuple[str, ...], source: str) -> np.ndarray:
        unknown = [c for c in self.class_map if c not in source_classes]
        if unknown:
            raise DataError(
                f"{self.where}: class {unknown[0]!r} is not a class of this dataset "
                f"(its classes: {', '.join(source_classes)})", source,
            )
        lut = np.zeros(len(source_classes) + 1, np.int32)
        for i, name in enumerate(source_classes, 1):
            target = self.class_map.get(name, name)
            if name not in self.class_map and name not in self.classes:
                raise DataError(
                    f"class {name!r} of this dataset is neither in the class map ({self.where}) nor a target "
                    f"class ({', '.join(self.classes)}); map it ({name}=CLASS) or drop it ({name}={DROP})", source,
                )
            lut[i] = -1 if target is None else self.classes.index(target) + 1
        return lut

    def resolved(self, source_classes: Sequence[str], source: str) -> dict[str, str | None]:
        """``{source class: target class or None (dropped)}`` for every source class (for store.json)."""
        lut = self.lut(source_classes, source)
        return {name: None if t < 0 else self.classes[t - 1] for name, t in zip(source_classes, lut[1:].tolist())}

    def apply(self, record: NucleiRecord) -> NucleiRecord:
        """The record in the target scheme: type_map int32 (H, W) in 0..K, dropped nuclei removed from
        inst_map (then renumbered 1..n), class_names = ``classes``; other fields unchanged."""
        lut = self.lut(record.class_names, record.source)
        typ = np.asarray(record.type_map)
        if typ.size and typ.max() >= len(lut):
            raise DataError(f"type id {int(typ.max())} is outside 0..{len(lut) - 1}", record.source)
        inst, mapped = remap_maps(np.asarray(record.inst_map), typ, lut)
        return replace(record, inst_map=inst, type_map=mapped, class_names=self.classes)


def remap_maps(inst_map: np.ndarray, type_map: np.ndarray, lut: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Apply a lookup table to a type map; -1 entries drop the nuclei whose majority type they are.

    inst_map, type_map: int (H, W); lut: int32 (K_src + 1,), values -1..K. Returns int32 (inst_map, type_map);
    the instance map is the input's when nothing is dropped, else renumbered 1..n.
    """
    mapped = lut[type_map]
    if not (lut < 0).any():
        return inst_map.astype(np.int32, copy=False), mapped.astype(np.int32, copy=False)
    inst = inst_map.astype(np.int64, copy=False)
    majority = _majority_type(inst, type_map.astype(np.int64, copy=False), len(lut))  # (N,), 0 = untyped
    dropped = np.concatenate([[False], lut[majority] < 0])  # indexed by instance id; lut[0] = 0 keeps untyped
    remove = dropped[inst]
    inst = np.where(remove, 0, inst)
    mapped = np.where(remove | (mapped < 0), 0, mapped).astype(np.int32)
    return relabel_contiguous(inst.astype(np.int32)), mapped


def _majority_type(inst: np.ndarray, type_map: np.ndarray, k1: int) -> np.ndarray:
    """int64 (N,): majority source type id of instances 1..N among their typed pixels; 0 when none is typed."""
    n = int(inst.max(initial=0))
    table = np.bincount((inst * k1 + type_map).ravel(), minlength=(n + 1) * k1).reshape(n + 1, k1)[1:, 1:]
    majority = np.argmax(table, axis=1) + 1
    return np.where(table.sum(axis=1) > 0, majority, 0)
