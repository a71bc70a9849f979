"""One writer of sampling output for every method: OUT/images/N.png, any per-image side files (masks, labels,
real patches), one manifest row per image (OUT/samples.jsonl), and OUT/grid.png.

Written atomically: everything goes to a hidden sibling folder that is renamed to OUT only when sampling ended
without an error, so a failed or killed run never leaves a half-written OUT that blocks the rerun. An existing
non-empty OUT is replaced only with ``overwrite``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from histosynth.atomic import atomic_folder
from histosynth.errors import OutputExistsError
from histosynth.viz import save_grid

MANIFEST = "samples.jsonl"


def prepare_output_dir(out: Path, overwrite: bool) -> None:
    """Create ``out``; an existing non-empty one is an error unless ``overwrite`` (then it is replaced)."""
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise OutputExistsError("output directory exists and is not empty; pass --overwrite to replace it", out)
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


class SampleWriter:
    """``with SampleWriter(out, overwrite) as w: w.add(image, row, files={...}, grid=[...])``.

    ``image``: uint8 (H, W, 3); ``files``: relative path (e.g. ``masks/00000.png``) → uint8/uint16 array saved
    as PNG; ``row``: the manifest fields of this image (its name and image path are added first); ``grid``: the
    panels of this image's grid row (default: the image alone, ``grid_columns`` images per row); ``in_grid`` False
    leaves the image out of grid.png.
    """

    def __init__(self, out: str | Path, overwrite: bool = False, *, grid_rows: int = 8, grid_columns: int = 1):
        self.out, self.overwrite = Path(out), overwrite
        self.grid_rows, self.grid_columns = grid_rows, grid_columns
        self.count, self._panels = 0, []

    def __enter__(self) -> "SampleWriter":
        if self.out.exists() and any(self.out.iterdir()) and not self.overwrite:
            raise OutputExistsError("output directory exists and is not empty; pass --overwrite to replace it", self.out)
        self._folder = atomic_folder(self.out)
        self.root = self._folder.__enter__()
        (self.root / "images").mkdir()
        self._manifest = open(self.root / MANIFEST, "w")
        return self

    def add(self, image: np.ndarray, row: dict, *, files: dict[str, np.ndarray] | None = None,
            grid: list[np.ndarray] | None = None, in_grid: bool = True) -> str:
        name = f"{self.count:05d}"
        Image.fromarray(image).save(self.root / "images" / f"{name}.png")
        for rel, array in (files or {}).items():
            path = self.root / rel
            path.parent.mkdir(exist_ok=True)
            Image.fromarray(array).save(path)
        self._manifest.write(json.dumps({"name": name, "image": f"images/{name}.png", **row}) + "\n")
        if in_grid and len(self._panels) < self.grid_rows * self.grid_columns:
            self._panels.append(grid if grid is not None else [image])
        self.count += 1
        return name

    def __exit__(self, *exc) -> None:
        self._manifest.close()
        if exc[0] is None and self._panels:
            if self.grid_columns > 1:  # images side by side, grid_columns per row
                flat = [p for panel in self._panels for p in panel]
                rows = [flat[r:r + self.grid_columns] for r in range(0, len(flat), self.grid_columns)]
            else:
                rows = self._panels
            save_grid(rows, self.root / "grid.png", scale=max(1, 128 // rows[0][0].shape[0]))
        self._folder.__exit__(*exc)  # renames the folder into place, or removes it after an error
