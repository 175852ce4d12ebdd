"""Nipype interfaces: thin wrappers that read inputs, call the library and write files.

Every interface gets its model from :func:`brain_ldm_nodes.model_cache.get_model`, so a
process loads a bundle once however many nodes use it. Importing this subpackage imports
Nipype (the top-level package does not).
"""

from .autoencoder import VAEDecode, VAEEncode
from .conditioning import NormaliseDemographics
from .counterfactual import CounterfactualSeriesT1w, CounterfactualT1w
from .derivatives import PublishDerivative, PublishFile
from .registration import RegisterT1w, ResampleToSource
from .sampling import SampleT1w

__all__ = [
    "CounterfactualSeriesT1w",
    "CounterfactualT1w",
    "NormaliseDemographics",
    "PublishDerivative",
    "PublishFile",
    "RegisterT1w",
    "ResampleToSource",
    "SampleT1w",
    "VAEDecode",
    "VAEEncode",
]
