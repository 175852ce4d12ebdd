"""brain-ldm-nodes: the Brain LDM (Pinaya et al. 2022) in JAX/Equinox, for neuroimaging pipelines.

Importing this package never imports torch, MONAI or Nipype.
"""

from ._version import __version__
from .models import AutoencoderKL, AutoencoderKLConfig, DiffusionModelUNet, DiffusionModelUNetConfig
from .pipeline import CONDITIONING_ORDER, IMAGE_SHAPE, BrainLDM, initial_noise
from .scheduler import DDIMSchedulerConfig

__all__ = [
    "AutoencoderKL",
    "AutoencoderKLConfig",
    "BrainLDM",
    "CONDITIONING_ORDER",
    "DDIMSchedulerConfig",
    "DiffusionModelUNet",
    "DiffusionModelUNetConfig",
    "IMAGE_SHAPE",
    "__version__",
    "initial_noise",
]
