"""BrainLDM sampling API: seeds, determinism, batching and argument errors (tiny random model)."""

from __future__ import annotations

import subprocess
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from brain_ldm_nodes import (
    AutoencoderKL,
    AutoencoderKLConfig,
    DiffusionModelUNet,
    BrainLDM,
    DiffusionModelUNetConfig,
    initial_noise,
)

TINY_VAE = AutoencoderKLConfig(channels=(32, 32), num_res_blocks=(1, 1))
TINY_UNET = DiffusionModelUNetConfig(
    channels=(32, 32, 32), num_res_blocks=(1, 1, 1), num_head_channels=(0, 32, 32)
)
SHAPE = (16, 24, 8)  # multiples of 8 = 2 (autoencoder) × 4 (U-Net)

SAMPLE_SCRIPT = """
import jax, numpy as np, sys
from brain_ldm_nodes import BrainLDM, AutoencoderKLConfig, DiffusionModelUNetConfig
vae = AutoencoderKLConfig(channels=(32, 32), num_res_blocks=(1, 1))
unet = DiffusionModelUNetConfig(channels=(32, 32, 32), num_res_blocks=(1, 1, 1), num_head_channels=(0, 32, 32))
model = BrainLDM.random(key=jax.random.key(7), vae_config=vae, unet_config=unet)
images = model.sample(np.array([[1.0, 0.5, 0.2, 0.4]]), [42], num_inference_steps=4, image_shape=(16, 24, 8))
sys.stdout.buffer.write(np.asarray(images).tobytes())
"""


@pytest.fixture(scope="module")
def model() -> BrainLDM:
    return BrainLDM.random(key=jax.random.key(7), vae_config=TINY_VAE, unet_config=TINY_UNET)


def test_same_seed_is_bitwise_identical_across_processes():
    runs = [
        subprocess.run([sys.executable, "-c", SAMPLE_SCRIPT], check=True, capture_output=True).stdout
        for _ in range(2)
    ]
    assert len(runs[0]) == 16 * 24 * 8 * 4
    assert runs[0] == runs[1]


def test_batch_gives_bitwise_the_images_of_single_runs(model):
    conditioning = np.array([[0.0, 0.1, 0.2, 0.4], [1.0, 0.7, 0.7, 0.5], [0.5, 0.5, 0.5, 0.5]])
    seeds = [1, 2, 3]
    batch = np.asarray(model.sample(conditioning, seeds, num_inference_steps=3, image_shape=SHAPE))
    for row, seed, image in zip(conditioning, seeds, batch):
        single = np.asarray(model.sample(row[None], [seed], num_inference_steps=3, image_shape=SHAPE))
        np.testing.assert_array_equal(single[0], image)


def test_batched_execution_equals_per_sample_up_to_rounding(model):
    conditioning = np.array([[0.0, 0.1, 0.2, 0.4], [1.0, 0.7, 0.7, 0.5]])
    one_by_one = model.sample_latents(conditioning, [5, 6], num_inference_steps=3, image_shape=SHAPE)
    batched = model.sample_latents(conditioning, [5, 6], num_inference_steps=3, image_shape=SHAPE,
                                   batch_size=2)
    # Batched convolutions sum in another order (≈ 1e-7 relative per operation, ≈ 1e-5 after the
    # U-Net's depth and 3 steps); mixing up the samples of a batch would give errors of order 1.
    scale = np.abs(np.asarray(one_by_one)).max()
    np.testing.assert_allclose(np.asarray(batched), np.asarray(one_by_one), rtol=0, atol=2e-5 * scale)


def test_different_seeds_give_different_images(model):
    conditioning = np.array([[0.0, 0.1, 0.2, 0.4]] * 2)
    images = np.asarray(model.sample(conditioning, [1, 2], num_inference_steps=2, image_shape=SHAPE))
    assert not np.allclose(images[0], images[1])


def test_initial_noise_is_standard_normal_and_seed_defined():
    noise = np.asarray(initial_noise(0, (3, 20, 28, 20)))
    assert noise.shape == (3, 20, 28, 20) and noise.dtype == np.float32
    assert abs(noise.mean()) < 0.02 and abs(noise.std() - 1) < 0.02
    np.testing.assert_array_equal(noise, np.asarray(initial_noise(0, (3, 20, 28, 20))))
    assert not np.array_equal(noise, np.asarray(initial_noise(1, (3, 20, 28, 20))))


def test_full_size_latent_shape_is_20_28_20():
    key = jax.random.key(0)  # shape-only skeletons of the released architecture
    model = BrainLDM(eqx.filter_eval_shape(AutoencoderKL, key=key),
                     eqx.filter_eval_shape(DiffusionModelUNet, key=key))
    assert model.latent_shape((160, 224, 160)) == (3, 20, 28, 20)
    assert model.image_multiple == 32


@pytest.mark.parametrize("shape", [(16, 24, 12), (16, 24), (0, 8, 8), (20, 24, 8)])
def test_image_shape_not_multiple_is_a_clear_error(model, shape):
    with pytest.raises(ValueError, match=r"image shape .* is not three positive multiples of 8"):
        model.sample(np.zeros((1, 4)), [0], num_inference_steps=1, image_shape=shape)


@pytest.mark.parametrize(
    ("conditioning", "seeds", "message"),
    [
        (np.zeros((1, 3)), [0], r"conditioning must be \(batch, 4\)"),
        (np.zeros((2, 4)), [0], r"got 1 seeds for 2 conditioning rows"),
        (np.full((1, 4), np.nan), [0], r"NaN or infinite"),
    ],
)
def test_bad_sampling_arguments_are_clear_errors(model, conditioning, seeds, message):
    with pytest.raises(ValueError, match=message):
        model.sample(conditioning, seeds, num_inference_steps=1, image_shape=SHAPE)


def test_num_inference_steps_out_of_range_is_a_clear_error(model):
    with pytest.raises(ValueError, match=r"num_inference_steps must be in \[1, 1000\], got 0"):
        model.sample(np.zeros((1, 4)), [0], num_inference_steps=0, image_shape=SHAPE)


def test_encode_decode_shapes_and_errors(model):
    images = np.random.default_rng(0).random((2, 1) + SHAPE, dtype=np.float32)
    z_mu, z_sigma = model.encode(images)
    assert z_mu.shape == z_sigma.shape == (2, 3, 8, 12, 4)
    assert model.decode(z_mu).shape == (2, 1) + SHAPE
    with pytest.raises(ValueError, match=r"images must be \(batch, 1, D, H, W\)"):
        model.encode(images[0])
    with pytest.raises(ValueError, match=r"latents must be \(batch, 3, d, h, w\)"):
        model.decode(np.zeros((1, 4, 2, 2, 2)))


@pytest.mark.parametrize("seed", [-1, 2**32, 2**40, 1.5, True])
def test_seed_outside_32_bits_is_refused_not_wrapped(seed):
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\^32\)"):
        initial_noise(seed, (3, 4, 4, 4))


def test_slab_wise_decode_equals_the_whole_volume_decoder(model):
    """decode() streams the full-resolution stage in slabs (16 rows; 8 with low_memory): both
    equal the decoder run on the whole volume at once, up to float32 rounding."""
    from brain_ldm_nodes.pipeline import _decode_in_memory

    latents = np.random.default_rng(4).standard_normal((2, 3, 16, 12, 4), dtype=np.float32)
    whole = np.asarray(_decode_in_memory(model.vae, jnp.asarray(latents)))
    for low_memory in (False, True):
        streamed = np.asarray(model.decode(latents, low_memory=low_memory))
        np.testing.assert_allclose(streamed, whole, rtol=0, atol=1e-5 * np.abs(whole).max())


def test_bfloat16_sampling_is_close_to_float32_but_not_the_default(model):
    conditioning = np.array([[1.0, 0.5, 0.2, 0.4]])
    reference = np.asarray(model.sample_latents(conditioning, [3], num_inference_steps=4, image_shape=SHAPE))
    default = np.asarray(model.sample_latents(conditioning, [3], num_inference_steps=4, image_shape=SHAPE,
                                              precision="float32"))
    np.testing.assert_array_equal(default, reference)
    bf16 = np.asarray(model.sample_latents(conditioning, [3], num_inference_steps=4, image_shape=SHAPE,
                                           precision="bfloat16"))
    error = np.abs(bf16 - reference).max() / np.abs(reference).max()
    assert 0 < error < 5e-2  # bfloat16 keeps 8 significant bits (≈ 4e-3 relative per rounding)
    with pytest.raises(ValueError, match="precision must be one of"):
        model.sample_latents(conditioning, [3], num_inference_steps=4, image_shape=SHAPE, precision="float16")


def test_progress_reports_every_step_without_changing_the_result(model):
    conditioning = np.array([[0.0, 0.1, 0.2, 0.4]])
    calls = []
    with_progress = model.sample_latents(conditioning, [9], num_inference_steps=4, image_shape=SHAPE,
                                         progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]
    plain = model.sample_latents(conditioning, [9], num_inference_steps=4, image_shape=SHAPE)
    np.testing.assert_array_equal(np.asarray(with_progress), np.asarray(plain))
