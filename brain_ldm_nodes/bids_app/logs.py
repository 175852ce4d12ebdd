"""Where the App's lines go: progress on stdout through one logger; Nipype's own log only with
``-v`` (in this process and in its worker processes).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = [
    "LOGGER_NAME",
    "quiet_worker_logging",
    "stdout_logging",
]


LOGGER_NAME = "brain_ldm_bids"
log = logging.getLogger(LOGGER_NAME)
_NIPYPE_LEVELS = ("workflow_level", "interface_level", "utils_level")


@contextmanager
def stdout_logging(verbose: int, debug: bool) -> Iterator[None]:
    """Progress on stdout (our logger); Nipype's own log only with -v (DEBUG with -vv).
    Nipype's levels are process-wide: they are put back afterwards (``main`` may run in a
    process that uses Nipype otherwise, e.g. tests)."""
    from nipype import config as nipype_config
    from nipype import logging as nipype_logging

    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    # The sampling node's per-step lines (in this process: the Linear plugin; MultiProc
    # workers do not print them).
    step_log = logging.getLogger("brain_ldm_nodes.progress")
    for logger in (log, step_log):
        logger.handlers[:] = [handler]
        logger.setLevel(logging.DEBUG if verbose else logging.INFO)
        logger.propagate = False
    previous = {option: nipype_config.get("logging", option) for option in _NIPYPE_LEVELS}
    level = "DEBUG" if debug else "INFO" if verbose else "CRITICAL"
    for option in _NIPYPE_LEVELS:
        nipype_config.set("logging", option, level)
    nipype_logging.update_logging(nipype_config)
    try:
        yield
    finally:
        for option, value in previous.items():
            nipype_config.set("logging", option, value)
        nipype_logging.update_logging(nipype_config)
        log.handlers.clear()
        step_log.handlers.clear()


@contextmanager
def quiet_worker_logging(work_dir: Path, verbose: int) -> Iterator[None]:
    """Worker processes read Nipype's configuration afresh: while the workflow runs, point
    them at one that matches our verbosity (unless the user has their own
    ``NIPYPE_CONFIG_DIR``)."""
    if verbose or "NIPYPE_CONFIG_DIR" in os.environ:
        yield
        return
    folder = work_dir / "nipype_config"
    folder.mkdir(parents=True, exist_ok=True)
    levels = "\n".join(f"{option} = CRITICAL" for option in _NIPYPE_LEVELS)
    (folder / "nipype.cfg").write_text(f"[logging]\n{levels}\n", encoding="utf-8")
    os.environ["NIPYPE_CONFIG_DIR"] = str(folder)
    try:
        yield
    finally:
        os.environ.pop("NIPYPE_CONFIG_DIR", None)
