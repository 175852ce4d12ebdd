"""Helpers shared by the BIDS App tests (test_bids_app*.py): datasets, runs, trees, validator."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from brain_ldm_nodes.cli.run import main
from brain_ldm_nodes.bids_app.naming import DEFAULT_WORK_DIR_NAME

from test_interfaces import REPO, STEPS

EXAMPLES = REPO / "bids_examples"
CONSOLE_SCRIPT = Path(sys.executable).with_name("brain-ldm-bids")


@dataclass(frozen=True)
class Outcome:
    """Exit status and captured output of one ``brain-ldm-bids`` run."""

    code: int
    out: str
    err: str

    @property
    def err_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]


def copy_dataset(name: str, destination: Path) -> Path:
    """A writable copy of ``bids_examples/<name>`` at ``destination``."""
    shutil.copytree(EXAMPLES / name, destination)
    return destination


def app(*args: object) -> Outcome:
    """``brain-ldm-bids`` in this process (``main(argv)``), stdout and stderr captured."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(arg) for arg in args])
    return Outcome(code, out.getvalue(), err.getvalue())


def console_env() -> dict[str, str]:
    """The environment for console-script runs: this one, offline Hub, shared JAX cache."""
    return {**os.environ, "HF_HUB_OFFLINE": "1"}


def console(*args: object, env: dict[str, str] | None = None) -> Outcome:
    """``brain-ldm-bids`` as installed (the console script), in a fresh process."""
    done = subprocess.run([str(CONSOLE_SCRIPT), *map(str, args)], capture_output=True, text=True,
                          env=env or console_env(), check=False)
    return Outcome(done.returncode, done.stdout, done.stderr)


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones included, the work folder excluded): bytes."""
    files = {}
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if relative.parts[0] == DEFAULT_WORK_DIR_NAME or not path.is_file():
            continue
        files[relative.as_posix()] = path.read_bytes()
    return files


def validator_issues(folder: Path) -> list[dict]:
    """Issues ``bids-validator-deno`` reports for ``folder`` (run offline; it must be installed)."""
    executable = shutil.which("bids-validator-deno") or str(
        Path(sys.executable).with_name("bids-validator-deno"))
    if not Path(executable).exists():
        pytest.fail("bids-validator-deno is not installed (pip install bids-validator-deno)")
    done = subprocess.run([executable, str(folder), "--format", "json"], capture_output=True,
                          text=True, check=False, timeout=120)
    try:
        return json.loads(done.stdout)["issues"]["issues"]
    except (json.JSONDecodeError, KeyError):
        pytest.fail(f"bids-validator-deno gave no JSON report: {done.stdout[-500:]}"
                    f"{done.stderr[-500:]}")


def validator_errors(folder: Path) -> list[dict]:
    return [issue for issue in validator_issues(folder) if issue["severity"] == "error"]


def completed_output(tmp_path_factory: pytest.TempPathFactory, model: Path) -> tuple[Path, Path]:
    """A finished participant run of ds-minimal (3 images), made once per session (the
    ``finished_run`` fixture, tests/conftest.py): ``(dataset copy, output folder)``. Copy the
    folder before changing anything in it."""
    base = tmp_path_factory.getbasetemp() / "bids_app_template"
    dataset, output = base / "ds-minimal", base / "out"
    if not (output / "dataset_description.json").exists():
        shutil.rmtree(base, ignore_errors=True)
        copy_dataset("ds-minimal", dataset)
        outcome = app(dataset, output, "participant", "--model", model,
                      "--num-inference-steps", STEPS)
        assert outcome.code == 0, outcome.err
    return dataset, output
