"""The BIDS App's errors: a known problem ends a run with one line on stderr naming the file,
row, column or argument, what is wrong and what is accepted (no traceback).
"""

from __future__ import annotations

from ..conditioning import DemographicsError

__all__ = [
    "BidsConfigError",
    "BidsDatasetError",
    "FailedImages",
    "LockHeldError",
    "OutputDirError",
    "ReportError",
    "UsageError",
    "one_line",
]


class BidsDatasetError(ValueError):
    """The dataset as a whole cannot be read; the one-line message names the path."""


class BidsConfigError(DemographicsError):
    """A configuration file or value that cannot be used; the message names file and key."""


class OutputDirError(ValueError):
    """``output_dir`` (or the work folder) cannot be used; the one-line message says why."""


class LockHeldError(OutputDirError):
    """Another run holds ``output_dir``'s lock."""


class ReportError(ValueError):
    """The group level cannot run; the one-line message says why."""


class UsageError(ValueError):
    """A command-line value that parses but cannot be used (exit status 2)."""


class FailedImages(RuntimeError):
    """Some images could not be made (the summary lists them), or the plugin could not run."""


def one_line(exc: BaseException, *, first_line: bool = False) -> str:
    """The message of ``exc`` on one line (its type's name if it has none): its non-empty lines
    joined by spaces; or, with ``first_line`` (pybids' long messages), only the first, followed
    by its cause's (the same way) in parentheses."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not first_line:
        return " ".join(lines) or type(exc).__name__
    text = lines[0] if lines else type(exc).__name__
    if exc.__cause__ is not None:
        text += f" ({one_line(exc.__cause__, first_line=True)})"
    return text
