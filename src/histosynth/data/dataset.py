"""Torch views of one split of a patch store, for the training tasks. Deterministic: crops, turns and colour jitter
are the task's, drawn from the engine's per-step generator.

- :class:`ImagePatchDataset`: uint8 images (any store; the image autoencoder).
- :class:`LabelledPatchDataset`: uint8 images with their instance and type maps (HistoSmith's joint autoencoder).
- :class:`NucleiPatchDataset`: images in [-1, 1] with their NASDM condition tensor.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from histosynth.conditions.nuclei_mask import nuclei_condition
from histosynth.data.store import PatchStore
from histosynth.errors import DataError


class StoreSplit(Dataset):
    """The patches of one split (``None``: all) of ``store``; an empty split is a DataError naming the store."""

    def __init__(self, store: PatchStore, split: str | None = "train"):
        self.store, self.indices = store, store.indices(split)
        if not self.indices:
            raise DataError(f"the store has no {split!r} patches", store.path)

    def __len__(self) -> int:
        return len(self.indices)

    def image(self, item: dict) -> torch.Tensor:
        """uint8 (3, P, P)."""
        return torch.from_numpy(np.ascontiguousarray(item["image"])).permute(2, 0, 1)


class ImagePatchDataset(StoreSplit):
    """Items: ``image`` uint8 (3, P, P) and the store ``index`` (labels unused)."""

    def __getitem__(self, i: int) -> dict:
        return {"image": self.image(self.store[self.indices[i]]), "index": self.indices[i]}


class LabelledPatchDataset(StoreSplit):
    """Items: ``image`` uint8 (3, P, P), ``inst_map`` and ``type_map`` int32 (P, P)."""

    def __getitem__(self, i: int) -> dict:
        item = self.store[self.indices[i]]
        return {"image": self.image(item), "inst_map": torch.from_numpy(item["inst_map"]),
                "type_map": torch.from_numpy(item["type_map"])}


class NucleiPatchDataset(StoreSplit):
    """Items: ``image`` float32 (3, P, P) in [-1, 1], ``condition`` float32 (K+1, P, P) (NASDM's, Sec. 3.1) and the
    store ``index``. A store without nuclei labels is a DataError."""

    def __init__(self, store: PatchStore, split: str | None = "train"):
        if not store.has_labels:
            raise DataError("this store holds images without nuclei labels (e.g. from `prepare slides`); "
                            "NASDM needs a store made by `prepare nuclei`", store.path)
        super().__init__(store, split)
        self.num_classes = len(store.class_names)

    def __getitem__(self, i: int) -> dict:
        item = self.store[self.indices[i]]
        image = self.image(item).float() / 127.5 - 1.0
        cond = nuclei_condition(np.asarray(item["inst_map"]), np.asarray(item["type_map"]), self.num_classes)
        return {"image": image, "condition": torch.from_numpy(cond), "index": self.indices[i]}
