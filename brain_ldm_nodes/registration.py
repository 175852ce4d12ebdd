"""Real T1w images onto the model grid: rigid (6-dof) registration to an MNI152 template.

The upstream model was trained on T1w images rigidly registered to MNI space and cropped to
160 x 224 x 160 at 1 mm (``/work/shared/UPSTREAM.md`` section 2). :func:`register_t1w` does
the same for any T1w: it registers the image rigidly to the MNI152 template that nilearn ships
(no download), resamples it onto the model grid and scales its intensities to [0, 1].

Spaces and the one transform (all world coordinates are NIfTI RAS+ millimetres):

* **Template (MNI) world**: ICBM 2009a nonlinear symmetric MNI152, 1 mm, skull-stripped
  (nilearn's ``mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz``, TemplateFlow name
  ``MNI152NLin2009aSym``).
* **Model-grid world**: the coordinates of the returned image's affine,
  :func:`brain_ldm_nodes.imaging.model_affine` (grid centre at (0, 0, 0)). The model grid
  sits in MNI space with its centre at MNI :data:`GRID_CENTRE_MNI_MM` = (0, -17, 5) mm, the
  centre of the template brain's bounding box (x -72..72, y -107..73, z -72..82 mm), so that
  the 160 x 224 x 160 mm box covers the brain with a margin on every side (about 8, 22 and
  3 mm at each end of x, y and z); centring on the MNI origin instead would cut the vertex
  (z > 79.5) and leave only 4.5 mm behind the occipital pole. Model-grid world = MNI world
  minus this centre: a pure translation (:attr:`Registration.grid_to_template`).
* **Source world**: the input image's own world (its affine; scanner coordinates).

:attr:`Registration.transform` maps **template (MNI) world points to source world points**
(ITK's convention for a registration with the template as the fixed image: the transform that
resamples the source into template space). :func:`write_itk_transform` writes it, converted to
ITK's LPS coordinates, as an ITK ``AffineTransform_double_3_3`` text file: the file BIDS names
``..._from-T1w_to-MNI152NLin2009aSym_mode-image_xfm.txt``, read with the same meaning by
SimpleITK (tested) and, by the same ITK convention, ``antsApplyTransforms``.

Registration uses SimpleITK (ITK's v4 registration framework): Mattes mutual information
restricted to a dilated template brain mask (so skull, neck and face in the source do not
pull), a centred Euler (rigid) transform, regular-step gradient descent and three levels
(shrink 4/2/1 with Gaussian smoothing 2/1/0 mm). The start is taken from the head itself, not
from its centre of mass (which a neck or shoulders move): the top of the head and the centroid
of its upper 100 mm, tried with a few vertex-to-brain offsets, the best by the coarse metric.
The source header must describe the head roughly upright (within ~20 degrees), which scanner
headers do; the rest is found by the optimiser.

Quality: the normalised cross-correlation (NCC) between the registered image and the template
over the template's brain mask. A registration whose NCC stays below ``min_ncc`` (default
:data:`DEFAULT_MIN_NCC`) raises :class:`RegistrationError` instead of returning a misaligned
image.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
from nibabel.affines import apply_affine, from_matvec, voxel_sizes

from .imaging import MODEL_GRID_SHAPE, XFORM_CODE_ALIGNED, _checked_affine, model_affine

__all__ = [
    "DEFAULT_LEVELS",
    "DEFAULT_MIN_NCC",
    "GRID_CENTRE_MNI_MM",
    "TEMPLATE_NAME",
    "Registration",
    "RegistrationError",
    "load_template",
    "read_itk_transform",
    "register_t1w",
    "resample_to_model_grid",
    "resample_to_source",
    "write_itk_transform",
]

TEMPLATE_NAME = "MNI152NLin2009aSym"
"""TemplateFlow identifier of the template's space (ICBM 2009a nonlinear symmetric)."""

_TEMPLATE_FILE = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
_TEMPLATE_DESCRIPTION = (
    "ICBM 2009a nonlinear symmetric MNI152 T1 template, 1 mm, skull-stripped, rescaled to "
    "uint8 (as shipped in nilearn's package data; nilearn.datasets.load_mni152_template)"
)

GRID_CENTRE_MNI_MM: tuple[float, float, float] = (0.0, -17.0, 5.0)
"""MNI position (mm) of the model grid's centre: the centre of the template brain's bbox."""

DEFAULT_LEVELS: tuple[tuple[int, float], ...] = ((4, 2.0), (2, 1.0), (1, 0.0))
"""Registration pyramid: (shrink factor, Gaussian smoothing sigma in mm) per level."""

DEFAULT_MIN_NCC = 0.5
"""Registrations with a lower NCC to the template (inside its brain mask) are refused.

A gate against gross failures, not a fine accuracy check. Measured on the template and on the
template with a synthetic scalp, skull and neck: correctly registered, 0.98-1.0 (0.77 when the
input's field of view cuts part of the brain); misplaced by 5 mm 0.55, by 10 mm 0.34-0.43, by
20 mm 0.23-0.29; rotated by 10 degrees 0.57, by 15 degrees 0.42-0.48, 15 degrees + 20 mm
0.20-0.24. Real scans score lower than the template itself (individual anatomy, noise, bias
field), which is why the gate is not set higher; it is not yet calibrated on real scans."""

_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS <-> LPS (its own inverse)
_MASK_DILATION_MM = 8
_UPPER_SLAB_MM = 100.0
_VERTEX_OFFSETS_MM = (0.0, 8.0, 16.0)  # head top above brain top: none (skull-stripped) .. scalp


class RegistrationError(ValueError):
    """The T1w could not be aligned to the template (quality below the threshold).

    Callers skip the image with ``str(error)`` as the reason; ``ncc`` holds the figure.
    """

    def __init__(self, message: str, *, ncc: float | None = None) -> None:
        super().__init__(message)
        self.ncc = ncc


@dataclasses.dataclass(frozen=True)
class Registration:
    """A T1w on the model grid and how it got there (returned by :func:`register_t1w`).

    Attributes
    ----------
    image
        3-D float32 NIfTI-1 on the model grid: LAS, 1 mm, affine ``model_affine(shape)``,
        intensities scaled to [0, 1].
    transform
        Rigid 4 x 4 (float64, RAS+ mm) mapping template (MNI) world points to source world
        points: ``p_source = transform @ p_mni``. Identity for images already in MNI space.
    grid_to_template
        4 x 4 translation mapping model-grid world points (``image.affine``) to MNI points:
        ``p_mni = grid_to_template @ p_grid``.
    ncc
        Normalised cross-correlation with the template over its brain mask (1 = identical up
        to a linear intensity change).
    metric
        Final Mattes mutual information (SimpleITK's value: negative, lower is better), or
        ``None`` when nothing was registered.
    record
        JSON-serialisable description for sidecars (method, library, template, levels,
        intensity scaling, quality, source geometry, timing).
    """

    image: nib.Nifti1Image
    transform: np.ndarray
    grid_to_template: np.ndarray
    ncc: float
    metric: float | None
    record: dict[str, Any]

    @property
    def grid_to_source(self) -> np.ndarray:
        """4 x 4 mapping model-grid world points to source world points."""
        return self.transform @ self.grid_to_template


# --------------------------------------------------------------------------- template


def _template_path() -> Path:
    """nilearn's bundled template, found without importing nilearn (slow, pulls scikit-learn)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "the MNI152 template comes from the nilearn package, which is not installed "
            "(pip install nilearn)"
        )
    path = Path(spec.origin).parent / "datasets" / "data" / _TEMPLATE_FILE
    if not path.is_file():
        raise RuntimeError(f"nilearn is installed but lacks its MNI152 template file {path}")
    return path


@functools.lru_cache(maxsize=1)
def load_template() -> tuple[nib.Nifti1Image, dict[str, Any]]:
    """The MNI152 template (float32 in [0, 1], RAS 1 mm) and its record (name, file, sha256).

    The template is skull-stripped: voxels outside the brain are 0.
    """
    path = _template_path()
    raw = nib.load(path)
    data = np.asarray(raw.dataobj, dtype=np.float32)
    data /= data.max()
    image = nib.Nifti1Image(data, raw.affine)
    import nilearn  # only for the version; cached after the first call

    record = {
        "name": TEMPLATE_NAME,
        "description": _TEMPLATE_DESCRIPTION,
        "skull_stripped": True,
        "file": f"nilearn/datasets/data/{_TEMPLATE_FILE}",
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "package": f"nilearn {nilearn.__version__}",
        "grid_centre_mni_mm": list(GRID_CENTRE_MNI_MM),
    }
    return image, record


@functools.lru_cache(maxsize=4)
def _template_on_grid(shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Template intensities and brain mask resampled onto the model grid ``shape``."""
    from nibabel.processing import resample_from_to

    template, _ = load_template()
    grid = _grid_to_template() @ model_affine(shape)
    values = resample_from_to(template, (shape, grid), order=1, mode="constant", cval=0.0)
    data = np.asarray(values.dataobj, dtype=np.float32)
    return data, data > 0.05


def _grid_to_template() -> np.ndarray:
    return from_matvec(np.eye(3), np.asarray(GRID_CENTRE_MNI_MM, dtype=float))


# --------------------------------------------------------------------------- SimpleITK bridge


def _to_sitk(data: np.ndarray, affine: np.ndarray):
    """A SimpleITK image (LPS physical space) of a voxel array with a RAS+ affine.

    ITK needs orthonormal direction cosines: a sheared affine is replaced by its nearest
    rotation (polar decomposition) for the registration only.
    """
    import SimpleITK as sitk

    zooms = voxel_sizes(affine)
    directions = _LPS[:3, :3] @ affine[:3, :3] / zooms
    u, _, vt = np.linalg.svd(directions)
    image = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0), np.float32))
    image.SetSpacing([float(z) for z in zooms])
    image.SetDirection([float(v) for v in (u @ vt).ravel()])
    image.SetOrigin([float(v) for v in (_LPS[:3, :3] @ affine[:3, 3])])
    return image


def _sitk_transform_matrix(transform) -> np.ndarray:
    """4 x 4 (LPS) of a SimpleITK matrix-offset transform: ``p_moving = M @ p_fixed``."""
    matrix = np.asarray(transform.GetMatrix(), dtype=float).reshape(3, 3)
    centre = np.asarray(transform.GetCenter(), dtype=float)
    translation = np.asarray(transform.GetTranslation(), dtype=float)
    return from_matvec(matrix, translation + centre - matrix @ centre)


# --------------------------------------------------------------------------- initialisation


def _otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of a 1-D sample (maximises the between-class variance)."""
    counts, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    weight_low = np.cumsum(counts)
    weight_high = weight_low[-1] - weight_low
    sum_low = np.cumsum(counts * centres)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_low = sum_low / weight_low
        mean_high = (sum_low[-1] - sum_low) / weight_high
        between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return float(centres[int(np.nanargmax(between))])


def _head_landmarks(data: np.ndarray, affine: np.ndarray) -> tuple[float, np.ndarray]:
    """World height (mm) of the top of the head and the (x, y) centroid of its upper part.

    The head is the Otsu foreground; the top is its 99.9th percentile in world z (robust to
    stray voxels); the centroid is over foreground voxels within 100 mm of the top, so a neck,
    shoulders or a long field of view below the head do not move it.
    """
    step = max(1, int(round(2.0 / float(np.min(voxel_sizes(affine))))))  # ~2 mm sampling
    sub = data[::step, ::step, ::step]
    sub_affine = affine @ np.diag([step, step, step, 1.0])
    positive = sub[sub > 0]
    threshold = _otsu_threshold(positive if positive.size else sub.ravel())
    voxels = np.argwhere(sub > threshold)
    if len(voxels) < 10:
        voxels = np.argwhere(sub > sub.min())
    points = apply_affine(sub_affine, voxels)
    top = float(np.percentile(points[:, 2], 99.9))
    upper = points[points[:, 2] > top - _UPPER_SLAB_MM]
    return top, upper[:, :2].mean(axis=0)


# --------------------------------------------------------------------------- resampling


def _scale(data: np.ndarray, intensity: str, percentiles: tuple[float, float]) -> tuple[
    np.ndarray, dict[str, Any]
]:
    """Scale to [0, 1]: min-max (upstream) or between two percentiles, clipped."""
    values = data.astype(np.float64)
    if intensity == "minmax":
        low, high = float(values.min()), float(values.max())
        how = "min-max to [0, 1] after resampling (as upstream)"
    elif intensity == "percentile":
        low, high = (float(v) for v in np.percentile(values, percentiles))
        how = (
            f"linear from the {percentiles[0]:g}th..{percentiles[1]:g}th percentiles of the "
            "resampled grid to [0, 1], clipped"
        )
    else:
        raise ValueError(f"intensity must be 'minmax' or 'percentile', got {intensity!r}")
    if not high > low:
        raise ValueError(f"cannot scale a constant image (every voxel is {low:g} on the grid)")
    scaled = np.clip((values - low) / (high - low), 0.0, 1.0).astype(np.float32)
    record = {"intensity_scaling": how, "intensity_low": low, "intensity_high": high}
    if intensity == "percentile":
        record["intensity_percentiles"] = list(percentiles)
    return scaled, record


def _grid_image(data: np.ndarray, shape: tuple[int, int, int]) -> nib.Nifti1Image:
    affine = model_affine(shape)
    image = nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine)
    image.header.set_xyzt_units(xyz="mm")
    image.set_qform(affine, code=XFORM_CODE_ALIGNED)
    image.set_sform(affine, code=XFORM_CODE_ALIGNED)
    image.header["descrip"] = b"Brain LDM T1w registered to MNI152, [0,1]"
    return image


def _ncc(data: np.ndarray, shape: tuple[int, int, int]) -> float:
    template, mask = _template_on_grid(shape)
    a = data[mask].astype(np.float64)
    b = template[mask].astype(np.float64)
    a -= a.mean()
    b -= b.mean()
    denominator = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denominator) if denominator > 0 else 0.0


def _checked_input(image: nib.spatialimages.SpatialImage) -> tuple[np.ndarray, np.ndarray]:
    """Voxels (float32, 3-D) and affine of an input image, or a one-line ``ValueError``."""
    shape = tuple(int(n) for n in image.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise ValueError(
            f"register_t1w expects a 3-D T1w image (or 4-D with one volume); got shape "
            f"{tuple(image.shape)}"
        )
    if min(shape) < 2:
        raise ValueError(f"register_t1w expects a 3-D volume, got a single slice {shape}")
    affine = _checked_affine(image.affine, "register_t1w input")
    data = np.asarray(image.dataobj, dtype=np.float32).reshape(shape)
    if not np.all(np.isfinite(data)):
        raise ValueError("register_t1w: the input image contains NaN or infinite voxels")
    if float(data.max()) <= float(data.min()):
        raise ValueError(f"register_t1w: the input image is constant ({float(data.min()):g})")
    return data, affine


def _source_record(data: np.ndarray, affine: np.ndarray) -> dict[str, Any]:
    return {
        "source_shape": list(data.shape),
        "source_zooms_mm": [float(z) for z in voxel_sizes(affine)],
        "source_orientation": "".join(nib.aff2axcodes(affine)),
        "source_affine": affine.tolist(),
        "source_intensity_min": float(data.min()),
        "source_intensity_max": float(data.max()),
    }


def resample_to_model_grid(
    image: nib.spatialimages.SpatialImage,
    transform: np.ndarray | None = None,
    shape: Sequence[int] | None = None,
    *,
    intensity: Literal["minmax", "percentile"] = "minmax",
    percentiles: tuple[float, float] = (0.5, 99.5),
    min_ncc: float | None = DEFAULT_MIN_NCC,
) -> Registration:
    """Resample an image onto the model grid with a known template-to-source transform.

    ``transform`` (4 x 4, RAS+ mm) maps MNI points to the image's world points; ``None`` means
    identity, i.e. the image is already in MNI152 space (e.g. fMRIPrep's
    ``space-MNI152NLin2009cAsym`` T1w: 2009c asymmetric and 2009a symmetric are both ICBM 2009
    nonlinear templates in the same MNI frame; their residual differences, not measured here,
    are local, not rigid). Linear
    interpolation, padding with the image minimum; then intensity scaling as in
    :func:`register_t1w`. The quality check applies too (``min_ncc=None`` disables it).
    """
    from nibabel.processing import resample_from_to  # imports scipy

    data, affine = _checked_input(image)
    out_shape = _checked_shape(shape)
    matrix = np.eye(4) if transform is None else _checked_rigid(transform)
    grid_to_source = matrix @ _grid_to_template() @ model_affine(out_shape)
    resampled = resample_from_to(
        nib.Nifti1Image(data, affine),
        (out_shape, grid_to_source),
        order=1,
        mode="constant",
        cval=float(data.min()),
        out_class=nib.Nifti1Image,
    )
    values = np.asarray(resampled.dataobj, dtype=np.float32)
    scaled, scaling = _scale(values, intensity, percentiles)
    ncc = _ncc(scaled, out_shape)
    _, template_record = load_template()
    record: dict[str, Any] = {
        "method": (
            "resampling onto the model grid with a given MNI-to-source transform"
            if transform is not None
            else "resampling onto the model grid (input already in MNI152 space; not registered)"
        ),
        "template": template_record,
        "grid_shape": list(out_shape),
        "grid_orientation": "LAS",
        "grid_voxel_size_mm": 1.0,
        "grid_centre_mni_mm": list(GRID_CENTRE_MNI_MM),
        "transform_direction": "template (MNI) world -> source world, RAS+ mm",
        "transform_matrix": matrix.tolist(),
        "interpolation": "linear (spline order 1), padding with the source minimum",
        "ncc_with_template": ncc,
        "min_ncc": min_ncc,
        **scaling,
        **_source_record(data, affine),
    }
    if min_ncc is not None and not ncc >= min_ncc:
        raise RegistrationError(
            f"the T1w does not match the MNI152 template on the model grid: normalised "
            f"cross-correlation {ncc:.3f} < {min_ncc:g} (misaligned or not a T1w brain image)",
            ncc=ncc,
        )
    return Registration(
        image=_grid_image(scaled, out_shape),
        transform=matrix,
        grid_to_template=_grid_to_template(),
        ncc=ncc,
        metric=None,
        record=record,
    )


def _checked_shape(shape: Sequence[int] | None) -> tuple[int, int, int]:
    out_shape = MODEL_GRID_SHAPE if shape is None else tuple(int(n) for n in shape)
    if len(out_shape) != 3 or min(out_shape) < 1:
        raise ValueError(f"shape must be three positive voxel counts, got {shape}")
    return out_shape  # type: ignore[return-value]


def _checked_rigid(transform: np.ndarray) -> np.ndarray:
    matrix = np.asarray(transform, dtype=float)
    if matrix.shape != (4, 4) or not np.all(np.isfinite(matrix)):
        raise ValueError("transform must be a finite 4 x 4 matrix")
    rotation = matrix[:3, :3]
    if not np.allclose(rotation.T @ rotation, np.eye(3), atol=1e-4) or np.linalg.det(rotation) < 0:
        raise ValueError("transform must be rigid (a rotation and a translation)")
    return matrix


# --------------------------------------------------------------------------- registration


def register_t1w(
    image: nib.spatialimages.SpatialImage,
    shape: Sequence[int] | None = None,
    *,
    intensity: Literal["minmax", "percentile"] = "minmax",
    percentiles: tuple[float, float] = (0.5, 99.5),
    levels: Sequence[tuple[int, float]] = DEFAULT_LEVELS,
    sampling_fraction: float = 0.05,
    iterations: int = 200,
    min_step_mm: float = 0.001,
    min_ncc: float | None = DEFAULT_MIN_NCC,
    seed: int = 0,
    threads: int | None = None,
) -> Registration:
    """Rigidly register a T1w to the MNI152 template and resample it onto the model grid.

    Parameters
    ----------
    image
        nibabel image, 3-D (or 4-D with one volume): any orientation (RAS, LPS, oblique),
        voxel size and field of view; the header must place the head roughly upright in its
        world (scanner headers do).
    shape
        Output grid (voxels, 1 mm LAS, centred at MNI :data:`GRID_CENTRE_MNI_MM`); default
        the model's 160 x 224 x 160.
    intensity
        ``"minmax"``: min-max to [0, 1] over the output grid (upstream's scaling).
        ``"percentile"``: linear from the ``percentiles`` (default 0.5th and 99.5th) to
        [0, 1], clipped: robust to a few very bright voxels (vessels, fat).
    levels
        (shrink factor, smoothing sigma in mm) per resolution level, coarse to fine.
    sampling_fraction
        Fraction of the (masked) template voxels sampled at random for the metric at full
        resolution; a level shrunk by ``s`` samples ``s**2`` times that fraction (capped at 1).
    iterations
        Maximum optimiser iterations per level.
    min_step_mm
        The optimiser stops a level when its step (about mm of shift) falls below this.
    min_ncc
        Quality threshold: below it :class:`RegistrationError` is raised (``None``: never).
    seed
        Seed of the metric's random sampling (results can still differ in the last digits
        between runs: ITK sums over threads in varying order).
    threads
        ITK threads (default: ITK's default, all cores).

    Returns
    -------
    Registration
        ``.image`` (float32 on the model grid, [0, 1]), ``.transform`` (template/MNI world ->
        source world, RAS+ mm), ``.ncc``, ``.metric`` and ``.record``.

    Raises
    ------
    ValueError
        For an image that is not 3-D, is constant or has non-finite voxels or affine.
    RegistrationError
        When the registered image's NCC with the template is below ``min_ncc`` after every
        starting position was tried.
    """
    import SimpleITK as sitk

    started = time.perf_counter()
    data, affine = _checked_input(image)
    out_shape = _checked_shape(shape)
    if not levels or any(int(s) < 1 or float(g) < 0 for s, g in levels):
        raise ValueError(f"levels must be (shrink >= 1, sigma_mm >= 0) pairs, got {levels}")
    if not 0 < sampling_fraction <= 1:
        raise ValueError(f"sampling_fraction must be in (0, 1], got {sampling_fraction}")

    template, template_record = load_template()
    fixed, fixed_mask, template_centre = _fixed_images()
    moving = _to_sitk(data, affine)

    # Starting positions: head top and upper centroid of source vs template (RAS mm).
    source_top, source_xy = _head_landmarks(data, affine)
    template_data = np.asarray(template.dataobj)
    template_top, template_xy = _head_landmarks(template_data, template.affine)
    candidates = []
    for offset in _VERTEX_OFFSETS_MM:
        shift = np.array([*(source_xy - template_xy), source_top - offset - template_top])
        candidates.append(shift)

    def make_method(translation_ras: np.ndarray):
        method = sitk.ImageRegistrationMethod()
        method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
        method.SetMetricSamplingStrategy(method.RANDOM)
        # About the same number of samples at every level (a coarse level has few voxels).
        fractions = [min(1.0, sampling_fraction * int(s) ** 2) for s, _ in levels]
        method.SetMetricSamplingPercentagePerLevel(fractions, seed)
        method.SetMetricFixedMask(fixed_mask)
        method.SetInterpolator(sitk.sitkLinear)
        method.SetOptimizerAsRegularStepGradientDescent(
            learningRate=2.0,
            minStep=float(min_step_mm),
            numberOfIterations=int(iterations),
            relaxationFactor=0.5,
            gradientMagnitudeTolerance=1e-8,
        )
        method.SetOptimizerScalesFromPhysicalShift()
        method.SetShrinkFactorsPerLevel([int(s) for s, _ in levels])
        method.SetSmoothingSigmasPerLevel([float(g) for _, g in levels])
        method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
        if threads is not None:
            method.SetNumberOfThreads(int(threads))
        initial = sitk.Euler3DTransform()
        initial.SetCenter([float(v) for v in template_centre])
        initial.SetTranslation([float(v) for v in _LPS[:3, :3] @ translation_ras])
        method.SetInitialTransform(initial, inPlace=True)
        return method, initial

    # Rank the starts by the metric at the coarsest level's resolution (cheap), best first.
    coarse_fixed = sitk.Shrink(fixed, [int(levels[0][0])] * 3)
    coarse_mask = sitk.Shrink(fixed_mask, [int(levels[0][0])] * 3)
    coarse_moving = _shrunk(moving, float(levels[0][0]))
    ranked = []
    for shift in candidates:
        probe, _ = make_method(shift)
        probe.SetMetricFixedMask(coarse_mask)
        try:
            value = probe.MetricEvaluate(coarse_fixed, coarse_moving)
        except RuntimeError:  # ITK: too few samples overlap the source at this start
            value = np.inf
        ranked.append((value, tuple(float(v) for v in shift)))
    ranked.sort()

    attempts: list[dict[str, Any]] = []
    best: Registration | None = None
    for _, shift in ranked:
        method, final = make_method(np.asarray(shift))
        try:
            method.Execute(fixed, moving)
        except RuntimeError as exc:  # ITK: e.g. all samples left the source's field of view
            reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else repr(exc)
            attempts.append({"initial_shift_mm": list(shift), "error": reason})
            continue
        transform = _LPS @ _sitk_transform_matrix(final) @ _LPS
        try:
            result = resample_to_model_grid(
                image, transform, out_shape, intensity=intensity, percentiles=percentiles,
                min_ncc=None,
            )
        except ValueError as exc:  # e.g. the source moved entirely off the grid
            attempts.append({"initial_shift_mm": list(shift), "error": str(exc)})
            continue
        attempts.append({
            "initial_shift_mm": list(shift),
            "metric": float(method.GetMetricValue()),
            "iterations_last_level": int(method.GetOptimizerIteration()),
            "ncc_with_template": result.ncc,
        })
        if best is None or result.ncc > best.ncc:
            best = dataclasses.replace(result, metric=float(method.GetMetricValue()))
        if min_ncc is None or result.ncc >= min_ncc:
            break

    if best is None or (min_ncc is not None and not best.ncc >= min_ncc):
        ncc = None if best is None else best.ncc
        found = "no result" if ncc is None else f"normalised cross-correlation {ncc:.3f}"
        gate = "" if min_ncc is None or ncc is None else f" < {min_ncc:g}"
        raise RegistrationError(
            f"rigid registration to the MNI152 template failed: {found}{gate} after "
            f"{len(attempts)} starting positions (not a T1w head image, or too far from "
            "upright)",
            ncc=ncc,
        )

    record = dict(best.record)
    record.update({
        "method": (
            "rigid (6-dof) registration to the MNI152 template, then linear resampling onto "
            "the model grid and intensity scaling"
        ),
        "library": f"SimpleITK {sitk.Version_VersionString()}",
        "template": template_record,
        "metric": "Mattes mutual information, 32 bins, template brain mask dilated by "
        f"{_MASK_DILATION_MM} mm, random sampling "
        f"{sampling_fraction:g} x shrink^2 of the voxels (seed {seed})",
        "metric_value": best.metric,
        "optimizer": f"regular step gradient descent, learning rate 2 mm, min step "
        f"{min_step_mm:g} mm, "
        f"at most {int(iterations)} iterations per level, scales from physical shift",
        "transform_type": "Euler3D (rigid, 6 dof), centred on the template brain",
        "levels": [{"shrink": int(s), "smoothing_sigma_mm": float(g)} for s, g in levels],
        "initialisation": "head top and centroid of its upper 100 mm vs the template's, "
        f"vertex offsets {list(_VERTEX_OFFSETS_MM)} mm ranked by the coarse metric",
        "attempts": attempts,
        "min_ncc": min_ncc,
        "seconds": round(time.perf_counter() - started, 2),
    })
    return dataclasses.replace(best, record=record)


def _shrunk(image, spacing_mm: float):
    """``image`` smoothed and resampled to about ``spacing_mm`` voxels (for cheap probes)."""
    import SimpleITK as sitk

    factors = [max(1, int(round(spacing_mm / s))) for s in image.GetSpacing()]
    smooth = sitk.SmoothingRecursiveGaussian(image, spacing_mm / 2)
    return sitk.Shrink(smooth, factors)


@functools.lru_cache(maxsize=1)
def _fixed_images():
    """Template and its dilated brain mask as SimpleITK images; template brain centroid (LPS)."""
    import SimpleITK as sitk
    from scipy import ndimage

    template, _ = load_template()
    data = np.asarray(template.dataobj)
    brain = data > 0.05
    structure = ndimage.generate_binary_structure(3, 1)
    mask = ndimage.binary_dilation(brain, structure, iterations=_MASK_DILATION_MM)
    fixed = _to_sitk(data, template.affine)
    fixed_mask = sitk.Cast(_to_sitk(mask.astype(np.float32), template.affine), sitk.sitkUInt8)
    centre_ras = apply_affine(template.affine, np.argwhere(brain).mean(axis=0))
    return fixed, fixed_mask, _LPS[:3, :3] @ centre_ras


# --------------------------------------------------------------------------- back to source


def resample_to_source(
    grid_image: nib.spatialimages.SpatialImage,
    registration: Registration | np.ndarray,
    source: nib.spatialimages.SpatialImage,
    *,
    order: int = 1,
) -> nib.Nifti1Image:
    """Resample a model-grid image (e.g. a counterfactual) back onto the source T1w's grid.

    ``registration`` is the :class:`Registration` of ``source`` or its ``transform`` (4 x 4,
    MNI world -> source world, as :func:`read_itk_transform` returns from the xfm file); the
    grid image's affine must be ``model_affine(shape)``. Spline ``order`` (1 = linear); voxels
    outside the model grid are 0. Returns a float32 image with the source's shape and affine.
    """
    from nibabel.processing import resample_from_to

    grid_to_source = (
        registration.grid_to_source
        if isinstance(registration, Registration)
        else _checked_rigid(registration) @ _grid_to_template()
    )
    shape = tuple(int(n) for n in source.shape[:3])
    data = np.asarray(grid_image.dataobj, dtype=np.float32)
    # The grid image's voxels, placed in the source world.
    placed = nib.Nifti1Image(data, grid_to_source @ grid_image.affine)
    out = resample_from_to(
        placed, (shape, source.affine), order=order, mode="constant", cval=0.0,
        out_class=nib.Nifti1Image,
    )
    result = nib.Nifti1Image(np.asarray(out.dataobj, dtype=np.float32), source.affine)
    result.header.set_xyzt_units(xyz="mm")
    return result


# --------------------------------------------------------------------------- transform files


def write_itk_transform(transform: np.ndarray, path: str | os.PathLike[str]) -> Path:
    """Write a rigid/affine 4 x 4 (RAS+ mm) as an ITK text transform, atomically.

    The file holds ``AffineTransform_double_3_3`` in ITK's LPS coordinates with
    ``FixedParameters: 0 0 0``, meaning exactly ``transform``: with the transform of a
    :class:`Registration` it maps template (MNI) points to source points, as ANTs and
    fMRIPrep's ``from-T1w_to-<template>_mode-image_xfm`` files do.
    """
    from .imaging import atomic_write

    matrix = _LPS @ np.asarray(transform, dtype=float) @ _LPS
    if matrix.shape != (4, 4) or not np.all(np.isfinite(matrix)):
        raise ValueError("transform must be a finite 4 x 4 matrix")
    parameters = [*matrix[:3, :3].ravel(), *matrix[:3, 3]]
    text = (
        "#Insight Transform File V1.0\n"
        "#Transform 0\n"
        "Transform: AffineTransform_double_3_3\n"
        f"Parameters: {' '.join(repr(float(v)) for v in parameters)}\n"
        "FixedParameters: 0 0 0\n"
    )
    return atomic_write(path, lambda handle: handle.write(text.encode("ascii")))


def read_itk_transform(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a single affine/rigid ITK text transform as a 4 x 4 in RAS+ mm.

    Accepts ``AffineTransform_*_3_3`` and ``MatrixOffsetTransformBase_*_3_3`` (12 parameters:
    the 3 x 3 matrix row-major, then the translation; FixedParameters: the centre).
    """
    source = Path(path)
    fields: dict[str, str] = {}
    for line in source.read_text(encoding="ascii").splitlines():
        key, sep, value = line.partition(":")
        if sep and not key.startswith("#"):
            fields[key.strip()] = value.strip()
    kind = fields.get("Transform", "")
    known = kind.startswith(("AffineTransform_", "MatrixOffsetTransformBase_"))
    if not known or not kind.endswith("_3_3"):
        raise ValueError(f"{source}: expected a 3-D ITK affine transform, found {kind!r}")
    parameters = np.array(fields["Parameters"].split(), dtype=float)
    centre = np.array(fields.get("FixedParameters", "0 0 0").split(), dtype=float)
    if parameters.shape != (12,) or centre.shape != (3,):
        raise ValueError(f"{source}: expected 12 parameters and a 3-D centre")
    matrix = parameters[:9].reshape(3, 3)
    lps = from_matvec(matrix, parameters[9:] + centre - matrix @ centre)
    return _LPS @ lps @ _LPS
