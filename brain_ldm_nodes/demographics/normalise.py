"""Raw demographics -> :class:`~brain_ldm_nodes.conditioning.Conditioning`, with a record of
how each value was derived."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..conditioning import CONDITIONING_ORDER, Conditioning, DemographicsError
from .parsing import parse_age_years, parse_sex
from .policy import (
    _OUT_OF_RANGE_CHOICES,
    BUNDLE_DEFAULTS,
    VOLUME_FIELDS,
    DemographicsPolicy,
    OutOfRange,
)
from .values import _as_float, _raw_for_record, canonical_code, is_missing

__all__ = ["conditioning_from_normalised", "normalise_demographics"]


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
        kind = "volume_out_of_range" if name in VOLUME_FIELDS else None
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
        if name in VOLUME_FIELDS and policy.missing_volumes == "error":
            fix = ("provide it, or set missing_volumes to 'default' (--missing-volumes default) "
                   f"to use the bundle default {BUNDLE_DEFAULTS[name]:g}")
        else:
            fix = f"provide it, or set defaults['{name}'] in the demographics policy"
        raise DemographicsError(
            f"{name}: missing value ({_raw_for_record(raw)!r}) and no default configured ({fix})",
            kind=f"{'volume' if name in VOLUME_FIELDS else name}_missing",
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


def _normalise_sex(raw: object, policy: DemographicsPolicy) -> tuple[float, dict[str, Any]]:
    value = parse_sex(raw, policy)
    assert value is not None  # missing cells take _defaulted instead
    return value, {
        "raw": _raw_for_record(raw),
        "value": value,
        "how": "code",
        "formula": f"sex_codes[{canonical_code(raw)!r}] (0 = female, 1 = male)",
        "defaulted": False,
        "clipped": False,
        "extrapolated": False,
    }


def _normalise_age(raw: object, policy: DemographicsPolicy) -> tuple[float, dict[str, Any]]:
    parsed = parse_age_years(raw, policy)
    assert parsed is not None  # missing cells take _defaulted instead
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
    name: str, raw: object, policy: DemographicsPolicy
) -> tuple[float, dict[str, Any]]:
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
    values: list[float] = []
    record: dict[str, Any] = {}
    for name in CONDITIONING_ORDER:  # in order: the first bad field is the one reported
        given = raw.get(name)
        if is_missing(given):
            value, entry = _defaulted(name, given, policy, why.get(name))
        elif name == "sex":
            value, entry = _normalise_sex(given, policy)
        elif name == "age":
            value, entry = _normalise_age(given, policy)
        else:
            value, entry = _normalise_volume(name, given, policy)
        entry["out_of_range_policy"] = policy.out_of_range
        values.append(value)
        record[name] = entry
    return Conditioning(tuple(values), record)  # type: ignore[arg-type]


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
