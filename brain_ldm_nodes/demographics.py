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
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import numpy as np

__all__ = [
    "CONDITIONING_ORDER",
    "BUNDLE_DEFAULTS",
    "MISSING_TOKENS",
    "VOLUME_FIELDS",
    "MissingVolumes",
    "SKIP_KINDS",
    "DemographicsError",
    "DemographicsPolicy",
    "Conditioning",
    "parse_sex",
    "parse_age_years",
    "normalise_demographics",
    "conditioning_from_normalised",
]

CONDITIONING_ORDER: tuple[str, str, str, str] = ("sex", "age", "ventricular_volume", "brain_volume")
"""Field names in the order the network expects them."""

BUNDLE_DEFAULTS: Mapping[str, float] = MappingProxyType(
    {"sex": 0.0, "age": 0.1, "ventricular_volume": 0.2, "brain_volume": 0.4}
)
"""The MONAI bundle's default conditioning (``inference.json``), already normalised."""

MISSING_TOKENS: frozenset[str] = frozenset(
    {"", "n/a", "na", "nan", "none", "null", "missing", "unknown", "-", "?"}
)
"""Cell texts (case-insensitive, stripped) that mean "no value"; ``None`` and NaN too."""

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
_VOLUME_FIELDS = VOLUME_FIELDS

_NUMBER = r"\d+(?:\.\d*)?|\.\d+"
_AGE_RANGE_RE = re.compile(rf"^({_NUMBER})\s*(?:-|\u2013|to)\s*({_NUMBER})$", re.IGNORECASE)
_AGE_OPEN_RE = re.compile(rf"^({_NUMBER})\s*\+$")
# "23y", "45 years", DICOM's AgeString "045Y"; "6M" / "30 months" / "20D" are not years.
_AGE_YEARS_RE = re.compile(rf"^({_NUMBER})\s*(?:y|yr|yrs|year|years)$", re.IGNORECASE)
_AGE_OTHER_UNIT_RE = re.compile(
    rf"^({_NUMBER})\s*(m|mo|mos|month|months|w|wk|wks|week|weeks|d|day|days)$", re.IGNORECASE
)


class DemographicsError(ValueError):
    """A demographic value or policy that cannot be used; the message names the field.

    ``kind`` says what went wrong in a word, for grouping (:data:`SKIP_KINDS`), or None.
    """

    def __init__(self, message: str, *, kind: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind


SKIP_KINDS: tuple[str, ...] = (
    "age_below", "age_above", "age_missing", "age_unparsed", "sex_missing", "sex_unknown",
    "volume_missing", "volume_unparsed", "volume_mm3_no_range", "volume_out_of_range",
)
"""Kinds of :class:`DemographicsError` about a value (``DemographicsError.kind``)."""


# --------------------------------------------------------------------------- helpers


def is_missing(value: object) -> bool:
    """``None``, NaN, or a missing-value token (``n/a``, ``NA``, empty, ...; any case)."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    if isinstance(value, np.floating) and np.isnan(value):
        return True
    return isinstance(value, str) and value.strip().lower() in MISSING_TOKENS


def canonical_code(value: object) -> str:
    """Lower-case, stripped text; integral numbers as "1" whether given as 1, 1.0 or "1.0"."""
    text = str(value).strip().lower()
    try:
        number = float(text)
    except ValueError:
        return text
    if math.isfinite(number) and number == int(number):
        return str(int(number))
    return text


def _is_real_number(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)
    )


def _as_float(name: str, value: object, what: str) -> float:
    """A finite float from a number or numeric text; raises DemographicsError otherwise."""
    if isinstance(value, (bool, np.bool_)):
        raise DemographicsError(f"{name}: {value!r} is not {what}")
    if _is_real_number(value):
        number = float(value)  # type: ignore[arg-type]
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise DemographicsError(f"{name}: {value!r} is not {what}") from None
    else:
        raise DemographicsError(f"{name}: {value!r} is not {what}")
    if not math.isfinite(number):
        raise DemographicsError(f"{name}: {value!r} is not finite ({what} expected)")
    return number


def _raw_for_record(value: object) -> object:
    """JSON-friendly copy of a raw cell (numbers stay numbers, NaN becomes None)."""
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if _is_real_number(value):
        number = float(value)  # type: ignore[arg-type]
        if not math.isfinite(number):
            return None
        if isinstance(value, (int, np.integer)):
            return int(value)
        return number
    return str(value)


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


# --------------------------------------------------------------------------- policy


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
        source = Path(path)
        try:
            text = source.read_text(encoding="utf-8")
        except OSError as exc:
            raise DemographicsError(f"{source}: cannot read demographics policy ({exc})") from exc
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DemographicsError(f"{source}: not valid JSON ({exc})") from exc
        return cls.from_dict(data, source=str(source))

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
        if name in _VOLUME_FIELDS and self.missing_volumes == "error":
            return None
        if name in self.defaults:
            return self.defaults[name], "configured default"
        if name in _VOLUME_FIELDS:
            return BUNDLE_DEFAULTS[name], "MONAI bundle default (inference.json)"
        return None

    def volume_range_mm3(self, name: str) -> tuple[float, float] | None:
        """Configured reference range for ``ventricular_volume`` or ``brain_volume``."""
        if name not in _VOLUME_FIELDS:
            raise KeyError(name)
        return getattr(self, f"{name}_range_mm3")


def _list_or_none(pair: tuple[float, float] | None) -> list[float] | None:
    return None if pair is None else [pair[0], pair[1]]


# --------------------------------------------------------------------------- cell parsers


def parse_sex(value: object, policy: DemographicsPolicy | None = None) -> float | None:
    """Sex code -> 0.0 (female) / 1.0 (male) via ``policy.sex_codes``; ``None`` if missing.

    Missing: ``None``, NaN, or text in :data:`MISSING_TOKENS` ("", "n/a", "NaN", ...).
    """
    policy = policy or DemographicsPolicy()
    if is_missing(value):
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (str, int, float, np.number)):
        raise DemographicsError(
            f"sex: {value!r} is not a sex code ({_accepted_sex(policy)})", kind="sex_unknown"
        )
    code = canonical_code(value)
    if code not in policy.sex_codes:
        shown = value.strip() if isinstance(value, str) else _raw_for_record(value)
        raise DemographicsError(
            f"sex: unknown code '{shown}' ({_accepted_sex(policy)})", kind="sex_unknown"
        )
    return policy.sex_codes[code]


def _accepted_sex(policy: DemographicsPolicy) -> str:
    text = "accepted: " + ", ".join(sorted(policy.sex_codes))
    if not any(_is_integral_text(code) for code in policy.sex_codes):
        text += "; numeric codes need an explicit sex_codes mapping"
    return text


def _is_integral_text(code: str) -> bool:
    return code.lstrip("-").isdigit()


def parse_age_years(
    value: object, policy: DemographicsPolicy | None = None
) -> tuple[float, str] | None:
    """Age cell -> ``(age_years, how)``, or ``None`` if missing.

    Accepts numbers and numeric text ("63", " 63.5 "), also with a year unit ("63y",
    "63 years", DICOM's "063Y"): ``how = "value"``; ranges "35-40" (also "35 to 40", en
    dash): midpoint 37.5 with ``how = "range_midpoint"`` unless
    ``policy.age_range_policy == "error"``; open-ended "89+": 89 with
    ``how = "open_ended_lower_bound"`` unless ``policy.age_open_ended_policy == "error"``.
    Ages in other units ("6M", "30 months"), negative, non-finite or non-numeric ages raise
    :class:`DemographicsError` (``kind="age_unparsed"``).
    """
    policy = policy or DemographicsPolicy()
    if is_missing(value):
        return None
    accepted = "accepted: years as a number, a range like '35-40', or open-ended like '89+'"
    if _is_real_number(value):
        try:
            years = _as_float("age", value, "a number of years")
        except DemographicsError as exc:
            raise DemographicsError(str(exc), kind="age_unparsed") from None
        how = "value"
    elif isinstance(value, str):
        text = value.strip()
        range_match = _AGE_RANGE_RE.match(text)
        open_match = _AGE_OPEN_RE.match(text)
        years_match = _AGE_YEARS_RE.match(text)
        other_unit = _AGE_OTHER_UNIT_RE.match(text)
        if range_match:
            low, high = float(range_match.group(1)), float(range_match.group(2))
            if policy.age_range_policy == "error":
                raise DemographicsError(
                    f"age: range '{text}' is not accepted (age_range_policy='error'; "
                    "set it to 'midpoint' to use the middle of the range)",
                    kind="age_unparsed",
                )
            if low > high:
                raise DemographicsError(
                    f"age: range '{text}' has its lower bound above its upper", kind="age_unparsed"
                )
            years, how = (low + high) / 2.0, "range_midpoint"
        elif open_match:
            if policy.age_open_ended_policy == "error":
                raise DemographicsError(
                    f"age: open-ended '{text}' is not accepted (age_open_ended_policy='error'; "
                    "set it to 'lower_bound' to use the bound)",
                    kind="age_unparsed",
                )
            years, how = float(open_match.group(1)), "open_ended_lower_bound"
        elif years_match:
            years, how = float(years_match.group(1)), "value"
        elif other_unit:
            raise DemographicsError(
                f"age: '{text}' is not in years (unit '{other_unit.group(2)}'; {accepted})",
                kind="age_unparsed",
            )
        else:
            try:
                years = float(text)
            except ValueError:
                raise DemographicsError(
                    f"age: '{text}' is not an age in years ({accepted})", kind="age_unparsed"
                ) from None
            if not math.isfinite(years):
                raise DemographicsError(
                    f"age: '{text}' is not finite ({accepted})", kind="age_unparsed"
                )
            how = "value"
    else:
        raise DemographicsError(
            f"age: {value!r} is not an age in years ({accepted})", kind="age_unparsed"
        )
    if years < 0:
        raise DemographicsError(
            f"age: {_raw_for_record(value)!r} is negative ({accepted})", kind="age_unparsed"
        )
    return years, how


# --------------------------------------------------------------------------- normalisation


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


def _apply_range_policy(
    name: str, value: float, policy_choice: str, detail: str
) -> tuple[float, dict[str, Any]]:
    """Handle a normalised value outside [0, 1]; returns (value, flags for the record).

    ``detail`` completes the error message "<name>: <detail> outside [0, 1] ...".
    """
    flags: dict[str, Any] = {"clipped": False, "extrapolated": False}
    if 0.0 <= value <= 1.0:
        return value, flags
    if policy_choice == "clip":
        flags["clipped"] = True
        flags["unclipped_value"] = value
        return min(max(value, 0.0), 1.0), flags
    if policy_choice == "allow":
        flags["extrapolated"] = True
        return value, flags
    if name == "age":
        kind = "age_below" if value < 0.0 else "age_above"
    else:
        kind = "volume_out_of_range" if name in _VOLUME_FIELDS else None
    raise DemographicsError(
        f"{name}: {detail} outside [0, 1] (out_of_range 'clip' or 'allow' would use it)",
        kind=kind,
    )


def _defaulted(
    name: str, raw: object, policy: DemographicsPolicy, why: str | None = None
) -> tuple[float, dict[str, Any]]:
    """The default of a missing ``name`` and its record (``why``: the reason it is missing)."""
    why = why or (f"no {name} given" if raw is None else f"missing value {_raw_for_record(raw)!r}")
    found = policy.default_for(name)
    if found is None:
        if name in _VOLUME_FIELDS and policy.missing_volumes == "error":
            fix = ("provide it, or set missing_volumes to 'default' (--missing-volumes default) "
                   f"to use the bundle default {BUNDLE_DEFAULTS[name]:g}")
        else:
            fix = f"provide it, or set defaults['{name}'] in the demographics policy"
        raise DemographicsError(
            f"{name}: missing value ({_raw_for_record(raw)!r}) and no default configured ({fix})",
            kind=f"{'volume' if name in _VOLUME_FIELDS else name}_missing",
        )
    value, source = found
    return value, {
        "raw": _raw_for_record(raw),
        "value": value,
        "how": "default",
        "formula": f"{source} for missing {name}",
        "defaulted": True,
        "default_source": source,
        "why": why,
        "clipped": False,
        "extrapolated": not 0.0 <= value <= 1.0,
    }


def _normalise_sex(
    raw: object, policy: DemographicsPolicy, why: str | None = None
) -> tuple[float, dict[str, Any]]:
    value = parse_sex(raw, policy)
    if value is None:
        return _defaulted("sex", raw, policy, why)
    return value, {
        "raw": _raw_for_record(raw),
        "value": value,
        "how": "code",
        "formula": f"sex_codes[{canonical_code(raw)!r}] (0 = female, 1 = male)",
        "defaulted": False,
        "clipped": False,
        "extrapolated": False,
    }


def _normalise_age(
    raw: object, policy: DemographicsPolicy, why: str | None = None
) -> tuple[float, dict[str, Any]]:
    parsed = parse_age_years(raw, policy)
    if parsed is None:
        return _defaulted("age", raw, policy, why)
    years, how = parsed
    low, high = policy.age_min_years, policy.age_max_years
    normalised = (years - low) / (high - low)
    value, flags = _apply_range_policy(
        "age",
        normalised,
        policy.out_of_range,
        f"{years:g} years normalises to {normalised:.4g} (range {low:g}-{high:g} y),",
    )
    return value, {
        "raw": _raw_for_record(raw),
        "age_years": years,
        "value": value,
        "how": how,
        "formula": f"(age_years - {low:g}) / ({high:g} - {low:g})",
        "reference_range_years": [low, high],
        "defaulted": False,
        **flags,
    }


def _normalise_volume(
    name: str, raw: object, policy: DemographicsPolicy, why: str | None = None
) -> tuple[float, dict[str, Any]]:
    if is_missing(raw):
        return _defaulted(name, raw, policy, why)
    try:
        number = _as_float(name, raw, "a volume (mm^3, or already normalised to [0, 1])")
    except DemographicsError as exc:
        raise DemographicsError(str(exc), kind="volume_unparsed") from None
    if number < 0:
        raise DemographicsError(
            f"{name}: {_raw_for_record(raw)!r} is negative (volumes are >= 0)",
            kind="volume_unparsed",
        )
    if number <= 1.0:
        return number, {
            "raw": _raw_for_record(raw),
            "value": number,
            "how": "already_normalised",
            "formula": "value in [0, 1] used as given",
            "defaulted": False,
            "clipped": False,
            "extrapolated": False,
        }
    reference = policy.volume_range_mm3(name)
    if reference is None:
        raise DemographicsError(
            f"{name}: {number:g} looks like mm^3 (> 1), but no reference range is configured; "
            f"the upstream mm^3 -> [0, 1] mapping is unpublished, so set "
            f"{name}_range_mm3 = [low, high] in the demographics policy (min-max, an "
            "approximation) or give the value already normalised to [0, 1]",
            kind="volume_mm3_no_range",
        )
    low, high = reference
    normalised = (number - low) / (high - low)
    value, flags = _apply_range_policy(
        name,
        normalised,
        policy.out_of_range,
        f"{number:g} mm^3 normalises to {normalised:.4g} with the reference range "
        f"{low:g}-{high:g} mm^3,",
    )
    return value, {
        "raw": _raw_for_record(raw),
        "volume_mm3": number,
        "value": value,
        "how": "minmax_reference_range",
        "formula": f"(volume_mm3 - {low:g}) / ({high:g} - {low:g})",
        "reference_range_mm3": [low, high],
        "approximation": True,
        "note": (
            "the upstream mm^3 -> [0, 1] mapping is unpublished; min-max over a "
            "configured reference range approximates it"
        ),
        "defaulted": False,
        **flags,
    }


def normalise_demographics(
    raw: Mapping[str, object],
    policy: DemographicsPolicy | None = None,
    *,
    missing_reasons: Mapping[str, str] | None = None,
) -> Conditioning:
    """Raw demographics -> :class:`Conditioning` (values in :data:`CONDITIONING_ORDER` order).

    ``raw`` may hold ``sex`` (code), ``age`` (years), ``ventricular_volume`` and
    ``brain_volume`` (mm^3, or already in [0, 1]); absent keys count as missing (then
    ``policy.defaults`` applies, else an error). Other keys are an error, so a misspelt
    column is not silently replaced by a default. Volumes <= 1 are taken as already
    normalised; missing volumes follow ``policy.missing_volumes``. ``missing_reasons``
    (field -> text) is what a defaulted field's record gives as ``why`` (e.g. "no column").
    """
    policy = policy or DemographicsPolicy()
    unknown = sorted(set(raw) - set(CONDITIONING_ORDER))
    if unknown:
        raise DemographicsError(
            f"{unknown[0]}: unknown demographics field (accepted: {', '.join(CONDITIONING_ORDER)})"
        )
    why = dict(missing_reasons or {})
    sex, sex_record = _normalise_sex(raw.get("sex"), policy, why.get("sex"))
    age, age_record = _normalise_age(raw.get("age"), policy, why.get("age"))
    ventricles, ventricles_record = _normalise_volume(
        "ventricular_volume", raw.get("ventricular_volume"), policy, why.get("ventricular_volume")
    )
    brain, brain_record = _normalise_volume(
        "brain_volume", raw.get("brain_volume"), policy, why.get("brain_volume")
    )
    record = {
        "sex": sex_record,
        "age": age_record,
        "ventricular_volume": ventricles_record,
        "brain_volume": brain_record,
    }
    for entry in record.values():
        entry["out_of_range_policy"] = policy.out_of_range
    return Conditioning((sex, age, ventricles, brain), record)


def conditioning_from_normalised(
    sex: float,
    age: float,
    ventricular_volume: float,
    brain_volume: float,
    *,
    out_of_range: OutOfRange = "error",
) -> Conditioning:
    """Conditioning from values already in [0, 1] (sex 0 = female, 1 = male).

    Values outside [0, 1] follow ``out_of_range`` ("error", "clip" or "allow"); NaN,
    infinity and non-numbers raise :class:`DemographicsError`.
    """
    if out_of_range not in _OUT_OF_RANGE_CHOICES:
        raise DemographicsError(
            f"out_of_range: {out_of_range!r} is not one of {', '.join(_OUT_OF_RANGE_CHOICES)}"
        )
    values: list[float] = []
    record: dict[str, Any] = {}
    for name, given in zip(CONDITIONING_ORDER, (sex, age, ventricular_volume, brain_volume)):
        number = _as_float(name, given, "a normalised number")
        value, flags = _apply_range_policy(name, number, out_of_range, f"{number:g} is")
        values.append(value)
        record[name] = {
            "raw": number,
            "value": value,
            "how": "given_normalised",
            "formula": "value used as given",
            "defaulted": False,
            "out_of_range_policy": out_of_range,
            **flags,
        }
    return Conditioning(tuple(values), record)  # type: ignore[arg-type]
