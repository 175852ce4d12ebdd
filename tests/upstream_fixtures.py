"""Upstream-format checkpoints and Hugging Face cache layouts, built for tests (no network).

The ``.pt`` files are what the MONAI bundle ships: ``torch.save`` of a float32 state dict in
the **old MONAI-Generative key names**. The renaming below is written independently of the
package's mapping table (UPSTREAM.md §5), so a wrong table fails the tests.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import torch

from brain_ldm_nodes import AutoencoderKLConfig, DiffusionModelUNetConfig

from monai_oracle import monai_autoencoder, monai_unet


def to_old_monai_names(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Current MONAI names → the MONAI-Generative names of the released checkpoints."""
    old = {}
    for name, tensor in state_dict.items():
        name = re.sub(r"(transformer_blocks\.\d+\.attn[12])\.out_proj\.", r"\1.to_out.0.", name)
        name = re.sub(r"^(decoder\.blocks\.\d+)\.postconv\.conv\.", r"\1.conv.conv.", name)
        old[name] = tensor
    return old


def write_upstream_checkpoints(
    folder: Path,
    vae_config: AutoencoderKLConfig,
    unet_config: DiffusionModelUNetConfig,
    *,
    seed: int = 0,
):
    """``(autoencoder.pt, model.pt, monai_vae, monai_unet)`` with perturbed random weights."""
    folder.mkdir(parents=True, exist_ok=True)
    vae = monai_autoencoder(vae_config, seed=seed)
    unet = monai_unet(unet_config, seed=seed + 1)
    autoencoder_pt, model_pt = folder / "autoencoder.pt", folder / "model.pt"
    torch.save(to_old_monai_names(vae.state_dict()), autoencoder_pt)
    torch.save(to_old_monai_names(unet.state_dict()), model_pt)
    return autoencoder_pt, model_pt, vae, unet


def write_config_json(path: Path, config) -> Path:
    path.write_text(json.dumps(config.to_dict()))
    return path


def publish_to_hf_cache(cache_dir: Path, repo_id: str, folder: Path, commit: str, *, ref: str | None = "main") -> Path:
    """Lay ``folder`` out in ``cache_dir`` as huggingface_hub's cache does after a download:
    ``models--{org}--{name}/blobs/<etag>``, ``snapshots/<commit>/<file> -> ../../blobs/<etag>``,
    ``refs/<ref>`` holding the commit. (``scan_cache_dir`` is used in tests to confirm it.)"""
    repo_dir = cache_dir / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for file in sorted(folder.iterdir()):
        etag = hashlib.sha256(file.read_bytes()).hexdigest()
        blob = repo_dir / "blobs" / etag
        if not blob.exists():
            shutil.copyfile(file, blob)
        link = snapshot / file.name
        if link.exists() or link.is_symlink():
            link.unlink()
        os.symlink(os.path.relpath(blob, snapshot), link)
    if ref is not None:
        (repo_dir / "refs").mkdir(exist_ok=True)
        (repo_dir / "refs" / ref).write_text(commit)
    return snapshot
