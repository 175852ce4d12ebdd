"""The model's image grid: its shape, axis order and where its voxels are in the world.

numpy only (no JAX, no nibabel), so the pipeline, the imaging layer and the registration read
one definition (``/work/shared/UPSTREAM.md`` section 2):

* The grid is 160 x 224 x 160 voxels of 1 mm (:data:`MODEL_GRID_SHAPE`; the pipeline's
  ``IMAGE_SHAPE``), array axes **LAS**: axis 0 runs from the subject's right (index 0) to the
  left, axis 1 posterior to anterior, axis 2 inferior to superior.
* The upstream training images were rigidly registered to MNI space, but the MNI position
  of the grid origin is not published (the upstream bundle writes an identity affine).
  We therefore *choose* a centred affine (:func:`model_affine`): the grid centre, voxel
  ``(n - 1) / 2`` on each axis, sits at world (0, 0, 0) mm. World coordinates of model-grid
  images are relative to that centre; they are not MNI coordinates.
* Latents (C, d, h, w) have one voxel per 8 image voxels on each axis
  (:data:`LATENT_DOWNSAMPLING`) and an 8 mm LAS affine that shares the image grid's centre
  (:func:`latent_affine`), so they overlay the image in a NIfTI viewer.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "LATENT_DOWNSAMPLING",
    "MODEL_GRID_SHAPE",
    "MODEL_ORIENTATION",
    "latent_affine",
    "model_affine",
]

MODEL_GRID_SHAPE: tuple[int, int, int] = (160, 224, 160)
"""Shape of the upstream image grid in voxels (1 mm, LAS)."""

MODEL_ORIENTATION: tuple[str, str, str] = ("L", "A", "S")
"""nibabel axis codes of the model grid (``nibabel.aff2axcodes`` of :func:`model_affine`)."""

LATENT_DOWNSAMPLING: int = 8
"""Image voxels per latent voxel along each axis (three stride-2 downsamplings)."""


def model_affine(
    shape: Sequence[int] = MODEL_GRID_SHAPE, voxel_size_mm: float = 1.0
) -> np.ndarray:
    """Voxel-to-world affine (4 x 4, float64, mm) of a centred LAS grid.

    ``diag(-s, s, s)`` with ``s = voxel_size_mm``: world x (towards the subject's right in
    NIfTI's RAS+ world) decreases as axis 0 increases, so voxel index 0 is on the subject's
    right (``nibabel.aff2axcodes`` gives ``('L', 'A', 'S')``). The translation puts the
    grid centre, voxel ``(n - 1) / 2`` on every axis, at world (0, 0, 0) mm.

    This centring is our convention: the MNI origin of the upstream grid is unpublished.
    """
    shape_arr = np.asarray(shape, dtype=float)
    if shape_arr.shape != (3,) or np.any(shape_arr < 1):
        raise ValueError(f"shape must be three positive voxel counts, got {tuple(shape)}")
    if not (np.isfinite(voxel_size_mm) and voxel_size_mm > 0):
        raise ValueError(f"voxel_size_mm must be positive, got {voxel_size_mm}")
    directions = np.diag([-voxel_size_mm, voxel_size_mm, voxel_size_mm])
    centre_voxel = (shape_arr - 1.0) / 2.0
    affine = np.eye(4)
    affine[:3, :3] = directions
    affine[:3, 3] = -directions @ centre_voxel
    return affine


def latent_affine(latent_spatial_shape: Sequence[int]) -> np.ndarray:
    """Affine (4 x 4, mm) of a latent grid (d, h, w): 8 mm LAS voxels, same centre.

    Latent voxel ``k`` summarises image voxels ``8k .. 8k + 7``, so its centre is image
    voxel ``8k + 3.5``; with both grids centred at world (0, 0, 0) this is exactly
    ``model_affine(latent_spatial_shape, voxel_size_mm=8)`` for an image grid 8 times the
    latent grid (e.g. 20 x 28 x 20 for 160 x 224 x 160).
    """
    return model_affine(latent_spatial_shape, voxel_size_mm=float(LATENT_DOWNSAMPLING))
