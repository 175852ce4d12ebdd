"""brain-ldm-bids on a real SLURM cluster: Nipype's SLURM plugin and an sbatch job array.

Needs a SLURM whose ``sinfo`` answers (``.ci/run`` starts one with
``hpc/start-local-slurm.sh``; CI sets ``BRAIN_LDM_REQUIRE_SLURM=1`` so that these tests fail
rather than skip if it is missing). Both routes must give the bytes of a local Linear run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bids_app_support import (
    CONSOLE_SCRIPT,
    console,
    console_env,
    tree,
    validator_errors,
)
from test_interfaces import REPO, STEPS

ARRAY_SCRIPT = REPO / "hpc" / "brain-ldm-array.sbatch"
JOB_TIMEOUT_S = 600
#: Overrides the array script's #SBATCH resources (sized for the full model) for the tiny one:
#: a request larger than the node would wait forever (reason PartitionConfig).
SMALL_TASK = ["--cpus-per-task=1", "--mem=2G"]


def _slurm_answers() -> bool:
    if shutil.which("sinfo") is None:
        return False
    try:
        done = subprocess.run(["sinfo", "--noheader", "--format=%a"], capture_output=True,
                              text=True, timeout=20, check=False)
    except subprocess.TimeoutExpired:
        return False
    return done.returncode == 0 and "up" in done.stdout


if not _slurm_answers():
    if os.environ.get("BRAIN_LDM_REQUIRE_SLURM") == "1":
        pytest.fail("BRAIN_LDM_REQUIRE_SLURM=1 but `sinfo` does not answer: start SLURM with "
                    "hpc/start-local-slurm.sh", pytrace=False)
    pytest.skip("no SLURM here (`sinfo` does not answer); hpc/start-local-slurm.sh starts one",
                allow_module_level=True)

pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module")
def cluster_env(tmp_path_factory) -> dict[str, str]:
    """What jobs inherit (sbatch exports the submitting environment): this venv's commands
    first, offline Hub, one shared compilation cache."""
    cache = tmp_path_factory.mktemp("slurm_jax_cache")
    env = console_env()
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["BRAIN_LDM_COMPILATION_CACHE"] = str(cache)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _sbatch_wait(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["sbatch", "--wait", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=JOB_TIMEOUT_S, check=False)


def test_nipype_slurm_plugin_gives_the_bytes_of_a_local_run(tmp_path, tiny_model, finished_run,
                                                            cluster_env):
    dataset, local = finished_run
    out, work = tmp_path / "out", tmp_path / "work"
    plugin_args = {"sbatch_args": f"--time=10 --chdir={tmp_path}"}
    started = time.monotonic()
    done = console(dataset, out, "participant", "--model", tiny_model,
                   "--num-inference-steps", STEPS, "--plugin", "SLURM",
                   "--plugin-args", json.dumps(plugin_args), "-w", work, env=cluster_env)
    assert done.code == 0, done.err + done.out[-2000:]
    assert "[3/3]" in done.out and "summary: 3 images written" in done.out
    # every sampler ran as a SLURM job: Nipype's batch scripts and their job logs
    batch = list(work.rglob("batch/batchscript_*.sh"))
    logs = list(work.rglob("batch/slurm-*.out"))
    assert len(batch) >= 3 and len(logs) >= 3, (batch, logs)
    assert tree(out) == tree(local)
    assert validator_errors(out) == []
    assert time.monotonic() - started < JOB_TIMEOUT_S


def test_slurmgraph_submits_every_job_and_a_rerun_finds_the_bytes_of_a_local_run(
    tmp_path, tiny_model, finished_run, cluster_env
):
    """Nipype's SLURMGraph plugin submits the whole graph (with job dependencies) and returns;
    the jobs publish the images; running the command again checks them."""
    dataset, local = finished_run
    out, work = tmp_path / "out", tmp_path / "work"
    common = [dataset, out, "participant", "--model", tiny_model, "--num-inference-steps", STEPS,
              "-w", work]
    plugin_args = {"sbatch_args": f"--time=10 {' '.join(SMALL_TASK)}"}
    done = console(*common, "--plugin", "SLURMGraph", "--plugin-args", json.dumps(plugin_args),
                   env=cluster_env)
    assert done.code == 0, done.err + done.out[-2000:]
    assert "submitted 3 images as SLURMGraph jobs" in done.out
    assert (work / "brain_ldm_bids_wf" / "batch" / "submit_jobs.sh").exists()
    sidecars = [out / f"sub-{label}" / "anat" / f"sub-{label}_desc-synthetic_T1w.json"
                for label in ("01", "02", "03")]
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not all(path.exists() for path in sidecars):  # written last, after the image
        assert time.monotonic() < deadline, sorted(p.name for p in out.rglob("*"))
        time.sleep(1)
    _wait_until_the_queue_is_empty(deadline)  # until then a rerun is refused (next test)
    again = console(*common, env=cluster_env)
    assert again.code == 0, again.err
    assert "3 already complete, 0 to sample" in again.out
    assert tree(out) == tree(local)  # the submission's records are gone too


def _queued(comment: str | None = None) -> list[str]:
    """Job ids in the queue (with SLURM comment ``comment``, if given)."""
    listing = subprocess.run(["squeue", "--noheader", "--format=%i|%k"], capture_output=True,
                             text=True, check=True).stdout.split()
    return [line.split("|")[0] for line in listing
            if comment is None or line.split("|", 1)[1] == comment]


def _wait_until_the_queue_is_empty(deadline: float) -> None:
    while _queued():
        assert time.monotonic() < deadline, _queued()
        time.sleep(1)


def test_slurmgraph_jobs_keep_their_participants_until_they_leave_the_queue(
    tmp_path, tiny_model, finished_run, cluster_env
):
    """The command returns while its jobs wait (here: held); another run on those participants
    (which would clean up their temporaries) and the group level are refused, naming the jobs;
    once the jobs have left the queue both proceed."""
    dataset, _ = finished_run
    out = tmp_path / "out"
    common = [dataset, out, "participant", "--model", tiny_model, "--num-inference-steps", STEPS]
    plugin_args = {"sbatch_args": f"--hold --time=10 {' '.join(SMALL_TASK)}"}
    done = console(*common, "-w", tmp_path / "work", "--plugin", "SLURMGraph",
                   "--plugin-args", json.dumps(plugin_args), env=cluster_env)
    assert done.code == 0, done.err + done.out[-2000:]
    records = sorted((out / ".brain-ldm-bids-locks").glob("sub-*.jobs"))
    assert [path.name for path in records] == ["sub-01.jobs", "sub-02.jobs", "sub-03.jobs"]
    comment = json.loads(records[0].read_text())["comment"]
    jobs = _queued(comment)
    try:
        assert len(jobs) >= 3, subprocess.run(["squeue"], capture_output=True, text=True).stdout
        for argv in ([*common, "--participant-label", "02"], [dataset, out, "group"]):
            refused = console(*argv, env=cluster_env)
            assert refused.code == 1, refused.out[-2000:]
            lines = refused.err.strip().splitlines()
            assert len(lines) == 1, refused.err
            assert "still queued or running" in lines[0] and jobs[0] in lines[0], lines[0]
            assert f"--comment={comment}" in lines[0]
    finally:
        subprocess.run(["scancel", *jobs], check=False)
    _wait_until_the_queue_is_empty(time.monotonic() + 120)
    again = console(*common, "--participant-label", "02", env=cluster_env)
    assert again.code == 0, again.err
    assert (out / "sub-02" / "anat" / "sub-02_desc-synthetic_T1w.json").exists()  # written last
    assert not (out / ".brain-ldm-bids-locks" / "sub-02.jobs").exists()


def test_sbatch_job_array_one_participant_per_task_gives_the_bytes_of_a_local_run(
    tmp_path, tiny_model, finished_run, cluster_env
):
    dataset, local = finished_run
    out, scratch = tmp_path / "out", tmp_path / "scratch"
    scratch.mkdir()
    env = {**cluster_env, "TMPDIR": str(scratch)}  # node-local scratch of the tasks
    rows = [line for line in (dataset / "participants.tsv").read_text().splitlines()[1:] if line]
    assert len(rows) == 3
    done = _sbatch_wait([f"--array=1-{len(rows)}", "--output=task-%a.log", "--time=10",
                         *SMALL_TASK, str(ARRAY_SCRIPT), str(dataset),
                         str(out), "--model", str(tiny_model), "--num-inference-steps",
                         str(STEPS)], env, tmp_path)
    logs = {path.name: path.read_text() for path in tmp_path.glob("task-*.log")}
    assert done.returncode == 0, (done.stderr, logs)
    assert sorted(logs) == ["task-1.log", "task-2.log", "task-3.log"]
    for number, label in ((1, "01"), (2, "02"), (3, "03")):
        assert f"[1/1] sub-{label} image 1/1 done" in logs[f"task-{number}.log"]
    assert tree(out) == tree(local)
    assert validator_errors(out) == []
    assert list(scratch.iterdir()) == []  # each task removed its work folder


def test_array_task_past_the_last_row_fails_with_one_line(tmp_path, tiny_model, finished_run,
                                                          cluster_env):
    dataset, _ = finished_run
    done = _sbatch_wait(["--array=4", "--output=task-%a.log", "--time=5", *SMALL_TASK, str(ARRAY_SCRIPT),
                         str(dataset), str(tmp_path / "out"), "--model", str(tiny_model)],
                        cluster_env, tmp_path)
    assert done.returncode != 0
    log = (tmp_path / "task-4.log").read_text().strip().splitlines()
    assert log == [f"brain-ldm-array.sbatch: {dataset}/participants.tsv has no participant in data row 4 "
                   "(task 4 of the array; rows are 1-based, header excluded)"]


def test_the_console_script_is_the_one_jobs_run(cluster_env):
    """Jobs must run this checkout's brain-ldm-bids, not another one on the node's PATH."""
    found = shutil.which("brain-ldm-bids", path=cluster_env["PATH"])
    assert found is not None and Path(found) == CONSOLE_SCRIPT
