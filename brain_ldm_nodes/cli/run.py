"""``brain-ldm-bids``: the BIDS App's entry point (the console script).

:func:`main` parses the command line (:mod:`.parser`) and runs the level asked for
(:mod:`brain_ldm_nodes.bids_app.run`): the participant level reads the dataset, plans which
images are missing, builds the Nipype workflow that samples them, runs it and prints a
summary; the group level writes the report. Known problems (a dataset, model, configuration
or output folder that cannot be used, another run holding the output folder) end in one line
on stderr and exit status 1 (2 for a bad command line); tracebacks only with
``-vv``/``--debug``.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Sequence

from ..bids_app.errors import (
    BidsDatasetError,
    FailedImages,
    OutputDirError,
    ReportError,
    UsageError,
    one_line,
)
from ..bids_app.naming import GENERATED_BY as PROG
from .parser import get_parser

__all__ = ["EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_USAGE", "PROG", "main"]

EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


def _known_errors() -> tuple[type[BaseException], ...]:
    """Exceptions whose message is the whole story (imports deferred: they pull in JAX)."""
    from ..conditioning import DemographicsError
    from ..weights.bundle import BundleError

    return (UsageError, FailedImages, BidsDatasetError, DemographicsError, OutputDirError,
            BundleError, ReportError)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``brain-ldm-bids`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    try:
        args = get_parser().parse_args(argv)
    except SystemExit as exit_:  # --help, --version, or a bad command line (already printed)
        return int(exit_.code or 0)
    debug = args.debug or args.verbose >= 2
    try:
        from ..bids_app.logs import stdout_logging
        from ..bids_app.run import run_group_level, run_participant_level

        with stdout_logging(args.verbose, debug):
            if args.analysis_level == "participant":
                return run_participant_level(args)
            return run_group_level(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        known = isinstance(exc, _known_errors())
        if debug:
            traceback.print_exc()
        message = one_line(exc)
        if not known:
            message = (f"unexpected {type(exc).__name__}: {message} (run with --debug for the "
                       "traceback, and please report it)")
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, UsageError) else EXIT_FAILED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
