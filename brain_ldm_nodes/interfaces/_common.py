"""Traits, spec bases and helpers shared by the interfaces (the T1w preparation included)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.affines import voxel_sizes
from nipype.interfaces.base import BaseInterfaceInputSpec, File, TraitedSpec, isdefined, traits
from traits.api import TraitError

from ..annex import not_retrieved, retrieve_hint
from ..conditioning import Conditioning
from ..grid import MODEL_ORIENTATION
from ..model_cache import absolute_model_name, get_model
from ..pipeline import BrainLDM
from ..provenance import read_conditioning


class ModelName(traits.BaseStr):
    """A model input: a bundle folder, made absolute when the input is set (Nipype runs each
    node in its own working folder, where a relative path means nothing), or a Hub repo id
    (kept as given). ``os.PathLike`` values are accepted."""

    info_text = "a brain_ldm.1 bundle folder or a Hugging Face Hub repo id"

    def validate(self, obj: object, name: str, value: object) -> str:
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        return absolute_model_name(super().validate(obj, name, value))


class InputImage(File):
    """An existing input file; a git-annex/DataLad link without content is refused with the
    file and ``datalad get`` named (annexed links with content are read through the link)."""

    def validate(self, objekt: object, name: str, value: object, return_pathlike: bool = False):
        if isinstance(value, (str, os.PathLike)) and not_retrieved(value):
            raise TraitError(f"input {name!r}: {retrieve_hint(value)}")
        return super().validate(objekt, name, value, return_pathlike)


def model_trait() -> ModelName:
    return ModelName(
        mandatory=True,
        desc="Brain LDM model: a local brain_ldm.1 bundle folder (a relative path is made "
        "absolute against the current directory when the input is set) or a Hugging Face Hub "
        "repo id (loaded once per process by brain_ldm_nodes.model_cache.get_model)",
    )


def revision_trait() -> traits.Str:
    return traits.Str(
        desc="Hub branch, tag or commit hash of `model` (ignored for local folders); "
        "default: the repo's default branch",
    )


def model_checksum_trait() -> traits.Str:
    return traits.Str(
        desc="the weights behind `model`, '<U-Net sha256>:<autoencoder sha256>' as the bundles' "
        "config.json give them (brain_ldm_nodes.weights.identity.ModelIdentity.checksum). "
        "Optional: when given it is part of Nipype's hash, so the node runs again if those "
        "weights change (a bundle re-converted in place), and it must match the loaded model",
    )


class ModelInputSpec(BaseInterfaceInputSpec):
    """Inputs of every node that runs the model: which model, at which revision, which weights."""

    model = model_trait()
    revision = revision_trait()
    model_checksum = model_checksum_trait()


def out_prefix_trait(default: str, files: str) -> traits.Str:
    """The file name stem of a node's outputs; ``files`` lists them, e.g. "<out_prefix>.nii.gz"."""
    return traits.Str(
        default, usedefault=True, desc=f"file name stem in the node's working directory: {files}"
    )


# --------------------------------------------------------------------------- conditioning

_VALUES_DESC = (
    "4 normalised values [sex, age, ventricular_volume, brain_volume], each expected in [0, 1] "
    "(sex 0 = female, 1 = male; outside [0, 1] is extrapolation)"
)
CONDITIONING_FILE_DESC = (
    "conditioning JSON from NormaliseDemographics / provenance.write_conditioning "
    "('conditioning', 'order', 'record'); its derivation record goes into the sidecar"
)


def conditioning_traits(xor: list[str], what: str) -> tuple[traits.List, File]:
    """Two mandatory, mutually exclusive inputs (named by ``xor``) for one conditioning:
    4 values, or a conditioning JSON file. ``what`` says what the conditioning is for."""
    values = traits.List(
        traits.Float, minlen=4, maxlen=4, mandatory=True, xor=xor,
        desc=f"{what}: {_VALUES_DESC}",
    )
    file = File(
        exists=True, mandatory=True, xor=xor, desc=f"{what}, as a file: {CONDITIONING_FILE_DESC}"
    )
    return values, file


def conditioning_input(values: object, path: object) -> Conditioning:
    """The conditioning of a :func:`conditioning_traits` pair: the file if set, else the values."""
    if isdefined(path):
        return read_conditioning(path)
    return Conditioning(tuple(values))


def model_checksum(model: BrainLDM) -> str | None:
    """``'<U-Net sha256>:<autoencoder sha256>'`` of a model loaded from bundles, else ``None``."""
    try:
        return f"{model.source['model']['weights_sha256']}:{model.source['vae']['weights_sha256']}"
    except (KeyError, TypeError):
        return None


def cached_model(inputs: object) -> BrainLDM:
    """The interface's model from the per-process cache (``inputs.model``, ``inputs.revision``),
    checked against ``inputs.model_checksum`` when that is given."""
    revision = inputs.revision if isdefined(inputs.revision) else None
    model = get_model(inputs.model, revision)
    expected = getattr(inputs, "model_checksum", None)
    if isdefined(expected) and expected is not None:
        actual = model_checksum(model)
        if actual != expected:
            raise ValueError(
                f"model {inputs.model}: its weights are {actual}, not model_checksum {expected} "
                "(the bundle changed after the workflow was built; build it again)"
            )
    return model


# --------------------------------------------------------------------------- T1w preparation

T1W_SPACES: tuple[str, ...] = ("native", "MNI", "model-grid", "conform")
"""Values of the ``t1w_space`` input: where the T1w given to a node is."""


def t1w_space_trait() -> traits.Enum:
    return traits.Enum(
        *T1W_SPACES, usedefault=True,
        desc="where the input T1w is. 'native' (default): the scanner's space; it is rigidly "
        "registered to the MNI152 template and resampled onto the model grid "
        "(brain_ldm_nodes.registration.register_t1w). 'MNI': already in MNI152 2009 space "
        "(e.g. fMRIPrep's space-MNI152NLin2009cAsym desc-preproc T1w): resampled onto the grid "
        "without registration. 'model-grid': already on the model grid (LAS, 1 mm, sizes "
        "multiples of the model's factor, ~[0, 1]); used as stored. 'conform': no registration, "
        "only reorient/resample/centre-crop (brain_ldm_nodes.imaging.conform_t1w; for images "
        "already centred and upright, and for tests)",
    )


class PreparedT1wOutputSpec(TraitedSpec):
    """The files :func:`prepare_t1w` writes, as outputs."""

    out_conformed = File(
        exists=True,
        desc="the input on the model grid (registered, or conformed; not for t1w_space="
        "'model-grid') that was encoded: 3-D float32 NIfTI in [0, 1], 1 mm LAS",
    )
    out_transform = File(
        exists=True,
        desc="ITK text transform (MNI152 -> source world; BIDS from-T1w_to-MNI152NLin2009aSym"
        "_mode-image_xfm) when t1w_space is 'native' or 'MNI'",
    )
    out_registration = File(
        exists=True, desc="JSON record of the registration (method, template, quality)"
    )


def as_is_encoder_input(
    img: nib.spatialimages.SpatialImage, multiple: int
) -> tuple[np.ndarray, dict[str, Any]]:
    """Voxels of an image already on a model-style grid (``t1w_space='model-grid'``); a record.

    Requires LAS orientation, 1 mm voxels and sizes that are multiples of ``multiple`` (the
    autoencoder's factor, 8 for the released model); intensities are used as stored (the model
    expects ~[0, 1]). Raises ``ValueError`` saying which requirement failed.
    """
    shape = tuple(int(n) for n in img.shape)
    orientation = "".join(nib.aff2axcodes(img.affine))
    zooms = [float(z) for z in voxel_sizes(img.affine)]
    hint = "; use t1w_space='native' to register it onto the model grid"
    if orientation != "".join(MODEL_ORIENTATION):
        raise ValueError(f"t1w_space='model-grid' needs an LAS image, got {orientation}{hint}")
    if not np.allclose(zooms, 1.0, atol=1e-3):
        raise ValueError(f"t1w_space='model-grid' needs 1 mm voxels, got {zooms} mm{hint}")
    if any(size % multiple for size in shape):
        raise ValueError(
            f"t1w_space='model-grid' needs sizes that are multiples of {multiple}, got "
            f"{shape}{hint}"
        )
    data = np.asarray(img.dataobj, dtype=np.float32)
    record = {
        "method": "none (t1w_space='model-grid'): voxels used as stored, no resampling or "
        "scaling",
        "source_shape": list(shape),
        "source_zooms_mm": zooms,
        "source_orientation": orientation,
        "intensity_min": float(data.min()),
        "intensity_max": float(data.max()),
    }
    return data, record


def prepare_t1w(
    in_file: str, t1w_space: str, model: BrainLDM, multiple: int, cwd: Path
) -> tuple[np.ndarray, dict[str, Any], dict[str, str]]:
    """The T1w in ``in_file`` as model input: ``(data (D, H, W) float32, record, files)``.

    ``files`` maps output names to files written in ``cwd``: ``out_conformed`` (the input on
    the model grid, unless ``t1w_space == 'model-grid'``) and, when registered, ``out_transform``
    (ITK text transform, MNI -> source world) and ``out_registration`` (the record as JSON).
    Raises :class:`brain_ldm_nodes.registration.RegistrationError` for a failed registration.
    """
    from ..imaging import conform_t1w, load_t1w, save_t1w, write_json
    from ..registration import (
        TEMPLATE_NAME,
        register_t1w,
        resample_to_model_grid,
        write_itk_transform,
    )

    image = load_t1w(in_file)
    files: dict[str, str] = {}
    if t1w_space == "model-grid":
        data, record = as_is_encoder_input(image, multiple)
        return data, {**record, "t1w_space": t1w_space}, files
    if t1w_space == "conform":
        grid_image, record = conform_t1w(image, shape=model.image_shape)
        record["t1w_space"] = t1w_space
    else:
        try:
            result = (register_t1w if t1w_space == "native" else resample_to_model_grid)(
                image, shape=model.image_shape
            )
        except ValueError as exc:
            raise type(exc)(f"{in_file}: {exc}") from exc
        grid_image, record = result.image, dict(result.record)
        transform = write_itk_transform(
            result.transform, cwd / f"from-T1w_to-{TEMPLATE_NAME}_mode-image_xfm.txt"
        )
        files["out_transform"] = str(transform)
        record["transform_file"] = transform.name
        record["t1w_space"] = t1w_space
        files["out_registration"] = str(write_json(record, cwd / "registration.json"))
    data = np.asarray(grid_image.dataobj, dtype=np.float32)
    files["out_conformed"] = str(
        save_t1w(data, cwd / "conformed_T1w.nii.gz", description="Brain LDM T1w on model grid")
    )
    return data, record, files


def model_and_t1w(
    inputs: object, cwd: Path, *, invertible: bool
) -> tuple[BrainLDM, np.ndarray, dict[str, Any], dict[str, str]]:
    """A node's model (:func:`cached_model`) and its ``in_file`` prepared as model input in
    ``t1w_space`` (:func:`prepare_t1w`): ``(model, data, record, files)``. With
    ``invertible``, sizes must suit sampling and inversion (multiples of
    ``model.image_multiple``), else only the autoencoder (its downsampling factor)."""
    model = cached_model(inputs)
    multiple = model.image_multiple if invertible else model.vae.config.downsampling_factor
    return (model, *prepare_t1w(inputs.in_file, inputs.t1w_space, model, multiple, cwd))
