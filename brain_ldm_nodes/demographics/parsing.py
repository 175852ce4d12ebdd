"""Sex and age cells -> numbers under a :class:`~.policy.DemographicsPolicy`."""

from __future__ import annotations

import math
import re

import numpy as np

from ..conditioning import DemographicsError
from .policy import DemographicsPolicy
from .values import _as_float, _is_real_number, _raw_for_record, canonical_code, is_missing

__all__ = ["parse_age_years", "parse_sex"]

_NUMBER = r"\d+(?:\.\d*)?|\.\d+"
_AGE_RANGE_RE = re.compile(rf"^({_NUMBER})\s*(?:-|\u2013|to)\s*({_NUMBER})$", re.IGNORECASE)
_AGE_OPEN_RE = re.compile(rf"^({_NUMBER})\s*\+$")
# "23y", "45 years", DICOM's AgeString "045Y"; "6M" / "30 months" / "20D" are not years.
_AGE_YEARS_RE = re.compile(rf"^({_NUMBER})\s*(?:y|yr|yrs|year|years)$", re.IGNORECASE)
_AGE_OTHER_UNIT_RE = re.compile(
    rf"^({_NUMBER})\s*(m|mo|mos|month|months|w|wk|wks|week|weeks|d|day|days)$", re.IGNORECASE
)


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
