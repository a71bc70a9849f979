"""Caption-paired image folders into an image store with its captions (issue 14, item 13).

The folder is built from the bundled real HGSC region: ten crops of several sizes (some not square) in two
"slide" subfolders, and a CSV with id (the file stem), caption, class and slide columns, one image captioned twice.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from histosynth.cli import main
from histosynth.data.captioned_folder import CAPTIONS_FILE, prepare_captioned
from histosynth.errors import DataError, OutputExistsError
from histosynth.quickstart import bundled_sample

SIZES = [(40, 64), (48, 48), (64, 40), (56, 72), (80, 48), (48, 60), (72, 72), (44, 52), (64, 64), (52, 90)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, Path]:
    image = _hgsc_image()
    root = tmp_path_factory.mktemp("captioned")
    folder = root / "patches"
    rows = []
    for i, (h, w) in enumerate(SIZES):
        slide = "slideA" if i < 5 else "slideB"
        (folder / slide).mkdir(parents=True, exist_ok=True)
        y, x = 100 * i, 80 * i
        Image.fromarray(image[y : y + h, x : x + w]).save(folder / slide / f"p{i:02d}.png")
        rows.append({"id": f"p{i:02d}", "caption": f"H&E patch {i} of {slide}", "class": str(i % 4), "slide": slide})
    rows.append({"id": "slideB/p07.png", "caption": "a second caption of patch 7", "class": "3", "slide": "slideB"})
    table = root / "captions.csv"
    with open(table, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return folder, table


def _hgsc_image() -> np.ndarray:
    from histosynth.data.formats import read_nuclei

    (region,) = read_nuclei("folder", bundled_sample(), magnification="20x")
    return region.image


def _central_square(path: Path, size: int) -> np.ndarray:
    """Independently: PIL crops the central square and box-filters it to size."""
    im = Image.open(path).convert("RGB")
    side = min(im.size)
    left, top = (im.size[0] - side) // 2, (im.size[1] - side) // 2
    return np.asarray(im.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BOX))


def test_folder_and_table_become_a_store_with_its_captions(dataset, tmp_path):
    from histosynth.conditions.patch_captions import ClassRule, match_captions, read_caption_rows

    folder, table = dataset
    store = prepare_captioned(folder, table, tmp_path / "store", patch=32, magnification="10x",
                              label_columns=("class",), group_column="slide", holdout=0.5, seed=1, progress=False)
    assert len(store) == 10 and store.patch_size == 32 and store.magnification == "10x" and not store.has_labels
    for i in range(10):
        rec = store.records[i]
        assert np.array_equal(store[i]["image"], _central_square(folder / rec["file"], 32)), rec["file"]
        assert (rec["height"], rec["width"]) == SIZES[int(Path(rec["file"]).stem[1:])]
    # one slide's five images are the test split: they stay together
    test = {Path(store.records[i]["file"]).parts[0] for i in store.indices("test")}
    assert len(store.indices("test")) == 5 and len(test) == 1
    rows = read_caption_rows(store.path / CAPTIONS_FILE)
    assert len(rows) == 11
    matched = match_captions(rows, store, store.path / CAPTIONS_FILE)  # what training reads
    p07 = next(i for i in range(10) if store.records[i]["file"].endswith("p07.png"))
    assert [r["caption"] for r in matched[p07]] == ["H&E patch 7 of slideB", "a second caption of patch 7"]
    for index, its_rows in matched.items():
        assert all(r["file"] == store.records[index]["file"] for r in its_rows)
    rule = ClassRule()
    assert [rule.label(r) for r in matched[p07]] == [3, 3]


def test_mismatches_are_refused_or_skipped_when_asked(dataset, tmp_path, capsys):
    folder, table = dataset
    extra = tmp_path / "more.csv"
    extra.write_text(table.read_text() + "p99,no such image,0,slideA\n")
    with pytest.raises(DataError, match=r"1 rows name no image .*'p99'.*--skip-unmatched"):
        prepare_captioned(folder, extra, tmp_path / "a", patch=32, progress=False)
    assert not (tmp_path / "a").exists()
    fewer = tmp_path / "fewer.csv"
    fewer.write_text("".join(table.read_text().splitlines(keepends=True)[:-3]))  # p08, p09 and the second p07 row gone
    with pytest.raises(DataError, match=r"2 images have no caption \('slideB/p08.png', 'slideB/p09.png'\)"):
        prepare_captioned(folder, fewer, tmp_path / "a", patch=32, progress=False)
    store = prepare_captioned(folder, fewer, tmp_path / "b", patch=32, skip_unmatched=True, progress=False)
    assert len(store) == 8 and "2 images without a caption" in capsys.readouterr().err
    with pytest.raises(DataError, match=r"smaller than --patch 48.*--allow-upsampling"):
        prepare_captioned(folder, table, tmp_path / "c", patch=48, progress=False)
    assert len(prepare_captioned(folder, table, tmp_path / "c", patch=48, allow_upsampling=True, progress=False)) == 10
    with pytest.raises(DataError, match=r"no column 'text'.*--caption-column"):
        prepare_captioned(folder, table, tmp_path / "d", patch=32, caption_column="text", progress=False)
    with pytest.raises(OutputExistsError):
        prepare_captioned(folder, table, tmp_path / "b", patch=32, progress=False)


def test_cli_prepares_a_store_that_text_training_reads(dataset, tmp_path):
    from test_latent_diffusion import _vq, ldm_recipe

    from histosynth.training.pathldm import train_latent

    folder, table = dataset
    res = CliRunner().invoke(main, ["prepare", "captioned", str(folder), "--captions", str(table), "--out",
                                    str(tmp_path / "store"), "--patch", "32", "--magnification", "10x",
                                    "--label-column", "class"])
    assert res.exit_code == 0, res.output
    assert "10 patches of 32 px at 10x (10 train, 0 test) and 11 captions" in res.output
    _vq().save_pretrained(tmp_path / "vq")
    result = train_latent(ldm_recipe(tmp_path / "vq", steps=2), tmp_path / "store", tmp_path / "run", progress=False)
    assert result.step == 2 and np.isfinite(result.last_loss)
    rows = [json.loads(r) for r in (tmp_path / "run" / "losses.jsonl").read_text().splitlines()]
    assert len(rows) == 2
