import math

import torch
from torch.distributions import Normal, kl_divergence

from histosynth.diffusion.guidance import classifier_free_guidance, guided_model_output
from histosynth.diffusion.hybrid_loss import (
    GaussianDiffusionTerms,
    approx_standard_normal_cdf,
    discretized_gaussian_log_likelihood,
    hybrid_loss,
    normal_kl,
)

T = 1000
BETAS = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)  # DDPM linear schedule (NASDM 4.1)


def _batch(t, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    b = len(t)
    x0 = torch.randint(0, 256, (b, 3, 4, 4), generator=g).to(dtype) / 127.5 - 1.0  # 8-bit data in [-1, 1]
    noise = torch.randn(b, 3, 4, 4, generator=g, dtype=dtype)
    abar = torch.cumprod(1 - BETAS, 0).to(dtype)[t].view(-1, 1, 1, 1)
    xt = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    out = torch.cat([noise + 0.3 * torch.randn(b, 3, 4, 4, generator=g, dtype=dtype),
                     torch.rand(b, 3, 4, 4, generator=g, dtype=dtype) * 2 - 1], dim=1)
    return x0, xt, noise, out


def test_normal_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    m1, m2 = torch.randn(50, generator=g), torch.randn(50, generator=g)
    lv1, lv2 = torch.randn(50, generator=g), torch.randn(50, generator=g)
    expected = kl_divergence(Normal(m1, (0.5 * lv1).exp()), Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), expected, rtol=1e-5, atol=1e-6)


def test_approx_cdf_close_to_exact():
    x = torch.linspace(-6, 6, 1001)
    assert (approx_standard_normal_cdf(x) - torch.special.ndtr(x)).abs().max() < 1e-3


def test_discretized_likelihood_sums_to_one():
    bins = torch.arange(256, dtype=torch.float64) / 127.5 - 1.0
    for mean, log_scale in [(0.0, math.log(0.5)), (0.37, math.log(0.02)), (-0.95, math.log(0.1)), (0.2, 1.0)]:
        lp = discretized_gaussian_log_likelihood(bins, torch.full_like(bins, mean), torch.full_like(bins, log_scale))
        assert abs(lp.exp().sum().item() - 1.0) < 1e-6, (mean, log_scale)


def test_alphas_cumprod_matches_diffusers_scheduler():
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=T, beta_schedule="linear", variance_type="learned_range")
    terms = GaussianDiffusionTerms.from_betas(sched.betas)
    torch.testing.assert_close(terms.alphas_cumprod.float(), sched.alphas_cumprod, rtol=1e-5, atol=1e-6)


def test_vlb_term_t_positive_matches_independent_computation():
    t = torch.tensor([1, 5, 500, 999])
    x0, xt, noise, out = _batch(t)
    _, logs = hybrid_loss(out, x0, xt, t, noise, BETAS)
    eps, v = out[:, :3], out[:, 3:]
    for i, ti in enumerate(t.tolist()):
        beta = BETAS[ti].item()
        abar = abar_prev = 1.0
        for s in range(ti + 1):
            abar *= 1.0 - BETAS[s].item()
        for s in range(ti):
            abar_prev *= 1.0 - BETAS[s].item()
        post_var = beta * (1 - abar_prev) / (1 - abar)
        c0 = math.sqrt(abar_prev) * beta / (1 - abar)
        ct = math.sqrt(1 - beta) * (1 - abar_prev) / (1 - abar)
        true_mean = c0 * x0[i] + ct * xt[i]
        x0_hat = (xt[i] - math.sqrt(1 - abar) * eps[i]) / math.sqrt(abar)
        model_mean = c0 * x0_hat + ct * xt[i]
        frac = (v[i] + 1) / 2
        model_var = torch.exp(frac * math.log(beta) + (1 - frac) * math.log(post_var))
        kl = kl_divergence(Normal(true_mean, math.sqrt(post_var)), Normal(model_mean, model_var.sqrt()))
        expected_bits = kl.mean() / math.log(2)
        torch.testing.assert_close(logs["vlb_per_sample"][i], expected_bits, rtol=1e-6, atol=1e-9)
        mse = ((noise[i] - eps[i]) ** 2).mean()
        torch.testing.assert_close(logs["simple_per_sample"][i], mse)


def test_vlb_term_t_zero_is_decoder_nll():
    t = torch.tensor([0, 0])
    x0, xt, noise, out = _batch(t, seed=3)
    _, logs = hybrid_loss(out, x0, xt, t, noise, BETAS)
    # x_1 -> x_0: model mean = x0_hat (coef of x_t vanishes), log variance interpolates log β_0 and log β̃_1
    beta0, beta1 = BETAS[0].item(), BETAS[1].item()
    abar0, abar1 = 1 - beta0, (1 - beta0) * (1 - beta1)
    post_var1 = beta1 * (1 - abar0) / (1 - abar1)
    mean = (xt - math.sqrt(1 - abar0) * out[:, :3]) / math.sqrt(abar0)
    frac = (out[:, 3:] + 1) / 2
    std = torch.exp(0.5 * (frac * math.log(beta0) + (1 - frac) * math.log(post_var1)))
    dist = Normal(mean, std)
    hi = torch.where(x0 > 0.999, torch.ones_like(x0), dist.cdf(x0 + 1 / 255))
    lo = torch.where(x0 < -0.999, torch.zeros_like(x0), dist.cdf(x0 - 1 / 255))
    expected = -torch.log((hi - lo).clamp(min=1e-12)).mean(dim=(1, 2, 3)) / math.log(2)
    torch.testing.assert_close(logs["vlb_per_sample"], expected, rtol=2e-2, atol=1e-3)  # tanh-approx CDF


def test_stop_gradient_on_eps():
    t = torch.tensor([0, 3, 400, 999])
    x0, xt, noise, out = _batch(t, dtype=torch.float32)
    out.requires_grad_(True)
    with_vlb, _ = hybrid_loss(out, x0, xt, t, noise, BETAS, lambda_vlb=1.0)
    without, _ = hybrid_loss(out, x0, xt, t, noise, BETAS, lambda_vlb=0.0)
    (grad,) = torch.autograd.grad(with_vlb - without, out)  # gradient of the λ·T·L_t part only
    assert torch.count_nonzero(grad[:, :3]) == 0
    assert torch.all(grad[:, 3:].abs().sum(dim=(1, 2, 3)) > 0)  # every sample, t = 0 included


def test_lambda_scaling():
    t = torch.tensor([0, 17, 250, 998])
    x0, xt, noise, out = _batch(t)
    _, logs = hybrid_loss(out, x0, xt, t, noise, BETAS)
    base = logs["simple"] + logs["vlb"]  # T = 1000, λ = 0.001 → IDDPM's mse + vb
    loss, _ = hybrid_loss(out, x0, xt, t, noise, BETAS, lambda_vlb=0.001)
    torch.testing.assert_close(loss, base)
    loss, _ = hybrid_loss(out, x0, xt, t, noise, BETAS, lambda_vlb=0.01)
    torch.testing.assert_close(loss, logs["simple"] + 10 * logs["vlb"])
    loss, _ = hybrid_loss(out, x0, xt, t, noise, BETAS, lambda_vlb=0.0)
    torch.testing.assert_close(loss, logs["simple"])
    short = torch.linspace(1e-4, 0.04, 500, dtype=torch.float64)  # λ·T uses the schedule's own T
    loss, logs = hybrid_loss(out, x0, xt, t.clamp(max=499), noise, short, lambda_vlb=0.001)
    torch.testing.assert_close(loss, logs["simple"] + 0.5 * logs["vlb"])


def test_float32_finite():
    t = torch.tensor([0, 1, 999])
    x0, xt, noise, out = _batch(t, dtype=torch.float32)
    loss, logs = hybrid_loss(out, x0, xt, t, noise, BETAS.float())
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and torch.isfinite(logs["vlb_per_sample"]).all()


def test_guidance_formula():
    # one convention (diffusers' g): eps(0) + g * (eps(y) - eps(0)); NASDM's s is g - 1
    c, u = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.5, 1.0, 0.5])
    torch.testing.assert_close(classifier_free_guidance(u, c, 1.0), c)
    torch.testing.assert_close(classifier_free_guidance(u, c, 2.0), 2 * c - u)
    torch.testing.assert_close(classifier_free_guidance(u, c, 3.0), torch.tensor([2.0, -8.0, 0.5]))
    torch.testing.assert_close(classifier_free_guidance(u, c, 0.0), u)


def test_guided_model_output_keeps_variance_channels():
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(2, 6, 4, 4, generator=g), torch.randn(2, 6, 4, 4, generator=g)
    out = guided_model_output(uncond, cond, 2.5, in_channels=3)  # g = 2.5 is NASDM's s = 1.5
    torch.testing.assert_close(out[:, :3], cond[:, :3] + 1.5 * (cond[:, :3] - uncond[:, :3]))
    assert torch.equal(out[:, 3:], cond[:, 3:])
    torch.testing.assert_close(guided_model_output(uncond, cond, 1.0, in_channels=3), cond)
