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

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

log = logging.getLogger("brain_ldm_nodes")

#: Name of the FFI target (the handler ``BrainLdmOnednnConv3d`` in ``csrc/onednn_conv3d.cc``).
TARGET = "brain_ldm_onednn_conv3d"
#: Set to ``0`` / ``off`` to never load the extension (the pure-XLA path everywhere).
DISABLE_VARIABLE = "BRAIN_LDM_NODES_ONEDNN"


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
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.BrainLdmOnednnConv3d), platform="cpu")
    except (OSError, AttributeError, metadata.PackageNotFoundError) as error:
        log.warning("brain-ldm-nodes: the oneDNN extension failed to load (%s); convolutions run on XLA",
                    error)
        return None
    library.brain_ldm_onednn_max_threads.restype = ctypes.c_int
    library.brain_ldm_onednn_cached_plans.restype = ctypes.c_int64
    return library


def available() -> bool:
    """Whether oneDNN convolutions can be used (the extension loaded; CPU is JAX's default backend)."""
    return _library() is not None and jax.default_backend() == "cpu"


def threads() -> int:
    """OpenMP threads oneDNN uses (``OMP_NUM_THREADS``); 0 without the extension."""
    library = _library()
    return 0 if library is None else int(library.brain_ldm_onednn_max_threads())


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


def conv3d(
    x: Float[Array, "in d h w"],
    weight: Float[Array, "out in kd kh kw"],
    bias: Float[Array, " out"] | None,
    *,
    stride: int,
    padding: tuple[tuple[int, int], tuple[int, int], tuple[int, int]],
    blocked: bool = True,
) -> Float[Array, "out d2 h2 w2"]:
    """Cross-correlation of one ``(I, D, H, W)`` float32 volume with an ``(O, I, kD, kH, kW)``
    kernel plus ``bias``, by oneDNN (layouts as :func:`~brain_ldm_nodes.models.layers.conv3d`).

    ``blocked``: oneDNN's preferred blocked activation layout (nCdhw16c on AVX-512), reordered
    from and to the plain one inside the call; else channels-last (ndhwc). Works under
    :func:`jax.jit` and :func:`jax.vmap` (a batch of volumes is one oneDNN call; the kernel
    must not be batched). Requires :func:`available`.
    """
    if _library() is None:
        raise RuntimeError("the oneDNN extension is not available")
    channels_out = weight.shape[0]
    kernel = weight.shape[2:]
    out_shape = tuple((size + lo + hi - k) // stride + 1
                      for size, (lo, hi), k in zip(x.shape[1:], padding, kernel))
    if bias is None:
        bias = jnp.zeros((channels_out,), jnp.float32)
    call = jax.ffi.ffi_call(
        TARGET, jax.ShapeDtypeStruct((1, channels_out, *out_shape), jnp.float32), vmap_method="expand_dims")
    (d_lo, d_hi), (h_lo, h_hi), (w_lo, w_hi) = padding
    out = call(x[None].astype(jnp.float32), weight.astype(jnp.float32), bias.astype(jnp.float32),
               stride=int(stride), pad_d_lo=int(d_lo), pad_d_hi=int(d_hi), pad_h_lo=int(h_lo),
               pad_h_hi=int(h_hi), pad_w_lo=int(w_lo), pad_w_hi=int(w_hi), blocked=bool(blocked),
               channels_last=False)
    return out[0]
