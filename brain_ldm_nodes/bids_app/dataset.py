"""The pybids layer of the App's reading side: the dataset's layout, participant labels, a
participant's raw T1w images and preprocessed ones in a derivatives folder (fMRIPrep).

No JAX and no Nipype here. Whole-dataset problems raise :class:`BidsDatasetError` with one line
naming the path and what is expected.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from bids.exceptions import BIDSValidationError
from bids.layout import BIDSLayout

from ..annex import not_retrieved, retrieve_hint
from .errors import BidsDatasetError, one_line

__all__ = [
    "BidsDatasetError",
    "LABEL_RE",
    "MNI152_SPACE_PREFIX",
    "existing_dir",
    "find_preprocessed_t1w",
    "find_t1w_images",
    "load_layout",
    "normalise_participant_label",
    "read_derivatives_description",
    "shorten",
]


LABEL_RE = re.compile(r"^[0-9A-Za-z]+$")


def normalise_participant_label(label: str, *, what: str = "participant label") -> str:
    """``"sub-01"`` or ``"01"`` -> ``"01"``; raises :class:`BidsDatasetError` if not a label.

    A BIDS label is letters and digits only.
    """
    text = str(label).strip()
    bare = text[4:] if text.startswith("sub-") else text
    if not LABEL_RE.match(bare):
        raise BidsDatasetError(
            f"{what} {label!r} is not a BIDS participant label "
            "(accepted: letters and digits, with or without 'sub-', e.g. 01 or sub-01)"
        )
    return bare


def shorten(labels: list[str], limit: int = 10) -> str:
    if not labels:
        return "none"
    more = f", ... ({len(labels)} in all)" if len(labels) > limit else ""
    return ", ".join(labels[:limit]) + more


def existing_dir(bids_dir: str | os.PathLike[str]) -> Path:
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
    root = existing_dir(bids_dir)
    description = root / "dataset_description.json"
    if validate and not_retrieved(description):
        raise BidsDatasetError(retrieve_hint(description))
    try:
        return BIDSLayout(root, validate=validate)
    except BIDSValidationError as exc:
        raise BidsDatasetError(
            f"{root}: {one_line(exc, first_line=True)} (to read it anyway, skip BIDS "
            "validation: validate=False, --skip-bids-validation)"
        ) from exc
    except (OSError, ValueError) as exc:
        missing = getattr(exc, "filename", None)
        if missing and not_retrieved(missing):  # pybids reads every JSON sidecar to index
            raise BidsDatasetError(
                f"{root}: pybids cannot index the dataset: {retrieve_hint(missing)} (and any "
                "other JSON file not retrieved: `datalad get` them all)"
            ) from exc
        raise BidsDatasetError(
            f"{root}: pybids cannot index the dataset: {one_line(exc, first_line=True)}"
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
        if not LABEL_RE.match(bare):
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
