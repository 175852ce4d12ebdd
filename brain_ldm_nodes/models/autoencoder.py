"""The Brain LDM's KL autoencoder (MONAI ``AutoencoderKL``, attention-free variant).

Architecture facts: ``shared/UPSTREAM.md`` §3. One example at a time, channels first:
an image is ``(1, D, H, W)`` float32 with intensities in [0, 1]; a latent is
``(latent_channels, D/f, H/f, W/f)`` with ``f = 2 ** (len(channels) - 1)`` (8 upstream).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .layers import Conv3d, GroupNorm, Volume, upsample_conv


@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig:
    """Architecture of :class:`AutoencoderKL`; the defaults are the released Brain LDM's."""

    in_channels: int = 1
    out_channels: int = 1
    latent_channels: int = 3
    channels: tuple[int, ...] = (64, 128, 128, 128)
    num_res_blocks: tuple[int, ...] = (2, 2, 2, 2)
    norm_num_groups: int = 32
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        object.__setattr__(self, "num_res_blocks", tuple(int(n) for n in self.num_res_blocks))
        if len(self.channels) != len(self.num_res_blocks):
            raise ValueError(
                f"AutoencoderKLConfig: channels {self.channels} and num_res_blocks "
                f"{self.num_res_blocks} must have the same length"
            )
        bad = [c for c in self.channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(
                f"AutoencoderKLConfig: channels {bad} are not multiples of "
                f"norm_num_groups={self.norm_num_groups}"
            )

    @property
    def downsampling_factor(self) -> int:
        """Image size ÷ latent size per axis (8 for the released model)."""
        return 2 ** (len(self.channels) - 1)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "channels": list(self.channels),
                "num_res_blocks": list(self.num_res_blocks)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AutoencoderKLConfig:
        return cls(**data)


class ResBlock(eqx.Module):
    """``nin_shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))))))``."""

    norm1: GroupNorm
    conv1: Conv3d
    norm2: GroupNorm
    conv2: Conv3d
    nin_shortcut: Conv3d | None

    def __init__(
        self, in_channels: int, out_channels: int, config: AutoencoderKLConfig, *, key: PRNGKeyArray
    ) -> None:
        keys = jax.random.split(key, 5)
        groups, eps = config.norm_num_groups, config.norm_eps
        self.norm1 = GroupNorm(groups, in_channels, eps, key=keys[0])
        self.conv1 = Conv3d(in_channels, out_channels, 3, key=keys[1])
        self.norm2 = GroupNorm(groups, out_channels, eps, key=keys[2])
        self.conv2 = Conv3d(out_channels, out_channels, 3, key=keys[3])
        self.nin_shortcut = (
            Conv3d(in_channels, out_channels, 1, key=keys[4]) if in_channels != out_channels else None
        )

    def __call__(self, x: Volume) -> Volume:
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class Downsample(eqx.Module):
    """Zero-pad one voxel at the end of each axis, then a stride-2 3×3×3 convolution."""

    conv: Conv3d

    def __init__(self, channels: int, *, key: PRNGKeyArray) -> None:
        self.conv = Conv3d(channels, channels, 3, stride=2, padding=(0, 1), key=key)

    def __call__(self, x: Volume) -> Volume:
        return self.conv(x)


class Upsample(eqx.Module):
    """Nearest-neighbour ×2, then a 3×3×3 convolution (MONAI key ``postconv``), evaluated in
    sub-pixel form (:func:`~brain_ldm_nodes.models.layers.upsample_conv`)."""

    postconv: Conv3d

    def __init__(self, channels: int, *, key: PRNGKeyArray) -> None:
        self.postconv = Conv3d(channels, channels, 3, key=key)

    def __call__(self, x: Volume) -> Volume:
        return upsample_conv(x, self.postconv)


Block = Conv3d | ResBlock | Downsample | Upsample | GroupNorm


class Encoder(eqx.Module):
    """Image ``(in_channels, D, H, W)`` → features ``(latent_channels, D/f, H/f, W/f)``.

    ``blocks`` follows MONAI's numbering: conv_in, per level ``num_res_blocks`` ResBlocks
    (+ Downsample except at the last level), GroupNorm, conv_out. No SiLU before conv_out.
    """

    blocks: tuple[Block, ...]

    def __init__(self, config: AutoencoderKLConfig, *, key: PRNGKeyArray) -> None:
        keys = iter(jax.random.split(key, 3 + sum(config.num_res_blocks) + len(config.channels)))
        blocks: list[Block] = [Conv3d(config.in_channels, config.channels[0], 3, key=next(keys))]
        channels = config.channels[0]
        for level, (level_channels, n_blocks) in enumerate(
            zip(config.channels, config.num_res_blocks)
        ):
            for _ in range(n_blocks):
                blocks.append(ResBlock(channels, level_channels, config, key=next(keys)))
                channels = level_channels
            if level < len(config.channels) - 1:
                blocks.append(Downsample(channels, key=next(keys)))
        blocks.append(GroupNorm(config.norm_num_groups, channels, config.norm_eps, key=next(keys)))
        blocks.append(Conv3d(channels, config.latent_channels, 3, key=next(keys)))
        self.blocks = tuple(blocks)

    def __call__(self, x: Volume) -> Volume:
        for block in self.blocks:
            x = block(x)
        return x


class Decoder(eqx.Module):
    """Latent ``(latent_channels, d, h, w)`` → image ``(out_channels, f·d, f·h, f·w)``.

    conv_in, then per level (channels reversed) ``num_res_blocks`` ResBlocks (+ Upsample except
    at the last level), GroupNorm, conv_out. No SiLU before conv_out, no output activation.
    """

    blocks: tuple[Block, ...]

    def __init__(self, config: AutoencoderKLConfig, *, key: PRNGKeyArray) -> None:
        keys = iter(jax.random.split(key, 3 + sum(config.num_res_blocks) + len(config.channels)))
        reversed_channels = tuple(reversed(config.channels))
        reversed_blocks = tuple(reversed(config.num_res_blocks))
        channels = reversed_channels[0]
        blocks: list[Block] = [Conv3d(config.latent_channels, channels, 3, key=next(keys))]
        for level, (level_channels, n_blocks) in enumerate(zip(reversed_channels, reversed_blocks)):
            for _ in range(n_blocks):
                blocks.append(ResBlock(channels, level_channels, config, key=next(keys)))
                channels = level_channels
            if level < len(reversed_channels) - 1:
                blocks.append(Upsample(channels, key=next(keys)))
        blocks.append(GroupNorm(config.norm_num_groups, channels, config.norm_eps, key=next(keys)))
        blocks.append(Conv3d(channels, config.out_channels, 3, key=next(keys)))
        self.blocks = tuple(blocks)

    def __call__(self, z: Volume) -> Volume:
        for block in self.blocks:
            z = block(z)
        return z


class AutoencoderKL(eqx.Module):
    """KL-regularised convolutional autoencoder of 3-D T1w images.

    ``AutoencoderKL(key=key)`` builds the released Brain LDM's autoencoder (13,766,248
    parameters) with random weights; pass an :class:`AutoencoderKLConfig` for others.
    Works on one example; ``jax.vmap`` for batches.
    """

    encoder: Encoder
    decoder: Decoder
    quant_conv_mu: Conv3d
    quant_conv_log_sigma: Conv3d
    post_quant_conv: Conv3d
    config: AutoencoderKLConfig = eqx.field(static=True)

    def __init__(
        self, config: AutoencoderKLConfig | None = None, *, key: PRNGKeyArray
    ) -> None:
        config = AutoencoderKLConfig() if config is None else config
        keys = jax.random.split(key, 5)
        latent = config.latent_channels
        self.encoder = Encoder(config, key=keys[0])
        self.decoder = Decoder(config, key=keys[1])
        self.quant_conv_mu = Conv3d(latent, latent, 1, key=keys[2])
        self.quant_conv_log_sigma = Conv3d(latent, latent, 1, key=keys[3])
        self.post_quant_conv = Conv3d(latent, latent, 1, key=keys[4])
        self.config = config

    def encode(
        self, image: Float[Array, "in_channels D H W"]
    ) -> tuple[Float[Array, "latent d h w"], Float[Array, "latent d h w"]]:
        """Posterior mean and standard deviation of the latent.

        Args:
            image: ``(in_channels, D, H, W)`` float32, intensities in [0, 1], each of D, H, W a
                multiple of the downsampling factor (8 upstream).

        Returns:
            ``(z_mu, z_sigma)``, each ``(latent_channels, D/8, H/8, W/8)``;
            ``z_sigma = exp(clip(log_var, -30, 20) / 2)`` as upstream.
        """
        features = self.encoder(image)
        z_mu = self.quant_conv_mu(features)
        log_var = jnp.clip(self.quant_conv_log_sigma(features), -30.0, 20.0)
        return z_mu, jnp.exp(log_var / 2)

    def sample_latent(
        self, z_mu: Float[Array, "*shape"], z_sigma: Float[Array, "*shape"], *, key: PRNGKeyArray
    ) -> Float[Array, "*shape"]:
        """A draw ``z_mu + N(0, 1) · z_sigma`` from the posterior (``z_mu`` is the deterministic one)."""
        return z_mu + jax.random.normal(key, z_mu.shape, z_mu.dtype) * z_sigma

    def decode(self, latent: Float[Array, "latent d h w"]) -> Float[Array, "out_channels D H W"]:
        """Image ``(out_channels, 8d, 8h, 8w)``, intensities ≈ [0, 1] (not clipped, as upstream)."""
        return self.decoder(self.post_quant_conv(latent))

    def __call__(self, image: Float[Array, "in_channels D H W"]) -> Float[Array, "out_channels D H W"]:
        """Deterministic reconstruction ``decode(encode(image).z_mu)``."""
        return self.decode(self.encode(image)[0])
