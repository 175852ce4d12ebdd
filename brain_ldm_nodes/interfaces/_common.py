"""Traits and helpers shared by the interfaces (no logic of their own)."""

from __future__ import annotations

import os

from nipype.interfaces.base import File, isdefined, traits
from traits.api import TraitError

from ..annex import not_retrieved, retrieve_hint
from ..model_cache import absolute_model_name, get_model
from ..pipeline import BrainLDM


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
        "config.json give them (brain_ldm_nodes.derivatives.ModelIdentity.checksum). Optional: "
        "when given it is part of Nipype's hash, so the node runs again if those weights change "
        "(a bundle re-converted in place), and it must match the loaded model",
    )


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
