"""The output folder: where it may be, creating it, and the stale and temporary files a run
removes (images the current ``--n-samples`` does not make, unused transforms, ``.*.tmp-*``).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable
from pathlib import Path

from .errors import OutputDirError
from .naming import (
    COUNTERFACTUAL_DESC,
    DEFAULT_WORK_DIR_NAME,
    DESC,
    GROUP_DIR_NAME,
    image_relative_path,
    read_sidecar,
    sidecar_path,
)

__all__ = [
    "check_creatable",
    "check_locations",
    "check_writable",
    "counterfactual_sidecars",
    "default_work_dir",
    "prepare_output_dir",
    "remove_image",
    "remove_stale_temporaries",
    "remove_stale_top_level_temporaries",
    "stale_synthetic_images",
    "stale_transforms",
]


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_locations(
    bids_dir: Path, output_dir: Path, work_dir: Path | None = None
) -> None:
    """Refuse output and work folders that would write into the raw dataset.

    ``output_dir`` may be under ``bids_dir/derivatives/`` (the BIDS convention) but not
    elsewhere inside ``bids_dir``, not ``bids_dir`` itself and not a folder containing it.
    Raises :class:`OutputDirError`.
    """
    bids = Path(bids_dir).resolve()
    suggestion = bids / "derivatives" / "brain-ldm"
    for flag, path in (("output_dir", output_dir), ("-w/--work-dir", work_dir)):
        if path is None:
            continue
        where = Path(path).expanduser().resolve()
        if where == bids:
            raise OutputDirError(
                f"{flag} {where} is bids_dir itself; outputs must not be mixed into the raw "
                f"dataset (suggested: {suggestion})"
            )
        if _is_within(bids, where):
            raise OutputDirError(
                f"{flag} {where} contains bids_dir {bids}; choose a folder outside it "
                f"(suggested: {suggestion})"
            )
        if _is_within(where, bids) and not _is_within(where, bids / "derivatives"):
            raise OutputDirError(
                f"{flag} {where} is inside bids_dir {bids} but not under its derivatives/ "
                f"folder, so files written there would read as raw data (suggested: {suggestion})"
            )
        if where.exists() and not where.is_dir():
            raise OutputDirError(f"{flag} {where} exists and is not a directory")
    if work_dir is not None and Path(work_dir).expanduser().resolve() == Path(output_dir).resolve():
        raise OutputDirError(
            f"-w/--work-dir {work_dir} is output_dir itself; Nipype's folders would mix with the "
            f"derivatives (default: output_dir/{DEFAULT_WORK_DIR_NAME})"
        )


def check_creatable(output_dir: Path) -> None:
    """Refuse an ``output_dir`` that cannot be created or written, without creating it:
    its nearest existing ancestor must be a folder this process may write into.
    Raises :class:`OutputDirError` (the words :func:`prepare_output_dir` would use)."""
    path = Path(output_dir).expanduser().resolve()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    problem = None
    if not existing.is_dir():
        problem = os.strerror(20)  # ENOTDIR: "Not a directory"
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = os.strerror(13)  # EACCES: "Permission denied"
    if problem is not None:
        what = "not writable" if existing == path else "cannot create it"
        raise OutputDirError(
            f"output_dir {path}: {what} ({problem}); choose a folder you can write to"
        )


def prepare_output_dir(output_dir: Path) -> Path:
    """Create ``output_dir`` (and parents) if needed; :class:`OutputDirError` if that fails."""
    path = Path(output_dir).expanduser().resolve()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputDirError(
            f"output_dir {path}: cannot create it ({exc.strerror or exc}); choose a folder you "
            "can write to"
        ) from None
    return path


def check_writable(folder: Path) -> None:
    """Create and remove a hidden file in ``folder``; raise :class:`OutputDirError` if refused."""
    probe = folder / f".brain-ldm-bids-probe-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OutputDirError(
            f"output_dir {folder}: not writable ({exc.strerror or exc}); choose a folder you "
            "can write to"
        ) from None


def default_work_dir(output_dir: str | os.PathLike[str], labels: Iterable[str]) -> Path:
    """``output_dir/.brain-ldm-bids-work/<run>``: one work folder per set of participants,
    so that concurrent runs on other participants (array tasks) never share or remove it, and
    re-running the same command finds its own (Nipype's cache) again. ``<run>`` is
    ``sub-<label>`` for one participant, else ``participants-<sha256 of the labels>[:12]``."""
    unique = sorted(set(labels))
    if len(unique) == 1:
        run = f"sub-{unique[0]}"
    else:
        run = "participants-" + hashlib.sha256(" ".join(unique).encode()).hexdigest()[:12]
    return Path(output_dir) / DEFAULT_WORK_DIR_NAME / run


def stale_synthetic_images(
    output_dir: str | os.PathLike[str], label: str, n_samples: int
) -> list[Path]:
    """Synthetic images of ``sub-<label>`` that a request for ``n_samples`` images does not
    produce: ``sub-<label>_desc-synthetic_T1w`` when ``n_samples > 1``, ``_run-<k>_`` ones
    when ``n_samples == 1`` or ``k > n_samples`` (sweeps and counterfactuals are not touched).
    """
    folder = Path(output_dir) / f"sub-{label}" / "anat"
    wanted = {image_relative_path(label, i, n_samples).name for i in range(n_samples)}
    pattern = re.compile(rf"^sub-{re.escape(label)}(?:_run-[1-9][0-9]*)?_desc-{DESC}_T1w\.nii\.gz$")
    found = [path for path in folder.glob(f"sub-{label}*_desc-{DESC}_T1w.*")]
    images = {p if p.name.endswith(".nii.gz") else p.with_name(p.name[:-5] + ".nii.gz")
              for p in found if p.name.endswith((".nii.gz", ".json"))}
    return sorted(p for p in images if pattern.match(p.name) and p.name not in wanted)


def stale_transforms(output_dir: str | os.PathLike[str], label: str) -> list[Path]:
    """Registration transforms of ``sub-<label>`` (``*_from-T1w_to-*_xfm.txt``) that no image
    sidecar of the participant names in ``RegistrationTransform`` any more, e.g. after a run
    with ``--t1w-space conform`` (no registration) or from a ``--t1w-derivatives`` source in
    MNI space over an earlier registered one."""
    folder = Path(output_dir)
    subject = folder / f"sub-{label}"
    transforms = sorted([*subject.glob("anat/*_from-T1w_to-*_xfm.txt"),
                         *subject.glob("ses-*/anat/*_from-T1w_to-*_xfm.txt")])
    if not transforms:
        return []
    named = set()
    for sidecar in [*subject.glob("anat/*_T1w.json"), *subject.glob("ses-*/anat/*_T1w.json")]:
        document = read_sidecar(sidecar)
        if isinstance(document, dict) and isinstance(document.get("RegistrationTransform"), str):
            named.add(document["RegistrationTransform"])
    return [path for path in transforms
            if f"bids::{path.relative_to(folder).as_posix()}" not in named]


def remove_image(image: Path) -> None:
    """Remove an output image and its sidecar: the sidecar first, so that an interrupted
    removal leaves at most an image without a sidecar (left out of the group report, and
    removed or redone by the next run), never a sidecar describing a missing image."""
    sidecar_path(image).unlink(missing_ok=True)
    image.unlink(missing_ok=True)


def counterfactual_sidecars(output_dir: str | os.PathLike[str]) -> list[Path]:
    """The sidecars of every counterfactual image in ``output_dir``."""
    folder = Path(output_dir)
    return sorted([*folder.glob(f"sub-*/anat/*_desc-{COUNTERFACTUAL_DESC}*_T1w.json"),
                   *folder.glob(f"sub-*/ses-*/anat/*_desc-{COUNTERFACTUAL_DESC}*_T1w.json")])


def remove_stale_temporaries(
    output_dir: str | os.PathLike[str], labels: Iterable[str] | None = None
) -> list[Path]:
    """Remove the hidden ``.*.tmp-*`` files a killed run leaves.

    ``labels=None``: everywhere (call it holding :class:`OutputLock` exclusively). With
    ``labels``: in those participants' folders and in ``group/`` only (call it holding their
    :class:`ParticipantLocks`; other participants' temporaries may belong to a live run); the
    top-level ones under :meth:`ParticipantLocks.dataset_files`.
    """
    folder = Path(output_dir)
    if labels is None:
        patterns = [".*.tmp-*", "sub-*/anat/.*.tmp-*", "sub-*/ses-*/anat/.*.tmp-*"]
    else:
        patterns = [f"sub-{label}/{where}anat/.*.tmp-*" for label in labels
                    for where in ("", "ses-*/")]
    patterns += [f"{GROUP_DIR_NAME}/.*.tmp-*", f"{GROUP_DIR_NAME}/*/.*.tmp-*"]
    removed = []
    for pattern in patterns:
        for path in sorted(folder.glob(pattern)):
            if path.is_file():
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def remove_stale_top_level_temporaries(output_dir: str | os.PathLike[str]) -> list[Path]:
    """The top-level ``.*.tmp-*`` files (call it under :meth:`ParticipantLocks.dataset_files`)."""
    removed = []
    for path in sorted(Path(output_dir).glob(".*.tmp-*")):
        if path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed
