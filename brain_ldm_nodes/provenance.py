"""Provenance for derivatives: JSON sidecars, software versions, the grid convention, and the
conditioning JSON that travels between the Nipype nodes.

No JAX, Nipype or BIDS imports here (the :class:`~brain_ldm_nodes.pipeline.BrainLDM` passed in
is only read), so the interfaces and the BIDS App build the same sidecars from the same code.

Sidecar keys are BIDS-style CamelCase; ``"Synthetic": true`` marks model-generated voxels.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ._version import __version__
from .conditioning import CONDITIONING_ORDER, Conditioning
from .demographics import DemographicsPolicy
from .grid import MODEL_ORIENTATION, model_affine
from .imaging import write_json
from .scheduler_names import SCHEDULER_METHODS, check_scheduler
from .seeding import initial_noise_description

if TYPE_CHECKING:  # pragma: no cover - typing only; keeps JAX out of this module's imports
    from .pipeline import BrainLDM

__all__ = [
    "REFERENCE",
    "SOFTWARE",
    "software_versions",
    "grid_convention",
    "conditioning_document",
    "described_conditioning",
    "json_normal",
    "sampler_settings",
    "write_conditioning",
    "read_conditioning",
    "synthesis_sidecar",
    "decode_sidecar",
    "encode_report",
]

SOFTWARE: tuple[str, ...] = (
    "brain_ldm_nodes", "jax", "jaxlib", "equinox", "numpy", "nibabel", "nipype",
)
"""Distributions whose versions every sidecar records."""

REFERENCE = (
    "Pinaya et al. 2022, Brain imaging generation with latent diffusion models, arXiv:2209.07162"
)
INTENSITY_NOTE = (
    "approximately [0, 1] (the training images were min-max scaled per image); not clipped"
)


def software_versions(packages: Sequence[str] = SOFTWARE) -> dict[str, str | None]:
    """``{distribution: version}`` from the installed metadata; ``None`` if not installed."""
    versions: dict[str, str | None] = {}
    for name in packages:
        if name == "brain_ldm_nodes":
            versions[name] = __version__
            continue
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def software_versions_text() -> str:
    """The BIDS ``SoftwareVersions`` value, a string: ``"brain_ldm_nodes 0.1.0, jax 0.10.2, …"``
    (BIDS refuses an object there; sidecars keep the mapping as ``SoftwarePackages``)."""
    return ", ".join(f"{name} {version or 'not installed'}"
                     for name, version in software_versions().items())


def grid_convention(shape: Sequence[int], voxel_size_mm: float = 1.0) -> dict[str, Any]:
    """The voxel grid of an image written by this package: shape, LAS, voxel size, affine."""
    shape = [int(size) for size in shape]
    return {
        "Shape": shape,
        "VoxelSizeMM": float(voxel_size_mm),
        "Orientation": "".join(MODEL_ORIENTATION),
        "Affine": model_affine(shape, voxel_size_mm).tolist(),
        "Origin": (
            "centred: the grid centre, voxel (n - 1) / 2 on every axis, is at world (0, 0, 0) mm. "
            "Not MNI coordinates: the upstream grid's MNI origin is unpublished."
        ),
    }


# --------------------------------------------------------------------------- conditioning JSON


def conditioning_document(
    conditioning: Conditioning, policy: DemographicsPolicy | None = None
) -> dict[str, Any]:
    """The conditioning JSON: ``conditioning`` (4 floats), ``order``, ``record``, ``policy``."""
    document: dict[str, Any] = {
        "conditioning": list(conditioning.values),
        "order": list(CONDITIONING_ORDER),
        "record": dict(conditioning.record),
    }
    if policy is not None:
        document["policy"] = policy.to_dict()
    return document


def write_conditioning(
    conditioning: Conditioning,
    path: str | os.PathLike[str],
    policy: DemographicsPolicy | None = None,
) -> Path:
    """Write :func:`conditioning_document` to ``path`` atomically; returns the path."""
    return write_json(conditioning_document(conditioning, policy), path)


def read_conditioning(path: str | os.PathLike[str]) -> Conditioning:
    """Read a conditioning JSON written by :func:`write_conditioning`.

    Raises ``ValueError`` naming the file if it is not JSON, lacks 4 finite ``conditioning``
    values, or its ``order`` is not ``[sex, age, ventricular_volume, brain_volume]``.
    """
    source = Path(path)
    try:
        document = json.loads(source.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{source}: cannot read the conditioning JSON ({exc})") from exc
    if not isinstance(document, Mapping) or "conditioning" not in document:
        raise ValueError(f"{source}: expected a JSON object with a 'conditioning' list")
    order = document.get("order", list(CONDITIONING_ORDER))
    if list(order) != list(CONDITIONING_ORDER):
        raise ValueError(
            f"{source}: order {list(order)} is not {list(CONDITIONING_ORDER)}, the network's order"
        )
    values = document["conditioning"]
    if not isinstance(values, list) or len(values) != len(CONDITIONING_ORDER):
        raise ValueError(f"{source}: 'conditioning' must be a list of 4 numbers, got {values!r}")
    try:
        return Conditioning(tuple(values), dict(document.get("record") or {}))
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}") from exc


# --------------------------------------------------------------------------- sidecars


def json_normal(value: Any) -> Any:
    """``value`` as it reads back from a JSON sidecar (tuples become lists, keys strings)."""
    return json.loads(json.dumps(value, sort_keys=True))


def described_conditioning(conditioning: Conditioning) -> dict[str, Any]:
    """A sidecar's conditioning record (``Conditioning``, ``ConditioningFrom``/``To``): the
    4 ``Values`` in ``Order``, their ``Derivation`` (when the conditioning has a record) and
    ``OutsideUnitRange``, the names of values outside [0, 1] (extrapolation)."""
    values = [float(v) for v in conditioning.values]
    described: dict[str, Any] = {"Values": values, "Order": list(CONDITIONING_ORDER)}
    if conditioning.record:
        described["Derivation"] = dict(conditioning.record)
    described["OutsideUnitRange"] = [
        name for name, value in zip(CONDITIONING_ORDER, values) if not 0.0 <= value <= 1.0
    ]
    return described


def sampler_settings(
    num_inference_steps: int, schedule: Mapping[str, Any], scheduler: str | None = None
) -> dict[str, Any]:
    """A sidecar's ``Sampler`` settings that decide the voxels: ``NumInferenceSteps``, the β
    ``Scheduler`` (``DDIMSchedulerConfig.to_dict()``) and, for a sampled image, the
    ``scheduler`` name (``Name``) and what it runs (``Method``)."""
    named: dict[str, Any] = {}
    if scheduler is not None:
        named = {"Name": check_scheduler(scheduler), "Method": SCHEDULER_METHODS[scheduler]}
    return {**named, "NumInferenceSteps": int(num_inference_steps), "Scheduler": dict(schedule)}



def _model_provenance(model: BrainLDM) -> dict[str, Any]:
    return {
        "Source": dict(model.source) or {"note": "in-memory model (no bundle)"},
        "Reference": REFERENCE,
        "NativeImageShape": list(model.image_shape),
    }


def synthesis_sidecar(
    model: BrainLDM,
    *,
    conditioning: Conditioning,
    seed: int,
    num_inference_steps: int,
    image_shape: Sequence[int],
    scheduler: str = "ddim",
) -> dict[str, Any]:
    """JSON sidecar of an image from ``model.sample(conditioning, [seed], ..., scheduler=...)``.

    Records the conditioning (values, order, derivation record when it has one, and which
    values lie outside [0, 1], i.e. extrapolation), the seed and its PRNG mapping, the sampler
    (``Sampler.Name`` the ``scheduler`` name, ``Sampler.Method`` what it runs, the β schedule),
    the model's source (bundle ids, revisions, weights sha256), software versions and
    the grid convention (:func:`grid_convention`).
    """
    shape = [int(size) for size in image_shape]
    return {
        "Synthetic": True,
        "Description": (
            "Synthetic T1-weighted brain MRI sampled from the Brain LDM, a conditional latent "
            "diffusion model trained on UK Biobank T1w images; not an acquired image."
        ),
        "Conditioning": described_conditioning(conditioning),
        "Seed": int(seed),
        "Sampler": {
            **sampler_settings(num_inference_steps, model.scheduler.to_dict(), scheduler),
            "InitialNoise": initial_noise_description(),
            "LatentShape": list(model.latent_shape(shape)),
        },
        "Model": _model_provenance(model),
        "Intensity": INTENSITY_NOTE,
        "Grid": grid_convention(shape),
        "SoftwareVersions": software_versions_text(),
        "SoftwarePackages": software_versions(),
    }


def decode_sidecar(
    model: BrainLDM, *, latent_file: str | os.PathLike[str], image_shape: Sequence[int]
) -> dict[str, Any]:
    """JSON sidecar of an image decoded from a latent NIfTI by ``model.decode``."""
    return {
        "Synthetic": True,
        "Description": (
            "T1-weighted image decoded by the Brain LDM autoencoder from a latent; "
            "model output, not an acquired image."
        ),
        "Sources": [os.fspath(latent_file)],
        "Model": _model_provenance(model),
        "Intensity": INTENSITY_NOTE,
        "Grid": grid_convention(image_shape),
        "SoftwareVersions": software_versions_text(),
        "SoftwarePackages": software_versions(),
    }


def encode_report(
    model: BrainLDM,
    *,
    in_file: str | os.PathLike[str],
    preparation: Mapping[str, Any],
    latent_shape: Sequence[int],
    z_sigma: np.ndarray,
) -> dict[str, Any]:
    """JSON report of ``model.encode``: how the input was prepared, the latent, the model."""
    sigma = np.asarray(z_sigma, dtype=np.float64)
    return {
        "Sources": [os.fspath(in_file)],
        "Preparation": dict(preparation),
        "LatentShape": [int(size) for size in latent_shape],
        "Latent": "z_mu, the posterior mean (deterministic encoding); z_sigma alongside",
        "LatentSigmaRange": [float(sigma.min()), float(sigma.max())],
        "Model": _model_provenance(model),
        "SoftwareVersions": software_versions_text(),
        "SoftwarePackages": software_versions(),
    }


# --------------------------------------------------------------------------- counterfactuals


def reconstruction_error(
    reconstruction: np.ndarray,
    image: np.ndarray,
    reconstructed_latent: np.ndarray,
    latent: np.ndarray,
) -> dict[str, Any]:
    """How far DDIM inversion + regeneration under the same conditioning lands from the input.

    Image errors are in image intensity units (the conformed input is min-max scaled to
    [0, 1]); the latent error is ``||reconstructed_latent - latent|| / ||latent||`` (Frobenius
    norms over the whole latent). Computed in float64.
    """
    diff = np.asarray(reconstruction, np.float64) - np.asarray(image, np.float64)
    latent64 = np.asarray(latent, np.float64)
    latent_diff = np.asarray(reconstructed_latent, np.float64) - latent64
    latent_norm = float(np.linalg.norm(latent64))
    return {
        "ImageMaxAbs": float(np.abs(diff).max()),
        "ImageRMS": float(np.sqrt(np.mean(diff**2))),
        "ImageUnits": "image intensity of the conformed input (min-max scaled to [0, 1])",
        "LatentRelative": (
            float(np.linalg.norm(latent_diff)) / latent_norm if latent_norm > 0 else float("nan")
        ),
        "LatentMaxAbs": float(np.abs(latent_diff).max()),
        "Note": (
            "reconstruction = decode(denoise(invert(encode(input), from), from)); the image "
            "error includes the autoencoder's own reconstruction error, the latent error only "
            "the DDIM inversion's (it shrinks with more steps)"
        ),
    }


def counterfactual_sidecar(
    model: BrainLDM,
    *,
    in_file: str | os.PathLike[str],
    preparation: Mapping[str, Any],
    conditioning_from: Conditioning,
    conditioning_to: Conditioning,
    num_inference_steps: int,
    image_shape: Sequence[int],
    error: Mapping[str, Any],
) -> dict[str, Any]:
    """JSON sidecar of a counterfactual from ``model.counterfactual`` (DDIM inversion).

    Records the source image and how it was prepared, both conditionings (values, order,
    derivation records, extrapolation), the DDIM settings, the reconstruction error
    (:func:`reconstruction_error`), the model's source, software versions and the grid.
    """
    shape = [int(size) for size in image_shape]
    return {
        "Synthetic": True,
        "Description": (
            "Counterfactual T1-weighted brain MRI from the Brain LDM: the source image was "
            "encoded, its DDIM trajectory inverted to noise under ConditioningFrom, and sampled "
            "forward under ConditioningTo. Model output, not an acquired image."
        ),
        "Sources": [os.fspath(in_file)],
        "Preparation": dict(preparation),
        "ConditioningFrom": described_conditioning(conditioning_from),
        "ConditioningTo": described_conditioning(conditioning_to),
        "Sampler": {
            "Method": "DDIM inversion then DDIM sampling, eta = 0, same schedule and steps",
            **sampler_settings(num_inference_steps, model.scheduler.to_dict()),
            "Latent": "z_mu, the posterior mean of the encoded source (deterministic)",
            "LatentShape": list(model.latent_shape(shape)),
        },
        "ReconstructionError": dict(error),
        "Model": _model_provenance(model),
        "Intensity": INTENSITY_NOTE,
        "Grid": grid_convention(shape),
        "SoftwareVersions": software_versions_text(),
        "SoftwarePackages": software_versions(),
    }


__all__ += ["reconstruction_error", "counterfactual_sidecar"]
