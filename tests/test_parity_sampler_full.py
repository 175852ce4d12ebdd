"""The whole sampler at the released configuration against MONAI 1.6.1: a few DDIM steps and the
decode, at a small latent.

The real U-Net (553,168,899 parameters) and autoencoder (13,766,248) configurations with
perturbed random weights (``monai_oracle``), loaded into ours by the weight mapping
(``load_monai_state_dict``); our ``BrainLDM.sample`` / ``sample_latents`` against the bundle's
loop written with MONAI modules (``monai_sample``) from the same noise, batch 2 with two
conditioning vectors. The latent is 3 × 8 × 12 × 4 (image 64 × 96 × 32): the U-Net needs
multiples of 4 per latent axis (UPSTREAM.md §2), and a non-cubic grid catches a swapped axis.
Three DDIM steps (t = 666, 333, 0; leading spacing as the bundle) then the decode.
tests/test_parity_sampler.py covers 10–50 steps with tiny networks, tests/test_parity_networks.py
each full-size network alone.

Tolerances (normwise relative, ``relative_error``; float32 on both sides): 1e-4 on the latents
and on the images. One full-size U-Net evaluation is within ~1e-6…1e-5 of MONAI
(test_parity_networks.py, same bound), a DDIM update adds ≤ 1e-6 (test_parity_sampler.py), and
three steps give the rounding little room to grow: ~1e-5 is the expected scale. The decoder
at full configuration is itself within ~1e-6 of MONAI and, at these weights, does not amplify
the latents' error by more than a small factor, so the image gets the same bound rather than a
looser one. Measured on a 2-core CPU (oneDNN path): latents 1.3e-6, images 2.7e-6, a margin of
≈ 40–75×. A real bug (a wrong timestep or ᾱ index, conditioning order, a broken decoder stage)
is ≥ 1e-3 off; the two samples' conditioning vectors swapped must be > 1e-2 off (asserted).

Cost (2-core CPU, shared): ≈ 2 min CPU, ≈ 4 min wall, peak RSS 4.9 GiB: MONAI's U-Net
(2.2 GB) is freed once its weights are copied into ours, before our programs are compiled.
Marked slow (CI runs it).
"""

from __future__ import annotations

import gc

import equinox as eqx
import jax
import numpy as np
import pytest

from brain_ldm_nodes import (
    AutoencoderKL,
    AutoencoderKLConfig,
    BrainLDM,
    DiffusionModelUNet,
    DiffusionModelUNetConfig,
    initial_noise,
)
from brain_ldm_nodes.weights.mapping import load_monai_state_dict

from monai_oracle import (
    monai_autoencoder,
    monai_sample,
    monai_scheduler,
    monai_unet,
    relative_error,
    set_leading_timesteps,
    state_dict_numpy,
)

LATENT_TOLERANCE = 1e-4
IMAGE_TOLERANCE = 1e-4
IMAGE_SHAPE = (64, 96, 32)  # latent 8 × 12 × 4: multiples of 4 for the U-Net's two stages
STEPS = 3


@pytest.mark.slow
def test_full_configuration_sampler_matches_monai_sampling_loop():
    conditioning = np.array([[1.0, 0.7, 0.7, 0.5], [0.0, 0.1, 0.2, 0.4]], np.float32)
    seeds = [3, 4]
    vae_config, unet_config = AutoencoderKLConfig(), DiffusionModelUNetConfig()
    key = jax.random.key(0)
    skeleton = BrainLDM(eqx.filter_eval_shape(AutoencoderKL, vae_config, key=key),
                        eqx.filter_eval_shape(DiffusionModelUNet, unet_config, key=key))
    latent_shape = skeleton.latent_shape(IMAGE_SHAPE)
    assert latent_shape == (3, 8, 12, 4)
    noise = np.stack([np.asarray(initial_noise(seed, latent_shape)) for seed in seeds])

    monai_vae, monai_net = monai_autoencoder(vae_config, seed=31), monai_unet(unet_config, seed=32)
    assert sum(p.numel() for p in monai_net.parameters()) == 553_168_899
    scheduler = monai_scheduler(skeleton.scheduler)
    set_leading_timesteps(scheduler, STEPS)
    assert scheduler.timesteps.tolist() == [666, 333, 0]
    ref_latents, ref_images = monai_sample(monai_net, monai_vae, scheduler, conditioning, noise)

    model = BrainLDM(load_monai_state_dict(skeleton.vae, state_dict_numpy(monai_vae)),
                     load_monai_state_dict(skeleton.unet, state_dict_numpy(monai_net)))
    del monai_vae, monai_net  # ours hold copies: free MONAI's 2.2 GB before compiling
    gc.collect()

    latents = model.sample_latents(conditioning, seeds, num_inference_steps=STEPS,
                                   image_shape=IMAGE_SHAPE)
    images = model.sample(conditioning, seeds, num_inference_steps=STEPS, image_shape=IMAGE_SHAPE)
    assert latents.shape == (2, 3, 8, 12, 4) and images.shape == (2, 1) + IMAGE_SHAPE
    latent_error = relative_error(latents, ref_latents)
    image_error = relative_error(images, ref_images)
    print(f"full-configuration sampler, {STEPS} DDIM steps, image {IMAGE_SHAPE}: "
          f"latent error {latent_error:.2e}, image error {image_error:.2e}")
    assert latent_error <= LATENT_TOLERANCE
    assert image_error <= IMAGE_TOLERANCE
    # the comparison can fail: the two conditioning vectors swapped are far outside it
    swapped = model.sample_latents(conditioning[::-1].copy(), seeds, num_inference_steps=STEPS,
                                   image_shape=IMAGE_SHAPE)
    assert relative_error(swapped, ref_latents) > 100 * LATENT_TOLERANCE
