"""DISCPipeline: H&E tiles whose patterns follow a region mask (DISC, Ho et al.).

    pipe = DISCPipeline.from_pretrained("RUN")                 # a disc run, or a saved pipeline folder
    out = pipe(masks)                                          # SD: int (B, H, W) labels 0..K-1
    out = pipe(masks, separated="final")                       # SD-SC: separated conditions, fused at the end

Reads top to bottom (DISC Sec. 2):
1. The condition: the mask encoder τθ turns each region mask into cross-attention tokens (and, when the model was
   trained so, its one-hot nearest-downsampled to the latent is concatenated to the UNet input); ∅ is its learned null
   tokens (and zeros).
2. Sampling, DDIM (the paper: 200 steps; default 50, which matched it within noise) with classifier-free guidance
   ε̂ = ε(∅) + g·(ε(c) − ε(∅)):
   - ``separated="none"`` (SD): each image is denoised under its whole mask.
   - ``separated="final"`` (SD-SC, the paper's): one noise z_T per image is duplicated for each label present in its
     mask (at the latent's resolution: a label no latent pixel keeps would fuse to nothing); each copy is denoised under the uniform mask of its label; the results are fused by the mask
     nearest-downsampled to the latent (eq. 2: z0^mixed = Σ_k z0^k · m_k). Only present labels are run, so an image
     costs (labels present) × SD.
   - ``separated="every-step"``: the same branches, fused after every DDIM step, each branch continuing from the
     fused latent (the branches then agree at region borders throughout).
   All branches of a batch run in one batched UNet pass per step.
3. The frozen VQ-f4 autoencoder decodes (quantising first, as LDM's VQ first stage does).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from histosynth.diffusion.latent_sampling import denoise_latents
from histosynth.diffusion.sampling_loop import check_num_steps
from histosynth.errors import HistosynthError
from histosynth.models.region_mask_encoder import RegionMaskEncoder, one_hot_masks
from histosynth.pipelines.loading import RunPipeline, latent_scaling

SEPARATED = ("none", "final", "every-step")
# what a setting left unset becomes when the saved recipe has no sampling section (the paper: DDIM 200, g 1.75;
# DDIM 50 matched DDIM 200 within noise, recipes/disc.py)
DEFAULT_SAMPLING = {"guidance_scale": 1.75, "num_inference_steps": 50, "separated": "none", "eta": 0.0}


def downsample_masks(masks: torch.Tensor, size: int) -> torch.Tensor:
    """int (B, size, size) nearest-neighbour downsampling of int (B, H, W) masks at output pixel centres
    (latent pixel i takes mask pixel ⌊(i + ½)·H/size⌋), as DISC's fusion masks m_k (Sec. 2.3)."""
    h, w = masks.shape[-2:]
    rows = ((torch.arange(size) + 0.5) * h / size).long().clamp(max=h - 1)
    cols = ((torch.arange(size) + 0.5) * w / size).long().clamp(max=w - 1)
    return masks[:, rows][:, :, cols]


def separated_branches(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(image index, label) int64 (R,) of every branch SD-SC runs: one per label present in each mask, in image
    order then label order."""
    images, labels = [], []
    for b, mask in enumerate(masks):
        for label in torch.unique(mask).tolist():
            images.append(b)
            labels.append(int(label))
    return torch.tensor(images, dtype=torch.long), torch.tensor(labels, dtype=torch.long)


def fuse_latents(branch_latents: torch.Tensor, images: torch.Tensor, labels: torch.Tensor,
                 small_masks: torch.Tensor) -> torch.Tensor:
    """DISC eq. 2: z^mixed_b = Σ_k z^k_b · m_k, m_k = [small_masks_b == k], over the branches (images, labels) of
    ``branch_latents`` (R, C, h, w); ``small_masks`` int (B, h, w) at the latent's size. Returns (B, C, h, w)."""
    binary = (small_masks[images] == labels[:, None, None].to(small_masks.device)).to(branch_latents.dtype)
    fused = torch.zeros((len(small_masks),) + branch_latents.shape[1:], dtype=branch_latents.dtype,
                        device=branch_latents.device)
    return fused.index_add_(0, images.to(branch_latents.device), branch_latents * binary[:, None])


@dataclass
class DISCPipelineOutput(BaseOutput):
    """images uint8 (B, H, W, 3), None with ``output_type="latent"``; masks int32 (B, H, W) the conditions;
    latents float32 (B, C, h, w) before decoding (scaled, as the UNet samples them); unet_passes: UNet evaluations
    per image (steps × branches × (2 with guidance)), the cost SC multiplies."""

    images: np.ndarray | None
    masks: np.ndarray
    latents: np.ndarray
    separated: str
    num_steps_run: int
    unet_passes: list


class DISCPipeline(RunPipeline):
    model_cpu_offload_seq = "mask_encoder->unet->vae"

    def __init__(self, unet: UNet2DConditionModel, vae, scheduler: DDIMScheduler, mask_encoder: RegionMaskEncoder,
                 latent_scaling_factor: float | None = None, magnification: str | None = None,
                 patch_size: int | None = None, injection: str = "cross-attention", sampling: dict | None = None):
        super().__init__()
        self.register_modules(unet=unet, vae=vae, scheduler=scheduler, mask_encoder=mask_encoder)
        self.register_to_config(latent_scaling_factor=latent_scaling(vae, latent_scaling_factor), magnification=magnification,
                                patch_size=patch_size, injection=injection, sampling=sampling)

    @property
    def label_names(self) -> list[str]:
        names = self.mask_encoder.config.label_names
        return list(names) if names else [str(k) for k in range(self.mask_encoder.config.num_labels)]

    def conditions(self, masks: torch.Tensor, guided: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(tokens, concatenated channels or None) of int masks (B, H, W), stacked [∅; c] when ``guided``; in the mask
        encoder's dtype (denoise_latents casts them to the UNet's)."""
        tokens = self.mask_encoder(masks)
        concat = None
        if self.config.injection == "cross-attention+concat":
            small = downsample_masks(masks, self.unet.config.sample_size)
            concat = one_hot_masks(small, self.mask_encoder.config.num_labels).to(self.unet.device, tokens.dtype)
        if guided:
            tokens = torch.cat([self.mask_encoder.null_condition(len(tokens)).to(tokens.dtype), tokens])
            concat = None if concat is None else torch.cat([torch.zeros_like(concat), concat])
        return tokens, concat

    @torch.no_grad()
    def __call__(self, masks, guidance_scale: float | None = None, num_inference_steps: int | None = None,
                 separated: str | None = None, eta: float | None = None,
                 generator: torch.Generator | list[torch.Generator] | None = None, output_type: str = "np",
                 progress: bool = True) -> DISCPipelineOutput:
        """Generate one tile per mask.

        Args:
            masks: int (B, H, W) region labels 0..K-1 (numpy or torch), H = W = the model's patch size.
            guidance_scale: g (1 = conditional only); default the recipe's.
            num_inference_steps: DDIM steps, exactly this many run; default the recipe's (50; paper 200).
            separated: "none" (SD), "final" (SD-SC, eq. 2 at the end) or "every-step"; default the recipe's.
            eta: DDIM's η (default the recipe's, 0).
            generator: one, or one per image (each image's z_T from its own).
            output_type: "np" (decoded tiles) or "latent" (no decoding, ``images`` None: what the distillation set
                keeps; at 256 px decoding is a large share of a short call).
        Raises:
            HistosynthError: masks of the wrong size or with labels outside 0..K-1, an unknown ``separated`` or
                ``output_type``, a step count outside 1..T.
        """
        g_scale, steps, separated, eta = self.sampling_settings(
            DEFAULT_SAMPLING, guidance_scale=guidance_scale, num_inference_steps=num_inference_steps, separated=separated,
            eta=eta)
        if separated not in SEPARATED:
            raise HistosynthError(f"separated must be one of {', '.join(SEPARATED)}, got {separated!r}")
        if output_type not in ("np", "latent"):
            raise HistosynthError(f"output_type must be 'np' or 'latent', got {output_type!r}")
        masks = self._check_masks(masks)
        check_num_steps(self.scheduler, steps)
        guided = g_scale != 1.0
        size, channels = self.unet.config.sample_size, self.unet.config.out_channels
        # one z_T per image, from its own generator when given a list
        z_t = randn_tensor((len(masks), channels, size, size), generator=generator, device=self.unet.device,
                           dtype=torch.float32)
        progress_bar = self.progress_bar if progress else None

        # 1-2. SD: each image under its whole mask
        if separated == "none":
            tokens, concat = self.conditions(masks, guided)
            latents = denoise_latents(self.unet, self.scheduler, steps, len(masks), g_scale, eta=eta,
                                      generator=generator, progress_bar=progress_bar, latents=z_t, concat=concat,
                                      encoder_hidden_states=tokens)
            passes = [steps * (2 if guided else 1)] * len(masks)
        # 1-2. SD-SC: one branch per present label, from the image's z_T, under that label's uniform mask; fused by eq. 2
        else:
            small = downsample_masks(masks, size).to(self.unet.device)
            images, labels = separated_branches(small)  # labels that survive in the latent's mask: the others fuse to nothing
            uniform = labels[:, None, None].expand(-1, *masks.shape[-2:]).to(masks.device)
            tokens, concat = self.conditions(uniform, guided)
            branch_images, branch_labels = images.to(small.device), labels.to(small.device)  # once, not every step
            fuse = lambda z: fuse_latents(z, branch_images, branch_labels, small)  # noqa: E731
            every = (lambda z: fuse(z)[branch_images]) if separated == "every-step" else None
            # η > 0 draws step noise per branch: a branch uses its image's generator
            branch_generator = [generator[b] for b in images.tolist()] if isinstance(generator, list) else generator
            branches = denoise_latents(self.unet, self.scheduler, steps, len(images), g_scale, eta=eta,
                                       generator=branch_generator, progress_bar=progress_bar,
                                       latents=z_t[branch_images],
                                       concat=concat, after_step=every, encoder_hidden_states=tokens)
            latents = fuse(branches)
            per_image = torch.bincount(images, minlength=len(masks)).tolist()
            passes = [steps * n * (2 if guided else 1) for n in per_image]

        # 3. decode with the frozen first stage
        images_out = None
        if output_type == "np":
            decoded = self.vae.decode((latents / self.config.latent_scaling_factor).to(self.vae.dtype)).sample
            images_out = ((decoded.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
            images_out = images_out.cpu().numpy()
        return DISCPipelineOutput(images=images_out, masks=masks.cpu().numpy().astype(np.int32),
                                  latents=latents.float().cpu().numpy(), separated=separated, num_steps_run=steps,
                                  unet_passes=passes)

    def _check_masks(self, masks) -> torch.Tensor:
        masks = torch.as_tensor(np.asarray(masks) if not torch.is_tensor(masks) else masks)
        if masks.dtype.is_floating_point or masks.dtype.is_complex or masks.dtype == torch.bool:
            raise HistosynthError(f"masks must hold integer region labels, got {masks.dtype}")
        masks = masks.long()
        size, k = self.mask_encoder.config.mask_size, self.mask_encoder.config.num_labels
        if masks.ndim == 2:
            masks = masks[None]
        if masks.ndim != 3 or masks.shape[-2:] != (size, size):
            raise HistosynthError(f"masks must be (B, {size}, {size}) region labels, got shape {tuple(masks.shape)}")
        if masks.numel() and (int(masks.min()) < 0 or int(masks.max()) >= k):
            raise HistosynthError(f"mask labels {int(masks.min())}..{int(masks.max())} outside this model's 0..{k - 1} "
                                  f"({', '.join(self.label_names)})")
        return masks.to(self.unet.device)
