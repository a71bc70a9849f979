"""Pictures a person would rather look at: coloured nuclei masks, sample grids, loss curves."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

# Distinct colours for nucleus types 1..N (background black, instance edges white).
PALETTE = np.array(
    [[0, 0, 0], [255, 64, 64], [64, 200, 64], [64, 128, 255], [255, 200, 0], [200, 64, 255], [0, 220, 220], [255, 128, 0]],
    dtype=np.uint8,
)


def colour_mask(type_map: np.ndarray, edges: np.ndarray | None = None) -> np.ndarray:
    """uint8 RGB picture of a type map (type k in PALETTE[k]) with instance edges drawn in white."""
    rgb = PALETTE[np.clip(type_map, 0, len(PALETTE) - 1)]
    if edges is not None:
        rgb = rgb.copy()
        rgb[edges > 0] = 255
    return rgb


def condition_to_rgb(condition: np.ndarray) -> np.ndarray:
    """Picture of a NASDM condition tensor (K type channels + 1 edge channel, C x H x W)."""
    types = condition[:-1]
    type_map = np.where(types.max(0) > 0, types.argmax(0) + 1, 0)
    return colour_mask(type_map, condition[-1])


def save_grid(rows: list[list[np.ndarray]], path: Path, pad: int = 2, scale: int = 1) -> None:
    """Save equally-sized uint8 RGB tiles as a grid PNG (one list per row)."""
    h, w = rows[0][0].shape[:2]
    ncol = max(len(r) for r in rows)
    canvas = np.full((len(rows) * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            canvas[y : y + h, x : x + w] = tile
    img = Image.fromarray(canvas)
    if scale != 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    img.save(path)


NASDM_LOSS_COLUMNS = {"simple": "L_simple (ε MSE)", "vlb": "L_vlb term (bits/dim)"}


def plot_loss_curves(losses_jsonl: Path, out_png: Path, columns: dict[str, str]) -> None:
    """One panel per column of a losses.jsonl present in its rows (raw + moving average over ~1/50 of the run;
    log scale where every value is positive), titled by ``columns[key]``; nothing is written for an empty log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(r) for r in Path(losses_jsonl).read_text().splitlines() if r]
    keys = [k for k in columns if rows and k in rows[0]]
    if not keys:
        return
    steps = np.array([r["step"] for r in rows])
    fig, axes = plt.subplots(1, len(keys), figsize=(3.4 * len(keys) + 1.5, 3.5))
    for ax, key in zip(np.atleast_1d(axes), keys):
        vals = np.array([r[key] for r in rows], dtype=float)
        ax.plot(steps, vals, lw=0.5, alpha=0.4)
        k = max(1, len(vals) // 50)
        ax.plot(steps[k - 1 :], np.convolve(vals, np.ones(k) / k, mode="valid"), lw=1.5)
        if (vals > 0).all():
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(columns[key])
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def plot_losses(losses_jsonl: Path, out_png: Path) -> None:
    """NASDM's curves (L_simple and the L_vlb term)."""
    plot_loss_curves(losses_jsonl, out_png, NASDM_LOSS_COLUMNS)


def label_overlay(image: np.ndarray, inst_map: np.ndarray, type_map: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3): the image with each nucleus outlined in its type's colour (PALETTE)."""
    from skimage.segmentation import find_boundaries

    out = np.asarray(image, np.uint8).copy()
    edges = find_boundaries(inst_map, mode="inner")
    out[edges] = PALETTE[np.clip(type_map, 0, len(PALETTE) - 1)][edges]
    return out


def counts_panel(requested: np.ndarray, realised: np.ndarray, class_names, size: int) -> np.ndarray:
    """uint8 (size, size, 3) bar chart of requested (hatched outline) vs realised (filled) nuclei per type."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2.56, 2.56), dpi=100)
    x = np.arange(len(class_names))
    colours = PALETTE[1 : len(class_names) + 1] / 255.0
    ax.bar(x - 0.2, requested, 0.4, color="none", edgecolor=colours, hatch="//", label="requested")
    ax.bar(x + 0.2, realised, 0.4, color=colours, label="realised")
    ax.set_xticks(x, [n[:5] for n in class_names], fontsize=7)
    ax.tick_params(axis="y", labelsize=7)
    ax.legend(fontsize=6, frameon=False)
    fig.tight_layout(pad=0.3)
    fig.canvas.draw()
    panel = np.asarray(fig.canvas.buffer_rgba())[..., :3]
    plt.close(fig)
    return np.asarray(Image.fromarray(panel).resize((size, size), Image.BILINEAR))
