"""Atomic training checkpoints.

A checkpoint is a directory `RUN/checkpoints/step-NNNNNNN` holding accelerate's state (model weights in
safetensors, optimizer, LR scheduler, RNG states of every process), the EMA weights (safetensors) and
`trainer_state.json`. It is written under a temporary name and renamed into place, so a run killed at
any moment (SIGKILL included) leaves either the complete checkpoint or none.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

CHECKPOINTS = "checkpoints"


def checkpoint_dir(run: Path, step: int) -> Path:
    return run / CHECKPOINTS / f"step-{step:07d}"


def list_checkpoints(run: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories are ignored)."""
    root = run / CHECKPOINTS
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step-*") if (p / "trainer_state.json").is_file()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(run: Path) -> Path | None:
    ckpts = list_checkpoints(run)
    return ckpts[-1] if ckpts else None


def temporary_dir(final: Path) -> Path:
    """Where `final` is written before it is renamed into place (same name in every process of a run)."""
    return final.parent / f".tmp-{final.name}"


def write_atomically(final: Path, write) -> Path:
    """Call `write(tmp_dir)` then move tmp_dir to `final`; leftovers of a crashed write are removed."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_dir(final)
    if tmp.exists():
        shutil.rmtree(tmp)
    write(tmp)
    return finalize(tmp, final)


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


def prune_checkpoints(run: Path, keep: int) -> None:
    for old in list_checkpoints(run)[:-keep] if keep > 0 else []:
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
