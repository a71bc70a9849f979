"""The one sample writer: images, side files and manifest rows land in OUT only when sampling succeeded."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from histosynth.errors import OutputExistsError
from histosynth.sampling import SampleWriter


def _image(v: int) -> np.ndarray:
    return np.full((8, 8, 3), v, np.uint8)


def test_writes_images_side_files_manifest_and_grid(tmp_path):
    out = tmp_path / "s"
    with SampleWriter(out, grid_rows=2) as w:
        for v in (10, 20, 30):
            name = f"{w.count:05d}"
            w.add(_image(v), {"v": v}, files={f"masks/{name}.png": _image(v + 1)}, grid=[_image(v + 1), _image(v)])
    rows = [json.loads(r) for r in (out / "samples.jsonl").read_text().splitlines()]
    assert [(r["name"], r["image"], r["v"]) for r in rows] == [("00000", "images/00000.png", 10),
                                                              ("00001", "images/00001.png", 20),
                                                              ("00002", "images/00002.png", 30)]
    assert np.asarray(Image.open(out / "images" / "00001.png"))[0, 0, 0] == 20
    assert np.asarray(Image.open(out / "masks" / "00002.png"))[0, 0, 0] == 31
    assert (out / "grid.png").is_file() and not list(tmp_path.glob(".s.partial-*"))


def test_a_failed_run_leaves_nothing_and_existing_output_needs_overwrite(tmp_path):
    out = tmp_path / "s"
    with pytest.raises(RuntimeError):
        with SampleWriter(out) as w:
            w.add(_image(1), {})
            raise RuntimeError("the sampler crashed")
    assert not out.exists() and not list(tmp_path.iterdir())  # the rerun is not blocked
    with SampleWriter(out) as w:
        w.add(_image(1), {})
    with pytest.raises(OutputExistsError, match="--overwrite"):
        SampleWriter(out).__enter__()
    with pytest.raises(RuntimeError):  # a failed overwrite keeps the previous output
        with SampleWriter(out, overwrite=True) as w:
            raise RuntimeError
    assert (out / "images" / "00000.png").is_file()
    with SampleWriter(out, overwrite=True) as w:
        w.add(_image(2), {})
        w.add(_image(3), {})
    assert len((out / "samples.jsonl").read_text().splitlines()) == 2
