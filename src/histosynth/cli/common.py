"""What every command module of the CLI shares."""

from __future__ import annotations

import functools
import sys

import click

from histosynth.errors import HistosynthError

__all__ = ["user_errors"]


def user_errors(fn):
    """Turn a HistosynthError (bad user input) into one line on stderr and exit status 2, without a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except HistosynthError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)

    return wrapper
