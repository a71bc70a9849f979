"""What every command module of the CLI shares."""

from __future__ import annotations

import functools
import re
import sys
import typing
from pathlib import Path

import click

from histosynth.errors import HistosynthError
from histosynth.recipes.base import SchedulerName

__all__ = [
    "SCHEDULER_NAMES", "balance_option", "cli_message", "device_option", "option_group", "overwrite_option", "seed_option", "torch_device",
    "user_errors",
]

SCHEDULER_NAMES = typing.get_args(SchedulerName)  # `--scheduler` choices (histosynth.diffusion.schedulers)

# library messages name both interfaces, e.g. "pass --overwrite (overwrite=True)" or "(e.g. 20x; source_magnification=)";
# on the command line only the option is typable
_KEYWORD_ALONE = re.compile(r" \([a-z_][a-z0-9_]*=(?:True|False)?\)")
_KEYWORD_LAST = re.compile(r";\s*[a-z_][a-z0-9_]*=\)")
_KEYWORD_THEN_OPTION = re.compile(r"\b[a-z][a-z0-9]*_[a-z0-9_]+ \((--[a-z0-9-]+)\)")  # "num_inference_steps (--steps)"


def cli_message(text: str) -> str:
    """An error message in the command line's words: the Python keyword forms it also names are dropped."""
    return _KEYWORD_THEN_OPTION.sub(r"\1", _KEYWORD_LAST.sub(")", _KEYWORD_ALONE.sub("", text)))


def user_errors(fn):
    """Turn a HistosynthError (bad user input) into one line on stderr and exit status 2, without a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except HistosynthError as exc:
            click.echo(f"error: {cli_message(str(exc))}", err=True)
            sys.exit(2)

    return wrapper


# ------------------------------------------------------------------------ options many commands take
def option_group(*options):
    """Apply click options so that --help lists them in the order given (options several commands share)."""

    def deco(fn):
        for option in reversed(options):
            fn = option(fn)
        return fn

    return deco


def overwrite_option(help: str = "Replace existing outputs."):
    """``--overwrite``: without it, no command replaces what is already there."""
    return click.option("--overwrite", is_flag=True, help=help)


def seed_option(help: str | None = None):
    """``--seed`` (default 0): every random draw of the command follows from it."""
    return click.option("--seed", default=0, show_default=True, help=help)


def balance_option():
    """``--balance``: DISC's real/synthetic weight λ (eq. 4), or several comma-separated to sweep it."""
    return click.option("--balance", default="0", show_default=True,
                        help="λ of DISC eq. 4, L = (1-λ)·L_real + λ·L_synth; several comma-separated (e.g. 0,0.3,0.6,0.9) "
                             "train one model each.")


def result_out_option(help: str = "Also write the result to this JSON file."):
    """``--out`` of a command that prints its result (default None: print only); it writes the full result there."""
    return click.option("--out", type=click.Path(path_type=Path), default=None, help=help)


def device_option(help: str = "torch device: cpu, cuda, cuda:1 (default: cuda if available, else cpu)."):
    """``--device`` (default None: :func:`torch_device` chooses)."""
    return click.option("--device", default=None, help=help)


def torch_device(device: str | None) -> str:
    """``--device`` as given, else ``cuda`` when torch sees a GPU, else ``cpu``."""
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")
