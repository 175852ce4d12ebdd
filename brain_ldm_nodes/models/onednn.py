"""oneDNN's 3-D convolution called from compiled JAX code on CPU (an XLA FFI custom call).

The extension ``brain_ldm_nodes._onednn_conv3d`` (one C++ file, ``csrc/onednn_conv3d.cc``, built
at install time against the ``onednn-cpu-gomp`` wheel) is loaded with :mod:`ctypes` and
registered with :func:`jax.ffi.register_ffi_target` for the ``"cpu"`` platform only, so GPUs
keep XLA's convolutions. Loading happens once, on first use; if the extension is absent or
fails to load, or ``BRAIN_LDM_NODES_ONEDNN=0``, :func:`available` is False, one line says
why (logger ``brain_ldm_nodes``), and :func:`~brain_ldm_nodes.models.layers.conv3d` stays on
the pure-XLA path.

Threads: oneDNN runs on GNU OpenMP with ``OMP_NUM_THREADS`` threads (default: the CPUs this
process may run on, as XLA's own pool), one convolution at a time (calls are serialised; the
XLA thread that issued one waits for it). To limit both, restrict the process's CPU affinity
(``taskset``, SLURM ``--cpus-per-task``); ``OMP_NUM_THREADS`` alone limits oneDNN only. With
PyTorch imported first (the tests), PyTorch's ``libgomp`` serves oneDNN too: one OpenMP
runtime per process. ``omp_get_max_threads()`` of the loaded library is :func:`threads`.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.machinery
import logging
import os
from importlib import metadata
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

log = logging.getLogger("brain_ldm_nodes")

#: Name of the FFI target (the handler ``BrainLdmOnednnConv3d`` in ``csrc/onednn_conv3d.cc``).
TARGET = "brain_ldm_onednn_conv3d"
#: Name of the FFI target of the Winograd F(2,3) convolution (``BrainLdmWinogradConv3d``).
WINOGRAD_TARGET = "brain_ldm_winograd_conv3d"
#: Name of the FFI target of the Winograd F(4,3) convolution (``BrainLdmWinograd4Conv3d``).
WINOGRAD4_TARGET = "brain_ldm_winograd4_conv3d"
#: Name of the FFI target of the nearest-×2-upsampling-then-3×3×3 convolution (``BrainLdmUpsampleConv3d``).
UPSAMPLE_TARGET = "brain_ldm_upsample_conv3d"
#: Set to ``0`` / ``off`` to never load the extension (the pure-XLA path everywhere).
DISABLE_VARIABLE = "BRAIN_LDM_NODES_ONEDNN"
#: ``brain_ldm_onednn_interface_version()`` of the handler this module speaks to; an extension
#: built from another version of ``csrc/onednn_conv3d.cc`` is not used.
INTERFACE_VERSION = 6


def _extension_path() -> Path | None:
    package = Path(__file__).resolve().parent.parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = package / f"_onednn_conv3d{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _preload_libdnnl() -> None:
    """Load ``libdnnl.so.3`` from the ``onednn-cpu-gomp`` wheel globally, so the extension's
    dependency resolves wherever the wheel put it (``<prefix>/lib``)."""
    for file in metadata.distribution("onednn-cpu-gomp").files or []:
        if file.name == "libdnnl.so.3":
            ctypes.CDLL(str(file.locate()), mode=ctypes.RTLD_GLOBAL)
            return
    raise OSError("the onednn-cpu-gomp wheel has no libdnnl.so.3")


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The loaded, registered extension, or None (with one logged line saying why)."""
    if os.environ.get(DISABLE_VARIABLE, "1").lower() in ("0", "off", "false", "no"):
        log.info("brain-ldm-nodes: %s=0: convolutions run on XLA", DISABLE_VARIABLE)
        return None
    path = _extension_path()
    if path is None:
        log.warning("brain-ldm-nodes: the oneDNN extension is not built; convolutions run on XLA "
                    "(slower on CPU; reinstall with a C++ compiler to build it)")
        return None
    try:
        _preload_libdnnl()
        library = ctypes.CDLL(str(path))
    except (OSError, metadata.PackageNotFoundError) as error:
        log.warning("brain-ldm-nodes: the oneDNN extension failed to load (%s); convolutions run on XLA",
                    error)
        return None
    stale = interface_mismatch(library)
    if stale is not None:
        log.warning("brain-ldm-nodes: the oneDNN extension %s was %s; convolutions run on XLA "
                    "(rebuild it: pip install -e .)", path.name, stale)
        return None
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.BrainLdmOnednnConv3d), platform="cpu")
    jax.ffi.register_ffi_target(WINOGRAD_TARGET, jax.ffi.pycapsule(library.BrainLdmWinogradConv3d), platform="cpu")
    jax.ffi.register_ffi_target(WINOGRAD4_TARGET, jax.ffi.pycapsule(library.BrainLdmWinograd4Conv3d), platform="cpu")
    jax.ffi.register_ffi_target(UPSAMPLE_TARGET, jax.ffi.pycapsule(library.BrainLdmUpsampleConv3d), platform="cpu")
    library.brain_ldm_onednn_max_threads.restype = ctypes.c_int
    library.brain_ldm_onednn_transform_isa.restype = ctypes.c_char_p
    library.brain_ldm_onednn_cached_plans.restype = ctypes.c_int64
    library.brain_ldm_onednn_packed_floats.restype = ctypes.c_int64
    library.brain_ldm_onednn_packed_floats.argtypes = [ctypes.c_void_p]
    library.brain_ldm_onednn_pack.restype = ctypes.c_int
    library.brain_ldm_onednn_pack.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    library.brain_ldm_onednn_describe.restype = ctypes.c_int
    library.brain_ldm_onednn_describe.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int64]
    return library


def interface_mismatch(library: Any) -> str | None:
    """Why ``library`` (a loaded extension) is not the one this module speaks to, or None."""
    version_of = getattr(library, "brain_ldm_onednn_interface_version", None)
    if version_of is None:
        return f"built from an older source (no interface version; {INTERFACE_VERSION} expected)"
    version_of.restype = ctypes.c_int
    version = int(version_of())
    if version != INTERFACE_VERSION:
        return f"built from another source (interface {version}; {INTERFACE_VERSION} expected)"
    return None


def available() -> bool:
    """Whether oneDNN convolutions can be used (the extension loaded; CPU is JAX's default backend)."""
    return _library() is not None and jax.default_backend() == "cpu"


def threads() -> int:
    """OpenMP threads oneDNN uses (``OMP_NUM_THREADS``); 0 without the extension."""
    library = _library()
    return 0 if library is None else int(library.brain_ldm_onednn_max_threads())


def transform_isa() -> str:
    """Instruction set the extension's Winograd and upsampling transforms run on: ``"avx512"``,
    ``"avx2"`` or ``"baseline"`` (SSE2), one compiled copy each, picked from the CPU oneDNN
    uses (so ``ONEDNN_MAX_CPU_ISA`` limits both); ``""`` without the extension."""
    library = _library()
    return "" if library is None else library.brain_ldm_onednn_transform_isa().decode()


def release_scratch() -> None:
    """Free oneDNN's scratch buffers (reordered activations and kernel; they grow back on the
    next call): between sampling and decoding, when memory is the limit."""
    library = _library()
    if library is not None:
        library.brain_ldm_onednn_release_scratch()


#: Phases of a oneDNN convolution call timed by :func:`phase_seconds`.
PHASES = ("kernel reorder", "input reorder", "convolution", "output reorder")


def phase_seconds(reset: bool = False) -> dict[str, float]:
    """Seconds the calls so far spent in each of :data:`PHASES` (profiling); ``reset``: zero them."""
    library = _library()
    if library is None:
        return {phase: 0.0 for phase in PHASES}
    seconds = (ctypes.c_double * len(PHASES))()
    library.brain_ldm_onednn_phase_seconds(seconds, int(reset))
    return dict(zip(PHASES, seconds))


def cached_plans() -> int:
    """Primitives built so far (one per distinct problem: shapes, stride, padding, layout)."""
    library = _library()
    return 0 if library is None else int(library.brain_ldm_onednn_cached_plans())


Padding = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


def _out_shape(spatial: tuple[int, ...], kernel: tuple[int, ...], stride: int, padding: Padding) -> tuple[int, ...]:
    return tuple((size + lo + hi - k) // stride + 1 for size, (lo, hi), k in zip(spatial, padding, kernel))


def _problem(channels_in: int, spatial: tuple[int, ...], kernel_shape: tuple[int, ...], stride: int,
             padding: Padding, blocked: bool) -> tuple[int, ...]:
    """The 16 integers naming a convolution problem in ``csrc/onednn_conv3d.cc`` (``problem_from``)."""
    channels_out, _, *kernel = kernel_shape
    return (channels_in, *spatial, channels_out, *kernel, stride, *(p for pair in padding for p in pair),
            int(blocked))


def describe(channels_in: int, spatial: tuple[int, int, int], kernel_shape: tuple[int, ...], *, stride: int,
             padding: Padding, blocked: bool) -> str:
    """``"<implementation> <input layout> <output layout>"`` oneDNN uses for the convolution of a
    ``(channels_in, *spatial)`` volume with an ``(O, I, kD, kH, kW)`` kernel, e.g.
    ``"jit:avx512_core nCdhw16c nCdhw16c"`` (benchmarks, tests)."""
    library = _library()
    if library is None:
        raise RuntimeError("the oneDNN extension is not available")
    code = np.asarray(_problem(channels_in, tuple(spatial), tuple(kernel_shape), stride, padding, blocked), np.int64)
    text = ctypes.create_string_buffer(256)
    if library.brain_ldm_onednn_describe(code.ctypes.data, text, len(text)):
        raise RuntimeError(f"oneDNN has no convolution for problem {tuple(code)}")
    return text.value.decode()


class PackedKernel(eqx.Module):
    """A convolution kernel stored in the blocked layout oneDNN's convolution reads (e.g.
    ``OIdhw16i16o``), packed once (:func:`pack`) instead of reordered on every call.

    ``data``: the packed floats (flat; its length includes the layout's channel padding).
    ``shape``: the plain kernel's ``(O, I, kD, kH, kW)``. ``problem``: the convolution it was
    packed for (:func:`_problem`: input channels and size, kernel, stride, padding, layout); a
    call on another problem that wants another layout reorders it (correct, slower).
    """

    data: Float[Array, " packed"]
    shape: tuple[int, ...] = eqx.field(static=True)
    problem: tuple[int, ...] = eqx.field(static=True)

    @property
    def dtype(self) -> jnp.dtype:
        return self.data.dtype


def pack(weight: Float[Array, "out in kd kh kw"], spatial: tuple[int, int, int], *, stride: int,
         padding: Padding, blocked: bool) -> PackedKernel:
    """``weight`` packed for the convolution of a ``(I, *spatial)`` input (eager, not traceable)."""
    library = _library()
    if library is None:
        raise RuntimeError("the oneDNN extension is not available")
    problem = _problem(weight.shape[1], tuple(spatial), tuple(weight.shape), stride, padding, blocked)
    code = np.asarray(problem, np.int64)
    floats = library.brain_ldm_onednn_packed_floats(code.ctypes.data)
    plain = np.ascontiguousarray(np.asarray(weight, np.float32))
    # 64-byte aligned, so that the JAX array below is this buffer, not a copy of it
    buffer = np.empty(max(floats, 0) + 16, np.float32)
    start = (-buffer.ctypes.data % 64) // 4
    packed = buffer[start:start + max(floats, 0)]
    if floats < 0 or library.brain_ldm_onednn_pack(code.ctypes.data, plain.ctypes.data, packed.ctypes.data, 0):
        raise RuntimeError(f"oneDNN could not pack a {weight.shape} kernel for problem {problem}")
    return PackedKernel(jax.device_put(packed, jax.devices("cpu")[0], may_alias=True),
                        tuple(int(n) for n in weight.shape), problem)


def return_freed_memory() -> None:
    """Give the C heap's free pages back to the system (glibc ``malloc_trim``; elsewhere a no-op).
    Packing a network frees one plain kernel per packed one, and glibc keeps such freed blocks
    for reuse: measured, 0.5 GiB of a full-size U-Net's stayed resident without this."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _unpack_numpy(packed: PackedKernel, data: np.ndarray) -> np.ndarray:
    library = _library()
    if library is None:
        raise RuntimeError("the oneDNN extension is not available")
    code = np.asarray(packed.problem, np.int64)
    source = np.ascontiguousarray(np.asarray(data, np.float32))
    plain = np.empty(packed.shape, np.float32)
    if library.brain_ldm_onednn_pack(code.ctypes.data, source.ctypes.data, plain.ctypes.data, 1):
        raise RuntimeError(f"oneDNN could not unpack a kernel packed for problem {packed.problem}")
    return plain


def unpack(packed: PackedKernel) -> Float[Array, "out in kd kh kw"]:
    """The plain ``(O, I, kD, kH, kW)`` kernel of ``packed`` (exact; also inside :func:`jax.jit`,
    through a host callback: for the XLA path and saving, not for speed)."""
    if isinstance(packed.data, jax.core.Tracer):
        return jax.pure_callback(functools.partial(_unpack_numpy, packed),
                                 jax.ShapeDtypeStruct(packed.shape, jnp.float32), packed.data)
    return jnp.asarray(_unpack_numpy(packed, packed.data))


def conv3d(
    x: Float[Array, "in d h w"],
    weight: Float[Array, "out in kd kh kw"] | PackedKernel,
    bias: Float[Array, " out"] | None,
    *,
    stride: int,
    padding: Padding,
    blocked: bool = True,
    channels_last: bool = False,
) -> Float[Array, "out d2 h2 w2"]:
    """Cross-correlation of one ``(I, D, H, W)`` float32 volume with an ``(O, I, kD, kH, kW)``
    kernel (plain, or a :class:`PackedKernel`) plus ``bias``, by oneDNN (layouts as
    :func:`~brain_ldm_nodes.models.layers.conv3d`).

    ``blocked``: oneDNN's preferred blocked activation layout (nCdhw16c on AVX-512), reordered
    from and to the given one inside the call; else oneDNN works on channels-last (ndhwc).
    ``channels_last``: ``x`` is ``(D, H, W, I)`` and the result ``(D', H', W', O)``. Works under
    :func:`jax.jit` and :func:`jax.vmap` (a batch of volumes is one oneDNN call; the kernel
    must not be batched). Requires :func:`available`.
    """
    if _library() is None:
        raise RuntimeError("the oneDNN extension is not available")
    channels_out = weight.shape[0]
    spatial = x.shape[:3] if channels_last else x.shape[1:]
    out_shape = _out_shape(spatial, weight.shape[2:], stride, padding)
    if bias is None:
        bias = jnp.zeros((channels_out,), jnp.float32)
    if isinstance(weight, PackedKernel):
        kernel, packed_for = weight.data, np.asarray(weight.problem, np.int64)
    else:
        kernel, packed_for = weight.astype(jnp.float32), np.zeros((0,), np.int64)
    result = (1, *out_shape, channels_out) if channels_last else (1, channels_out, *out_shape)
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(result, jnp.float32), vmap_method="expand_dims")
    (d_lo, d_hi), (h_lo, h_hi), (w_lo, w_hi) = padding
    out = call(x[None].astype(jnp.float32), kernel, bias.astype(jnp.float32),
               stride=int(stride), pad_d_lo=int(d_lo), pad_d_hi=int(d_hi), pad_h_lo=int(h_lo),
               pad_h_hi=int(h_hi), pad_w_lo=int(w_lo), pad_w_hi=int(w_hi), blocked=bool(blocked),
               channels_last=bool(channels_last), packed_for=packed_for)
    return out[0]


def _transformed_conv3d(target: str, x: Array, weight: Array, bias: Array | None, padding: Padding,
                        out_shape: tuple[int, ...], channels_last: bool) -> Array:
    """One of the extension's transformed 3×3×3 convolutions (``csrc/onednn_conv3d.cc``), which
    work on channels-last volumes: a channels-first ``x`` is relaid out for the call and the
    result back."""
    if _library() is None:
        raise RuntimeError("the oneDNN extension is not available")
    if tuple(weight.shape[2:]) != (3, 3, 3) or any(p not in (0, 1) for pair in padding for p in pair):
        raise ValueError(f"{target} needs a 3×3×3 kernel and padding 0 or 1, got {weight.shape}, {padding}")
    channels_out = weight.shape[0]
    if bias is None:
        bias = jnp.zeros((channels_out,), jnp.float32)
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((1, *out_shape, channels_out), jnp.float32),
                            vmap_method="expand_dims")
    (d_lo, d_hi), (h_lo, h_hi), (w_lo, w_hi) = padding
    x_last = x.astype(jnp.float32) if channels_last else jnp.transpose(x.astype(jnp.float32), (1, 2, 3, 0))
    out = call(x_last[None], weight.astype(jnp.float32), bias.astype(jnp.float32), pad_d_lo=int(d_lo),
               pad_d_hi=int(d_hi), pad_h_lo=int(h_lo), pad_h_hi=int(h_hi), pad_w_lo=int(w_lo), pad_w_hi=int(w_hi))
    return out[0] if channels_last else jnp.transpose(out[0], (3, 0, 1, 2))


def winograd_conv3d(
    x: Float[Array, "in d h w"],
    weight: Float[Array, "out in 3 3 3"],
    bias: Float[Array, " out"] | None,
    *,
    padding: Padding,
    channels_last: bool = False,
    tile: int = 2,
) -> Float[Array, "out d2 h2 w2"]:
    """3×3×3 convolution, stride 1, zero ``padding`` 0 or 1 per side, by Winograd in the
    extension: input and output transforms in C++ on channels-last tiles, the products summed
    over input channels as batched oneDNN matrix products. ``tile=2``: F(2×2×2, 3×3×3), 64
    products per 8 outputs (3.4× fewer multiplies than the direct convolution, rounding as
    small); ``tile=4``: F(4×4×4, 3×3×3), 216 per 64 (8×), its transforms amplifying float32
    rounding to ≈ 1e-6…4e-5 relative per convolution. Same arguments and layouts as
    :func:`conv3d` (a plain kernel only; ``channels_last``: ``(D, H, W, I) -> (D', H', W', O)``,
    the extension's own layout, no transposes); works under :func:`jax.jit` and :func:`jax.vmap`."""
    spatial = x.shape[:3] if channels_last else x.shape[1:]
    if tile not in (2, 4):
        raise ValueError(f"tile: 2 (F(2,3)) or 4 (F(4,3)), got {tile!r}")
    return _transformed_conv3d(WINOGRAD_TARGET if tile == 2 else WINOGRAD4_TARGET, x, weight, bias, padding,
                               _out_shape(spatial, (3, 3, 3), 1, padding), channels_last)


def upsample_conv3d(
    x: Float[Array, "in d h w"],
    weight: Float[Array, "out in 3 3 3"],
    bias: Float[Array, " out"] | None,
    *,
    padding: Padding = ((1, 1),) * 3,
    channels_last: bool = False,
) -> Float[Array, "out d2 h2 w2"]:
    """``conv3d(upsample_nearest(x), weight, bias)`` with zero padding 1 (of the upsampled
    volume), without forming the upsampled volume: along each axis outputs ``2i, 2i+1`` are
    ``w0 (x[i-1]-x[i]) + (w0+w1+w2) x[i]`` and ``(w0+w1+w2) x[i] + w2 (x[i+1]-x[i])``, so
    27 multiplies per 8 outputs (the sub-pixel form needs 64, the upsampled convolution 216).

    ``padding``: zero padding of ``x`` per side, 0 or 1 (1: the volume's edge; 0: a slab whose
    neighbouring rows are included in ``x``). → ``(O, 2 (d + lo + hi - 2), …)``. Same
    conventions as :func:`winograd_conv3d`, ``channels_last`` too."""
    spatial = x.shape[:3] if channels_last else x.shape[1:]
    out_shape = tuple(2 * (size + lo + hi - 2) for size, (lo, hi) in zip(spatial, padding))
    return _transformed_conv3d(UPSAMPLE_TARGET, x, weight, bias, padding, out_shape, channels_last)
