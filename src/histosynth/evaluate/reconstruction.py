"""Reconstruction quality of a first-stage autoencoder on held-out patches (PathLDM Table 2: SSIM, MSE; + PSNR).

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
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import VQModel
from torchmetrics import MeanSquaredError
from torchmetrics.functional.image import structural_similarity_index_measure
from torchmetrics.image import PeakSignalNoiseRatio

from histosynth.data.store import PatchStore
from histosynth.evaluate.features import FeatureExtractor
from histosynth.evaluate.fid import feature_statistics, frechet_distance
from histosynth.errors import DataError, HistosynthError
from histosynth.models.autoencoders import autoencoder_kind, latent_channels_of

__all__ = ["ReconstructionMetrics", "reconstruct", "evaluate_reconstruction", "PROTOCOL"]

PROTOCOL = {
    "input": "uint8 patch / 127.5 - 1 -> encode -> (vq: quantise | kl: posterior mode) -> decode -> clamp [-1, 1]",
    "range": "metrics on [0, 1]: x / 255 vs (x_hat + 1) / 2, float (not re-quantised to uint8)",
    "ssim": "torchmetrics SSIM map (data_range=1, gaussian 11x11, sigma 1.5, k1 0.01, k2 0.03, per channel), "
            "mean over pixels >= 5 px from the border (as scikit-image / Wang et al.), then over channels and images",
    "psnr": "torchmetrics PeakSignalNoiseRatio(data_range=1, dim=(1,2,3)): per image, mean over images (dB)",
    "mse": "torchmetrics MeanSquaredError over all pixel values, [0, 1] scale; mse_255 = mse * 255^2",
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
) -> tuple[dict, list[np.ndarray], list[np.ndarray]]:
    """Metrics (with protocol) of ``ae`` on ``num`` patches of ``split`` (all when None; otherwise drawn by
    ``seed``), and the first ``grid_images`` originals and reconstructions as uint8 (H, W, 3) arrays.
    With ``extractor`` the metrics also hold ``rfd``, the Fréchet distance of reconstructions to originals."""
    store = store if isinstance(store, PatchStore) else PatchStore(store)
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
    if extractor is not None and len(indices) < 2:
        raise HistosynthError(f"rFD needs at least 2 patches, the selection has {len(indices)}", store.path)
    originals, recons = [], []
    feats_real, feats_rec = [], []
    fdev = next(iter(extractor.parameters())).device if extractor is not None else None
    for i in range(0, len(indices), batch_size):
        images = torch.stack([torch.from_numpy(np.ascontiguousarray(store[j]["image"])).permute(2, 0, 1)
                              for j in indices[i : i + batch_size]])
        rec = reconstruct(ae, images)
        metrics.update(images.to(device).float() / 255.0, rec)
        rec_u8 = (rec * 255).round().byte()  # what a saved image holds: the features and the grid see this
        if extractor is not None:
            with torch.inference_mode():
                feats_real.append(extractor(images.to(fdev)).double().cpu().numpy())
                feats_rec.append(extractor(rec_u8.to(fdev)).double().cpu().numpy())
        for a, b in zip(images, rec_u8):
            if len(originals) < grid_images:
                originals.append(a.permute(1, 2, 0).numpy())
                recons.append(b.permute(1, 2, 0).cpu().numpy())
    latent = store.patch_size // factor
    values = metrics.compute()
    protocol = dict(PROTOCOL)
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
    return result, originals, recons
