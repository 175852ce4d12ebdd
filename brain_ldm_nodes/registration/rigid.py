"""Rigid (6-dof) registration of a T1w to the MNI152 template with SimpleITK."""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence
from typing import Any, Literal

import nibabel as nib
import numpy as np
from nibabel.affines import apply_affine, voxel_sizes

from .resample import (
    DEFAULT_MIN_NCC,
    Registration,
    RegistrationError,
    _checked_input,
    _checked_shape,
    resample_to_model_grid,
)
from .template import load_template
from .transforms import _LPS, _sitk_transform_matrix, _to_sitk

__all__ = ["DEFAULT_LEVELS", "register_t1w"]

DEFAULT_LEVELS: tuple[tuple[int, float], ...] = ((4, 2.0), (2, 1.0), (1, 0.0))
"""Registration pyramid: (shrink factor, Gaussian smoothing sigma in mm) per level."""

_MASK_DILATION_MM = 8
_UPPER_SLAB_MM = 100.0
_VERTEX_OFFSETS_MM = (0.0, 8.0, 16.0)  # head top above brain top: none (skull-stripped) .. scalp


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
