"""The Brain LDM's conditional diffusion U-Net (MONAI ``DiffusionModelUNet``, with conditioning).

Architecture facts: ``shared/UPSTREAM.md`` §4. One example at a time, channels first:
``x`` is ``(in_channels, d, h, w)`` (upstream: 3 latent channels then the 4 conditioning
values broadcast over space), ``timestep`` a scalar in [0, num_train_timesteps), ``context``
``(n_tokens, cross_attention_dim)`` (upstream: the conditioning as one token, ``(1, 4)``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .layers import (
    PRECISION,
    Conv3d,
    GroupNorm,
    LayerNorm,
    Linear,
    Volume,
    avg_pool2,
    conv3d,
    pack_kernels,
    upsample_conv,
    upsample_nearest,
)

Tokens = Float[Array, "tokens channels"]


@dataclasses.dataclass(frozen=True)
class DiffusionModelUNetConfig:
    """Architecture of :class:`DiffusionModelUNet`; the defaults are the released Brain LDM's.

    Always cross-attention conditioned (MONAI ``with_conditioning=True``). ``num_head_channels``
    is per level; a level with attention has ``channels[i] // num_head_channels[i]`` heads.
    """

    in_channels: int = 7
    out_channels: int = 3
    channels: tuple[int, ...] = (256, 512, 768)
    num_res_blocks: tuple[int, ...] = (2, 2, 2)
    attention_levels: tuple[bool, ...] = (False, True, True)
    num_head_channels: tuple[int, ...] = (0, 512, 768)
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    resblock_updown: bool = True
    transformer_num_layers: int = 1
    cross_attention_dim: int = 4

    def __post_init__(self) -> None:
        for name in ("channels", "num_res_blocks", "num_head_channels"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        object.__setattr__(self, "attention_levels", tuple(bool(v) for v in self.attention_levels))
        levels = len(self.channels)
        for name in ("num_res_blocks", "attention_levels", "num_head_channels"):
            if len(getattr(self, name)) != levels:
                raise ValueError(
                    f"DiffusionModelUNetConfig: {name} {getattr(self, name)} must have one entry per "
                    f"level of channels {self.channels}"
                )
        bad = [c for c in self.channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(
                f"DiffusionModelUNetConfig: channels {bad} are not multiples of "
                f"norm_num_groups={self.norm_num_groups}"
            )
        for channels, attention, head_channels in zip(
            self.channels, self.attention_levels, self.num_head_channels
        ):
            if attention and (head_channels <= 0 or channels % head_channels):
                raise ValueError(
                    f"DiffusionModelUNetConfig: a level with attention needs num_head_channels "
                    f"dividing its channels; got {head_channels} for {channels} channels"
                )

    @property
    def spatial_multiple(self) -> int:
        """Every spatial size of ``x`` must be a multiple of this (4 upstream)."""
        return 2 ** (len(self.channels) - 1)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DiffusionModelUNetConfig:
        return cls(**data)


def timestep_embedding(timestep: Float[Array, ""], dim: int, max_period: float = 10000.0) -> Array:
    """Sinusoidal embedding ``cat([cos(t·f), sin(t·f)])``, ``f_i = exp(-ln(max_period)·i/(dim/2))``."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32)
    freqs = jnp.exp(exponent / half)
    args = jnp.asarray(timestep, jnp.float32) * freqs
    embedding = jnp.concatenate([jnp.cos(args), jnp.sin(args)])
    return jnp.pad(embedding, (0, dim % 2))


class ResnetBlock(eqx.Module):
    """Residual block with timestep conditioning and optional ×2 up / ½ down resampling."""

    norm1: GroupNorm
    conv1: Conv3d
    time_emb_proj: Linear
    norm2: GroupNorm
    conv2: Conv3d
    skip_connection: Conv3d | None
    resample: str | None = eqx.field(static=True)

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        time_embed_dim: int,
        config: DiffusionModelUNetConfig,
        *,
        resample: str | None = None,
        key: PRNGKeyArray,
    ) -> None:
        keys = jax.random.split(key, 6)
        groups, eps = config.norm_num_groups, config.norm_eps
        self.norm1 = GroupNorm(groups, in_channels, eps, key=keys[0])
        self.conv1 = Conv3d(in_channels, out_channels, 3, key=keys[1])
        self.time_emb_proj = Linear(time_embed_dim, out_channels, key=keys[2])
        self.norm2 = GroupNorm(groups, out_channels, eps, key=keys[3])
        self.conv2 = Conv3d(out_channels, out_channels, 3, key=keys[4])
        self.skip_connection = (
            Conv3d(in_channels, out_channels, 1, key=keys[5]) if in_channels != out_channels else None
        )
        if resample not in (None, "up", "down"):
            raise ValueError(f"resample must be None, 'up' or 'down', got {resample!r}")
        self.resample = resample

    def __call__(self, x: Volume, emb: Float[Array, " time_embed_dim"]) -> Volume:
        h = jax.nn.silu(self.norm1(x))
        # conv1(h) + time_emb_proj(silu(emb)) per channel: the embedding is added to conv1's bias
        # (fused into the convolution, no pass over the volume of its own).
        bias = self.conv1.bias + self.time_emb_proj(jax.nn.silu(emb))
        if self.resample == "up":  # conv1(up(h)) in sub-pixel form: exact, 3.4× fewer multiplies
            x, h = upsample_nearest(x), upsample_conv(h, self.conv1, bias)
        else:
            if self.resample == "down":
                x, h = avg_pool2(x), avg_pool2(h)
            h = conv3d(h, self.conv1.weight, bias, stride=self.conv1.stride,
                       padding=(self.conv1.padding,) * 3, numerics=self.conv1.numerics)
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        return (x if self.skip_connection is None else self.skip_connection(x)) + h


class ConvDownsample(eqx.Module):
    """Stride-2 3×3×3 convolution (used when ``resblock_updown=False``)."""

    op: Conv3d

    def __init__(self, channels: int, *, key: PRNGKeyArray) -> None:
        self.op = Conv3d(channels, channels, 3, stride=2, key=key)

    def __call__(self, x: Volume, emb: Array) -> Volume:
        return self.op(x)


class ConvUpsample(eqx.Module):
    """Nearest ×2 then a 3×3×3 convolution (used when ``resblock_updown=False``)."""

    postconv: Conv3d

    def __init__(self, channels: int, *, key: PRNGKeyArray) -> None:
        self.postconv = Conv3d(channels, channels, 3, key=key)

    def __call__(self, x: Volume, emb: Array) -> Volume:
        return upsample_conv(x, self.postconv)


class Attention(eqx.Module):
    """Multi-head attention: queries from ``x`` ``(N, C)``, keys/values from ``context`` ``(S, Cc)``.

    ``to_q``/``to_k``/``to_v`` have no bias; ``out_proj`` has one; scores are scaled by
    ``head_dim ** -0.5``. With a single context token the softmax is exactly 1, so the
    output is ``out_proj(to_v(context))`` for every query (UPSTREAM.md §4): computed so.
    """

    to_q: Linear
    to_k: Linear
    to_v: Linear
    out_proj: Linear
    num_heads: int = eqx.field(static=True)

    def __init__(
        self, channels: int, context_dim: int, num_heads: int, head_dim: int, *, key: PRNGKeyArray
    ) -> None:
        keys = jax.random.split(key, 4)
        inner = num_heads * head_dim
        self.to_q = Linear(channels, inner, use_bias=False, key=keys[0])
        self.to_k = Linear(context_dim, inner, use_bias=False, key=keys[1])
        self.to_v = Linear(context_dim, inner, use_bias=False, key=keys[2])
        self.out_proj = Linear(inner, channels, key=keys[3])
        self.num_heads = num_heads

    def __call__(self, x: Tokens, context: Tokens) -> Tokens:
        values = self.to_v(context)
        if context.shape[0] == 1:
            return jnp.broadcast_to(self.out_proj(values), x.shape)
        heads = self.num_heads
        queries = self.to_q(x).reshape(x.shape[0], heads, -1)
        keys = self.to_k(context).reshape(context.shape[0], heads, -1)
        values = values.reshape(context.shape[0], heads, -1)
        scores = jnp.einsum("qhd,khd->hqk", queries, keys, precision=PRECISION)
        weights = jax.nn.softmax(scores * queries.shape[-1] ** -0.5, axis=-1)
        attended = jnp.einsum("hqk,khd->qhd", weights, values, precision=PRECISION)
        return self.out_proj(attended.reshape(x.shape[0], -1))


class FeedForward(eqx.Module):
    """GEGLU feed-forward: ``linear2(value * gelu(gate))``, ``(value, gate) = split(linear1(x))``."""

    linear1: Linear
    linear2: Linear

    def __init__(self, channels: int, *, key: PRNGKeyArray) -> None:
        keys = jax.random.split(key)
        self.linear1 = Linear(channels, 8 * channels, key=keys[0])
        self.linear2 = Linear(4 * channels, channels, key=keys[1])

    def __call__(self, x: Tokens) -> Tokens:
        value, gate = jnp.split(self.linear1(x), 2, axis=-1)
        return self.linear2(value * jax.nn.gelu(gate, approximate=False))


class TransformerBlock(eqx.Module):
    """Self-attention, cross-attention, GEGLU feed-forward; pre-LayerNorm (eps 1e-5), residual."""

    attn1: Attention
    attn2: Attention
    ff: FeedForward
    norm1: LayerNorm
    norm2: LayerNorm
    norm3: LayerNorm

    def __init__(
        self, channels: int, num_heads: int, head_dim: int, context_dim: int, *, key: PRNGKeyArray
    ) -> None:
        keys = jax.random.split(key, 6)
        self.attn1 = Attention(channels, channels, num_heads, head_dim, key=keys[0])
        self.attn2 = Attention(channels, context_dim, num_heads, head_dim, key=keys[1])
        self.ff = FeedForward(channels, key=keys[2])
        self.norm1 = LayerNorm(channels, key=keys[3])
        self.norm2 = LayerNorm(channels, key=keys[4])
        self.norm3 = LayerNorm(channels, key=keys[5])

    def __call__(self, tokens: Tokens, context: Tokens) -> Tokens:
        normed = self.norm1(tokens)
        tokens = tokens + self.attn1(normed, normed)
        tokens = tokens + self.attn2(self.norm2(tokens), context)
        return tokens + self.ff(self.norm3(tokens))


class SpatialTransformer(eqx.Module):
    """GroupNorm → 1×1×1 proj_in → transformer over voxels as tokens → 1×1×1 proj_out → + input."""

    norm: GroupNorm
    proj_in: Conv3d
    transformer_blocks: tuple[TransformerBlock, ...]
    proj_out: Conv3d

    def __init__(
        self, channels: int, head_channels: int, config: DiffusionModelUNetConfig, *, key: PRNGKeyArray
    ) -> None:
        keys = jax.random.split(key, 3 + config.transformer_num_layers)
        num_heads = channels // head_channels
        self.norm = GroupNorm(config.norm_num_groups, channels, config.norm_eps, key=keys[0])
        self.proj_in = Conv3d(channels, channels, 1, key=keys[1])
        self.transformer_blocks = tuple(
            TransformerBlock(channels, num_heads, head_channels, config.cross_attention_dim, key=k)
            for k in keys[3:]
        )
        self.proj_out = Conv3d(channels, channels, 1, key=keys[2])

    def __call__(self, x: Volume, context: Tokens) -> Volume:
        h = self.proj_in(self.norm(x))
        channels, spatial = h.shape[0], h.shape[1:]
        tokens = h.reshape(channels, -1).T
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        h = tokens.T.reshape(channels, *spatial)
        return self.proj_out(h) + x


class DownBlock(eqx.Module):
    """ResBlocks (each followed by a SpatialTransformer at attention levels), then a downsampler."""

    resnets: tuple[ResnetBlock, ...]
    attentions: tuple[SpatialTransformer, ...] | None
    downsampler: ResnetBlock | ConvDownsample | None

    def __call__(
        self, h: Volume, emb: Array, context: Tokens
    ) -> tuple[Volume, list[Volume]]:
        skips = []
        for index, resnet in enumerate(self.resnets):
            h = resnet(h, emb)
            if self.attentions is not None:
                h = self.attentions[index](h, context)
            skips.append(h)
        if self.downsampler is not None:
            h = self.downsampler(h, emb)
            skips.append(h)
        return h, skips


class UpBlock(eqx.Module):
    """ResBlocks on ``cat[h, skip]`` (each followed by a SpatialTransformer at attention levels),
    then an upsampler."""

    resnets: tuple[ResnetBlock, ...]
    attentions: tuple[SpatialTransformer, ...] | None
    upsampler: ResnetBlock | ConvUpsample | None

    def __call__(self, h: Volume, skips: list[Volume], emb: Array, context: Tokens) -> Volume:
        for index, resnet in enumerate(self.resnets):
            h = resnet(jnp.concatenate([h, skips.pop()], axis=0), emb)
            if self.attentions is not None:
                h = self.attentions[index](h, context)
        if self.upsampler is not None:
            h = self.upsampler(h, emb)
        return h


class MidBlock(eqx.Module):
    """ResBlock → SpatialTransformer → ResBlock at the lowest resolution."""

    resnet_1: ResnetBlock
    attention: SpatialTransformer
    resnet_2: ResnetBlock

    def __call__(self, h: Volume, emb: Array, context: Tokens) -> Volume:
        h = self.resnet_1(h, emb)
        h = self.attention(h, context)
        return self.resnet_2(h, emb)


class TimeEmbedding(eqx.Module):
    """``linear_2(silu(linear_1(sinusoidal(t))))`` (MONAI ``time_embed.0`` / ``time_embed.2``)."""

    linear_1: Linear
    linear_2: Linear

    def __init__(self, dim: int, embed_dim: int, *, key: PRNGKeyArray) -> None:
        keys = jax.random.split(key)
        self.linear_1 = Linear(dim, embed_dim, key=keys[0])
        self.linear_2 = Linear(embed_dim, embed_dim, key=keys[1])

    def __call__(self, timestep: Float[Array, ""]) -> Array:
        sinusoid = timestep_embedding(timestep, self.linear_1.weight.shape[1])
        return self.linear_2(jax.nn.silu(self.linear_1(sinusoid)))


class DiffusionModelUNet(eqx.Module):
    """Conditional 3-D diffusion U-Net predicting the noise ε of a latent.

    ``DiffusionModelUNet(key=key)`` builds the released Brain LDM's U-Net (553,168,899
    parameters) with random weights; pass a :class:`DiffusionModelUNetConfig` for others.
    Works on one example; ``jax.vmap`` for batches.
    """

    conv_in: Conv3d
    time_embed: TimeEmbedding
    down_blocks: tuple[DownBlock, ...]
    middle_block: MidBlock
    up_blocks: tuple[UpBlock, ...]
    out_norm: GroupNorm
    out_conv: Conv3d
    config: DiffusionModelUNetConfig = eqx.field(static=True)

    def __init__(
        self, config: DiffusionModelUNetConfig | None = None, *, key: PRNGKeyArray
    ) -> None:
        config = DiffusionModelUNetConfig() if config is None else config
        self.config = config
        keys = iter(jax.random.split(key, 256))
        channels = config.channels
        levels = len(channels)
        time_dim = channels[0] * 4

        def resnet(cin: int, cout: int, resample: str | None = None) -> ResnetBlock:
            return ResnetBlock(cin, cout, time_dim, config, resample=resample, key=next(keys))

        def transformers(level: int, count: int) -> tuple[SpatialTransformer, ...] | None:
            if not config.attention_levels[level]:
                return None
            head = config.num_head_channels[level]
            return tuple(
                SpatialTransformer(channels[level], head, config, key=next(keys)) for _ in range(count)
            )

        self.conv_in = Conv3d(config.in_channels, channels[0], 3, key=next(keys))
        self.time_embed = TimeEmbedding(channels[0], time_dim, key=next(keys))

        down_blocks = []
        block_out = channels[0]
        for level in range(levels):
            block_in, block_out = block_out, channels[level]
            n_blocks = config.num_res_blocks[level]
            resnets = tuple(resnet(block_in if i == 0 else block_out, block_out) for i in range(n_blocks))
            downsampler: ResnetBlock | ConvDownsample | None = None
            if level < levels - 1:
                downsampler = (
                    resnet(block_out, block_out, "down")
                    if config.resblock_updown
                    else ConvDownsample(block_out, key=next(keys))
                )
            down_blocks.append(DownBlock(resnets, transformers(level, n_blocks), downsampler))
        self.down_blocks = tuple(down_blocks)

        self.middle_block = MidBlock(
            resnet(channels[-1], channels[-1]),
            SpatialTransformer(channels[-1], config.num_head_channels[-1], config, key=next(keys)),
            resnet(channels[-1], channels[-1]),
        )

        up_blocks = []
        block_out = channels[-1]
        for up_index, level in enumerate(reversed(range(levels))):
            prev_out, block_out = block_out, channels[level]
            skip_in = channels[max(level - 1, 0)]
            n_blocks = config.num_res_blocks[level] + 1
            resnets = tuple(
                resnet(
                    (prev_out if i == 0 else block_out) + (skip_in if i == n_blocks - 1 else block_out),
                    block_out,
                )
                for i in range(n_blocks)
            )
            upsampler: ResnetBlock | ConvUpsample | None = None
            if up_index < levels - 1:
                upsampler = (
                    resnet(block_out, block_out, "up")
                    if config.resblock_updown
                    else ConvUpsample(block_out, key=next(keys))
                )
            up_blocks.append(UpBlock(resnets, transformers(level, n_blocks), upsampler))
        self.up_blocks = tuple(up_blocks)

        self.out_norm = GroupNorm(config.norm_num_groups, channels[0], config.norm_eps, key=next(keys))
        self.out_conv = Conv3d(channels[0], config.out_channels, 3, key=next(keys))

    def __call__(
        self,
        x: Float[Array, "in_channels d h w"],
        timestep: Float[Array, ""] | int,
        context: Float[Array, "tokens context_dim"],
    ) -> Float[Array, "out_channels d h w"]:
        """Predicted noise ε for ``x`` at diffusion step ``timestep`` given ``context``.

        Args:
            x: ``(in_channels, d, h, w)`` float32; d, h, w multiples of ``config.spatial_multiple``.
            timestep: scalar diffusion step (integer-valued, 0 ≤ t < 1000 upstream).
            context: ``(n_tokens, cross_attention_dim)``; upstream ``conditioning[None, :]``.

        Returns:
            ``(out_channels, d, h, w)`` float32.
        """
        multiple = self.config.spatial_multiple
        if any(size % multiple for size in x.shape[1:]):
            raise ValueError(
                f"DiffusionModelUNet: spatial size {tuple(x.shape[1:])} is not a multiple of "
                f"{multiple} on every axis"
            )
        if context.ndim != 2 or context.shape[1] != self.config.cross_attention_dim:
            raise ValueError(
                f"DiffusionModelUNet: context must be (n_tokens, {self.config.cross_attention_dim}), "
                f"got {tuple(context.shape)}"
            )
        emb = self.time_embed(timestep)
        h = self.conv_in(x)
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = block(h, emb, context)
            skips.extend(block_skips)
        h = self.middle_block(h, emb, context)
        for block in self.up_blocks:
            h = block(h, skips, emb, context)
        return self.out_conv(jax.nn.silu(self.out_norm(h)))


def pack_unet_kernels(
    unet: DiffusionModelUNet, latent_spatial: tuple[int, int, int], *, consume: bool = False
) -> DiffusionModelUNet:
    """``unet`` with its oneDNN convolution kernels packed once (:func:`~.layers.pack_kernels`)
    for latents of spatial size ``latent_spatial`` (other sizes still work); unchanged without
    oneDNN. ``consume``: free the plain kernels as they are packed (load time)."""
    config = unet.config
    x = jax.ShapeDtypeStruct((config.in_channels, *latent_spatial), jnp.float32)
    context = jax.ShapeDtypeStruct((1, config.cross_attention_dim), jnp.float32)
    return pack_kernels(unet, x, jax.ShapeDtypeStruct((), jnp.float32), context, consume=consume)
