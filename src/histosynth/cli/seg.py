"""`histosynth seg train | predict | evaluate`: the nuclei segmenter used as an evaluation instrument.

The group :data:`seg` is attached to the ``histosynth`` command in :mod:`histosynth.cli`. Thin calls into
:mod:`histosynth.evaluate.segmenter`. ``seg train`` trains on the train split of a labelled
store; ``seg evaluate`` scores it on a split (Dice, AJI, PQ, mPQ, PQ per type: the ceiling every number measured
with it is read against); ``seg predict`` writes instance and type maps for a store, a folder of images or a
``histosynth sample`` output. User errors print one line naming the file and exit with status 2.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import click
import numpy as np

from histosynth.atomic import atomic_folder, refuse_existing
from histosynth.cli.common import device_option, overwrite_option, result_out_option, seed_option, torch_device, user_errors
from histosynth.errors import HistosynthError

__all__ = ["seg", "predict_to_folder"]


#: recipe fields and the `seg train` options that set them
_TRAIN_OPTIONS = {"recipe 'segmenter': ": "", "train.steps": "--steps", "train.batch_size": "--batch-size",
                  "train.learning_rate": "--lr", "train.crop": "--crop"}


@click.group()
def seg():
    """Train, apply and score the nuclei instance + type segmenter."""


@seg.command("train")
@click.option("--data", required=True, type=click.Path(path_type=Path), help="A labelled patch store (its train split).")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Run directory; the trained segmenter is OUT/segmenter (`--model OUT` reads it).")
@click.option("--steps", default=1500, show_default=True, help="Optimisation steps.")
@click.option("--batch-size", default=8, show_default=True)
@click.option("--lr", default=1e-3, show_default=True, help="Peak learning rate (warm-up, then cosine decay).")
@click.option("--crop", default=128, show_default=True, help="Random crop size (multiple of 32, <= patch size).")
@seed_option()
@click.option("--no-imagenet", is_flag=True, help="Start the encoder from random weights, not ImageNet EfficientNet-Lite0.")
@device_option("cpu, or cuda (default: cuda if available).")
@click.option("--resume", is_flag=True, help="Continue the run in OUT from its latest checkpoint (same options).")
@overwrite_option("Replace an existing run in OUT.")
@user_errors
def train_cmd(data, out, steps, batch_size, lr, crop, seed, no_imagenet, device, resume, overwrite):
    """Train a segmenter on the train split of DATA into run directory OUT (checkpoints, losses, loss.png, segmenter/).

    The same as `histosynth train segmenter --recipe segmenter` with these options in the recipe.
    """
    from histosynth.evaluate.segmenter import segmenter_recipe, train_segmenter

    try:
        recipe = segmenter_recipe(steps=steps, batch_size=batch_size, lr=lr, crop=crop, seed=seed,
                                  imagenet_encoder=not no_imagenet)
    except HistosynthError as exc:  # say it with the options the user typed
        message = exc.message
        for field, option in _TRAIN_OPTIONS.items():
            message = message.replace(field, option)
        raise HistosynthError(message) from None
    train_segmenter(data, out, recipe=recipe, resume=resume, overwrite=overwrite, device=torch_device(device))
    click.echo(f"wrote {out}/segmenter (config.json, diffusion_pytorch_model.safetensors, segmenter.json); "
               f"losses in {out}/losses.jsonl and {out}/loss.png")


@seg.command("evaluate")
@click.option("--model", required=True, type=click.Path(path_type=Path), help="A folder written by `seg train`.")
@click.option("--data", required=True, type=click.Path(path_type=Path), help="A labelled patch store.")
@click.option("--split", default="test", show_default=True)
@result_out_option("Also write the scores to this JSON file.")
@click.option("--batch-size", default=8, show_default=True)
@device_option()
@overwrite_option()
@user_errors
def evaluate_cmd(model, data, split, out, batch_size, device, overwrite):
    """Score the segmenter on a split of DATA: Dice, AJI, PQ+, mPQ+ and PQ per type (CoNIC conventions)."""
    from histosynth.evaluate.segmenter import evaluate_segmenter, load_segmenter

    if out is not None:
        refuse_existing(out, overwrite)
    scores = evaluate_segmenter(load_segmenter(model, torch_device(device), batch_size=batch_size), data, split, progress=True)
    scores = {"segmenter": str(model), "data": str(data), **scores}
    text = json.dumps(scores, indent=2)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(text + "\n", encoding="utf-8")
        os.replace(tmp, out)
    click.echo(text)


def predict_to_folder(segmenter, source: Path, out: Path, *, split: str | None = None, batch_size: int = 8,
                      overwrite: bool = False, progress: bool = True) -> int:
    """Segment every image of ``source`` (store split, image folder, or sample output) into ``out``.

    Writes ``instances/NAME.png`` (uint16 instance ids), ``types/NAME.png`` (uint8 type ids), ``overview.png``
    (first 8 images over their coloured predictions) and ``predictions.jsonl`` (name and nuclei per type). The
    folder is built under a hidden name and renamed when complete. Returns the number of images.
    """
    import sys

    from PIL import Image
    from skimage.segmentation import find_boundaries
    from tqdm.auto import tqdm

    from histosynth.data.images import is_store, list_images, load_image, open_store_split
    from histosynth.evaluate.fid import resolve_generated
    from histosynth.viz import colour_mask, save_grid

    refuse_existing(out, overwrite)
    source = Path(source)
    if (source / "samples.jsonl").is_file():
        source = resolve_generated(source)
    if is_store(source):
        store, idx = open_store_split(source, split)
        items = [(f"{i:06d}", lambda i=i: np.asarray(store[i]["image"])) for i in idx]
    else:
        files = list_images(source, split)
        items = [(p.stem, lambda p=p: load_image(p)) for p in files]
    if not items:
        from histosynth.errors import DataError

        raise DataError("no images to segment", source)
    names = segmenter.class_names
    overview = []
    with atomic_folder(out) as partial:
        (partial / "instances").mkdir()
        (partial / "types").mkdir()
        with open(partial / "predictions.jsonl", "w", encoding="utf-8") as manifest:
            for start in tqdm(range(0, len(items), batch_size), desc="segment", unit="batch", disable=not progress,
                              file=sys.stderr):
                chunk = items[start : start + batch_size]
                images = [load() for _, load in chunk]
                # images of different sizes are segmented one by one
                same = all(im.shape == images[0].shape for im in images)
                preds = [segmenter.predict(np.stack(images))] if same else [segmenter.predict(im[None]) for im in images]
                insts = [m for p in preds for m in p[0]]
                types = [m for p in preds for m in p[1]]
                for (name, _), image, inst, typ in zip(chunk, images, insts, types):
                    Image.fromarray(inst.astype(np.uint16)).save(partial / "instances" / f"{name}.png")
                    Image.fromarray(typ.astype(np.uint8)).save(partial / "types" / f"{name}.png")
                    ids, first = np.unique(inst, return_index=True)
                    inst_types = typ.ravel()[first[ids > 0]]
                    counts = {n: int((inst_types == k).sum()) for k, n in enumerate(names, start=1)}
                    manifest.write(json.dumps({"name": name, "nuclei": int((ids > 0).sum()), "counts": counts}) + "\n")
                    if len(overview) < 8:
                        overview.append((image, colour_mask(typ, find_boundaries(inst, mode="inner"))))
        if overview and all(a.shape == overview[0][0].shape for a, _ in overview):
            save_grid([[a for a, _ in overview], [b for _, b in overview]], partial / "overview.png")
    return len(items)


@seg.command("predict")
@click.option("--model", required=True, type=click.Path(path_type=Path), help="A folder written by `seg train`.")
@click.option("--images", required=True, type=click.Path(path_type=Path),
              help="A patch store, a folder of images, or a `histosynth sample` output.")
@click.option("--split", default=None, help="Store split or sub-folder of --images.")
@click.option("--out", required=True, type=click.Path(path_type=Path))
@click.option("--batch-size", default=8, show_default=True)
@device_option()
@overwrite_option()
@user_errors
def predict_cmd(model, images, split, out, batch_size, device, overwrite):
    """Write instance and type maps (PNG) for every image, with per-image nuclei counts and an overview PNG."""
    from histosynth.evaluate.segmenter import load_segmenter

    n = predict_to_folder(load_segmenter(model, torch_device(device), batch_size=batch_size), images, out, split=split,
                          batch_size=batch_size, overwrite=overwrite)
    click.echo(f"wrote {out}: {n} images (instances/, types/, predictions.jsonl, overview.png)")
