"""What every command module of the CLI shares."""

from __future__ import annotations

import functools
import re
import sys
import typing

import click

from histosynth.errors import HistosynthError
from histosynth.recipes.base import SchedulerName

__all__ = ["SCHEDULER_NAMES", "cli_message", "user_errors"]

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
