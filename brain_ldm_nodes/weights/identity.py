"""A model's identity from its bundles, without loading weights (no JAX at import).

:func:`resolve_model_bundles` is the one place that turns a model name (a ``brain_ldm.1``
bundle folder or a Hugging Face Hub repo id) into its bundle and base VAE bundle:
:meth:`brain_ldm_nodes.pipeline.BrainLDM.from_pretrained` loads the networks from what it
finds, :meth:`ModelIdentity.resolve` (the BIDS App, which plans before any node loads the
model) reads only the configs and checks the weights files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - typing only; bundle imports JAX
    from .bundle import ModelBundleConfig, VAEBundleConfig

__all__ = ["ModelBundles", "ModelIdentity", "resolve_model_bundles"]


@dataclass(frozen=True)
class ModelBundles:
    """A ``brain_ldm.1`` bundle and its base ``brain_ldm.vae`` bundle, found and parsed."""

    name: str
    revision: str | None
    folder: Path
    config: ModelBundleConfig
    vae_folder: Path
    vae_config: VAEBundleConfig

    def source(self) -> dict[str, Any]:
        """Where the weights came from (ids, revisions, folders, sha256): ``BrainLDM.source``,
        recorded as ``Model.Source`` in every sidecar."""
        base = self.config.base
        return {
            "model": {"id": self.name, "revision": self.revision, "folder": str(self.folder),
                      "weights_sha256": self.config.weights_sha256},
            "vae": {"id": base.repo_id or base.path, "revision": base.revision,
                    "folder": str(self.vae_folder),
                    "weights_sha256": self.vae_config.weights_sha256},
        }


def resolve_model_bundles(
    repo_id_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
    token: str | bool | None = None,
    needed_by: str = "BrainLDM.from_pretrained",
    shown_as: str | None = None,
) -> ModelBundles:
    """Find the ``brain_ldm.1`` bundle ``repo_id_or_path`` and its base VAE bundle and read
    their configs (weights are neither read nor checked here).

    ``needed_by`` names the caller in the error for a VAE bundle given alone (``--model``);
    ``shown_as`` is how errors name the model (default: ``repo_id_or_path``).

    Raises:
        brain_ldm_nodes.weights.bundle.BundleError: one line naming the bundle and the reason
            (missing, not in the Hub cache while offline, not a bundle, of the wrong type,
            unreadable).
    """
    from . import bundle

    shown = repo_id_or_path if shown_as is None else shown_as
    hub = {"cache_dir": cache_dir, "local_files_only": local_files_only, "token": token}
    folder = bundle.resolve_bundle(repo_id_or_path, revision=revision, **hub)
    config = bundle.read_bundle_config(folder)
    if not isinstance(config, bundle.ModelBundleConfig):
        raise bundle.BundleError(
            f"{shown}: is a {config.bundle_type} bundle (the autoencoder alone); {needed_by} "
            f"needs a {bundle.MODEL_BUNDLE} bundle, which names the autoencoder as its base"
        )
    vae_folder = bundle.resolve_base(folder, config.base, **hub)
    vae_config = bundle.read_bundle_config(vae_folder)
    if not isinstance(vae_config, bundle.VAEBundleConfig):
        raise bundle.BundleError(
            f"{vae_folder}: the base of {shown} must be a {bundle.VAE_BUNDLE} bundle, "
            f"found {vae_config.bundle_type}"
        )
    return ModelBundles(os.fspath(repo_id_or_path), revision, Path(folder), config,
                        Path(vae_folder), vae_config)


@dataclass(frozen=True)
class ModelIdentity:
    """What a run needs to know about the model without loading its weights.

    ``model`` is what the nodes load (an absolute bundle folder, or a Hub repo id);
    the sha256 sums, scheduler and grid come from the bundles' ``config.json``.
    """

    model: str
    revision: str | None
    folder: Path
    unet_sha256: str
    vae_sha256: str
    scheduler: Mapping[str, Any]
    image_shape: tuple[int, int, int]

    @classmethod
    def resolve(
        cls, model: str, revision: str | None = None, *, local_files_only: bool | None = True,
        verify: bool = True,
    ) -> ModelIdentity:
        """Find the ``brain_ldm.1`` bundle and its base VAE bundle
        (:func:`resolve_model_bundles`); read their configs and, with ``verify``, check each
        weights file against its sha256 once (hashed only when no verification record says
        this very file matched; see :func:`brain_ldm_nodes.weights.bundle.verify_weights_file`).

        Raises :class:`brain_ldm_nodes.weights.bundle.BundleError` (one line) when a bundle
        is missing (not in the Hugging Face cache while offline), not a bundle, of the wrong
        type, unreadable, or lacks its weights file or its weights do not match.
        """
        from . import bundle

        candidate = Path(model).expanduser()
        name = str(candidate.resolve()) if candidate.is_dir() else str(model)
        found = resolve_model_bundles(name, revision=revision, local_files_only=local_files_only,
                                      needed_by="--model", shown_as=str(model))
        for where, config in ((found.folder, found.config), (found.vae_folder, found.vae_config)):
            bundle.check_weights_file(where, config, verify=verify)
        return cls(
            model=name,
            revision=revision,
            folder=found.folder,
            unet_sha256=found.config.weights_sha256,
            vae_sha256=found.vae_config.weights_sha256,
            scheduler=json.loads(json.dumps(found.config.scheduler.to_dict(), sort_keys=True)),
            image_shape=tuple(int(size) for size in found.config.image_shape),
        )

    @property
    def checksum(self) -> str:
        """``'<U-Net sha256>:<autoencoder sha256>'``: the nodes' ``model_checksum``."""
        return f"{self.unet_sha256}:{self.vae_sha256}"

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler["num_train_timesteps"])
