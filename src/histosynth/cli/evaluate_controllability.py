"""`histosynth evaluate` commands for controllability, sweeps and the report.

The commands of :data:`COMMANDS` are attached to the ``evaluate`` group in :mod:`histosynth.cli`. Each is a thin
call into
:mod:`histosynth.evaluate.controllability`, :mod:`~histosynth.evaluate.sweep` and
:mod:`~histosynth.evaluate.report`; user errors print one line naming the file and exit with status 2.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from histosynth.cli.common import SCHEDULER_NAMES, device_option, overwrite_option, result_out_option, seed_option, torch_device, user_errors

__all__ = ["COMMANDS", "mask_adherence_cmd", "counts_cmd", "sweep_cmd", "report_cmd"]


def _load_segmenter(path: Path, device: str | None):
    from histosynth.evaluate.segmenter import load_segmenter

    seg = load_segmenter(path, device=torch_device(device))
    if not getattr(seg, "path", None):
        try:  # reports name the segmenter by its path
            seg.path = str(path)
        except AttributeError:
            pass
    return seg


def _dump(data) -> str:
    return json.dumps(data, indent=2, default=str)


_generated = click.option("--generated", required=True, type=click.Path(path_type=Path),
                          help="A `histosynth sample` output directory: NASDM (samples.jsonl, images/, labels/, "
                               "real/) or HistoSmith (samples.jsonl with requested counts, images/, folder/).")
_segmenter = click.option("--segmenter", required=True, type=click.Path(path_type=Path),
                          help="A trained nuclei segmenter (see histosynth.evaluate.segmenter).")
_batch = click.option("--batch-size", default=16, show_default=True, help="Images per segmenter call.")


@click.command("mask-adherence")
@_generated
@_segmenter
@result_out_option("Also write the metrics to this JSON file.")
@click.option("--real", type=click.Path(path_type=Path), default=None,
              help="A labelled patch store: the segmenter's own scores on its real --real-split patches (its ceiling), "
                   "next to the generated numbers.")
@click.option("--real-split", default="test", show_default=True, type=click.Choice(["train", "test"]),
              help="The split of --real.")
@_batch
@device_option()
@user_errors
def mask_adherence_cmd(generated, segmenter, out, real, real_split, batch_size, device):
    """Dice, AJI, PQ, mPQ+ of the segmented generated images against their label maps: NASDM's conditioning
    masks (with the same segmenter on the real patches of those masks, the reference), or HistoSmith's labels
    generated with the image (label-image consistency; no reference row). --real adds the segmenter's ceiling
    on real test patches."""
    from histosynth.evaluate.controllability import mask_adherence

    result = mask_adherence(generated, _load_segmenter(segmenter, device), batch_size=batch_size, real=real,
                            real_split=real_split)
    text = _dump(result)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n", encoding="utf-8")
    click.echo(text)


@click.command("counts")
@_generated
@_segmenter
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Directory for counts.json, counts.csv and the Bland–Altman / scatter PNGs.")
@click.option("--training-range", type=click.Path(path_type=Path), default=None,
              help="HistoSmith samples: split the requests into inside vs beyond the training range, taken from a "
                   "labelled store (min..max per type over its train split) or a HistoSmith run / pipeline.")
@_batch
@device_option()
@user_errors
def counts_cmd(generated, segmenter, out, training_range, batch_size, device):
    """Requested vs generated nuclei counts per type: Pearson r, Bland–Altman agreement and plots.

    NASDM samples: nuclei of the conditioning masks vs found by the segmenter in the generated image.
    HistoSmith samples: requested counts vs realised in the generated labels and found by the segmenter."""
    from histosynth.evaluate.controllability import count_agreement

    result = count_agreement(generated, _load_segmenter(segmenter, device), out, batch_size=batch_size,
                             training_range=training_range)
    if result.get("conditioning") == "counts":
        keys = ("per_type", "per_type_labels", "labels_vs_segmenter", "training_range", "by_range")
        click.echo(_dump({k: result[k] for k in keys}))
        click.echo(f"wrote {out}: counts.json, counts.csv, counts_scatter.png, bland_altman_<type>.png "
                   "(segmenter), bland_altman_labels_<type>.png"
                   + (", bland_altman_by_range.png" if result["by_range"] else ""))
        return
    click.echo(_dump({"per_type": result["per_type"], "reference": result["reference"]}))
    click.echo(f"wrote {out}: counts.json, counts.csv, counts_scatter.png, bland_altman_<type>.png")


@click.command("sweep")
@click.option("--model", required=True, type=click.Path(path_type=Path), help="A training run or a saved pipeline.")
@click.option("--masks", required=True, type=click.Path(path_type=Path),
              help="Patch store whose masks condition the samples (its real patches are the FD/KID reference).")
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "test", "all"]))
@click.option("--param", default="guidance", show_default=True, help="What to sweep: guidance or steps.")
@click.option("--values", default="0,0.5,1,1.5,2,3", show_default=True, help="Comma-separated values of --param.")
@click.option("--num", default=16, show_default=True, help="Masks sampled per value (the same masks for every value).")
@click.option("--steps", type=int, default=None,
              help="Denoising steps (when sweeping guidance). Default: the model's own, as `histosynth sample` (NASDM: 20).")
@click.option("--guidance", type=float, default=None,
              help="Guidance scale g (when sweeping steps; NASDM's s = g − 1). Default: the model's own (NASDM: 2.0).")
@click.option("--scheduler", "--sampler", "scheduler", default=None, type=click.Choice(list(SCHEDULER_NAMES)),
              help="Sampling scheduler (default: the model's own, NASDM's DDPM; see `histosynth sample --help`).")
@seed_option()
@click.option("--features", default="effnet-lite0", show_default=True, type=click.Choice(["inception", "effnet-lite0"]))
@click.option("--segmenter", type=click.Path(path_type=Path), default=None, help="Also measure mask adherence.")
@click.option("--batch-size", default=16, show_default=True)
@device_option()
@click.option("--out", required=True, type=click.Path(path_type=Path))
@overwrite_option()
@user_errors
def sweep_cmd(model, masks, split, param, values, num, steps, guidance, scheduler, seed, features, segmenter, batch_size,
              device, out, overwrite):
    """Sample the same masks at several guidance scales (or step counts) and measure each (NASDM Fig. 2)."""
    from histosynth.evaluate.sweep import guidance_sweep, parse_values

    values = parse_values(values, param)  # check the flags before loading anything
    seg = _load_segmenter(segmenter, device) if segmenter else None
    rows = guidance_sweep(model, masks, out, values, param, num=num, steps=steps, guidance=guidance, scheduler=scheduler,
                          seed=seed, split=None if split == "all" else split, features=features, segmenter=seg,
                          overwrite=overwrite, batch_size=batch_size, device=torch_device(device))
    keys = [param, "fid", "kid_mean", "nuclei_contrast_generated", "mpq"]
    for r in rows:
        click.echo("  ".join(f"{k}={r[k]:.4g}" for k in keys if isinstance(r.get(k), (int, float))))
    click.echo(f"wrote {out}: sweep.json, sweep.png and one sample directory per value")


@click.command("report")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="The Markdown report to write.")
@user_errors
def report_cmd(inputs, out):
    """One Markdown report of the runs, sample / sweep directories and metric JSON files given."""
    from histosynth.evaluate.report import build_report

    path = build_report(list(inputs), out)
    click.echo(f"wrote {path} (figures in {path.parent / (path.stem + '_files')})")


#: the commands of this module, attached to the ``evaluate`` group in :mod:`histosynth.cli`
COMMANDS = (mask_adherence_cmd, counts_cmd, sweep_cmd, report_cmd)
