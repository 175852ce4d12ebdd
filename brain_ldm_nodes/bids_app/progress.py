"""What a participant-level run prints: a line per image started and written (with the time
left), the columns used, skipped participants grouped by reason, and the summary.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..demographics import VOLUME_FIELDS
from .logs import log

if TYPE_CHECKING:  # pragma: no cover
    from .participants import ParticipantsTable

__all__ = [
    "Progress",
    "log",
    "print_summary",
    "report_columns",
    "skip_summary",
]


@dataclass
class Progress:
    """Nipype ``status_callback``: one line when an image starts and when it is written,
    with the time it took, the running count and an estimate of the time left.

    The estimate uses the pace since the first image was written (the first includes
    compilation and loading, which later images do not repeat), so there is none before
    the second image."""

    requests: Sequence[Any]
    started_at: float = field(default_factory=time.monotonic)
    written: list[str] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)
    _starts: dict[str, float] = field(default_factory=dict)
    _first_written_at: float | None = None

    def __post_init__(self) -> None:
        self._by_stem = {request.stem: request for request in self.requests}

    def _requests_of(self, node: Any) -> tuple[list[Any], str]:
        """The requests a node works on (a counterfactual node: several) and its kind."""
        from ..interfaces import (
            CounterfactualSeriesT1w,
            PublishDerivative,
            ResampleToSource,
            SampleT1w,
        )

        interface = node.interface
        if isinstance(interface, SampleT1w):
            stems, kind = [node.inputs.out_prefix], "sample"
        elif isinstance(interface, CounterfactualSeriesT1w):  # model-grid stems: all spaces
            made = set(node.inputs.out_prefixes)
            return [r for r in self.requests if getattr(r, "grid_stem", None) in made], "sample"
        elif isinstance(interface, ResampleToSource):
            stems, kind = [node.inputs.out_prefix], "resample"
        elif isinstance(interface, PublishDerivative):
            stems, kind = [Path(node.inputs.out_file).name[: -len(".nii.gz")]], "publish"
        else:
            return [], ""
        return [self._by_stem[stem] for stem in stems if stem in self._by_stem], kind

    def __call__(self, node: Any, status: str) -> None:
        requests, kind = self._requests_of(node)
        if not requests:
            return
        if kind == "sample" and status == "start":
            for request in requests:
                self._starts[request.stem] = time.monotonic()
            log.info("%s", requests[0].start_message)
        elif status == "exception":
            for request in requests:
                self.failures[request.stem] = _node_failure(node)
            log.info("%s FAILED: %s", requests[0].title, self.failures[requests[0].stem])
        else:
            self._progress(requests[0], kind, status)

    def _progress(self, request: Any, kind: str, status: str) -> None:
        stem = request.stem
        if kind == "publish" and status == "end":
            if stem in self.failures:  # Linear reports "end" for the nodes it skips
                return
            self.written.append(stem)
            now = time.monotonic()
            took = now - self._starts.get(stem, now)
            per_step = took / request.num_inference_steps
            done, total = len(self.written), len(self.requests)
            left = ""
            if self._first_written_at is None:
                self._first_written_at = now
            elif done < total:
                pace = (now - self._first_written_at) / (done - 1)  # after compilation
                left = f"; about {_duration(pace * (total - done))} left"
            log.info("[%d/%d] %s done in %s (%s per step): %s%s", done, total, request.title,
                     _duration(took), _duration(per_step), request.relative_path, left)


def _node_failure(node: Any) -> str:
    """The last line of a failed node's traceback (from its result file)."""
    try:
        text = node.result.runtime.traceback or ""
    except Exception:  # no result file: the crash file is all there is
        text = ""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[-1] if lines else f"node {node.fullname} failed (see its crash file)"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def report_columns(table: ParticipantsTable) -> None:
    """One line: which participants.tsv column each field comes from; one line per volume
    that takes a default (no column: everyone; empty cells: how many)."""
    used = ", ".join(f"{name} {column!r}" for name, column in table.columns.items() if column)
    log.info("%s columns: %s", table.tsv_path.name, used or "none")
    absent = [name for name in VOLUME_FIELDS if table.columns[name] is None]
    defaults = {name: table.policy.default_for(name) for name in VOLUME_FIELDS}
    if absent and all(defaults[name] for name in absent):
        values = " and ".join(f"{defaults[name][0]:g}" for name in absent)
        source = "the MONAI bundle's default" if all(
            defaults[name][1].startswith("MONAI") for name in absent) else "the set default"
        log.info("note: %s has no %s column: all participants get %s%s %s (recorded in "
                 "sidecars; --volume-defaults, --missing-volumes)", table.tsv_path.name,
                 " or ".join(absent), source, "s" if len(absent) > 1 else "", values)
    for name in VOLUME_FIELDS:
        if table.columns[name] is None or defaults[name] is None:
            continue
        count = sum(1 for p in table.usable if p.conditioning.record[name].get("defaulted"))
        if count:
            who = "1 participant has" if count == 1 else f"{count} participants have"
            log.info("note: %s no value in column %r: the %s default %g is used (recorded)",
                     who, table.columns[name], name, defaults[name][0])


_SKIP_GROUPS = {  # kind -> (who, what would include them); {lo}, {hi}: the age range
    "age_below": ("younger than {lo:g} y (training range {lo:g}–{hi:g} y)",
                  "--out-of-range clip samples them at the range edge (recorded)"),
    "age_above": ("older than {hi:g} y (training range {lo:g}–{hi:g} y)",
                  "--out-of-range clip samples them at the range edge (recorded)"),
    "volume_out_of_range": ("with a volume outside [0, 1] after normalisation",
                            "--out-of-range clip uses the range edge (recorded)"),
    "volume_mm3_no_range": ("with volumes in mm³ but no reference range",
                            "set *_range_mm3 in --demographics-config (an approximation)"),
    "volume_missing": ("without a volume value",
                       "--missing-volumes default uses the volume defaults (recorded)"),
    "volume_unparsed": ("whose volume is not a number", "correct participants.tsv"),
    "age_missing": ("without an age (n/a or empty)", "add it to participants.tsv"),
    "age_unparsed": ("whose age is not in years", "correct it (accepted: 63, 63.5, 35-40, 89+)"),
    "sex_missing": ("without a sex (n/a or empty)", "add it to participants.tsv"),
    "sex_unknown": ("with a sex code that means neither F nor M here ({codes})",
                    "describe it in participants.json Levels or map it in "
                    "--demographics-config sex_codes"),
    "sex_other": ("whose sex participants.json describes as neither female nor male",
                  "the model's sex value cannot express it"),
    "no_row": ("with a folder but no participants.tsv row", "add their rows"),
    "no_folder": ("with a participants.tsv row but no sub-<label>/ folder",
                  "check participant_id against the folders"),
    "shifted_row": ("whose row has more cells than the header", "correct those rows"),
    "other": ("for other reasons", "see the lines above"),
}


def skip_summary(table: ParticipantsTable) -> list[str]:
    """The skipped participants of ``table`` grouped by reason, one line per group with the
    count and what would include them (the per-participant lines come earlier)."""
    groups: dict[str, list[Any]] = {}
    for participant in table.skipped:
        kind = participant.skip_kind if participant.skip_kind in _SKIP_GROUPS else "other"
        groups.setdefault(kind, []).append(participant)
    policy, lines = table.policy, []
    for kind, (who, fix) in _SKIP_GROUPS.items():
        members = groups.get(kind)
        if not members:
            continue
        codes = sorted({str(p.raw.get(table.columns["sex"] or "", "")).strip()
                        for p in members} - {""})
        shown = ", ".join(repr(code) for code in codes[:3]) + (", ..." if len(codes) > 3 else "")
        text = who.format(lo=policy.age_min_years, hi=policy.age_max_years, codes=shown)
        noun = "participant" if len(members) == 1 else "participants"
        lines.append(f"{len(members)} {noun} {text}: {fix}")
    clipped = sum(1 for p in table.usable
                  if any(entry.get("clipped") for entry in p.conditioning.record.values()))
    if clipped:
        lines.append(f"{clipped} participants sampled at a range edge (--out-of-range clip; "
                     "recorded as clipped in their sidecars)")
    return lines


def print_summary(table: ParticipantsTable, written: int, complete: Sequence[Any],
                  refreshed: Sequence[Any], failures: Mapping[str, str],
                  requests: Sequence[Any]) -> None:
    """The run's last lines: counts, skipped participants by reason, each failed image."""
    by_stem = {request.stem: request for request in requests}
    log.info("summary: %d images written, %d already complete, %d sidecars updated, "
             "%d failed; %d participants skipped", written, len(complete), len(refreshed),
             len(failures), len(table.skipped))
    for line in skip_summary(table):
        log.info("  %s", line)
    for stem, reason in failures.items():
        log.info("  failed %s: %s", by_stem[stem].title, reason)
