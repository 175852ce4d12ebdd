"""Nipype workflows built from :mod:`brain_ldm_nodes.interfaces` (``init_*_wf`` builders).

Generic: nothing here knows BIDS (the BIDS App's workflow is
:mod:`brain_ldm_nodes.bids_app.workflow`)."""

from .autoencoder import init_encode_decode_wf
from .counterfactual import init_counterfactual_wf
from .registration import init_t1w_to_model_grid_wf
from .synthesis import init_synthesis_wf

__all__ = [
    "init_counterfactual_wf",
    "init_encode_decode_wf",
    "init_synthesis_wf",
    "init_t1w_to_model_grid_wf",
]
