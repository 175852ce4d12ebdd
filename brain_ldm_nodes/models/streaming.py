"""Exact slab-wise evaluation of the autoencoder decoder's full-resolution stage.

At 160×224×160 the decoder's last stage (Upsample → ResBlocks → GroupNorm → conv_out) works
on 64–128-channel volumes of 1.5–2.9 GB each; evaluated as written it needs ≈ 10 GB. Here it
runs slab by slab along the first spatial axis, keeping **one** full-resolution 64-channel
volume, as a list of slabs: GroupNorm statistics are accumulated over slabs (Chan's parallel
mean/variance merge) in a pass before they are applied, and halos are recomputed, so the
result equals the in-memory decoder up to float32 rounding.

Slabs are channels-last, ``(rows, H, W, C)``: the layout of the extension's Winograd and
upsampling kernels, so on CPU no convolution of this stage pays a transpose (they took ≈ 20 %
of a 64-channel convolution's time); elsewhere :func:`~.layers.conv3d_channels_last` transposes.

Each pass is a Python loop calling one small compiled function per slab (compiled once: every
slab has the same shape, its position is an argument). Straight-line compiled code runs XLA's
convolutions at full speed (inside ``lax.fori_loop`` bodies they run ≈ 30× slower), and a
pass's input slabs are released as soon as the next slab no longer needs them, so memory stays
at one full-resolution buffer + the 1/2-resolution input + a few slabs.
"""

from __future__ import annotations

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array

from .autoencoder import AutoencoderKL, ResBlock, Upsample
from . import onednn
from .layers import (PRECISION, Conv3d, GroupNorm, Numerics, conv3d, conv3d_channels_last, subpixel_weights,
                     upsample_in_extension)

HALO = 2  # rows of zero padding kept around the low-resolution input along the slab axis (axis 0)
Stats = tuple[Array, Array, Array]


class GroupStats:
    """Per-group (count, mean, M2) accumulated slab by slab; merged with Chan et al.'s formula."""

    @staticmethod
    def empty(groups: int) -> Stats:
        zeros = jnp.zeros((groups,), jnp.float32)
        return zeros, zeros, zeros

    @staticmethod
    def of(x: Array, groups: int) -> Stats:
        """Statistics of ``x`` ``(rows, H, W, C)``, per group of channels: per channel first
        (reductions over the leading axis, which XLA vectorises along the channels: ≈ 15× faster
        than reducing each group's strided elements), then the channels of a group merged with
        the same formula (equal counts)."""
        voxels, channels = x.size // x.shape[-1], x.shape[-1]
        flat = x.reshape(voxels, channels)
        mean_c = flat.mean(axis=0)
        m2_c = jnp.square(flat - mean_c).sum(axis=0)
        mean_gc = mean_c.reshape(groups, channels // groups)
        mean = mean_gc.mean(axis=1)
        m2 = m2_c.reshape(groups, -1).sum(axis=1) + voxels * jnp.square(mean_gc - mean[:, None]).sum(axis=1)
        return jnp.full((groups,), voxels * (channels // groups), jnp.float32), mean, m2

    @staticmethod
    def merge(a: Stats, b: Stats) -> Stats:
        count_a, mean_a, m2_a = a
        count_b, mean_b, m2_b = b
        count = count_a + count_b
        delta = mean_b - mean_a
        share_b = jnp.where(count > 0, count_b / jnp.maximum(count, 1), 0.0)
        mean = mean_a + delta * share_b
        m2 = m2_a + m2_b + jnp.square(delta) * count_a * share_b
        return count, mean, m2


def _normalise(x: Array, norm: GroupNorm, stats: Stats) -> Array:
    """``norm(x)`` of a channels-last ``x`` with precomputed whole-volume statistics, as one
    multiply-add per element (scale and shift per channel computed first: fused with a
    concatenation, XLA otherwise evaluates the statistics' arithmetic per element, 7× slower)."""
    count, mean, m2 = stats
    per_channel = x.shape[-1] // norm.groups
    scale = jnp.repeat(lax.rsqrt(m2 / count + norm.eps), per_channel) * norm.weight
    shift = norm.bias - jnp.repeat(mean, per_channel) * scale
    return x * scale + shift


def _conv_rows(conv: Conv3d, x: Array) -> Array:
    """``conv`` on channels-last rows that already include their halo along axis 0 (no padding
    there)."""
    half = conv.weight.shape[2] // 2
    return conv3d_channels_last(x, conv.weight, conv.bias, padding=((0, 0), (half, half), (half, half)),
                                numerics=conv.numerics)


def _upsample_rows(weight: Array, bias: Array, numerics: Numerics, low: Array, first_row: Array,
                   rows: int) -> Array:
    """Full-resolution rows ``[first_row, first_row + rows)`` of ``conv3x3x3(up2(low))`` (the
    :class:`Upsample` whose ``postconv`` has ``weight``, ``bias``), channels-last.

    ``low`` is the channels-last low-resolution input padded with ``HALO`` zero rows on each
    side of axis 0; ``first_row`` must be even (it may be negative: rows outside the volume are
    computed from the zero padding and masked by the caller).
    """
    low_rows = rows // 2
    # output rows 2i+a (i = first_row/2 …) read low rows i-1+a, i+a: padded index i-1+a+HALO
    window = lax.dynamic_slice_in_dim(low, first_row // 2 - 1 + HALO, low_rows + 2, axis=0)
    if upsample_in_extension(numerics, weight.shape[0]):  # the window holds the neighbouring rows: no padding there
        return onednn.upsample_conv3d(window, weight, bias, padding=((0, 0), (1, 1), (1, 1)), channels_last=True)
    window = jnp.moveaxis(window, -1, 0)
    per_parity = conv3d(window, subpixel_weights(weight), jnp.tile(bias, 8), padding=((0, 0), (1, 1), (1, 1)),
                        numerics=numerics)
    channels_out = weight.shape[0]
    height, width = low.shape[1], low.shape[2]
    per_parity = per_parity.reshape(2, 2, 2, channels_out, low_rows + 1, height + 1, width + 1)
    shifted = jnp.stack([
        per_parity[a, b, c, :, a:a + low_rows, b:b + height, c:c + width]
        for a in (0, 1) for b in (0, 1) for c in (0, 1)
    ]).reshape(2, 2, 2, channels_out, low_rows, height, width)
    # (out, rows/2, a, H, b, W, c) → channels-last (rows/2, a, H, b, W, c, out)
    return shifted.transpose(4, 0, 5, 1, 6, 2, 3).reshape(rows, 2 * height, 2 * width, channels_out)


def _postconv(upsample: Upsample) -> tuple[Array, Array, Numerics]:
    return upsample.postconv.weight, upsample.postconv.bias, upsample.postconv.numerics


def _skip_of_upsample(upsample: Upsample, block: ResBlock) -> tuple[Array, Array, Numerics]:
    """Kernel and bias of ``nin_shortcut ∘ postconv`` (a 1×1×1 convolution after a 3×3×3 one is
    one 3×3×3 convolution), so the ResBlock's skip branch ``nin(U)`` is computed from the
    low-resolution input with half the work of recomputing ``U`` (64 instead of 128 channels)."""
    weight, bias, numerics = _postconv(upsample)
    if block.nin_shortcut is None:
        return weight, bias, numerics
    nin = block.nin_shortcut.weight[:, :, 0, 0, 0]
    folded = jnp.einsum("oc,cikjl->oikjl", nin, weight, precision=PRECISION)
    return folded, jnp.dot(nin, bias, precision=PRECISION) + block.nin_shortcut.bias, numerics


def _inside(first_row: Array, rows: int, depth: int) -> Array:
    index = first_row + jnp.arange(rows)
    return (index >= 0) & (index < depth)


def _masked(x: Array, inside: Array) -> Array:
    return jnp.where(inside[:, None, None, None], x, 0.0)


def _split(vae: AutoencoderKL) -> tuple[int, Upsample, tuple[ResBlock, ...], GroupNorm, Conv3d]:
    blocks = vae.decoder.blocks
    last_up = max(i for i, block in enumerate(blocks) if isinstance(block, Upsample))
    upsample, resblocks, final_norm, conv_out = (
        blocks[last_up], blocks[last_up + 1:-2], blocks[-2], blocks[-1]
    )
    if not (resblocks and all(isinstance(b, ResBlock) for b in resblocks)
            and isinstance(final_norm, GroupNorm) and isinstance(conv_out, Conv3d)):
        raise ValueError("decode_streaming: unexpected decoder layout after the last Upsample")
    return last_up, upsample, tuple(resblocks), final_norm, conv_out


def decode_streaming_layout_ok(vae: AutoencoderKL) -> bool:
    """Whether :func:`decode_streaming` can evaluate this autoencoder's decoder."""
    try:
        _split(vae)
    except ValueError:
        return False
    return True


# -- the passes: one compiled call per slab; ``start`` (the slab's first output row) is traced --
@eqx.filter_jit
def _low_resolution(vae: AutoencoderKL, latent: Array, last_up: int) -> Array:
    """The decoder up to its last Upsample, channels-last, padded with ``HALO`` zero rows along
    axis 0."""
    low = vae.post_quant_conv(latent)
    for block in vae.decoder.blocks[:last_up]:
        low = block(low)
    return jnp.pad(jnp.moveaxis(low, 0, -1), ((HALO, HALO), (0, 0), (0, 0), (0, 0)))


@eqx.filter_jit
def _pass_upsample_stats(upsample: Upsample, low: Array, start: Array, slab: int, groups: int,
                         acc: Stats) -> Stats:
    return GroupStats.merge(acc, GroupStats.of(_upsample_rows(*_postconv(upsample), low, start, slab), groups))


@eqx.filter_jit
def _pass_first_conv1(upsample: Upsample, block: ResBlock, low: Array, stats_u: Stats, start: Array,
                      slab: int, depth: int, acc: Stats) -> tuple[Array, Stats]:
    """h = conv1(silu(norm1(U))) for one slab, U = upsample(low) recomputed with a 1-row halo."""
    u = _upsample_rows(*_postconv(upsample), low, start - 2, slab + 4)[1:-1]  # rows start-1 … start+slab
    a = _masked(jax.nn.silu(_normalise(u, block.norm1, stats_u)), _inside(start - 1, slab + 2, depth))
    h = _conv_rows(block.conv1, a)
    return h, GroupStats.merge(acc, GroupStats.of(h, block.norm2.groups))


def _activated_window(previous: Array, current: Array, following: Array, halo: int,
                      activation: Callable[[Array], Array], start: Array, depth: int) -> Array:
    """``activation`` of ``current`` with ``halo`` rows of its neighbours on each side (axis 0):
    rows ``start - halo … start + slab + halo - 1``, zero outside the volume (a neighbour given
    for a missing one is masked whole: slabs have ≥ 2 rows, so its rows are all outside).

    Assembled by in-place slice updates rather than a concatenation: XLA fuses a concatenation
    with the per-channel GroupNorm arithmetic into one loop that it does not vectorise (≈ 5×
    slower)."""
    slab = current.shape[0]
    corner = (0,) * (current.ndim - 1)
    window = jnp.zeros((slab + 2 * halo, *current.shape[1:]), current.dtype)
    window = lax.dynamic_update_slice(window, jnp.where(start > 0, activation(previous[-halo:]), 0.0), (0, *corner))
    window = lax.dynamic_update_slice(window, activation(current), (halo, *corner))
    after = jnp.where(start + slab < depth, activation(following[:halo]), 0.0)
    return lax.dynamic_update_slice(window, after, (halo + slab, *corner))


@eqx.filter_jit
def _pass_first_residual(upsample: Upsample, block: ResBlock, low: Array, stats_h: Stats,
                         previous: Array, current: Array, following: Array, start: Array,
                         depth: int, next_groups: int, acc: Stats) -> tuple[Array, Stats]:
    """skip(U) + conv2(silu(norm2(h))) for one slab (h with a 1-row halo)."""
    slab = current.shape[0]
    a = _activated_window(previous, current, following, 1, lambda h: jax.nn.silu(_normalise(h, block.norm2, stats_h)),
                          start, depth)  # rows start-1 … start+slab
    skip = _upsample_rows(*_skip_of_upsample(upsample, block), low, start, slab)
    out = skip + _conv_rows(block.conv2, a)
    return out, GroupStats.merge(acc, GroupStats.of(out, next_groups))


def _conv1_rows(block: ResBlock, stats_r: Stats, previous: Array, current: Array, following: Array, halo: int,
                start: Array, depth: int) -> Array:
    """conv1(silu(norm1(r))) for rows ``start - halo + 1 … start + slab + halo - 2`` of ``r``."""
    def activation(r: Array) -> Array:
        return jax.nn.silu(_normalise(r, block.norm1, stats_r))

    return _conv_rows(block.conv1, _activated_window(previous, current, following, halo, activation, start, depth))


@eqx.filter_jit
def _pass_conv1_stats(block: ResBlock, stats_r: Stats, previous: Array, current: Array,
                      following: Array, start: Array, depth: int, acc: Stats) -> Stats:
    h = _conv1_rows(block, stats_r, previous, current, following, 1, start, depth)
    return GroupStats.merge(acc, GroupStats.of(h, block.norm2.groups))


@eqx.filter_jit
def _pass_residual(block: ResBlock, stats_r: Stats, stats_h: Stats, previous: Array, current: Array,
                   following: Array, start: Array, depth: int, next_groups: int,
                   acc: Stats) -> tuple[Array, Stats]:
    """r + conv2(silu(norm2(conv1(…)))) for one slab (identity skip); conv1 recomputed."""
    slab = current.shape[0]
    h = _conv1_rows(block, stats_r, previous, current, following, 2, start, depth)  # rows start-1 … start+slab
    a = _masked(jax.nn.silu(_normalise(h, block.norm2, stats_h)), _inside(start - 1, slab + 2, depth))
    out = current + _conv_rows(block.conv2, a)
    return out, GroupStats.merge(acc, GroupStats.of(out, next_groups))


@eqx.filter_jit
def _pass_output(norm: GroupNorm, conv: Conv3d, stats: Stats, previous: Array, current: Array,
                 following: Array, start: Array, depth: int) -> Array:
    """conv_out(norm(r)) for one slab (no SiLU in between, as upstream)."""
    a = _activated_window(previous, current, following, 1, lambda r: _normalise(r, norm, stats), start, depth)
    return _conv_rows(conv, a)


def _neighbours(slabs: list[Array | None], index: int) -> tuple[Array, Array, Array]:
    """(previous, current, following) slabs; a missing neighbour is replaced by the current slab
    (any values do: rows outside the volume are masked to zero before they are used)."""
    current = slabs[index]
    previous = slabs[index - 1] if index > 0 else current
    following = slabs[index + 1] if index + 1 < len(slabs) else current
    return previous, current, following


def decode_streaming(vae: AutoencoderKL, latent: Array, *, slab: int = 16) -> Array:
    """``vae.decode(latent)`` evaluating the full-resolution stage in slabs of ``slab`` rows.

    Called eagerly it dispatches one compiled function per slab and pass (the fast path); it
    can also be traced (e.g. inside :func:`jax.jit`), where the loops unroll into one program.

    Args:
        vae: the autoencoder; its decoder must end Upsample → ResBlock(s) → GroupNorm → conv.
        latent: ``(latent_channels, d, h, w)``.
        slab: rows of the output's first axis per slab; must be even, ≥ 2, and divide it.

    Returns:
        ``(out_channels, D, H, W)``, equal to :meth:`AutoencoderKL.decode` up to rounding.
    """
    last_up, upsample, resblocks, final_norm, conv_out = _split(vae)
    depth = vae.config.downsampling_factor * latent.shape[1]
    if slab % 2 or slab < 2 or depth % slab:
        raise ValueError(f"slab {slab} must be even and divide the output depth {depth}")
    n_slabs = depth // slab
    starts = [jnp.asarray(s * slab, jnp.int32) for s in range(n_slabs)]
    low = _low_resolution(vae, latent, last_up)

    # -- first ResBlock: its input U = upsample(low) is never stored whole -------------------
    first = resblocks[0]
    stats_u = GroupStats.empty(first.norm1.groups)
    for start in starts:
        stats_u = _pass_upsample_stats(upsample, low, start, slab, first.norm1.groups, stats_u)
    h: list[Array | None] = []
    stats_h = GroupStats.empty(first.norm2.groups)
    for start in starts:
        h_slab, stats_h = _pass_first_conv1(upsample, first, low, stats_u, start, slab, depth, stats_h)
        h.append(h_slab)
    next_norm = resblocks[1].norm1 if len(resblocks) > 1 else final_norm
    r: list[Array | None] = []
    stats_r = GroupStats.empty(next_norm.groups)
    for index, start in enumerate(starts):
        out, stats_r = _pass_first_residual(upsample, first, low, stats_h, *_neighbours(h, index), start,
                                            depth, next_norm.groups, stats_r)
        r.append(out)
        if index > 0:
            h[index - 1] = None  # no later slab reads it: release it
    del h, low

    # -- further ResBlocks (identity skip): conv1's output is recomputed instead of stored ----
    for index, block in enumerate(resblocks[1:], start=1):
        norm_after = resblocks[index + 1].norm1 if index + 1 < len(resblocks) else final_norm
        stats_h = GroupStats.empty(block.norm2.groups)
        for i, start in enumerate(starts):
            stats_h = _pass_conv1_stats(block, stats_r, *_neighbours(r, i), start, depth, stats_h)
        new: list[Array | None] = []
        stats_next = GroupStats.empty(norm_after.groups)
        for i, start in enumerate(starts):
            out, stats_next = _pass_residual(block, stats_r, stats_h, *_neighbours(r, i), start, depth,
                                             norm_after.groups, stats_next)
            new.append(out)
            if i > 0:
                r[i - 1] = None
        r, stats_r = new, stats_next

    # -- GroupNorm → conv_out ------------------------------------------------------------------
    image = []
    for i, start in enumerate(starts):
        image.append(_pass_output(final_norm, conv_out, stats_r, *_neighbours(r, i), start, depth))
        if i > 0:
            r[i - 1] = None
    return jnp.moveaxis(jnp.concatenate(image, axis=0), -1, 0)
