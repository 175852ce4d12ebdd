"""git-annex / DataLad datasets: files are symlinks into ``.git/annex/objects``.

Such a file is named by its BIDS path (the link), never by its target: entities, relative
paths and sidecar records use the link's path, and the data are read through the link. A
link whose content has not been retrieved yet (``datalad clone`` without ``datalad get``, or
``git annex drop``) dangles: :func:`not_retrieved` says so and :func:`retrieve_hint` says how
to get it.
"""

from __future__ import annotations

import os
from pathlib import Path


def not_retrieved(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a symlink whose target does not exist (an annexed file whose
    content is not in this clone; any other dangling link reads the same)."""
    path = Path(path)
    return path.is_symlink() and not path.exists()


def retrieve_hint(path: str | os.PathLike[str]) -> str:
    """``"<path>: not retrieved (a git-annex/DataLad link without content); run `datalad get
    <path>`"``: one line naming the file and what to do."""
    return (f"{path}: annexed file not retrieved (no content in this clone); "
            f"run `datalad get {path}`")


def bids_path(path: str | os.PathLike[str]) -> Path:
    """``path`` made absolute without following a symlink in its last component: the folder
    is resolved, the file name kept (an annexed file keeps its BIDS name and place)."""
    path = Path(path).expanduser()
    return Path(os.path.realpath(path.parent)) / path.name
