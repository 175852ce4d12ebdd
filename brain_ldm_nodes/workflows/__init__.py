"""Nipype workflows built from :mod:`brain_ldm_nodes.interfaces` (``init_*_wf`` builders)."""

from .autoencoder import init_encode_decode_wf
from .synthesis import init_synthesis_wf

__all__ = ["init_encode_decode_wf", "init_synthesis_wf"]
