"""Which ``participants.tsv`` column holds which conditioning field, and the App's
configuration (:class:`BidsConfig`, one JSON file)::

    {
      "columns": {"sex": ["sex", "gender"], "ventricular_volume": ["vcsf_mm3"]},
      "policy":  {"ventricular_volume_range_mm3": [5000, 105000], "out_of_range": "clip"}
    }

Both keys are optional. ``columns`` maps a conditioning field to the tsv column names to
look for, in order of preference (matched ignoring case, surrounding whitespace, and
spaces/hyphens vs underscores); a field given here replaces that field's default rule
(:func:`default_column_rank`: case, punctuation and unit variants of
:data:`DEFAULT_COLUMN_ALIASES`, e.g. ``Age (years)``, ``age_at_first_scan_years``,
``Sex (M/F)``; two candidates of one rank are an error naming both). Missing volume
columns are normal: the policy's ``missing_volumes`` decides (bundle defaults, recorded).
``policy`` holds
:class:`~brain_ldm_nodes.demographics.DemographicsPolicy` fields (sex codes, age range,
volume reference ranges, out-of-range policy, defaults). Unknown keys are errors.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from ..conditioning import CONDITIONING_ORDER, DemographicsError
from ..demographics import VOLUME_FIELDS, DemographicsPolicy
from ..demographics.values import read_json_file
from .dataset import shorten
from .errors import BidsConfigError, BidsDatasetError

if TYPE_CHECKING:  # pragma: no cover
    from .participants import Tsv

__all__ = [
    "BidsConfig",
    "BidsConfigError",
    "COLUMN_RULE",
    "DEFAULT_COLUMN_ALIASES",
    "column_key",
    "default_column_rank",
    "find_columns",
    "words_key",
]


DEFAULT_COLUMN_ALIASES: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "sex": ("sex", "biological_sex", "sex_at_birth", "gender"),
        "age": ("age", "age_at_scan", "age_at_first_scan", "age_at_mri", "age_at_visit",
                "age_at_session", "age_at_baseline"),
        "ventricular_volume": ("ventricular_volume", "ventricular_csf_volume", "vcsf"),
        "brain_volume": ("brain_volume", "brain_volume_norm"),
    }
)
"""Column names looked for by default, per conditioning field (see :func:`default_column_rank`
for the rule, which also accepts case, punctuation and unit variants of these)."""
COLUMN_RULE = (
    "names compare ignoring case, punctuation and a trailing unit; age: 'age' or "
    "'age_at_<scan|mri|imaging|visit|session|acquisition|baseline...>' in years ('Age (years)', "
    "'age_years', 'age_at_first_scan_years'; months are not read); sex: 'sex', "
    "'biological_sex', 'sex_at_birth', else 'gender' ('Sex (M/F)'); two candidates of one "
    "rank are an error"
)
"""The default column rule in words (for --help and error messages)."""
_YEAR_UNITS = frozenset({"y", "yr", "yrs", "year", "years", "in_years", "in_yrs"})
_NON_YEAR_UNITS = frozenset({"m", "mo", "mos", "month", "months", "in_months", "w", "wk", "wks",
                             "week", "weeks", "in_weeks", "d", "day", "days", "in_days"})
_AGE_EVENTS = ("scan", "mri", "imaging", "visit", "session", "acquisition", "baseline", "exam")
_AGE_AT_RE = re.compile(rf"^age_at_(?:[a-z0-9]+_)*?(?:{'|'.join(_AGE_EVENTS)})(?:_[0-9]+)?$")
_SEX_RANKS = {"sex": 0, "biological_sex": 0, "sex_at_birth": 0, "assigned_sex": 0, "gender": 1}
_BRACKET_RE = re.compile(r"\s*[(\[{]([^)\]}]*)[)\]}]\s*$")


def column_key(name: str) -> str:
    """How column names are compared: case-folded, trimmed, spaces/hyphens as underscores."""
    return re.sub(r"[\s\-]+", "_", name.strip()).casefold()


def words_key(text: str) -> str:
    """Lower-case words joined by underscores: ``"Age at first scan"`` -> ``age_at_first_scan``."""
    return re.sub(r"[^0-9a-z]+", "_", text.casefold()).strip("_")


def default_column_rank(field_name: str, column: str) -> int | None:
    """How well a ``participants.tsv`` header names ``field_name`` under the default rule:
    0 (best) or 1 (``gender`` for sex), None when it does not name it.

    The rule (:data:`COLUMN_RULE`): case, surrounding space and punctuation do not count
    (``"Age (years)"``, ``"AGE"``, ``"age-years"``), nor a leading ``participant_`` /
    ``subject_``. A trailing unit, in brackets or as the last word, must be a year unit for
    age (``age_years``, ``Age (y)``; ``age_months`` is not an age in years); brackets after
    sex name codes (``"Sex (M/F)"``). Age: ``age`` or ``age_at_<...scan/mri/imaging/visit/
    session/acquisition/baseline/exam...>`` (not ``age_at_onset``). Sex: ``sex``,
    ``biological_sex``, ``sex_at_birth``, ``assigned_sex`` (rank 0), else ``gender``
    (rank 1). Volumes: :data:`DEFAULT_COLUMN_ALIASES` as :func:`column_key` compares.
    """
    text = column.strip().casefold()
    note = None
    bracket = _BRACKET_RE.search(text)
    if bracket:
        note, text = words_key(bracket.group(1)), text[: bracket.start()]
    key = words_key(text)
    for prefix in ("participant_", "subject_"):
        key = key.removeprefix(prefix)
    if field_name == "age":
        words = key.split("_")
        for size in (2, 1):  # "age_in_years", "age_years"
            tail = "_".join(words[-size:])
            if len(words) > size and tail in _YEAR_UNITS:
                words = words[:-size]
                break
            if len(words) > size and tail in _NON_YEAR_UNITS:
                return None
        if note is not None and note not in _YEAR_UNITS:
            return None
        key = "_".join(words)
        return 0 if key == "age" or _AGE_AT_RE.match(key) else None
    if field_name == "sex":
        return _SEX_RANKS.get(key)
    aliases = {column_key(alias) for alias in DEFAULT_COLUMN_ALIASES.get(field_name, ())}
    return 0 if column_key(column) in aliases else None


@dataclass(frozen=True)
class BidsConfig:
    """Where the demographics are in ``participants.tsv`` and how to normalise them.

    * ``columns``: field (one of ``sex``, ``age``, ``ventricular_volume``,
      ``brain_volume``) -> column names to look for, first match wins. Fields not given
      keep :data:`DEFAULT_COLUMN_ALIASES`.
    * ``policy``: the :class:`DemographicsPolicy` (sex codes, age range, volume reference
      ranges in mm^3, ``out_of_range``, missing-value ``defaults``).
    """

    columns: Mapping[str, tuple[str, ...]] = field(
        default_factory=lambda: dict(DEFAULT_COLUMN_ALIASES)
    )
    policy: DemographicsPolicy = field(default_factory=DemographicsPolicy)

    def __post_init__(self) -> None:
        if not isinstance(self.columns, Mapping):
            raise BidsConfigError("columns: expected a mapping of field -> list of column names")
        columns = dict(DEFAULT_COLUMN_ALIASES)
        for name, aliases in self.columns.items():
            if name not in CONDITIONING_ORDER:
                raise BidsConfigError(
                    f"columns: unknown field {name!r} (accepted: {', '.join(CONDITIONING_ORDER)})"
                )
            if isinstance(aliases, str):
                aliases = (aliases,)
            if (
                not isinstance(aliases, (list, tuple))
                or not aliases
                or not all(isinstance(a, str) and a.strip() for a in aliases)
            ):
                raise BidsConfigError(
                    f"columns[{name!r}]: expected a non-empty list of column names, got {aliases!r}"
                )
            columns[name] = tuple(a.strip() for a in aliases)
        owner: dict[str, str] = {}
        for name, aliases in columns.items():
            for alias in aliases:
                key = column_key(alias)
                if key == "participant_id":
                    raise BidsConfigError(
                        f"columns[{name!r}]: 'participant_id' cannot be a demographics column"
                    )
                if owner.setdefault(key, name) != name:
                    raise BidsConfigError(
                        f"columns: {alias!r} is listed for both {owner[key]!r} and {name!r}"
                    )
        object.__setattr__(self, "columns", MappingProxyType(columns))
        if not isinstance(self.policy, DemographicsPolicy):
            raise BidsConfigError(f"policy: expected a DemographicsPolicy, got {self.policy!r}")

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str | None = None) -> BidsConfig:
        """Build from ``{"columns": {...}, "policy": {...}}``; unknown keys are errors."""
        where = f"{source}: " if source else ""
        if not isinstance(data, Mapping):
            raise BidsConfigError(f"{where}the configuration must be a JSON object")
        unknown = sorted(set(data) - {"columns", "policy"})
        if unknown:
            raise BidsConfigError(
                f"{where}unknown configuration key {unknown[0]!r} (accepted: columns, policy)"
            )
        policy_source = f"{source} (policy)" if source else "policy"
        try:
            policy = DemographicsPolicy.from_dict(data.get("policy", {}), source=policy_source)
        except DemographicsError as exc:
            raise BidsConfigError(str(exc)) from None
        try:
            return cls(columns=data.get("columns", {}), policy=policy)
        except BidsConfigError as exc:
            raise BidsConfigError(f"{where}{exc}") from None

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> BidsConfig:
        """Load a configuration file (format in the module docstring)."""
        data = read_json_file(path, "the configuration", BidsConfigError)
        return cls.from_dict(data, source=str(Path(path)))

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable; ``from_dict(to_dict())`` gives an equal config."""
        return {
            "columns": {name: list(aliases) for name, aliases in self.columns.items()},
            "policy": self.policy.to_dict(),
        }


_LOOKED_FOR = {
    "sex": "sex, biological_sex, gender...",
    "age": "age, age_at_<scan...>, in years",
    "ventricular_volume": "ventricular_volume, vcsf...",
    "brain_volume": "brain_volume...",
}


def _looked_for(config: BidsConfig, name: str) -> str:
    """What was looked for, in a few words (never the header's column names)."""
    aliases = config.columns[name]
    if aliases == DEFAULT_COLUMN_ALIASES[name] and name in _LOOKED_FOR:
        return _LOOKED_FOR[name]
    return shorten(list(aliases), limit=4)


def _similar(tsv: Tsv, name: str) -> list[str]:
    """Header names that mention the field's main word (e.g. 'age_months' for age)."""
    words = {"sex": ("sex", "gender"), "age": ("age",),
             "ventricular_volume": ("ventric", "csf", "vcsf"), "brain_volume": ("brain",)}[name]
    return [column for column in tsv.header
            if any(word in words_key(column).split("_") or
                   (len(word) > 4 and word in words_key(column)) for word in words)]


def find_columns(
    tsv: Tsv, config: BidsConfig, path: Path
) -> tuple[int, dict[str, int | None]]:
    """Index of ``participant_id`` and of each field's column (None when absent).

    Fields whose aliases are the defaults follow :func:`default_column_rank` (two columns of
    the best rank are an error naming both); configured aliases are matched as
    :func:`column_key` compares them, first alias found wins.
    """
    keys = [column_key(name) if name else "" for name in tsv.header]
    id_columns = [i for i, key in enumerate(keys) if key == "participant_id"]
    if not id_columns:
        found = shorten([repr(name) for name in tsv.header], limit=4)
        hint = ""
        if len(tsv.header) == 1 and "," in tsv.header[0]:
            hint = "; it looks comma-separated, but BIDS .tsv files are tab-separated"
        elif len(tsv.header) == 1 and " " in tsv.header[0]:
            hint = "; it looks space-separated, but BIDS .tsv files are tab-separated"
        raise BidsDatasetError(
            f"{path}: no participant_id column in the header (found: {found}){hint}"
        )
    if len(id_columns) > 1:
        raise BidsDatasetError(
            f"{path}: {_several_columns(tsv, id_columns)} are all participant_id"
        )
    columns: dict[str, int | None] = {}
    for name, aliases in config.columns.items():
        columns[name] = None
        if aliases == DEFAULT_COLUMN_ALIASES[name]:
            ranked: dict[int, list[int]] = {}
            for i, column in enumerate(tsv.header):
                rank = default_column_rank(name, column) if column and i not in id_columns else None
                if rank is not None:
                    ranked.setdefault(rank, []).append(i)
            if ranked:
                best = ranked[min(ranked)]
                if len(best) > 1:
                    both = " and ".join(repr(tsv.header[i]) for i in best[:3])
                    raise BidsDatasetError(
                        f"{path}: columns {both} could each be the {name}; name the one to use "
                        f'in --demographics-config ({{"columns": {{"{name}": '
                        f'["{tsv.header[best[0]]}"]}}}})'
                    )
                columns[name] = best[0]
            continue
        for alias in aliases:
            hits = [i for i, key in enumerate(keys) if key == column_key(alias)]
            if len(hits) > 1:
                raise BidsDatasetError(
                    f"{path}: {_several_columns(tsv, hits)} all match {alias!r} (for {name}); "
                    "keep one"
                )
            if hits:
                columns[name] = hits[0]
                break
    lacking = [
        name for name in CONDITIONING_ORDER
        if columns[name] is None and config.policy.default_for(name) is None
    ]
    if lacking:
        similar = list(dict.fromkeys(c for name in lacking for c in _similar(tsv, name)))
        seen = f"; similar: {shorten([repr(c) for c in similar], limit=2)}" if similar else ""
        looked = ", ".join(f"{name} ({_looked_for(config, name)})" for name in lacking)
        fix = 'name yours in --demographics-config "columns" (participants.json: what each holds)'
        if all(name in VOLUME_FIELDS for name in lacking):
            fix = "--missing-volumes default takes the bundle defaults"
        raise BidsDatasetError(f"{path}: no column for {looked}{seen}; {fix}")
    return id_columns[0], columns


def _several_columns(tsv: Tsv, indices: list[int]) -> str:
    return "columns " + ", ".join(f"{i + 1} ({tsv.header[i]!r})" for i in indices)
