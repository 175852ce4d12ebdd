"""Known rigid motions of the MNI152 template, for registration tests, the benchmark and figure.

A "moved" image is the template (optionally given a synthetic scalp, skull and neck) seen
through a rigid motion ``M`` (template/MNI world -> source world, RAS+ mm) on a new grid of any
orientation, voxel size and field of view. A registration should recover ``transform == M``.
"""

from __future__ import annotations

from collections.abc import Sequence

import nibabel as nib
import numpy as np
from nibabel.affines import apply_affine, from_matvec
from scipy import ndimage
from scipy.spatial.transform import Rotation

from brain_ldm_nodes.registration import load_template


def rigid(angles_deg: Sequence[float], shift_mm: Sequence[float]) -> np.ndarray:
    """4 x 4 rigid motion: rotation about MNI (0, -17, 5) (x, y, z Euler angles) then a shift."""
    rotation = Rotation.from_euler("xyz", angles_deg, degrees=True).as_matrix()
    centre = np.array([0.0, -17.0, 5.0])
    return from_matvec(rotation, centre - rotation @ centre + np.asarray(shift_mm, float))


def synthetic_head() -> nib.Nifti1Image:
    """The template with a scalp, a dark skull and a neck column, on a taller 1 mm RAS grid.

    Brain (template) intensities in [0, 1]; CSF gap 0 (3 mm), skull 0.05 (5 mm), scalp 0.8
    (5 mm) around the brain; a neck cylinder (radius 45 mm, 0.6) from below the cerebellum to
    MNI z = -180 mm, with a bright rim. Not anatomy, but it has what moves a centre of mass.
    """
    template, _ = load_template()
    data = np.asarray(template.dataobj, dtype=np.float32)
    pad_below = 110
    padded = np.pad(data, ((12, 12), (12, 12), (pad_below, 12)))
    affine = template.affine @ from_matvec(np.eye(3), [-12, -12, -pad_below])
    brain = padded > 0.05
    distance = ndimage.distance_transform_edt(~brain)
    head = padded.copy()
    head[(distance > 3) & (distance <= 8)] = 0.05
    head[(distance > 8) & (distance <= 13)] = 0.8
    ijk = np.indices(padded.shape).reshape(3, -1).T
    xyz = apply_affine(affine, ijk).reshape(*padded.shape, 3)
    radial = np.hypot(xyz[..., 0], xyz[..., 1] + 25.0)
    neck = (xyz[..., 2] < -40) & (xyz[..., 2] > -180) & (radial < 45) & (head == 0)
    head[neck] = 0.6
    head[neck & (radial > 40)] = 0.9
    return nib.Nifti1Image(head, affine)


def grid_affine(
    shape: Sequence[int], zooms: Sequence[float], orientation: str = "RAS", tilt_deg: float = 0.0,
    centre_mm: Sequence[float] = (0.0, 0.0, 0.0),
) -> np.ndarray:
    """Affine of a grid with axis codes ``orientation`` ('RAS', 'LPS', 'LAS', ...), voxel
    sizes ``zooms`` (mm), optionally tilted (oblique) by ``tilt_deg`` about x, centred at
    ``centre_mm`` (world)."""
    codes = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}
    columns = np.zeros((3, 3))
    for axis, code in enumerate(orientation):
        world_axis, sign = codes[code]
        columns[world_axis, axis] = sign * zooms[axis]
    tilt = Rotation.from_euler("x", tilt_deg, degrees=True).as_matrix()
    matrix = tilt @ columns
    centre_voxel = (np.asarray(shape, float) - 1) / 2
    return from_matvec(matrix, np.asarray(centre_mm, float) - matrix @ centre_voxel)


def moved_image(
    source: nib.Nifti1Image, motion: np.ndarray, shape: Sequence[int], affine: np.ndarray,
    *, noise: float = 0.0, seed: int = 0,
) -> nib.Nifti1Image:
    """``source`` (in MNI world) seen on grid (shape, affine) after the motion
    ``p_new = motion @ p_mni``; linear interpolation; optional Gaussian noise (× max)."""
    ijk = np.indices(shape).reshape(3, -1).T
    mni = apply_affine(np.linalg.inv(motion), apply_affine(affine, ijk))
    voxels = apply_affine(np.linalg.inv(source.affine), mni).T
    values = ndimage.map_coordinates(
        np.asarray(source.dataobj, dtype=np.float32), voxels, order=1, mode="constant", cval=0.0
    ).reshape(shape)
    if noise:
        values = values + np.random.default_rng(seed).normal(0, noise, values.shape)
    return nib.Nifti1Image((values * 1000).astype(np.float32), affine)


def transform_errors(estimated: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """(RMS distance in mm over the template brain, rotation error in degrees)."""
    template, _ = load_template()
    brain = np.argwhere(np.asarray(template.dataobj) > 0.05)[::50]
    points = apply_affine(template.affine, brain)
    distance = apply_affine(estimated, points) - apply_affine(truth, points)
    rms = float(np.sqrt((distance**2).sum(axis=1).mean()))
    relative = estimated[:3, :3].T @ truth[:3, :3]
    angle = float(np.degrees(np.arccos(np.clip((np.trace(relative) - 1) / 2, -1, 1))))
    return rms, angle
