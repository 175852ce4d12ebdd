"""The process-wide model cache: the only global state in the package.

Nipype nodes, the BIDS App and example workflows ask :func:`get_model` instead of calling
``BrainLDM.from_pretrained`` themselves, so one process loads a given bundle once, however
many nodes use it (MultiProc workers each keep their own).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from .pipeline import BrainLDM

_LOCK = threading.Lock()
_MODELS: dict[tuple[str, str | None], BrainLDM] = {}
MAX_MODELS = 2  # the full model is 2.3 GB; keep at most this many resident


def absolute_model_name(model: str | os.PathLike) -> str:
    """``model`` with a local bundle folder made absolute (against the current directory), so
    it still names that folder from another working directory; Hub repo ids are unchanged.

    A name that is an existing folder, or that starts with ``./``, ``../`` or ``~`` (a path
    even if it does not exist yet), is a path; anything else is returned as given.
    """
    name = os.fspath(model)
    path = Path(name).expanduser()
    if path.is_dir() or name.startswith(("./", "../", "~")) or name in (".", ".."):
        return str(path.absolute())
    return name


def _cache_key(model: str | os.PathLike, revision: str | None) -> tuple[str, str | None]:
    path = Path(os.fspath(model)).expanduser()
    if path.is_dir():
        return str(path.resolve()), None
    return os.fspath(model), revision


def get_model(model: str | os.PathLike, revision: str | None = None) -> BrainLDM:
    """The :class:`BrainLDM` of a bundle folder or Hub repo id, loaded once per process."""
    key = _cache_key(model, revision)
    with _LOCK:
        cached = _MODELS.get(key)
        if cached is None:
            cached = BrainLDM.from_pretrained(model, revision=revision)
            if len(_MODELS) >= MAX_MODELS:
                _MODELS.pop(next(iter(_MODELS)))
            _MODELS[key] = cached
        return cached


def clear() -> None:
    """Forget every cached model (tests; or to free memory)."""
    with _LOCK:
        _MODELS.clear()
