"""Upstream MONAI ``.pt`` checkpoints → ``brain_ldm.vae`` + ``brain_ldm.1`` bundles, torch-free.

Tensors stay memory-mapped from the ``.pt`` file until safetensors serialises them, and no
network is built: names are mapped (:mod:`.mapping`) and checked against a shape-only skeleton.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
from pathlib import Path

import numpy as np

from .._version import __version__
from ..models.autoencoder import AutoencoderKLConfig
from ..models.unet import DiffusionModelUNetConfig
from ..scheduler import DDIMSchedulerConfig
from .bundle import MODEL_BUNDLE, VAE_BUNDLE, BaseReference, save_model_bundle, save_vae_bundle
from .mapping import WeightMappingError, rename_monai_state_dict
from .torch_checkpoint import CheckpointError, file_md5, read_state_dict

LOGGER = logging.getLogger(__name__)

#: md5 of the released files (UPSTREAM.md §5).
UPSTREAM_MD5 = {
    "autoencoder": "329e97b3085643ff235f11f049856242",
    "unet": "21c3047556fb671caf0556f1cce6ef22",
}


class ConversionError(ValueError):
    """An upstream checkpoint cannot be converted; the message names the file and the reason."""


@dataclasses.dataclass(frozen=True)
class ConvertedBundles:
    vae: Path
    model: Path
    upstream_match: dict[str, bool]


def _read_float32_state_dict(path: Path, role: str) -> tuple[dict[str, np.ndarray], dict[str, object]]:
    try:
        state_dict = read_state_dict(path)
    except CheckpointError as error:
        raise ConversionError(str(error)) from None
    wrong = sorted(f"{name} ({array.dtype})" for name, array in state_dict.items() if array.dtype != np.float32)
    if wrong:
        shown = ", ".join(wrong[:5]) + (f", … ({len(wrong) - 5} more)" if len(wrong) > 5 else "")
        raise ConversionError(f"{path}: expected float32 tensors only (as released); found {shown}")
    md5 = file_md5(path)
    matches = md5 == UPSTREAM_MD5[role]
    if matches:
        LOGGER.info("%s: md5 %s matches the released %s checkpoint", path, md5, role)
    else:
        LOGGER.warning(
            "%s: md5 %s is not the released %s checkpoint's (%s); converting anyway "
            "(expected for your own or test weights)", path, md5, role, UPSTREAM_MD5[role],
        )
    provenance = {"file": path.name, "md5": md5, "is_released_checkpoint": matches,
                  "tensors": len(state_dict)}
    return state_dict, provenance


def convert_upstream(
    autoencoder_pt: str | os.PathLike,
    unet_pt: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    autoencoder_config: AutoencoderKLConfig | None = None,
    unet_config: DiffusionModelUNetConfig | None = None,
    scheduler: DDIMSchedulerConfig | None = None,
    base_repo_id: str | None = None,
    base_revision: str | None = None,
) -> ConvertedBundles:
    """Convert the MONAI bundle's ``models/autoencoder.pt`` and ``models/model.pt``.

    Writes ``output_dir/brain_ldm.vae`` and ``output_dir/brain_ldm.1``; the latter refers to
    the former by relative path and, if given, by ``base_repo_id``/``base_revision`` (the repo
    you will publish the VAE bundle to). Configs default to the released architecture.

    Raises:
        ConversionError: unreadable or unsafe checkpoint, non-float32 tensors, or keys that do
            not fit the architecture (all listed).
    """
    output_dir = Path(output_dir)
    autoencoder_pt, unet_pt = Path(autoencoder_pt), Path(unet_pt)
    autoencoder_config = autoencoder_config or AutoencoderKLConfig()
    unet_config = unet_config or DiffusionModelUNetConfig()
    scheduler = scheduler or DDIMSchedulerConfig()
    when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    common = {"converter": f"brain-ldm-nodes {__version__}", "converted_at": when,
              "upstream": "MONAI model zoo: brain_image_synthesis_latent_diffusion_model"}

    records = {}
    states = {}
    for role, path in (("autoencoder", autoencoder_pt), ("unet", unet_pt)):
        state_dict, record = _read_float32_state_dict(path, role)
        try:
            states[role] = rename_monai_state_dict(state_dict, source=str(path))
        except WeightMappingError as error:
            raise ConversionError(str(error)) from None
        records[role] = record

    try:
        vae_folder = save_vae_bundle(
            output_dir / VAE_BUNDLE, autoencoder_config, states["autoencoder"],
            provenance={**common, "source": records["autoencoder"]},
        )
        base = BaseReference(repo_id=base_repo_id, revision=base_revision, path=f"../{VAE_BUNDLE}")
        model_folder = save_model_bundle(
            output_dir / MODEL_BUNDLE, unet_config, states["unet"], scheduler, base,
            provenance={**common, "source": records["unet"]},
        )
    except WeightMappingError as error:
        raise ConversionError(str(error)) from None
    return ConvertedBundles(
        vae_folder, model_folder,
        {role: bool(record["is_released_checkpoint"]) for role, record in records.items()},
    )
