"""HistoSmith's first stage on the one engine: a :class:`~histosynth.models.joint_autoencoder.JointVQModel` trained on
image + distance map + semantic mask of a labelled store (HistoSmith, Sec. 2).

The image autoencoder's task with three changes: the items carry their instance and type maps, cropped and
turned together with the image (the distance map is computed on the crop, so nuclei cut by the crop edge get
their own border there, as in any patch); the model has two decoder heads; the loss adds the distance-map and
mask terms (:mod:`histosynth.diffusion.joint_autoencoder_loss`). Same run directory, exact resume and export
(``RUN/autoencoder``: the JointVQModel with scaling_factor = 1/std of its latents).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from histosynth.data.dataset import LabelledPatchDataset
from histosynth.diffusion.autoencoder_loss import make_perceptual
from histosynth.diffusion.joint_autoencoder_loss import class_weights_from_frequency, joint_autoencoder_loss
from histosynth.errors import DataError
from histosynth.models.autoencoders import block_types
from histosynth.models.joint_autoencoder import JointVQModel, joint_batch, pack_joint_input
from histosynth.recipes.histosmith import JointAutoencoderRecipe
from histosynth.training.autoencoder import (
    AutoencoderTask,
    crop_and_turn,
    init_codebook_from_data,
)


class JointReconstruction(nn.Module):
    """The training forward as one module (one forward for DDP): (head A, head B logits, VQ loss, code indices)."""

    def __init__(self, ae: JointVQModel):
        super().__init__()
        self.ae = ae
        self.discriminator = None  # the image task's parameter groups look for it

    def forward(self, x: torch.Tensor):
        return self.ae.reconstruct(x)


def make_joint_model(recipe: JointAutoencoderRecipe, class_names) -> JointVQModel:
    m = recipe.model
    down, up = block_types(len(m.block_out_channels), m.attention_levels)
    return JointVQModel(
        num_classes=len(class_names), class_names=tuple(class_names), down_block_types=down, up_block_types=up,
        block_out_channels=tuple(m.block_out_channels), layers_per_block=m.layers_per_block,
        latent_channels=m.latent_channels, num_vq_embeddings=m.num_vq_embeddings, vq_embed_dim=m.vq_embed_dim,
        norm_num_groups=m.norm_num_groups, mid_block_add_attention=m.mid_block_attention, sample_size=recipe.patch_size,
    )


class JointAutoencoderTask(AutoencoderTask):
    plot_columns = {"loss": "loss", "l1": "image l1", "perceptual": "perceptual", "distance_l1": "distance-map l1",
                    "cross_entropy": "mask cross-entropy", "tversky": "mask Tversky", "vq": "vq",
                    "codes": "codebook entries used / batch"}
    inputs = staticmethod(joint_batch)

    recipe_type = JointAutoencoderRecipe

    def __init__(self, recipe: JointAutoencoderRecipe, data: Path, *, progress: bool = True):
        super().__init__(recipe, data, progress=progress)
        if not self.store.has_labels:
            raise DataError("the joint autoencoder needs nuclei labels; this store has images only (use a store made "
                            "by `prepare nuclei`)", self.store.path)
        self.class_names = tuple(self.store.class_names)

    def setup(self, accelerator, run, resuming):
        self.device, self.autocast = accelerator.device, accelerator.autocast
        self._dataset = LabelledPatchDataset(self.store, "train")
        self.class_weights = None
        if self.recipe.loss.mask_class_weighting == "inverse-sqrt-frequency":
            k = len(self.class_names)
            pixels = sum(np.bincount(np.asarray(self.store[i]["type_map"]).ravel(), minlength=k + 1)[: k + 1]
                         for i in self._dataset.indices)
            self.class_weights = class_weights_from_frequency(pixels).to(self.device)
            accelerator.print("mask cross-entropy class weights: " + ", ".join(
                f"{n} {w:.2f}" for n, w in zip(("background", *self.class_names), self.class_weights.tolist())))

    def build_model(self, accelerator, run, resuming):
        recipe = self.recipe
        model = make_joint_model(recipe, self.class_names)
        if recipe.train.codebook_init == "data" and not resuming:
            init_codebook_from_data(model, self.store, recipe.train.seed, inputs=joint_batch)
        model.quantize.beta = recipe.loss.commitment_beta
        self.perceptual = make_perceptual(recipe.loss.perceptual)
        if self.perceptual is not None:
            self.perceptual.to(self.device)
        return JointReconstruction(model)

    def micro_loss(self, model, batch, g, step):
        recipe, k = self.recipe, len(self.class_names)
        stacked = torch.cat([batch["image"].float(), batch["inst_map"][:, None].float(),
                             batch["type_map"][:, None].float()], dim=1)
        crops = crop_and_turn(stacked, recipe.patch_size, recipe.train.random_flips, g)
        x = torch.from_numpy(np.stack([
            pack_joint_input(c[:3].permute(1, 2, 0).numpy().astype(np.uint8), c[3].numpy().astype(np.int64),
                             c[4].numpy().astype(np.int64), k) for c in crops])).to(self.device)
        with self.autocast():
            head_a, logits, vq_loss, indices = model(x)
            loss, terms = joint_autoencoder_loss(x, head_a, logits, vq_loss, cfg=recipe.loss, perceptual=self.perceptual,
                                                 class_weights=self.class_weights)
        terms["codes"] = torch.tensor(float(torch.unique(indices).numel()), device=loss.device)
        return loss, terms, x.shape[0]
