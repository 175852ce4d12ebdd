"""JAX's persistent compilation cache, shared by every process of a run (and of a cluster).

Compiling the sampler and decoder costs tens of seconds per process. With a persistent cache
in a shared folder, only the first process (the first job of a SLURM array) pays it; the others
load the compiled programs. :func:`use_compilation_cache` points JAX at the folder through
environment variables, so Nipype's workers (MultiProc processes, SLURM jobs: ``sbatch``
exports the environment) inherit it, and through ``jax.config`` if JAX is already imported.

Concurrency. JAX's default cache writes entries in place; a job reading an entry while another
writes it could read half a file. A size limit (``JAX_COMPILATION_CACHE_MAX_SIZE``) switches
JAX to its least-recently-used mode, in which every read and write holds a file lock
(``filelock``) on ``<folder>/.lockfile``: entries are whole when read. That mode is used
here (default limit 16 GiB). A failed read is only a warning in JAX: the program is compiled.
Cache keys include the JAX/XLA versions and the CPU's features, so a cluster with several CPU
types keeps one entry per type.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ENV_VAR = "BRAIN_LDM_COMPILATION_CACHE"
DEFAULT_MAX_SIZE_BYTES = 16 * 2**30
DISABLED = ("none", "off", "")

#: JAX settings (environment variable -> ``jax.config`` name) that this module sets.
_JAX_SETTINGS = {
    "JAX_COMPILATION_CACHE_DIR": "jax_compilation_cache_dir",
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "jax_persistent_cache_min_compile_time_secs",
    "JAX_COMPILATION_CACHE_MAX_SIZE": "jax_compilation_cache_max_size",
}


def default_compilation_cache_dir() -> Path | None:
    """``$BRAIN_LDM_COMPILATION_CACHE``, else ``$JAX_COMPILATION_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/brain-ldm-nodes/jax`` (``~/.cache/...``); ``None`` if the first set
    one says ``none``/``off``."""
    for variable in (ENV_VAR, "JAX_COMPILATION_CACHE_DIR"):
        value = os.environ.get(variable)
        if value is not None:
            return None if value.strip().lower() in DISABLED else Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "brain-ldm-nodes" / "jax"


@contextmanager
def use_compilation_cache(directory: str | os.PathLike[str] | None) -> Iterator[Path | None]:
    """Within the block, JAX processes started from here (and this one, unless it has compiled
    already: JAX reads the setting at its first compilation) cache compiled programs in
    ``directory`` (created if missing; ``None``: leave JAX's settings as they are). Settings
    the user gave in ``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`` /
    ``JAX_COMPILATION_CACHE_MAX_SIZE`` are kept; otherwise every program is cached (minimum
    compile time 0 s) with the locked LRU mode described in the module docstring. Everything
    is put back on exit."""
    if directory is None:
        yield None
        return
    folder = Path(directory).expanduser().resolve()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OSError(f"compilation cache folder {folder}: cannot create it "
                      f"({exc.strerror or exc}); pass a writable folder or 'none'") from None
    wanted = {
        "JAX_COMPILATION_CACHE_DIR": str(folder),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS":
            os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0"),
        "JAX_COMPILATION_CACHE_MAX_SIZE":
            os.environ.get("JAX_COMPILATION_CACHE_MAX_SIZE", str(DEFAULT_MAX_SIZE_BYTES)),
    }
    previous_env = {name: os.environ.get(name) for name in wanted}
    jax = sys.modules.get("jax")
    previous_config = {}
    if jax is not None:
        previous_config = {option: getattr(jax.config, option) for option in _JAX_SETTINGS.values()}
    os.environ.update(wanted)
    if jax is not None:
        jax.config.update("jax_compilation_cache_dir", str(folder))
        jax.config.update("jax_persistent_cache_min_compile_time_secs",
                          float(wanted["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
        jax.config.update("jax_compilation_cache_max_size",
                          int(wanted["JAX_COMPILATION_CACHE_MAX_SIZE"]))
    try:
        yield folder
    finally:
        for name, value in previous_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        for option, value in previous_config.items():
            jax.config.update(option, value)
