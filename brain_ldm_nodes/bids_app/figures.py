"""The group report's figures: orthogonal-slice mosaics and sweep strips as PNG files.

Drawn with matplotlib's object API (no pyplot state); mosaics show 5 slices per plane between
30 % and 70 % of the axis, strips the middle slice of each plane, all in neurological
convention (the subject's left on the viewer's left).
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._version import __version__
from ..imaging import atomic_write
from .errors import ReportError

__all__ = [
    "SLICE_FRACTIONS",
    "render_mosaic",
    "render_strip",
]


SLICE_FRACTIONS = (0.3, 0.4, 0.5, 0.6, 0.7)


def _planes(volume: np.ndarray) -> list[tuple[str, list[np.ndarray]]]:
    """Sagittal, coronal and axial slices of an LAS volume, oriented for ``imshow(origin="lower")``:
    anterior or superior up, the subject's left on the viewer's left (neurological)."""
    size_x, size_y, size_z = volume.shape

    def picks(size: int) -> list[int]:
        return sorted({min(size - 1, int(round(f * (size - 1)))) for f in SLICE_FRACTIONS})

    # LAS: x runs right -> left, so showing x increasing to the right puts the subject's left
    # on the viewer's right; flip x for the neurological convention.
    return [
        ("sagittal", [volume[i, :, :].T for i in picks(size_x)]),             # y right, z up
        ("coronal", [volume[::-1, j, :].T for j in picks(size_y)]),           # x (L..R), z up
        ("axial", [volume[::-1, :, k].T for k in picks(size_z)]),             # x (L..R), y up
    ]


def render_mosaic(image: str | os.PathLike[str], out_png: str | os.PathLike[str], *,
                  title: str = "") -> Path:
    """Draw 5 slices per plane (rows: sagittal, coronal, axial) of a 3-D NIfTI into a PNG.

    Grey levels span the 0.5th to 99.5th percentile of the volume. Written atomically.
    """
    import nibabel as nib
    from matplotlib.figure import Figure

    volume = np.asarray(nib.load(image).dataobj, dtype=np.float32)
    if volume.ndim != 3:
        raise ReportError(f"{image}: expected a 3-D image, got shape {volume.shape}")
    low, high = _grey_range(volume)
    planes = _planes(volume)
    columns = max(len(slices) for _, slices in planes)
    figure = Figure(figsize=(1.6 * columns, 1.7 * len(planes) + 0.3), facecolor="black")
    grid = figure.subplots(len(planes), columns, squeeze=False)
    for row, (plane, slices) in enumerate(planes):
        for column in range(columns):
            axes = grid[row][column]
            axes.set_axis_off()
            if column < len(slices):
                axes.imshow(slices[column], cmap="gray", vmin=low, vmax=high, origin="lower",
                            interpolation="nearest")
        grid[row][0].text(-0.08, 0.5, plane, color="white", fontsize=8, rotation=90,
                          ha="right", va="center", transform=grid[row][0].transAxes)
    _sides(grid, right_x=0.9)
    if title:
        figure.suptitle(title, color="white", fontsize=9)
    figure.subplots_adjust(left=0.05, right=0.99, bottom=0.01, top=0.92 if title else 0.99,
                           wspace=0.03, hspace=0.05)
    return _write_png(figure, out_png)


def _middle_slices(volume: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """The middle sagittal, coronal and axial slices, oriented as :func:`_planes` does."""
    x, y, z = (size // 2 for size in volume.shape)
    return [("sagittal", volume[x, :, :].T), ("coronal", volume[::-1, y, :].T),
            ("axial", volume[::-1, :, z].T)]


def render_strip(images: Sequence[str | os.PathLike[str]], labels: Sequence[str],
                 out_png: str | os.PathLike[str], *, title: str = "") -> Path:
    """Draw 3-D NIfTIs side by side (columns, in the order given, each headed by its label)
    as their middle sagittal, coronal and axial slices (rows), into a PNG.

    One grey scale for all of them (0.5th to 99.5th percentile of all voxels), so that
    intensity differences along the strip show. Written atomically.
    """
    import nibabel as nib
    from matplotlib.figure import Figure

    if len(images) != len(labels) or not images:
        raise ReportError(f"render_strip: {len(images)} images and {len(labels)} labels")
    volumes = [np.asarray(nib.load(image).dataobj, dtype=np.float32) for image in images]
    shapes = {volume.shape for volume in volumes}
    if len(shapes) != 1 or len(next(iter(shapes))) != 3:
        raise ReportError(f"render_strip: expected 3-D images of one shape, got {sorted(shapes)}")
    low, high = _grey_range(np.concatenate([v.ravel() for v in volumes]))
    columns, rows = len(volumes), 3
    figure = Figure(figsize=(1.5 * columns + 0.4, 1.5 * rows + (0.7 if title else 0.4)),
                    facecolor="black")
    grid = figure.subplots(rows, columns, squeeze=False)
    for column, (volume, label) in enumerate(zip(volumes, labels)):
        for row, (plane, data) in enumerate(_middle_slices(volume)):
            axes = grid[row][column]
            axes.set_axis_off()
            axes.imshow(data, cmap="gray", vmin=low, vmax=high, origin="lower",
                        interpolation="nearest")
            if column == 0:
                axes.text(-0.08, 0.5, plane, color="white", fontsize=8, rotation=90,
                          ha="right", va="center", transform=axes.transAxes)
        grid[0][column].set_title(label, color="white", fontsize=8, pad=3)
    _sides(grid, right_x=0.88)
    if title:
        figure.suptitle(title, color="white", fontsize=9)
    top = 1 - (0.75 if title else 0.35) / (1.5 * rows + (0.7 if title else 0.4))
    figure.subplots_adjust(left=0.4 / (1.5 * columns + 0.4), right=0.995, bottom=0.01,
                           top=top, wspace=0.03, hspace=0.05)
    return _write_png(figure, out_png)


def _grey_range(voxels: np.ndarray) -> tuple[float, float]:
    """The grey scale: 0.5th to 99.5th percentile of ``voxels`` (a unit span if flat)."""
    low, high = np.percentile(voxels, [0.5, 99.5])
    return (low, high) if high > low else (low, low + 1.0)


def _sides(grid: Any, *, right_x: float) -> None:
    """Anatomical sides in the first column of each row (sagittal P-A, coronal and axial
    L-R), at the left edge and at ``right_x`` (axes fraction)."""
    for row, (left, right) in enumerate([("P", "A"), ("L", "R"), ("L", "R")]):
        for side, x in ((left, 0.02), (right, right_x)):
            grid[row][0].text(x, 0.04, side, color="yellow", fontsize=7,
                              transform=grid[row][0].transAxes)


def _write_png(figure: Any, out_png: str | os.PathLike[str]) -> Path:
    """``figure`` as a PNG (black background, the software named), written atomically."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, facecolor="black",
                   metadata={"Software": f"brain-ldm-nodes {__version__} (matplotlib)"})
    payload = buffer.getvalue()
    return atomic_write(out_png, lambda handle: handle.write(payload))
