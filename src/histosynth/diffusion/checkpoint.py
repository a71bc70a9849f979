"""Atomic training checkpoints.

A checkpoint is a directory `RUN/checkpoints/step-NNNNNNN` holding accelerate's state (model weights in
safetensors, optimizer, LR scheduler, RNG states of every process), the EMA weights (safetensors) and
`trainer_state.json`. It is written under a temporary name and renamed into place, so a run killed at
any moment (SIGKILL included) leaves either the complete checkpoint or none.

A write that fails (:func:`writing`) removes its temporary directory; a full disk (or quota) becomes a
``DiskFullError`` naming the checkpoint and the space it needs (the size of the last complete one, or of the
tensors), and the earlier checkpoints are left as they were, so ``train --resume`` continues from the last
complete one once there is room. Exports written with :func:`write_atomically` are treated the same way.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from pathlib import Path

from histosynth.errors import DiskFullError, is_disk_full, tree_bytes

CHECKPOINTS = "checkpoints"


def checkpoint_dir(run: Path, step: int) -> Path:
    return run / CHECKPOINTS / f"step-{step:07d}"


def list_checkpoints(run: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories are ignored)."""
    root = run / CHECKPOINTS
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step-*") if (p / "trainer_state.json").is_file()]
    return sorted(done, key=checkpoint_step)


def checkpoint_step(checkpoint: Path) -> int:
    """The optimisation step of a checkpoint directory (step-NNNNNNN)."""
    return int(checkpoint.name.split("-")[1])


def latest_checkpoint(run: Path) -> Path | None:
    ckpts = list_checkpoints(run)
    return ckpts[-1] if ckpts else None


def temporary_dir(final: Path) -> Path:
    """Where `final` is written before it is renamed into place (same name in every process of a run)."""
    return final.parent / f".tmp-{final.name}"


def write_atomically(final: Path, write, what: str | None = None) -> Path:
    """Call `write(tmp_dir)` then move tmp_dir to `final`; leftovers of a crashed write are removed, and a write
    that fails removes tmp_dir (a full disk: DiskFullError naming `final` and about the size of the `final` it
    replaces, or at least what was written)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_dir(final)
    if tmp.exists():
        shutil.rmtree(tmp)
    previous = tree_bytes(final) if final.exists() else None
    with writing(tmp, final, what or final.name, needed=lambda: previous):
        write(tmp)
        return finalize(tmp, final)


@contextmanager
def writing(tmp: Path, final: Path, what: str, needed: Callable[[], int | None] | None = None,
            then: str = "free some space there (or write elsewhere) and run it again") -> Iterator[Path]:
    """Guard the block that fills `tmp` (and renames it to `final`): when it fails, `tmp` is removed; when it
    failed for a full disk, DiskFullError names `final`, the space it needs (``needed()``; None: at least what
    `tmp` had reached) and what to do (``then``)."""
    try:
        yield tmp
    except DiskFullError:  # said already, by an inner writer
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except Exception as exc:
        need = needed() if needed is not None else None
        full = is_disk_full(exc, tmp if tmp.exists() else final.parent, need)
        reached = tree_bytes(tmp) if full else 0
        shutil.rmtree(tmp, ignore_errors=True)
        if not full:
            raise
        if need is None or need < reached:
            raise DiskFullError(final, what, reached or None, at_least=True, then=then) from None
        raise DiskFullError(final, what, need, then=then) from None
    except BaseException:  # Ctrl-C and the like: nothing half-written stays behind either
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def checkpoint_bytes(run: Path, state_bytes: Callable[[], int]) -> int:
    """About the size of the next checkpoint of `run`: its last complete one, or ``state_bytes()`` (the tensors)."""
    last = latest_checkpoint(run)
    return tree_bytes(last) if last is not None else state_bytes()


def finalize(tmp: Path, final: Path) -> Path:
    """Flush `tmp` to disk and rename it to `final` (replacing an older `final` if there is one)."""
    _fsync_tree(tmp)
    if final.exists():  # replacing (e.g. the exported pipeline): move the old one aside first
        old = final.parent / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)
    return final


def read_trainer_state(ckpt: Path) -> dict:
    return json.loads((ckpt / "trainer_state.json").read_text())


def prune_checkpoints(run: Path, keep: int, also_keep: Collection[Path] = ()) -> None:
    """Delete all but the newest ``keep`` checkpoints (none when keep <= 0) and those in ``also_keep``, and the
    debris of killed writes."""
    for old in list_checkpoints(run)[:-keep] if keep > 0 else []:
        if old not in also_keep:
            shutil.rmtree(old, ignore_errors=True)
    for tmp in (run / CHECKPOINTS).glob(".tmp-*"):  # debris of killed runs
        shutil.rmtree(tmp, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
