"""Tests for the torch-free ``torch.save`` reader (torch is the oracle here, never at runtime)."""

from __future__ import annotations

import builtins
import collections
import hashlib
import io
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

import torch  # noqa: E402 - the oracle: its absence must fail, not skip

from brain_ldm_nodes.weights.torch_checkpoint import (  # noqa: E402
    CheckpointError,
    file_md5,
    read_state_dict,
)

PACKAGE_ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- helpers


def _save(obj: object, path: Path, **kwargs: object) -> Path:
    torch.save(obj, path, **kwargs)
    return path


def _bits(tensor: torch.Tensor) -> bytes:
    """The tensor's elements in C order as raw bytes (works for bfloat16 too)."""
    t = tensor.contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def _assert_bitwise_equal(array: np.ndarray, tensor: torch.Tensor) -> None:
    assert array.shape == tuple(tensor.shape)
    assert array.dtype.itemsize == tensor.element_size()
    assert np.ascontiguousarray(array).tobytes() == _bits(tensor)


def _rezip(
    src: Path,
    dst: Path,
    *,
    replace: dict[str, bytes] | None = None,
    drop: tuple[str, ...] = (),
    compression: int = zipfile.ZIP_STORED,
) -> Path:
    """Copy a checkpoint's entries (by suffix after the archive folder) into a new zip."""
    replace = replace or {}
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression) as zout:
        for name in zin.namelist():
            suffix = name.split("/", 1)[1]
            if suffix not in drop:
                zout.writestr(name, replace.get(suffix, zin.read(name)))
    return dst


def _torch_like_zip(dst: Path, data_pkl: bytes, storages: dict[str, bytes] | None = None) -> Path:
    """A zip laid out like torch.save's, with arbitrary data.pkl bytes."""
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        zout.writestr("archive/data.pkl", data_pkl)
        zout.writestr("archive/byteorder", b"little")
        for key, payload in (storages or {}).items():
            zout.writestr(f"archive/data/{key}", payload)
        zout.writestr("archive/version", b"3\n")
    return dst


class _RunsShell:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _Evals:
    def __init__(self, expression: str) -> None:
        self.expression = expression

    def __reduce__(self):
        return (builtins.eval, (self.expression,))


class _StorageRef:
    """Pickled as torch's persistent id ``pid`` (see _TorchLikePickler)."""

    def __init__(self, pid: object) -> None:
        self.pid = pid


class _TensorRef:
    """Pickled exactly like a tensor: a reduce to torch._utils._rebuild_tensor_v2."""

    def __init__(self, storage: _StorageRef, offset: int, size: tuple, stride: tuple) -> None:
        self.args = (storage, offset, size, stride, False, collections.OrderedDict())

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, self.args)


class _TorchLikePickler(pickle.Pickler):
    def persistent_id(self, obj: object) -> object:
        return obj.pid if isinstance(obj, _StorageRef) else None


def _crafted_pickle(obj: object) -> bytes:
    buffer = io.BytesIO()
    _TorchLikePickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def _error(path: Path) -> str:
    with pytest.raises(CheckpointError) as info:
        read_state_dict(path)
    message = str(info.value)
    assert message.startswith(str(path)), message
    return message


@pytest.fixture
def grid() -> torch.Tensor:
    return torch.arange(20, dtype=torch.float32).reshape(4, 5)


# ----------------------------------------------------------------------------- round trips


def test_round_trips_monai_autoencoder_kl_state_dict_bitwise_and_in_order(tmp_path: Path) -> None:
    from monai.networks.nets import AutoencoderKL

    torch.manual_seed(0)
    model = AutoencoderKL(
        spatial_dims=3,
        channels=(32, 32),
        latent_channels=3,
        num_res_blocks=1,
        attention_levels=(False, False),
        with_encoder_nonlocal_attn=False,
        with_decoder_nonlocal_attn=False,
        norm_num_groups=32,
    )
    expected = model.state_dict()
    loaded = read_state_dict(_save(expected, tmp_path / "autoencoder.pt"))
    assert type(loaded) is dict
    assert list(loaded) == list(expected)
    for name, tensor in expected.items():
        assert loaded[name].dtype == tensor.numpy().dtype, name
        _assert_bitwise_equal(loaded[name], tensor)


SUPPORTED_DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
]


@pytest.mark.parametrize("dtype", SUPPORTED_DTYPES, ids=str)
def test_round_trips_every_supported_dtype_bitwise(tmp_path: Path, dtype: torch.dtype) -> None:
    torch.manual_seed(1)
    tensor = (torch.randn(3, 7) * 50).to(dtype)
    loaded = read_state_dict(_save({"t": tensor}, tmp_path / "t.pt"))["t"]
    _assert_bitwise_equal(loaded, tensor)
    if dtype == torch.bfloat16:
        assert loaded.dtype.name == "bfloat16"
        np.testing.assert_array_equal(loaded.astype(np.float32), tensor.float().numpy())
    else:
        assert loaded.dtype == tensor.numpy().dtype


def test_bfloat16_without_ml_dtypes_raises_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _save({"t": torch.ones(2, dtype=torch.bfloat16)}, tmp_path / "bf16.pt")
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)  # makes `import ml_dtypes` fail
    assert "bfloat16 tensors need the 'ml_dtypes' package" in _error(path)


def test_non_contiguous_views_keep_torch_strides_and_storage_offset(
    tmp_path: Path, grid: torch.Tensor
) -> None:
    views = {"sliced": grid[1:, ::2], "transposed": grid.T, "column": grid[:, 3]}
    loaded = read_state_dict(_save(views, tmp_path / "views.pt"))
    for name, view in views.items():
        assert not view.is_contiguous() or name == "column"
        _assert_bitwise_equal(loaded[name], view)
        assert loaded[name].strides == tuple(4 * s for s in view.stride()), name
    # The slice starts at storage element 5: its first byte is 20 bytes into the storage.
    assert grid[1:, ::2].storage_offset() == 5
    assert loaded["sliced"].__array_interface__["data"][0] - loaded[
        "transposed"
    ].__array_interface__["data"][0] == 5 * 4


def test_tensors_sharing_one_storage_share_memory(tmp_path: Path, grid: torch.Tensor) -> None:
    loaded = read_state_dict(_save({"whole": grid, "tail": grid[2:]}, tmp_path / "shared.pt"))
    assert np.shares_memory(loaded["whole"], loaded["tail"])
    np.testing.assert_array_equal(loaded["tail"], loaded["whole"][2:])
    with zipfile.ZipFile(tmp_path / "shared.pt") as archive:
        assert [n for n in archive.namelist() if "/data/" in n] == ["shared/data/0"]


def test_zero_dim_and_empty_tensors_round_trip(tmp_path: Path) -> None:
    tensors = {
        "scalar": torch.tensor(3.25),
        "int_scalar": torch.tensor(-7),
        "empty": torch.empty(0),
        "empty_2d": torch.empty(0, 3),
        "empty_view": torch.arange(6.0)[6:],
    }
    loaded = read_state_dict(_save(tensors, tmp_path / "edge.pt"))
    for name, tensor in tensors.items():
        _assert_bitwise_equal(loaded[name], tensor)
    assert loaded["scalar"].shape == () and loaded["scalar"][()] == 3.25


def test_arrays_are_read_only_views_of_a_memmap_of_the_file(
    tmp_path: Path, grid: torch.Tensor
) -> None:
    path = _save({"t": grid}, tmp_path / "mapped.pt")
    array = read_state_dict(path)["t"]
    base, chain = array, []
    while base is not None:
        chain.append(base)
        base = getattr(base, "base", None)
    memmaps = [b for b in chain if isinstance(b, np.memmap)]
    assert memmaps and Path(memmaps[-1].filename) == path.resolve()
    assert not array.flags.writeable
    with pytest.raises(ValueError):
        array[0, 0] = 1.0


def test_copy_true_returns_writable_c_contiguous_in_memory_arrays(
    tmp_path: Path, grid: torch.Tensor
) -> None:
    path = _save({"t": grid.T}, tmp_path / "copy.pt")
    array = read_state_dict(path, copy=True)["t"]
    assert array.flags.c_contiguous and array.flags.writeable and array.flags.owndata
    _assert_bitwise_equal(array, grid.T)


def test_unwraps_a_lone_state_dict_key(tmp_path: Path, grid: torch.Tensor) -> None:
    loaded = read_state_dict(_save({"state_dict": {"w": grid}}, tmp_path / "wrapped.pt"))
    assert list(loaded) == ["w"]


def test_refuses_wrapper_with_other_keys_and_names_them(
    tmp_path: Path, grid: torch.Tensor
) -> None:
    path = _save({"state_dict": {"w": grid}, "epoch": 3}, tmp_path / "trainer.pt")
    message = _error(path)
    assert "'state_dict'" in message and "'epoch'" in message


def test_missing_byteorder_record_is_read_as_little_endian(
    tmp_path: Path, grid: torch.Tensor
) -> None:
    original = _save({"t": grid}, tmp_path / "orig.pt")
    path = _rezip(original, tmp_path / "no_byteorder.pt", drop=("byteorder",))
    _assert_bitwise_equal(read_state_dict(path)["t"], grid)


# ----------------------------------------------------------------------------- refusals


def test_refuses_os_system_reduce_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"w": _RunsShell(f"touch {marker}")}, protocol=2)
    message = _error(_torch_like_zip(tmp_path / "evil.pt", payload))
    assert f"refused to unpickle global '{os.system.__module__}.system'" in message
    assert "only plain state dicts (OrderedDict of tensors) are accepted" in message
    assert not marker.exists()


def test_refuses_builtins_eval_reduce_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Evals(f"open({str(marker)!r}, 'w').close()"), protocol=2)
    message = _error(_torch_like_zip(tmp_path / "evil.pt", payload))
    assert "refused to unpickle global 'builtins.eval'" in message
    assert not marker.exists()


def test_refuses_a_pickled_nn_module(tmp_path: Path) -> None:
    message = _error(_save(torch.nn.Linear(2, 2), tmp_path / "module.pt"))
    assert "refused to unpickle global 'torch.nn.modules.linear.Linear'" in message


def test_build_opcode_cannot_alter_allowed_stand_ins(tmp_path: Path) -> None:
    # GLOBAL torch.FloatStorage; EMPTY_DICT; BUILD -> would set attributes on our stand-in.
    payload = b"\x80\x02ctorch\nFloatStorage\n}b."
    assert "malformed data.pkl" in _error(_torch_like_zip(tmp_path / "build.pt", payload))


def test_refuses_tensor_reaching_past_its_storage(tmp_path: Path) -> None:
    storage = _StorageRef(("storage", torch.FloatStorage, "0", "cpu", 4))
    payload = _crafted_pickle({"w": _TensorRef(storage, 2, (3,), (1,))})
    path = _torch_like_zip(tmp_path / "oob.pt", payload, {"0": bytes(16)})
    assert "reaches element 4 of storage '0', which has only 4 elements" in _error(path)


def test_crafted_in_bounds_tensor_matches_torch_layout(tmp_path: Path) -> None:
    storage = _StorageRef(("storage", torch.FloatStorage, "0", "cpu", 4))
    payload = _crafted_pickle({"w": _TensorRef(storage, 1, (3,), (1,))})
    data = np.arange(4, dtype="<f4").tobytes()
    path = _torch_like_zip(tmp_path / "ok.pt", payload, {"0": data})
    np.testing.assert_array_equal(read_state_dict(path)["w"], [1.0, 2.0, 3.0])


@pytest.mark.parametrize(
    "pid",
    [
        ("storage", torch.FloatStorage, "0", "cpu"),
        ("module", torch.FloatStorage, "0", "cpu", 4),
        ("storage", torch.FloatStorage, 0, "cpu", 4),
        ("storage", torch.FloatStorage, "0", "cpu", -1),
        "storage",
    ],
    ids=["short", "kind", "int_key", "negative_numel", "not_a_tuple"],
)
def test_refuses_malformed_persistent_ids(tmp_path: Path, pid: object) -> None:
    payload = _crafted_pickle({"w": _TensorRef(_StorageRef(pid), 0, (1,), (1,))})
    path = _torch_like_zip(tmp_path / "pid.pt", payload, {"0": bytes(16)})
    assert "bad persistent id" in _error(path)


def test_refuses_legacy_pre_1_6_format_with_resave_hint(tmp_path: Path, grid: torch.Tensor) -> None:
    path = _save({"t": grid}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    message = _error(path)
    assert "legacy (pre-1.6) torch.save format is not supported" in message
    assert "re-save it with torch>=1.6" in message


def test_half_of_a_real_checkpoint_is_reported_truncated(
    tmp_path: Path, grid: torch.Tensor
) -> None:
    data = _save({"t": grid}, tmp_path / "full.pt").read_bytes()
    path = tmp_path / "half.pt"
    path.write_bytes(data[: len(data) // 2])
    assert "truncated or corrupt checkpoint: zip central directory not found" in _error(path)


def test_storage_entry_a_few_bytes_short_is_reported_truncated(
    tmp_path: Path, grid: torch.Tensor
) -> None:
    original = _save({"t": grid}, tmp_path / "orig.pt")
    with zipfile.ZipFile(original) as archive:
        storage = archive.read("orig/data/0")
    path = _rezip(original, tmp_path / "short.pt", replace={"data/0": storage[:-3]})
    message = _error(path)
    assert "has 77 bytes but 20 x 4 = 80 are needed (truncated or corrupt file)" in message


def test_text_file_is_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "notes.pt"
    path.write_text("these are not the weights you are looking for\n")
    assert "not a torch.save checkpoint (neither a zip archive nor a legacy pickle)" in _error(path)


def test_missing_file_is_reported(tmp_path: Path) -> None:
    assert _error(tmp_path / "absent.pt").endswith("file not found")


def test_top_level_list_is_refused(tmp_path: Path, grid: torch.Tensor) -> None:
    message = _error(_save([grid, grid], tmp_path / "list.pt"))
    assert "top-level object is a list" in message


def test_missing_data_pkl_is_reported(tmp_path: Path, grid: torch.Tensor) -> None:
    original = _save({"t": grid}, tmp_path / "orig.pt")
    path = _rezip(original, tmp_path / "no_pickle.pt", drop=("data.pkl",))
    assert "no '<archive>/data.pkl' entries" in _error(path)


def test_unsupported_storage_type_is_named(tmp_path: Path) -> None:
    path = _save({"z": torch.ones(2, dtype=torch.complex64)}, tmp_path / "complex.pt")
    assert "unsupported storage type 'torch.ComplexFloatStorage'" in _error(path)


def test_big_endian_byteorder_is_refused(tmp_path: Path, grid: torch.Tensor) -> None:
    original = _save({"t": grid}, tmp_path / "orig.pt")
    path = _rezip(original, tmp_path / "big.pt", replace={"byteorder": b"big"})
    assert "byteorder 'big' is not supported" in _error(path)


def test_compressed_storage_entries_are_refused(tmp_path: Path, grid: torch.Tensor) -> None:
    original = _save({"t": grid}, tmp_path / "orig.pt")
    path = _rezip(original, tmp_path / "deflated.pt", compression=zipfile.ZIP_DEFLATED)
    assert "is compressed or encrypted (zip method 8)" in _error(path)


# ----------------------------------------------------------------------------- misc


def test_file_md5_matches_hashlib_across_chunk_boundaries(tmp_path: Path) -> None:
    path = tmp_path / "blob.bin"
    data = np.random.default_rng(0).bytes(3 * (1 << 20) + 12345)
    path.write_bytes(data)
    assert file_md5(path) == hashlib.md5(data).hexdigest()
    assert file_md5(str(path)) == file_md5(path)


def _run_python(code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter that can import this checkout's package."""
    python_path = os.pathsep.join(filter(None, [str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": python_path}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)


def test_importing_the_reader_does_not_import_torch() -> None:
    code = (
        "import sys, brain_ldm_nodes.weights.torch_checkpoint as m; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    result = _run_python(code)
    assert result.returncode == 0, result.stderr


def test_reading_a_checkpoint_does_not_import_torch(tmp_path: Path, grid: torch.Tensor) -> None:
    path = _save({"t": grid, "h": grid.half(), "b": grid.bfloat16()}, tmp_path / "t.pt")
    code = (
        "import sys; from brain_ldm_nodes.weights.torch_checkpoint import read_state_dict; "
        f"sd = read_state_dict({str(path)!r}); assert list(sd) == ['t', 'h', 'b']; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    result = _run_python(code)
    assert result.returncode == 0, result.stderr
