"""ITK's LPS world: numpy images and transforms to SimpleITK and back, ITK transform files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from nibabel.affines import from_matvec, voxel_sizes

from ..imaging import atomic_write

__all__ = ["read_itk_transform", "write_itk_transform"]

_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS <-> LPS (its own inverse)


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


def write_itk_transform(transform: np.ndarray, path: str | os.PathLike[str]) -> Path:
    """Write a rigid/affine 4 x 4 (RAS+ mm) as an ITK text transform, atomically.

    The file holds ``AffineTransform_double_3_3`` in ITK's LPS coordinates with
    ``FixedParameters: 0 0 0``, meaning exactly ``transform``: with the transform of a
    :class:`Registration` it maps template (MNI) points to source points, as ANTs and
    fMRIPrep's ``from-T1w_to-<template>_mode-image_xfm`` files do.
    """
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
