"""Building blocks shared by the autoencoder and the diffusion U-Net.

Conventions (all modules in :mod:`brain_ldm_nodes.models`):

* Every module works on **one example**, channels first: a volume is ``(C, D, H, W)``
  float32 and a token sequence is ``(N, C)``. Batches go through :func:`jax.vmap`
  (:class:`brain_ldm_nodes.BrainLDM` does this for you).
* Parameter arrays use PyTorch's layouts (convolution ``(O, I, kD, kH, kW)``, linear
  ``(out, in)``), so converted MONAI weights need no transposition.
* Random initialisation (``key=``) draws ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` for
  weights and biases, as PyTorch does. It gives valid random models for tests; it is not
  a training recipe (MONAI zero-initialises some output convolutions).
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, PRNGKeyArray

# float32 everywhere: accelerators would otherwise default to reduced-precision matmuls.
PRECISION = lax.Precision.HIGHEST

Volume = Float[Array, "channels depth height width"]


def _uniform(key: PRNGKeyArray, shape: tuple[int, ...], fan_in: int) -> Array:
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


class Conv3d(eqx.Module):
    """3-D convolution with bias, zero padding, on one ``(C, D, H, W)`` volume.

    ``padding`` is ``kernel_size // 2`` ("same" for stride 1) unless given as one
    ``(before, after)`` pair applied to every spatial axis.
    """

    weight: Float[Array, "out in kd kh kw"]
    bias: Float[Array, " out"]
    stride: int = eqx.field(static=True)
    padding: tuple[int, int] = eqx.field(static=True)

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        *,
        stride: int = 1,
        padding: tuple[int, int] | None = None,
        key: PRNGKeyArray,
    ) -> None:
        weight_key, bias_key = jax.random.split(key)
        fan_in = in_channels * kernel_size**3
        self.weight = _uniform(weight_key, (out_channels, in_channels) + (kernel_size,) * 3, fan_in)
        self.bias = _uniform(bias_key, (out_channels,), fan_in)
        self.stride = stride
        half = kernel_size // 2
        self.padding = (half, half) if padding is None else tuple(padding)

    def __call__(self, x: Volume) -> Volume:
        out = lax.conv_general_dilated(
            x[None],
            self.weight,
            window_strides=(self.stride,) * 3,
            padding=(self.padding,) * 3,
            dimension_numbers=("NCDHW", "OIDHW", "NCDHW"),
            precision=PRECISION,
        )[0]
        return out + self.bias[:, None, None, None]


class Linear(eqx.Module):
    """Affine map over the last axis: ``(..., in) -> (..., out)``; weight ``(out, in)``."""

    weight: Float[Array, "out in"]
    bias: Float[Array, " out"] | None

    def __init__(
        self, in_features: int, out_features: int, *, use_bias: bool = True, key: PRNGKeyArray
    ) -> None:
        weight_key, bias_key = jax.random.split(key)
        self.weight = _uniform(weight_key, (out_features, in_features), in_features)
        self.bias = _uniform(bias_key, (out_features,), in_features) if use_bias else None

    def __call__(self, x: Float[Array, "... in"]) -> Float[Array, "... out"]:
        out = jnp.einsum("...i,oi->...o", x, self.weight, precision=PRECISION)
        return out if self.bias is None else out + self.bias


class GroupNorm(eqx.Module):
    """Group normalisation of a ``(C, ...)`` array with a per-channel affine."""

    weight: Float[Array, " channels"]
    bias: Float[Array, " channels"]
    groups: int = eqx.field(static=True)
    eps: float = eqx.field(static=True)

    def __init__(self, groups: int, channels: int, eps: float = 1e-6, *, key: PRNGKeyArray) -> None:
        if channels % groups:
            raise ValueError(f"GroupNorm: {channels} channels are not divisible by {groups} groups")
        weight_key, bias_key = jax.random.split(key)
        # Random (not 1/0) affine so that tests notice a dropped or swapped affine.
        self.weight = 1.0 + 0.1 * jax.random.normal(weight_key, (channels,), jnp.float32)
        self.bias = 0.1 * jax.random.normal(bias_key, (channels,), jnp.float32)
        self.groups = groups
        self.eps = eps

    def __call__(self, x: Float[Array, "channels *spatial"]) -> Float[Array, "channels *spatial"]:
        channels = x.shape[0]
        grouped = x.reshape(self.groups, -1)
        mean = grouped.mean(axis=1, keepdims=True)
        var = jnp.square(grouped - mean).mean(axis=1, keepdims=True)
        normed = ((grouped - mean) * lax.rsqrt(var + self.eps)).reshape(x.shape)
        affine_shape = (channels,) + (1,) * (x.ndim - 1)
        return normed * self.weight.reshape(affine_shape) + self.bias.reshape(affine_shape)


class LayerNorm(eqx.Module):
    """Layer normalisation over the last axis of ``(..., C)``."""

    weight: Float[Array, " channels"]
    bias: Float[Array, " channels"]
    eps: float = eqx.field(static=True)

    def __init__(self, channels: int, eps: float = 1e-5, *, key: PRNGKeyArray) -> None:
        weight_key, bias_key = jax.random.split(key)
        self.weight = 1.0 + 0.1 * jax.random.normal(weight_key, (channels,), jnp.float32)
        self.bias = 0.1 * jax.random.normal(bias_key, (channels,), jnp.float32)
        self.eps = eps

    def __call__(self, x: Float[Array, "... channels"]) -> Float[Array, "... channels"]:
        mean = x.mean(axis=-1, keepdims=True)
        var = jnp.square(x - mean).mean(axis=-1, keepdims=True)
        return (x - mean) * lax.rsqrt(var + self.eps) * self.weight + self.bias


def upsample_nearest(x: Volume) -> Volume:
    """Nearest-neighbour ×2 upsampling of every spatial axis: ``(C, D, H, W) -> (C, 2D, 2H, 2W)``."""
    for axis in (1, 2, 3):
        x = jnp.repeat(x, 2, axis=axis)
    return x


def avg_pool2(x: Volume) -> Volume:
    """2×2×2 average pooling, stride 2: ``(C, D, H, W) -> (C, D/2, H/2, W/2)`` (even sizes)."""
    channels, depth, height, width = x.shape
    blocks = x.reshape(channels, depth // 2, 2, height // 2, 2, width // 2, 2)
    return blocks.mean(axis=(2, 4, 6))
