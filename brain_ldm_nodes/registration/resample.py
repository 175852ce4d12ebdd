"""A T1w onto the model grid with a known MNI-to-source transform, and model-grid images back
onto the source's grid; :class:`Registration`, the result of both this and the registration."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

import nibabel as nib
import numpy as np
from nibabel.affines import voxel_sizes

from ..grid import MODEL_GRID_SHAPE, model_affine
from ..imaging import _checked_affine, _nifti_image, resample_to_grid, volume_shape
from .template import GRID_CENTRE_MNI_MM, _grid_to_template, _ncc, load_template

__all__ = [
    "DEFAULT_MIN_NCC",
    "Registration",
    "RegistrationError",
    "resample_to_model_grid",
    "resample_to_source",
]

DEFAULT_MIN_NCC = 0.5
"""Registrations with a lower NCC to the template (inside its brain mask) are refused.

A gate against gross failures, not a fine accuracy check. Measured on the template and on the
template with a synthetic scalp, skull and neck: correctly registered, 0.98-1.0 (0.77 when the
input's field of view cuts part of the brain); misplaced by 5 mm 0.55, by 10 mm 0.34-0.43, by
20 mm 0.23-0.29; rotated by 10 degrees 0.57, by 15 degrees 0.42-0.48, 15 degrees + 20 mm
0.20-0.24. Real scans score lower than the template itself (individual anatomy, noise, bias
field), which is why the gate is not set higher; it is not yet calibrated on real scans."""


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


def _checked_input(image: nib.spatialimages.SpatialImage) -> tuple[np.ndarray, np.ndarray]:
    """Voxels (float32, 3-D) and affine of an input image, or a one-line ``ValueError``."""
    shape = volume_shape(image, "register_t1w expects a 3-D T1w image (or 4-D with one volume)")
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
    data, affine = _checked_input(image)
    out_shape = _checked_shape(shape)
    matrix = np.eye(4) if transform is None else _checked_rigid(transform)
    grid_to_source = matrix @ _grid_to_template() @ model_affine(out_shape)
    values = resample_to_grid(data, affine, out_shape, grid_to_source)
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
        image=_nifti_image(
            scaled, model_affine(out_shape), "Brain LDM T1w registered to MNI152, [0,1]"
        ),
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
    grid_to_source = (
        registration.grid_to_source
        if isinstance(registration, Registration)
        else _checked_rigid(registration) @ _grid_to_template()
    )
    shape = tuple(int(n) for n in source.shape[:3])
    data = np.asarray(grid_image.dataobj, dtype=np.float32)
    # The grid image's voxels, placed in the source world, onto the source's grid.
    placed = grid_to_source @ grid_image.affine
    values = resample_to_grid(data, placed, shape, source.affine, order=order, cval=0.0)
    result = nib.Nifti1Image(values, source.affine)
    result.header.set_xyzt_units(xyz="mm")
    return result
