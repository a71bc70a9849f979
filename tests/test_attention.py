"""Every attention layer of every network runs PyTorch's scaled-dot-product attention (flash / memory-efficient
kernels where the device has them): diffusers' Attention with its SDPA processor, and torch's MultiheadAttention
(which calls F.scaled_dot_product_attention)."""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from histosynth.recipes import load_recipe


def _networks():
    from histosynth.models import SemanticUNet
    from histosynth.models.condition_sampler import ConditionTransformer
    from histosynth.training.latent import make_unet

    yield "semantic", SemanticUNet(sample_size=16, in_channels=3, cond_channels=4, block_out_channels=(16, 32),
                                   layers_per_block=1, attention_resolutions=(8,), num_head_channels=16,
                                   norm_num_groups=8, spade_hidden=16)
    recipe = load_recipe("pathldm-tiny-cpu")
    yield "latent", make_unet(recipe, 3, 8)
    yield "conditions", ConditionTransformer(num_tokens=4, token_dim=8, num_magnifications=2, width=16, depth=1, heads=2)


def test_every_attention_layer_uses_sdpa(monkeypatch):
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    for name, net in _networks():
        layers = [m for m in net.modules() if isinstance(m, (Attention, torch.nn.MultiheadAttention))]
        assert layers, name
        for m in layers:
            if isinstance(m, Attention):
                assert isinstance(m.processor, AttnProcessor2_0), (name, type(m.processor))
    # and SDPA is what actually runs: a forward of the semantic UNet calls it once per attention layer
    net = dict(_networks())["semantic"].eval()
    calls.clear()
    with torch.no_grad():
        net(torch.zeros(1, 3, 16, 16), torch.tensor([5]), torch.zeros(1, 4, 16, 16))
    assert len(calls) == sum(isinstance(m, Attention) for m in net.modules())
