"""Exact slab-wise evaluation of the autoencoder decoder's full-resolution stage.

At 160×224×160 the decoder's last stage (Upsample → ResBlocks → GroupNorm → conv_out) works
on 64–128-channel volumes of 1.5–2.9 GB each; evaluated as written it needs ≈ 10 GB. Here it
runs slab by slab along the first spatial axis, keeping **one** full-resolution 64-channel
buffer: GroupNorm statistics are accumulated over slabs (Chan's parallel mean/variance merge)
in a pass before they are applied, and halos are recomputed, so the result equals the
in-memory decoder up to float32 rounding. Memory ≈ one full-resolution buffer + a few slabs.

Each pass is a ``lax.fori_loop``; the buffer is updated in place (``dynamic_update_slice`` on a
loop carry), with the original rows a later slab still needs saved in the carry.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array

from .autoencoder import AutoencoderKL, ResBlock, Upsample
from .layers import PRECISION, Conv3d, GroupNorm, subpixel_weights

HALO = 2  # rows of zero padding kept around the buffer along the slab axis


class GroupStats:
    """Per-group (count, mean, M2) accumulated slab by slab; merged with Chan et al.'s formula."""

    @staticmethod
    def empty(groups: int) -> tuple[Array, Array, Array]:
        zeros = jnp.zeros((groups,), jnp.float32)
        return zeros, zeros, zeros

    @staticmethod
    def of(x: Array, groups: int, mask: Array) -> tuple[Array, Array, Array]:
        """Statistics of ``x`` ``(C, rows, H, W)`` over rows where ``mask`` ``(rows,)`` is true."""
        channels = x.shape[0]
        grouped = x.reshape(groups, channels // groups, *x.shape[1:])
        weights = mask.astype(x.dtype)[None, None, :, None, None]
        count = weights.sum() * (channels // groups) * x.shape[2] * x.shape[3]
        mean = (grouped * weights).sum(axis=(1, 2, 3, 4)) / count
        centred = (grouped - mean[:, None, None, None, None]) * weights
        return jnp.full((groups,), count), mean, jnp.square(centred).sum(axis=(1, 2, 3, 4))

    @staticmethod
    def merge(a: tuple[Array, Array, Array], b: tuple[Array, Array, Array]) -> tuple[Array, Array, Array]:
        count_a, mean_a, m2_a = a
        count_b, mean_b, m2_b = b
        count = count_a + count_b
        delta = mean_b - mean_a
        share_b = jnp.where(count > 0, count_b / jnp.maximum(count, 1), 0.0)
        mean = mean_a + delta * share_b
        m2 = m2_a + m2_b + jnp.square(delta) * count_a * share_b
        return count, mean, m2


def _normalise(x: Array, norm: GroupNorm, stats: tuple[Array, Array, Array]) -> Array:
    """``norm(x)`` with precomputed whole-volume statistics."""
    count, mean, m2 = stats
    channels = x.shape[0]
    per_channel = channels // norm.groups
    mean_c = jnp.repeat(mean, per_channel)[:, None, None, None]
    rstd_c = jnp.repeat(lax.rsqrt(m2 / count + norm.eps), per_channel)[:, None, None, None]
    return (x - mean_c) * rstd_c * norm.weight[:, None, None, None] + norm.bias[:, None, None, None]


def _conv_rows(conv: Conv3d, x: Array) -> Array:
    """``conv`` on rows that already include their halo along axis 1 (no padding there)."""
    half = conv.weight.shape[2] // 2
    out = lax.conv_general_dilated(
        x[None], conv.weight, window_strides=(1, 1, 1), padding=((0, 0), (half, half), (half, half)),
        dimension_numbers=("NCDHW", "OIDHW", "NCDHW"), precision=PRECISION,
    )[0]
    return out + conv.bias[:, None, None, None]


def _upsample_rows(upsample: Upsample, low: Array, first_row: Array, rows: int) -> Array:
    """Full-resolution rows ``[first_row, first_row + rows)`` of ``upsample(low)``.

    ``low`` is the low-resolution input padded with ``HALO`` zero rows on each side of axis 1;
    ``first_row`` must be even (it may be negative: rows outside the volume are computed from
    the zero padding and masked by the caller).
    """
    weight, bias = upsample.postconv.weight, upsample.postconv.bias
    low_rows = rows // 2
    # output rows 2i+a (i = first_row/2 …) read low rows i-1+a, i+a: padded index i-1+a+HALO
    window = lax.dynamic_slice_in_dim(low, first_row // 2 - 1 + HALO, low_rows + 2, axis=1)
    per_parity = lax.conv_general_dilated(
        window[None], subpixel_weights(weight), window_strides=(1, 1, 1),
        padding=((0, 0), (1, 1), (1, 1)), dimension_numbers=("NCDHW", "OIDHW", "NCDHW"),
        precision=PRECISION,
    )[0]
    channels_out = weight.shape[0]
    height, width = low.shape[2], low.shape[3]
    per_parity = per_parity.reshape(2, 2, 2, channels_out, low_rows + 1, height + 1, width + 1)
    shifted = jnp.stack([
        per_parity[a, b, c, :, a:a + low_rows, b:b + height, c:c + width]
        for a in (0, 1) for b in (0, 1) for c in (0, 1)
    ]).reshape(2, 2, 2, channels_out, low_rows, height, width)
    full = shifted.transpose(3, 4, 0, 5, 1, 6, 2).reshape(channels_out, rows, 2 * height, 2 * width)
    return full + bias[:, None, None, None]


def _inside(first_row: Array, rows: int, depth: int) -> Array:
    index = first_row + jnp.arange(rows)
    return (index >= 0) & (index < depth)


def _masked(x: Array, inside: Array) -> Array:
    return jnp.where(inside[None, :, None, None], x, 0.0)


def decode_streaming(vae: AutoencoderKL, latent: Array, *, slab: int = 8) -> Array:
    """``vae.decode(latent)`` evaluating the full-resolution stage in slabs of ``slab`` rows.

    Args:
        vae: the autoencoder; its decoder must end Upsample → ResBlock(s) → GroupNorm → conv.
        latent: ``(latent_channels, d, h, w)``.
        slab: rows of the output's first axis per slab; must be even and divide it.

    Returns:
        ``(out_channels, D, H, W)``, equal to :meth:`AutoencoderKL.decode` up to rounding.
    """
    blocks = vae.decoder.blocks
    last_up = max(i for i, block in enumerate(blocks) if isinstance(block, Upsample))
    upsample, resblocks, final_norm, conv_out = (
        blocks[last_up], blocks[last_up + 1:-2], blocks[-2], blocks[-1]
    )
    if not (resblocks and all(isinstance(b, ResBlock) for b in resblocks)
            and isinstance(final_norm, GroupNorm) and isinstance(conv_out, Conv3d)):
        raise ValueError("decode_streaming: unexpected decoder layout after the last Upsample")

    low = vae.post_quant_conv(latent)
    for block in blocks[:last_up]:
        low = block(low)
    depth = 2 * low.shape[1]
    if slab % 2 or depth % slab:
        raise ValueError(f"slab {slab} must be even and divide the output depth {depth}")
    n_slabs = depth // slab
    low = jnp.pad(low, ((0, 0), (HALO, HALO), (0, 0), (0, 0)))
    height, width = 2 * (low.shape[2]), 2 * (low.shape[3])

    def loop(body, init):
        # A while loop keeps one slab alive at a time (peak ≈ 3.7 GiB at 160×224×160; unrolled
        # into straight-line code XLA keeps many and peaks above 11 GiB). Known cost: XLA:CPU
        # runs convolutions inside while loops far slower than in straight-line code (≈ 30× in
        # a micro-benchmark), so this path is for memory-bound machines until that is solved.
        return lax.fori_loop(0, n_slabs, body, init)

    # -- first ResBlock: its input U = upsample(low) is never stored whole -----------------
    first = resblocks[0]
    stats_u = loop(
        lambda s, acc: GroupStats.merge(acc, GroupStats.of(
            _upsample_rows(upsample, low, s * slab, slab), first.norm1.groups,
            jnp.ones((slab,), bool))),
        GroupStats.empty(first.norm1.groups),
    )

    channels = first.conv1.weight.shape[0]
    buffer = jnp.zeros((channels, depth + 2 * HALO, height, width), jnp.float32)

    def first_conv1(s, carry):
        buffer, acc = carry
        start = s * slab
        u = _upsample_rows(upsample, low, start - 2, slab + 4)[:, 1:-1]  # rows start-1 … start+slab
        a = _masked(jax.nn.silu(_normalise(u, first.norm1, stats_u)), _inside(start - 1, slab + 2, depth))
        h = _conv_rows(first.conv1, a)
        acc = GroupStats.merge(acc, GroupStats.of(h, first.norm2.groups, jnp.ones((slab,), bool)))
        return lax.dynamic_update_slice_in_dim(buffer, h, start + HALO, axis=1), acc

    buffer, stats_h = loop(first_conv1, (buffer, GroupStats.empty(first.norm2.groups)))

    next_norm = resblocks[1].norm1 if len(resblocks) > 1 else final_norm

    def first_residual(s, carry):
        buffer, saved, acc = carry  # saved: original rows start-1 (overwritten by slab s-1)
        start = s * slab
        rows = lax.dynamic_slice_in_dim(buffer, start + HALO, slab + 1, axis=1)
        h = jnp.concatenate([saved, rows], axis=1)  # rows start-1 … start+slab
        a = _masked(jax.nn.silu(_normalise(h, first.norm2, stats_h)), _inside(start - 1, slab + 2, depth))
        u = _upsample_rows(upsample, low, start, slab)
        skip = u if first.nin_shortcut is None else _conv_rows(first.nin_shortcut, u)
        out = skip + _conv_rows(first.conv2, a)
        acc = GroupStats.merge(acc, GroupStats.of(out, next_norm.groups, jnp.ones((slab,), bool)))
        saved = rows[:, slab - 1:slab]
        return lax.dynamic_update_slice_in_dim(buffer, out, start + HALO, axis=1), saved, acc

    zero_row = jnp.zeros((channels, 1, height, width), jnp.float32)
    buffer, _, stats_r = loop(first_residual, (buffer, zero_row, GroupStats.empty(next_norm.groups)))

    # -- further ResBlocks (identity skip): B is recomputed instead of stored ------------------
    for index, block in enumerate(resblocks[1:], start=1):
        norm_after = resblocks[index + 1].norm1 if index + 1 < len(resblocks) else final_norm

        def conv1_rows(buffer_rows: Array, first_row: Array, rows: int, block=block, stats=stats_r) -> Array:
            """conv1(silu(norm1(R))) for ``rows`` rows from ``rows + 2`` buffer rows."""
            a = _masked(jax.nn.silu(_normalise(buffer_rows, block.norm1, stats)),
                        _inside(first_row - 1, rows + 2, depth))
            return _conv_rows(block.conv1, a)

        def stats_of_h(s, acc, block=block, conv1_rows=conv1_rows):
            start = s * slab
            rows = lax.dynamic_slice_in_dim(buffer, start + HALO - 1, slab + 2, axis=1)
            h = conv1_rows(rows, start, slab)
            return GroupStats.merge(acc, GroupStats.of(h, block.norm2.groups, jnp.ones((slab,), bool)))

        stats_h = loop(stats_of_h, GroupStats.empty(block.norm2.groups))

        def residual(s, carry, block=block, conv1_rows=conv1_rows, stats_h=stats_h, norm_after=norm_after):
            buffer, saved, acc = carry  # saved: original rows start-2, start-1
            start = s * slab
            rows = lax.dynamic_slice_in_dim(buffer, start + HALO, slab + 2, axis=1)
            r = jnp.concatenate([saved, rows], axis=1)  # rows start-2 … start+slab+1
            h = conv1_rows(r, start - 1, slab + 2)  # rows start-1 … start+slab
            a = _masked(jax.nn.silu(_normalise(h, block.norm2, stats_h)), _inside(start - 1, slab + 2, depth))
            out = rows[:, :slab] + _conv_rows(block.conv2, a)
            acc = GroupStats.merge(acc, GroupStats.of(out, norm_after.groups, jnp.ones((slab,), bool)))
            saved = rows[:, slab - 2:slab]
            return lax.dynamic_update_slice_in_dim(buffer, out, start + HALO, axis=1), saved, acc

        zero_rows = jnp.zeros((channels, 2, height, width), jnp.float32)
        buffer, _, stats_r = loop(residual, (buffer, zero_rows, GroupStats.empty(norm_after.groups)))

    # -- GroupNorm → conv_out (no SiLU, as upstream) -----------------------------------------
    output = jnp.zeros((conv_out.weight.shape[0], depth, height, width), jnp.float32)

    def final(s, output):
        start = s * slab
        rows = lax.dynamic_slice_in_dim(buffer, start + HALO - 1, slab + 2, axis=1)
        a = _masked(_normalise(rows, final_norm, stats_r), _inside(start - 1, slab + 2, depth))
        return lax.dynamic_update_slice_in_dim(output, _conv_rows(conv_out, a), start, axis=1)

    return loop(final, output)
