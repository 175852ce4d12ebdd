"""brain-ldm-nodes: the Brain LDM (Pinaya et al. 2022) in JAX/Equinox, for neuroimaging pipelines.

Importing this package never imports torch, MONAI or Nipype, and imports JAX only when a
model, network or scheduler name is first used (so ``brain_ldm_nodes.bids_app.participants`` or
``brain_ldm_nodes.demographics`` stay light).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

_EXPORTS = {
    "AutoencoderKL": "models",
    "AutoencoderKLConfig": "models",
    "DiffusionModelUNet": "models",
    "DiffusionModelUNetConfig": "models",
    "BrainLDM": "pipeline",
    "CONDITIONING_ORDER": "conditioning",
    "IMAGE_SHAPE": "pipeline",
    "initial_noise": "pipeline",
    "DDIMSchedulerConfig": "scheduler",
    "SCHEDULERS": "scheduler_names",
}

__all__ = sorted([*_EXPORTS, "__version__"])

if TYPE_CHECKING:  # pragma: no cover
    from .models import AutoencoderKL, AutoencoderKLConfig, DiffusionModelUNet, DiffusionModelUNetConfig
    from .conditioning import CONDITIONING_ORDER
    from .pipeline import IMAGE_SHAPE, BrainLDM, initial_noise
    from .scheduler import DDIMSchedulerConfig
    from .scheduler_names import SCHEDULERS


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'brain_ldm_nodes' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
