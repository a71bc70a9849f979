"""One writer of sampling output for every method: OUT/images/N.png, any per-image side files (masks, labels,
real patches), one manifest row per image (OUT/samples.jsonl), and OUT/grid.png.

Written atomically: everything goes to a hidden sibling folder that is renamed to OUT only when sampling ended
without an error, so OUT is either complete or absent. An existing non-empty OUT is replaced only with
``overwrite``.

Resumable and data-parallel (a sampler that passes ``settings`` and loops over ``writer.batches(...)``): the unit
of work is a batch of the sampler's fully precomputed work list, whose images depend only on its contents and
seeds. The hidden folder is ``.OUT.partial``, the same for every run of OUT; it holds the run's settings
(``.resume/settings.json``) and, per finished batch, its manifest rows (``.resume/batches/START.jsonl``, written
after the batch's files: a batch is done iff its rows are there). Under ``accelerate launch`` each process takes
its share of the batches not done yet; at the end the main process merges the rows in batch order into
samples.jsonl, draws grid.png from the panels saved per batch (``.resume/grid/``) and renames the folder to OUT,
so any number of processes, and any number of kills and reruns of the same command, write the same OUT as one
uninterrupted process. A rerun with other settings stops with an error naming the partial folder; with
``overwrite`` it discards that folder and starts again (a partial run of the same settings is continued either way:
it makes the same images). Nothing is fsynced: a killed process loses no finished batch, a machine that loses
power may.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from histosynth.atomic import atomic_folder
from histosynth.diffusion.runtime import active_deep_cache, precision_of
from histosynth.errors import DiskFullError, HistosynthError, OutputExistsError, is_disk_full, tree_bytes
from histosynth.viz import save_grid

MANIFEST = "samples.jsonl"
RESUME = ".resume"  # the bookkeeping of a resumable run, inside the partial folder (removed before the rename)
_NOT_SETTINGS = ("pipe", "out", "overwrite", "progress")


def prepare_output_dir(out: Path, overwrite: bool) -> None:
    """Create ``out``; an existing non-empty one is an error unless ``overwrite`` (then it is replaced)."""
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise OutputExistsError("output directory exists and is not empty; pass --overwrite to replace it", out)
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def partial_folder(out: str | Path) -> Path:
    """Where a resumable run of ``out`` writes until it is complete: ``.OUT.partial`` beside it."""
    out = Path(out)
    return out.parent / f".{out.name}.partial"


class _OneProcess:
    """The state of a process that is the only one (not started by ``accelerate launch``)."""

    process_index, num_processes, is_main_process = 0, 1, True

    def wait_for_everyone(self) -> None:
        pass


def process_state():
    """accelerate's ``PartialState`` of this process under ``accelerate launch`` / torchrun (CPU processes too:
    ``ACCELERATE_USE_CPU``, as the training engine's Accelerator reads it) or in a process that made one already;
    else the state of a lone process (accelerate's global state is left alone)."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    launched = any(int(os.environ.get(k, "1") or 1) > 1
                   for k in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"))
    if PartialState._shared_state or launched:
        return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    return _OneProcess()


def run_settings(pipe, arguments: dict) -> dict:
    """The settings a resumed run must share with the run it continues: a sampler's arguments (``locals()`` as its
    first statement; not ``pipe``, ``out``, ``overwrite``, ``progress``), the model (:func:`model_identity`), the
    denoiser's precision and the DeepCache interval in force (``sample --precision``, ``--deep-cache``:
    :mod:`histosynth.diffusion.runtime`)."""
    # each only when not the plain model's, so a partial run written before these settings existed still continues
    unet = getattr(pipe, "unet", None)
    precision, interval = precision_of(unet) if unet is not None else "fp32", active_deep_cache(unet)
    speed = {**({"precision": precision} if precision != "fp32" else {}),
             **({"deep_cache": interval} if interval != 1 else {})}
    return {"model": model_identity(pipe), **speed,
            **{k: _plain(v) for k, v in arguments.items() if k not in _NOT_SETTINGS}}


def model_identity(pipe) -> dict:
    """The model's class, folder and a digest of the folder's files."""
    path = getattr(pipe, "name_or_path", None)
    if not path or not Path(path).is_dir():
        return {"class": type(pipe).__name__, "path": None if path is None else str(path)}
    folder = Path(path).resolve()
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return {"class": type(pipe).__name__, "path": str(folder), "digest": _digest(files, folder)}


def _digest(files: list[Path], root: Path) -> str:
    """A digest of files by name, size and first and last MiB (retrained weights, an edited prompts file differ)."""
    digest = hashlib.sha256()
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.relative_to(root)}\0{size}\0".encode())
        with open(file, "rb") as f:
            digest.update(f.read(1 << 20))
            if size > 2 << 20:
                f.seek(-(1 << 20), os.SEEK_END)
                digest.update(f.read())
    return digest.hexdigest()[:16]


def _plain(value):
    """A JSON value standing for a setting (paths absolute, a file with its digest; objects by their type)."""
    if isinstance(value, Path):
        path = value.resolve()
        return f"{path} ({_digest([path], path.parent)})" if path.is_file() else str(path)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return f"<{type(value).__name__}>"


def _write_atomically(path: Path, write) -> None:
    """``write(file)`` into a temporary sibling renamed to ``path``: a kill leaves the old file or the new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)


class SampleWriter:
    """``with SampleWriter(out, overwrite, settings=run_settings(pipe, arguments)) as w:``, then
    ``for start in w.batches(range(0, N, batch_size)):`` and ``w.add(image, row, files={...}, grid=[...])`` for each
    image of the batch (in order). ``w.count`` is the global index of the next image (its name: ``f"{w.count:05d}"``).

    ``image``: uint8 (H, W, 3); ``files``: relative path (e.g. ``masks/00000.png``) → uint8/uint16 array saved
    as PNG; ``row``: the manifest fields of this image (its name and image path are added first); ``grid``: the
    panels of this image's grid row (default: the image alone, ``grid_columns`` images per row); ``in_grid`` False
    leaves the image out of grid.png (the grid shows the first ``grid_rows · grid_columns`` images in it).

    Without ``settings`` the writer is the plain one (one process, ``add`` without batches, nothing resumable).
    """

    def __init__(self, out: str | Path, overwrite: bool = False, *, grid_rows: int = 8, grid_columns: int = 1,
                 settings: dict | None = None):
        self.out, self.overwrite = Path(out), overwrite
        self.grid_rows, self.grid_columns = grid_rows, grid_columns
        self.settings = None if settings is None else json.loads(json.dumps(settings))
        self.count, self._panels = 0, []
        self._rows: list[dict] | None = None  # the rows of the batch being written (resumable)
        self._starts: list[int] | None = None

    @property
    def resumable(self) -> bool:
        return self.settings is not None

    @property
    def _capacity(self) -> int:
        return self.grid_rows * self.grid_columns

    # ------------------------------------------------------------------------------------------------ enter
    def __enter__(self) -> "SampleWriter":
        if self.out.exists() and any(self.out.iterdir()) and not self.overwrite:
            raise OutputExistsError("output directory exists and is not empty; pass --overwrite to replace it", self.out)
        self._state = process_state()
        if not self.resumable:
            if self._state.num_processes > 1:
                raise HistosynthError(f"this sampler writes {self.out} from one process: run it without `accelerate "
                                      "launch` (or with --num_processes 1)")
            self._folder = atomic_folder(self.out)
            self.root = self._folder.__enter__()
            (self.root / "images").mkdir()
            self._manifest = open(self.root / MANIFEST, "w")
            return self
        self.root = partial_folder(self.out)
        if self._state.is_main_process:
            self._open_partial()
        else:  # the main process's error, in every process (not a barrier broken by its exit)
            self._refuse_other_settings(self._saved_settings())
        self._state.wait_for_everyone()
        return self

    def _saved_settings(self) -> dict | None:
        try:
            return json.loads((self.root / RESUME / "settings.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None  # no partial run, or one killed before it wrote its settings: nothing done

    def _refuse_other_settings(self, saved: dict | None) -> None:
        if saved is not None and saved != self.settings and not self.overwrite:
            changed = sorted(k for k in {*saved, *self.settings} if saved.get(k) != self.settings.get(k))
            raise OutputExistsError(f"a partial run with other settings ({', '.join(changed)}) is in {self.root}; "
                                    "rerun it with its settings to continue it, or pass --overwrite to start again",
                                    self.out)

    def _open_partial(self) -> None:
        """Continue the partial folder of a run with the same settings; else (none, or overwrite) start one."""
        saved = self._saved_settings()
        self._refuse_other_settings(saved)
        if self.root.exists() and saved != self.settings:
            shutil.rmtree(self.root)
        if not self.root.exists():
            self.out.parent.mkdir(parents=True, exist_ok=True)
            book = self.root / RESUME
            for sub in (book / "batches", book / "grid", self.root / "images"):
                sub.mkdir(parents=True)
            text = json.dumps(self.settings, indent=1, sort_keys=True) + "\n"
            _write_atomically(book / "settings.json", lambda f: f.write(text.encode()))

    # ------------------------------------------------------------------------------------------------ batches
    def _done(self) -> set[int]:
        return {int(p.stem) for p in (self.root / RESUME / "batches").glob("*.jsonl")}

    def batches(self, starts: Iterable[int], *, progress: bool = True, desc: str = "sample") -> Iterator[int]:
        """The first sample numbers of this process's batches not done yet (of all of ``starts``, in order; every
        process calls this once, with the same ``starts``). A batch is recorded as done when the loop comes back
        for the next one, so a batch the loop leaves by an error or a kill is done again by the next run."""
        from tqdm.auto import tqdm

        if not self.resumable:
            raise TypeError("SampleWriter.batches needs the run's settings (SampleWriter(..., settings=...))")
        self._starts = list(starts)
        done = self._done() & set(self._starts)
        self._state.wait_for_everyone()  # every process has listed the same finished batches before any adds one
        todo = [s for s in self._starts if s not in done]
        mine = todo[self._state.process_index::self._state.num_processes]
        main = self._state.is_main_process
        if done and main:
            print(f"note: continuing {self.root}: {len(done)} of {len(self._starts)} batches were done",
                  file=sys.stderr)
        for start in tqdm(mine, desc=desc, unit="batch", disable=not progress or not main):
            self.count, self._rows, self._panels = start, [], []
            yield start
            self._finish_batch(start)

    def _finish_batch(self, start: int) -> None:
        book = self.root / RESUME
        if self._panels:  # saved while fewer than the grid's capacity of in-grid images come before (any process's)
            earlier = [int(p.stem) for p in (book / "grid").glob("*.npz")]
            for index, panels in self._panels:
                if sum(e < index for e in earlier) < self._capacity:
                    _write_atomically(book / "grid" / f"{index:08d}.npz", lambda f, arrays=panels: np.savez(f, *arrays))
                    earlier.append(index)
        text = "".join(json.dumps(row) + "\n" for row in self._rows)
        _write_atomically(book / "batches" / f"{start:08d}.jsonl", lambda f: f.write(text.encode()))
        self._rows, self._panels = None, []

    # ------------------------------------------------------------------------------------------------ add
    def add(self, image: np.ndarray, row: dict, *, files: dict[str, np.ndarray] | None = None,
            grid: list[np.ndarray] | None = None, in_grid: bool = True) -> str:
        if self.resumable and self._rows is None:
            raise RuntimeError("SampleWriter.add: call it inside `for start in writer.batches(...)`")
        name = f"{self.count:05d}"
        Image.fromarray(image).save(self.root / "images" / f"{name}.png")
        for rel, array in (files or {}).items():
            path = self.root / rel
            path.parent.mkdir(exist_ok=True)
            Image.fromarray(array).save(path)
        line = {"name": name, "image": f"images/{name}.png", **row}
        if self.resumable:  # the row says when it was not made by the plain float32 model (run_settings)
            line.update({k: self.settings[k] for k in ("precision", "deep_cache") if k in self.settings})
        panels = grid if grid is not None else [image]
        if self.resumable:
            self._rows.append(line)
            if in_grid:
                self._panels.append((self.count, panels))
        else:
            self._manifest.write(json.dumps(line) + "\n")
            if in_grid and len(self._panels) < self._capacity:
                self._panels.append(panels)
        self.count += 1
        return name

    # ------------------------------------------------------------------------------------------------ exit
    def _save_grid(self, panels: list[list[np.ndarray]]) -> None:
        if not panels:
            return
        if self.grid_columns > 1:  # images side by side, grid_columns per row
            flat = [p for panel in panels for p in panel]
            rows = [flat[r:r + self.grid_columns] for r in range(0, len(flat), self.grid_columns)]
        else:
            rows = panels
        save_grid(rows, self.root / "grid.png", scale=max(1, 128 // rows[0][0].shape[0]))

    def __exit__(self, *exc) -> None:
        if not self.resumable:
            self._manifest.close()
            if exc[0] is None:
                self._save_grid(self._panels)
            self._folder.__exit__(*exc)  # renames the folder into place, or removes it after an error
            return
        if exc[0] is not None:
            full = not isinstance(exc[1], DiskFullError) and is_disk_full(exc[1])
            reached = tree_bytes(self.root) if full else 0
            kept = self._keep_after_error()
            if full:
                self._disk_full(reached, kept)
            return  # the error goes on
        try:
            self._state.wait_for_everyone()  # every batch written
            if self._state.is_main_process:
                self._merge()
            self._state.wait_for_everyone()  # OUT is in place for every process
        except Exception as error:
            if not isinstance(error, DiskFullError) and is_disk_full(error):
                self._disk_full(tree_bytes(self.root), kept=True)
            raise

    def _disk_full(self, reached: int, kept: bool) -> None:
        then = ("free some space there (or write elsewhere) and run the same command again: it continues from the "
                "finished batches") if kept else "free some space there (or write elsewhere) and run it again"
        raise DiskFullError(self.out, "this output", reached or None, at_least=True, then=then) from None

    def _keep_after_error(self) -> bool:
        """A run stopped by an error keeps its finished batches for the rerun (a lone process with none: nothing is
        left). Whether the partial folder is kept."""
        done = self._done() if (self.root / RESUME).is_dir() else set()
        if not done and self._state.num_processes == 1:
            shutil.rmtree(self.root, ignore_errors=True)
            return False
        if done and self._state.is_main_process:
            print(f"note: {len(done)} finished batches are kept in {self.root}: the same command continues from them",
                  file=sys.stderr)
        return True

    def _merge(self) -> None:
        """The main process, every batch done: samples.jsonl in batch order, grid.png, then the rename to OUT."""
        book = self.root / RESUME
        starts = self._starts or []
        missing = [s for s in starts if not (book / "batches" / f"{s:08d}.jsonl").is_file()]
        if missing:
            raise RuntimeError(f"{self.root}: batches starting at {missing[:5]} were not written")
        with open(self.root / MANIFEST, "w", encoding="utf-8") as manifest:
            manifest.writelines((book / "batches" / f"{s:08d}.jsonl").read_text(encoding="utf-8") for s in starts)
        panels = []
        for path in sorted((book / "grid").glob("*.npz"))[:self._capacity]:
            with np.load(path) as saved:
                panels.append([saved[f"arr_{k}"] for k in range(len(saved.files))])
        self._save_grid(panels)
        if self.out.exists() or self.out.is_symlink():
            shutil.rmtree(self.out) if self.out.is_dir() and not self.out.is_symlink() else self.out.unlink()
        os.replace(self.root, self.out)  # a kill until here leaves the partial run, complete, to merge again
        shutil.rmtree(self.out / RESUME)
