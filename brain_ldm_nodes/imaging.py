"""NIfTI input/output and rigid conforming onto the Brain LDM image grid.

No JAX and no Nipype here: this module only needs numpy, nibabel and scipy (through
``nibabel.processing``).

Conventions: the model grid (160 x 224 x 160 voxels of 1 mm, LAS, centred affine) is
defined in :mod:`brain_ldm_nodes.grid`; its names are importable from here too.

* Images written by this module carry qform and sform code 2 ("aligned anatomy"): the
  coordinates are those of the conformed, centred frame, not of the scanner.
* Latents (C, d, h, w) are stored as 4-D NIfTI (d, h, w, C) with the 8 mm LAS affine of
  :func:`~brain_ldm_nodes.grid.latent_affine`, so they overlay the image in a NIfTI viewer.

All writes are atomic: a hidden temporary file in the target directory is written,
fsynced and then renamed over the target with :func:`os.replace`.
"""

from __future__ import annotations

import gzip
import json
import os
import secrets
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import nibabel as nib
import numpy as np
from nibabel.affines import apply_affine, from_matvec, obliquity, voxel_sizes
from nibabel.orientations import (
    aff2axcodes,
    axcodes2ornt,
    inv_ornt_aff,
    io_orientation,
    ornt_transform,
)

from .annex import not_retrieved, retrieve_hint
from .grid import (
    LATENT_DOWNSAMPLING,
    MODEL_GRID_SHAPE,
    MODEL_ORIENTATION,
    latent_affine,
    model_affine,
)

__all__ = [
    "MODEL_GRID_SHAPE",
    "MODEL_ORIENTATION",
    "LATENT_DOWNSAMPLING",
    "XFORM_CODE_ALIGNED",
    "model_affine",
    "latent_affine",
    "atomic_write",
    "save_t1w",
    "load_t1w",
    "write_json",
    "save_latent",
    "load_latent",
    "conform_t1w",
    "resample_to_grid",
    "scale_minmax",
    "volume_shape",
    "sidecar_path",
    "publish_image",
]

XFORM_CODE_ALIGNED: int = 2
"""NIfTI qform/sform code written by this module: 2 = aligned anatomy (centred model frame)."""

_NIFTI_SUFFIXES = (".nii.gz", ".nii")
_LATENT_INTENT_NAME = "brain_ldm_latent"  # NIfTI intent_name holds at most 16 bytes
_DESCRIP_MAX_BYTES = 80


# --------------------------------------------------------------------------- atomic writes


def atomic_write(path: str | os.PathLike[str], write_fn: Callable[[IO[bytes]], Any]) -> Path:
    """Write a file atomically: ``write_fn(binary_file)`` fills it, then it replaces ``path``.

    The data go to a hidden temporary file ``.{name}.tmp-{random}`` in the target's
    directory (created if missing), which is flushed, fsynced and renamed over ``path``
    with :func:`os.replace`. If ``write_fn`` (or anything else) raises, the temporary
    file is removed, an existing target is left untouched and the exception propagates.
    The new file gets the usual ``0o666 & ~umask`` permissions. Returns ``Path(path)``.
    """
    target = Path(path)
    if not target.name:
        raise ValueError(f"not a file path: {str(path)!r}")
    target.parent.mkdir(parents=True, exist_ok=True)

    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        temp = target.with_name(f".{target.name}.tmp-{secrets.token_hex(6)}")
        try:
            fd = os.open(temp, flags, 0o666)
            break
        except FileExistsError:  # pragma: no cover - 48 random bits collided
            continue

    try:
        with os.fdopen(fd, "wb") as handle:
            write_fn(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, target)
    except BaseException:
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass
        raise
    _fsync_directory(target.parent)
    return target


def _fsync_directory(directory: Path) -> None:
    """Make a rename durable (POSIX); silently skipped where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _json_default(obj: Any) -> Any:
    """Convert numpy scalars/arrays and paths for :func:`json.dumps`."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serialisable")


def write_json(obj: Any, path: str | os.PathLike[str]) -> Path:
    """Write ``obj`` as UTF-8 JSON (sorted keys, indent 2, trailing newline), atomically.

    numpy scalars and arrays are converted to Python numbers and lists; NaN and infinity
    are refused (``ValueError``) because they are not valid JSON. The object is
    serialised before anything touches the disk.
    """
    text = json.dumps(
        obj, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False, default=_json_default
    )
    payload = (text + "\n").encode("utf-8")
    return atomic_write(path, lambda handle: handle.write(payload))


# --------------------------------------------------------------------------- NIfTI writing


def _nifti_suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in _NIFTI_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return suffix
    raise ValueError(f"{path}: NIfTI file names must end in '.nii.gz' or '.nii'")


def _descrip_bytes(description: str) -> bytes:
    """ASCII, at most 80 bytes (the NIfTI-1 ``descrip`` field); longer text is truncated."""
    return description.encode("ascii", errors="replace")[:_DESCRIP_MAX_BYTES]


def _nifti_image(
    data: np.ndarray, affine: np.ndarray, description: str | None, time_unit: str = "unknown"
) -> nib.Nifti1Image:
    """float32 NIfTI-1 image with mm units and q/sform code :data:`XFORM_CODE_ALIGNED`."""
    image = nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine)
    header = image.header
    header.set_data_dtype(np.float32)
    header.set_xyzt_units(xyz="mm", t=time_unit)
    image.set_qform(affine, code=XFORM_CODE_ALIGNED)
    image.set_sform(affine, code=XFORM_CODE_ALIGNED)
    if description is not None:
        header["descrip"] = _descrip_bytes(description)
    return image


def _write_nifti(image: nib.Nifti1Image, path: Path) -> Path:
    """Atomic write; ``.nii.gz`` is gzip level 1 (as nibabel) with no timestamp."""
    if _nifti_suffix(path) == ".nii":
        return atomic_write(path, image.to_stream)

    def write_gzip(handle: IO[bytes]) -> None:
        # No file name and no time stamp in the gzip header: identical images give identical
        # files whatever their names (a copy under another name stays byte-identical), and
        # the BIDS validator's GZIP_HEADER_FILENAME warning does not apply.
        with gzip.GzipFile(
            filename="", mode="wb", compresslevel=1, fileobj=handle, mtime=0
        ) as stream:
            image.to_stream(stream)

    return atomic_write(path, write_gzip)


def _array_to_write(
    array: np.ndarray, path: str | os.PathLike[str], *, ndim: int, caller: str, expects: str,
    what: str,
) -> tuple[Path, np.ndarray]:
    """``(Path(path), array)`` once both can be written: a NIfTI file name, ``ndim`` axes
    (``expects`` says which, e.g. "a 3-D array (X, Y, Z)"), real and finite values; else a
    ``ValueError`` naming ``caller``, the file and what was wrong (the ``what``)."""
    target = Path(path)
    _nifti_suffix(target)
    data = np.asarray(array)
    if data.ndim != ndim:
        raise ValueError(f"{caller} expects {expects}; got shape {tuple(data.shape)} for {target}")
    if not np.issubdtype(data.dtype, np.number) or np.issubdtype(data.dtype, np.complexfloating):
        raise ValueError(f"{caller} expects real numbers; got dtype {data.dtype} for {target}")
    if not np.all(np.isfinite(data)):
        raise ValueError(f"refusing to write {target}: the {what} contains NaN or infinite values")
    return target, data


def save_t1w(
    array: np.ndarray,
    path: str | os.PathLike[str],
    *,
    affine: np.ndarray | None = None,
    description: str | None = None,
) -> Path:
    """Save a 3-D image as float32 NIfTI-1 (``.nii.gz`` or ``.nii``), atomically.

    ``array`` has shape (X, Y, Z) in the voxel order of ``affine`` (default
    :func:`model_affine` of the array's shape, i.e. 1 mm centred LAS). Units are mm;
    qform and sform are both set to ``affine`` with code 2 (aligned anatomy).
    ``description`` fills the header's ``descrip`` (ASCII, truncated to 80 bytes).
    Refuses non-3-D arrays and non-finite values (``ValueError``). Returns the path.
    """
    target, data = _array_to_write(
        array, path, ndim=3, caller="save_t1w", expects="a 3-D array (X, Y, Z)", what="image"
    )
    affine = model_affine(data.shape) if affine is None else _checked_affine(affine, target)
    return _write_nifti(_nifti_image(data, affine, description), target)


def _checked_affine(affine: np.ndarray, where: object) -> np.ndarray:
    matrix = np.asarray(affine, dtype=float)
    if matrix.shape != (4, 4) or not np.all(np.isfinite(matrix)):
        raise ValueError(f"{where}: affine must be a finite 4 x 4 matrix")
    if abs(np.linalg.det(matrix[:3, :3])) < 1e-12:
        raise ValueError(f"{where}: affine is singular")
    return matrix


def save_latent(latent: np.ndarray, path: str | os.PathLike[str]) -> Path:
    """Save a latent of shape (C, d, h, w) as a 4-D float32 NIfTI of shape (d, h, w, C).

    The spatial axes come first so NIfTI viewers show each channel as a volume; the
    affine is :func:`latent_affine` (8 mm LAS, centred like the image grid), the
    header's ``intent_name`` is ``brain_ldm_latent``. Atomic; returns the path.
    """
    target, data = _array_to_write(
        latent, path, ndim=4, caller="save_latent", expects="a latent of shape (C, d, h, w)",
        what="latent",
    )
    volume = np.moveaxis(data.astype(np.float32, copy=False), 0, -1)  # (d, h, w, C)
    image = _nifti_image(
        volume,
        latent_affine(volume.shape[:3]),
        f"Brain LDM latent, {data.shape[0]} channels on axis 3, 8 mm LAS",
    )
    image.header.set_intent("none", name=_LATENT_INTENT_NAME)
    return _write_nifti(image, target)


def load_latent(path: str | os.PathLike[str]) -> np.ndarray:
    """Load a latent written by :func:`save_latent`; returns float32 (C, d, h, w)."""
    source = Path(path)
    image = _load_nifti(source)
    data = np.asarray(image.dataobj, dtype=np.float32)
    if data.ndim != 4:
        raise ValueError(
            f"{source}: a latent NIfTI must be 4-D (d, h, w, C); got shape {tuple(data.shape)}"
        )
    if not np.all(np.isfinite(data)):
        raise ValueError(f"{source}: the latent contains NaN or infinite values")
    return np.ascontiguousarray(np.moveaxis(data, -1, 0))


# --------------------------------------------------------------------------- NIfTI reading


def _load_nifti(source: Path) -> nib.Nifti1Image | nib.Nifti2Image:
    if not source.exists():
        if not_retrieved(source):
            raise FileNotFoundError(retrieve_hint(source))
        raise FileNotFoundError(f"{source}: file not found")
    if source.is_dir():
        raise ValueError(f"{source}: is a directory, not a NIfTI file")
    try:
        image = nib.load(source)
    except Exception as exc:  # nibabel raises several types for unreadable files
        raise ValueError(f"{source}: not a readable NIfTI image ({exc})") from exc
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        raise ValueError(f"{source}: not a NIfTI image (nibabel read it as {type(image).__name__})")
    return image


def volume_shape(image: nib.spatialimages.SpatialImage, expected: str) -> tuple[int, int, int]:
    """The 3-D shape of ``image``, a 4-D one with a single volume counting as 3-D; else
    ``ValueError(f"{expected}; got shape ...")``."""
    shape = tuple(int(n) for n in image.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise ValueError(f"{expected}; got shape {tuple(image.shape)}")
    return shape  # type: ignore[return-value]


def load_t1w(path: str | os.PathLike[str]) -> nib.Nifti1Image | nib.Nifti2Image:
    """Load a 3-D T1-weighted NIfTI (-1 or -2) with its data read into memory.

    A 4-D image with a single volume, shape (X, Y, Z, 1), is squeezed to 3-D (same
    affine). Errors name the file: ``FileNotFoundError`` if missing; ``ValueError`` if it
    is not a NIfTI, not 3-D, has a singular/non-finite affine or non-finite voxels.
    Intensities are returned as stored after the header's scaling (no conversion).
    """
    source = Path(path)
    image = _load_nifti(source)
    shape = volume_shape(image, f"{source}: expected a 3-D image (or 4-D with one volume)")
    _checked_affine(image.affine, source)
    data = np.asanyarray(image.dataobj).reshape(shape)
    if not np.issubdtype(data.dtype, np.number) or np.issubdtype(data.dtype, np.complexfloating):
        raise ValueError(f"{source}: voxel type {data.dtype} is not a real number")
    if np.issubdtype(data.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(data)))
        if bad:
            raise ValueError(f"{source}: {bad} voxels are NaN or infinite")
    header = image.header.copy()
    header.set_data_shape(shape)
    return image.__class__(data, image.affine, header)


# --------------------------------------------------------------------------- conforming


def scale_minmax(array: np.ndarray) -> np.ndarray:
    """Min-max scale to [0, 1] as float32: ``(x - min) / (max - min)`` (upstream's scaling).

    Raises ``ValueError`` for an empty or constant array, or one with NaN/infinity.
    """
    data = np.asarray(array, dtype=np.float64)
    if data.size == 0:
        raise ValueError("cannot min-max scale an empty array")
    if not np.all(np.isfinite(data)):
        raise ValueError("cannot min-max scale an array containing NaN or infinite values")
    low, high = float(data.min()), float(data.max())
    if high <= low:
        raise ValueError(f"cannot min-max scale a constant image (every voxel is {low:g})")
    return np.clip((data - low) / (high - low), 0.0, 1.0).astype(np.float32)


def resample_to_grid(
    data: np.ndarray,
    affine: np.ndarray,
    shape: Sequence[int],
    grid_affine: np.ndarray,
    *,
    order: int = 1,
    cval: float | None = None,
) -> np.ndarray:
    """Voxels ``data`` (voxel -> world ``affine``) resampled onto the grid ``shape`` whose voxel
    -> world affine is ``grid_affine`` (both 4 x 4, mm, the same world): float32 ``shape``.

    Spline ``order`` (1 = linear, scipy's); grid points outside the input take ``cval``
    (default: the input's minimum, so padding scales to 0).
    """
    from nibabel.processing import resample_from_to  # imports scipy

    resampled = resample_from_to(
        nib.Nifti1Image(data, affine),
        (tuple(int(n) for n in shape), grid_affine),
        order=order,
        mode="constant",
        cval=float(data.min()) if cval is None else cval,
        out_class=nib.Nifti1Image,
    )
    return np.asarray(resampled.dataobj, dtype=np.float32)


def conform_t1w(
    img: nib.spatialimages.SpatialImage, *, shape: Sequence[int] = MODEL_GRID_SHAPE
) -> tuple[nib.Nifti1Image, dict[str, Any]]:
    """Rigidly conform a 3-D T1w image onto the model grid and min-max scale it to [0, 1].

    This is **rigid conforming, not registration to MNI**: the head keeps the position and
    rotation it has within the input's voxel grid. Upstream trained on images rigidly
    registered to MNI; register beforehand if that matters.

    Steps, following ``nibabel.processing.conform(img, shape, (1, 1, 1), order=1,
    orientation="LAS")``: the input axes are permuted/flipped to the closest LAS
    orientation, resampled to 1 mm with linear interpolation (``order=1``) and cropped /
    padded to ``shape`` (default 160 x 224 x 160) around the image centre; padding takes
    the input's minimum, so it scales to 0. Intensities are then min-max scaled to [0, 1]
    per image, as upstream (no percentile clipping).

    Differences from calling ``conform`` directly, by design:

    * ``conform`` returns the output grid in the input's world (scanner) coordinates,
      keeping any obliquity, and centres on the *integer* voxels ``(n - 1) // 2``, which
      shifts the data by up to half an input voxel plus half an output voxel. Here the
      input centre, voxel ``(n - 1) / 2``, maps exactly onto the grid centre
      ``(N - 1) / 2`` (we resample with ``nibabel.processing.resample_from_to``).
    * The returned image's affine is exactly :func:`model_affine` ``(shape)``: the grid
      centre is world (0, 0, 0) and obliquity is dropped (as ``conform``'s voxel data
      already do). The affine mapping output voxels to the *input's* world is kept in the
      record as ``source_space_affine``.

    Returns ``(image, record)``: a float32 NIfTI-1 of ``shape`` and a JSON-serialisable
    dict for sidecars (source shape, zooms, orientation, obliquity, centre, intensity
    range before scaling, ...).
    """
    out_shape = tuple(int(n) for n in shape)
    if len(out_shape) != 3 or min(out_shape) < 1:
        raise ValueError(f"shape must be three positive voxel counts, got {tuple(shape)}")
    in_shape = tuple(int(n) for n in img.shape)
    if len(in_shape) != 3:
        raise ValueError(
            f"conform_t1w expects a 3-D image; got shape {in_shape} (use load_t1w to squeeze "
            "a single-volume 4-D image)"
        )
    source_affine = _checked_affine(img.affine, "conform_t1w input")
    source_data = np.asarray(img.dataobj, dtype=np.float32)
    if not np.all(np.isfinite(source_data)):
        raise ValueError("conform_t1w: the input image contains NaN or infinite voxels")

    # Reorientation to LAS (voxel permutation/flips, as nibabel's conform / as_reoriented).
    to_las = ornt_transform(io_orientation(source_affine), axcodes2ornt(MODEL_ORIENTATION))
    las_affine = source_affine @ inv_ornt_aff(to_las, in_shape)  # LAS voxel -> source world
    las_shape = np.empty(3)
    for in_axis, (out_axis, _flip) in enumerate(to_las):
        las_shape[int(out_axis)] = in_shape[in_axis]
    las_zooms = voxel_sizes(las_affine)
    source_centre = (np.asarray(in_shape, dtype=float) - 1.0) / 2.0

    # Output voxel j -> LAS-ordered input voxel: centre onto centre, 1 mm steps.
    step = np.diag(1.0 / las_zooms)
    out_centre = (np.asarray(out_shape, dtype=float) - 1.0) / 2.0
    las_centre = (las_shape - 1.0) / 2.0
    out_to_las_voxel = from_matvec(step, las_centre - step @ out_centre)
    source_space_affine = las_affine @ out_to_las_voxel  # output voxel -> source world (mm)

    data = resample_to_grid(source_data, source_affine, out_shape, source_space_affine)
    try:
        scaled = scale_minmax(data)
    except ValueError as exc:
        raise ValueError(f"conform_t1w: after resampling onto {out_shape}: {exc}") from exc

    record: dict[str, Any] = {
        "method": (
            "rigid conform (reorient to LAS, linear resampling to 1 mm, centre crop/pad), "
            "not registration to MNI; then min-max scaling to [0, 1]"
        ),
        "source_shape": list(in_shape),
        "source_zooms_mm": [float(z) for z in voxel_sizes(source_affine)],
        "source_orientation": "".join(str(c) for c in aff2axcodes(source_affine)),
        "source_obliquity_deg": [float(a) for a in np.degrees(obliquity(source_affine))],
        "source_affine": source_affine.tolist(),
        "source_centre_world_mm": [float(v) for v in apply_affine(source_affine, source_centre)],
        "output_shape": list(out_shape),
        "output_voxel_size_mm": 1.0,
        "output_orientation": "".join(MODEL_ORIENTATION),
        "source_space_affine": source_space_affine.tolist(),
        "interpolation": "linear (spline order 1)",
        "padding_value": float(source_data.min()),
        "source_intensity_min": float(source_data.min()),
        "source_intensity_max": float(source_data.max()),
        "intensity_min": float(data.min()),
        "intensity_max": float(data.max()),
        "intensity_scaling": "min-max to [0, 1] after resampling",
    }
    image = _nifti_image(scaled, model_affine(out_shape), "Brain LDM conformed T1w, [0,1]")
    return image, record


# --------------------------------------------------------------------------- publishing


def sidecar_path(image: str | os.PathLike[str]) -> Path:
    """The JSON sidecar of a ``.nii.gz`` / ``.nii`` image."""
    path = Path(image)
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return path.with_name(name[: -len(suffix)] + ".json")
    raise ValueError(f"{path}: not a NIfTI file name (.nii.gz or .nii)")


def publish_image(
    in_file: str | os.PathLike[str],
    in_sidecar: str | os.PathLike[str],
    out_file: str | os.PathLike[str],
    metadata: Mapping[str, Any] | None = None,
) -> tuple[Path, Path]:
    """Copy an image and its sidecar (with ``metadata`` keys added) into place, atomically.

    Order matters for resuming: the old sidecar goes first, then the image is replaced,
    then the new sidecar is written; so a sidecar always describes the image beside it.
    A ``Preparation`` mapping in ``metadata`` is merged into the sidecar's own.
    Returns ``(image, sidecar)``.
    """
    target = Path(out_file)
    target_sidecar = sidecar_path(target)
    document = json.loads(Path(in_sidecar).read_text(encoding="utf-8"))
    metadata = dict(metadata or {})
    if isinstance(metadata.get("Preparation"), Mapping):  # added to the node's record
        metadata["Preparation"] = {**document.get("Preparation", {}), **metadata["Preparation"]}
    document.update(metadata)
    target_sidecar.unlink(missing_ok=True)
    with open(in_file, "rb") as source:
        atomic_write(target, lambda handle: shutil.copyfileobj(source, handle))
    write_json(document, target_sidecar)
    return target, target_sidecar

