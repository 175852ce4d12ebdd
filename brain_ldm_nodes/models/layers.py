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

import contextvars
import copy
import dataclasses
import math
from typing import Any, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, PRNGKeyArray

from . import onednn

# float32 everywhere: accelerators would otherwise default to reduced-precision matmuls.
PRECISION = lax.Precision.HIGHEST

Volume = Float[Array, "channels depth height width"]
T = TypeVar("T")


def _uniform(key: PRNGKeyArray, shape: tuple[int, ...], fan_in: int) -> Array:
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


@dataclasses.dataclass(frozen=True)
class Numerics:
    """How convolutions and linear layers compute: static configuration of :class:`Conv3d` and
    :class:`Linear` (part of a network's tree structure, so compiled functions are keyed on it).

    ``implementation``: one of :data:`CONV_IMPLEMENTATIONS`. ``"auto"`` (default): on CPU with
    the extension loaded (:mod:`~brain_ldm_nodes.models.onednn`), oneDNN's direct convolution,
    or the extension's Winograd F(2,3) / F(4,3) where that was measured faster
    (:data:`WINOGRAD_MIN_CHANNELS`, :data:`WINOGRAD4_MAX_CHANNELS_OUT`);
    else the fastest XLA form per shape; ``"xla"``: one ``lax.conv_general_dilated`` (the
    reference); ``"onednn"``: oneDNN's direct convolution wherever it can, ``"planes"``,
    ``"matmul"``, ``"winograd"``: the XLA forms below.
    ``operand_dtype``: ``"float32"`` (default) or ``"bfloat16"`` (operands cast, products
    accumulated in float32; XLA only). Change it on a whole network with :func:`with_numerics`.
    """

    implementation: str = "auto"
    operand_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.implementation not in CONV_IMPLEMENTATIONS:
            raise ValueError(f"unknown convolution implementation {self.implementation!r}; "
                             f"one of {CONV_IMPLEMENTATIONS}")
        if self.operand_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"operand_dtype must be 'float32' or 'bfloat16', got {self.operand_dtype!r}")


#: Implementations of :func:`conv3d` (see :class:`Numerics`).
CONV_IMPLEMENTATIONS = ("auto", "xla", "onednn", "planes", "matmul", "winograd")
DEFAULT_NUMERICS = Numerics()


def with_numerics(tree: T, *, implementation: str | None = None, operand_dtype: str | None = None) -> T:
    """A copy of ``tree`` (a network or any pytree of modules) whose :class:`Conv3d` and
    :class:`Linear` layers compute with the given :class:`Numerics` fields changed (``None``:
    keep); arrays are shared, not copied. Works on traced trees too (inside :func:`jax.jit`)."""
    changes = {name: value for name, value in
               (("implementation", implementation), ("operand_dtype", operand_dtype)) if value is not None}

    def configure(node: Any) -> Any:
        if isinstance(node, (Conv3d, Linear)):
            numerics = dataclasses.replace(node.numerics, **changes)
            if numerics != node.numerics:
                node = copy.copy(node)
                object.__setattr__(node, "numerics", numerics)  # a static field of a frozen module
        return node

    is_layer = lambda node: isinstance(node, (Conv3d, Linear))  # noqa: E731
    return jax.tree_util.tree_map(configure, tree, is_leaf=is_layer)


class Conv3d(eqx.Module):
    """3-D convolution with bias, zero padding, on one ``(C, D, H, W)`` volume.

    ``padding`` is ``kernel_size // 2`` ("same" for stride 1) unless given as one
    ``(before, after)`` pair applied to every spatial axis.
    """

    weight: Float[Array, "out in kd kh kw"] | onednn.PackedKernel  # packed: see pack_kernels
    bias: Float[Array, " out"]
    stride: int = eqx.field(static=True)
    padding: tuple[int, int] = eqx.field(static=True)
    numerics: Numerics = eqx.field(static=True)

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        *,
        stride: int = 1,
        padding: tuple[int, int] | None = None,
        numerics: Numerics = DEFAULT_NUMERICS,
        key: PRNGKeyArray,
    ) -> None:
        weight_key, bias_key = jax.random.split(key)
        fan_in = in_channels * kernel_size**3
        self.weight = _uniform(weight_key, (out_channels, in_channels) + (kernel_size,) * 3, fan_in)
        self.bias = _uniform(bias_key, (out_channels,), fan_in)
        self.stride = stride
        half = kernel_size // 2
        self.padding = (half, half) if padding is None else tuple(padding)
        self.numerics = numerics

    def __call__(self, x: Volume) -> Volume:
        return conv3d(x, self.weight, self.bias, stride=self.stride, padding=(self.padding,) * 3,
                      numerics=self.numerics)


# -- how convolutions are evaluated ---------------------------------------------------------------
# On CPU, with the extension built, oneDNN's direct convolution (an XLA FFI custom call, bias
# fused: models/onednn.py) is the fastest on every 3×3×3 and 2×2×2 shape the networks use
# (bench/conv_layouts.py: ≈ 1.5–3× XLA's best form, on par with PyTorch, which calls the same
# library). Its activations are reordered inside the call into the CPU's native blocked layout
# (nCdhw16c on AVX-512, nCdhw8c on AVX2), at every size: measured on AVX-512 that is as fast as
# or faster than channels-last everywhere, 2× on the sub-pixel convolutions. 1×1×1
# convolutions stay matrix products in XLA.
# Without oneDNN (or off CPU): XLA:CPU's generic 3-D convolution reaches only ≈ 40–110 GFLOP/s
# here while its 2-D convolutions (channels-last) and matrix products reach ≈ 150–250 GFLOP/s.
# So a k×k×k convolution is written as k 2-D convolutions over the depth planes (batch = depth,
# NHWC/HWIO), summed; at the U-Net's smallest levels (≤ 10×14×10 voxels, kernels up to
# 1536×768×27) the cost is reading the kernel, and one matrix product against im2col columns,
# which reads the kernel in its stored layout, is fastest. Every implementation is exact
# algebra; they differ by float32 summation order.

#: ``"auto"`` on oneDNN computes a 3×3×3, stride-1 convolution by Winograd F(2×2×2, 3×3×3)
#: (:func:`~brain_ldm_nodes.models.onednn.winograd_conv3d`) when both channel counts are at least
#: this and the output has at least :data:`WINOGRAD_MIN_VOXELS` voxels. Measured on AVX-512
#: (2 cores), time ÷ oneDNN's direct convolution: 0.48–0.58 on the U-Net's 20×28×20 level
#: (256–768 channels), 0.71–0.73 at 10×14×10 (512–1280), 2.4 at 5×7×5 (products too small to pay
#: for transforming the kernel on every call: excluded by the voxel count); on the autoencoder's
#: full-resolution slabs 0.51 (128→128 at 1/2 resolution), 0.64 (128→64), 0.74 (64→64), with
#: the transposes of a channels-first volume (channels-last, as the streaming decoder calls
#: them: ≈ 0.55–0.6 on 64 channels).
WINOGRAD_MIN_CHANNELS = 64
WINOGRAD_MIN_VOXELS = 1024
#: Of those, the ones with at most this many output channels (the autoencoder's full-resolution
#: level) use Winograd F(4×4×4, 3×3×3): 216 products per 64 outputs instead of 512, time ÷ oneDNN
#: direct 0.42 (64→64) and 0.39 (128→64) instead of 0.71 and 0.59 for F(2,3) (channels-last,
#: AVX2, 2 cores). Its rounding error is larger (≈ 1e-6…4e-5 relative per convolution against
#: ≈ 6e-7), so it is not used above: on 128→128 it gained 5 %, and the U-Net's many layers and
#: 50 steps would compound it.
WINOGRAD4_MAX_CHANNELS_OUT = 64
#: The Winograd routes of :func:`_extension_route` and their ``onednn.winograd_conv3d`` tile sizes.
WINOGRAD_TILES = {"winograd": 2, "winograd4": 4}
#: Largest volume (voxels per example) evaluated as one im2col matrix product by ``"auto"`` on XLA.
MATMUL_MAX_VOXELS = 2048
#: ``"auto"`` also uses the matrix product for kernels with ≥ 1024 output channels (the sub-pixel
#: upsampling kernels: 2·O flops per column entry written, so the product dominates) while the
#: im2col columns take at most this many bytes.
MATMUL_MAX_COLUMNS_BYTES = 1 << 30


def _operands(numerics: Numerics, *arrays: Array) -> tuple[Array, ...]:
    if numerics.operand_dtype == "float32":
        return arrays
    return tuple(a.astype(numerics.operand_dtype) for a in arrays)


Padding = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


def conv3d(
    x: Volume,
    weight: Float[Array, "out in kd kh kw"],
    bias: Float[Array, " out"] | None = None,
    *,
    stride: int = 1,
    padding: Padding = ((1, 1),) * 3,
    numerics: Numerics = DEFAULT_NUMERICS,
) -> Volume:
    """Cross-correlation of one ``(I, D, H, W)`` volume with a ``(O, I, kD, kH, kW)`` kernel
    (PyTorch's ``conv3d``), zero ``padding`` ``(before, after)`` per spatial axis; → ``(O, D', H', W')``.

    Evaluated as ``numerics.implementation`` says (all exact up to float32 rounding).
    """
    kernel = weight.shape[2:]
    voxels = math.prod(x.shape[1:])
    name = numerics.implementation
    pointwise = kernel == (1, 1, 1) and stride == 1 and padding == ((0, 0),) * 3
    route = _extension_route(weight, x.shape[1:], stride, padding, numerics)
    if route in WINOGRAD_TILES:
        return onednn.winograd_conv3d(x, weight, bias, padding=padding, tile=WINOGRAD_TILES[route])
    if route == "direct":
        blocked = True
        recorder = _PACKING.get()
        if recorder is not None and not isinstance(weight, onednn.PackedKernel):
            recorder.setdefault(id(weight), (weight, tuple(x.shape[1:]), stride, padding, blocked))
        return onednn.conv3d(x, weight, bias, stride=stride, padding=padding, blocked=blocked)
    if name == "onednn":
        name = "auto"
    if isinstance(weight, onednn.PackedKernel):
        weight = onednn.unpack(weight)
    if name == "winograd" and not (kernel == (3, 3, 3) and stride == 1 and padding == ((1, 1),) * 3
                                   and numerics.operand_dtype == "float32"):
        name = "auto"
    x_in, weight_in = _operands(numerics, x, weight)
    if name == "auto":
        if pointwise:
            out = jnp.einsum("oi,idhw->odhw", weight_in[:, :, 0, 0, 0], x_in, precision=PRECISION,
                             preferred_element_type=jnp.float32)
            return out if bias is None else out + bias[:, None, None, None]
        columns_bytes = 4 * weight.shape[1] * math.prod(kernel) * voxels
        wide = weight.shape[0] >= 1024 and columns_bytes <= MATMUL_MAX_COLUMNS_BYTES
        name = "matmul" if voxels <= MATMUL_MAX_VOXELS or wide else "planes"
    if name == "winograd":
        return conv3x3x3_winograd(x, winograd_weights(weight), jnp.zeros(weight.shape[0], x.dtype)
                                  if bias is None else bias)
    out = {"xla": _conv_xla, "planes": _conv_planes, "matmul": _conv_matmul}[name](x_in, weight_in, stride, padding)
    return out if bias is None else out + bias[:, None, None, None]


def _extension_route(weight: Array | onednn.PackedKernel, spatial: tuple[int, ...], stride: int,
                     padding: Padding, numerics: Numerics) -> str | None:
    """How :func:`conv3d` evaluates a convolution in the oneDNN extension: ``"winograd"``
    (F(2,3)), ``"winograd4"`` (F(4,3)), ``"direct"``, or ``None`` (not there: XLA)."""
    pointwise = tuple(weight.shape[2:]) == (1, 1, 1) and stride == 1 and padding == ((0, 0),) * 3
    if (numerics.implementation not in ("auto", "onednn") or pointwise or numerics.operand_dtype != "float32"
            or not onednn.available()):
        return None
    # a kernel already packed for the direct convolution (another input size) stays on it
    if (numerics.implementation == "auto" and not isinstance(weight, onednn.PackedKernel)
            and _winograd_wins(weight, spatial, stride, padding)):
        return "winograd4" if weight.shape[0] <= WINOGRAD4_MAX_CHANNELS_OUT else "winograd"
    return "direct"


def conv3d_channels_last(
    x: Float[Array, "d h w in"],
    weight: Float[Array, "out in kd kh kw"],
    bias: Float[Array, " out"] | None = None,
    *,
    padding: Padding = ((1, 1),) * 3,
    numerics: Numerics = DEFAULT_NUMERICS,
) -> Float[Array, "d2 h2 w2 out"]:
    """:func:`conv3d` (stride 1) of a channels-last ``(D, H, W, I)`` volume → ``(D', H', W', O)``.

    In the extension the volume is passed as it is (its Winograd and upsampling kernels work
    channels-last; its direct convolution reorders inside the call), so a network kept
    channels-last pays no transposes around its convolutions; elsewhere :func:`conv3d` runs on
    the transposed volume."""
    route = _extension_route(weight, x.shape[:3], 1, padding, numerics)
    if route in WINOGRAD_TILES:
        return onednn.winograd_conv3d(x, weight, bias, padding=padding, channels_last=True,
                                      tile=WINOGRAD_TILES[route])
    if route == "direct":
        return onednn.conv3d(x, _plain(weight), bias, stride=1, padding=padding, channels_last=True)
    channels_first = conv3d(jnp.moveaxis(x, -1, 0), weight, bias, padding=padding, numerics=numerics)
    return jnp.moveaxis(channels_first, 0, -1)


def _winograd_wins(weight: Array, spatial: tuple[int, ...], stride: int, padding: Padding) -> bool:
    """Whether ``"auto"`` evaluates this convolution by Winograd on oneDNN (see
    :data:`WINOGRAD_MIN_CHANNELS`)."""
    out_voxels = math.prod(size + lo + hi - 2 for size, (lo, hi) in zip(spatial, padding))
    return (tuple(weight.shape[2:]) == (3, 3, 3) and stride == 1
            and all(p in (0, 1) for pair in padding for p in pair)
            and min(weight.shape[:2]) >= WINOGRAD_MIN_CHANNELS and out_voxels >= WINOGRAD_MIN_VOXELS)


# While pack_kernels traces a network: id(kernel) -> (kernel, input size, stride, padding, blocked)
# of every convolution that runs on oneDNN.
_PACKING: contextvars.ContextVar[dict | None] = contextvars.ContextVar("brain_ldm_packing", default=None)


def pack_kernels(network: T, *example_args: Any, consume: bool = False) -> T:
    """A copy of ``network`` whose convolutions that run on oneDNN hold their kernels packed in
    oneDNN's layout (:class:`~brain_ldm_nodes.models.onednn.PackedKernel`), so that no call
    reorders them again (the U-Net's 2.2 GB of kernels were reordered on every step).

    ``example_args``: arguments of one call (arrays or :class:`jax.ShapeDtypeStruct`), e.g. the
    U-Net's ``(x, timestep, context)``; the network is traced once (:func:`jax.eval_shape`, nothing
    runs) to find each convolution's input size. Packed kernels replace the plain ones: no extra
    memory. Results are unchanged (the same oneDNN kernels read the same packed values); other
    input sizes still work (reordered per call where their layout differs). Without oneDNN
    (or off CPU) ``network`` is returned as is. Undo with :func:`unpack_kernels` (e.g. to save).
    Kernels the extension transforms on every call instead (the Winograd convolutions, the
    upsampling convolutions) stay plain; a packed network computing in bfloat16 (XLA) unpacks
    its kernels on every call (slow).
    ``consume``: free each plain kernel once packed, so that packing a loaded network never
    holds two copies of its weights (``network`` itself is unusable afterwards).
    """
    if not onednn.available():
        return network
    recorded: dict[int, tuple] = {}
    token = _PACKING.set(recorded)
    try:
        jax.eval_shape(lambda *args: network(*args), *example_args)
    finally:
        _PACKING.reset(token)

    def pack(node: Any) -> Any:
        if isinstance(node, Conv3d) and id(node.weight) in recorded:
            weight, spatial, stride, padding, blocked = recorded[id(node.weight)]
            if weight is node.weight:
                node = copy.copy(node)
                object.__setattr__(node, "weight", onednn.pack(weight, spatial, stride=stride, padding=padding,
                                                               blocked=blocked))
                if consume:
                    weight.delete()
        return node

    packed = jax.tree_util.tree_map(pack, network, is_leaf=lambda node: isinstance(node, Conv3d))
    if consume:
        onednn.return_freed_memory()
    return packed


def unpack_kernels(network: T) -> T:
    """A copy of ``network`` with every packed kernel (:func:`pack_kernels`) plain again (exact)."""

    def unpack(node: Any) -> Any:
        if isinstance(node, Conv3d) and isinstance(node.weight, onednn.PackedKernel):
            node = copy.copy(node)
            object.__setattr__(node, "weight", onednn.unpack(node.weight))
        return node

    return jax.tree_util.tree_map(unpack, network, is_leaf=lambda node: isinstance(node, Conv3d))


def _conv_xla(x: Volume, weight: Array, stride: int, padding: Padding) -> Volume:
    return lax.conv_general_dilated(
        x[None], weight, window_strides=(stride,) * 3, padding=padding,
        dimension_numbers=("NCDHW", "OIDHW", "NCDHW"), precision=PRECISION,
        preferred_element_type=jnp.float32,
    )[0]


def _conv_planes(x: Volume, weight: Array, stride: int, padding: Padding) -> Volume:
    """Σ over kernel depth taps i of a 2-D convolution of the depth planes ``s·d + i``."""
    taps = weight.shape[2]
    planes = jnp.pad(jnp.transpose(x, (1, 2, 3, 0)), (padding[0], (0, 0), (0, 0), (0, 0)))  # (D, H, W, I)
    depth_out = (planes.shape[0] - taps) // stride + 1
    kernel = jnp.transpose(weight, (2, 3, 4, 1, 0))  # (kD, kH, kW, I, O)
    out = None
    for i in range(taps):
        rows = lax.slice_in_dim(planes, i, i + stride * (depth_out - 1) + 1, stride=stride, axis=0)
        term = lax.conv_general_dilated(
            rows, kernel[i], window_strides=(stride, stride), padding=padding[1:],
            dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=PRECISION,
            preferred_element_type=jnp.float32,
        )
        out = term if out is None else out + term
    return jnp.transpose(out, (3, 0, 1, 2))


def _conv_matmul(x: Volume, weight: Array, stride: int, padding: Padding) -> Volume:
    """One ``(O, I·k³) @ (I·k³, voxels)`` product against im2col columns (the kernel as stored)."""
    channels_out, channels_in = weight.shape[:2]
    kernel = weight.shape[2:]
    padded = jnp.pad(x, ((0, 0),) + tuple(padding))
    out_shape = tuple((padded.shape[a + 1] - kernel[a]) // stride + 1 for a in range(3))
    columns = jnp.stack([
        lax.slice(padded, (0, i, j, k),
                  (channels_in,) + tuple(o + stride * (n - 1) + 1 for o, n in zip((i, j, k), out_shape)),
                  (1, stride, stride, stride))
        for i in range(kernel[0]) for j in range(kernel[1]) for k in range(kernel[2])
    ], axis=1)  # (I, k³, D', H', W'): the kernel's (I, kD, kH, kW) order
    out = jnp.dot(weight.reshape(channels_out, -1), columns.reshape(channels_in * math.prod(kernel), -1),
                  precision=PRECISION, preferred_element_type=jnp.float32)
    return out.reshape((channels_out,) + out_shape)


class Linear(eqx.Module):
    """Affine map over the last axis: ``(..., in) -> (..., out)``; weight ``(out, in)``."""

    weight: Float[Array, "out in"]
    bias: Float[Array, " out"] | None
    numerics: Numerics = eqx.field(static=True)

    def __init__(
        self, in_features: int, out_features: int, *, use_bias: bool = True,
        numerics: Numerics = DEFAULT_NUMERICS, key: PRNGKeyArray
    ) -> None:
        weight_key, bias_key = jax.random.split(key)
        self.weight = _uniform(weight_key, (out_features, in_features), in_features)
        self.bias = _uniform(bias_key, (out_features,), in_features) if use_bias else None
        self.numerics = numerics

    def __call__(self, x: Float[Array, "... in"]) -> Float[Array, "... out"]:
        out = jnp.einsum("...i,oi->...o", *_operands(self.numerics, x, self.weight), precision=PRECISION,
                         preferred_element_type=jnp.float32)
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


def subpixel_weights(weight: Float[Array, "out in 3 3 3"]) -> Float[Array, "8*out in 2 2 2"]:
    """Fold a 3×3×3 kernel applied after nearest ×2 upsampling into eight 2×2×2 kernels.

    Along one axis, output ``2i + a`` of ``conv3(up2(x))`` reads ``up2`` at ``2i+a-1 … 2i+a+1``,
    i.e. ``x`` at ``(i-1, i)`` with taps ``(w₀, w₁+w₂)`` for ``a = 0`` and at ``(i, i+1)`` with
    taps ``(w₀+w₁, w₂)`` for ``a = 1``. The parity classes ``(a, b, c)`` are stacked on the
    output axis, parity-major: exact algebra with 8·8 instead of 27·8 multiplies per voxel.

    Written as sums of kernel slices (one pass over the kernel per axis), not as an einsum with
    0/1 matrices: that took ≈ 0.65 s of a 6.8 s full-size U-Net step in dot products and
    transposes of the 2.4× larger result (``bench/profile_unet.py``).
    """
    folded = weight  # (..., O, I, 3, 3, 3); each fold puts its parity axis first
    for axis in (-1, -2, -3):  # w, then h, then d: the parities end up ordered (a, b, c)
        w0, w1, w2 = (lax.index_in_dim(folded, k, axis, keepdims=True) for k in range(3))
        even = jnp.concatenate([w0, w1 + w2], axis=axis)  # parity 0: x at (i-1, i)
        odd = jnp.concatenate([w0 + w1, w2], axis=axis)  # parity 1: x at (i, i+1)
        folded = jnp.stack([even, odd])
    return folded.reshape((8 * weight.shape[0], weight.shape[1], 2, 2, 2))


#: Fewest output channels for which ``"auto"`` uses the 27-product upsampling (see :func:`upsample_in_extension`).
UPSAMPLE_MIN_CHANNELS_OUT = 64


def upsample_in_extension(numerics: Numerics, channels_out: int) -> bool:
    """Whether ``"auto"`` evaluates an upsample-then-3×3×3 convolution with ``channels_out``
    outputs by the extension's 27-product form (:func:`~brain_ldm_nodes.models.onednn.upsample_conv3d`)
    rather than the sub-pixel one: on CPU with the extension, float32, ≥ 64 outputs. Measured
    on AVX-512 (2 cores, ``bench/conv_layouts.py``), time ÷ the sub-pixel form on oneDNN: 0.56
    (U-Net 512 channels, 10×14×10), 0.44 (768, 5×7×5), 0.72–0.74 (autoencoder 128 → 128), 0.79
    (the streaming decoder's folded 128 → 64 skip)."""
    return (numerics.implementation == "auto" and numerics.operand_dtype == "float32"
            and channels_out >= UPSAMPLE_MIN_CHANNELS_OUT and onednn.available())


def _plain(weight: Array | onednn.PackedKernel) -> Array:
    return onednn.unpack(weight) if isinstance(weight, onednn.PackedKernel) else weight


def upsample_conv(x: Volume, conv: Conv3d, bias: Float[Array, " out"] | None = None) -> Volume:
    """``conv(upsample_nearest(x))`` for a 3×3×3 ``conv`` (zero padding 1) without materialising
    the upsampled input: in the extension's 27-product form where :func:`upsample_in_extension`,
    else one 2×2×2 convolution with 8× the output channels (bias fused), then depth-to-space.
    ``bias`` replaces ``conv.bias`` when given.

    ``(C, D, H, W) -> (out, 2D, 2H, 2W)``.
    """
    bias = conv.bias if bias is None else bias
    if upsample_in_extension(conv.numerics, conv.weight.shape[0]):
        return onednn.upsample_conv3d(x, _plain(conv.weight), bias)
    channels_out = conv.weight.shape[0]
    _, depth, height, width = x.shape
    # Window start i-1+a in x ⇔ index i+a of x padded by one voxel on each side.
    per_parity = conv3d(x, subpixel_weights(conv.weight), jnp.tile(bias, 8), padding=((1, 1),) * 3,
                        numerics=conv.numerics).reshape(2, 2, 2, channels_out, depth + 1, height + 1, width + 1)
    shifted = jnp.stack([
        per_parity[a, b, c, :, a:a + depth, b:b + height, c:c + width]
        for a in (0, 1) for b in (0, 1) for c in (0, 1)
    ]).reshape(2, 2, 2, channels_out, depth, height, width)
    interleaved = shifted.transpose(3, 4, 0, 5, 1, 6, 2)  # (out, D, a, H, b, W, c)
    return interleaved.reshape(channels_out, 2 * depth, 2 * height, 2 * width)


# Winograd F(2, 3) (Lavin & Gray 2016), applied separably along each of the three axes:
# output tile y = Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d B)] A for a 4-voxel input tile d and a 3-tap filter g.
_WINOGRAD_BT = ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1))
_WINOGRAD_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))
_WINOGRAD_AT = ((1, 1, 1, 0), (0, 1, -1, -1))


def winograd_weights(weight: Float[Array, "out in 3 3 3"]) -> Float[Array, "64 in out"]:
    """``G g Gᵀ`` along each axis: ``(O, I, 3, 3, 3) -> (4·4·4, I, O)``."""
    g = jnp.asarray(_WINOGRAD_G, weight.dtype)
    transformed = jnp.einsum("pk,ql,rm,oiklm->pqrio", g, g, g, weight, precision=PRECISION)
    return transformed.reshape(64, weight.shape[1], weight.shape[0])


def _input_transform(x: Array, axis: int, tiles: int) -> Array:
    """Bᵀ d along ``axis`` for every 4-voxel tile with stride 2: new leading axis of size 4."""
    taps = [lax.slice_in_dim(x, k, k + 2 * tiles - 1, stride=2, axis=axis) for k in range(4)]
    return jnp.stack([
        sum(coef * tap for coef, tap in zip(row, taps) if coef) for row in _WINOGRAD_BT
    ])


def _output_transform(m: Array, axis: int) -> Array:
    """Aᵀ m along ``axis`` (size 4) → the 2 outputs, interleaved after ``axis + 1``."""
    parts = [lax.index_in_dim(m, k, axis=axis, keepdims=False) for k in range(4)]
    outputs = [sum(coef * part for coef, part in zip(row, parts) if coef) for row in _WINOGRAD_AT]
    return jnp.stack(outputs, axis=axis)


def conv3x3x3_winograd(
    x: Volume, weight_winograd: Float[Array, "64 in out"], bias: Float[Array, " out"]
) -> Volume:
    """3×3×3 convolution, stride 1, zero padding 1, by Winograd F(2×2×2, 3×3×3).

    ``x``: ``(I, D, H, W)``; ``weight_winograd``: :func:`winograd_weights` of the kernel.
    64 multiplies per 8 outputs instead of 216 (3.4× fewer); float32 error ≈ 1e-7 relative.
    """
    channels_in, depth, height, width = x.shape
    tiles = [(size + 1) // 2 for size in (depth, height, width)]
    padded = jnp.pad(x, [(0, 0)] + [(1, 2 * t + 2 - size - 1) for t, size in zip(tiles, (depth, height, width))])
    v = padded
    for axis in (1, 2, 3):  # axis index grows by one after each transform (new leading axis)
        v = _input_transform(v, axis + (axis - 1), tiles[axis - 1])
    # v: (4, 4, 4, I, tD, tH, tW) with the transform axes in order (w, h, d)
    v = v.transpose(2, 1, 0, 3, 4, 5, 6).reshape(64, channels_in, -1)
    m = jnp.einsum("pit,pio->pot", v, weight_winograd, precision=PRECISION)
    channels_out = weight_winograd.shape[2]
    m = m.reshape(4, 4, 4, channels_out, *tiles)
    y = m
    for axis in (0, 1, 2):
        y = _output_transform(y, 0)  # consume the leading transform axis → (2, ...)
        y = jnp.moveaxis(y, 0, -1)  # park the 2 outputs at the end: (..., a) then (..., a, b)...
    # y: (O, tD, tH, tW, 2d, 2h, 2w)
    y = y.transpose(0, 1, 4, 2, 5, 3, 6).reshape(channels_out, 2 * tiles[0], 2 * tiles[1], 2 * tiles[2])
    return y[:, :depth, :height, :width] + bias[:, None, None, None]
