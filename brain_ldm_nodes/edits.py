"""Conditioning edits and sweeps: ``age=+10``, ``sex=flip``, ``age=50:80:5``, ``sex=0,1``.

No JAX, Nipype or BIDS here. An *edit* changes one conditioning value of a participant; a
*sweep* is a list of values for one field, each giving one image from the same starting
noise (a seed for synthetic images, the inverted noise for real ones).

Grammar (field names as :data:`~brain_ldm_nodes.demographics.CONDITIONING_ORDER`, any case,
``-`` for ``_``)::

    age=75                 absolute, in years (normalised with the policy's age range)
    age=+10, age=-5.5      relative to the participant's own age, in years
    sex=F | M | female | male | 0 | 1    absolute (the model's values: 0 = female, 1 = male;
                                          not the dataset's own codes)
    sex=flip               1 - the participant's own value
    ventricular_volume=0.6, brain_volume=+0.1    normalised, absolute or relative (signed)

    sweeps: FIELD=START:STOP:STEP (inclusive, STEP > 0; START and STOP both signed for a
    relative sweep, e.g. age=-10:+10:5) or FIELD=V1,V2,... (values as above, all absolute
    or all relative; sex=F,M or sex=0,1)

Resolved values outside [0, 1] follow the policy's ``out_of_range`` (``error``, ``clip``,
``allow``), as participants.tsv values do. Numbers are read as decimals, so a sweep's values
are exact (``0.2:0.8:0.2`` gives 0.2, 0.4, 0.6, 0.8).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

from .conditioning import CONDITIONING_ORDER, Conditioning, DemographicsError
from .demographics import DemographicsPolicy
from .demographics.normalise import _apply_range_policy

__all__ = [
    "MAX_SWEEP_VALUES",
    "EditError",
    "EditValue",
    "Sweep",
    "apply_edits",
    "parse_edit",
    "parse_edits",
    "parse_sweep",
    "parse_sweeps",
]

#: A sweep gives at most this many images per participant (and per real T1w).
MAX_SWEEP_VALUES = 50

FIELD_TOKENS = {
    "sex": "Sex", "age": "Age", "ventricular_volume": "VentricularVolume",
    "brain_volume": "BrainVolume",
}
_SEX_WORDS = {"f": 0, "female": 0, "0": 0, "m": 1, "male": 1, "1": 1}
_NUMBER_RE = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)$")

ACCEPTED_EDITS = (
    "age=75 (years), age=+10 or age=-5 (years from the participant's own), "
    "sex=F|M|0|1|flip, ventricular_volume=0.6 or =+0.1 (normalised), brain_volume likewise"
)
ACCEPTED_SWEEPS = (
    "FIELD=START:STOP:STEP or FIELD=V1,V2,... e.g. age=50:80:5 (years), age=-10:+10:5 "
    "(relative), sex=F,M, brain_volume=0.2:0.8:0.2"
)


class EditError(ValueError):
    """An edit or sweep that cannot be parsed or applied; the message says what is accepted."""


@dataclass(frozen=True)
class EditValue:
    """One value for one field: ``kind`` absolute / relative / flip; ``number`` in years for
    age, normalised for the volumes, 0 or 1 for sex (None for flip)."""

    field: str
    text: str
    kind: Literal["absolute", "relative", "flip"]
    number: Decimal | None = None

    @property
    def spec(self) -> str:
        """``field=text`` as it reads on the command line (canonical field name)."""
        return f"{self.field}={self.text}"

    @property
    def token(self) -> str:
        """Alphanumeric form for BIDS ``desc`` labels: ``50``, ``52p5``, ``Plus10``,
        ``Minus5``, ``Female``, ``Male``, ``Flip``."""
        if self.kind == "flip":
            return "Flip"
        if self.field == "sex":
            return "Male" if self.number == 1 else "Female"
        text = format(self.number, "f")
        if "." in text:
            text = text.rstrip("0").rstrip(".")
        sign = ""
        if self.kind == "relative":
            sign = "Minus" if self.number < 0 else "Plus"
        elif self.number < 0:
            sign = "Minus"
        return sign + text.lstrip("+-").replace(".", "p")

    @property
    def key(self) -> tuple[str, Decimal | None]:
        """What makes two values the same image: kind and number."""
        return self.kind, self.number


def _field_name(text: str, argument: str, whole: str, accepted: str) -> str:
    name = re.sub(r"[\s\-]+", "_", text.strip()).casefold()
    if name not in CONDITIONING_ORDER:
        raise EditError(
            f"{argument} {whole!r}: unknown field {text.strip()!r} (accepted fields: "
            f"{', '.join(CONDITIONING_ORDER)}; e.g. {accepted})"
        )
    return name


def _split(text: str, argument: str, accepted: str) -> tuple[str, str]:
    if "=" not in text:
        raise EditError(f"{argument} {text!r}: expected FIELD=VALUE (accepted: {accepted})")
    field_text, value = text.split("=", 1)
    name = _field_name(field_text, argument, text, accepted)
    value = value.strip()
    if not value:
        raise EditError(f"{argument} {text!r}: no value after '=' (accepted: {accepted})")
    return name, value


def _value(name: str, text: str, argument: str, whole: str, *, sweep: bool) -> EditValue:
    """One value of ``name`` from its text (see the module docstring)."""
    accepted = ACCEPTED_SWEEPS if sweep else ACCEPTED_EDITS
    if name == "sex":
        word = text.casefold()
        if word == "flip" and not sweep:
            return EditValue(name, "flip", "flip")
        if word in _SEX_WORDS:
            number = Decimal(_SEX_WORDS[word])
            return EditValue(name, "M" if number == 1 else "F", "absolute", number)
        choices = "F, M, 0, 1" + ("" if sweep else ", flip")
        raise EditError(
            f"{argument} {whole!r}: {text!r} is not a sex value (accepted: {choices}; the "
            "model's values, 0 = female, 1 = male, not the dataset's codes)"
        )
    unit = "years" if name == "age" else "a normalised value"
    if not _NUMBER_RE.match(text):
        raise EditError(f"{argument} {whole!r}: {text!r} is not a number ({unit}; accepted: "
                        f"{accepted})")
    try:
        number = Decimal(text)
    except InvalidOperation:  # pragma: no cover - the pattern admits only decimals
        raise EditError(f"{argument} {whole!r}: {text!r} is not a number") from None
    kind: Literal["absolute", "relative"] = "relative" if text[0] in "+-" else "absolute"
    shown = (("+" if number >= 0 else "-") if kind == "relative" else "") + _plain(abs(number))
    return EditValue(name, shown, kind, number)


def _plain(number: Decimal) -> str:
    text = format(number, "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def parse_edit(text: str, *, argument: str = "--counterfactual") -> EditValue:
    """One edit, e.g. ``"age=+10"``; :class:`EditError` (one line, naming ``argument``)."""
    name, value = _split(text, argument, ACCEPTED_EDITS)
    return _value(name, value, argument, text, sweep=False)


def parse_edits(
    texts: Iterable[str], *, argument: str = "--counterfactual"
) -> tuple[EditValue, ...]:
    """Several edits, at most one per field, in the order given."""
    edits: list[EditValue] = []
    for text in texts:
        edit = parse_edit(text, argument=argument)
        if any(other.field == edit.field for other in edits):
            raise EditError(f"{argument}: {edit.field} is edited twice (one edit per field; "
                            "for several values use --sweep)")
        edits.append(edit)
    return tuple(edits)


@dataclass(frozen=True)
class Sweep:
    """Values of one field, in the order given (``text`` as on the command line)."""

    field: str
    values: tuple[EditValue, ...]
    text: str

    @property
    def field_token(self) -> str:
        return FIELD_TOKENS[self.field]

    def describe(self) -> dict[str, Any]:
        return {"Field": self.field, "Spec": self.text, "Values": [v.text for v in self.values]}


def parse_sweep(text: str, *, argument: str = "--sweep") -> Sweep:
    """``FIELD=START:STOP:STEP`` or ``FIELD=V1,V2,...``; :class:`EditError` if not usable."""
    name, spec = _split(text, argument, ACCEPTED_SWEEPS)
    if ":" in spec:
        if name == "sex":
            raise EditError(f"{argument} {text!r}: sex takes a list, not a range (accepted: "
                            "sex=F,M or sex=0,1)")
        parts = [part.strip() for part in spec.split(":")]
        if len(parts) != 3 or not all(parts):
            raise EditError(f"{argument} {text!r}: a range is START:STOP:STEP (accepted: "
                            f"{ACCEPTED_SWEEPS})")
        start, stop = (_value(name, p, argument, text, sweep=True) for p in parts[:2])
        if start.kind != stop.kind:
            raise EditError(f"{argument} {text!r}: START and STOP must both be relative "
                            "(signed, e.g. -10:+10:5) or both absolute (e.g. 50:80:5)")
        if not _NUMBER_RE.match(parts[2]) or parts[2][0] in "+-" or Decimal(parts[2]) <= 0:
            raise EditError(f"{argument} {text!r}: STEP {parts[2]!r} must be a positive number "
                            "without a sign")
        step = Decimal(parts[2])
        if stop.number < start.number:
            raise EditError(f"{argument} {text!r}: STOP {parts[1]} is below START {parts[0]} "
                            "(ranges go upwards; STOP is included when it is on the grid)")
        count = int((stop.number - start.number) / step) + 1
        if count > MAX_SWEEP_VALUES:
            raise EditError(f"{argument} {text!r}: {count} values, more than the "
                            f"{MAX_SWEEP_VALUES} accepted (use a larger STEP)")
        texts = []
        for k in range(count):
            number = start.number + k * step
            sign = ("+" if number >= 0 else "-") if start.kind == "relative" else ""
            texts.append(sign + _plain(abs(number)) if sign else _plain(number))
        values = [_value(name, t, argument, text, sweep=True) for t in texts]
    else:
        items = [item.strip() for item in spec.split(",")]
        if not all(items):
            raise EditError(f"{argument} {text!r}: empty value in the list (accepted: "
                            f"{ACCEPTED_SWEEPS})")
        values = [_value(name, item, argument, text, sweep=True) for item in items]
        if len({value.kind for value in values}) > 1:
            raise EditError(f"{argument} {text!r}: mixes relative (signed) and absolute values; "
                            "use one kind")
        if len(values) > MAX_SWEEP_VALUES:
            raise EditError(f"{argument} {text!r}: {len(values)} values, more than the "
                            f"{MAX_SWEEP_VALUES} accepted")
    seen: set[tuple[str, Decimal | None]] = set()
    for value in values:
        if value.key in seen:
            raise EditError(f"{argument} {text!r}: {value.text} is listed twice (every value "
                            "gives one image)")
        seen.add(value.key)
    if len(values) < 2:
        raise EditError(f"{argument} {text!r}: a sweep needs at least 2 values (for one value "
                        "use --counterfactual, or a longer range)")
    return Sweep(name, tuple(values), f"{name}={spec}")


def parse_sweeps(texts: Iterable[str], *, argument: str = "--sweep") -> tuple[Sweep, ...]:
    """Several sweeps, at most one per field (each gives its own series of images)."""
    sweeps: list[Sweep] = []
    for text in texts:
        sweep = parse_sweep(text, argument=argument)
        if any(other.field == sweep.field for other in sweeps):
            raise EditError(f"{argument}: {sweep.field} is swept twice (one sweep per field)")
        sweeps.append(sweep)
    return tuple(sweeps)


# --------------------------------------------------------------------------- resolving


def _own_age_years(conditioning: Conditioning, policy: DemographicsPolicy) -> float:
    """The participant's age in years: as read (the record), else from the normalised value."""
    entry = conditioning.record.get("age") if conditioning.record else None
    if isinstance(entry, dict) and isinstance(entry.get("age_years"), (int, float)):
        return float(entry["age_years"])
    low, high = policy.age_min_years, policy.age_max_years
    return low + conditioning.values[1] * (high - low)


def _resolve(
    edit: EditValue, conditioning: Conditioning, policy: DemographicsPolicy, how: str
) -> tuple[float, dict[str, Any]]:
    """The new normalised value of ``edit.field`` and its record entry."""
    index = CONDITIONING_ORDER.index(edit.field)
    own = conditioning.values[index]
    entry: dict[str, Any] = {"edit": edit.spec, "how": how, "from_value": own}
    if edit.field == "age":
        low, high = policy.age_min_years, policy.age_max_years
        own_years = _own_age_years(conditioning, policy)
        years = float(edit.number) + (own_years if edit.kind == "relative" else 0.0)
        normalised = (years - low) / (high - low)
        entry |= {"from_age_years": own_years, "age_years": years,
                  "formula": f"(age_years - {low:g}) / ({high:g} - {low:g})"}
        detail = f"{edit.spec} gives {years:g} years, which normalises to {normalised:.4g},"
    elif edit.kind == "flip":
        normalised = 1.0 - own
        entry["formula"] = "1 - own value (0 = female, 1 = male)"
        detail = f"{edit.spec} gives {normalised:.4g},"
    else:
        normalised = float(edit.number) + (own if edit.kind == "relative" else 0.0)
        entry["formula"] = ("own value + change" if edit.kind == "relative"
                            else "value used as given")
        detail = f"{edit.spec} gives {normalised:.4g},"
    value, flags = _apply_range_policy(edit.field, normalised, policy.out_of_range, detail)
    entry |= {"value": value, "out_of_range_policy": policy.out_of_range, **flags}
    return value, entry


def apply_edits(
    conditioning: Conditioning,
    edits: Sequence[EditValue],
    policy: DemographicsPolicy | None = None,
    *,
    how: str = "counterfactual_edit",
) -> Conditioning:
    """``conditioning`` with ``edits`` applied; the record keeps the unchanged fields' entries
    and describes each changed one (edit, own value, formula, clipping), with the own entry
    under ``from``. Raises :class:`EditError` (e.g. out of range under ``error``)."""
    policy = policy or DemographicsPolicy()
    values = list(conditioning.values)
    record = {name: dict(conditioning.record.get(name, {})) for name in CONDITIONING_ORDER}
    for edit in edits:
        try:
            value, entry = _resolve(edit, conditioning, policy, how)
        except DemographicsError as exc:
            raise EditError(str(exc)) from None
        index = CONDITIONING_ORDER.index(edit.field)
        values[index] = value
        record[edit.field] = {**entry, "from": record[edit.field]}
    return Conditioning(tuple(values), record)
