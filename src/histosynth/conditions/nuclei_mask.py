"""NASDM's semantic condition: one channel per nucleus type plus an instance-edge channel.

NASDM (Sec. 3.4) expands the nuclei type map into one binary channel per nucleus type and concatenates
a map of the edges of all nuclei "to further demarcate nuclei instances" (touching nuclei of the same
type would otherwise merge into one blob). The null condition ∅ used for classifier-free guidance
(Sec. 3.5) is the all-zero tensor of the same shape.

Layout of ``nuclei_condition(...)`` (``C = num_classes``)::

    channel k-1, k = 1..C : 1.0 where type_map == k          (background, type 0, has no channel)
    channel C             : 1.0 on instance edges            (see ``instance_edges``)

Edge definition (our choice; the paper does not spell it out): a pixel is an edge pixel if it belongs
to a nucleus (``inst_map != 0``) and at least one of its 4-neighbours has a different instance id. This
marks the nucleus/background border *inside* the nucleus and, for two touching nuclei, the one-pixel
rims on *both* sides of their common border. Background pixels are never edges, and the image border
is not an edge (pixels outside the image are not neighbours), so a nucleus cut by the patch border
stays open there.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["instance_edges", "nuclei_condition", "null_condition_like", "drop_condition"]


def instance_edges(inst_map: np.ndarray) -> np.ndarray:
    """Boolean (H, W) map of nucleus pixels that have a 4-neighbour with a different instance id."""
    inst = np.asarray(inst_map)
    if inst.ndim != 2:
        raise ValueError(f"inst_map must be 2-D (H, W), got shape {inst.shape}")
    edge = np.zeros(inst.shape, dtype=bool)
    vertical = inst[1:, :] != inst[:-1, :]  # pixel (i, j) differs from (i+1, j)
    horizontal = inst[:, 1:] != inst[:, :-1]  # pixel (i, j) differs from (i, j+1)
    edge[:-1, :] |= vertical
    edge[1:, :] |= vertical
    edge[:, :-1] |= horizontal
    edge[:, 1:] |= horizontal
    return edge & (inst != 0)


def nuclei_condition(inst_map: np.ndarray, type_map: np.ndarray, num_classes: int) -> np.ndarray:
    """Build NASDM's condition tensor, float32 of shape ``(num_classes + 1, H, W)``.

    Args:
        inst_map: (H, W) integer instance ids, 0 = background.
        type_map: (H, W) integer nucleus types, 0 = background, 1..num_classes = nucleus types.
        num_classes: number of nucleus types (background excluded).

    Raises:
        ValueError: if the maps are not 2-D of the same shape, or a type id is outside 0..num_classes.
    """
    inst = np.asarray(inst_map)
    types = np.asarray(type_map)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if inst.ndim != 2 or types.shape != inst.shape:
        raise ValueError(f"inst_map and type_map must be 2-D of the same shape, got {inst.shape} and {types.shape}")
    if types.size and (types.min() < 0 or types.max() > num_classes):
        bad = sorted(set(np.unique(types[(types < 0) | (types > num_classes)]).tolist()))
        raise ValueError(f"type ids must lie in 0..{num_classes}, found {bad}")
    cond = np.zeros((num_classes + 1, *inst.shape), dtype=np.float32)
    for k in range(1, num_classes + 1):
        cond[k - 1] = types == k
    cond[num_classes] = instance_edges(inst)
    return cond


def null_condition_like(cond: torch.Tensor) -> torch.Tensor:
    """NASDM's empty semantic mask ∅: all zeros, same shape/dtype/device as ``cond``."""
    return torch.zeros_like(cond)


def drop_condition(
    cond: torch.Tensor, p: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace whole samples of a batch by the null condition with probability ``p`` each.

    Used when training for classifier-free guidance (NASDM fine-tunes with p = 0.2).

    Returns:
        ``(new_cond, dropped)`` where ``dropped`` is a bool tensor of shape (B,) on ``cond.device``,
        True for the samples whose condition was zeroed. ``cond`` itself is not modified.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"drop probability must be in [0, 1], got {p}")
    batch = cond.shape[0]
    rand_device = generator.device if generator is not None else cond.device
    dropped = (torch.rand(batch, generator=generator, device=rand_device) < p).to(cond.device)
    mask = dropped.view(batch, *([1] * (cond.ndim - 1)))
    return torch.where(mask, torch.zeros((), dtype=cond.dtype, device=cond.device), cond), dropped
