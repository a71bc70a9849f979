"""Instance maps that cannot be right, found and (on request) repaired.

An instance PNG saved 8-bit with more than 255 nuclei wraps ids (256 → 0, 257 → 1, ...): several nuclei share an id,
so one "instance" is made of several disconnected parts, and the nuclei whose id wrapped to 0 keep their type but lie
in no instance. :func:`check_instances` finds both; :func:`relabel_components` splits such ids.

The rules (one place, applied by :func:`histosynth.data.io.validate_record` to every reader's records):

- **Parts** are 8-connected: pixels of one id touching by an edge or a corner are one part (a rasterised contour is
  often only diagonally connected). Found for every id at once by ``skimage.measure.label`` on the instance map
  (neighbours are connected only when they hold the same id), not id by id.
- **Specks**: parts of at most :data:`SPECK` (2) pixels next to a larger part of their id are ignored (stray
  pixels of an annotation, not a nucleus).
- **Cut by the image edge**: an id whose parts (specks aside) *all* touch the image border is one nucleus that the
  crop of a patch cut through (a concave nucleus crossing the edge leaves two pieces). This is accepted: on the real
  CoNSeP patches (656 crops of 256 px) 32 ids in 30 patches have two parts, and every one of their parts touches the
  border; no id has parts away from it.
- An id is **split** when, specks aside, it has two or more parts and at least one of them does not touch the
  border.
- **Typed pixels in no instance** (type > 0, instance 0) are tolerated up to :data:`ORPHAN_TOLERANCE` (1 %) of the
  typed pixels: the real HGSC region has one 43-pixel typed blob without an instance among 416,370 typed pixels.

A record is refused when it has a split id or more typed pixels in no instance than tolerated; the message gives
both counts. Repair (:func:`relabel_components`, ``prepare nuclei --relabel-components``):

- each part (more than :data:`SPECK` px) of a split id becomes its own instance: the largest part keeps the id, the
  others get new ids above the map's largest; specks of a split id are cleared (instance and type 0);
- every pixel of such a part gets the part's majority type (its non-zero type pixels; ties → the smaller type id;
  a part without typed pixels keeps its types);
- each 8-connected group of typed pixels in no instance that share one type (more than :data:`SPECK` px) becomes a
  new instance of that type (the nuclei whose id wrapped to 0);
- ids that are not split (whole, or cut by the image edge) are left as they are: maps without split ids or typed
  pixels in no instance come back unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["ORPHAN_TOLERANCE", "SPECK", "InstanceReport", "check_instances", "relabel_components"]

SPECK = 2  # parts of at most this many pixels are stray pixels, not nuclei
ORPHAN_TOLERANCE = 0.01  # typed pixels in no instance, as a fraction of the typed pixels, accepted as label noise
CONNECTIVITY = 2  # skimage's name for 8-connectivity in 2-D


@dataclass
class InstanceReport:
    """What :func:`check_instances` found in one pair of maps.

    split_ids:      ids made of several disconnected parts (see the module docstring), ascending.
    split_parts:    number of parts (specks aside) of each split id.
    orphan_pixels:  typed pixels (type > 0) whose instance is 0.
    typed_pixels:   all typed pixels.
    """

    split_ids: np.ndarray
    split_parts: np.ndarray
    orphan_pixels: int
    typed_pixels: int

    @property
    def too_many_orphans(self) -> bool:
        return self.orphan_pixels > ORPHAN_TOLERANCE * self.typed_pixels

    @property
    def ok(self) -> bool:
        return self.split_ids.size == 0 and not self.too_many_orphans

    def summary(self) -> str:
        """'37 instance ids are made of several disconnected parts (e.g. id 12: 3 parts); 420 typed pixels lie in
        no instance (0.4 % of the typed pixels)'."""
        n = self.split_ids.size
        if n:
            worst = int(np.argmax(self.split_parts))
            split = (f"{n} instance id{'s are' if n != 1 else ' is'} made of several disconnected parts "
                     f"(e.g. id {int(self.split_ids[worst])}: {int(self.split_parts[worst])} parts)")
        else:
            split = "no instance id is made of several disconnected parts"
        share = 100.0 * self.orphan_pixels / max(self.typed_pixels, 1)
        orphans = (f"{self.orphan_pixels} typed pixel{'s lie' if self.orphan_pixels != 1 else ' lies'} in no instance "
                   f"({share:.2g} % of the typed pixels; up to {100 * ORPHAN_TOLERANCE:g} % is accepted)")
        return f"{split}; {orphans}"


@dataclass
class _Parts:
    comp: np.ndarray  # (H, W) part label of every pixel, 0 background
    comp_id: np.ndarray  # (P + 1,) instance id of each part (0 for part 0)
    sizes: np.ndarray  # (P + 1,) pixels of each part
    split_part: np.ndarray  # (P + 1,) bool: the part belongs to a split id
    split_ids: np.ndarray
    split_parts: np.ndarray


def _parts(inst: np.ndarray) -> _Parts:
    from skimage.measure import label

    comp = label(inst, background=0, connectivity=CONNECTIVITY)
    n = int(comp.max(initial=0))
    comp_id = np.zeros(n + 1, dtype=np.int64)
    comp_id[comp.ravel()] = inst.ravel()  # every pixel of a part holds the same id
    sizes = np.bincount(comp.ravel(), minlength=n + 1)
    border = np.zeros(n + 1, dtype=bool)
    if n == 0:
        empty = np.zeros(0, dtype=np.int64)
        return _Parts(comp, comp_id, sizes, np.zeros(1, bool), empty, empty)
    border[np.concatenate([comp[0], comp[-1], comp[:, 0], comp[:, -1]])] = True
    ids, owner = np.unique(comp_id[1:], return_inverse=True)  # owner: index into ids of each part 1..n
    size = sizes[1:]
    # a part counts unless it is a speck; an id made only of specks keeps its largest one
    largest = np.zeros(ids.size, dtype=np.int64)
    np.maximum.at(largest, owner, size)
    counts = (size > SPECK) | (size == largest[owner])
    n_parts = np.bincount(owner, weights=counts, minlength=ids.size).astype(np.int64)
    n_inner = np.bincount(owner, weights=counts & ~border[1:], minlength=ids.size)
    split = (n_parts >= 2) & (n_inner > 0)
    split_part = np.concatenate([[False], split[owner]])
    return _Parts(comp, comp_id, sizes, split_part, ids[split], n_parts[split])


def check_instances(inst_map: np.ndarray, type_map: np.ndarray) -> InstanceReport:
    """Split ids and typed pixels in no instance of one (H, W) instance map and its type map (see the module)."""
    inst, typ = np.asarray(inst_map), np.asarray(type_map)
    parts = _parts(inst)
    typed = typ > 0
    return InstanceReport(parts.split_ids, parts.split_parts, int(np.count_nonzero(typed & (inst == 0))),
                          int(np.count_nonzero(typed)))


def relabel_components(inst_map: np.ndarray, type_map: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
    """Split every split id into one instance per part and give typed pixels in no instance their own instances.

    Returns (instance map, type map, counts) where counts says ``split_ids`` (ids split), ``new_instances`` (parts
    beyond the first of a split id) and ``orphan_instances`` (instances made of typed pixels in no instance). The
    rules are the module docstring's; maps without split ids or typed pixels in no instance come back unchanged.
    """
    inst = np.asarray(inst_map).astype(np.int64)
    typ = np.asarray(type_map).astype(np.int64)
    parts = _parts(inst)
    comp, comp_id, sizes = parts.comp, parts.comp_id, parts.sizes
    new_id = comp_id.copy()
    next_id = int(inst.max(initial=0)) + 1
    n_new = 0
    flat_typ = typ.ravel()  # a copy: astype above
    if parts.split_ids.size:
        idx = np.flatnonzero(parts.split_part)  # parts of split ids
        # the largest part of each split id keeps the id; ties → the first part found
        order = idx[np.lexsort((idx, -sizes[idx], comp_id[idx]))]
        first = np.ones(order.size, dtype=bool)
        first[1:] = comp_id[order[1:]] != comp_id[order[:-1]]
        speck = sizes[order] <= SPECK
        renamed = order[~first & ~speck]
        new_id[renamed] = np.arange(next_id, next_id + renamed.size)
        next_id += renamed.size
        n_new = int(renamed.size)
        new_id[order[~first & speck]] = 0
        # each part of a split id gets its majority type (non-zero types, ties → the smaller id); its specks none
        pix = np.flatnonzero(parts.split_part[comp.ravel()])
        c = comp.ravel()[pix]
        t = flat_typ[pix]
        k1 = int(typ.max(initial=0)) + 1
        on = t > 0
        votes = np.bincount(c[on] * k1 + t[on], minlength=comp_id.size * k1).reshape(comp_id.size, k1)
        majority = np.where(votes.max(1) > 0, votes.argmax(1), 0)[c]
        t = np.where(majority > 0, majority, t)
        t[new_id[c] == 0] = 0
        flat_typ[pix] = t
    out = new_id[comp]
    typ = flat_typ.reshape(typ.shape)
    n_orphan = 0
    orphan = (typ > 0) & (out == 0)
    if orphan.any():
        out, n_orphan, next_id = _orphan_instances(out, typ, orphan, next_id)
    counts = {"split_ids": int(parts.split_ids.size), "new_instances": n_new, "orphan_instances": n_orphan}
    return out.astype(np.int32), typ.astype(np.int32), counts


def _orphan_instances(out: np.ndarray, typ: np.ndarray, orphan: np.ndarray,
                      next_id: int) -> tuple[np.ndarray, int, int]:
    """Each 8-connected group of one type among the ``orphan`` pixels, above a speck, becomes a new instance."""
    from scipy import ndimage as ndi

    rows, cols = np.nonzero(orphan)
    box = (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
    sub_typ, sub_orphan, sub_out = typ[box], orphan[box], out[box]
    made = 0
    for t in np.unique(sub_typ[sub_orphan]):
        lab, n = ndi.label(sub_orphan & (sub_typ == t), structure=np.ones((3, 3), bool))
        size = np.bincount(lab.ravel(), minlength=n + 1)
        keep = np.flatnonzero(size > SPECK)
        keep = keep[keep > 0]
        lut = np.zeros(n + 1, dtype=np.int64)
        lut[keep] = np.arange(next_id, next_id + keep.size)
        hit = lab > 0
        sub_out[hit] = lut[lab[hit]]
        next_id += keep.size
        made += keep.size
    return out, int(made), next_id
