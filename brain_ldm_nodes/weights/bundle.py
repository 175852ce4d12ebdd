"""Safetensors bundles: ``brain_ldm.vae`` (the autoencoder, the base) and ``brain_ldm.1``
(the U-Net + scheduler, which names its base instead of copying it).

A bundle is a folder (a local path or a Hugging Face Hub repo) holding

* ``config.json`` — the bundle's config dataclass as JSON (:class:`VAEBundleConfig` or
  :class:`ModelBundleConfig`): full architecture, weights file name and its sha256;
* ``autoencoder.safetensors`` or ``unet.safetensors`` — float32 tensors under our parameter
  names (:mod:`brain_ldm_nodes.weights.mapping`), PyTorch layouts;
* ``README.md`` — a Hugging Face model card (front matter: license, tags, base model).

Hub resolution goes through :func:`huggingface_hub.snapshot_download`, so ``HF_HUB_OFFLINE``,
``HF_HOME``/``HF_HUB_CACHE``, revisions and tokens behave as everywhere else in the ecosystem.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import equinox as eqx
import jax
import numpy as np

from .._version import __version__
from ..conditioning import CONDITIONING_ORDER
from ..grid import MODEL_GRID_SHAPE
from ..hashing import sha256_of  # noqa: F401  (re-exported: weights files are hashed here)
from ..models.autoencoder import AutoencoderKL, AutoencoderKLConfig
from ..models.layers import unpack_kernels
from ..models.unet import DiffusionModelUNet, DiffusionModelUNetConfig
from ..scheduler import DDIMSchedulerConfig
from .mapping import WeightMappingError, check_parameters, load_parameters, named_parameters

FORMAT_VERSION = 1
VAE_BUNDLE = "brain_ldm.vae"
MODEL_BUNDLE = "brain_ldm.1"
VAE_WEIGHTS = "autoencoder.safetensors"
UNET_WEIGHTS = "unet.safetensors"
BUNDLE_FILES = ["config.json", "*.safetensors", "README.md"]


class BundleError(ValueError):
    """A bundle cannot be found, read or trusted; the message names it and says why."""


class UnreadableBundleError(BundleError):
    """A bundle's folder or files cannot be read by this user (permissions)."""


class WeightsMismatchError(BundleError):
    """A weights file's sha256 is not the one its ``config.json`` records (corrupt, truncated
    or modified)."""


@dataclasses.dataclass(frozen=True)
class BaseReference:
    """Where a model bundle's base (VAE) bundle lives: a Hub repo and/or a relative path.

    A ``path`` (relative to the model bundle's folder) is tried first when it exists, so a
    freshly converted pair of folders works before anything is published.
    """

    repo_id: str | None = None
    revision: str | None = None
    path: str | None = None

    def __post_init__(self) -> None:
        if self.repo_id is None and self.path is None:
            raise ValueError("a base reference needs a repo_id or a path")


@dataclasses.dataclass(frozen=True)
class VAEBundleConfig:
    """``config.json`` of a ``brain_ldm.vae`` bundle."""

    autoencoder: AutoencoderKLConfig
    weights_file: str = VAE_WEIGHTS
    weights_sha256: str = ""
    bundle_type: Literal["brain_ldm.vae"] = VAE_BUNDLE
    format_version: int = FORMAT_VERSION
    provenance: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class ModelBundleConfig:
    """``config.json`` of a ``brain_ldm.1`` bundle (U-Net + scheduler; the VAE is the base)."""

    unet: DiffusionModelUNetConfig
    scheduler: DDIMSchedulerConfig
    base: BaseReference
    weights_file: str = UNET_WEIGHTS
    weights_sha256: str = ""
    conditioning_order: tuple[str, ...] = CONDITIONING_ORDER
    image_shape: tuple[int, int, int] = MODEL_GRID_SHAPE
    bundle_type: Literal["brain_ldm.1"] = MODEL_BUNDLE
    format_version: int = FORMAT_VERSION
    provenance: Mapping[str, Any] = dataclasses.field(default_factory=dict)


_NESTED = {
    "autoencoder": AutoencoderKLConfig,
    "unet": DiffusionModelUNetConfig,
    "scheduler": DDIMSchedulerConfig,
    "base": BaseReference,
}


def _to_json(config: VAEBundleConfig | ModelBundleConfig) -> str:
    data = dataclasses.asdict(config)
    return json.dumps(data, indent=2, sort_keys=True, default=list) + "\n"


def _from_json(text: str, source: str) -> VAEBundleConfig | ModelBundleConfig:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise BundleError(f"{source}: config.json is not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise BundleError(f"{source}: config.json must hold a JSON object")
    kind = data.get("bundle_type")
    cls = {VAE_BUNDLE: VAEBundleConfig, MODEL_BUNDLE: ModelBundleConfig}.get(kind)
    if cls is None:
        raise BundleError(
            f"{source}: config.json has bundle_type {kind!r}; expected {VAE_BUNDLE!r} or {MODEL_BUNDLE!r}"
        )
    if data.get("format_version") != FORMAT_VERSION:
        raise BundleError(
            f"{source}: bundle format_version {data.get('format_version')!r} is not supported by "
            f"brain-ldm-nodes {__version__} (supported: {FORMAT_VERSION})"
        )
    known = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise BundleError(f"{source}: config.json has unknown key(s) {unknown}")
    try:
        kwargs = {
            name: _NESTED[name](**value) if name in _NESTED else value for name, value in data.items()
        }
        for name in ("conditioning_order", "image_shape"):
            if name in kwargs:
                kwargs[name] = tuple(kwargs[name])
        return cls(**kwargs)
    except (TypeError, ValueError) as error:
        raise BundleError(f"{source}: config.json does not describe a valid {kind} bundle: {error}") from None


# -- verification records ------------------------------------------------------------------------
#: Environment variable: a folder for verification records, or ``0``/``off`` to hash every load.
VERIFY_RECORDS_ENV = "BRAIN_LDM_NODES_VERIFIED_DIR"


def verification_record_dir() -> Path | None:
    """Where records of verified weights files are kept (``None``: records are off).

    ``$BRAIN_LDM_NODES_VERIFIED_DIR`` if set (``0``, ``off`` or empty turn records off), else
    ``$XDG_CACHE_HOME/brain-ldm-nodes/verified`` (``~/.cache/…``).
    """
    value = os.environ.get(VERIFY_RECORDS_ENV)
    if value is not None:
        return None if value.strip().lower() in ("", "0", "off", "false", "no") else Path(value).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(cache).expanduser() / "brain-ldm-nodes" / "verified"


def _file_identity(path: Path) -> dict[str, Any]:
    """What changes whenever a file's content does: resolved path, device, inode, size, and
    modification and status-change times (ns). The status-change time (ctime) is set by the
    kernel on every write and cannot be set back by ``touch`` or ``os.utime``."""
    resolved = Path(path).resolve()
    status = resolved.stat()
    return {"path": str(resolved), "device": status.st_dev, "inode": status.st_ino,
            "size": status.st_size, "mtime_ns": status.st_mtime_ns, "ctime_ns": status.st_ctime_ns}


def verify_weights_file(path: Path, expected_sha256: str) -> None:
    """Check ``path`` against ``expected_sha256``; hash it unless a record says this very file
    (same :func:`_file_identity`) already matched that digest.

    After a successful hash a record ``<sha256 of the resolved path>.json`` holding the identity
    and the digest is written to :func:`verification_record_dir` (best effort: a read-only or
    missing cache only costs the re-hash next time). Any change to the file — content, size,
    replacement, ``touch`` — changes its identity, so it is hashed again.

    Raises:
        BundleError: the digest does not match.
    """
    identity = _file_identity(path)
    expected = {**identity, "sha256": expected_sha256}
    folder = verification_record_dir()
    record = None
    if folder is not None:
        record = folder / (hashlib.sha256(identity["path"].encode()).hexdigest() + ".json")
        try:
            if json.loads(record.read_text(encoding="utf-8")) == expected:
                return
        except (OSError, ValueError):
            pass
    digest = sha256_of(path)
    if digest != expected_sha256:
        raise WeightsMismatchError(
            f"{path}: sha256 {digest} does not match {expected_sha256} in config.json; "
            "the file is corrupt or was modified (re-download or re-convert it)"
        )
    if record is not None and _file_identity(path) == identity:  # unchanged while we hashed it
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=folder, suffix=".tmp", delete=False,
                                             encoding="utf-8") as handle:
                json.dump(expected, handle)
            os.replace(handle.name, record)
        except OSError:
            pass


# -- writing -------------------------------------------------------------------------------------
_SAFETENSORS_NAMES = {np.dtype(dtype): name for name, dtype in
                      (("F32", np.float32), ("F16", np.float16), ("F64", np.float64))}


def write_safetensors(
    path: Path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
) -> None:
    """Write ``tensors`` as a safetensors file whose bytes depend on the tensors alone.

    ``safetensors.numpy.save_file`` writes its ``__metadata__`` from a hash map whose order
    changes from call to call, so the same tensors gave different files (and sha256). Here the
    header is JSON with sorted keys and no spaces, padded with spaces to 8 bytes, followed by
    the tensors in name order, little-endian and C-contiguous (the format as ``safetensors``
    reads it). Memory-mapped inputs are streamed, not copied whole.
    """
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(key): str(value) for key, value in metadata.items()}
    offset = 0
    ordered = []
    for name in sorted(tensors):
        array = np.asarray(tensors[name])
        dtype = array.dtype.newbyteorder("=")
        if dtype not in _SAFETENSORS_NAMES:
            raise ValueError(f"tensor {name!r}: dtype {array.dtype} is not float16/32/64")
        size = array.size * dtype.itemsize
        header[name] = {"dtype": _SAFETENSORS_NAMES[dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + size]}
        ordered.append(np.ascontiguousarray(array, dtype=dtype.newbyteorder("<")))
        offset += size
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as handle:
        handle.write(len(text).to_bytes(8, "little"))
        handle.write(text)
        for array in ordered:
            flat = array.reshape(-1)
            for start in range(0, flat.size, 1 << 24):  # 64 MiB of float32 at a time
                handle.write(flat[start:start + (1 << 24)].tobytes())


def current_umask() -> int:
    """The process's umask (read without changing it where Linux shows it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # pragma: no cover - not Linux
    os.umask(mask)
    return mask


def _write_bundle(
    folder: Path,
    tensors: Mapping[str, np.ndarray],
    config_without_sha: VAEBundleConfig | ModelBundleConfig,
    card: str,
) -> Path:
    """Write weights, config and card into ``folder`` via a sibling temporary folder + rename."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        # mkdtemp makes the folder 0700; a bundle is shared like any folder (umask 022: 0755).
        os.chmod(staging, 0o777 & ~current_umask())
        weights = staging / config_without_sha.weights_file
        write_safetensors(weights, tensors,
                          metadata={"format": "np", "bundle_type": config_without_sha.bundle_type})
        config = dataclasses.replace(config_without_sha, weights_sha256=sha256_of(weights))
        (staging / "config.json").write_text(_to_json(config), encoding="utf-8")
        (staging / "README.md").write_text(card, encoding="utf-8")
        if folder.exists():
            if not (folder / "config.json").is_file():
                raise BundleError(f"{folder}: exists and is not a bundle; refusing to overwrite it")
            shutil.rmtree(folder)
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def module_tensors(module: eqx.Module) -> dict[str, np.ndarray]:
    """``{our name: float32 numpy array}`` of a network, as bundles store it (kernels that
    :func:`~brain_ldm_nodes.models.layers.pack_kernels` packed for oneDNN are stored plain)."""
    plain = unpack_kernels(module)
    return {name: np.asarray(array, np.float32) for name, array in named_parameters(plain).items()}


def save_vae_bundle(
    folder: str | os.PathLike,
    config: AutoencoderKLConfig,
    tensors: Mapping[str, np.ndarray],
    *,
    provenance: Mapping[str, Any] | None = None,
) -> Path:
    """Write a ``brain_ldm.vae`` bundle into ``folder`` (replaced if it already is a bundle).

    ``tensors`` are checked against ``config``'s architecture before anything is written.
    """
    skeleton = eqx.filter_eval_shape(AutoencoderKL, config, key=jax.random.key(0))
    check_parameters(skeleton, tensors, source=str(folder))
    bundle_config = VAEBundleConfig(config, provenance=dict(provenance or {}))
    return _write_bundle(Path(folder), tensors, bundle_config, model_card(bundle_config))


def save_model_bundle(
    folder: str | os.PathLike,
    config: DiffusionModelUNetConfig,
    tensors: Mapping[str, np.ndarray],
    scheduler: DDIMSchedulerConfig,
    base: BaseReference,
    *,
    provenance: Mapping[str, Any] | None = None,
    image_shape: tuple[int, int, int] = MODEL_GRID_SHAPE,
) -> Path:
    """Write a ``brain_ldm.1`` bundle (U-Net + scheduler, referring to ``base``) into ``folder``.

    ``image_shape`` is the model's native grid (voxels), the default for sampling.
    """
    skeleton = eqx.filter_eval_shape(DiffusionModelUNet, config, key=jax.random.key(0))
    check_parameters(skeleton, tensors, source=str(folder))
    bundle_config = ModelBundleConfig(
        config, scheduler, base, provenance=dict(provenance or {}), image_shape=tuple(image_shape)
    )
    return _write_bundle(Path(folder), tensors, bundle_config, model_card(bundle_config))


def model_card(config: VAEBundleConfig | ModelBundleConfig) -> str:
    """A Hugging Face model card (YAML front matter + Markdown) for a bundle."""
    is_vae = isinstance(config, VAEBundleConfig)
    front = [
        "---",
        "license: apache-2.0",
        "library_name: brain-ldm-nodes",
        "tags:",
        *[f"- {tag}" for tag in ("medical-imaging", "mri", "neuroimaging", "brain", "3d",
                                 "latent-diffusion", "jax", "equinox", "brain-ldm-nodes")],
    ]
    if not is_vae and config.base.repo_id:
        front += [f"base_model: {config.base.repo_id}", "base_model_relation: adapter"]
    front.append("---")
    provenance = json.dumps(dict(config.provenance), indent=2, sort_keys=True)
    if is_vae:
        title = "# Brain LDM autoencoder (`brain_ldm.vae`)"
        what = (
            "The KL autoencoder of the Brain LDM (Pinaya et al. 2022): a 3-D T1w image "
            "(1 mm, LAS, intensities in [0, 1]) ↔ a 3-channel latent at 1/8 size. This is the "
            "base bundle of `brain_ldm.1`."
        )
    else:
        base = config.base.repo_id or config.base.path
        title = "# Brain LDM diffusion model (`brain_ldm.1`)"
        what = (
            "The conditional 3-D diffusion U-Net and DDIM scheduler of the Brain LDM (Pinaya et "
            "al. 2022). Conditioning, in this order: sex (0 = female, 1 = male), age "
            "((years − 44) / 38), ventricular CSF volume, brain volume, each in [0, 1]. Only the "
            f"U-Net is stored here; the autoencoder is the base bundle `{base}`"
            + (f" at revision `{config.base.revision}`" if config.base.revision else "") + "."
        )
    return "\n".join(front) + f"""

{title}

{what}

Load with [brain-ldm-nodes](https://github.com/brain-ldm-nodes/brain-ldm-nodes):

```python
from brain_ldm_nodes import BrainLDM
model = BrainLDM.from_pretrained("<this repo id or folder>")
```

Research use only; not a medical device. Synthetic images are not patient data but the
model was trained on UK Biobank T1w images (31,740 subjects).

## Provenance

Weights converted from the MONAI model-zoo bundle `brain_image_synthesis_latent_diffusion_model`
(architecture and weights © MONAI Consortium, Apache-2.0) unless the record below says
otherwise. Weights file `{config.weights_file}`, sha256 `{config.weights_sha256 or '(see config.json)'}`.

```json
{provenance}
```

## Citation

Pinaya W. H. L., Tudosiu P.-D., Dafflon J., Da Costa P. F., Fernandez V., Nachev P., Ourselin S.,
Cardoso M. J. (2022). Brain imaging generation with latent diffusion models. MICCAI Workshop on
Deep Generative Models, pp. 117–126. arXiv:2209.07162.
"""


# -- reading -------------------------------------------------------------------------------------
def resolve_bundle(
    repo_id_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
    token: str | bool | None = None,
) -> Path:
    """The local folder of a bundle: an existing directory as is, else a Hub snapshot.

    Raises:
        BundleError: the folder lacks ``config.json``, or the repo is not in the cache while
            offline, or does not exist; the message says which and what to do.
    """
    candidate = Path(os.fspath(repo_id_or_path)).expanduser()
    try:
        is_folder = candidate.is_dir()
    except PermissionError as error:
        raise UnreadableBundleError(unreadable_bundle_message(candidate, error)) from None
    if is_folder:
        try:
            has_config = (candidate / "config.json").is_file()
            if has_config:
                with open(candidate / "config.json", "rb"):
                    pass
        except OSError as error:
            raise UnreadableBundleError(unreadable_bundle_message(candidate, error)) from None
        if not has_config:
            raise BundleError(f"{candidate}: not a brain-ldm bundle (no config.json)")
        return candidate
    name = os.fspath(repo_id_or_path)
    import huggingface_hub
    from huggingface_hub import errors as hub_errors
    from huggingface_hub.utils import validate_repo_id

    if _looks_like_path(name):
        missing = f"{name}: no such bundle folder" + (
            "" if candidate.is_absolute() else f" ({candidate.absolute()} does not exist)")
        try:
            valid_repo_id = validate_repo_id(name) is None
        except hub_errors.HFValidationError:
            valid_repo_id = False
        if not valid_repo_id:
            raise BundleError(missing)
        try:  # a valid repo id as well: use it only if it is already in the local cache
            kwargs = {"revision": revision, "cache_dir": cache_dir, "token": token,
                      "allow_patterns": BUNDLE_FILES, "local_files_only": True}
            return Path(huggingface_hub.snapshot_download(name, **kwargs))
        except (hub_errors.LocalEntryNotFoundError, hub_errors.HFValidationError, OSError):
            raise BundleError(
                f"{missing}; as a Hugging Face Hub repo id it is not in the local cache either "
                f"(`brain-ldm-fetch {name}` fetches it)"
            ) from None

    kwargs: dict[str, Any] = {"revision": revision, "cache_dir": cache_dir, "token": token,
                              "allow_patterns": BUNDLE_FILES}
    if local_files_only is not None:
        kwargs["local_files_only"] = local_files_only
    try:
        folder = huggingface_hub.snapshot_download(name, **kwargs)
    except (hub_errors.LocalEntryNotFoundError, hub_errors.RepositoryNotFoundError) as error:
        if name.endswith((MODEL_BUNDLE, VAE_BUNDLE)):  # a bundle folder's name: meant as a path
            where = ("in the local cache" if isinstance(error, hub_errors.LocalEntryNotFoundError)
                     else "on the Hub")
            raise BundleError(
                f"{name}: no such bundle folder ({candidate.absolute()} does not exist); as a "
                f"Hugging Face Hub repo id it is not {where} either "
                f"(`brain-ldm-fetch {name}` fetches it)"
            ) from None
        if isinstance(error, hub_errors.RepositoryNotFoundError):
            raise BundleError(f"{name}: {type(error).__name__}: {error}".splitlines()[0]) from None
        raise BundleError(
            f"{name}" + (f"@{revision}" if revision else "") + ": not found in the Hugging Face "
            "cache and downloads are off (HF_HUB_OFFLINE=1 or local_files_only). Fetch it (and "
            "its base bundle) first on a machine with network access: "
            f"`brain-ldm-fetch {name}" + (f" --revision {revision}" if revision else "") + "`, "
            "then point HF_HOME/HF_HUB_CACHE at that cache"
        ) from None
    except hub_errors.HFValidationError as error:
        raise BundleError(f"{name}: neither a bundle folder nor a valid Hub repo id ({error})") from None
    except hub_errors.RevisionNotFoundError as error:
        raise BundleError(f"{name}: {type(error).__name__}: {error}".splitlines()[0]) from None
    return Path(folder)


def unreadable_bundle_message(folder: Path, error: OSError) -> str:
    """One line: ``folder`` (a bundle) cannot be read by this user, and how its owner fixes it."""
    return (f"{folder}: cannot read the bundle ({error.strerror or type(error).__name__}: "
            f"{error.filename or folder}); its folders and files must be readable by you "
            f"(its owner can run `chmod -R a+rX {folder}`)")


def _looks_like_path(name: str) -> bool:
    """Whether a model name that is not an existing folder was meant as one: it starts with
    ``.``, ``/`` or ``~``, has other than one ``/`` (repo ids are ``owner/name``) or a
    backslash, or its first component is an existing local folder (``converted/brain_ldm.1`` after
    ``mkdir converted``)."""
    if name.startswith((".", "/", "~")) or name.count("/") != 1 or "\\" in name:
        return True
    return Path(name.split("/", 1)[0]).is_dir()


def read_bundle_config(folder: Path) -> VAEBundleConfig | ModelBundleConfig:
    """Parse and validate ``folder/config.json``."""
    path = Path(folder) / "config.json"
    try:
        text = path.read_text(encoding="utf-8")
    except PermissionError as error:
        raise UnreadableBundleError(unreadable_bundle_message(Path(folder), error)) from None
    except OSError as error:
        raise BundleError(f"{folder}: cannot read config.json ({error.strerror})") from None
    return _from_json(text, str(folder))


def check_weights_file(
    folder: Path, config: VAEBundleConfig | ModelBundleConfig, *, verify: bool = True
) -> Path:
    """The bundle's weights file, checked: present, readable and (``verify``) matching the
    sha256 in ``config.json`` (:func:`verify_weights_file`).

    Raises:
        BundleError: the file is missing or does not match; :class:`UnreadableBundleError`
            when this user may not read it.
    """
    weights = Path(folder) / config.weights_file
    try:
        if not weights.is_file():
            raise BundleError(f"{folder}: weights file {config.weights_file} is missing")
        if verify:
            verify_weights_file(weights, config.weights_sha256)
        with open(weights, "rb"):
            pass
    except PermissionError as error:
        raise UnreadableBundleError(unreadable_bundle_message(Path(folder), error)) from None
    return weights


def load_bundle_weights(
    folder: Path, config: VAEBundleConfig | ModelBundleConfig, *, verify: bool = True
) -> AutoencoderKL | DiffusionModelUNet:
    """The network of a bundle, its weights checked against the sha256 in ``config.json``."""
    weights = check_weights_file(folder, config, verify=verify)
    if isinstance(config, VAEBundleConfig):
        skeleton = eqx.filter_eval_shape(AutoencoderKL, config.autoencoder, key=jax.random.key(0))
    else:
        skeleton = eqx.filter_eval_shape(DiffusionModelUNet, config.unet, key=jax.random.key(0))
    tensors = read_safetensors(weights)
    try:
        return load_parameters(skeleton, tensors, source=str(weights))
    except WeightMappingError as error:
        raise BundleError(str(error)) from None


_SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64}


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """``{name: array}`` of a safetensors file as read-only views of one memory map (no copy:
    the caller's conversion to JAX arrays is the only one). The header is checked as
    ``safetensors`` itself does (offsets contiguous, in bounds, sizes matching shapes).

    Raises:
        BundleError: the file is not a safetensors file of float tensors.
    """
    try:
        mapped = np.memmap(path, dtype=np.uint8, mode="r")
        header_size = int(mapped[:8].view("<u8")[0]) if mapped.size >= 8 else -1
        if not 0 < header_size <= mapped.size - 8:
            raise ValueError("bad header size")
        header = json.loads(bytes(mapped[8:8 + header_size]).decode("utf-8"))
        header.pop("__metadata__", None)
        data = mapped[8 + header_size:]
        tensors, end = {}, 0
        for name, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            dtype = np.dtype(_SAFETENSORS_DTYPES[entry["dtype"]]).newbyteorder("<")
            begin, stop = (int(v) for v in entry["data_offsets"])
            shape = tuple(int(v) for v in entry["shape"])
            if begin != end or stop > data.size or stop - begin != dtype.itemsize * int(np.prod(shape)):
                raise ValueError(f"tensor {name!r} has inconsistent offsets {entry['data_offsets']}")
            tensors[name] = data[begin:stop].view(dtype).reshape(shape)
            end = stop
        if end != data.size:
            raise ValueError("trailing bytes after the last tensor")
        return tensors
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
        raise BundleError(f"{path}: not a readable safetensors file ({type(error).__name__}: {error})") from None


def resolve_base(
    folder: Path,
    base: BaseReference,
    *,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
    token: str | bool | None = None,
) -> Path:
    """The local folder of a model bundle's base VAE bundle."""
    if base.path is not None:
        local = (Path(folder) / base.path).resolve()
        if local.is_dir():
            return resolve_bundle(local)
        if base.repo_id is None:
            raise BundleError(
                f"{folder}: base bundle path {base.path!r} ({local}) does not exist and no base repo_id is given"
            )
    return resolve_bundle(
        base.repo_id, revision=base.revision, cache_dir=cache_dir,
        local_files_only=local_files_only, token=token,
    )
