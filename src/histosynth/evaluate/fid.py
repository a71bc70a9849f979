"""Distribution metrics between a real and a generated image set: FID, KID and (Inception only) IS.

Sources (``real`` / ``generated``) are either

* a folder of images, searched recursively (hidden folders skipped), sorted by relative path. By default the
  files matching ``*.png, *.jpg, *.jpeg, *.tif, *.tiff`` (case-insensitive) whose name does **not** contain
  ``mask`` (so ``x_mask.png`` label images next to the tiles are left out); pass ``patterns`` / ``exclude``
  to change that. ``split`` selects the sub-folder ``source/split`` (e.g. ``consep`` + ``train``).
* a histosynth patch store (a folder holding ``store.json``); ``split`` selects the store's split.

(The sources are read by :mod:`histosynth.data.images`; ``list_images`` and ``count_images`` are re-exported here.)

The metric functions (in :mod:`histosynth.evaluate.distribution_metrics`, re-exported here) are small and
independent (numpy / scipy, float64) and follow torch-fidelity's definitions, so numbers match torch-fidelity /
torchmetrics for the same features:

* :func:`frechet_distance`: ``||mu1-mu2||^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2))`` with scipy's ``sqrtm``; when the
  product is singular (fewer images than feature dimensions) ``eps`` is added to both diagonals.
* :func:`kernel_inception_distance`: unbiased MMD^2 with the cubic polynomial kernel
  ``k(x, y) = (x.y / d + 1)^3`` over random subsets; mean and (population) std over subsets.
* :func:`inception_score`: ``exp(E_x KL(p(y|x) || p(y)))`` over splits of the shuffled logits.

Reference statistics (:func:`save_statistics` / :func:`load_statistics`, ``--save-stats`` / ``--real-stats``):
an ``.npz`` holding the real images' mean and covariance, a float32 subsample of their features for KID (at most
``KID_REFERENCE_ROWS``; KID uses the same rows when it reads the images, so both ways give the same numbers) and
the extractor's protocol, which must equal the protocol of the extractor they are compared with.
See ``docs/evaluation.md`` for the protocol of every metric.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from histosynth.atomic import refuse_existing
from histosynth.data.images import (
    DEFAULT_EXCLUDE,
    DEFAULT_PATTERNS,
    count_images,
    image_patterns,
    is_store,
    list_images,
    load_image,
    open_store_split,
    resolve_image_folder,
)
from histosynth.errors import DataError, HistosynthError
from histosynth.evaluate.distribution_metrics import (  # the metric maths, re-exported
    feature_statistics,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
)
from histosynth.evaluate.features import FeatureExtractor, check_protocol, load_feature_extractor

__all__ = [
    "DEFAULT_PATTERNS",
    "DEFAULT_EXCLUDE",
    "list_images",
    "count_images",
    "iter_image_batches",
    "extract_features",
    "feature_statistics",
    "frechet_distance",
    "kernel_inception_distance",
    "inception_score",
    "ReferenceStatistics",
    "KID_REFERENCE_ROWS",
    "kid_reference_rows",
    "reference_statistics",
    "save_statistics",
    "load_statistics",
    "resolve_generated",
    "evaluate_distribution",
]


# ----------------------------------------------------------------------------------------------- image sources
def _describe(source: str | Path, split: str | None, patterns, exclude) -> str:
    if is_store(source):
        return f"no patches in this store{f' for split {split!r}' if split else ''}"
    return (
        f"no images found (patterns {', '.join(image_patterns(patterns))}, recursive; names containing "
        f"{', '.join(map(repr, exclude)) or 'nothing'} skipped)"
    )


def _to_hwc_uint8(image: Any, where: str) -> np.ndarray:
    a = image.numpy() if torch.is_tensor(image) else np.asarray(image)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=-1)
    if a.ndim != 3 or a.shape[-1] not in (3, 4) or a.dtype != np.uint8:
        raise DataError(f"expected a uint8 (H, W, 3) image, got {a.dtype} {a.shape}", where)
    return a[..., :3]


def iter_image_batches(
    source: str | Path,
    split: str | None = None,
    batch_size: int = 32,
    patterns: str | Sequence[str] | None = None,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
) -> Iterator[torch.Tensor]:
    """An iterator of ``uint8 (B, 3, H, W)`` batches from an image folder or a patch store.

    Images of different sizes are never stacked: a batch is cut short where the size changes. The source is
    checked at once; images are read lazily while iterating.

    Raises:
        DataError: the source does not exist or holds no images (at the call), or an image cannot be read
            (while iterating).
    """
    if batch_size < 1:
        raise HistosynthError(f"batch size must be >= 1, got {batch_size}")
    root = resolve_image_folder(source, split)
    if is_store(root):
        store, idx = open_store_split(root, split)
        items = ((lambda i=i: _to_hwc_uint8(store[i]["image"], f"{root}[{i}]")) for i in idx)
        n = len(idx)
    else:
        files = list_images(root, None, patterns, exclude)
        items = ((lambda p=p: load_image(p)) for p in files)
        n = len(files)
    if n == 0:
        raise DataError(_describe(root, split, patterns, exclude), root)
    return _batches(items, batch_size)


def _batches(items, batch_size: int) -> Iterator[torch.Tensor]:
    batch: list[np.ndarray] = []
    for load in items:
        img = load()
        if batch and (len(batch) == batch_size or img.shape != batch[0].shape):
            yield torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).contiguous()
            batch = []
        batch.append(img)
    if batch:
        yield torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).contiguous()


# ---------------------------------------------------------------------------------------------------- features
def extract_features(
    source: str | Path,
    extractor: FeatureExtractor,
    split: str | None = None,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    progress: bool = True,
    desc: str | None = None,
    patterns: str | Sequence[str] | None = None,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Features ``(N, D)`` float64 and logits ``(N, K)`` float64 (or None) of every image of a source."""
    from tqdm.auto import tqdm

    if device is None:
        param = next(iter(extractor.parameters()), None)
        device = param.device if param is not None else "cpu"
    total = count_images(source, split, patterns, exclude)
    feats, logits = [], []
    with tqdm(total=total, unit="img", desc=desc or f"{extractor.name} features", disable=not progress) as bar:
        for batch in iter_image_batches(source, split, batch_size, patterns, exclude):
            with torch.inference_mode():
                f, lg = extractor.features_and_logits(batch.to(device))
            feats.append(f.double().cpu().numpy())
            if lg is not None:
                logits.append(lg.double().cpu().numpy())
            bar.update(batch.shape[0])
    f_all = np.concatenate(feats)
    if not np.isfinite(f_all).all():
        raise HistosynthError(f"{extractor.name} produced non-finite features (check the weights)", source)
    return f_all, (np.concatenate(logits) if logits else None)


# ------------------------------------------------------------------------------------------ reference statistics
STATS_FORMAT = "histosynth-feature-statistics/1"
#: at most this many real feature rows are kept for KID (in a statistics file and, identically, without one)
KID_REFERENCE_ROWS = 10_000
KID_REFERENCE_SEED = 0
_STATS_ARRAYS = ("format", "mu", "sigma", "features", "n", "protocol", "source")


@dataclass(frozen=True)
class ReferenceStatistics:
    """What FID and KID need of the real images: mean, covariance, a float32 subsample of the features.

    Attributes:
        mu: ``(D,)`` float64 mean of all ``n`` feature rows.
        sigma: ``(D, D)`` float64 unbiased covariance of all ``n`` rows.
        features: ``(m, D)`` float32, ``m = min(n, KID_REFERENCE_ROWS)``: all rows in their order when
            ``n <= KID_REFERENCE_ROWS``, else a seeded draw without replacement (kept in order). KID uses these.
        n: number of real images.
        protocol: the feature extractor's protocol (see :func:`histosynth.evaluate.features.check_protocol`).
        source: free text describing the real images.
        path: the file they were read from / written to, if any.
    """

    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray
    n: int
    protocol: dict[str, Any]
    source: str = ""
    path: Path | None = None


def kid_reference_rows(
    features: np.ndarray, max_rows: int = KID_REFERENCE_ROWS, seed: int = KID_REFERENCE_SEED
) -> np.ndarray:
    """The real feature rows KID uses, as float32 (exact for the float32 outputs of the extractors)."""
    f = np.asarray(features)
    if len(f) > max_rows:
        f = f[np.sort(np.random.default_rng(seed).choice(len(f), max_rows, replace=False))]
    return np.ascontiguousarray(f, dtype=np.float32)


def reference_statistics(
    features: np.ndarray, protocol: dict[str, Any], source_description: str = "",
    max_rows: int = KID_REFERENCE_ROWS, seed: int = KID_REFERENCE_SEED,
) -> ReferenceStatistics:
    """:class:`ReferenceStatistics` of features ``(N >= 2, D)`` (in memory; :func:`save_statistics` writes them)."""
    mu, sigma = feature_statistics(features)
    return ReferenceStatistics(mu, sigma, kid_reference_rows(features, max_rows, seed), int(len(features)),
                               json.loads(json.dumps(protocol)), str(source_description))


def save_statistics(
    path: str | Path,
    features: np.ndarray,
    protocol: dict[str, Any],
    source_description: str = "",
    *,
    overwrite: bool = False,
    max_rows: int = KID_REFERENCE_ROWS,
    seed: int = KID_REFERENCE_SEED,
) -> ReferenceStatistics:
    """Write the reference statistics of real features ``(N >= 2, D)`` to an ``.npz`` file (``--save-stats``).

    The file holds ``mu``, ``sigma`` (float64), ``features`` (float32 subsample, at most ``max_rows`` rows drawn
    with ``seed``), ``n``, ``protocol`` (JSON text), ``source`` (``source_description``), ``format``,
    ``subsample_seed``, ``created`` and ``histosynth_version``; no pickles. It is written under a temporary name
    and renamed when complete.

    Raises:
        OutputExistsError: the file exists and ``overwrite`` is False.
    """
    from histosynth import __version__

    out = Path(path).expanduser()
    refuse_existing(out, overwrite, "statistics file")
    stats = reference_statistics(features, protocol, source_description, max_rows, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            np.savez(
                f,
                format=np.array(STATS_FORMAT),
                mu=stats.mu,
                sigma=stats.sigma,
                features=stats.features,
                n=np.array(stats.n, dtype=np.int64),
                protocol=np.array(json.dumps(stats.protocol, sort_keys=True)),
                source=np.array(stats.source),
                subsample_seed=np.array(seed, dtype=np.int64),
                created=np.array(datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")),
                histosynth_version=np.array(__version__),
            )
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return dataclasses.replace(stats, path=out)


def load_statistics(path: str | Path, expected_protocol: dict[str, Any] | None = None) -> ReferenceStatistics:
    """Read a file written by :func:`save_statistics` (``--real-stats``).

    Args:
        expected_protocol: the protocol of the extractor the statistics will be compared with; a difference in
            anything but the informational keys is refused (:func:`check_protocol`).

    Raises:
        DataError: the file is missing, not a statistics file, or corrupt (each naming the file).
        HistosynthError: the protocol differs from ``expected_protocol`` (naming the file and the differences).
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError("reference statistics file not found (--real-stats)", p)
    try:
        with np.load(p, allow_pickle=False) as z:
            missing = [k for k in _STATS_ARRAYS if k not in z.files]
            if missing:
                raise DataError(f"not a histosynth statistics file (no {', '.join(missing)})", p)
            data = {k: z[k] for k in _STATS_ARRAYS}
    except DataError:
        raise
    except Exception as e:  # not a zip / truncated / pickled content / bad array header
        raise DataError(f"cannot read reference statistics ({type(e).__name__}: {e})", p) from e
    if str(data["format"]) != STATS_FORMAT:
        raise DataError(f"unsupported statistics format {str(data['format'])!r} (expected {STATS_FORMAT!r})", p)
    try:
        protocol = json.loads(str(data["protocol"]))
    except json.JSONDecodeError as e:
        raise DataError(f"corrupt protocol in the statistics file: {e}", p) from e
    mu, sigma, feats = data["mu"], data["sigma"], data["features"]
    n = int(data["n"]) if data["n"].ndim == 0 else -1
    d = mu.shape[0] if mu.ndim == 1 else -1
    if (d < 1 or sigma.shape != (d, d) or feats.ndim != 2 or feats.shape[1] != d or not 2 <= len(feats) <= n
            or not isinstance(protocol, dict)):
        raise DataError(f"inconsistent statistics file (mu {mu.shape}, sigma {sigma.shape}, features {feats.shape}, "
                        f"n {n})", p)
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all() and np.isfinite(feats).all()):
        raise DataError("the statistics file holds non-finite values", p)
    stats = ReferenceStatistics(mu.astype(np.float64), sigma.astype(np.float64), feats.astype(np.float32), n,
                                protocol, str(data["source"]), p)
    if expected_protocol is not None:
        try:
            check_protocol(stats.protocol, expected_protocol)
        except HistosynthError as e:
            raise HistosynthError(f"{e} (left: the file's protocol; right: the current --features)", p) from None
    return stats


# ------------------------------------------------------------------------------------------------ the evaluation
#: the manifest of a `histosynth sample` output directory (histosynth.sampling.MANIFEST)
SAMPLES_MANIFEST = "samples.jsonl"
METRICS = ("fid", "kid", "is")


def resolve_generated(source: str | Path) -> Path:
    """A ``histosynth sample`` output directory (it holds ``samples.jsonl``) stands for its ``images/``."""
    p = Path(source).expanduser()
    if (p / SAMPLES_MANIFEST).is_file():
        if not (p / "images").is_dir():
            raise DataError(f"a `histosynth sample` output ({SAMPLES_MANIFEST}) without its images/ folder", p)
        return p / "images"
    return p


def _describe_real(real: str | Path, split: str | None, n: int) -> str:
    where = str(Path(real).expanduser().resolve())
    return f"{where}{f' (split {split})' if split else ''}: {n} images"


def evaluate_distribution(
    real: str | Path | None,
    generated: str | Path | None,
    features: str | FeatureExtractor = "effnet-lite0",
    split: str | None = None,
    weights_path: str | Path | None = None,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    kid_subset_size: int | None = None,
    kid_subsets: int = 100,
    is_splits: int = 10,
    generated_split: str | None = None,
    progress: bool = True,
    *,
    real_stats: str | Path | None = None,
    save_stats: str | Path | None = None,
    overwrite: bool = False,
    metrics: Sequence[str] | None = None,
    architecture: str | None = None,
) -> dict[str, Any]:
    """FID, KID (and IS for Inception features) of ``generated`` against ``real`` (or its saved statistics).

    Args:
        real, generated: image folders or patch stores (see the module docstring); ``generated`` may also be a
            ``histosynth sample`` output (its ``images/``). ``real`` is None when ``real_stats`` is given (or only
            the IS is asked for); ``generated`` is None to only write ``save_stats``.
        features: ``"effnet-lite0"`` (offline), ``"inception"`` (standard; downloads unless ``weights_path``),
            the path of a local encoder (with ``architecture`` for a bare weight file), or an already built
            :class:`FeatureExtractor`.
        split: split of ``real`` (store split or sub-folder); ``generated_split`` likewise for ``generated``.
        weights_path: local weight file for the extractor (e.g. ``--inception-weights``).
        kid_subset_size: default ``min(1000, n_real, n_generated)`` (``n_real`` capped at KID_REFERENCE_ROWS).
        is_splits: Inception Score splits (reduced to the number of generated images if larger).
        real_stats: a file written by :func:`save_statistics`: its protocol must equal the extractor's, and the
            real images are not read at all.
        save_stats: write the statistics of ``real`` to this ``.npz`` file (refused if it exists, unless
            ``overwrite``); written before the generated images are read.
        metrics: any of ``"fid"``, ``"kid"``, ``"is"``; default: FID, KID and, when the extractor provides it, IS.
            Asking for ``"is"`` with an extractor without Inception logits is an error.

    Returns:
        ``fid``, ``kid_mean``, ``kid_std`` and ``is_mean``, ``is_std`` (those computed), ``n_real`` (when real
        images or statistics are used), ``n_generated``, ``features``, ``kid_subset_size``, ``kid_subsets``,
        ``real`` (what the real statistics describe), ``real_stats`` / ``saved_stats`` (paths, when given),
        ``generated`` (the folder read) and ``protocol``.
    """
    wanted = METRICS if metrics is None else tuple(dict.fromkeys(str(m).lower() for m in metrics))
    unknown = [m for m in wanted if m not in METRICS]
    if unknown or not wanted:
        raise HistosynthError(f"unknown metrics {unknown or list(wanted)}: choose from {', '.join(METRICS)}")
    uses_real = "fid" in wanted or "kid" in wanted
    if real is not None and real_stats is not None:
        raise HistosynthError("give the real images (--real) or their statistics (--real-stats), not both")
    if save_stats is not None and real is None:
        raise HistosynthError("--save-stats writes the statistics of the real images: it needs --real")
    if uses_real and real is None and real_stats is None:
        raise HistosynthError("FID / KID need the real images (--real) or their saved statistics (--real-stats)")
    if generated is None and save_stats is None:
        raise HistosynthError("no generated images given (--generated)")
    if save_stats is not None:  # before any work
        refuse_existing(Path(save_stats).expanduser(), overwrite, "statistics file")
    gen_root = resolve_generated(generated) if generated is not None else None

    if isinstance(features, FeatureExtractor):
        extractor = features.to(device).eval()
    else:
        extractor = load_feature_extractor(features, weights_path=weights_path, device=device,
                                           architecture=architecture)
    if "is" in wanted and not extractor.provides_inception_score:
        if metrics is not None:
            raise HistosynthError(
                f"the Inception Score needs Inception logits; --features {extractor.name} has none "
                "(use --features inception)"
            )
        wanted = tuple(m for m in wanted if m != "is")

    result: dict[str, Any] = {}
    ref: ReferenceStatistics | None = None
    if real_stats is not None and uses_real:  # checked before any image is read
        ref = load_statistics(real_stats, expected_protocol=extractor.protocol)
        result["real_stats"] = str(ref.path)
    elif real is not None and (uses_real or save_stats is not None):
        f_real, _ = extract_features(real, extractor, split, batch_size, device, progress, desc="real")
        if len(f_real) < 2:
            raise DataError(f"need at least 2 real images for FID / KID, found {len(f_real)}", real)
        source = _describe_real(real, split, len(f_real))
        if save_stats is not None:
            ref = save_statistics(save_stats, f_real, extractor.protocol, source, overwrite=overwrite)
            result["saved_stats"] = str(ref.path)
        else:
            ref = reference_statistics(f_real, extractor.protocol, source)
    if gen_root is None:  # only the statistics were asked for
        return {"n_real": ref.n, "features": extractor.name, "real": ref.source, **result,
                "protocol": json.loads(json.dumps(extractor.protocol))}

    f_gen, logits_gen = extract_features(gen_root, extractor, generated_split, batch_size, device, progress,
                                         desc="generated")
    n_gen = len(f_gen)
    if uses_real:
        if n_gen < 2:
            raise DataError(f"need at least 2 generated images for FID / KID, found {n_gen}", gen_root)
        if "fid" in wanted and min(ref.n, n_gen) <= extractor.num_features:
            warnings.warn(
                f"only {min(ref.n, n_gen)} images for {extractor.num_features}-d features: the covariance is "
                "singular and FID is strongly biased upwards; compare FIDs only at equal image counts",
                stacklevel=2,
            )

    metric_values: dict[str, Any] = {}
    if "fid" in wanted:
        mu_g, sig_g = feature_statistics(f_gen)
        metric_values["fid"] = frechet_distance(ref.mu, ref.sigma, mu_g, sig_g)
    if "kid" in wanted:
        subset = min(1000, len(ref.features), n_gen) if kid_subset_size is None else int(kid_subset_size)
        metric_values["kid_mean"], metric_values["kid_std"] = kernel_inception_distance(
            ref.features, f_gen, subsets=kid_subsets, subset_size=subset
        )
    if uses_real:
        metric_values["n_real"] = ref.n
    metric_values["n_generated"] = n_gen
    metric_values["features"] = extractor.name
    if "kid" in wanted:
        metric_values["kid_subset_size"], metric_values["kid_subsets"] = subset, kid_subsets
    if "is" in wanted:
        if logits_gen is None:
            raise HistosynthError(f"--features {extractor.name} returned no logits for the Inception Score")
        metric_values["is_mean"], metric_values["is_std"] = inception_score(logits_gen, splits=min(is_splits, n_gen))
        metric_values["is_splits"] = min(is_splits, n_gen)
    if uses_real:
        metric_values["real"] = ref.source
    metric_values.update(result)
    metric_values["generated"] = str(gen_root) + (f" (split {generated_split})" if generated_split else "")
    metric_values["protocol"] = json.loads(json.dumps(extractor.protocol))  # a plain, JSON-able copy
    return metric_values
