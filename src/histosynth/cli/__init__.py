"""The `histosynth` command line: each command is a thin call into the library.

Every command lives in a module of this package as a plain click command or group; this file defines the
``main`` group (and the ``evaluate`` group, whose commands come from several modules) and attaches every
command with ``add_command``:

================================== ============================================================
module                             commands
================================== ============================================================
:mod:`~.quickstart`                ``quickstart``
:mod:`~.prepare`                   ``prepare nuclei | regions | slides``
:mod:`~.tile_sets`                 ``prepare tile-sets``
:mod:`~.train`                     ``train``
:mod:`~.sample`                    ``sample``
:mod:`~.evaluate_distribution`     ``evaluate fid | kid | is``
:mod:`~.evaluate_controllability`  ``evaluate mask-adherence | counts | sweep | report``
:mod:`~.evaluate_downstream`       ``evaluate augment | cas``
:mod:`~.evaluate_mil`              ``evaluate mil``
:mod:`~.evaluate_reconstruction`   ``evaluate recon``
:mod:`~.evaluate_regions`          ``evaluate region-classifier | region-adherence``
:mod:`~.seg`                       ``seg train | evaluate | predict``
:mod:`~.captions`                  ``captions build | summarize``
:mod:`~.convert`                   ``convert autoencoder``
:mod:`~.embed`                     ``embed``
================================== ============================================================

Command modules import only click and histosynth's light modules at module level (heavy libraries such as
torch and diffusers inside the command functions), so ``histosynth --help`` stays fast. User errors
(HistosynthError) print one line naming the file and exit with status 2, no traceback
(:func:`histosynth.cli.common.user_errors`). ``python -m histosynth.cli`` (and ``accelerate launch -m
histosynth.cli``) runs :func:`main`.
"""

from __future__ import annotations

import click

from histosynth.cli import (
    captions,
    convert,
    embed,
    evaluate_controllability,
    evaluate_distribution,
    evaluate_downstream,
    evaluate_mil,
    evaluate_reconstruction,
    evaluate_regions,
    prepare,
    quickstart,
    sample,
    seg,
    tile_sets,
    train,
)

__all__ = ["main", "evaluate"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="histosynth")
def main():
    """Labelled H&E image synthesis with diffusion models."""


@click.group()
def evaluate():
    """Evaluate generated images."""


for _command in (
    *evaluate_distribution.COMMANDS,
    *evaluate_controllability.COMMANDS,
    *evaluate_downstream.COMMANDS,
    *evaluate_mil.COMMANDS,
    *evaluate_reconstruction.COMMANDS,
    *evaluate_regions.COMMANDS,
):
    evaluate.add_command(_command)
del _command

main.add_command(quickstart.quickstart)
prepare.prepare.add_command(tile_sets.tile_sets_cmd)  # `prepare tile-sets` (DISC Sec. 2.2)
main.add_command(prepare.prepare)
main.add_command(train.train)
main.add_command(sample.sample)
main.add_command(evaluate)
main.add_command(seg.seg)
main.add_command(captions.captions)
main.add_command(convert.convert)
main.add_command(embed.embed)
