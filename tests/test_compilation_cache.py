"""JAX's persistent compilation cache as the BIDS App sets it up (brain_ldm_nodes.compilation_cache):
jobs that start together on an empty shared cache all succeed with identical results, and a job
started afterwards compiles nothing (every program comes from the cache)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from brain_ldm_nodes.compilation_cache import (
    DEFAULT_MAX_SIZE_BYTES,
    default_compilation_cache_dir,
    use_compilation_cache,
)


#: One "job": sample one image with the tiny bundle, with the cache the BIDS App would set up;
#: prints the image's hash and JAX's cache events (jax.monitoring).
JOB = """
import hashlib, json, sys
from brain_ldm_nodes.compilation_cache import use_compilation_cache
events = {}
with use_compilation_cache(sys.argv[2]):
    import jax
    jax.monitoring.register_event_listener(
        lambda name, **_: events.__setitem__(name, events.get(name, 0) + 1))
    from brain_ldm_nodes import BrainLDM
    import numpy as np
    model = BrainLDM.from_pretrained(sys.argv[1])
    image = np.asarray(model.sample(np.array([[1.0, 0.5, 0.2, 0.4]]), seeds=[7],
                                    num_inference_steps=2))
print(json.dumps({"sha256": hashlib.sha256(image.tobytes()).hexdigest(),
                  "hits": events.get("/jax/compilation_cache/cache_hits", 0),
                  "misses": events.get("/jax/compilation_cache/cache_misses", 0)}))
"""


def _job_env() -> dict[str, str]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"}
    for name in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
                 "JAX_COMPILATION_CACHE_MAX_SIZE"):
        env.pop(name, None)
    return env


def _start(model: Path, cache: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", JOB, str(model), str(cache)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_job_env())


def _finish(job: subprocess.Popen) -> tuple[dict, str]:
    stdout, stderr = job.communicate(timeout=300)
    assert job.returncode == 0, stderr[-3000:]
    return json.loads(stdout.strip().splitlines()[-1]), stderr


def test_jobs_starting_together_then_a_later_job_that_compiles_nothing(tmp_path, tiny_model):
    cache = tmp_path / "shared-cache"
    together = [_start(tiny_model, cache) for _ in range(3)]
    results = [_finish(job) for job in together]
    hashes = {result["sha256"] for result, _ in results}
    assert len(hashes) == 1
    for result, stderr in results:
        assert "persistent compilation cache" not in stderr.lower(), stderr[-2000:]
    assert sum(result["misses"] for result, _ in results) >= 1
    entries = [path for path in cache.iterdir() if path.name.endswith("-cache")]
    assert entries, sorted(path.name for path in cache.iterdir())
    assert (cache / ".lockfile").exists()  # the locked (size-limited) mode is in use

    later, stderr = _finish(_start(tiny_model, cache))
    assert later["sha256"] in hashes
    assert later["misses"] == 0 and later["hits"] >= 1, later


def test_settings_are_set_for_children_and_put_back(tmp_path, monkeypatch):
    monkeypatch.setenv("JAX_COMPILATION_CACHE_MAX_SIZE", "12345")
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    import jax

    before = jax.config.jax_compilation_cache_dir
    with use_compilation_cache(tmp_path / "c") as folder:
        assert folder == (tmp_path / "c").resolve() and folder.is_dir()
        assert os.environ["JAX_COMPILATION_CACHE_DIR"] == str(folder)
        assert os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] == "12345"  # the user's, kept
        assert jax.config.jax_compilation_cache_dir == str(folder)
    assert "JAX_COMPILATION_CACHE_DIR" not in os.environ
    assert jax.config.jax_compilation_cache_dir == before
    with use_compilation_cache(None) as nothing:
        assert nothing is None and "JAX_COMPILATION_CACHE_DIR" not in os.environ
    assert DEFAULT_MAX_SIZE_BYTES > 0


def test_default_folder_follows_the_environment(tmp_path, monkeypatch):
    for name in ("BRAIN_LDM_COMPILATION_CACHE", "JAX_COMPILATION_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_compilation_cache_dir() == tmp_path / "brain-ldm-nodes" / "jax"
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax"))
    assert default_compilation_cache_dir() == tmp_path / "jax"
    monkeypatch.setenv("BRAIN_LDM_COMPILATION_CACHE", "none")
    assert default_compilation_cache_dir() is None
