"""Resumability: what an existing output needs, compared with its request.

Every file is written atomically (a hidden temporary, then a rename), and an image's sidecar
is removed before the image is (re)written and written after it
(:func:`brain_ldm_nodes.imaging.publish_image`): a sidecar next to an image therefore always
describes that image, and a killed run leaves at most an image without a sidecar (redone) and
hidden ``.*.tmp-*`` files (removed by the next run). :func:`assess` compares an existing
sidecar with the request: a difference in what determines the voxels (conditioning values,
seed, steps, scheduler, weights, grid) means the image is sampled again; a difference only in
the description (raw cells, derivation record, policy) means only the sidecar is rewritten
(:func:`refresh_sidecar`). Per-image files hold nothing run-specific (no time stamps, no work
paths), so a resumed run gives the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ..imaging import write_json
from .naming import read_sidecar, sidecar_path

if TYPE_CHECKING:  # pragma: no cover
    from .requests import CounterfactualRequest, ImageRequest

__all__ = [
    "Assessment",
    "MISSING",
    "assess",
    "lookup",
    "refresh_sidecar",
]


MISSING = object()


@dataclass(frozen=True)
class Assessment:
    """What an existing output needs: nothing, a new sidecar, or sampling (with why)."""

    action: Literal["complete", "refresh", "generate"]
    reason: str


def lookup(document: Any, path: Sequence[str]) -> Any:
    for key in path:
        if not isinstance(document, Mapping) or key not in document:
            return MISSING
        document = document[key]
    return document


def _shown(value: Any, limit: int = 60) -> str:
    text = "(absent)" if value is MISSING else json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _difference(
    document: Mapping[str, Any],
    expected: Mapping[tuple[str, ...], Any],
    keys: Iterable[tuple[str, ...]],
) -> str | None:
    for path in keys:
        found, wanted = lookup(document, path), expected[path]
        if found != wanted:
            return f"{'.'.join(path)} is {_shown(found)}, the request gives {_shown(wanted)}"
    return None


def _image_problem(path: Path, shape: Sequence[int]) -> str | None:
    """Why the NIfTI at ``path`` is not a usable output of ``shape`` (reads the header only)."""
    import nibabel as nib

    try:
        found = tuple(int(n) for n in nib.load(path).shape)
    except Exception as exc:  # nibabel raises several types for damaged files
        return f"{path.name} is not a readable NIfTI image ({type(exc).__name__})"
    if found != tuple(shape):
        return f"{path.name} has shape {found}, the model's grid is {tuple(shape)}"
    return None


def assess(
    request: ImageRequest | CounterfactualRequest, output_dir: str | os.PathLike[str]
) -> Assessment:
    """Compare the image of ``request`` in ``output_dir`` (if any) with the request: its
    ``image_keys`` decide whether to make it again, its ``metadata_keys`` whether to rewrite
    only the sidecar."""
    image = Path(output_dir) / request.relative_path
    sidecar = sidecar_path(image)
    if not sidecar.exists():
        if image.exists():
            return Assessment("generate", f"{image.name} has no sidecar (an interrupted run?)")
        return Assessment("generate", "new")
    document = read_sidecar(sidecar)
    if isinstance(document, str):
        return Assessment("generate", document)
    if not image.exists():
        return Assessment("generate", f"{sidecar.name} has no image next to it")
    problem = _image_problem(image, getattr(request, "output_shape", request.model.image_shape))
    if problem is not None:
        return Assessment("generate", problem)
    expected = request.expected()
    difference = _difference(document, expected, request.image_keys)
    if difference is not None:
        return Assessment("generate", difference)
    difference = _difference(document, expected, request.metadata_keys)
    if difference is not None:
        return Assessment("refresh", difference)
    return Assessment("complete", "complete and matching")


def refresh_sidecar(
    request: ImageRequest | CounterfactualRequest, output_dir: str | os.PathLike[str]
) -> Path:
    """Rewrite the sidecar of an image whose voxels match ``request`` but whose description
    does not (``assess(...).action == "refresh"``); the image is left alone."""
    sidecar = sidecar_path(Path(output_dir) / request.relative_path)
    document = read_sidecar(sidecar)
    if isinstance(document, str):
        raise ValueError(document)
    for path, value in request.expected().items():
        if path in request.image_keys:
            continue
        parent = document
        for key in path[:-1]:
            parent = parent.setdefault(key, {})
        if value is MISSING:
            parent.pop(path[-1], None)
        else:
            parent[path[-1]] = value
    return write_json(document, sidecar)
