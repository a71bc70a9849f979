"""The region label set of the Gleason readers and the mapping of each dataset's native mask values onto it.

Label set. DISC (Sec. 2.1) conditions on masks m ∈ {0, 1, 2, 3}^{H×W}: Non-Cancer, GG3, GG4, GG5; that is
:data:`DEFAULT_LABELS` (K = 4). ``--labels`` gives another list (label id = position, at most 255 labels).

Mapping. Each reader has a documented default mapping {native value: label} (background, stroma and benign tissue
→ ``non-cancer``, Gleason patterns 3 / 4 / 5 → ``GG3`` / ``GG4`` / ``GG5``). ``--label-map VALUE=LABEL,...``
overrides it value by value (entries it does not name keep the default). PANDA's two providers code their masks
differently, so there a key may name one provider, ``karolinska:2=GG3``, and a bare ``2=...`` means both.
Every label a mapping uses must be in the label list; every native value a mask holds must be placed by the
mapping, else a DataError names the mask file and the values (``apply``).

JPEG masks (SICAPv2's) are lossy: their grey levels drift around the native codes. :func:`snap_to_values` puts a
level within ``tolerance`` of a value the mapping places on that value (the nearest; ties to the lower one), so that
compression noise is not taken for an unknown class, while anything farther away is still refused by ``apply``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from histosynth.errors import DataError, HistosynthError

__all__ = ["DEFAULT_LABELS", "LabelMapping", "build_mapping", "parse_label_map", "parse_labels", "snap_to_values"]

DEFAULT_LABELS = ("non-cancer", "GG3", "GG4", "GG5")  # DISC Sec. 2.1: labels 0..3 = Non-Cancer, GG3, GG4, GG5
MAX_LABELS = 255  # region masks are stored as uint8

UserMap = dict[tuple[str | None, int], str]  # (provider or None, native value) -> label


def parse_labels(text: str | None) -> tuple[str, ...]:
    """The label list from ``"non-cancer,GG3,GG4,GG5"`` (None: :data:`DEFAULT_LABELS`); HistosynthError naming
    ``--labels`` when empty, repeated or longer than 255."""
    if text is None:
        return DEFAULT_LABELS
    names = tuple(n.strip() for n in str(text).split(",") if n.strip())
    if not names:
        raise HistosynthError("--labels: no label given (e.g. non-cancer,GG3,GG4,GG5)")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise HistosynthError(f"--labels: repeated labels {repeated}")
    if len(names) > MAX_LABELS:
        raise HistosynthError(f"--labels: {len(names)} labels; region masks hold at most {MAX_LABELS}")
    return names


def parse_label_map(text: str | None) -> UserMap:
    """{(provider or None, native value): label} from ``"0=non-cancer,3=GG3,karolinska:2=GG3"`` (None: {}).

    Values are non-negative integers; HistosynthError naming ``--label-map`` for anything else, or a value given twice.
    """
    out: UserMap = {}
    if text is None:
        return out
    for part in filter(None, (p.strip() for p in str(text).split(","))):
        key, sep, label = part.partition("=")
        key, label = key.strip(), label.strip()
        scope, _, value = key.rpartition(":")
        scope = scope.strip().lower() or None
        try:
            number = int(value.strip())
        except ValueError:
            number = -1
        if not sep or not label or number < 0:
            raise HistosynthError(f"--label-map: {part!r} is not VALUE=LABEL (a native mask value, e.g. 3=GG3, "
                                  "or PROVIDER:VALUE=LABEL for panda, e.g. karolinska:2=GG3)")
        if (scope, number) in out:
            raise HistosynthError(f"--label-map: value {key} is given twice")
        out[(scope, number)] = label
    if not out:
        raise HistosynthError("--label-map: no VALUE=LABEL pair given")
    return out


@dataclass(frozen=True)
class LabelMapping:
    """Native mask values → label ids of ``labels``; ``names`` keeps the label of each value (for messages, meta)."""

    labels: tuple[str, ...]
    names: dict[int, str]
    hint: str = ""  # what to do about an unplaced value (appended to the error)

    @property
    def table(self) -> dict[int, int]:
        return {v: self.labels.index(n) for v, n in self.names.items()}

    def describe(self) -> str:
        return ", ".join(f"{v}={n}" for v, n in sorted(self.names.items()))

    def apply(self, native: np.ndarray, path) -> np.ndarray:
        """int32 label ids (same shape) of a native mask; DataError naming ``path`` and the values it does not place."""
        a = np.asarray(native)
        if a.size == 0:
            return np.zeros(a.shape, np.int32)
        if a.dtype.kind not in "iub":
            raise DataError(f"mask values must be integers, got {a.dtype}", path)
        lo, hi = int(a.min()), int(a.max())
        if lo >= 0 and hi <= 65535:
            counts = np.bincount(a.ravel(), minlength=hi + 1)
            present = np.flatnonzero(counts).tolist()
        else:
            present, inverse = np.unique(a, return_counts=True)
            counts = dict(zip(present.tolist(), inverse.tolist()))
            present = present.tolist()
        unplaced = [v for v in present if v not in self.names]
        if unplaced:
            px = sum(int(counts[v]) for v in unplaced)
            todo = self.hint or "place them with --label-map VALUE=LABEL (label_map=)"
            raise DataError(f"mask values {unplaced[:10]} ({px} px) are not placed by the label mapping "
                            f"({self.describe()}; labels {', '.join(self.labels)}): {todo}", path)
        if lo >= 0 and hi <= 65535:
            lut = np.zeros(hi + 1, np.int32)
            for v, k in self.table.items():
                if v <= hi:
                    lut[v] = k
            return lut[a]
        out = np.zeros(a.shape, np.int32)
        for v, k in self.table.items():
            out[a == v] = k
        return out


def build_mapping(default: dict[int, str], user: UserMap | None, labels: tuple[str, ...], *,
                  scope: str | None = None, scopes: tuple[str, ...] = (), hint: str = "") -> LabelMapping:
    """The mapping of one dataset (or one PANDA provider, ``scope``): ``default`` overridden by the user's entries
    without a provider and then by those for ``scope``. ``scopes``: the provider names a key may carry (none outside
    PANDA). HistosynthError naming ``--label-map`` / ``--labels`` when a key names another provider or a label used
    is not in ``labels``."""
    names = dict(default)
    given: set[int] = set()
    for (key_scope, value), label in (user or {}).items():
        if key_scope is not None and key_scope not in scopes:
            where = f"one of {', '.join(scopes)}" if scopes else "only for --format panda (karolinska:, radboud:)"
            raise HistosynthError(f"--label-map: provider prefix {key_scope!r} in {key_scope}:{value}: prefixes are "
                                  f"{where}")
        if key_scope is None or key_scope == scope:
            if key_scope is None and scope is not None and (scope, value) in (user or {}):
                continue  # the provider's own entry wins over the bare one
            names[value] = label
            given.add(value)
    for value, label in sorted(names.items()):
        if label not in labels:
            if value in given:
                raise HistosynthError(f"--label-map: value {value} goes to {label!r}, which is not in the label list "
                                      f"({', '.join(labels)}; --labels)")
            raise HistosynthError(f"the default mapping puts native value {value} on {label!r}, which is not in "
                                  f"--labels ({', '.join(labels)}): give --label-map {value}=LABEL")
    return LabelMapping(labels=tuple(labels), names=names, hint=hint)


SNAP_WINDOW = 5  # px: the neighbourhood whose majority code a JPEG-noisy pixel takes


def snap_to_values(native: np.ndarray, values, tolerance: int) -> np.ndarray:
    """A uint8 JPEG mask back on its codes ``values``: each grey level within ``tolerance`` of a code goes to the
    nearest code (ties to the lower); then, as SICAPv2's 3, 4, 5 are one grey level apart and ±1 JPEG noise flips
    grades, a pixel takes the code that the majority (over half) of its 5 × 5 neighbourhood has when its grey level
    is within ``tolerance`` of it (annotated regions are blobs, not single pixels). Other levels are kept as they are
    (and refused later if no mapping places them). A mask without noise is returned unchanged."""
    from scipy.ndimage import uniform_filter

    a = np.asarray(native)
    codes = sorted(int(v) for v in values if 0 <= int(v) <= 255)
    if tolerance <= 0 or not codes or a.dtype != np.uint8:
        return a
    lut = np.arange(256, dtype=np.uint8)
    grey = np.arange(256)
    dist = np.abs(grey[:, None] - np.asarray(codes)[None, :])
    nearest = dist.argmin(1)  # first minimum: the lower code on a tie
    close = dist[grey, nearest] <= tolerance
    lut[close] = np.asarray(codes, dtype=np.uint8)[nearest[close]]
    out = lut[a]
    votes = np.stack([uniform_filter((out == c).astype(np.float32), SNAP_WINDOW, mode="nearest") for c in codes])
    voted = np.asarray(codes, dtype=np.uint8)[votes.argmax(0)]
    fix = (votes.max(0) > 0.5) & (np.abs(a.astype(np.int16) - voted) <= tolerance) & (out != voted)
    out[fix] = voted[fix]
    return out
