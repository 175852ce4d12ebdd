"""Read ``torch.save`` checkpoints (zip format, torch>=1.6) without importing torch.

A checkpoint is a zip archive whose entries are stored uncompressed::

    <archive>/data.pkl        pickle (protocol 2) of the saved object
    <archive>/data/<key>      raw little-endian bytes of storage ``key``
    <archive>/byteorder       b"little" (absent in files from older torch)
    <archive>/version, .format_version, .storage_alignment, .data/serialization_id

Tensors appear in ``data.pkl`` as ``torch._utils._rebuild_tensor_v2(storage,
storage_offset, size, stride, requires_grad, backward_hooks[, metadata])`` and storages
as persistent ids ``("storage", torch.<Type>Storage, key, location, numel)``, with
``numel`` counted in elements and offsets/strides in elements too.

Only that vocabulary is accepted: the unpickler resolves ``collections.OrderedDict``,
``_rebuild_tensor_v2`` and ten typed storage classes to local stand-ins and refuses
every other global, so no code from the file ever runs. Storages are memory-mapped
from the checkpoint itself, so loading a multi-GB file costs address space, not RAM.
"""

from __future__ import annotations

import _compat_pickle
import collections
import hashlib
import os
import pickle
import struct
import zipfile
from typing import Any

import numpy as np

__all__ = ["CheckpointError", "file_md5", "read_state_dict"]

_ZIP_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, ..., name length, extra length
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
_REFUSAL_HINT = "only plain state dicts (OrderedDict of tensors) are accepted"

# torch.<Name>Storage -> little-endian numpy dtype (None: bfloat16, needs ml_dtypes).
_STORAGE_DTYPES: dict[str, str | None] = {
    "FloatStorage": "<f4",
    "DoubleStorage": "<f8",
    "HalfStorage": "<f2",
    "BFloat16Storage": None,
    "LongStorage": "<i8",
    "IntStorage": "<i4",
    "ShortStorage": "<i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "?",
}


class CheckpointError(ValueError):
    """A file is not a readable plain-state-dict ``torch.save`` checkpoint.

    The message always starts with the file's path.
    """


class _Inert:
    """Base for unpickler stand-ins: refuses the pickle BUILD opcode (no state injection)."""

    __slots__ = ()

    def __setstate__(self, state: object) -> None:
        raise pickle.UnpicklingError(f"cannot set state on {type(self).__name__}")


class _StorageType(_Inert):
    """Stand-in for a ``torch.<Name>Storage`` class: just a name and an element dtype."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype: np.dtype | None) -> None:
        self.name = name
        self.dtype = dtype  # None for bfloat16 until ml_dtypes is resolved


class _Storage(_Inert):
    """One storage: ``numel`` elements of ``dtype``, backed by read-only mapped bytes."""

    __slots__ = ("key", "dtype", "numel", "data")

    def __init__(self, key: str, dtype: np.dtype, numel: int, data: np.ndarray) -> None:
        self.key, self.dtype, self.numel, self.data = key, dtype, numel, data


class _TensorRebuilder(_Inert):
    """Stand-in for ``torch._utils._rebuild_tensor_v2``: returns a strided numpy view."""

    __slots__ = ()

    def __call__(self, storage: Any, offset: Any, size: Any, stride: Any,
                 requires_grad: Any, backward_hooks: Any, metadata: Any = None) -> np.ndarray:
        if not isinstance(storage, _Storage):
            raise pickle.UnpicklingError("tensor storage is not a persistent storage reference")
        if not (_is_count(offset) and _is_count_tuple(size) and _is_count_tuple(stride)
                and len(size) == len(stride)):
            raise pickle.UnpicklingError(
                f"bad tensor geometry: offset={offset!r} size={size!r} stride={stride!r}")
        if not isinstance(requires_grad, bool) or not isinstance(backward_hooks, dict):
            raise pickle.UnpicklingError("bad requires_grad/backward_hooks arguments")
        if metadata is not None and (not isinstance(metadata, dict) or any(metadata.values())):
            raise pickle.UnpicklingError(
                f"tensor metadata {metadata!r} (lazy conj/neg bits) is not supported; "
                "save t.resolve_conj().resolve_neg() instead")
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if 0 not in size and last >= storage.numel:
            raise pickle.UnpicklingError(
                f"tensor reaches element {last} of storage {storage.key!r}, "
                f"which has only {storage.numel} elements")
        itemsize = storage.dtype.itemsize
        return np.ndarray(size, storage.dtype, buffer=storage.data, offset=offset * itemsize,
                          strides=tuple(s * itemsize for s in stride))


_REBUILD_TENSOR_V2 = _TensorRebuilder()
_STORAGE_TYPES = {
    name: _StorageType(name, None if spec is None else np.dtype(spec))
    for name, spec in _STORAGE_DTYPES.items()
}


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_count_tuple(value: object) -> bool:
    return isinstance(value, tuple) and all(_is_count(v) for v in value)


def _bfloat16_dtype(path: str) -> np.dtype:
    try:
        import ml_dtypes  # installed with jax
    except ImportError:
        raise CheckpointError(
            f"{path}: bfloat16 tensors need the 'ml_dtypes' package (a jax dependency), "
            "which is not installed") from None
    return np.dtype(ml_dtypes.bfloat16)


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles ``data.pkl`` allowing only the plain-state-dict vocabulary."""

    def __init__(self, file: Any, path: str, archive: zipfile.ZipFile, prefix: str,
                 file_bytes: np.memmap) -> None:
        super().__init__(file)
        self._path, self._archive, self._prefix, self._bytes = path, archive, prefix, file_bytes
        self._storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        # Protocol-2 pickles spell some globals the Python 2 way ('__builtin__.eval').
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _REBUILD_TENSOR_V2
        if module == "torch" and name in _STORAGE_TYPES:
            return _STORAGE_TYPES[name]
        if module.startswith("torch") and name.endswith("Storage"):
            raise CheckpointError(
                f"{self._path}: unsupported storage type '{module}.{name}'; supported: "
                + ", ".join(f"torch.{n}" for n in _STORAGE_TYPES))
        raise CheckpointError(
            f"{self._path}: refused to unpickle global '{module}.{name}': {_REFUSAL_HINT}")

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)
                and isinstance(pid[3], str) and _is_count(pid[4])):
            raise pickle.UnpicklingError(
                f"bad persistent id {pid!r}; expected "
                "('storage', <storage type>, key: str, location: str, numel: int)")
        _, storage_type, key, _location, numel = pid
        dtype = storage_type.dtype
        if dtype is None:  # np.dtype is falsy (no fields), so test identity
            dtype = _bfloat16_dtype(self._path)
        storage = self._storages.get(key)
        if storage is None:
            storage = _Storage(key, dtype, numel, self._map_entry(key, dtype, numel))
            self._storages[key] = storage
        elif storage.dtype != dtype or storage.numel != numel:
            raise pickle.UnpicklingError(
                f"storage {key!r} is referenced as {storage.numel} x {storage.dtype} "
                f"and as {numel} x {dtype}")
        return storage

    def _map_entry(self, key: str, dtype: np.dtype, numel: int) -> np.ndarray:
        """Read-only bytes of ``<archive>/data/<key>``, mapped straight from the file."""
        name = f"{self._prefix}/data/{key}"
        try:
            info = self._archive.getinfo(name)
        except KeyError:
            raise CheckpointError(f"{self._path}: storage entry '{name}' is missing") from None
        if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
            raise CheckpointError(
                f"{self._path}: storage entry '{name}' is compressed or encrypted "
                f"(zip method {info.compress_type}); torch.save writes uncompressed "
                "(ZIP_STORED) entries and only those can be memory-mapped")
        needed = numel * dtype.itemsize
        if info.file_size < needed:
            raise CheckpointError(
                f"{self._path}: storage entry '{name}' has {info.file_size} bytes but "
                f"{numel} x {dtype.itemsize} = {needed} are needed (truncated or corrupt file)")
        header = bytes(self._bytes[info.header_offset:info.header_offset + _ZIP_LOCAL_HEADER.size])
        if len(header) < _ZIP_LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
            raise CheckpointError(f"{self._path}: bad zip local header for '{name}'")
        _, name_len, extra_len = _ZIP_LOCAL_HEADER.unpack(header)
        start = info.header_offset + _ZIP_LOCAL_HEADER.size + name_len + extra_len
        if start + needed > self._bytes.size:
            raise CheckpointError(
                f"{self._path}: storage entry '{name}' runs past the end of the file "
                "(truncated or corrupt file)")
        return self._bytes[start:start + needed]


def _open_archive(path: str) -> zipfile.ZipFile:
    """Open ``path`` as a zip, turning every non-zip case into a precise CheckpointError."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: file not found")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: not a regular file")
    try:
        return zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        with open(path, "rb") as fh:
            head = fh.read(len(_LEGACY_MAGIC))
    if head.startswith(b"PK\x03\x04"):
        raise CheckpointError(
            f"{path}: truncated or corrupt checkpoint: zip central directory not found")
    if head == _LEGACY_MAGIC:
        raise CheckpointError(
            f"{path}: legacy (pre-1.6) torch.save format is not supported; re-save it with "
            "torch>=1.6 (torch.save(torch.load(f), f)) to get the zip format")
    raise CheckpointError(
        f"{path}: not a torch.save checkpoint (neither a zip archive nor a legacy pickle)")


def _as_state_dict(path: str, obj: object) -> dict[str, np.ndarray]:
    """Check that ``obj`` is ``{str: array}``, unwrapping a lone ``{"state_dict": ...}``."""
    if isinstance(obj, dict) and list(obj) == ["state_dict"]:
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"{path}: top-level object is a {type(obj).__name__}; expected a dict of "
            "str -> tensor (a state dict)")
    bad = [k for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, np.ndarray))]
    if bad:
        raise CheckpointError(
            f"{path}: expected a state dict of str -> tensor, but entries {bad[:10]!r} are not "
            f"tensors (keys found: {list(obj)[:10]!r}{'...' if len(obj) > 10 else ''})")
    return dict(obj)


def read_state_dict(path: str | os.PathLike[str], *, copy: bool = False) -> dict[str, np.ndarray]:
    """Load a ``torch.save``-d state dict as numpy arrays, without torch.

    Args:
        path: checkpoint written by ``torch.save(state_dict, path)`` (torch>=1.6 zip format).
            ``{"state_dict": state_dict}`` (that single key only) is unwrapped.
        copy: if True, return ordinary writable C-contiguous in-memory arrays instead of views.

    Returns:
        ``{name: array}`` in the file's order, each with the tensor's shape and dtype
        (bfloat16 via ``ml_dtypes``). By default the arrays are read-only views, with the
        tensor's strides and storage offset, into a ``np.memmap`` of the file: tensors that
        shared a storage share memory, and data is paged in on access only.

    Raises:
        CheckpointError: missing, legacy-format, truncated or non-checkpoint file; compressed
            entries; big-endian data; any pickled global outside the state-dict vocabulary.
    """
    path = os.fspath(path)
    with _open_archive(path) as archive:
        pickles = [n for n in archive.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
        if len(pickles) != 1:
            found = "no" if not pickles else "several"
            raise CheckpointError(
                f"{path}: {found} '<archive>/data.pkl' entries; not a torch.save checkpoint")
        prefix = pickles[0].split("/")[0]
        # Older torch wrote no byteorder record; such files are little-endian in practice.
        byteorder_entry = f"{prefix}/byteorder"
        has_byteorder = byteorder_entry in archive.namelist()
        byteorder = archive.read(byteorder_entry) if has_byteorder else b"little"
        if byteorder != b"little":
            raise CheckpointError(
                f"{path}: byteorder {byteorder.decode(errors='replace')!r} is not supported "
                "(only little-endian checkpoints)")
        file_bytes = np.memmap(path, dtype=np.uint8, mode="r")
        with archive.open(pickles[0]) as pickled:
            unpickler = _RestrictedUnpickler(pickled, path, archive, prefix, file_bytes)
            try:
                obj = unpickler.load()
            except CheckpointError:
                raise
            except Exception as exc:  # malformed pickle: report, never half-load
                raise CheckpointError(f"{path}: malformed data.pkl: {exc}") from exc
    state_dict = _as_state_dict(path, obj)
    if copy:
        return {name: np.array(array, order="C") for name, array in state_dict.items()}
    return state_dict


def file_md5(path: str | os.PathLike[str]) -> str:
    """Hex md5 of a file, read in 1 MiB chunks (constant memory). Raises OSError if unreadable."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
