"""Traits and helpers shared by the interfaces (no logic of their own)."""

from __future__ import annotations

from nipype.interfaces.base import isdefined, traits

from ..model_cache import get_model
from ..pipeline import BrainLDM


def model_trait() -> traits.Str:
    return traits.Str(
        mandatory=True,
        desc="Brain LDM model: a local brain_ldm.1 bundle folder or a Hugging Face Hub repo id "
        "(loaded once per process by brain_ldm_nodes.model_cache.get_model)",
    )


def revision_trait() -> traits.Str:
    return traits.Str(
        desc="Hub branch, tag or commit hash of `model` (ignored for local folders); "
        "default: the repo's default branch",
    )


def cached_model(inputs: object) -> BrainLDM:
    """The interface's model from the per-process cache (``inputs.model``, ``inputs.revision``)."""
    revision = inputs.revision if isdefined(inputs.revision) else None
    return get_model(inputs.model, revision)
