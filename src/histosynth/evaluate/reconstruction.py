"""Reconstruction quality of a first-stage autoencoder on held-out patches (PathLDM Table 2: SSIM, MSE; + PSNR), and
for HistoSmith's joint first stage also of the labels it decodes (HistoSmith, issue 10: both heads).

Protocol (written into every result): each patch x (uint8) is scaled to [-1, 1], encoded and decoded —
VQ: encoder → quantisation → decoder (what a latent diffusion sample goes through); KL: the posterior
mode (deterministic) → decoder — and the output is clamped to [-1, 1]. Metrics compare x/255 with
(x̂ + 1)/2, both float in [0, 1], with torchmetrics:

* SSIM: torchmetrics' SSIM map (``structural_similarity_index_measure(data_range=1, return_full_image=True)``:
  Gaussian window 11x11, σ = 1.5, K1 = 0.01, K2 = 0.03, per channel), averaged over the pixels at least 5 px
  from the border (where the window lies inside the image: Wang et al.'s reference code and scikit-image do
  this; torchmetrics' own mean also counts the reflect-padded border), then over channels and images;
* PSNR: ``PeakSignalNoiseRatio(data_range=1, dim=(1, 2, 3))``: per image, then averaged over images;
* MSE: ``MeanSquaredError`` over all pixel values of all images (equal-size images: the mean of per-image
  MSEs), on [0, 1]; ``mse_255`` is the same on the 0..255 scale (PathLDM does not state its scale);
* rFD (optional, with a feature extractor): the Fréchet distance between the features of the originals and of
  their reconstructions rounded to uint8 — LDM's rFID with Inception; it sees what pixel metrics forgive
  (blur, lost texture), which is what a patch-GAN trades PSNR for.

Joint first stage (:class:`~histosynth.models.joint_autoencoder.JointVQModel`, on a labelled store whose class
names are the model's): the encoder's input is the patch's joint input
(:func:`~histosynth.models.joint_autoencoder.pack_joint_input`: image, distance map, semantic one-hot, all in
[-1, 1]); encoder → quantisation → both decoder heads (``decode_heads``). The image metrics above are computed
exactly as for an image autoencoder, on head A's channels 0..2. The result adds a ``labels`` section, every
number pooled over all chosen patches:

* ``distance_mae``: mean |d̂ − d| over all pixels, d̂ head A's distance map and d the true one
  (:func:`~histosynth.data.nuclei_maps.distance_targets` of the store's instance map), both on [0, 1];
* ``mask_dice``: Dice of head B's argmax (over background + K types) against the store's type map, per type
  1..K (2·Σ|P∩T| / (Σ|P| + Σ|T|), pixels summed over all patches; NaN for a type absent from both) and for the
  foreground (type > 0 on both sides); ``mean_over_types``: the mean of the per-type values that are defined;
* ``instances``: instances recovered by :func:`~histosynth.data.nuclei_maps.instances_from_maps` (the rule
  the generation uses; default :class:`~histosynth.data.nuclei_maps.PostprocessConfig` unless given) from
  (softmax of head B's logits, head A's distance map), scored against the store's instance and type maps as
  :func:`~histosynth.evaluate.segmenter.score_segmentation` does (CoNIC convention: TP / FP / FN / ΣIoU
  summed over all patches, then PQ+, per-type PQ and mPQ+; ``dice`` / ``aji`` per patch, then averaged);
* ``instances_from_true_maps``: the same scores when ``instances_from_maps`` is given the TRUE one-hot mask
  and the TRUE distance map — the ceiling of ``instances``: what the recovery rule alone loses.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from diffusers import VQModel
from torchmetrics import MeanSquaredError
from torchmetrics.functional.image import structural_similarity_index_measure
from torchmetrics.image import PeakSignalNoiseRatio

from histosynth.data.nuclei_maps import PostprocessConfig, distance_targets, instances_from_maps
from histosynth.data.store import PatchStore
from histosynth.evaluate.features import FeatureExtractor
from histosynth.evaluate.fid import feature_statistics, frechet_distance
from histosynth.evaluate.instance_metrics import PQAccumulator, aggregated_jaccard_index, dice
from histosynth.errors import DataError, HistosynthError
from histosynth.models.autoencoders import autoencoder_kind, latent_channels_of
from histosynth.models.joint_autoencoder import JointDecoderOutput, JointVQModel, pack_joint_input

__all__ = ["ReconstructionMetrics", "LabelMetrics", "ReconstructionEvaluation", "reconstruct", "reconstruct_joint",
           "evaluate_reconstruction", "PROTOCOL", "JOINT_PROTOCOL"]

PROTOCOL = {
    "input": "uint8 patch / 127.5 - 1 -> encode -> (vq: quantise | kl: posterior mode) -> decode -> clamp [-1, 1]",
    "range": "metrics on [0, 1]: x / 255 vs (x_hat + 1) / 2, float (not re-quantised to uint8)",
    "ssim": "torchmetrics SSIM map (data_range=1, gaussian 11x11, sigma 1.5, k1 0.01, k2 0.03, per channel), "
            "mean over pixels >= 5 px from the border (as scikit-image / Wang et al.), then over channels and images",
    "psnr": "torchmetrics PeakSignalNoiseRatio(data_range=1, dim=(1,2,3)): per image, mean over images (dB)",
    "mse": "torchmetrics MeanSquaredError over all pixel values, [0, 1] scale; mse_255 = mse * 255^2",
}

#: what a joint (image + distance map + semantic mask) first stage's result adds to / changes in :data:`PROTOCOL`
JOINT_PROTOCOL = {
    "input": "joint input (pack_joint_input: uint8 image / 127.5 - 1, 2 * distance map - 1, 2 * semantic one-hot - 1) "
             "-> encode -> quantise -> decode_heads: head A image (channels 0..2, clamp [-1, 1]) + distance map "
             "[0, 1], head B mask logits (background + K types); image metrics on channels 0..2 as for an image "
             "autoencoder",
    "distance_mae": "mean |decoded - true| distance map over all pixels of all patches, both on [0, 1] "
                    "(true: distance_targets of the store's instance map)",
    "mask_dice": "argmax of the mask logits vs the store's type map; per type 1..K and foreground (type > 0): "
                 "2 * sum|P & T| / (sum|P| + sum|T|), pixels summed over all patches (NaN: absent from both); "
                 "mean_over_types: mean of the defined per-type values",
    "instances": "instances_from_maps(softmax(mask logits), decoded distance map, probabilities=True) vs the store's "
                 "inst/type maps, aggregated as score_segmentation (CoNIC: TP/FP/FN/sum IoU summed over patches -> "
                 "pq, dq, sq, per-type PQ, mpq = mean of defined per-type PQ; dice (DICE1) and aji per patch, then "
                 "mean; pq_image_mean: mean of per-patch PQ); IoU >= 0.5 matches",
    "instances_from_true_maps": "the same scores with instances_from_maps given the TRUE one-hot mask and the TRUE "
                                "distance map: the ceiling of 'instances' (what the recovery rule alone loses)",
}


class ReconstructionMetrics:
    """Accumulate SSIM / PSNR / MSE over batches of (original, reconstruction), float (B, 3, H, W) in [0, 1]."""

    SSIM_BORDER = 5  # half the 11-pixel window

    def __init__(self, device: torch.device | str = "cpu"):
        self.ssim_sum = 0.0
        self.psnr = PeakSignalNoiseRatio(data_range=1.0, dim=(1, 2, 3), reduction="elementwise_mean").to(device)
        self.mse = MeanSquaredError().to(device)
        self.count = 0

    def update(self, original: torch.Tensor, reconstruction: torch.Tensor) -> None:
        original, reconstruction = original.float().contiguous(), reconstruction.float().contiguous()
        _, ssim_map = structural_similarity_index_measure(reconstruction, original, data_range=1.0, reduction="none",
                                                          return_full_image=True)
        b = self.SSIM_BORDER
        self.ssim_sum += float(ssim_map[..., b:-b, b:-b].double().mean(dim=(1, 2, 3)).sum())
        self.psnr.update(reconstruction, original)
        self.mse.update(reconstruction, original)
        self.count += original.shape[0]

    def compute(self) -> dict[str, float]:
        if not self.count:
            raise ValueError("no images were added")
        mse = float(self.mse.compute())
        return {"ssim": self.ssim_sum / self.count, "psnr": float(self.psnr.compute()), "mse": mse,
                "mse_255": mse * 255.0**2, "images": self.count}


class _InstanceScores:
    """:func:`~histosynth.evaluate.segmenter.score_segmentation`'s numbers, accumulated one patch at a time (the
    maps of a whole split are not kept): PQAccumulator for PQ+ / per-type PQ / mPQ+, per-patch DICE1 and AJI."""

    def __init__(self, class_names):
        self.names = list(class_names)
        self.pq = PQAccumulator(len(self.names))
        self.dices: list[float] = []
        self.ajis: list[float] = []

    def update(self, true_inst, true_type, pred_inst, pred_type) -> None:
        self.dices.append(dice(pred_inst, true_inst))
        self.ajis.append(aggregated_jaccard_index(true_inst, pred_inst))
        self.pq.update(true_inst, true_type, pred_inst, pred_type)

    def compute(self) -> dict:
        res = self.pq.compute()
        return {
            "dice": float(np.mean(self.dices)) if self.dices else float("nan"),
            "aji": float(np.mean(self.ajis)) if self.ajis else float("nan"),
            "pq": res["pq"], "dq": res["dq"], "sq": res["sq"], "mpq": res["mpq"],
            "pq_per_type": {self.names[k - 1]: v for k, v in res["pq_per_type"].items()},
            "pq_image_mean": res["pq_image_mean"],
            "n_images": res["n_images"],
        }


def _dice(inter: float, a: float, b: float) -> float:
    return 2.0 * inter / (a + b) if a + b > 0 else float("nan")


class LabelMetrics:
    """Accumulate the ``labels`` section of a joint first stage's result (see the module docstring) over patches.

    ``update`` takes one batch as numpy: true instance and type maps (B, H, W), true distance maps (B, H, W) in
    [0, 1], decoded distance maps (B, H, W) in [0, 1] and mask probabilities (B, K + 1, H, W) (softmax of head B's
    logits; channel 0 background). It returns the recovered (inst, type) maps of the batch.
    """

    def __init__(self, class_names, postprocess: PostprocessConfig | None = None):
        self.names = list(class_names)
        self.k = len(self.names)
        self.postprocess = postprocess or PostprocessConfig()
        self.abs_error = 0.0
        self.pixels = 0
        self.inter = np.zeros(self.k + 1)  # index 0: foreground; 1..K: types
        self.pred = np.zeros(self.k + 1)
        self.true = np.zeros(self.k + 1)
        self.decoded = _InstanceScores(self.names)
        self.ceiling = _InstanceScores(self.names)

    def update(self, true_inst, true_type, true_distance, distance, probs) -> tuple[np.ndarray, np.ndarray]:
        true_inst, true_type = np.asarray(true_inst), np.asarray(true_type).astype(np.int64)
        true_distance, distance = np.asarray(true_distance, np.float64), np.asarray(distance, np.float64)
        probs = np.asarray(probs, np.float32)
        self.abs_error += float(np.abs(distance - true_distance).sum())
        self.pixels += true_distance.size
        argmax = probs.argmax(1)
        for k, (p, t) in enumerate([(argmax > 0, true_type > 0)] + [(argmax == k, true_type == k)
                                                                       for k in range(1, self.k + 1)]):
            self.inter[k] += np.count_nonzero(p & t)
            self.pred[k] += np.count_nonzero(p)
            self.true[k] += np.count_nonzero(t)
        onehot_ids = np.arange(self.k + 1)[:, None, None]
        pred_insts, pred_types = [], []
        for ti, tt, td, d, p in zip(true_inst, true_type, true_distance, distance, probs):
            pi, pt = instances_from_maps(p, d, self.postprocess, probabilities=True)
            self.decoded.update(ti, tt, pi, pt)
            ci, ct = instances_from_maps((onehot_ids == tt[None]).astype(np.float32), td, self.postprocess,
                                         probabilities=True)
            self.ceiling.update(ti, tt, ci, ct)
            pred_insts.append(pi)
            pred_types.append(pt)
        return np.stack(pred_insts), np.stack(pred_types)

    def compute(self) -> dict:
        if not self.pixels:
            raise ValueError("no images were added")
        per_type = {name: _dice(self.inter[k], self.pred[k], self.true[k]) for k, name in enumerate(self.names, 1)}
        defined = [v for v in per_type.values() if not np.isnan(v)]
        return {
            "distance_mae": self.abs_error / self.pixels,
            "mask_dice": {"foreground": _dice(self.inter[0], self.pred[0], self.true[0]), "per_type": per_type,
                          "mean_over_types": float(np.mean(defined)) if defined else float("nan")},
            "instances": self.decoded.compute(),
            "instances_from_true_maps": self.ceiling.compute(),
        }


class ReconstructionEvaluation(tuple):
    """What :func:`evaluate_reconstruction` returns: unpacks (and indexes) as ``(result, originals,
    reconstructions)``; ``labels_true`` / ``labels_decoded`` hold the joint model's label pictures of the same
    patches (empty for an image autoencoder), and :meth:`grid_rows` the PNG's layout."""

    def __new__(cls, result, originals, recons, labels_true=(), labels_decoded=()):
        self = super().__new__(cls, (result, originals, recons))
        self.labels_true, self.labels_decoded = list(labels_true), list(labels_decoded)
        return self

    @property
    def result(self) -> dict:
        return self[0]

    @property
    def joint(self) -> bool:
        return bool(self.labels_true)

    def grid_rows(self) -> list[list[np.ndarray]]:
        """Image autoencoder: originals (top row) over reconstructions (bottom row). Joint model: one row per patch,
        original | reconstruction | true labels | decoded labels."""
        if not self.joint:
            return [self[1], self[2]]
        return [list(t) for t in zip(self[1], self[2], self.labels_true, self.labels_decoded)]


@torch.no_grad()
def reconstruct(ae, images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float reconstructions in [0, 1] (VQ: quantised; KL: posterior mode)."""
    device = next(ae.parameters()).device
    x = images.to(device).float() / 127.5 - 1.0
    if isinstance(ae, VQModel):
        out = ae.decode(ae.encode(x).latents).sample
    else:
        out = ae.decode(ae.encode(x).latent_dist.mode()).sample
    return ((out.float().clamp(-1, 1) + 1) / 2)


@torch.no_grad()
def reconstruct_joint(ae: JointVQModel, inputs: torch.Tensor) -> JointDecoderOutput:
    """Joint inputs (B, 5 + K, H, W) in [-1, 1] (:func:`pack_joint_input`) -> encode -> quantise -> both heads, float:
    image (B, 3, H, W) in [0, 1] (clamped as :func:`reconstruct`), distance (B, 1, H, W) in [0, 1], mask_logits."""
    device = next(ae.parameters()).device
    out = ae.decode_heads(ae.encode(inputs.to(device).float()).latents)
    return JointDecoderOutput(image=(out.image.float().clamp(-1, 1) + 1) / 2, distance=out.distance.float(),
                              mask_logits=out.mask_logits.float(), commit_loss=out.commit_loss)


def _check_joint_store(ae: JointVQModel, store: PatchStore) -> None:
    if not store.has_labels:
        raise DataError("the joint autoencoder (image + distance map + semantic mask) needs a labelled store; this "
                        "store has images only (use a store made by `prepare nuclei`)", store.path)
    names = ae.config.class_names
    model_names = list(names) if names is not None else None
    if (model_names is not None and model_names != list(store.class_names)) \
            or len(store.class_names) != int(ae.config.num_classes):
        raise DataError(f"the store's classes {list(store.class_names)} differ from the joint autoencoder's "
                        f"{model_names if model_names is not None else f'{ae.config.num_classes} types'}", store.path)


def _labels_picture(inst: np.ndarray, types: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3): the type map in its palette colours with each instance's inner border in white."""
    from skimage.segmentation import find_boundaries

    from histosynth.viz import colour_mask

    return colour_mask(np.asarray(types), find_boundaries(np.asarray(inst), mode="inner"))


def evaluate_reconstruction(
    ae,
    store: str | Path | PatchStore,
    *,
    split: str | None = "test",
    num: int | None = None,
    seed: int = 0,
    batch_size: int = 8,
    grid_images: int = 8,
    extractor: FeatureExtractor | None = None,
    postprocess: PostprocessConfig | None = None,
) -> ReconstructionEvaluation:
    """Metrics (with protocol) of ``ae`` on ``num`` patches of ``split`` (all when None; otherwise drawn by
    ``seed``), and the first ``grid_images`` originals and reconstructions as uint8 (H, W, 3) arrays.
    With ``extractor`` the metrics also hold ``rfd``, the Fréchet distance of reconstructions to originals.

    A :class:`~histosynth.models.joint_autoencoder.JointVQModel` is fed each patch's joint input and the result
    gains a ``labels`` section (module docstring; instances recovered with ``postprocess``, default
    :class:`PostprocessConfig`); the store must be labelled, with the model's class names."""
    store = store if isinstance(store, PatchStore) else PatchStore(store)
    joint = isinstance(ae, JointVQModel)
    if joint:
        _check_joint_store(ae, store)
    indices = store.indices(split)
    if not indices:
        raise DataError(f"the store has no {split!r} patches", store.path)
    if num is not None:
        if num < 1:
            raise HistosynthError(f"--num must be at least 1, got {num}")
        if num < len(indices):
            chosen = np.random.default_rng(seed).choice(len(indices), size=num, replace=False)
            indices = [indices[i] for i in sorted(chosen)]
    factor = 2 ** (len(ae.config.block_out_channels) - 1)
    if store.patch_size % factor:
        raise HistosynthError(f"{store.patch_size} px patches are not a multiple of the autoencoder's "
                              f"downsampling factor {factor}", store.path)
    ae.eval()
    device = next(ae.parameters()).device
    metrics = ReconstructionMetrics(device)
    labels = LabelMetrics(store.class_names, postprocess) if joint else None
    if extractor is not None and len(indices) < 2:
        raise HistosynthError(f"rFD needs at least 2 patches, the selection has {len(indices)}", store.path)
    originals, recons = [], []
    labels_true, labels_decoded = [], []
    feats_real, feats_rec = [], []
    fdev = next(iter(extractor.parameters())).device if extractor is not None else None
    for i in range(0, len(indices), batch_size):
        items = [store[j] for j in indices[i : i + batch_size]]
        images = torch.stack([torch.from_numpy(np.ascontiguousarray(it["image"])).permute(2, 0, 1) for it in items])
        if joint:
            k = len(store.class_names)
            inputs = torch.from_numpy(np.stack([pack_joint_input(it["image"], it["inst_map"], it["type_map"], k)
                                                for it in items]))
            out = reconstruct_joint(ae, inputs)
            rec = out.image
            true_inst = np.stack([np.asarray(it["inst_map"]) for it in items])
            true_type = np.stack([np.asarray(it["type_map"]) for it in items])
            pred_inst, pred_type = labels.update(
                true_inst, true_type, np.stack([distance_targets(t) for t in true_inst]),
                out.distance[:, 0].cpu().numpy(), out.mask_logits.softmax(1).cpu().numpy())
        else:
            rec = reconstruct(ae, images)
        metrics.update(images.to(device).float() / 255.0, rec)
        rec_u8 = (rec * 255).round().byte()  # what a saved image holds: the features and the grid see this
        if extractor is not None:
            with torch.inference_mode():
                feats_real.append(extractor(images.to(fdev)).double().cpu().numpy())
                feats_rec.append(extractor(rec_u8.to(fdev)).double().cpu().numpy())
        for n, (a, b) in enumerate(zip(images, rec_u8)):
            if len(originals) < grid_images:
                originals.append(a.permute(1, 2, 0).numpy())
                recons.append(b.permute(1, 2, 0).cpu().numpy())
                if joint:
                    labels_true.append(_labels_picture(true_inst[n], true_type[n]))
                    labels_decoded.append(_labels_picture(pred_inst[n], pred_type[n]))
    latent = store.patch_size // factor
    values = metrics.compute()
    protocol = dict(PROTOCOL)
    if joint:
        protocol.update(JOINT_PROTOCOL)
        protocol["postprocess"] = asdict(labels.postprocess)
        protocol["class_names"] = list(store.class_names)
    if extractor is not None:
        values["rfd"] = frechet_distance(*feature_statistics(np.concatenate(feats_real)),
                                         *feature_statistics(np.concatenate(feats_rec)))
        protocol["rfd"] = {"features": extractor.protocol, "compared": "originals (uint8) vs reconstructions "
                           "rounded to uint8, same patches; Fréchet distance of Gaussian fits (the FID formula)"}
    result = {
        "metrics": values,
        "protocol": {**protocol, "store": str(store.path), "split": split, "patch_size": store.patch_size,
                     "magnification": store.magnification, "num_patches": len(indices),
                     "selection": "all patches of the split" if num is None or num >= len(store.indices(split))
                     else f"{len(indices)} drawn without replacement by numpy default_rng({seed})"},
        "autoencoder": {"class": type(ae).__name__, "kind": autoencoder_kind(ae), "downsampling_factor": factor,
                        "latent_shape": [latent, latent, latent_channels_of(ae)],
                        "scaling_factor": float(ae.config.scaling_factor)},
    }
    if joint:
        result["labels"] = labels.compute()
    return ReconstructionEvaluation(result, originals, recons, labels_true, labels_decoded)
