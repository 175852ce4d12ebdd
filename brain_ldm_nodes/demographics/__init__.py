"""Raw demographics -> the Brain LDM's 4-value conditioning vector.

No JAX, Nipype or BIDS here. Facts (``/work/shared/UPSTREAM.md`` section 1):

* Order: ``[sex, age, ventricular_volume, brain_volume]`` (:data:`CONDITIONING_ORDER`),
  every value expected in [0, 1].
* Sex: 0 = female, 1 = male.
* Age: ``(age_years - 44) / (82 - 44)`` (the UK Biobank imaging age range).
* Volumes: ventricular CSF volume and head-size-normalised grey+white matter volume,
  both in mm^3 upstream. **The mm^3 -> [0, 1] mapping is unpublished**; we offer min-max
  over a reference range that *you* configure, and the record flags it as an
  approximation. Values already in [0, 1] pass through unchanged.
* Values outside [0, 1] are accepted by the network but are extrapolation; what happens to
  them is the policy's ``out_of_range`` choice.

Every failure raises :class:`DemographicsError` naming the field, the raw value and what
is accepted; callers add the file and row.

Where things are: :mod:`.policy` (:class:`DemographicsPolicy`, the bundle defaults, error
kinds), :mod:`.values` (missing tokens, codes, numbers), :mod:`.parsing` (sex and age cells),
:mod:`.normalise` (:func:`normalise_demographics`, :func:`conditioning_from_normalised`).
``CONDITIONING_ORDER``, ``Conditioning`` and ``DemographicsError`` are the model's input
contract, :mod:`brain_ldm_nodes.conditioning`; they are importable from here too.
"""

from __future__ import annotations

from ..conditioning import CONDITIONING_ORDER, Conditioning, DemographicsError
from .normalise import conditioning_from_normalised, normalise_demographics
from .parsing import parse_age_years, parse_sex
from .policy import (
    BUNDLE_DEFAULTS,
    SKIP_KINDS,
    VOLUME_FIELDS,
    DemographicsPolicy,
    MissingVolumes,
    OutOfRange,
)
from .values import MISSING_TOKENS, canonical_code, is_missing

__all__ = [
    "CONDITIONING_ORDER",
    "BUNDLE_DEFAULTS",
    "MISSING_TOKENS",
    "VOLUME_FIELDS",
    "MissingVolumes",
    "OutOfRange",
    "SKIP_KINDS",
    "DemographicsError",
    "DemographicsPolicy",
    "Conditioning",
    "canonical_code",
    "is_missing",
    "parse_sex",
    "parse_age_years",
    "normalise_demographics",
    "conditioning_from_normalised",
]
