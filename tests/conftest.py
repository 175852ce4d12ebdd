"""Fixtures shared by the test modules, each made once per session.

- ``tiny_model``: the tiny random-weight ``brain_ldm.1`` bundle folder on disk (its VAE bundle
  beside it), for the nodes, workflows and the BIDS App.
- ``finished_run``: ds-minimal and a finished participant run of it with ``tiny_model``.
- ``tiny_oracle``: a tiny MONAI autoencoder and U-Net (the oracle, perturbed random weights)
  and our ``BrainLDM`` holding the same weights, for parity tests.

The helpers they use are imported when a fixture is first requested: a module that needs none
of them imports no Nipype, JAX or PyTorch on this file's account.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import pytest

# Make the test-only helpers (the MONAI oracle, the App helpers) importable as top-level modules.
sys.path.insert(0, str(Path(__file__).parent))

if TYPE_CHECKING:
    from brain_ldm_nodes import BrainLDM


class TinyOracle(NamedTuple):
    """Our tiny model and the MONAI modules whose weights it holds."""

    model: BrainLDM
    monai_vae: Any  # monai.networks.nets.AutoencoderKL
    monai_unet: Any  # monai.networks.nets.DiffusionModelUNet


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny bundle folder (16³ native grid, random weights), made once per session by
    ``workflows/make_tiny_bundle.py`` at a fixed place under the session's base temp."""
    from test_interfaces import build_tiny_bundle

    return build_tiny_bundle(tmp_path_factory)


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> tuple[Path, Path]:
    """``(dataset, output)``: ds-minimal and a finished participant run of it (3 images) with
    ``tiny_model``. Shared by every test of the session: copy them before changing anything."""
    from bids_app_support import completed_output

    return completed_output(tmp_path_factory, tiny_model)


@pytest.fixture(scope="session")
def tiny_oracle() -> TinyOracle:
    """A tiny MONAI autoencoder (3 levels of 32 channels, factor 4) and U-Net (32/64/64
    channels, attention at the two lower levels), perturbed (seeds 11 and 12), and our
    ``BrainLDM`` with the same weights; its image grid 32 × 48 × 16 (latent 3 × 8 × 12 × 4)."""
    import equinox as eqx
    import jax

    from brain_ldm_nodes import (
        AutoencoderKL,
        AutoencoderKLConfig,
        BrainLDM,
        DiffusionModelUNet,
        DiffusionModelUNetConfig,
    )
    from brain_ldm_nodes.weights.mapping import load_monai_state_dict
    from monai_oracle import monai_autoencoder, monai_unet, state_dict_numpy

    vae_config = AutoencoderKLConfig(channels=(32, 32, 32), num_res_blocks=(1, 1, 1))
    unet_config = DiffusionModelUNetConfig(
        channels=(32, 64, 64), num_res_blocks=(1, 1, 1), num_head_channels=(0, 64, 64)
    )
    monai_vae = monai_autoencoder(vae_config, seed=11)
    monai_net = monai_unet(unet_config, seed=12)
    key = jax.random.key(0)
    vae = load_monai_state_dict(eqx.filter_eval_shape(AutoencoderKL, vae_config, key=key),
                                state_dict_numpy(monai_vae))
    unet = load_monai_state_dict(eqx.filter_eval_shape(DiffusionModelUNet, unet_config, key=key),
                                 state_dict_numpy(monai_net))
    model = BrainLDM(vae, unet, image_shape=(32, 48, 16))  # multiples of 4 (VAE) × 4 (U-Net)
    return TinyOracle(model, monai_vae, monai_net)
