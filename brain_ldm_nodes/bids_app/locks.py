"""Who may write into the output folder: ``flock`` locks (the whole folder, each participant)
and records of SLURM submissions whose jobs outlive the command.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..imaging import write_json
from .errors import LockHeldError, OutputDirError
from .naming import LOCK_NAME, LOCKS_DIR_NAME
from .output_dir import check_writable

__all__ = [
    "OutputLock",
    "ParticipantLocks",
    "SUBMISSION_SUFFIX",
    "check_submissions",
    "clear_submission",
    "queued_jobs",
    "record_submission",
]


def _holder_line() -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    return f"pid {os.getpid()} on {socket.gethostname()} since {started}\n"


def _open_lock_file(path: Path, folder: Path) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise OutputDirError(
            f"output_dir {folder}: cannot create the lock file {path.relative_to(folder)} "
            f"({exc.strerror or exc}); choose a folder you can write to"
        ) from None


def _read_holder(fd: int) -> str:
    return os.pread(fd, 200, 0).decode("utf-8", "replace").strip()


def _release(fd: int, *, clear: bool) -> None:
    try:
        if clear:
            os.ftruncate(fd, 0)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _busy(folder: Path, holder: str, what: str = "") -> LockHeldError:
    return LockHeldError(
        f"output_dir {folder} is in use by another brain-ldm-bids run ({holder or 'another process'})"
        f"{what}; wait for it to finish or choose another output folder"
    )


def _participant_lock_holders(folder: Path) -> str:
    """Who holds participant locks (from their lock files), for an error message."""
    holders = []
    for path in sorted((folder / LOCKS_DIR_NAME).glob("sub-*.lock")):
        try:
            line = path.read_text(encoding="utf-8").strip()
        except OSError:
            continue
        if line and line not in holders:
            holders.append(f"{line}, {path.stem}")
    return "; ".join(holders[:3]) + (" …" if len(holders) > 3 else "")


#: ``output_dir/.brain-ldm-bids-locks/sub-<label>.jobs``: a graph-plugin submission (SLURMGraph)
#: whose jobs make that participant's images after the command has returned.
SUBMISSION_SUFFIX = ".jobs"


def _submission_records(folder: Path, labels: Iterable[str] | None) -> list[Path]:
    locks = folder / LOCKS_DIR_NAME
    if labels is None:
        return sorted(locks.glob(f"sub-*{SUBMISSION_SUFFIX}"))
    return [path for label in sorted(set(labels))
            if (path := locks / f"sub-{label}{SUBMISSION_SUFFIX}").exists()]


def record_submission(output_dir: str | os.PathLike[str], labels: Iterable[str], *,
                      comment: str, plugin: str, work_dir: Path) -> None:
    """Note that ``labels`` are being made by ``plugin`` jobs carrying SLURM comment
    ``comment`` (call it holding their :class:`ParticipantLocks`, before submitting). Until
    ``squeue`` lists none of those jobs, later runs on these participants (and the group
    level) are refused (:func:`check_submissions`)."""
    labels = sorted(set(labels))
    record = {"plugin": plugin, "comment": comment, "work_dir": str(work_dir),
              "participants": labels, "submitted_by": _holder_line().strip()}
    for label in labels:
        write_json(record, Path(output_dir) / LOCKS_DIR_NAME / f"sub-{label}{SUBMISSION_SUFFIX}")


def clear_submission(output_dir: str | os.PathLike[str], labels: Iterable[str]) -> None:
    """Forget the submission records of ``labels`` (the submission failed)."""
    for path in _submission_records(Path(output_dir), labels):
        path.unlink(missing_ok=True)


def queued_jobs(comment: str) -> list[str] | str:
    """``["<job id> <name> <state>", ...]`` of the SLURM jobs whose comment is ``comment``
    that are queued or running (``squeue`` lists nothing else; COMPLETING ones are left out),
    or a ``str`` saying why ``squeue`` could not be asked."""
    import shutil
    import subprocess

    if shutil.which("squeue") is None:
        return "squeue is not installed here"
    try:
        done = subprocess.run(["squeue", "--noheader", "--format=%i|%j|%T|%k"],
                              capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"squeue failed: {exc}"
    if done.returncode != 0:
        first = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[0]
        return f"squeue failed: {first}"
    jobs = []
    for line in done.stdout.splitlines():
        fields = line.strip().split("|", 3)
        # COMPLETING: the job's programs have ended, only SLURM's epilog is left
        if len(fields) == 4 and fields[3].strip() == comment and fields[2] != "COMPLETING":
            jobs.append(f"{fields[0]} {fields[1]} {fields[2]}")
    return jobs


def check_submissions(output_dir: str | os.PathLike[str],
                      labels: Iterable[str] | None = None) -> None:
    """Refuse (:class:`LockHeldError`, one line naming the jobs) while jobs of a recorded
    submission that makes ``labels`` (``None``: any participant) are queued or running; the
    records of submissions whose jobs have all left the queue are removed."""
    folder = Path(output_dir)
    by_comment: dict[str, list[Path]] = {}
    records: dict[str, dict[str, Any]] = {}
    for path in _submission_records(folder, labels):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            comment = str(record["comment"])
        except (OSError, ValueError, KeyError, TypeError):
            path.unlink(missing_ok=True)  # half-written by a killed run: nothing was submitted
            continue
        by_comment.setdefault(comment, []).append(path)
        records[comment] = record
    for comment, paths in by_comment.items():
        record = records[comment]
        who = ", ".join(path.name.removesuffix(SUBMISSION_SUFFIX) for path in paths[:3]) + (
            ", …" if len(paths) > 3 else "")
        jobs = queued_jobs(comment)
        if isinstance(jobs, str):
            raise LockHeldError(
                f"output_dir {folder}: {who} were submitted as {record.get('plugin')} jobs "
                f"(--comment={comment}) and {jobs}, so it is unknown whether they still run; "
                f"run where squeue answers, or delete {paths[0].parent}/sub-*{SUBMISSION_SUFFIX} "
                "once those jobs have left the queue"
            )
        if jobs:
            shown = "; ".join(jobs[:3]) + (f"; … ({len(jobs)} jobs)" if len(jobs) > 3 else "")
            raise LockHeldError(
                f"output_dir {folder}: {who} are being made by {record.get('plugin')} jobs still "
                f"queued or running ({shown}; --comment={comment}); wait for them or cancel "
                "them (scancel), then run again"
            )
        for path in paths:
            path.unlink(missing_ok=True)


class OutputLock:
    """A non-blocking ``flock`` on ``output_dir/.brain-ldm-bids.lock``.

    Exclusive (default; the group level, and anyone who must be alone in the folder): a second
    run gets :class:`LockHeldError` at once, never waits. Shared (``shared=True``): what
    :class:`ParticipantLocks` takes, so that runs on different participants (e.g. the tasks of
    a SLURM job array) work side by side while no exclusive holder is in. An exclusive holder
    writes its name into the lock file; the file is emptied, not removed, on release (removing
    a lock file lets two processes lock different files of the same name). ``flock`` is
    advisory and, on some network file systems, local to one machine (NFSv4 and Lustre mounted
    with ``flock`` share it between machines).
    """

    def __init__(self, output_dir: str | os.PathLike[str], *, shared: bool = False):
        self.folder = Path(output_dir)
        self.path = self.folder / LOCK_NAME
        self.shared = shared
        self._fd: int | None = None

    def __enter__(self) -> OutputLock:
        fd = _open_lock_file(self.path, self.folder)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError:
            holder = _read_holder(fd) or _participant_lock_holders(self.folder)
            os.close(fd)
            raise _busy(self.folder, holder) from None
        try:
            check_writable(self.folder)
            if not self.shared:
                check_submissions(self.folder)  # jobs of any participant still publishing
                os.ftruncate(fd, 0)
                os.pwrite(fd, _holder_line().encode(), 0)
        except BaseException:
            _release(fd, clear=False)
            raise
        self._fd = fd
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            _release(fd, clear=not self.shared)


class ParticipantLocks:
    """What a participant-level run holds: ``output_dir``'s lock shared, plus an exclusive
    ``flock`` on ``output_dir/.brain-ldm-bids-locks/sub-<label>.lock`` per participant.

    Runs on disjoint participants (one SLURM array task per participant) therefore run side by
    side in one output folder; a run on a participant that another run holds, or while the
    group level (exclusive) runs, gets :class:`LockHeldError` at once, naming the holder.
    Files shared by all runs (``dataset_description.json``, ``README.md``, ``.bidsignore``)
    are written under :meth:`dataset_files`, a short blocking lock.
    """

    def __init__(self, output_dir: str | os.PathLike[str], labels: Iterable[str]):
        self.folder = Path(output_dir)
        self.labels = sorted(set(labels))
        self._output_lock = OutputLock(self.folder, shared=True)
        self._fds: list[int] = []

    def __enter__(self) -> ParticipantLocks:
        self._output_lock.__enter__()
        try:
            locks = self.folder / LOCKS_DIR_NAME
            locks.mkdir(exist_ok=True)
            for label in self.labels:
                fd = _open_lock_file(locks / f"sub-{label}.lock", self.folder)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    holder = _read_holder(fd)
                    os.close(fd)
                    raise _busy(self.folder, holder, f" for sub-{label}") from None
                self._fds.append(fd)
                os.ftruncate(fd, 0)
                os.pwrite(fd, _holder_line().encode(), 0)
            check_submissions(self.folder, self.labels)  # graph-plugin jobs still publishing
        except BaseException:
            self.__exit__()
            raise
        return self

    def record_submission(self, *, comment: str, plugin: str, work_dir: Path) -> None:
        """:func:`record_submission` for this run's participants."""
        record_submission(self.folder, self.labels, comment=comment, plugin=plugin,
                          work_dir=work_dir)

    def clear_submission(self) -> None:
        clear_submission(self.folder, self.labels)

    def __exit__(self, *exc_info: object) -> None:
        while self._fds:
            _release(self._fds.pop(), clear=True)
        self._output_lock.__exit__()

    @contextmanager
    def dataset_files(self, timeout_s: float = 600.0) -> Iterator[None]:
        """Exclusive, blocking (up to ``timeout_s``) lock for the files every run shares."""
        fd = _open_lock_file(self.folder / LOCKS_DIR_NAME / "dataset.lock", self.folder)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise _busy(self.folder, f"waited {timeout_s:.0f} s",
                                " for dataset_description.json") from None
                time.sleep(0.05)
        try:
            yield
        finally:
            _release(fd, clear=False)
