"""Sampling sweeps: image quality (and mask adherence) against the guidance scale or the number of steps.

NASDM (Fig. 2, Sec. 4.2) samples the held-out masks at several guidance scales (its s = g − 1) and plots FID and IS against
s: quality first improves as nuclei gain detail, then degrades as nuclei and stain are overemphasised.
:func:`guidance_sweep` reproduces that study for any trained model: for each value it samples the same masks
with the same seed into ``OUT/<param>=<value>/`` (a complete ``histosynth sample`` output), measures
FD/KID (and IS with Inception features) against the real patches of the split, the segmenter-free nuclei
contrast, and mask adherence when a segmenter is given, and writes ``OUT/sweep.json`` (rewritten after each
value, so a stopped sweep keeps what it measured) and ``OUT/sweep.png`` (each metric against the value).

The real features are extracted once for the whole sweep; every number follows
:func:`histosynth.evaluate.fid.evaluate_distribution` (same functions, same keys).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import platform
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from histosynth.errors import HistosynthError

__all__ = ["SWEEP_PARAMS", "guidance_sweep", "parse_values", "plot_sweep", "sample_contrast", "value_dir_name"]

#: sweepable parameters → the sample_store argument they set
SWEEP_PARAMS = {"guidance": "guidance_scale", "steps": "num_inference_steps"}
SWEEP_JSON = "sweep.json"
SWEEP_PNG = "sweep.png"


def _check_param(param: str) -> str:
    if param not in SWEEP_PARAMS:
        raise HistosynthError(f"cannot sweep {param!r} (--param): valid parameters are {', '.join(SWEEP_PARAMS)}")
    return param


def parse_values(values: str | Sequence[Any], param: str = "guidance") -> list[float | int]:
    """"0,0.5,1" or a sequence → numbers (ints for ``steps``); HistosynthError on bad, repeated or no values."""
    _check_param(param)
    items = [v.strip() for v in values.split(",") if v.strip()] if isinstance(values, str) else list(values)
    if not items:
        raise HistosynthError(f"no values to sweep for {param} (--values)")
    out: list[float | int] = []
    for v in items:
        try:
            x = float(v)
        except (TypeError, ValueError):
            raise HistosynthError(f"--values: {v!r} is not a number") from None
        if not math.isfinite(x):
            raise HistosynthError(f"--values: {v!r} is not a finite number")
        if param == "steps":
            if x != int(x) or x < 1:
                raise HistosynthError(f"--values: steps must be whole numbers >= 1, got {v!r}")
            x = int(x)
        elif x < 0:
            raise HistosynthError(f"--values: guidance scales g are >= 0 (1 = conditional only), got {v!r}")
        out.append(x)
    if len(set(out)) != len(out):
        raise HistosynthError(f"--values: repeated values in {items}")
    return out


def value_dir_name(param: str, value: float | int) -> str:
    """``guidance=1.5``, ``steps=50``: the sub-directory of one value."""
    return f"{param}={value:g}" if isinstance(value, float) else f"{param}={value}"


def _machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    host = " ".join(p for p in (platform.node(), platform.machine(), platform.processor()) if p)
    return f"{host}, {gpu}, torch {torch.__version__}, {torch.get_num_threads()} threads"


def _distribution(f_real: np.ndarray, f_gen: np.ndarray, logits_gen, extractor, is_splits: int = 10) -> dict:
    """FID / KID / IS with the definitions and keys of evaluate_distribution, from features."""
    from histosynth.evaluate.fid import feature_statistics, frechet_distance, inception_score, kernel_inception_distance

    n_real, n_gen = len(f_real), len(f_gen)
    if n_gen < 2:
        raise HistosynthError(f"need at least 2 generated images per value for FID, got {n_gen} (--num)")
    mu_r, sig_r = feature_statistics(f_real)
    mu_g, sig_g = feature_statistics(f_gen)
    subset = min(1000, n_real, n_gen)
    kid_mean, kid_std = kernel_inception_distance(f_real, f_gen, subset_size=subset)
    out = {"fid": frechet_distance(mu_r, sig_r, mu_g, sig_g), "kid_mean": kid_mean, "kid_std": kid_std,
           "n_real": n_real, "n_generated": n_gen, "features": extractor.name, "kid_subset_size": subset,
           "kid_subsets": 100}
    if extractor.provides_inception_score and logits_gen is not None:
        out["is_mean"], out["is_std"] = inception_score(logits_gen, splits=min(is_splits, n_gen))
    return out


def sample_contrast(sample_dir: Path) -> tuple[float, float]:
    """Nuclei contrast (generated, real) over the rows of a NASDM sample directory: the mean grey level (0–255)
    outside minus inside the conditioned nuclei (:func:`histosynth.evaluate.adherence.nuclei_contrast`)."""
    from PIL import Image

    from histosynth.data.images import load_image
    from histosynth.evaluate.adherence import nuclei_contrast
    from histosynth.evaluate.controllability import read_samples

    rows = read_samples(sample_dir)
    types = [np.asarray(Image.open(sample_dir / r["type_map"])) for r in rows]
    gen = [load_image(sample_dir / r["image"]) for r in rows]
    real = [load_image(sample_dir / r["real"]) for r in rows if r.get("real")]
    return nuclei_contrast(gen, types), (nuclei_contrast(real, types) if len(real) == len(rows) else float("nan"))


def guidance_sweep(
    model,
    masks_store: str | Path,
    out: str | Path,
    values: str | Sequence[float],
    param: str = "guidance",
    *,
    num: int | None = 16,
    steps: int | None = None,
    guidance: float | None = None,
    scheduler: str | None = None,
    seed: int = 0,
    split: str | None = "test",
    features="effnet-lite0",
    segmenter=None,
    overwrite: bool = False,
    batch_size: int = 16,
    device: str | None = None,
    progress: bool = True,
) -> list[dict]:
    """Sample the masks of ``masks_store`` once per value of ``param`` and measure each set.

    Args:
        model: a training run / saved pipeline path, or an NASDMPipeline.
        masks_store: the patch store whose ``split`` masks condition the samples; its real patches of that split
            are the reference set of FD/KID.
        values: the values of ``param`` ("0,0.5,1" or numbers). ``param="guidance"``: guidance scales g (1 = conditional only),
            each sampled with ``steps`` steps; ``param="steps"``: step counts, each sampled at guidance ``guidance``.
            ``steps`` / ``guidance`` None: the model's own default, as ``histosynth sample`` (NASDM: DDPM 20, g 2).
        num, scheduler, seed, batch_size: as ``histosynth sample`` (the same masks and seeds for every value;
            scheduler None: the model's own).
        features: ``"effnet-lite0"`` (offline), ``"inception"`` or a FeatureExtractor.
        segmenter: optional nuclei segmenter (see :mod:`histosynth.evaluate.controllability`) for mask adherence.

    Returns:
        One dict per value (also in ``OUT/sweep.json`` under ``rows``): the value, the sampling settings, ``fid,
        kid_mean, kid_std`` (``is_mean, is_std`` with Inception), ``nuclei_contrast_generated`` / ``_real`` and,
        with a segmenter, ``dice, aji, pq, mpq`` of the generated images and the same ``real_*`` reference.
    """
    import torch

    from histosynth.evaluate.controllability import read_samples
    from histosynth.evaluate.features import FeatureExtractor, load_feature_extractor
    from histosynth.evaluate.fid import extract_features
    from histosynth.sampling import prepare_output_dir

    _check_param(param)
    values = parse_values(values, param)
    fixed = ("num_inference_steps", steps) if param == "guidance" else ("guidance_scale", guidance)
    if fixed[1] is not None:
        parse_values([fixed[1]], "steps" if param == "guidance" else "guidance")
    out = Path(out)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")

    from histosynth.methods import load_pipeline, methods

    if isinstance(model, (str, Path)):
        model_name = str(model)
        method, pipe = load_pipeline(model)
    else:
        model_name = getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__
        method, pipe = next((m for m in methods() if m.pipeline is not None and isinstance(model, m.pipeline)), None), model
    if method is None or method.sample_input != "masks":
        raise HistosynthError(f"evaluate sweep measures against the real patches of the masks' store: it needs a model "
                              f"that samples the masks of a store, not a {getattr(method, 'label', type(pipe).__name__)} "
                              "model", model_name)
    pipe = pipe.to(device)
    if segmenter is not None:  # fail before sampling anything
        from histosynth.data.store import PatchStore
        from histosynth.evaluate.controllability import segmenter_class_names

        seg_names = segmenter_class_names(segmenter)
        store_names = PatchStore(masks_store).class_names
        if list(seg_names) != list(store_names):
            raise HistosynthError(f"the store's classes {list(store_names)} differ from the segmenter's "
                                  f"{list(seg_names)}", masks_store)
    prepare_output_dir(out, overwrite)

    extractor = features if isinstance(features, FeatureExtractor) else load_feature_extractor(features, device=device)
    extractor = extractor.to(device).eval()
    f_real, _ = extract_features(masks_store, extractor, split, device=device, progress=progress, desc="real")

    header = {
        "kind": "sweep", "param": param, "values": values, "model": model_name, "masks": str(masks_store),
        "split": split, "num": num, "scheduler": scheduler, "seed": seed,
        "fixed": None,  # the fixed setting as it ran (the model's default when not given): set from the first row
        "features": extractor.name, "protocol": json.loads(json.dumps(extractor.protocol)),
        "segmenter": None if segmenter is None else str(getattr(segmenter, "path", None) or type(segmenter).__name__),
        "machine": _machine(), "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    rows: list[dict] = []
    for value in values:
        sub = out / value_dir_name(param, value)
        t0 = time.perf_counter()
        g = value if param == "guidance" else guidance
        k = value if param == "steps" else steps
        method.sample(pipe, masks_store, sub, split=split, num=num, guidance_scale=None if g is None else float(g),
                      num_inference_steps=None if k is None else int(k), scheduler=scheduler, seed=seed,
                      batch_size=batch_size, overwrite=overwrite, progress=progress)
        t_sample = time.perf_counter() - t0
        ran = read_samples(sub)[0]  # the settings the sampler ran with, its defaults filled in
        g, k = ran["guidance_scale"], ran["num_inference_steps"]
        header["fixed"] = header["fixed"] or {fixed[0]: ran[fixed[0]]}
        f_gen, logits_gen = extract_features(sub / "images", extractor, device=device, progress=progress,
                                             desc=f"{param}={value}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            row: dict[str, Any] = {param: value, "dir": sub.name, "guidance_scale": float(g),
                                   "num_inference_steps": int(k), "scheduler": scheduler, "seed": seed}
            row.update(_distribution(f_real, f_gen, logits_gen, extractor))
        row["nuclei_contrast_generated"], row["nuclei_contrast_real"] = sample_contrast(sub)
        if segmenter is not None:
            from histosynth.evaluate.controllability import mask_adherence

            adh = mask_adherence(sub, segmenter, batch_size=batch_size)
            (sub / "adherence.json").write_text(json.dumps(adh, indent=2, default=str) + "\n", encoding="utf-8")
            for side, prefix in (("generated", ""), ("real", "real_")):
                if adh.get(side):
                    for key in ("dice", "aji", "pq", "mpq"):
                        row[prefix + key] = adh[side][key]
        row["seconds_sampling"] = round(t_sample, 2)
        row["seconds"] = round(time.perf_counter() - t0, 2)
        (sub / "metrics.json").write_text(json.dumps({**row, "protocol": header["protocol"]}, indent=2) + "\n",
                                          encoding="utf-8")
        rows.append(row)
        (out / SWEEP_JSON).write_text(json.dumps({**header, "rows": rows}, indent=2) + "\n", encoding="utf-8")
    title = f"{Path(model_name).name}: {num or 'all'} {split or ''} masks of {Path(masks_store).name}, {scheduler or 'its scheduler'}"
    plot_sweep(rows, param, out / SWEEP_PNG, title=title)
    return rows


_PANELS = [  # (key, label, reference key drawn dashed)
    ("fid", "FD ({features}) ↓", None),
    ("kid_mean", "KID ({features}) ↓", None),
    ("is_mean", "IS ↑", None),
    ("nuclei_contrast_generated", "nuclei contrast (grey levels)", "nuclei_contrast_real"),
    ("mpq", "mPQ+ vs mask ↑", "real_mpq"),
    ("dice", "Dice vs mask ↑", "real_dice"),
]


def plot_sweep(rows: Sequence[dict], param: str, path: str | Path, title: str | None = None) -> Path:
    """One panel per metric present in ``rows`` against the swept value (NASDM Fig. 2 style); a dashed line is
    the same measure on the real patches of the masks where there is one."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    x = np.array([r[param] for r in rows], dtype=float)
    features = rows[0].get("features", "") if rows else ""
    panels = [p for p in _PANELS if rows and any(_finite(r.get(p[0])) for r in rows)]
    fig = Figure(figsize=(3.4 * max(1, len(panels)), 3.2), dpi=100)
    FigureCanvasAgg(fig)
    for i, (key, label, ref) in enumerate(panels, start=1):
        ax = fig.add_subplot(1, len(panels), i)
        y = np.array([_num(r.get(key)) for r in rows])
        if key == "kid_mean":
            ax.errorbar(x, y, yerr=[_num(r.get("kid_std")) for r in rows], marker="o", capsize=3)
        else:
            ax.plot(x, y, marker="o")
        if ref and any(_finite(r.get(ref)) for r in rows):
            ax.axhline(np.nanmean([_num(r.get(ref)) for r in rows]), color="0.4", ls="--", lw=1, label="real")
            ax.legend(fontsize=8)
        ax.set_xlabel("guidance scale s" if param == "guidance" else "denoising steps")
        ax.set_title(label.format(features=features), fontsize=10)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _num(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def _finite(v) -> bool:
    return math.isfinite(_num(v))
