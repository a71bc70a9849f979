"""HistoSmithPipeline: an H&E image and its nuclei labels from counts per type and a tissue (HistoSmith, Sec. 2).

Top to bottom: the counts and tissue become the condition vector (conditions/counts.py) and its learned null;
DDIM denoises one joint latent with classifier-free guidance (diffusers' g: ε(∅) + g·(ε(c) − ε(∅)), one
batched pass for both); the joint autoencoder decodes the image and distance map (head A) and the semantic mask
(head B); instances are recovered by marker-controlled watershed on the distance map inside the mask's
foreground, each typed by the majority of the mask (:func:`~histosynth.data.nuclei_maps.instances_from_maps`,
the same function the evaluation uses); realised counts are counted on those labels.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from diffusers.utils import BaseOutput

from histosynth.conditions.counts import CountConditioner
from histosynth.data.nuclei_maps import PostprocessConfig, instances_from_maps
from histosynth.data.store import nuclei_per_type
from histosynth.diffusion.latent_sampling import denoise_latents
from histosynth.errors import HistosynthError
from histosynth.models.joint_autoencoder import JointVQModel
from histosynth.pipelines.loading import RunPipeline, latent_scaling

# what a setting left unset becomes when the saved recipe has no sampling section (DDIM 20, recipes/histosmith.py)
DEFAULT_SAMPLING = {"guidance_scale": 2.0, "num_inference_steps": 20, "eta": 0.0}


@dataclass
class HistoSmithPipelineOutput(BaseOutput):
    """images uint8 (B, H, W, 3); inst_maps int32 (B, H, W) (0 background, 1..N); type_maps int32 (B, H, W) (0
    background, 1..K); distance_maps float32 (B, H, W) in [0, 1]; requested_counts float64 (B, K); realised_counts
    int64 (B, K) (nuclei per type in the returned labels); tissues: the B tissue names."""

    images: np.ndarray
    inst_maps: np.ndarray
    type_maps: np.ndarray
    distance_maps: np.ndarray
    requested_counts: np.ndarray
    realised_counts: np.ndarray
    tissues: list
    num_steps_run: int


class HistoSmithPipeline(RunPipeline):
    model_cpu_offload_seq = "conditioner->unet->vae"

    def __init__(self, unet: UNet2DConditionModel, vae: JointVQModel, scheduler: DDIMScheduler,
                 conditioner: CountConditioner, latent_scaling_factor: float | None = None,
                 magnification: str | None = None, patch_size: int | None = None, sampling: dict | None = None,
                 postprocess: dict | None = None):
        super().__init__()
        self.register_modules(unet=unet, vae=vae, scheduler=scheduler, conditioner=conditioner)
        self.register_to_config(latent_scaling_factor=latent_scaling(vae, latent_scaling_factor), magnification=magnification,
                                patch_size=patch_size, sampling=sampling,
                                postprocess=postprocess or asdict(PostprocessConfig()))

    @property
    def class_names(self) -> list[str]:
        return list(self.conditioner.config.class_names)

    @property
    def tissues(self) -> list[str]:
        return list(self.conditioner.config.tissues)

    @torch.no_grad()
    def __call__(self, counts, tissue: str | list[str] | None = None, guidance_scale: float | None = None,
                 num_inference_steps: int | None = None, eta: float | None = None,
                 generator: torch.Generator | list[torch.Generator] | None = None, progress: bool = True,
                 warn_out_of_range: bool = True) -> HistoSmithPipelineOutput:
        """Generate one image and its labels per request.

        Args:
            counts: nuclei per type: a {type name: count} dict, a list of them, or a (B, K) array in the order of
                ``class_names``. Types not named are 0.
            tissue: a tissue name (for every request) or one per request; None: the only tissue of a model trained
                on one.
            guidance_scale: g (1 = conditional only); default the recipe's ``sampling.guidance_scale``.
            num_inference_steps: DDIM steps, exactly this many run; default the recipe's.
            eta: DDIM's η (0 = deterministic); default the recipe's ``sampling.eta``.
        Raises:
            HistosynthError: a wrong-length vector, a negative count, an unknown type or tissue, a step count
                outside 1..T. Requests outside the training range warn (the range is in the message).
        """
        g_scale, steps, eta = self.sampling_settings(DEFAULT_SAMPLING, guidance_scale=guidance_scale,
                                                     num_inference_steps=num_inference_steps, eta=eta)
        # 1. the requests → condition vectors (B, K+T) and their null
        if isinstance(counts, dict):
            counts = [counts]
        table = self.conditioner.count_table(counts)
        tissues = self._tissues(tissue, len(table))
        values = self.conditioner.vectors(table, tissues, warn=warn_out_of_range).to(self.device)
        do_guidance = g_scale != 1.0
        cond = self.conditioner(values, None)
        null = self.conditioner.null_condition(len(values))
        labels, tokens = _stack(null, cond) if do_guidance else (cond.class_labels, cond.tokens)

        # 2. one joint latent per request, denoised by exactly the number of DDIM steps asked
        latents = denoise_latents(self.unet, self.scheduler, steps, len(values), g_scale, eta=eta,
                                  generator=generator, progress_bar=self.progress_bar if progress else None,
                                  encoder_hidden_states=tokens, class_labels=labels)

        # 3. decode both heads, then recover instances from the distance map and the mask
        out = self.vae.decode_heads((latents / self.config.latent_scaling_factor).to(self.vae.dtype))
        images = ((out.image.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        distance = out.distance.float()[:, 0].cpu().numpy()
        probs = out.mask_logits.float().softmax(1).cpu().numpy()
        post = PostprocessConfig(**self.config.postprocess)
        maps = [instances_from_maps(p, d, post, probabilities=True) for p, d in zip(probs, distance)]
        inst = np.stack([m[0] for m in maps]).astype(np.int32)
        types = np.stack([m[1] for m in maps]).astype(np.int32)
        realised = np.array([list(nuclei_per_type(i, t, self.class_names).values()) for i, t in zip(inst, types)],
                            dtype=np.int64)
        return HistoSmithPipelineOutput(images=images, inst_maps=inst, type_maps=types, distance_maps=distance,
                                        requested_counts=table, realised_counts=realised, tissues=tissues,
                                        num_steps_run=steps)

    def _tissues(self, tissue, n: int) -> list[str]:
        if tissue is None:
            if len(self.tissues) != 1:
                raise HistosynthError(f"give a tissue: the model knows {', '.join(self.tissues)}")
            return [self.tissues[0]] * n
        tissues = [tissue] * n if isinstance(tissue, str) else list(tissue)
        if len(tissues) != n:
            raise HistosynthError(f"{len(tissues)} tissues for {n} count requests")
        return tissues


def _stack(null, cond):
    """(class_labels, tokens) of the batched unconditional + conditional pass (None where a path is off)."""
    labels = torch.cat([null.class_labels, cond.class_labels]) if cond.class_labels is not None else None
    tokens = torch.cat([null.tokens, cond.tokens]) if cond.tokens is not None else None
    return labels, tokens
