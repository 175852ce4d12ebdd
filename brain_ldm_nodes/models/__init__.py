"""The Brain LDM networks in JAX + Equinox: pure functions of arrays, no files, no Nipype."""

from .autoencoder import AutoencoderKL, AutoencoderKLConfig
from .unet import DiffusionModelUNet, DiffusionModelUNetConfig

__all__ = ["AutoencoderKL", "AutoencoderKLConfig", "DiffusionModelUNet", "DiffusionModelUNetConfig"]
