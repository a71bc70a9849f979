"""HistoSmith's first-stage objective (Sec. 2): head A, image and distance map; head B, the semantic mask.

loss = l1·|x−x̂| + perceptual·d(x, x̂)                       (image, as the image autoencoder)
     + distance_l1·|d−d̂| + distance_l2·(d−d̂)²               (distance map, in [0, 1])
     + cross_entropy·CE(mask logits, mask) + tversky·(1 − TI) (semantic mask, background + K types; CE optionally
                                                              class-weighted, see :func:`class_weights_from_frequency`)
     + codebook·L_vq

The paper names the terms ("L1 + perceptual", "L1/L2" on the distance map, "categorical cross-entropy and a
Tversky loss") but not their weights nor Tversky's α/β; the defaults are in the recipe and docs/histosmith.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from histosynth.diffusion.autoencoder_loss import autoencoder_loss


def tversky_loss(probs: torch.Tensor, target: torch.Tensor, alpha: float = 0.3, beta: float = 0.7,
                 smooth: float = 1.0) -> torch.Tensor:
    """1 − mean over classes of the Tversky index (Salehi et al., 2017):

        TI_c = (Σ p_c g_c + s) / (Σ p_c g_c + α Σ p_c (1 − g_c) + β Σ (1 − p_c) g_c + s)

    sums over the batch and all pixels. α weighs false positives, β false negatives (α = β = 0.5: Dice;
    α = 0.3, β = 0.7 favours recall of small structures such as nuclei). ``s`` keeps a class absent from both
    prediction and target at TI = 1.

    Args:
        probs: (B, C, H, W) class probabilities (softmax over C).
        target: (B, H, W) int64 class ids in 0..C−1, or (B, C, H, W) one-hot.
    Returns: a scalar in [0, 1].
    """
    if target.dim() == probs.dim() - 1:
        target = F.one_hot(target.long(), probs.shape[1]).permute(0, 3, 1, 2)
    target = target.to(probs.dtype)
    dims = (0, 2, 3)
    tp = (probs * target).sum(dims)
    fp = (probs * (1 - target)).sum(dims)
    fn = ((1 - probs) * target).sum(dims)
    index = (tp + smooth) / (tp + alpha * fp + beta * fn + smooth)
    return 1.0 - index.mean()


def joint_autoencoder_loss(x: torch.Tensor, head_a: torch.Tensor, mask_logits: torch.Tensor, vq_loss: torch.Tensor, *,
                           cfg, perceptual, class_weights: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total loss and its terms (detached) of one batch.

    Args:
        x: (B, 3 + 1 + K + 1, H, W) the joint input (image, 2d − 1, 2·onehot − 1; see models/joint_autoencoder.py).
        head_a: (B, 4, H, W) head A's output (image in [-1, 1], distance as 2d − 1).
        mask_logits: (B, K + 1, H, W) head B's logits.
        vq_loss: diffusers' VQ loss of the quantisation.
        cfg: the recipe's ``loss`` section (:class:`~histosynth.recipes.histosmith.JointAutoencoderLossConfig`).
        perceptual: a distance module on images in [-1, 1], or None.
        class_weights: (K + 1,) cross-entropy weights per class (background first), or None (plain CE).
    """
    image_loss, terms = autoencoder_loss(
        x[:, :3], head_a[:, :3], vq_loss, kind="vq", l1_weight=cfg.l1_weight, l2_weight=cfg.l2_weight,
        perceptual=perceptual, perceptual_weight=cfg.perceptual_weight, codebook_weight=cfg.codebook_weight,
        kl_weight=0.0)
    d_true, d_pred = (x[:, 3:4].float() + 1) / 2, (head_a[:, 3:4].float() + 1) / 2
    dist_l1 = (d_pred - d_true).abs().mean()
    dist_l2 = F.mse_loss(d_pred, d_true)
    mask = x[:, 4:].argmax(1)
    logits = mask_logits.float()
    ce = F.cross_entropy(logits, mask, weight=None if class_weights is None else class_weights.to(logits))
    tv = tversky_loss(logits.softmax(1), mask, cfg.tversky_alpha, cfg.tversky_beta)
    loss = (image_loss + cfg.distance_l1_weight * dist_l1 + cfg.distance_l2_weight * dist_l2
            + cfg.cross_entropy_weight * ce + cfg.tversky_weight * tv)
    terms.update(distance_l1=dist_l1.detach(), distance_l2=dist_l2.detach(), cross_entropy=ce.detach(),
                 tversky=tv.detach())
    return loss, terms


def class_weights_from_frequency(pixels_per_class) -> torch.Tensor:
    """(C,) float32 weights ∝ 1/sqrt(pixel frequency), normalised to mean 1; a class with no pixel gets the largest
    weight of the others (it cannot be learned from these patches, and must not blow up the loss)."""
    counts = torch.as_tensor(pixels_per_class, dtype=torch.float64)
    freq = counts / counts.sum()
    w = torch.where(freq > 0, freq.clamp_min(1e-12).rsqrt(), torch.zeros_like(freq))
    w = torch.where(freq > 0, w, w.max())
    return (w / w.mean()).float()
