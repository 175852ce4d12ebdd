"""Nipype workflows built from :mod:`brain_ldm_nodes.interfaces` (``init_*_wf`` builders)."""

from .autoencoder import init_encode_decode_wf
from .bids import init_brain_ldm_bids_wf, init_single_subject_wf
from .counterfactual import init_counterfactual_wf
from .registration import init_t1w_to_model_grid_wf
from .synthesis import init_synthesis_wf

__all__ = [
    "init_brain_ldm_bids_wf",
    "init_counterfactual_wf",
    "init_encode_decode_wf",
    "init_single_subject_wf",
    "init_synthesis_wf",
    "init_t1w_to_model_grid_wf",
]
