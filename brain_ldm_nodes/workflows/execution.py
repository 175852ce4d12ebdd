"""How the example scripts run a workflow: plugin choice and the one-line error summary."""

from __future__ import annotations

import sys

from nipype.pipeline import engine as pe


def plugin_settings(nprocs: int) -> dict:
    """Linear in this process, or MultiProc whose workers start by forkserver (JAX is
    multithreaded, so forking a process that already ran JAX can deadlock)."""
    if nprocs <= 1:
        return {"plugin": "Linear"}
    return {"plugin": "MultiProc", "plugin_args": {"n_procs": nprocs, "mp_context": "forkserver"}}


def last_line(exc: BaseException) -> str:
    """The gist of a failed run: Nipype re-raises a node's error (Linear; "N raised" with the
    first as its cause) or its traceback as text (MultiProc), whose last line is the error."""
    lines = str(exc.__cause__ or exc).strip().splitlines()
    return lines[-1].strip() if lines else type(exc).__name__


def run_workflow(workflow: pe.Workflow, *, nprocs: int, prog: str, debug: bool = False) -> bool:
    """Run ``workflow`` (crash files in its ``base_dir``); on failure print ``prog: <error>``
    on stderr in one line (re-raise with ``debug``) and return False."""
    workflow.config["execution"].update(
        poll_sleep_duration=0.2,  # MultiProc polls every 2 s by default
        crashdump_dir=workflow.base_dir,
    )
    try:
        workflow.run(**plugin_settings(nprocs))
    except Exception as exc:
        if debug:
            raise
        print(f"{prog}: {last_line(exc)}", file=sys.stderr)
        return False
    return True
