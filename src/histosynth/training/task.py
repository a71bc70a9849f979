"""What a method gives the training engine: a :class:`TrainingTask`.

The engine (``engine.py``) owns the run directory, accelerate, seeding, AdamW and the LR schedule, the data
order, accumulation, clipping, EMA, the NaN stop, atomic checkpoints, exact resume, the loss log and plot,
and calls :meth:`TrainingTask.export` at every checkpoint. A task says only what differs between methods.
Order of calls: ``__init__`` (read and check every input; nothing is written yet) → ``setup`` (after the run
directory exists: caches) → ``build_model`` (after ``set_seed(train.seed)``) → ``parameter_groups`` →
``dataset`` → ``micro_loss`` per micro-batch → ``export``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from histosynth.data.store import PatchStore
from histosynth.errors import DataError, HistosynthError


class TrainingTask:
    """Base class of a method's training task. ``recipe.train`` is an :class:`~histosynth.recipes.EngineConfig`."""

    #: columns of losses.jsonl drawn in loss.png (those present), with their titles
    plot_columns: dict[str, str] = {"loss": "loss"}
    #: custom DataLoader collate function (None: torch's default)
    collate_fn = None
    #: the recipe type this task trains (another one is refused before anything is read)
    recipe_type: type | None = None

    def __init__(self, recipe, data: Path, *, progress: bool = True):
        if self.recipe_type is not None and not isinstance(recipe, self.recipe_type):
            wanted = getattr(self.recipe_type, "METHOD", "") or self.recipe_type.__name__
            raise HistosynthError(f"recipe {getattr(recipe, 'name', recipe)!r} (method: {getattr(recipe, 'method', '?')}) "
                                  f"cannot be trained by {type(self).__name__}: it trains method {wanted!r}")
        self.recipe, self.data, self.progress = recipe, Path(data), progress

    @property
    def train_config(self):
        return self.recipe.train

    @property
    def total_steps(self) -> int:
        return self.recipe.total_steps

    def check_patch_size(self, store) -> None:
        """The store's patches must be the recipe's size (the diffusion models are trained at one size)."""
        if store.patch_size != self.recipe.patch_size:
            raise HistosynthError(f"the store holds {store.patch_size} px patches but recipe {self.recipe.name} trains "
                                  f"at {self.recipe.patch_size} px", store.path)

    def check_magnification(self, store) -> None:
        """The store's patches must be at the recipe's ``magnification`` where it names one (None: any store)."""
        wanted = getattr(self.recipe, "magnification", None)
        if wanted is not None and str(store.magnification) != wanted:
            raise DataError(f"the store's patches are at {store.magnification}, recipe {self.recipe.name} trains at "
                            f"{wanted}", store.path)

    def open_store(self, data: Path | PatchStore, *, magnification: bool = False) -> PatchStore:
        """The patch store at ``data`` (or ``data`` itself, already open), checked by :meth:`check_patch_size` (and
        :meth:`check_magnification`)."""
        store = data if isinstance(data, PatchStore) else PatchStore(data)
        self.check_patch_size(store)
        if magnification:
            self.check_magnification(store)
        return store

    # ------------------------------------------------------------------------------------------- hooks
    def setup(self, accelerator, run: Path, resuming: bool) -> None:
        """Work that needs the run directory (e.g. caches the main process writes and the others read)."""

    def build_model(self, accelerator, run: Path, resuming: bool) -> torch.nn.Module:
        """The module the engine optimises (one forward per micro-batch, so DDP sees one module)."""
        raise NotImplementedError

    def parameter_groups(self, model: torch.nn.Module) -> list[dict]:
        """AdamW parameter groups; each is clipped on its own (e.g. an autoencoder and its discriminator)."""
        return [{"params": list(model.parameters())}]

    def learning_rate(self) -> float:
        """The base learning rate that :meth:`lr_factor` multiplies."""
        return self.train_config.learning_rate

    def lr_factor(self, step: int) -> float:
        """Factor of the base rate at optimisation step ``step`` (0-based)."""
        return 1.0

    def stage_of(self, step: int) -> str | None:
        """Name of the training stage of ``step`` (logged), or None."""
        return None

    def watched_loss(self, row: dict) -> float:
        """What the engine's divergence watch follows, from one losses.jsonl row: the loss (a task whose loss holds
        terms that swing by design, as a GAN's do, names a steadier one)."""
        return row["loss"]

    def dataset(self) -> Dataset:
        """Map-style dataset of the training items; the engine decides their order."""
        raise NotImplementedError

    def micro_loss(self, model, batch, generator: torch.Generator, step: int):
        """(loss with graph, {term: detached scalar}, number of samples) of one micro-batch. Every random draw
        comes from ``generator``. Called inside ``accelerator.accumulate``."""
        raise NotImplementedError

    def export(self, model: torch.nn.Module, ema, run: Path) -> None:
        """Write the ready-to-use result (a pipeline, an autoencoder, a segmenter) from the unwrapped model;
        ``ema`` is the run's ``EMAModel``, or None when the recipe averages no weights."""
        raise NotImplementedError


class PositionDataset(Dataset):
    """Items ``{"position": positions[i]}``: positions into a task's own tables (cached latents, conditions); a
    position may repeat (e.g. a level drawn more often than it occurs)."""

    def __init__(self, positions):
        self.positions = np.asarray(positions, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> dict:
        return {"position": int(self.positions[i])}
