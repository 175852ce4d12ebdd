"""A BIDS dataset -> each participant's Brain LDM conditioning (the BIDS App's reading layer).

No JAX and no Nipype here. pybids does the layout, the ``dataset_description.json``
validation, participant discovery and the lookup of ``participants.tsv`` /
``participants.json``; this module reads the tsv's cells (leniently: UTF-8 BOM, CRLF,
padded headers and cells, any-case column names) and hands each row to
:func:`brain_ldm_nodes.demographics.normalise_demographics`.

Two kinds of problem, kept apart:

* **Whole-dataset** problems raise :class:`BidsDatasetError` with one line naming the path
  and what is expected (missing or invalid dataset, unreadable/empty/huge
  ``participants.tsv``, no ``participant_id`` column, duplicate ids, a needed column that is
  absent with no default, numeric sex codes nobody explains, unknown participant labels).
* **Per-participant** problems never stop the others: the participant is returned with a
  one-line ``skip_reason`` such as ``participants.tsv row 4 (sub-03), column 'Age' ('89+'):
  89 years normalises to 1.184 ...``. Row numbers are line numbers of the file, the header
  being row 1 (what an editor or a spreadsheet shows).

Configuration (:class:`BidsConfig`, one JSON file)::

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
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from bids.exceptions import BIDSValidationError
from bids.layout import BIDSLayout

from .annex import not_retrieved, retrieve_hint
from .demographics import (
    CONDITIONING_ORDER,
    VOLUME_FIELDS,
    Conditioning,
    DemographicsError,
    DemographicsPolicy,
    canonical_code,
    is_missing,
    normalise_demographics,
    parse_sex,
)

__all__ = [
    "COLUMN_RULE",
    "DEFAULT_COLUMN_ALIASES",
    "MAX_PARTICIPANTS_TSV_BYTES",
    "BidsConfig",
    "BidsConfigError",
    "BidsDatasetError",
    "Participant",
    "ParticipantsTable",
    "find_preprocessed_t1w",
    "find_t1w_images",
    "read_derivatives_description",
    "load_layout",
    "normalise_participant_label",
    "read_participants",
    "default_column_rank",
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

MAX_PARTICIPANTS_TSV_BYTES = 50 * 1024 * 1024
"""participants.tsv files larger than this (50 MiB) are refused rather than read."""

_LABEL_RE = re.compile(r"^[0-9A-Za-z]+$")
_INTEGRAL_RE = re.compile(r"^[+-]?\d+(?:\.0*)?$")
_TSV_NAME = "participants.tsv"


class BidsDatasetError(ValueError):
    """The dataset as a whole cannot be read; the one-line message names the path."""


class BidsConfigError(DemographicsError):
    """A configuration file or value that cannot be used; the message names file and key."""


# --------------------------------------------------------------------------- labels


def normalise_participant_label(label: str, *, what: str = "participant label") -> str:
    """``"sub-01"`` or ``"01"`` -> ``"01"``; raises :class:`BidsDatasetError` if not a label.

    A BIDS label is letters and digits only.
    """
    text = str(label).strip()
    bare = text[4:] if text.startswith("sub-") else text
    if not _LABEL_RE.match(bare):
        raise BidsDatasetError(
            f"{what} {label!r} is not a BIDS participant label "
            "(accepted: letters and digits, with or without 'sub-', e.g. 01 or sub-01)"
        )
    return bare


# --------------------------------------------------------------------------- config


def _column_key(name: str) -> str:
    """How column names are compared: case-folded, trimmed, spaces/hyphens as underscores."""
    return re.sub(r"[\s\-]+", "_", name.strip()).casefold()


def _words_key(text: str) -> str:
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
    (rank 1). Volumes: :data:`DEFAULT_COLUMN_ALIASES` as :func:`_column_key` compares.
    """
    text = column.strip().casefold()
    note = None
    bracket = _BRACKET_RE.search(text)
    if bracket:
        note, text = _words_key(bracket.group(1)), text[: bracket.start()]
    key = _words_key(text)
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
    aliases = {_column_key(alias) for alias in DEFAULT_COLUMN_ALIASES.get(field_name, ())}
    return 0 if _column_key(column) in aliases else None


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
                key = _column_key(alias)
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
        source = Path(path)
        try:
            text = source.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise BidsConfigError(f"{source}: cannot read the configuration ({exc})") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BidsConfigError(f"{source}: not valid JSON ({exc})") from None
        return cls.from_dict(data, source=str(source))

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable; ``from_dict(to_dict())`` gives an equal config."""
        return {
            "columns": {name: list(aliases) for name, aliases in self.columns.items()},
            "policy": self.policy.to_dict(),
        }


# --------------------------------------------------------------------------- layout


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    if exc.__cause__ is not None:
        text += f" ({_one_line(exc.__cause__)})"
    return text


def _existing_dir(bids_dir: str | os.PathLike[str]) -> Path:
    path = Path(bids_dir).expanduser()
    if not path.exists():
        raise BidsDatasetError(f"{path}: the BIDS dataset directory does not exist")
    if not path.is_dir():
        raise BidsDatasetError(f"{path}: not a directory (expected the root of a BIDS dataset)")
    return path.resolve()


def load_layout(bids_dir: str | os.PathLike[str], *, validate: bool = True) -> BIDSLayout:
    """The pybids layout of ``bids_dir``; problems raise :class:`BidsDatasetError`.

    ``validate=True`` (the default, as in BIDS Apps): pybids requires a readable
    ``dataset_description.json`` with ``Name`` and ``BIDSVersion`` and indexes only files
    with BIDS names. ``validate=False`` (the App's ``--skip-bids-validation``) relaxes
    exactly that: the description may be missing, broken or incomplete, and every file is
    indexed. ``participants.tsv`` is needed either way (:func:`read_participants`).
    """
    root = _existing_dir(bids_dir)
    description = root / "dataset_description.json"
    if validate and not_retrieved(description):
        raise BidsDatasetError(retrieve_hint(description))
    try:
        return BIDSLayout(root, validate=validate)
    except BIDSValidationError as exc:
        raise BidsDatasetError(
            f"{root}: {_one_line(exc)} (to read it anyway, skip BIDS validation: "
            "validate=False, --skip-bids-validation)"
        ) from exc
    except (OSError, ValueError) as exc:
        missing = getattr(exc, "filename", None)
        if missing and not_retrieved(missing):  # pybids reads every JSON sidecar to index
            raise BidsDatasetError(
                f"{root}: pybids cannot index the dataset: {retrieve_hint(missing)} (and any "
                "other JSON file not retrieved: `datalad get` them all)"
            ) from exc
        raise BidsDatasetError(
            f"{root}: pybids cannot index the dataset: {_one_line(exc)}"
        ) from exc


def find_t1w_images(
    layout: BIDSLayout | str | os.PathLike[str],
    participant_label: str,
    *,
    session: str | None = None,
) -> tuple[Path, ...]:
    """A participant's raw T1w images (``anat/*_T1w.nii[.gz]``), sorted; empty if none.

    ``layout`` is a pybids layout or a dataset directory (then validated as in
    :func:`load_layout`). ``participant_label`` may carry ``sub-``; ``session`` (with or
    without ``ses-``) restricts to one session. All sessions and runs are returned
    otherwise: choosing among them is the caller's decision. In a DataLad / git-annex
    dataset the paths are the links (BIDS names), whether their content is retrieved or not
    (:func:`brain_ldm_nodes.annex.not_retrieved` tells).
    """
    if not isinstance(layout, BIDSLayout):
        layout = load_layout(layout)
    label = normalise_participant_label(participant_label, what="participant_label")
    filters: dict[str, Any] = {}
    if session is not None:
        bare = session[4:] if session.startswith("ses-") else session
        if not _LABEL_RE.match(bare):
            raise BidsDatasetError(
                f"session {session!r} is not a BIDS session label (letters and digits, "
                "with or without 'ses-')"
            )
        filters["session"] = bare
    files = layout.get(
        subject=label,
        suffix="T1w",
        extension=[".nii", ".nii.gz"],
        datatype="anat",
        return_type="filename",
        **filters,
    )
    return tuple(sorted(Path(f) for f in files))


#: ``space-`` labels of preprocessed T1w taken as already in MNI152 space (resampled onto the
#: model grid without registration), best first when one image exists in several.
MNI152_SPACE_PREFIX = "MNI152"
_SPACE_RANK = ("MNI152NLin2009cAsym", "MNI152NLin2009aSym", "MNI152NLin2009cSym",
               "MNI152NLin2009aAsym")
_PREPROC_RE = re.compile(r"^(?P<stem>sub-[0-9A-Za-z]+(?:_[0-9A-Za-z]+-[0-9A-Za-z]+)*)"
                         r"_T1w\.nii(?:\.gz)?$")


def read_derivatives_description(folder: str | os.PathLike[str], flag: str) -> dict[str, Any]:
    """The ``dataset_description.json`` of a derivatives folder (e.g. ``derivatives/fmriprep``)
    given as ``flag``; :class:`BidsDatasetError` (one line) if the folder is missing, has no
    such file, it is not a JSON object, or its ``DatasetType`` is not ``derivative``."""
    root = Path(folder)
    path = root / "dataset_description.json"
    if not root.is_dir():
        raise BidsDatasetError(f"{flag} {root}: not a folder (accepted: a BIDS derivatives "
                               "folder such as derivatives/fmriprep)")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BidsDatasetError(
            f"{flag} {root}: no dataset_description.json (accepted: a BIDS derivatives folder "
            "such as fMRIPrep's output, whose dataset_description.json has DatasetType "
            "derivative)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BidsDatasetError(f"{flag} {path}: not readable JSON ({exc})") from None
    if not isinstance(document, dict) or document.get("DatasetType") != "derivative":
        found = document.get("DatasetType", "raw") if isinstance(document, dict) else "?"
        raise BidsDatasetError(
            f"{flag} {path}: DatasetType is {found!r}, not 'derivative' (accepted: a BIDS "
            "derivatives folder such as derivatives/fmriprep)")
    return document


def _entity(stem: str, key: str) -> str | None:
    found = re.search(rf"(?:^|_){key}-([0-9A-Za-z]+)(?:_|$)", stem)
    return found.group(1) if found else None


def find_preprocessed_t1w(
    folder: str | os.PathLike[str], participant_label: str, *, t1w_space: str = "native"
) -> tuple[dict[Path, tuple[str, str | None]], list[str]]:
    """A participant's preprocessed T1w images in a derivatives folder (fMRIPrep's
    ``sub-<label>/[ses-<s>/]anat/*_desc-preproc_T1w.nii[.gz]``), one per output image:
    ``({path: (t1w_space, space label or None)}, notes)``.

    ``space-MNI152*`` images are already in MNI152 space: ``t1w_space`` ``"MNI"`` (only
    resampled onto the model grid). An image without ``space-`` is in the T1w's own space
    and is prepared like a raw T1w (``t1w_space``: registered for ``"native"``, conformed for
    ``"conform"``; left out for ``"MNI"``). Other spaces (``MNIPediatricAsym``, ``fsnative``,
    ...) are left out with a note. Images that differ only in ``space-``/``res-`` would make
    the same output: the first of MNI152NLin2009cAsym, the other MNI152NLin2009 variants, other
    MNI152 spaces, no space (then without ``res-`` first) is used, the others noted.
    """
    root = Path(folder)
    label = normalise_participant_label(participant_label, what="participant_label")
    candidates: dict[str, list[tuple[tuple[int, str], Path, str, str | None]]] = {}
    notes: list[str] = []
    subject = root / f"sub-{label}"
    for path in sorted([*subject.glob("anat/*_desc-preproc_T1w.nii*"),
                        *subject.glob("ses-*/anat/*_desc-preproc_T1w.nii*")]):
        match = _PREPROC_RE.match(path.name)
        if match is None or not match["stem"].startswith(f"sub-{label}_"):
            continue
        stem = match["stem"]
        relative = path.relative_to(root).as_posix()
        space, res = _entity(stem, "space"), _entity(stem, "res")
        if space is not None and space.startswith(MNI152_SPACE_PREFIX):
            prepared = "MNI"
            rank = _SPACE_RANK.index(space) if space in _SPACE_RANK else len(_SPACE_RANK)
        elif space is None and t1w_space != "MNI":
            prepared, rank = t1w_space, len(_SPACE_RANK) + 1
        else:
            why = (f"space-{space} is not an MNI152 space" if space is not None else
                   "it has no space- entity (the T1w's own space), and --t1w-space MNI says "
                   "the T1w are in MNI space")
            notes.append(f"{relative}: {why}; not used (accepted: space-MNI152*, resampled, or "
                         "no space-, registered with --t1w-space native)")
            continue
        key = "_".join(part for part in stem.split("_")
                       if not part.startswith(("space-", "res-", "desc-")))
        candidates.setdefault(key, []).append(((rank, res or ""), path, prepared, space))
    found: dict[Path, tuple[str, str | None]] = {}
    for key, options in candidates.items():
        options.sort(key=lambda option: option[0])
        _, chosen, prepared, space = options[0]
        found[chosen] = (prepared, space)
        for _, other, _, _ in options[1:]:
            notes.append(f"{other.relative_to(root).as_posix()}: not used; "
                         f"{chosen.relative_to(root).as_posix()} makes the same output ({key})")
    return found, notes


# --------------------------------------------------------------------------- participants.tsv


@dataclass(frozen=True)
class _Tsv:
    """A tab-separated file as trimmed cells, with each data row's line number."""

    header: tuple[str, ...]
    rows: tuple[tuple[int, tuple[str, ...]], ...]


def _cell(text: str) -> str:
    """Trimmed cell text; one pair of surrounding double quotes is removed."""
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] == '"':
        text = text[1:-1].replace('""', '"').strip()
    return text


def _read_tsv(path: Path) -> _Tsv:
    """Read ``path`` leniently (BOM, CRLF/CR, padded cells, blank lines) or raise one line."""
    try:
        size = path.stat().st_size
        if size > MAX_PARTICIPANTS_TSV_BYTES:
            raise BidsDatasetError(
                f"{path}: {size / 2**20:.1f} MiB is over the "
                f"{MAX_PARTICIPANTS_TSV_BYTES / 2**20:.0f} MiB limit for participants.tsv "
                "(it should hold one short row per participant)"
            )
        data = path.read_bytes()
    except OSError as exc:
        if not_retrieved(path):
            raise BidsDatasetError(retrieve_hint(path)) from exc
        raise BidsDatasetError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise BidsDatasetError(
            f"{path}: encoded as UTF-16; BIDS text files must be UTF-8 (re-save it as "
            "UTF-8 tab-separated text)"
        )
    if b"\x00" in data:
        raise BidsDatasetError(
            f"{path}: contains NUL bytes, so it is a binary file, not tab-separated UTF-8 text"
        )
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise BidsDatasetError(
            f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line}); BIDS text "
            "files must be UTF-8 (re-save it as UTF-8)"
        ) from None
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    numbered = [(number, line) for number, line in enumerate(lines, start=1) if line.strip()]
    if not numbered:
        raise BidsDatasetError(
            f"{path}: empty (expected a header row with participant_id, then one row per "
            "participant)"
        )
    header = [_cell(name) for name in numbered[0][1].split("\t")]
    while header and not header[-1]:
        header.pop()  # trailing tabs
    rows = tuple(
        (number, tuple(_cell(c) for c in line.split("\t"))) for number, line in numbered[1:]
    )
    if not rows:
        raise BidsDatasetError(
            f"{path}: has a header but no participant rows (expected one row per participant)"
        )
    return _Tsv(tuple(header), rows)


def _participants_files(layout: BIDSLayout, root: Path) -> tuple[Path, Path | None]:
    """``participants.tsv`` and ``participants.json`` at the dataset root, found by pybids."""

    def at_root(extension: str) -> Path | None:
        found = layout.get(suffix="participants", extension=extension, return_type="filename")
        top = sorted(Path(f) for f in found if Path(f).parent.resolve() == root)
        return top[0] if top else None

    tsv = at_root(".tsv")
    if tsv is None:
        raise BidsDatasetError(
            f"{root}: no participants.tsv at the dataset root (it must list each participant "
            "with sex, age and volumes; see bids_examples/README.md)"
        )
    return tsv, at_root(".json")


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
    return _shorten(list(aliases), limit=4)


def _similar(tsv: _Tsv, name: str) -> list[str]:
    """Header names that mention the field's main word (e.g. 'age_months' for age)."""
    words = {"sex": ("sex", "gender"), "age": ("age",),
             "ventricular_volume": ("ventric", "csf", "vcsf"), "brain_volume": ("brain",)}[name]
    return [column for column in tsv.header
            if any(word in _words_key(column).split("_") or
                   (len(word) > 4 and word in _words_key(column)) for word in words)]


def _find_columns(
    tsv: _Tsv, config: BidsConfig, path: Path
) -> tuple[int, dict[str, int | None]]:
    """Index of ``participant_id`` and of each field's column (None when absent).

    Fields whose aliases are the defaults follow :func:`default_column_rank` (two columns of
    the best rank are an error naming both); configured aliases are matched as
    :func:`_column_key` compares them, first alias found wins.
    """
    keys = [_column_key(name) if name else "" for name in tsv.header]
    id_columns = [i for i, key in enumerate(keys) if key == "participant_id"]
    if not id_columns:
        found = _shorten([repr(name) for name in tsv.header], limit=4)
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
            hits = [i for i, key in enumerate(keys) if key == _column_key(alias)]
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
        seen = f"; similar: {_shorten([repr(c) for c in similar], limit=2)}" if similar else ""
        looked = ", ".join(f"{name} ({_looked_for(config, name)})" for name in lacking)
        fix = 'name yours in --demographics-config "columns" (participants.json: what each holds)'
        if all(name in VOLUME_FIELDS for name in lacking):
            fix = "--missing-volumes default takes the bundle defaults"
        raise BidsDatasetError(f"{path}: no column for {looked}{seen}; {fix}")
    return id_columns[0], columns


def _several_columns(tsv: _Tsv, indices: list[int]) -> str:
    return "columns " + ", ".join(f"{i + 1} ({tsv.header[i]!r})" for i in indices)


def _index_rows(
    tsv: _Tsv, id_column: int, path: Path, name: str
) -> tuple[dict[str, tuple[int, tuple[str, ...]]], list[str]]:
    """label -> (line, cells); rows without a usable participant_id become problems."""
    rows: dict[str, tuple[int, tuple[str, ...]]] = {}
    lines: dict[str, list[int]] = {}
    problems: list[str] = []
    for number, cells in tsv.rows:
        given = cells[id_column] if id_column < len(cells) else ""
        try:
            label = normalise_participant_label(given, what="participant_id")
        except BidsDatasetError as exc:
            problems.append(f"{name} row {number}: {exc}; row ignored")
            continue
        lines.setdefault(label, []).append(number)
        rows.setdefault(label, (number, cells))
    duplicates = [
        f"sub-{label} in rows {', '.join(map(str, numbers))}"
        for label, numbers in lines.items()
        if len(numbers) > 1
    ]
    if duplicates:
        shown = "; ".join(duplicates[:3]) + (f"; ... ({len(duplicates)} in all)"
                                              if len(duplicates) > 3 else "")
        raise BidsDatasetError(
            f"{path}: duplicate participant_id: {shown} (each participant needs exactly one row)"
        )
    return rows, problems


# --------------------------------------------------------------------------- sex codes


def _column_metadata(metadata: Mapping[str, Any], column: str) -> Mapping[str, Any]:
    """participants.json entry for ``column`` (exact name first, then as columns compare)."""
    entry = metadata.get(column)
    if entry is None:
        matches = [v for k, v in metadata.items() if _column_key(k) == _column_key(column)]
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
    words = {code: v for code, v in policy.sex_codes.items() if not _INTEGRAL_RE.match(code)}
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
        shown = _shorten([f"{code!r} = {text[:30]!r}" for code, text in unrecognised.items()],
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
    if not present or not all(_INTEGRAL_RE.match(code) for code in present):
        return
    if any(code in policy.sex_codes for code in present):
        return
    raise BidsDatasetError(
        f"{path}: column {column!r} holds only numeric codes ({_shorten(present, limit=3)}); "
        'say which is female or male in participants.json "Levels" or --demographics-config '
        '"sex_codes"'
    )


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Participant:
    """One participant: its conditioning, or why it is skipped.

    * ``label``: without ``sub-``.
    * ``row``: line number in participants.tsv (header = row 1); None without a row.
    * ``raw``: the cells used, keyed by their column names as written in the header.
    * ``conditioning``: the normalised values and their record, when usable.
    * ``skip_reason``: one line naming the file, row, column, the problem and what is
      accepted, when not.
    * ``skip_kind``: the reason in a word, for grouping: a
      :data:`~brain_ldm_nodes.demographics.SKIP_KINDS` entry, ``sex_other`` (Levels
      describe the code as neither female nor male), ``no_row``, ``no_folder``,
      ``shifted_row`` or ``other``.
    """

    label: str
    row: int | None
    raw: Mapping[str, str]
    conditioning: Conditioning | None = None
    skip_reason: str | None = None
    skip_kind: str | None = None

    def __post_init__(self) -> None:
        if (self.conditioning is None) == (self.skip_reason is None):
            raise ValueError("a Participant has either conditioning or a skip_reason")
        if self.skip_reason is not None and self.skip_kind is None:
            object.__setattr__(self, "skip_kind", "other")
        object.__setattr__(self, "raw", MappingProxyType(dict(self.raw)))

    @property
    def usable(self) -> bool:
        return self.conditioning is not None

    @property
    def participant_id(self) -> str:
        return f"sub-{self.label}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary (for logs and sidecars)."""
        conditioning = self.conditioning
        return {
            "participant_id": self.participant_id,
            "row": self.row,
            "raw": dict(self.raw),
            "conditioning": None if conditioning is None else conditioning.as_dict(),
            "record": None if conditioning is None else dict(conditioning.record),
            "skip_reason": self.skip_reason,
            "skip_kind": self.skip_kind,
        }


@dataclass(frozen=True)
class ParticipantsTable:
    """What :func:`read_participants` found, one :class:`Participant` per label (sorted).

    ``columns`` maps each conditioning field to the tsv column used (None: absent, so the
    policy default applies). ``policy`` is the policy applied, with any sex codes taken
    from participants.json Levels. ``problems`` are one-line notes not tied to a
    participant (rows without a valid participant_id, subject folders pybids does not index).
    """

    bids_dir: Path
    tsv_path: Path
    json_path: Path | None
    columns: Mapping[str, str | None]
    policy: DemographicsPolicy
    participants: tuple[Participant, ...]
    problems: tuple[str, ...] = ()

    def __iter__(self) -> Iterator[Participant]:
        return iter(self.participants)

    def __len__(self) -> int:
        return len(self.participants)

    def __getitem__(self, label: str) -> Participant:
        """The participant with ``label`` (with or without ``sub-``); KeyError if absent."""
        bare = label[4:] if label.startswith("sub-") else label
        for participant in self.participants:
            if participant.label == bare:
                return participant
        raise KeyError(label)

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(p.label for p in self.participants)

    @property
    def usable(self) -> tuple[Participant, ...]:
        return tuple(p for p in self.participants if p.usable)

    @property
    def skipped(self) -> tuple[Participant, ...]:
        return tuple(p for p in self.participants if not p.usable)


# --------------------------------------------------------------------------- reading


def _labels_filter(participant_labels: str | Iterable[str] | None) -> list[str] | None:
    if participant_labels is None:
        return None
    if isinstance(participant_labels, str):
        participant_labels = [participant_labels]
    labels: list[str] = []
    for given in participant_labels:
        label = normalise_participant_label(given, what="--participant-label")
        if label not in labels:
            labels.append(label)
    if not labels:
        raise BidsDatasetError("--participant-label: no labels given")
    return labels


def read_participants(
    bids_dir: str | os.PathLike[str],
    config: BidsConfig | None = None,
    *,
    participant_labels: str | Iterable[str] | None = None,
    layout: BIDSLayout | None = None,
    validate: bool = True,
) -> ParticipantsTable:
    """Every participant of ``bids_dir`` (or those in ``participant_labels``) with its
    conditioning or a skip reason.

    Participants are the subject folders pybids finds plus the rows of participants.tsv;
    one without the other is returned with a skip reason, as is one whose values cannot be
    used (unknown code, unparseable age, out of range under ``out_of_range="error"``,
    missing without a default, ...). ``participant_labels`` (with or without ``sub-``)
    restricts the result; labels found in neither raise. ``layout`` reuses a pybids layout
    of the same directory (``validate`` then does nothing; see :func:`load_layout`).

    Whole-dataset problems raise :class:`BidsDatasetError` (see the module docstring).
    """
    config = config if config is not None else BidsConfig()
    root = _existing_dir(bids_dir)
    wanted = _labels_filter(participant_labels)
    if layout is None:
        layout = load_layout(root, validate=validate)
    elif Path(layout.root).resolve() != root:
        raise BidsDatasetError(f"layout is of {layout.root}, not of {root}")

    tsv_path, json_path = _participants_files(layout, root)
    name = tsv_path.name
    tsv = _read_tsv(tsv_path)
    id_column, columns = _find_columns(tsv, config, tsv_path)
    rows, problems = _index_rows(tsv, id_column, tsv_path, name)

    policy, unrecognised_levels = _effective_sex_policy(
        config.policy, layout, tsv, columns["sex"], rows, tsv_path, json_path
    )

    folders = set(layout.get_subjects())
    for folder in sorted(root.glob("sub-*")):
        label = folder.name[4:]
        if folder.is_dir() and label not in folders and label not in rows:
            problems.append(
                f"{folder.name}/: no files that pybids indexes as BIDS and no row in {name}; "
                "ignored"
            )
    known = set(rows) | folders
    if wanted is not None:
        unknown = [label for label in wanted if label not in known]
        if unknown:
            raise BidsDatasetError(
                f"--participant-label: {_shorten(unknown, limit=5)} not found in {root} "
                f"(participants: {_shorten(sorted(known))})"
            )
    reader = _Reader(
        root=root,
        name=name,
        header=tsv.header,
        columns=columns,
        rows=rows,
        folders=frozenset(folders),
        policy=policy,
        unrecognised_levels=unrecognised_levels,
        json_name=json_path.name if json_path is not None else "participants.json",
    )
    labels = sorted(known) if wanted is None else sorted(wanted)
    return ParticipantsTable(
        bids_dir=root,
        tsv_path=tsv_path,
        json_path=json_path,
        columns=MappingProxyType(
            {f: (None if i is None else tsv.header[i]) for f, i in columns.items()}
        ),
        policy=policy,
        participants=tuple(reader.participant(label) for label in labels),
        problems=tuple(problems),
    )


def _effective_sex_policy(
    policy: DemographicsPolicy,
    layout: BIDSLayout,
    tsv: _Tsv,
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


def _shorten(labels: list[str], limit: int = 10) -> str:
    if not labels:
        return "none"
    more = f", ... ({len(labels)} in all)" if len(labels) > limit else ""
    return ", ".join(labels[:limit]) + more


@dataclass(frozen=True)
class _Reader:
    """Turns a participant label and its participants.tsv row into a :class:`Participant`."""

    root: Path
    name: str
    header: tuple[str, ...]
    columns: Mapping[str, int | None]
    rows: Mapping[str, tuple[int, tuple[str, ...]]]
    folders: frozenset[str]
    policy: DemographicsPolicy
    unrecognised_levels: Mapping[str, str]
    json_name: str

    def participant(self, label: str) -> Participant:
        if label not in self.rows:
            reason = f"sub-{label}: no row in {self.name} (add one with its sex and age)"
            return Participant(label, None, {}, skip_reason=reason, skip_kind="no_row")
        number, cells = self.rows[label]
        where = f"{self.name} row {number} (sub-{label})"
        raw = {
            self.header[i]: (cells[i] if i < len(cells) else "")
            for i in self.columns.values()
            if i is not None
        }
        if label not in self.folders:
            folder = self.root / f"sub-{label}"
            indexed_nothing = "holds no files that pybids indexes as BIDS"
            what = indexed_nothing if folder.is_dir() else "does not exist"
            return Participant(
                label, number, raw, skip_reason=f"{where}: folder sub-{label}/ {what}",
                skip_kind="no_folder",
            )
        if any(cells[len(self.header):]):
            return Participant(
                label,
                number,
                raw,
                skip_reason=f"{where}: {len(cells)} cells but the header has "
                f"{len(self.header)} columns, so its values may be shifted (accepted: one "
                "tab-separated cell per header column)",
                skip_kind="shifted_row",
            )
        values = {
            field_name: (cells[i] if i < len(cells) else None)
            for field_name, i in self.columns.items()
            if i is not None
        }
        why = {}
        for field_name, index in self.columns.items():
            if index is None:
                why[field_name] = f"{self.name} has no {field_name} column"
            else:
                cell = values.get(field_name) or ""
                why[field_name] = f"{where}, column '{self.header[index]}' is '{cell}'"
        try:
            conditioning = normalise_demographics(values, self.policy, missing_reasons=why)
        except DemographicsError as exc:
            kind = exc.kind or "other"
            cell = values.get("sex") or ""
            if kind == "sex_unknown" and cell and canonical_code(cell) in self.unrecognised_levels:
                kind = "sex_other"
            return Participant(label, number, raw, skip_reason=self._reason(where, exc, values),
                               skip_kind=kind)
        return Participant(label, number, raw, conditioning=conditioning)

    def _reason(
        self, where: str, exc: DemographicsError, values: Mapping[str, str | None]
    ) -> str:
        """``<where>, column '<name>' ('<cell>'): <what DemographicsError said>``."""
        message = str(exc)
        for field_name in CONDITIONING_ORDER:
            prefix = f"{field_name}: "
            index = self.columns.get(field_name)
            if not message.startswith(prefix) or index is None:
                continue
            detail = message[len(prefix):]
            cell = values.get(field_name) or ""
            column = f"column '{self.header[index]}'"
            if cell and cell not in detail:
                column += f" ('{cell}')"
            description = self.unrecognised_levels.get(canonical_code(cell)) if cell else None
            if field_name == "sex" and description is not None:
                detail += (
                    f"; {self.json_name} Levels describe '{cell}' as '{description}', which "
                    "is neither female nor male"
                )
            return f"{where}, {column}: {detail}"
        return f"{where}: {message}"
