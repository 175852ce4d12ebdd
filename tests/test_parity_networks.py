"""Our networks against MONAI 1.6.1 at the full upstream configuration, weights perturbed.

Tolerance: max relative error (normwise, see ``relative_error``) ≤ 1e-4. Both sides compute
in float32; rounding differences (summation order inside convolutions, GroupNorm statistics,
transcendental functions) are ~1e-7 per operation and grow roughly with depth (≈ 40
conv/norm layers in the autoencoder, ≈ 100 in the U-Net): the observed errors are 1e-6…1e-5.
A real bug — a dropped bias, a swapped norm affine, a wrong skip order, tanh-GELU instead of
erf-GELU — gives errors of 1e-3 or more (``test_parity_detects_*`` below shows it).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from brain_ldm_nodes import AutoencoderKL, AutoencoderKLConfig, DiffusionModelUNet, DiffusionModelUNetConfig
from brain_ldm_nodes.weights.mapping import load_monai_state_dict

from monai_oracle import monai_autoencoder, monai_unet, relative_error, state_dict_numpy

TOLERANCE = 1e-4


def count_parameters(module: eqx.Module) -> int:
    return sum(leaf.size for leaf in jax.tree_util.tree_leaves(eqx.filter(module, eqx.is_array)))


@pytest.fixture(scope="module")
def full_autoencoders():
    config = AutoencoderKLConfig()
    reference = monai_autoencoder(config, seed=1)
    skeleton = eqx.filter_eval_shape(AutoencoderKL, config, key=jax.random.key(0))
    ours = load_monai_state_dict(skeleton, state_dict_numpy(reference))
    return ours, reference


@pytest.fixture(scope="module")
def full_unets():
    config = DiffusionModelUNetConfig()
    reference = monai_unet(config, seed=2)
    skeleton = eqx.filter_eval_shape(DiffusionModelUNet, config, key=jax.random.key(0))
    ours = load_monai_state_dict(skeleton, state_dict_numpy(reference))
    return ours, reference


def test_default_autoencoder_has_upstream_parameter_count():
    vae = AutoencoderKL(key=jax.random.key(0))
    assert count_parameters(vae) == 13_766_248
    assert len(jax.tree_util.tree_leaves(eqx.filter(vae, eqx.is_array))) == 162


def test_default_unet_has_upstream_parameter_count():
    unet = eqx.filter_eval_shape(DiffusionModelUNet, key=jax.random.key(0))
    leaves = jax.tree_util.tree_leaves(unet)
    assert sum(int(np.prod(leaf.shape)) for leaf in leaves) == 553_168_899
    assert len(leaves) == 528


def test_parameter_counts_equal_monai_for_small_configs():
    vae_config = AutoencoderKLConfig(channels=(32, 64), num_res_blocks=(1, 2), latent_channels=4)
    unet_config = DiffusionModelUNetConfig(
        in_channels=8, out_channels=4, channels=(32, 64, 96), num_res_blocks=(1, 1, 2),
        attention_levels=(True, False, True), num_head_channels=(16, 0, 32), resblock_updown=False,
        transformer_num_layers=2,
    )
    for ours, reference in (
        (AutoencoderKL(vae_config, key=jax.random.key(0)), monai_autoencoder(vae_config, seed=0)),
        (DiffusionModelUNet(unet_config, key=jax.random.key(0)), monai_unet(unet_config, seed=0)),
    ):
        assert count_parameters(ours) == sum(p.numel() for p in reference.parameters())


def test_autoencoder_encode_matches_monai_full_config(full_autoencoders):
    ours, reference = full_autoencoders
    images = np.random.default_rng(0).random((2, 1, 32, 40, 24), dtype=np.float32)
    z_mu, z_sigma = eqx.filter_jit(lambda vae, x: jax.vmap(vae.encode)(x))(ours, jnp.asarray(images))
    ref_mu, ref_sigma = reference.encode(torch.from_numpy(images))
    assert z_mu.shape == (2, 3, 4, 5, 3)
    errors = relative_error(z_mu, ref_mu.numpy()), relative_error(z_sigma, ref_sigma.numpy())
    print(f"autoencoder encode, full config: max relative error mu {errors[0]:.2e}, sigma {errors[1]:.2e}")
    assert max(errors) <= TOLERANCE


def test_autoencoder_decode_matches_monai_full_config(full_autoencoders):
    ours, reference = full_autoencoders
    latents = np.random.default_rng(1).standard_normal((2, 3, 4, 5, 3), dtype=np.float32)
    images = eqx.filter_jit(lambda vae, z: jax.vmap(vae.decode)(z))(ours, jnp.asarray(latents))
    ref_images = reference.decode(torch.from_numpy(latents)).numpy()
    assert images.shape == (2, 1, 32, 40, 24)
    error = relative_error(images, ref_images)
    print(f"autoencoder decode, full config: max relative error {error:.2e}")
    assert error <= TOLERANCE


def test_log_variance_clamp_matches_monai():
    """With a huge log-variance bias both sides clamp at 20 (sigma = e^10) and -30."""
    config = AutoencoderKLConfig(channels=(32, 32), num_res_blocks=(1, 1))
    reference = monai_autoencoder(config, seed=3)
    with torch.no_grad():
        reference.quant_conv_log_sigma.conv.bias.copy_(torch.tensor([100.0, -100.0, 0.0]))
    skeleton = eqx.filter_eval_shape(AutoencoderKL, config, key=jax.random.key(0))
    ours = load_monai_state_dict(skeleton, state_dict_numpy(reference))
    images = np.random.default_rng(2).random((1, 1, 16, 16, 16), dtype=np.float32)
    _, z_sigma = jax.vmap(ours.encode)(jnp.asarray(images))
    _, ref_sigma = reference.encode(torch.from_numpy(images))
    np.testing.assert_allclose(np.asarray(z_sigma)[:, 0], np.exp(10.0), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(z_sigma)[:, 1], np.exp(-15.0), rtol=1e-6)
    assert relative_error(z_sigma, ref_sigma.numpy()) <= TOLERANCE


def _unet_inputs(rng: np.random.Generator, batch: int, spatial: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """U-Net input ``(B, 3 + 4, *spatial)`` (latent, then the conditioning broadcast) and its
    cross-attention context ``(B, 1, 4)``, as the sampler builds them."""
    latents = rng.standard_normal((batch, 3, *spatial), dtype=np.float32)
    conditioning = rng.random((batch, 4), dtype=np.float32)
    x = np.concatenate(
        [latents, np.broadcast_to(conditioning[:, :, None, None, None], (batch, 4, *spatial))], axis=1
    )
    return x, conditioning[:, None, :]


@pytest.mark.slow
def test_unet_matches_monai_full_config(full_unets):
    """All 553M parameters, batch 2, several timesteps, a non-cubic 8×12×4 latent."""
    ours, reference = full_unets
    x, context = _unet_inputs(np.random.default_rng(3), 2, (8, 12, 4))
    forward = eqx.filter_jit(lambda unet, *args: jax.vmap(unet)(*args))
    for timesteps in ([999, 0], [500, 20]):
        eps = forward(ours, jnp.asarray(x), jnp.asarray(timesteps), jnp.asarray(context))
        ref_eps = reference(
            torch.from_numpy(x), torch.tensor(timesteps), context=torch.from_numpy(context)
        ).numpy()
        assert eps.shape == (2, 3, 8, 12, 4)
        error = relative_error(eps, ref_eps)
        print(f"U-Net full config, t={timesteps}: max relative error {error:.2e}")
        assert error <= TOLERANCE


@pytest.mark.slow
def test_unet_matches_monai_full_config_at_the_model_latent_size(full_unets):
    """The released latent size, 20×28×20: the size at which ``"auto"`` computes the U-Net's
    256–1280-channel convolutions of the two upper levels by Winograd F(2,3) on oneDNN."""
    from brain_ldm_nodes.models import onednn

    ours, reference = full_unets
    x, context = _unet_inputs(np.random.default_rng(5), 1, (20, 28, 20))
    forward = eqx.filter_jit(lambda unet, *args: jax.vmap(unet)(*args))
    args = (jnp.asarray(x), jnp.asarray([500]), jnp.asarray(context))
    if onednn.available():
        assert onednn.WINOGRAD_TARGET in forward.lower(ours, *args).as_text()
    eps = forward(ours, *args)
    ref_eps = reference(torch.from_numpy(x), torch.tensor([500]), context=torch.from_numpy(context)).numpy()
    error = relative_error(eps, ref_eps)
    print(f"U-Net full config, 20×28×20: max relative error {error:.2e}")
    assert error <= TOLERANCE


def test_unet_matches_monai_with_multi_token_context_and_conv_resampling():
    """Configurations the Brain LDM does not use still match: several context tokens (real
    softmax in cross-attention), several heads, conv down/upsampling, 2 transformer layers."""
    config = DiffusionModelUNetConfig(
        channels=(32, 64, 64), num_res_blocks=(1, 2, 1), attention_levels=(True, False, True),
        num_head_channels=(8, 0, 16), resblock_updown=False, transformer_num_layers=2,
    )
    reference = monai_unet(config, seed=4)
    skeleton = eqx.filter_eval_shape(DiffusionModelUNet, config, key=jax.random.key(0))
    ours = load_monai_state_dict(skeleton, state_dict_numpy(reference))
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 7, 8, 4, 12), dtype=np.float32)
    context = rng.standard_normal((2, 3, 4), dtype=np.float32)
    timesteps = np.array([7, 640])
    eps = jax.vmap(ours)(jnp.asarray(x), jnp.asarray(timesteps), jnp.asarray(context))
    ref_eps = reference(
        torch.from_numpy(x), torch.from_numpy(timesteps), context=torch.from_numpy(context)
    ).numpy()
    assert relative_error(eps, ref_eps) <= TOLERANCE


def test_parity_detects_a_dropped_bias(full_autoencoders):
    """The tolerance is tight enough to see the smallest plausible bug: one zeroed bias."""
    ours, reference = full_autoencoders
    broken = eqx.tree_at(lambda vae: vae.decoder.blocks[5].conv2.bias, ours,
                         jnp.zeros_like(ours.decoder.blocks[5].conv2.bias))
    latents = np.random.default_rng(1).standard_normal((1, 3, 2, 2, 2), dtype=np.float32)
    images = jax.vmap(broken.decode)(jnp.asarray(latents))
    ref_images = reference.decode(torch.from_numpy(latents)).numpy()
    assert relative_error(images, ref_images) > 100 * TOLERANCE


def test_unet_rejects_latent_not_multiple_of_four():
    unet = DiffusionModelUNet(
        DiffusionModelUNetConfig(channels=(32, 32, 32), num_head_channels=(0, 32, 32)),
        key=jax.random.key(0),
    )
    with pytest.raises(ValueError, match=r"spatial size \(8, 6, 8\) is not a multiple of 4"):
        unet(jnp.zeros((7, 8, 6, 8)), 10, jnp.zeros((1, 4)))


def test_importing_the_package_imports_no_torch_monai_or_nipype():
    import subprocess
    import sys

    code = (
        "import sys, brain_ldm_nodes, brain_ldm_nodes.weights.mapping, brain_ldm_nodes.scheduler; "
        "bad = [m for m in ('torch', 'monai', 'nipype') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_streaming_decode_matches_monai_full_config(full_autoencoders):
    """The slab-wise decoder (what BrainLDM uses) against MONAI, with slabs smaller than the
    volume so that halos, in-place updates and merged GroupNorm statistics are all exercised."""
    from brain_ldm_nodes.models.streaming import decode_streaming

    ours, reference = full_autoencoders
    latent = np.random.default_rng(6).standard_normal((3, 4, 5, 3), dtype=np.float32)
    ref_image = reference.decode(torch.from_numpy(latent[None])).numpy()[0]
    for slab in (8, 16):
        image = decode_streaming(ours, jnp.asarray(latent), slab=slab)  # eager: one call per slab
        error = relative_error(image, ref_image)
        print(f"streaming decode, full config, slab {slab}: max relative error {error:.2e}")
        assert error <= TOLERANCE


@pytest.mark.parametrize("num_res_blocks", [(1, 1), (2, 3), (1, 1, 1)])
def test_streaming_decode_equals_in_memory_decode(num_res_blocks):
    from brain_ldm_nodes.models.streaming import decode_streaming

    config = AutoencoderKLConfig(channels=(32,) * len(num_res_blocks), num_res_blocks=num_res_blocks)
    vae = AutoencoderKL(config, key=jax.random.key(1))
    latent = jax.random.normal(jax.random.key(2), (3, 6, 5, 4))
    whole = eqx.filter_jit(lambda vae, z: vae.decode(z))(vae, latent)
    depth = whole.shape[1]
    for slab in (2, depth // 2, depth):
        streamed = decode_streaming(vae, latent, slab=slab)  # eager: one compiled call per slab
        assert relative_error(streamed, whole) <= 1e-5
    traced = eqx.filter_jit(lambda vae, z: decode_streaming(vae, z, slab=4))(vae, latent)
    assert relative_error(traced, whole) <= 1e-5


def test_streaming_decode_rejects_a_slab_that_does_not_divide_the_depth():
    from brain_ldm_nodes.models.streaming import decode_streaming

    vae = AutoencoderKL(AutoencoderKLConfig(channels=(32, 32), num_res_blocks=(1, 1)), key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"slab 6 must be even and divide the output depth 8"):
        decode_streaming(vae, jnp.zeros((3, 4, 4, 4)), slab=6)


def test_subpixel_upsample_conv_equals_upsample_then_conv():
    from brain_ldm_nodes.models.layers import Conv3d, upsample_conv, upsample_nearest

    conv = Conv3d(16, 8, 3, key=jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (16, 5, 6, 3))
    assert relative_error(upsample_conv(x, conv), conv(upsample_nearest(x))) <= 2e-6


@pytest.mark.parametrize("shape", [(6, 8, 4), (5, 7, 3)])
def test_winograd_convolution_equals_direct_convolution(shape):
    """Winograd F(2,3) (``Numerics(implementation="winograd")``) is exact to ~1e-7."""
    from brain_ldm_nodes.models.layers import Conv3d, conv3x3x3_winograd, winograd_weights

    conv = Conv3d(16, 8, 3, key=jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (16, *shape))
    assert relative_error(conv3x3x3_winograd(x, winograd_weights(conv.weight), conv.bias), conv(x)) <= 1e-6


CONVOLUTION_CASES = [
    (3, 1, ((1, 1),) * 3, (5, 7, 3)),  # the networks' 3×3×3 convolutions (odd sizes: edges)
    (3, 2, ((0, 1),) * 3, (6, 8, 4)),  # the autoencoder's Downsample
    (3, 2, ((1, 1),) * 3, (6, 8, 4)),  # a strided convolution with symmetric padding
    (2, 1, ((1, 1),) * 3, (5, 6, 3)),  # the sub-pixel upsampling kernels
    (3, 1, ((0, 0), (1, 1), (1, 1)), (6, 5, 4)),  # a slab with its halo (streaming decode)
    (1, 1, ((0, 0),) * 3, (4, 5, 6)),  # 1×1×1 shortcuts and projections
    (3, 1, ((1, 1),) * 3, (18, 16, 16)),  # a larger volume
]


def _conv_case(kernel: int, shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array, jax.Array]:
    weight = jax.random.normal(jax.random.key(0), (8, 16, kernel, kernel, kernel))
    bias = jax.random.normal(jax.random.key(1), (8,))
    x = jax.random.normal(jax.random.key(2), (16, *shape))
    return x, weight, bias


@pytest.mark.parametrize("implementation", ["auto", "onednn", "planes", "matmul", "winograd"])
@pytest.mark.parametrize(("kernel", "stride", "padding", "shape"), CONVOLUTION_CASES)
def test_every_convolution_implementation_equals_xla(implementation, kernel, stride, padding, shape):
    """Each way ``conv3d`` can evaluate a convolution equals one ``lax.conv_general_dilated``
    up to float32 summation order (≈ 1e-7 relative); a wrong tap order, padding or stride gives
    errors of order 1."""
    from brain_ldm_nodes.models import layers

    x, weight, bias = _conv_case(kernel, shape)
    reference = jax.jit(lambda x: layers.conv3d(x, weight, bias, stride=stride, padding=padding,
                                                numerics=layers.Numerics("xla")))(x)
    out = jax.jit(lambda x: layers.conv3d(x, weight, bias, stride=stride, padding=padding,
                                          numerics=layers.Numerics(implementation)))(x)
    assert out.shape == reference.shape
    assert relative_error(out, reference) <= 2e-6


def test_fast_convolution_path_is_built_and_used():
    """CI builds the oneDNN extension (``pip install -e '.[test]'``): the default ``conv3d`` on
    CPU lowers to its custom call, not to XLA's convolution (unless explicitly switched off)."""
    import os

    from brain_ldm_nodes.models import layers, onednn

    if os.environ.get(onednn.DISABLE_VARIABLE, "1").lower() in ("0", "off", "false", "no"):
        assert not onednn.available()
        return
    assert onednn.available(), "the oneDNN extension was not built or failed to load"
    assert onednn.threads() >= 1
    x, weight, bias = _conv_case(3, (5, 7, 3))
    hlo = jax.jit(lambda x: layers.conv3d(x, weight, bias)).lower(x).as_text()
    assert onednn.TARGET in hlo and "convolution" not in hlo
    xla_hlo = jax.jit(lambda x: layers.conv3d(x, weight, bias, numerics=layers.Numerics("xla"))).lower(x).as_text()
    assert onednn.TARGET not in xla_hlo and "convolution" in xla_hlo


@pytest.mark.parametrize(("kernel", "stride", "padding", "shape"), CONVOLUTION_CASES)
def test_onednn_convolution_equals_xla_under_jit_and_vmap(kernel, stride, padding, shape):
    """oneDNN's convolution (batched through ``jax.vmap``: one call, the batch as oneDNN's N;
    nested vmap too) equals ``lax.conv_general_dilated`` to ≤ 4e-6 relative."""
    from brain_ldm_nodes.models import layers, onednn

    assert onednn.available()
    x, weight, bias = _conv_case(kernel, shape)
    batch = jnp.stack([x, -0.5 * x, x[:, ::-1]])
    fast, reference = (
        jax.jit(jax.vmap(lambda x: layers.conv3d(x, weight, bias, stride=stride, padding=padding,
                                                 numerics=layers.Numerics(name))))
        for name in ("onednn", "xla")
    )
    assert relative_error(fast(batch), reference(batch)) <= 4e-6
    nested = jax.jit(jax.vmap(jax.vmap(lambda x: onednn.conv3d(x, weight, bias, stride=stride, padding=padding))))
    assert relative_error(nested(jnp.stack([batch, batch[::-1]])),
                          jnp.stack([reference(batch), reference(batch[::-1])])) <= 4e-6
    # one bias per example (the U-Net's conv1 bias + time embedding), with a batched or shared x
    biases = jnp.stack([bias, -bias, 2 * bias])
    per_bias = [layers.conv3d(x, weight, b, stride=stride, padding=padding, numerics=layers.Numerics("xla"))
                for x, b in zip(batch, biases)]
    fast_biased = jax.jit(jax.vmap(lambda x, b: onednn.conv3d(x, weight, b, stride=stride, padding=padding)))
    assert relative_error(fast_biased(batch, biases), jnp.stack(per_bias)) <= 4e-6
    shared_x = jax.jit(jax.vmap(lambda b: onednn.conv3d(x, weight, b, stride=stride, padding=padding)))
    assert relative_error(shared_x(biases)[1], layers.conv3d(
        x, weight, -bias, stride=stride, padding=padding, numerics=layers.Numerics("xla"))) <= 4e-6


@pytest.mark.parametrize(("channels_in", "channels_out", "kernel"),
                         [(32, 32, 3), (24, 40, 3), (40, 24, 2), (3, 32, 3), (32, 1, 3)])
def test_onednn_blocked_layout_is_the_cpu_native_one_and_exact(channels_in, channels_out, kernel):
    """oneDNN computes in the CPU's native channel blocks (nCdhw16c on AVX-512, nCdhw8c on
    AVX2) with a direct JIT kernel, whatever the channel count (padded blocks: 24, 40); a 1-3
    channel side is left to oneDNN. Equal to XLA's convolution to ≤ 4e-6 relative."""
    from brain_ldm_nodes.models import layers, onednn

    assert onednn.available()
    padding = ((1, 1),) * 3
    x = jax.random.normal(jax.random.key(2), (channels_in, 9, 7, 6))
    weight = jax.random.normal(jax.random.key(0), (channels_out, channels_in) + (kernel,) * 3)
    bias = jax.random.normal(jax.random.key(1), (channels_out,))
    implementation, src_layout, dst_layout = onednn.describe(
        channels_in, x.shape[1:], weight.shape, stride=1, padding=padding, blocked=True).split()
    assert implementation.startswith(("jit:", "brg")), implementation
    native = {"nCdhw16c", "nCdhw8c"}
    if channels_out >= 16:
        assert dst_layout in native and implementation.startswith("jit:")
        assert (src_layout in native) == (channels_in >= 16)
    out = jax.jit(lambda x: layers.conv3d(x, weight, bias, padding=padding))(x)
    reference = layers.conv3d(x, weight, bias, padding=padding, numerics=layers.Numerics("xla"))
    assert relative_error(out, reference) <= 4e-6


WINOGRAD_CASES = [
    (16, 8, ((1, 1),) * 3, (5, 7, 3)),  # odd sizes: partial edge tiles
    (20, 33, ((0, 0), (1, 1), (1, 1)), (6, 5, 4)),  # a slab with its halo; channels not in blocks of 16
    (3, 17, ((1, 0), (0, 1), (1, 1)), (4, 4, 5)),  # one-sided padding
    (40, 24, ((1, 1),) * 3, (2, 2, 2)),  # one tile
    (128, 128, ((1, 1),) * 3, (12, 12, 8)),  # 144 tiles: chunks of 32 spread over the threads
    (160, 136, ((1, 1), (0, 0), (1, 1)), (5, 6, 3)),  # > 128 channels: chunks shared by all threads
]


#: Per-convolution bound of each Winograd tile size. F(2,3): measured ≤ 1.5e-6 on the U-Net's
#: shapes, ≤ 6e-7 here. F(4,3)'s transforms (entries up to 5 and down to 1/24, points ±2) amplify
#: float32 rounding ≈ 10–70× over the direct sum: measured 1e-6…4.4e-5 on these cases and the
#: autoencoder's 64-channel shapes (its only use); the decoder's output stays within 2e-6 of MONAI
#: (test_autoencoder_decode_matches_monai_full_config). A wrong transform gives errors of order 1.
WINOGRAD_TOLERANCE = {2: 4e-6, 4: 1e-4}


@pytest.mark.parametrize("tile", [2, 4])
@pytest.mark.parametrize(("channels_in", "channels_out", "padding", "shape"), WINOGRAD_CASES)
def test_onednn_winograd_convolution_equals_xla_under_jit_and_vmap(channels_in, channels_out, padding, shape, tile):
    """The extension's Winograd F(2×2×2, 3×3×3) and F(4×4×4, 3×3×3) equal
    ``lax.conv_general_dilated`` (to :data:`WINOGRAD_TOLERANCE`), batched through ``jax.vmap``
    with one bias per example and with a shared input."""
    from brain_ldm_nodes.models import layers, onednn

    assert onednn.available()
    x = jax.random.normal(jax.random.key(0), (channels_in, *shape))
    weight = jax.random.normal(jax.random.key(1), (channels_out, channels_in, 3, 3, 3))
    bias = jax.random.normal(jax.random.key(2), (channels_out,))

    def reference(x, bias):
        return layers.conv3d(x, weight, bias, padding=padding, numerics=layers.Numerics("xla"))

    tolerance = WINOGRAD_TOLERANCE[tile]
    winograd = jax.jit(lambda x, bias: onednn.winograd_conv3d(x, weight, bias, padding=padding, tile=tile))
    assert relative_error(winograd(x, bias), reference(x, bias)) <= tolerance
    batch, biases = jnp.stack([x, -0.5 * x]), jnp.stack([bias, 2 * bias])
    assert relative_error(jax.jit(jax.vmap(winograd))(batch, biases),
                          jnp.stack([reference(batch[0], bias), reference(batch[1], 2 * bias)])) <= tolerance
    shared = jax.jit(jax.vmap(lambda b: onednn.winograd_conv3d(x, weight, b, padding=padding, tile=tile)))(biases)
    assert relative_error(shared[1], reference(x, 2 * bias)) <= tolerance


UPSAMPLE_CASES = [
    (16, 8, ((1, 1),) * 3, (5, 7, 3)),  # a whole volume (odd sizes)
    (20, 33, ((0, 0), (1, 1), (1, 1)), (4, 3, 5)),  # a slab window: rows 1 … 2 of the volume, upsampled
    (3, 17, ((1, 0), (0, 1), (1, 1)), (4, 4, 5)),  # one-sided padding
    (128, 128, ((1, 1),) * 3, (8, 6, 5)),  # 240 tiles: chunks spread over the threads
    (160, 24, ((1, 1),) * 3, (3, 4, 2)),  # > 128 channels: chunks shared by all threads
]


@pytest.mark.parametrize(("channels_in", "channels_out", "padding", "shape"), UPSAMPLE_CASES)
def test_onednn_upsample_convolution_equals_upsample_then_xla_convolution(channels_in, channels_out, padding,
                                                                         shape):
    """The extension's 27-product ``conv3x3x3(upsample_nearest(x))`` equals upsampling then
    ``lax.conv_general_dilated`` (padding 1 of the upsampled volume; padding 0 on an axis: the
    rows of ``x`` at either end are only read, as a slab's halo) to ≤ 4e-6 relative, under jit and
    vmap with one bias per example; ``layers.upsample_conv`` uses it under ``"auto"`` for ≥ 64
    outputs, the sub-pixel form otherwise, both exact."""
    from brain_ldm_nodes.models import layers, onednn

    assert onednn.available()
    x = jax.random.normal(jax.random.key(0), (channels_in, *shape))
    weight = jax.random.normal(jax.random.key(1), (channels_out, channels_in, 3, 3, 3))
    bias = jax.random.normal(jax.random.key(2), (channels_out,))

    def reference(x, bias):
        # upsample, convolve with padding 1 of the upsampled volume, then crop the upsampled rows
        # that come from halo rows (padding 0 on a side: its 2 outer rows)
        out = layers.conv3d(layers.upsample_nearest(x), weight, bias, numerics=layers.Numerics("xla"))
        crops = tuple(slice(2 * (1 - lo), out.shape[axis + 1] - 2 * (1 - hi)) for axis, (lo, hi) in enumerate(padding))
        return out[(slice(None),) + crops]

    upsampled = jax.jit(lambda x, bias: onednn.upsample_conv3d(x, weight, bias, padding=padding))
    assert upsampled(x, bias).shape == reference(x, bias).shape
    assert relative_error(upsampled(x, bias), reference(x, bias)) <= 4e-6
    batch, biases = jnp.stack([x, -0.5 * x]), jnp.stack([bias, 2 * bias])
    assert relative_error(jax.jit(jax.vmap(upsampled))(batch, biases),
                          jnp.stack([reference(batch[0], bias), reference(batch[1], 2 * bias)])) <= 4e-6
    if padding == ((1, 1),) * 3:
        conv = eqx.tree_at(lambda c: (c.weight, c.bias), layers.Conv3d(channels_in, channels_out, key=jax.random.key(3)),
                           (weight, bias))
        hlo = jax.jit(lambda x: layers.upsample_conv(x, conv)).lower(x).as_text()
        assert (f"@{onednn.UPSAMPLE_TARGET}(" in hlo) == (channels_out >= layers.UPSAMPLE_MIN_CHANNELS_OUT)
        assert relative_error(layers.upsample_conv(x, conv), reference(x, bias)) <= 4e-6


def test_auto_uses_winograd_only_where_it_was_measured_faster():
    """``"auto"`` sends a 3×3×3 stride-1 convolution with ≥ 64 channels in and out on ≥ 1024
    output voxels to a Winograd custom call (the U-Net's upper levels, all the autoencoder's
    3×3×3 ones but those to or from its latent): F(4,3) with ≤ 64 output channels (the
    autoencoder's full-resolution level), F(2,3) above; everything else to oneDNN's direct
    convolution; the result equals XLA's."""
    from brain_ldm_nodes.models import layers, onednn

    assert onednn.available()
    x = jax.random.normal(jax.random.key(0), (256, 12, 12, 8))  # 1152 voxels
    weight = jax.random.normal(jax.random.key(1), (256, 256, 3, 3, 3)) / (256 * 27) ** 0.5
    bias = jax.random.normal(jax.random.key(2), (256,))

    def targets(x, weight, **kwargs):
        hlo = jax.jit(lambda x: layers.conv3d(x, weight, bias[:weight.shape[0]], **kwargs)).lower(x).as_text()
        called = [f"@{target}(" in hlo for target in (onednn.WINOGRAD_TARGET, onednn.WINOGRAD4_TARGET, onednn.TARGET)]
        assert sum(called) == 1, called
        return ("winograd", "winograd4", "direct")[called.index(True)]

    assert targets(x, weight) == "winograd"
    assert targets(x[:, :8, :8, :8], weight) == "direct"  # 512 voxels
    assert layers.WINOGRAD_MIN_CHANNELS == 64 and layers.WINOGRAD4_MAX_CHANNELS_OUT == 64
    assert targets(x, weight[:65]) == "winograd"  # 65 output channels
    assert targets(x, weight[:64]) == "winograd4"  # 64 output channels
    assert targets(x, weight[:32]) == "direct"  # 32 output channels
    assert targets(x[:32], weight[:, :32]) == "direct"  # 32 input channels
    assert targets(x, weight, stride=2) == "direct"
    assert targets(x, weight, numerics=layers.Numerics("onednn")) == "direct"
    # a kernel packed for the direct convolution (at another size) stays on it: no unpacking per call
    packed = onednn.pack(weight, (4, 4, 4), stride=1, padding=((1, 1),) * 3, blocked=True)
    assert targets(x, packed) == "direct"
    out = jax.jit(lambda x: layers.conv3d(x, weight, bias))(x)
    assert relative_error(out, layers.conv3d(x, weight, bias, numerics=layers.Numerics("xla"))) <= 4e-6
    out = jax.jit(lambda x: layers.conv3d(x, weight[:64], bias[:64]))(x)
    reference = layers.conv3d(x, weight[:64], bias[:64], numerics=layers.Numerics("xla"))
    assert relative_error(out, reference) <= WINOGRAD_TOLERANCE[4]


def test_onednn_rejects_a_batched_kernel():
    from brain_ldm_nodes.models import onednn

    x, weight, bias = _conv_case(3, (5, 7, 3))
    batched = jax.vmap(lambda w: onednn.conv3d(x, w, bias, stride=1, padding=((1, 1),) * 3))
    with pytest.raises(Exception, match="weights must not be batched"):
        jax.block_until_ready(batched(jnp.stack([weight, weight])))


def test_onednn_plans_are_cached_per_problem_and_follow_the_kernel_values():
    """One oneDNN primitive per problem, reused across calls; the same compiled function called
    with other weights gives the other result (nothing is keyed on a buffer's address)."""
    from brain_ldm_nodes.models import layers, onednn

    x, weight, bias = _conv_case(3, (5, 7, 3))
    conv = jax.jit(lambda x, w: layers.conv3d(x, w, bias))
    reference = jax.jit(lambda x, w: layers.conv3d(x, w, bias, numerics=layers.Numerics("xla")))
    for w in (weight, weight.at[3, 2, 1, 1, 1].add(1.0), weight):
        assert relative_error(conv(x, w), reference(x, w)) <= 2e-6
        plans = onednn.cached_plans()
    onednn.release_scratch()
    assert relative_error(conv(x, -weight), reference(x, -weight)) <= 2e-6
    assert onednn.cached_plans() == plans


def test_xla_networks_equal_the_default_ones():
    """The pure-XLA path (``with_numerics(..., implementation="xla")``: the fallback and oracle)
    of whole (small) networks equals the default (oneDNN) path within the parity tolerance."""
    from brain_ldm_nodes.models.layers import with_numerics

    vae = AutoencoderKL(AutoencoderKLConfig(channels=(32, 32), num_res_blocks=(1, 1)), key=jax.random.key(1))
    unet = DiffusionModelUNet(DiffusionModelUNetConfig(channels=(32, 32, 32), num_res_blocks=(1, 1, 1),
                                                       num_head_channels=(0, 32, 32)), key=jax.random.key(2))
    latent = jax.random.normal(jax.random.key(3), (3, 4, 6, 4))
    x = jax.random.normal(jax.random.key(4), (7, 4, 8, 4))
    context = jax.random.uniform(jax.random.key(5), (1, 4))
    outputs = {}
    for name in ("auto", "xla", "winograd"):
        outputs[name] = (eqx.filter_jit(lambda vae, z: vae.decode(z))(with_numerics(vae, implementation=name), latent),
                         eqx.filter_jit(lambda unet, x: unet(x, jnp.asarray(500), context))(
                             with_numerics(unet, implementation=name), x))
    for name in ("auto", "winograd"):
        for ours, reference in zip(outputs[name], outputs["xla"]):
            assert relative_error(ours, reference) <= TOLERANCE


def test_packed_kernels_give_the_same_network_without_reordering_them():
    """``pack_kernels``: the kernels of the convolutions that run on oneDNN are stored in its
    packed layout (no copy kept: as many kernels as before, no plain ones left on the oneDNN
    path); the U-Net's output is bitwise the same (the same kernels read the same values), at
    another input size too (relayout per call), under jit and vmap; the XLA path of a packed
    network and ``unpack_kernels`` give the plain kernels back exactly."""
    from brain_ldm_nodes.models import layers, onednn

    assert onednn.available()
    unet = DiffusionModelUNet(DiffusionModelUNetConfig(channels=(32, 32, 32), num_res_blocks=(1, 1, 1),
                                                       num_head_channels=(0, 32, 32)), key=jax.random.key(2))
    x = jax.random.normal(jax.random.key(4), (2, 7, 16, 20, 16))  # level 0 blocked, levels 1-2 channels-last
    context = jax.random.uniform(jax.random.key(5), (2, 1, 4))
    packed = layers.pack_kernels(unet, jax.ShapeDtypeStruct(x.shape[1:], jnp.float32), jnp.asarray(500), context[0])
    is_packed = lambda node: isinstance(node, onednn.PackedKernel)  # noqa: E731
    kernels = [leaf for leaf in jax.tree_util.tree_leaves(packed, is_leaf=is_packed) if is_packed(leaf)]
    convolutions = [leaf for leaf in jax.tree_util.tree_leaves(unet, is_leaf=lambda n: isinstance(n, layers.Conv3d))
                    if isinstance(leaf, layers.Conv3d) and leaf.weight.shape[2:] == (3, 3, 3)]
    # every 3×3×3 kernel but the two upsamplers' (used through their sub-pixel form) is packed
    assert len(kernels) == len(convolutions) - 2
    assert {kernel.problem[1:4] for kernel in kernels} == {(16, 20, 16), (8, 10, 8), (4, 5, 4)}
    run = eqx.filter_jit(lambda net, x, c: jax.vmap(lambda x, c: net(x, jnp.asarray(500), c))(x, c))
    np.testing.assert_array_equal(np.asarray(run(packed, x, context)), np.asarray(run(unet, x, context)))
    other = x[:, :, :8, :12, :8]  # other sizes: the packed kernels are relaid out where needed
    np.testing.assert_array_equal(np.asarray(run(packed, other, context)), np.asarray(run(unet, other, context)))
    xla = layers.with_numerics(packed, implementation="xla")  # unpacks (exactly) on the way
    assert relative_error(run(xla, x, context), run(unet, x, context)) <= 1e-5
    for plain, restored in zip(jax.tree_util.tree_leaves(unet), jax.tree_util.tree_leaves(layers.unpack_kernels(packed))):
        np.testing.assert_array_equal(np.asarray(plain), np.asarray(restored))
    consumed = jax.tree_util.tree_map(jnp.copy, unet)
    packed_again = layers.pack_kernels(consumed, x[0], jnp.asarray(500), context[0], consume=True)
    assert consumed.conv_in.weight.is_deleted() and not unet.conv_in.weight.is_deleted()
    np.testing.assert_array_equal(np.asarray(packed_again.conv_in.weight.data), np.asarray(packed.conv_in.weight.data))


def test_xla_decoder_matches_monai_full_config(full_autoencoders):
    """The pure-XLA path of the full-size decoder against MONAI (the default path is the
    oneDNN one in the tests above)."""
    from brain_ldm_nodes.models.layers import with_numerics

    ours, reference = full_autoencoders
    latents = np.random.default_rng(1).standard_normal((1, 3, 4, 5, 3), dtype=np.float32)
    images = eqx.filter_jit(lambda vae, z: jax.vmap(vae.decode)(z))(with_numerics(ours, implementation="xla"),
                                                                    jnp.asarray(latents))
    assert relative_error(images, reference.decode(torch.from_numpy(latents)).numpy()) <= TOLERANCE


def test_numerics_configuration_is_static_and_validated():
    """How layers compute is part of the network's tree structure (jit caches see it); no
    module global, nothing cleared."""
    from brain_ldm_nodes.models import layers

    conv = layers.Conv3d(4, 4, 3, key=jax.random.key(0))
    xla = layers.with_numerics(conv, implementation="xla")
    assert conv.numerics == layers.Numerics() and xla.numerics == layers.Numerics("xla", "float32")
    assert xla.weight is conv.weight
    assert jax.tree_util.tree_structure(xla) != jax.tree_util.tree_structure(conv)
    assert not hasattr(layers, "CONV_IMPLEMENTATION") and not hasattr(layers, "OPERAND_DTYPE")
    with pytest.raises(ValueError, match="unknown convolution implementation 'fast'"):
        layers.Numerics("fast")


@pytest.mark.parametrize("how", ["extension absent", "stale build", "switched off"])
def test_package_works_on_xla_without_the_extension(how):
    """Without the built extension, with one built from another version of the C++ source (a
    stale build in a checkout), or with ``BRAIN_LDM_NODES_ONEDNN=0``, convolutions lower to
    XLA and give the same numbers; an absent or stale extension is reported in one line."""
    import os
    import subprocess
    import sys

    code = (
        "import jax, jax.numpy as jnp\n"
        "from brain_ldm_nodes.models import layers, onednn\n"
        + ("onednn._extension_path = lambda: None\n" if how == "extension absent" else "")
        + ("onednn.INTERFACE_VERSION += 1\n" if how == "stale build" else "")
        + "x = jax.random.normal(jax.random.key(0), (4, 5, 6, 3)); w = jax.random.normal(jax.random.key(1), (3, 4, 3, 3, 3))\n"
        "hlo = jax.jit(lambda x: layers.conv3d(x, w)).lower(x).as_text()\n"
        "assert onednn.TARGET not in hlo and not onednn.available()\n"
        "print(float(jnp.abs(layers.conv3d(x, w)).sum()))\n"
    )
    env = {**os.environ, "BRAIN_LDM_NODES_ONEDNN": "0" if how == "switched off" else "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    from brain_ldm_nodes.models import layers

    x = jax.random.normal(jax.random.key(0), (4, 5, 6, 3))
    w = jax.random.normal(jax.random.key(1), (3, 4, 3, 3, 3))
    assert float(result.stdout) == pytest.approx(float(jnp.abs(layers.conv3d(x, w)).sum()), rel=1e-5)
    notices = [line for line in result.stderr.splitlines() if "oneDNN extension" in line]
    assert len(notices) == (0 if how == "switched off" else 1), result.stderr
    if how == "stale build":
        assert "built from another source" in notices[0] and "pip install -e ." in notices[0]


def test_an_extension_without_an_interface_version_is_not_used():
    """An extension built before the interface version existed is refused, with the reason."""
    from brain_ldm_nodes.models import onednn

    assert onednn.interface_mismatch(object()).startswith("built from an older source")
    if onednn.available():  # the extension this checkout built speaks this module's interface
        assert onednn.interface_mismatch(onednn._library()) is None


@pytest.mark.parametrize("cpu_isa, expected", [("AVX2", "avx2"), ("SSE41", "baseline")])
def test_transforms_run_on_each_instruction_set(cpu_isa, expected):
    """The Winograd and upsampling transforms are compiled once per instruction set (AVX-512,
    AVX2, baseline SSE2) and picked from the CPU oneDNN uses: limited by ``ONEDNN_MAX_CPU_ISA``
    (in a fresh process), each copy gives XLA's result, on full and partial blocks of 16
    channels, edge and slab padding."""
    import json
    import os
    import subprocess
    import sys

    code = (
        "import json, jax, jax.numpy as jnp\n"
        "from brain_ldm_nodes.models import layers, onednn\n"
        "xla = layers.Numerics('xla')\n"
        "x = jax.random.normal(jax.random.key(0), (40, 7, 6, 9))\n"
        "w = jax.random.normal(jax.random.key(1), (20, 40, 3, 3, 3)) / 33\n"
        "b = jax.random.normal(jax.random.key(2), (20,))\n"
        "def err(a, r): return float(jnp.abs(a - r).max() / jnp.abs(r).max())\n"
        "pad = ((0, 1), (1, 1), (1, 0))\n"
        "ref = layers.conv3d(x, w, b, padding=pad, numerics=xla)\n"
        "wino = err(onednn.winograd_conv3d(x, w, b, padding=pad), ref)\n"
        "wino4 = err(onednn.winograd_conv3d(x, w, b, padding=pad, tile=4), ref)\n"
        "up = layers.conv3d(layers.upsample_nearest(x), w, b, numerics=xla)\n"
        "ups = err(onednn.upsample_conv3d(x, w, b), up)\n"
        "last = onednn.upsample_conv3d(jnp.moveaxis(x, 0, -1), w, b, channels_last=True)\n"
        "print(json.dumps({'isa': onednn.transform_isa(), 'winograd': wino, 'winograd4': wino4, 'upsample': ups,\n"
        "                  'channels_last': err(jnp.moveaxis(last, -1, 0), up)}))\n"
    )
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": cpu_isa}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["isa"] == expected
    assert report["winograd"] <= 4e-6 and report["upsample"] <= 4e-6 and report["channels_last"] <= 4e-6, report
    assert report["winograd4"] <= WINOGRAD_TOLERANCE[4], report


def test_channels_last_convolutions_match_channels_first():
    """``layers.conv3d_channels_last`` (the streaming decoder's layout) gives ``conv3d``'s result
    transposed, on each path: Winograd F(4,3) and F(2,3), oneDNN direct (a 1-channel output, as
    ``conv_out``), XLA."""
    from brain_ldm_nodes.models import layers, onednn

    x = jax.random.normal(jax.random.key(0), (64, 6, 24, 16))  # 1536 output voxels: Winograd's minimum is 1024
    pad = ((0, 0), (1, 1), (1, 1))
    for channels_out, numerics, target in ((64, layers.Numerics(), onednn.WINOGRAD4_TARGET),
                                           (80, layers.Numerics(), onednn.WINOGRAD_TARGET),
                                           (1, layers.Numerics(), onednn.TARGET),
                                           (64, layers.Numerics("xla"), None)):
        w = jax.random.normal(jax.random.key(channels_out), (channels_out, 64, 3, 3, 3)) / 40
        b = jax.random.normal(jax.random.key(2), (channels_out,))
        last = jax.jit(lambda x: layers.conv3d_channels_last(x, w, b, padding=pad, numerics=numerics))
        x_last = jnp.moveaxis(x, 0, -1)
        hlo = last.lower(x_last).as_text()
        if target is not None:
            assert f"@{target}(" in hlo
            assert "transpose" not in hlo  # the volume goes to the extension as it is
        reference = layers.conv3d(x, w, b, padding=pad, numerics=layers.Numerics("xla"))
        tolerance = WINOGRAD_TOLERANCE[4] if target == onednn.WINOGRAD4_TARGET else 4e-6
        assert relative_error(jnp.moveaxis(last(x_last), -1, 0), reference) <= tolerance
