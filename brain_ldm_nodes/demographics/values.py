"""Raw demographic cells: what counts as missing, codes as text, finite numbers, record copies.

No policy here: :mod:`.parsing` and :mod:`.normalise` build on these.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..conditioning import DemographicsError

__all__ = ["MISSING_TOKENS", "canonical_code", "is_missing", "read_json_file"]

MISSING_TOKENS: frozenset[str] = frozenset(
    {"", "n/a", "na", "nan", "none", "null", "missing", "unknown", "-", "?"}
)


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


def read_json_file(
    path: str | os.PathLike[str], what: str, error: type[ValueError] = DemographicsError
) -> Any:
    """The JSON document in ``path`` (UTF-8); ``error`` naming the file and ``what`` it is
    (e.g. "the configuration") when it cannot be read, is not UTF-8 or is not valid JSON."""
    source = Path(path)
    try:
        text = source.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{source}: cannot read {what} ({exc})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{source}: not valid JSON ({exc})") from None
