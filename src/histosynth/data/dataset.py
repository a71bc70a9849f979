"""Torch view of a patch store for training: image in [-1, 1] and its NASDM condition tensor."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from histosynth.conditions.nuclei_mask import nuclei_condition
from histosynth.data.store import PatchStore
from histosynth.errors import DataError


class NucleiPatchDataset(Dataset):
    """Patches of one split of a store. Deterministic: augmentation is done by the trainer from its seeded RNG."""

    def __init__(self, store: PatchStore, split: str | None = "train"):
        if not store.has_labels:
            raise DataError("this store holds images without nuclei labels (e.g. from `prepare slides`); "
                            "NASDM needs a store made by `prepare nuclei`", store.path)
        self.store = store
        self.indices = store.indices(split)
        self.num_classes = len(store.class_names)
        if not self.indices:
            raise DataError(f"the store has no {split!r} patches", store.path)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        item = self.store[self.indices[i]]
        image = torch.from_numpy(np.ascontiguousarray(item["image"])).permute(2, 0, 1).float() / 127.5 - 1.0
        cond = nuclei_condition(np.asarray(item["inst_map"]), np.asarray(item["type_map"]), self.num_classes)
        return {"image": image, "condition": torch.from_numpy(cond), "index": self.indices[i]}
