"""How raw demographics become conditioning values: :class:`DemographicsPolicy` and its
constants (bundle defaults, sex codes, error kinds)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from ..conditioning import CONDITIONING_ORDER, DemographicsError
from .values import _as_float, canonical_code, read_json_file

__all__ = [
    "BUNDLE_DEFAULTS",
    "DEFAULT_SEX_CODES",
    "SKIP_KINDS",
    "VOLUME_FIELDS",
    "DemographicsPolicy",
    "MissingVolumes",
    "OutOfRange",
]

BUNDLE_DEFAULTS: Mapping[str, float] = MappingProxyType(
    {"sex": 0.0, "age": 0.1, "ventricular_volume": 0.2, "brain_volume": 0.4}
)
"""The MONAI bundle's default conditioning (``inference.json``), already normalised."""

VOLUME_FIELDS: tuple[str, str] = ("ventricular_volume", "brain_volume")
"""The two volume fields; when absent they take the bundle defaults (``missing_volumes``)."""

DEFAULT_SEX_CODES: Mapping[str, float] = MappingProxyType(
    {"f": 0.0, "female": 0.0, "w": 0.0, "woman": 0.0, "m": 1.0, "male": 1.0, "man": 1.0}
)

OutOfRange = Literal["error", "clip", "allow"]
MissingVolumes = Literal["default", "error"]
AgeRangePolicy = Literal["midpoint", "error"]
AgeOpenEndedPolicy = Literal["lower_bound", "error"]

_OUT_OF_RANGE_CHOICES = ("error", "clip", "allow")
_MISSING_VOLUMES_CHOICES = ("default", "error")
_AGE_RANGE_CHOICES = ("midpoint", "error")
_AGE_OPEN_ENDED_CHOICES = ("lower_bound", "error")

SKIP_KINDS: tuple[str, ...] = (
    "age_below", "age_above", "age_missing", "age_unparsed", "sex_missing", "sex_unknown",
    "volume_missing", "volume_unparsed", "volume_mm3_no_range", "volume_out_of_range",
)
"""Kinds of :class:`DemographicsError` about a value (``DemographicsError.kind``)."""


def _range_pair(name: str, value: object) -> tuple[float, float] | None:
    if value is None:
        return None
    try:
        low, high = (float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise DemographicsError(
            f"{name}: expected [low, high] in mm^3 or null, got {value!r}"
        ) from None
    if not (math.isfinite(low) and math.isfinite(high) and 0.0 <= low < high):
        raise DemographicsError(f"{name}: need 0 <= low < high (finite, mm^3), got {value!r}")
    return (low, high)


@dataclass(frozen=True)
class DemographicsPolicy:
    """How raw demographics become normalised conditioning values. All fields configurable.

    * ``sex_codes``: code -> value (0 = female, 1 = male); keys are matched after
      stripping and lower-casing, and integral numbers match as text (``2``, ``2.0`` and
      ``"2"`` all look up ``"2"``). Numeric codes such as 1/2 differ between datasets,
      so none is in the default: map them explicitly.
    * ``age_min_years`` / ``age_max_years``: age normalised = (years - min) / (max - min);
      44 and 82 are upstream's UK Biobank values.
    * ``ventricular_volume_range_mm3`` / ``brain_volume_range_mm3``: (low, high) reference
      range for min-max scaling of volumes given in mm^3 (values > 1). The upstream
      mapping is unpublished, so this is an approximation and the record says so. With
      ``None``, volumes > 1 are an error; volumes in [0, 1] always pass through.
    * ``out_of_range``: normalised values outside [0, 1]: ``"error"``, ``"clip"`` to
      [0, 1], or ``"allow"`` (extrapolation; the network accepts them).
    * ``age_range_policy``: ages written as ranges ("35-40"): ``"midpoint"`` or ``"error"``.
    * ``age_open_ended_policy``: ages like "89+": ``"lower_bound"`` (use 89) or ``"error"``.
    * ``defaults``: normalised values for fields a participant lacks (keys from
      :data:`CONDITIONING_ORDER`); empty by default, i.e. a missing sex or age is an error.
      :meth:`bundle_defaults` gives the MONAI bundle's defaults for all four.
    * ``missing_volumes``: a volume that is missing (no column, or an empty / ``n/a``
      cell): ``"default"`` (the default) uses ``defaults[name]`` if set, else the MONAI
      bundle's (:data:`BUNDLE_DEFAULTS`: ventricular 0.2, brain 0.4), and the record says
      so (``defaulted: true`` and why); ``"error"`` makes it an error. Few real
      ``participants.tsv`` have volume columns, hence the default.
    """

    sex_codes: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_SEX_CODES))
    age_min_years: float = 44.0
    age_max_years: float = 82.0
    ventricular_volume_range_mm3: tuple[float, float] | None = None
    brain_volume_range_mm3: tuple[float, float] | None = None
    out_of_range: OutOfRange = "error"
    age_range_policy: AgeRangePolicy = "midpoint"
    age_open_ended_policy: AgeOpenEndedPolicy = "lower_bound"
    defaults: Mapping[str, float] = field(default_factory=dict)
    missing_volumes: MissingVolumes = "default"

    def __post_init__(self) -> None:
        codes: dict[str, float] = {}
        if not isinstance(self.sex_codes, Mapping) or not self.sex_codes:
            raise DemographicsError("sex_codes: expected a non-empty mapping of code -> 0..1")
        for key, value in self.sex_codes.items():
            code = canonical_code(key)
            number = _as_float(f"sex_codes[{key!r}]", value, "a number in [0, 1]")
            if not 0.0 <= number <= 1.0:
                raise DemographicsError(
                    f"sex_codes[{key!r}]: {number:g} is outside [0, 1] (0 = female, 1 = male)"
                )
            if code in codes and codes[code] != number:
                raise DemographicsError(f"sex_codes: {key!r} is given twice with different values")
            codes[code] = number
        object.__setattr__(self, "sex_codes", MappingProxyType(codes))

        age_min = _as_float("age_min_years", self.age_min_years, "a number of years")
        age_max = _as_float("age_max_years", self.age_max_years, "a number of years")
        if not 0.0 <= age_min < age_max:
            raise DemographicsError(
                f"age_min_years/age_max_years: need 0 <= min < max, got {age_min:g}, {age_max:g}"
            )
        object.__setattr__(self, "age_min_years", age_min)
        object.__setattr__(self, "age_max_years", age_max)

        for name in ("ventricular_volume_range_mm3", "brain_volume_range_mm3"):
            object.__setattr__(self, name, _range_pair(name, getattr(self, name)))

        for name, choices in (
            ("out_of_range", _OUT_OF_RANGE_CHOICES),
            ("age_range_policy", _AGE_RANGE_CHOICES),
            ("age_open_ended_policy", _AGE_OPEN_ENDED_CHOICES),
            ("missing_volumes", _MISSING_VOLUMES_CHOICES),
        ):
            if getattr(self, name) not in choices:
                raise DemographicsError(
                    f"{name}: {getattr(self, name)!r} is not one of {', '.join(choices)}"
                )

        if not isinstance(self.defaults, Mapping):
            raise DemographicsError("defaults: expected a mapping of field -> normalised value")
        defaults: dict[str, float] = {}
        for key, value in self.defaults.items():
            if key not in CONDITIONING_ORDER:
                raise DemographicsError(
                    f"defaults: unknown field {key!r} (accepted: {', '.join(CONDITIONING_ORDER)})"
                )
            number = _as_float(f"defaults[{key!r}]", value, "a normalised number")
            if not 0.0 <= number <= 1.0 and self.out_of_range != "allow":
                raise DemographicsError(
                    f"defaults[{key!r}]: {number:g} is outside [0, 1] (defaults are normalised "
                    "values; set out_of_range='allow' to extrapolate)"
                )
            defaults[key] = number
        object.__setattr__(self, "defaults", MappingProxyType(defaults))

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    @classmethod
    def bundle_defaults(cls, **overrides: Any) -> DemographicsPolicy:
        """Policy whose missing values fall back to the MONAI bundle's defaults.

        Those are sex 0.0 (female), age 0.1 (47.8 years), ventricular volume 0.2,
        brain volume 0.4 (:data:`BUNDLE_DEFAULTS`); other fields take ``overrides``.
        """
        overrides.setdefault("defaults", dict(BUNDLE_DEFAULTS))
        return cls(**overrides)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str | None = None) -> DemographicsPolicy:
        """Build from a JSON-style mapping; unknown keys are errors (prefixed with ``source``)."""
        where = f"{source}: " if source else ""
        if not isinstance(data, Mapping):
            raise DemographicsError(f"{where}demographics policy must be a JSON object")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise DemographicsError(
                f"{where}unknown demographics policy key {unknown[0]!r} "
                f"(accepted: {', '.join(known)})"
            )
        try:
            return cls(**dict(data))
        except DemographicsError as exc:
            raise DemographicsError(f"{where}{exc}") from None

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> DemographicsPolicy:
        """Load from a JSON file holding an object with any of the fields (see the class doc)."""
        data = read_json_file(path, "demographics policy")
        return cls.from_dict(data, source=str(Path(path)))

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict; ``from_dict(to_dict())`` gives an equal policy."""
        return {
            "sex_codes": dict(self.sex_codes),
            "age_min_years": self.age_min_years,
            "age_max_years": self.age_max_years,
            "ventricular_volume_range_mm3": _list_or_none(self.ventricular_volume_range_mm3),
            "brain_volume_range_mm3": _list_or_none(self.brain_volume_range_mm3),
            "out_of_range": self.out_of_range,
            "age_range_policy": self.age_range_policy,
            "age_open_ended_policy": self.age_open_ended_policy,
            "defaults": dict(self.defaults),
            "missing_volumes": self.missing_volumes,
        }

    def default_for(self, name: str) -> tuple[float, str] | None:
        """The value a missing ``name`` takes and where it comes from, or None (an error).

        ``defaults[name]`` when set ("configured default"); for a volume under
        ``missing_volumes="default"`` otherwise the bundle's ("MONAI bundle default").
        """
        if name in VOLUME_FIELDS and self.missing_volumes == "error":
            return None
        if name in self.defaults:
            return self.defaults[name], "configured default"
        if name in VOLUME_FIELDS:
            return BUNDLE_DEFAULTS[name], "MONAI bundle default (inference.json)"
        return None

    def volume_range_mm3(self, name: str) -> tuple[float, float] | None:
        """Configured reference range for ``ventricular_volume`` or ``brain_volume``."""
        if name not in VOLUME_FIELDS:
            raise KeyError(name)
        return getattr(self, f"{name}_range_mm3")


def _list_or_none(pair: tuple[float, float] | None) -> list[float] | None:
    return None if pair is None else [pair[0], pair[1]]
