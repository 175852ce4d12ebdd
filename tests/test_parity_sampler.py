"""The DDIM schedule, each step and the whole sampler against MONAI 1.6.1.

Scheduler tolerance 1e-6 (relative): PyTorch builds the β ramp with its own vectorised
float32 linspace, which differs from a correctly rounded float32 ramp by ≤ 1 ulp; after the
1000-term float32 cumprod the two schedules differ by ≤ 6e-7 relative. A DDIM step is a
handful of float32 operations on top, so ≤ 1e-6 still holds and anything worse is a bug
(a wrong ᾱ index is > 1e-3 off).

End-to-end tolerance 1e-3 (normwise relative, on the decoded image): 10–50 U-Net evaluations
each within ~1e-5 of MONAI feed back through the DDIM recursion; the sampler is a
contraction in practice but the error budget of the issue is 1e-3. Measured with the tiny
networks (``tiny_oracle``, tests/conftest.py): latents 1.1e-6 / 1.6e-6, images 1.3e-6 at 10 / 50
steps. The released configuration, 3 steps and the decode: tests/test_parity_sampler_full.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from brain_ldm_nodes import CONDITIONING_ORDER, DDIMSchedulerConfig, initial_noise
from brain_ldm_nodes.scheduler import alphas_cumprod, ddim_step, ddim_tables, ddim_timesteps

from monai_oracle import monai_sample, monai_scheduler, relative_error, set_leading_timesteps

SCHEDULER_TOLERANCE = 1e-6
SAMPLER_TOLERANCE = 1e-3

def test_schedule_matches_monai_scaled_linear_beta():
    config = DDIMSchedulerConfig()
    reference = monai_scheduler(config).alphas_cumprod.numpy()
    assert relative_error(alphas_cumprod(config), reference) <= SCHEDULER_TOLERANCE
    # elementwise too: the smallest ᾱ (≈ 1e-4 at t = 999) must not hide behind the largest
    ours = alphas_cumprod(config).astype(np.float64)
    assert np.max(np.abs(ours - reference) / reference) <= SCHEDULER_TOLERANCE


def test_schedule_endpoints_are_the_bundle_betas_not_the_model_card():
    cumprod = alphas_cumprod(DDIMSchedulerConfig()).astype(np.float64)
    betas = 1 - cumprod / np.concatenate([[1.0], cumprod[:-1]])
    assert betas[0] == pytest.approx(0.0015, rel=1e-4)  # the card says 1e-4
    assert betas[-1] == pytest.approx(0.0205, rel=1e-3)  # the card says 2e-2
    # scaled linear: sqrt(β) is linear in t (the midpoint of sqrt(β), squared)
    assert betas[500] == pytest.approx(((0.0015**0.5 + 0.0205**0.5) / 2) ** 2, rel=2e-3)


def test_default_timesteps_are_980_to_0_as_authored():
    timesteps, prev = ddim_timesteps(DDIMSchedulerConfig(), 50)
    assert timesteps.tolist() == list(range(980, -1, -20))
    assert prev.tolist() == list(range(960, -21, -20))


@pytest.mark.parametrize("steps", [1, 7, 50, 333, 999, 1000])
def test_monai_16_spacing_option_matches_monai_161(steps):
    scheduler = monai_scheduler(DDIMSchedulerConfig())
    scheduler.set_timesteps(steps)
    timesteps, _ = ddim_timesteps(DDIMSchedulerConfig(timestep_spacing="monai-1.6"), steps)
    np.testing.assert_array_equal(timesteps, scheduler.timesteps.numpy())


@pytest.mark.parametrize("spacing", ["leading", "monai-1.6"])
def test_every_ddim_step_matches_monai(spacing):
    config = DDIMSchedulerConfig(timestep_spacing=spacing)
    scheduler = monai_scheduler(config)
    steps = 50
    if spacing == "leading":
        set_leading_timesteps(scheduler, steps)
    else:
        scheduler.set_timesteps(steps)
    tables = ddim_tables(config, steps)
    np.testing.assert_array_equal(np.asarray(tables.timesteps), scheduler.timesteps.numpy())
    rng = np.random.default_rng(5)
    sample = rng.standard_normal((2, 3, 4, 4, 4), dtype=np.float32)
    step = jax.jit(ddim_step)
    for index, timestep in enumerate(scheduler.timesteps.tolist()):
        eps = rng.standard_normal(sample.shape, dtype=np.float32)
        ours = step(jnp.asarray(eps), tables.alpha_prod[index], tables.alpha_prod_prev[index],
                    jnp.asarray(sample))
        reference, _ = scheduler.step(torch.from_numpy(eps), timestep, torch.from_numpy(sample))
        assert relative_error(ours, reference.numpy()) <= SCHEDULER_TOLERANCE, timestep
        sample = reference.numpy()


@pytest.mark.parametrize("steps", [10, 50])
def test_sampler_matches_monai_sampling_loop(tiny_oracle, steps):
    model, monai_vae, monai_net = tiny_oracle
    conditioning = np.array([[1.0, 0.7, 0.7, 0.5], [0.0, 0.1, 0.2, 0.4]], np.float32)
    seeds = [3, 4]
    latent_shape = model.latent_shape()
    noise = np.stack([np.asarray(initial_noise(seed, latent_shape)) for seed in seeds])
    scheduler = monai_scheduler(model.scheduler)
    set_leading_timesteps(scheduler, steps)
    ref_latents, ref_images = monai_sample(monai_net, monai_vae, scheduler, conditioning, noise)

    latents = model.sample_latents(conditioning, seeds, num_inference_steps=steps)
    images = model.decode(latents)
    assert images.shape == (2, 1) + model.image_shape
    latent_error, image_error = relative_error(latents, ref_latents), relative_error(images, ref_images)
    print(f"sampler, {steps} steps: latent error {latent_error:.2e}, image error {image_error:.2e}")
    assert image_error <= SAMPLER_TOLERANCE
    assert latent_error <= SAMPLER_TOLERANCE


def test_conditioning_order_is_sex_age_ventricles_brain(tiny_oracle):
    """The vector built from named demographics equals the bundle's [gender, age, vent, brain]
    tensor, and the sampler is sensitive to its order: swapping any two entries (or the sex
    coding 0 = female, 1 = male) changes the image, so a swap anywhere cannot pass."""
    from brain_ldm_nodes.demographics import normalise_demographics

    assert CONDITIONING_ORDER == ("sex", "age", "ventricular_volume", "brain_volume")
    conditioning = normalise_demographics(
        {"sex": "female", "age": 82, "ventricular_volume": 0.3, "brain_volume": 0.6}
    ).as_array()
    np.testing.assert_array_equal(conditioning, np.array([0.0, 1.0, 0.3, 0.6], np.float32))
    male = normalise_demographics({"sex": "M", "age": 44, "ventricular_volume": 0.3, "brain_volume": 0.6})
    assert male.as_array()[0] == 1.0 and male.as_array()[1] == 0.0

    model, monai_vae, monai_net = tiny_oracle
    latent_shape = model.latent_shape()
    noise = np.asarray(initial_noise(0, latent_shape))[None]
    scheduler = monai_scheduler(model.scheduler)
    set_leading_timesteps(scheduler, 5)
    bundle_order = np.array([[0.0, 1.0, 0.3, 0.6]], np.float32)  # [gender, age, ventricular, brain]
    ref_latent, _ = monai_sample(monai_net, monai_vae, scheduler, bundle_order, noise)
    ours = model.sample_latents(conditioning[None], [0], num_inference_steps=5)
    assert relative_error(ours, ref_latent) <= SAMPLER_TOLERANCE
    for swapped in ([1.0, 0.0, 0.3, 0.6], [1.0, 1.0, 0.3, 0.6], [0.0, 0.3, 1.0, 0.6], [0.0, 1.0, 0.6, 0.3]):
        other = model.sample_latents(np.array([swapped]), [0], num_inference_steps=5)
        assert relative_error(other, ref_latent) > 100 * SAMPLER_TOLERANCE, swapped
