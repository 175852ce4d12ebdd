"""Sex codes from ``participants.json``: the ``Levels`` of the sex column describe codes as
female or male (added to the policy); numeric codes nothing explains are refused.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..demographics import (
    DemographicsError,
    DemographicsPolicy,
    canonical_code,
    is_missing,
    parse_sex,
)
from .columns import column_key
from .dataset import shorten
from .errors import BidsDatasetError

if TYPE_CHECKING:  # pragma: no cover
    from bids.layout import BIDSLayout

    from .participants import Tsv

__all__ = [
    "INTEGRAL_RE",
    "effective_sex_policy",
]


INTEGRAL_RE = re.compile(r"^[+-]?\d+(?:\.0*)?$")


def effective_sex_policy(
    policy: DemographicsPolicy,
    layout: BIDSLayout,
    tsv: Tsv,
    sex_column: int | None,
    rows: Mapping[str, tuple[int, tuple[str, ...]]],
    tsv_path: Path,
    json_path: Path | None,
) -> tuple[DemographicsPolicy, dict[str, str]]:
    """The policy with participants.json Levels of the sex column applied, and the levels
    read as neither sex; refuses numeric codes that nothing maps."""
    if sex_column is None:
        return policy, {}
    column = tsv.header[sex_column]
    unrecognised: dict[str, str] = {}
    if json_path is not None:
        levels = _column_metadata(layout.get_metadata(str(tsv_path)), column).get("Levels")
        if isinstance(levels, Mapping) and levels:
            policy, unrecognised = _sex_codes_from_levels(policy, column, levels, json_path)
    cells = [cells[sex_column] for _, cells in rows.values() if sex_column < len(cells)]
    _check_numeric_sex(policy, column, cells, tsv_path)
    return policy, unrecognised


def _column_metadata(metadata: Mapping[str, Any], column: str) -> Mapping[str, Any]:
    """participants.json entry for ``column`` (exact name first, then as columns compare)."""
    entry = metadata.get(column)
    if entry is None:
        matches = [v for k, v in metadata.items() if column_key(k) == column_key(column)]
        entry = matches[0] if len(matches) == 1 else None
    return entry if isinstance(entry, Mapping) else {}


def _sex_codes_from_levels(
    policy: DemographicsPolicy,
    column: str,
    levels: Mapping[str, Any],
    json_path: Path,
) -> tuple[DemographicsPolicy, dict[str, str]]:
    """Add the codes that participants.json ``Levels`` describe as female/male to the policy.

    Descriptions are read with the policy's sex words and the default ones ("male",
    "Female", "m", ...). Levels whose codes the policy already knows need no description
    (``{"M": "Male participant"}`` is fine); if no level is known either way, the Levels are
    refused. Returns the policy and ``{code: description}`` for levels read as neither.
    """
    words = {code: v for code, v in policy.sex_codes.items() if not INTEGRAL_RE.match(code)}
    word_policy = DemographicsPolicy(sex_codes={**DemographicsPolicy().sex_codes, **words})
    described: dict[str, float] = {}
    unrecognised: dict[str, str] = {}
    for code, level in levels.items():
        description = level.get("Description") if isinstance(level, Mapping) else level
        description = str(description) if description is not None else ""
        try:
            value = parse_sex(description, word_policy)
        except DemographicsError:
            value = _sex_from_words(description, word_policy)
        if value is None:
            unrecognised[canonical_code(str(code))] = description
        else:
            described[canonical_code(str(code))] = value
    if not described and not any(code in policy.sex_codes for code in unrecognised):
        shown = shorten([f"{code!r} = {text[:30]!r}" for code, text in unrecognised.items()],
                         limit=3)
        raise BidsDatasetError(
            f"{json_path}: the Levels of column {column!r} ({shown}) describe no code as "
            "female or male (accepted descriptions: f, female, m, male, ...)"
        )
    for code, value in described.items():
        configured = policy.sex_codes.get(code)
        if configured is not None and configured != value:
            raise BidsDatasetError(
                f"{json_path}: the Levels of column {column!r} describe code {code!r} as "
                f"{value:g} (0 = female, 1 = male) but the configuration's sex_codes map it "
                f"to {configured:g}; fix one of them"
            )
    merged = {**described, **policy.sex_codes}
    return replace(policy, sex_codes=merged), unrecognised


def _sex_from_words(description: str, policy: DemographicsPolicy) -> float | None:
    """The sex a description like "male participant" names: its words that are sex words
    (not single letters) must all agree; None otherwise ("other", "prefer not to say")."""
    words = re.findall(r"[a-z]+", description.casefold())
    found = {policy.sex_codes[w] for w in words if len(w) > 1 and w in policy.sex_codes}
    return found.pop() if len(found) == 1 else None


def _check_numeric_sex(
    policy: DemographicsPolicy, column: str, cells: list[str], path: Path
) -> None:
    """Refuse a sex column of numbers none of which the policy (or Levels) maps."""
    present = sorted({canonical_code(cell) for cell in cells if not is_missing(cell)})
    if not present or not all(INTEGRAL_RE.match(code) for code in present):
        return
    if any(code in policy.sex_codes for code in present):
        return
    raise BidsDatasetError(
        f"{path}: column {column!r} holds only numeric codes ({shorten(present, limit=3)}); "
        'say which is female or male in participants.json "Levels" or --demographics-config '
        '"sex_codes"'
    )
