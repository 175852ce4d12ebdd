"""File digests (no JAX, no third-party imports): the one file hasher of the package."""

from __future__ import annotations

import hashlib
import os

__all__ = ["sha256_of"]


def sha256_of(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes, streamed in 8 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()
