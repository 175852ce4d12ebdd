"""The model's input contract: the four conditioning values.

No JAX, Nipype or files here, only what every layer agrees on (``/work/shared/UPSTREAM.md``
section 1; the image grid is :mod:`brain_ldm_nodes.grid`):

* :data:`CONDITIONING_ORDER`: ``[sex, age, ventricular_volume, brain_volume]``, each value
  expected in [0, 1] (outside is extrapolation, which the network accepts).
* :class:`Conditioning`: four such values and a JSON-friendly record of how they were derived
  (:mod:`brain_ldm_nodes.demographics` makes them from raw demographics).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["CONDITIONING_ORDER", "Conditioning", "DemographicsError"]

CONDITIONING_ORDER: tuple[str, str, str, str] = ("sex", "age", "ventricular_volume", "brain_volume")
"""Field names in the order the network expects them."""


class DemographicsError(ValueError):
    """A demographic value or policy that cannot be used; the message names the field.

    ``kind`` says what went wrong in a word, for grouping
    (:data:`brain_ldm_nodes.demographics.SKIP_KINDS`), or None. Defined here because
    :class:`Conditioning` raises it for values that are not four finite numbers;
    :mod:`brain_ldm_nodes.demographics` raises it for everything upstream of that.
    """

    def __init__(self, message: str, *, kind: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Conditioning:
    """Normalised conditioning: ``values`` in :data:`CONDITIONING_ORDER` order.

    ``record`` maps each field name to how its value was derived (raw value, formula,
    reference range, defaulted / clipped / extrapolated flags); it is JSON-serialisable.
    """

    values: tuple[float, float, float, float]
    record: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        values = tuple(float(v) for v in self.values)
        if len(values) != len(CONDITIONING_ORDER) or not all(math.isfinite(v) for v in values):
            raise DemographicsError(
                f"conditioning needs 4 finite values ({', '.join(CONDITIONING_ORDER)}), "
                f"got {self.values!r}"
            )
        object.__setattr__(self, "values", values)

    def as_array(self) -> np.ndarray:
        """float32 array of shape (4,): [sex, age, ventricular_volume, brain_volume]."""
        return np.asarray(self.values, dtype=np.float32)

    def as_dict(self) -> dict[str, float]:
        """``{field: value}`` in :data:`CONDITIONING_ORDER`."""
        return dict(zip(CONDITIONING_ORDER, self.values))
