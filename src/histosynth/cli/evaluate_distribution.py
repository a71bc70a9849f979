"""`histosynth evaluate fid | kid | is | fid-per-magnification`: distribution metrics on the command line.

The commands of :data:`COMMANDS` are attached to the ``evaluate`` group in :mod:`histosynth.cli`. Each is a thin
call into
:func:`histosynth.evaluate.fid.evaluate_distribution` and prints the metrics as JSON on stdout (progress and what
was loaded go to stderr). User errors raise :class:`~histosynth.errors.HistosynthError` (the CLI's wrapper prints
one line naming the file and exits with status 2).

Sources: ``--real`` is a patch store or a folder of images (``--split``: the store's split or a sub-folder);
``--generated`` is the same or a ``histosynth sample`` output directory (recognised by its ``samples.jsonl``; its
``images/`` are read). ``--real-stats FILE`` replaces ``--real`` by statistics saved earlier with
``--save-stats FILE`` (same ``--features``, else refused); ``fid`` / ``kid`` with ``--save-stats`` and no
``--generated`` only write the statistics. See ``docs/evaluation.md`` for the protocols.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from histosynth.atomic import refuse_existing
from histosynth.cli.common import device_option, option_group, overwrite_option, result_out_option, torch_device, user_errors
from histosynth.errors import HistosynthError

__all__ = ["COMMANDS", "fid", "fid_per_magnification", "kid", "is_"]


# ------------------------------------------------------------------------------------------------ options
_real = option_group(
    click.option("--real", type=click.Path(path_type=Path), default=None,
                 help="Real images: a patch store or a folder of images."),
    click.option("--split", default=None, help="Split of --real (store split or sub-folder, e.g. test)."),
    click.option("--real-stats", type=click.Path(path_type=Path), default=None,
                 help="Statistics of the real images saved by --save-stats (instead of --real; no image is read)."),
    click.option("--save-stats", type=click.Path(path_type=Path), default=None,
                 help="Write the statistics of the --real images to this .npz file (for --real-stats)."),
)


def _generated(required: bool):
    return option_group(
        click.option("--generated", type=click.Path(path_type=Path), required=required, default=None,
                     help="Generated images: a `histosynth sample` output (its images/), a folder or a store."),
        click.option("--generated-split", default=None, help="Split of --generated (store split or sub-folder)."),
    )


_common = option_group(
    click.option("--features", default="inception", show_default=True,
                 help="inception (standard; downloads its weights unless --inception-weights), effnet-lite0 "
                      "(offline) or the PATH of a local encoder: a TorchScript file, a folder with config.json + "
                      "model.safetensors / pytorch_model.bin (timm), or a weight file with --features-arch."),
    click.option("--features-weights", "--inception-weights", "features_weights", default=None,
                 type=click.Path(path_type=Path), help="Local weight file for inception / effnet-lite0 (no download)."),
    click.option("--features-arch", default=None,
                 help="timm architecture of a --features weight file (e.g. vit_large_patch16_224)."),
    click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1)),
    device_option(),
    result_out_option("Also write the metrics to this JSON file."),
    overwrite_option("Replace an existing --out / --save-stats file."),
)


# ------------------------------------------------------------------------------------------------ helpers
def _check_out(out: Path | None, overwrite: bool) -> None:
    if out is not None:
        refuse_existing(out, overwrite, "file")


def _check_real(real, real_stats, save_stats, generated) -> None:
    if real is not None and real_stats is not None:
        raise HistosynthError("give --real (images) or --real-stats (their saved statistics), not both")
    if real is None and real_stats is None:
        raise HistosynthError("missing --real (real images) or --real-stats (their saved statistics)")
    if save_stats is not None and real is None:
        raise HistosynthError("--save-stats writes the statistics of the --real images: it needs --real")
    if generated is None and save_stats is None:
        raise HistosynthError("missing --generated (or --save-stats to only write the real statistics)")


def _load_extractor(features: str, weights: Path | None, arch: str | None, device: str):
    from histosynth.evaluate.features import load_feature_extractor

    extractor = load_feature_extractor(features, weights_path=weights, device=device, architecture=arch)
    report = getattr(extractor, "load_report", None)
    if report is not None:
        click.echo(f"features: {report.summary()}", err=True)
    return extractor


def _run(metrics, *, real, split, generated, generated_split, features, features_weights, features_arch,
         real_stats, save_stats, batch_size, device, out, overwrite, **kwargs) -> dict:
    from histosynth.evaluate.fid import evaluate_distribution

    _check_out(out, overwrite)
    _check_out(save_stats, overwrite)
    dev = torch_device(device)
    extractor = _load_extractor(features, features_weights, features_arch, dev)
    if "is" in metrics and not extractor.provides_inception_score:
        raise HistosynthError(f"the Inception Score needs Inception logits; --features {features} has none "
                              "(use --features inception)")
    result = evaluate_distribution(
        real, generated, features=extractor, split=split, batch_size=batch_size, device=dev,
        generated_split=generated_split, real_stats=real_stats, save_stats=save_stats, overwrite=overwrite,
        metrics=metrics, **kwargs,
    )
    report = getattr(extractor, "load_report", None)
    if report is not None:
        result["features_loaded"] = report.as_dict()
    text = json.dumps(result, indent=2, default=str)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    click.echo(text)
    return result


# ----------------------------------------------------------------------------------------------- commands
@click.command("fid")
@_real
@_generated(required=False)
@_common
@user_errors
def fid(real, split, real_stats, save_stats, generated, generated_split, **options):
    """Fréchet distance between the features of real and generated images (FID with --features inception)."""
    _check_real(real, real_stats, save_stats, generated)
    _run(("fid",), real=real, split=split, real_stats=real_stats, save_stats=save_stats, generated=generated,
         generated_split=generated_split, **options)


@click.command("kid")
@_real
@_generated(required=False)
@_common
@click.option("--kid-subsets", default=100, show_default=True, type=click.IntRange(min=1), help="Number of subsets.")
@click.option("--kid-subset-size", default=None, type=click.IntRange(min=2),
              help="Images per subset  [default: min(1000, n_real, n_generated)]")
@user_errors
def kid(real, split, real_stats, save_stats, generated, generated_split, kid_subsets, kid_subset_size, **options):
    """Kernel Inception Distance (unbiased MMD², cubic kernel): mean and std over random subsets."""
    _check_real(real, real_stats, save_stats, generated)
    _run(("kid",), real=real, split=split, real_stats=real_stats, save_stats=save_stats, generated=generated,
         generated_split=generated_split, kid_subsets=kid_subsets, kid_subset_size=kid_subset_size, **options)


@click.command("is")
@_generated(required=True)
@_common
@click.option("--splits", default=10, show_default=True, type=click.IntRange(min=1),
              help="Inception Score splits (fewer if there are fewer images).")
@user_errors
def is_(generated, generated_split, splits, **options):
    """Inception Score of the generated images (Inception logits only: not comparable across classifiers)."""
    _run(("is",), real=None, split=None, real_stats=None, save_stats=None, generated=generated,
         generated_split=generated_split, is_splits=splits, **options)


@click.command("fid-per-magnification")
@click.option("--real", type=click.Path(path_type=Path), required=True,
              help="A multi-magnification store (`prepare slides --magnifications`).")
@click.option("--split", default=None, help="Split of --real (default: all its patches).")
@click.option("--generated", type=click.Path(path_type=Path), required=True,
              help="A ZoomLDM `histosynth sample` output (samples.jsonl names each image's magnification).")
@click.option("--max-real", default=None, type=click.IntRange(min=2), help="At most this many real patches per level.")
@_common
@user_errors
def fid_per_magnification(real, split, generated, max_real, features, features_weights, features_arch, batch_size,
                          device, out, overwrite):
    """Fréchet distance of generated vs real patches at each magnification (ZoomLDM's Table 1), with the numbers of
    images compared (small sets bias FD upwards: compare runs at equal numbers)."""
    from histosynth.evaluate.per_magnification import fd_per_magnification

    _check_out(out, overwrite)
    extractor = _load_extractor(features, features_weights, features_arch, torch_device(device))
    result = {"features": features, "per_magnification": fd_per_magnification(
        generated, real, extractor, split=split, max_real=max_real, batch_size=batch_size)}
    text = json.dumps(result, indent=2)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    click.echo(text)


#: the commands of this module, attached to the ``evaluate`` group in :mod:`histosynth.cli`
COMMANDS = (fid, kid, is_, fid_per_magnification)
