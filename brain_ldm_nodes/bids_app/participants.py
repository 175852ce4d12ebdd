"""``participants.tsv`` -> each participant's Brain LDM conditioning.

pybids finds ``participants.tsv`` / ``participants.json`` (:mod:`.dataset`); this module reads
the tsv's cells (leniently: UTF-8 BOM, CRLF, padded headers and cells, any-case column names;
columns chosen by :mod:`.columns`) and hands each row to
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
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from bids.layout import BIDSLayout

from ..annex import not_retrieved, retrieve_hint
from ..demographics import (
    CONDITIONING_ORDER,
    Conditioning,
    DemographicsError,
    DemographicsPolicy,
    canonical_code,
    normalise_demographics,
)
from .columns import BidsConfig, find_columns
from .dataset import existing_dir, load_layout, normalise_participant_label, shorten
from .errors import BidsDatasetError
from .sex_codes import effective_sex_policy

__all__ = [
    "BidsConfig",
    "BidsDatasetError",
    "MAX_PARTICIPANTS_TSV_BYTES",
    "Participant",
    "ParticipantsTable",
    "Tsv",
    "read_participants",
]


MAX_PARTICIPANTS_TSV_BYTES = 50 * 1024 * 1024
"""participants.tsv files larger than this (50 MiB) are refused rather than read."""


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
    root = existing_dir(bids_dir)
    wanted = _labels_filter(participant_labels)
    if layout is None:
        layout = load_layout(root, validate=validate)
    elif Path(layout.root).resolve() != root:
        raise BidsDatasetError(f"layout is of {layout.root}, not of {root}")

    tsv_path, json_path = _participants_files(layout, root)
    name = tsv_path.name
    tsv = _read_tsv(tsv_path)
    id_column, columns = find_columns(tsv, config, tsv_path)
    rows, problems = _index_rows(tsv, id_column, tsv_path, name)

    policy, unrecognised_levels = effective_sex_policy(
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
                f"--participant-label: {shorten(unknown, limit=5)} not found in {root} "
                f"(participants: {shorten(sorted(known))})"
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


@dataclass(frozen=True)
class Tsv:
    """A tab-separated file as trimmed cells, with each data row's line number."""

    header: tuple[str, ...]
    rows: tuple[tuple[int, tuple[str, ...]], ...]


def _cell(text: str) -> str:
    """Trimmed cell text; one pair of surrounding double quotes is removed."""
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] == '"':
        text = text[1:-1].replace('""', '"').strip()
    return text


def _read_tsv(path: Path) -> Tsv:
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
    return Tsv(tuple(header), rows)


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


def _index_rows(
    tsv: Tsv, id_column: int, path: Path, name: str
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
