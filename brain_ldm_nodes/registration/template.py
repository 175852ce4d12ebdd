"""The MNI152 template nilearn ships, and where the model grid sits in it.

Template (MNI) world: ICBM 2009a nonlinear symmetric MNI152, 1 mm, skull-stripped (nilearn's
``mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz``, TemplateFlow name ``MNI152NLin2009aSym``).
The model grid's centre is at MNI :data:`GRID_CENTRE_MNI_MM` (the package docstring says why).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.affines import from_matvec

from ..grid import model_affine
from ..imaging import resample_to_grid

__all__ = ["GRID_CENTRE_MNI_MM", "TEMPLATE_NAME", "load_template"]

TEMPLATE_NAME = "MNI152NLin2009aSym"
"""TemplateFlow identifier of the template's space (ICBM 2009a nonlinear symmetric)."""

_TEMPLATE_FILE = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
_TEMPLATE_DESCRIPTION = (
    "ICBM 2009a nonlinear symmetric MNI152 T1 template, 1 mm, skull-stripped, rescaled to "
    "uint8 (as shipped in nilearn's package data; nilearn.datasets.load_mni152_template)"
)

GRID_CENTRE_MNI_MM: tuple[float, float, float] = (0.0, -17.0, 5.0)
"""MNI position (mm) of the model grid's centre: the centre of the template brain's bbox."""


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
    template, _ = load_template()
    grid = _grid_to_template() @ model_affine(shape)
    data = resample_to_grid(np.asarray(template.dataobj), template.affine, shape, grid, cval=0.0)
    return data, data > 0.05


def _grid_to_template() -> np.ndarray:
    """4 x 4 translation: model-grid world points -> MNI points."""
    return from_matvec(np.eye(3), np.asarray(GRID_CENTRE_MNI_MM, dtype=float))


def _ncc(data: np.ndarray, shape: tuple[int, int, int]) -> float:
    """Normalised cross-correlation of ``data`` (on the grid ``shape``) with the template,
    inside its brain mask."""
    template, mask = _template_on_grid(shape)
    a = data[mask].astype(np.float64)
    b = template[mask].astype(np.float64)
    a -= a.mean()
    b -= b.mean()
    denominator = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denominator) if denominator > 0 else 0.0
