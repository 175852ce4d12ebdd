"""The BIDS App's output folder: names, seeds, what is already done, locking, dataset files.

No JAX and no Nipype here (nibabel only reads headers), so all of it is testable alone.

Layout of ``output_dir`` (a BIDS derivative dataset)::

    dataset_description.json        DatasetType "derivative", GeneratedBy, SourceDatasets
    README.md                       what the dataset is (written once, never overwritten)
    .bidsignore                     lists /group (the group report is not BIDS)
    sub-<label>/anat/sub-<label>_desc-synthetic_T1w.nii.gz + .json           (--n-samples 1)
    sub-<label>/anat/sub-<label>_run-<n>_desc-synthetic_T1w.nii.gz + .json    (n = 1..N)
    group/                          the group level (:mod:`brain_ldm_nodes.report`)
    .brain-ldm-bids.lock            flock-ed while a run uses the folder
    .brain-ldm-bids-work/           the default Nipype work folder (removed after a clean run)

Seeds: image ``n`` (0-based) of participant ``X`` uses :func:`derive_seed` ``(seed, X, n)``,
so it does not depend on which other participants a run includes.

Resumability. Every file is written atomically (a hidden temporary, then a rename), and an
image's sidecar is removed before the image is (re)written and written after it
(:func:`publish_image`): a sidecar next to an image therefore always describes that image, and
a killed run leaves at most an image without a sidecar (redone) and hidden ``.*.tmp-*`` files
(removed by the next run). :func:`assess` compares an existing sidecar with the request: a
difference in what determines the voxels (conditioning values, seed, steps, scheduler, weights,
grid) means the image is sampled again; a difference only in the description (raw cells,
derivation record, policy) means only the sidecar is rewritten (:func:`refresh_sidecar`).
Per-image files hold nothing run-specific (no time stamps, no work paths), so a resumed run
gives the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import socket
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ._version import __version__
from .imaging import atomic_write, write_json

if TYPE_CHECKING:  # pragma: no cover - typing only; keeps pybids out of this module's imports
    from .bids import Participant, ParticipantsTable

__all__ = [
    "BIDS_VERSION",
    "DEFAULT_WORK_DIR_NAME",
    "GENERATED_BY",
    "LOCK_NAME",
    "Assessment",
    "ImageRequest",
    "LockHeldError",
    "ModelIdentity",
    "OutputDirError",
    "OutputLock",
    "assess",
    "check_locations",
    "dataset_description",
    "derive_seed",
    "image_relative_path",
    "plan_images",
    "prepare_output_dir",
    "publish_image",
    "read_own_description",
    "refresh_sidecar",
    "remove_stale_temporaries",
    "sidecar_path",
    "write_dataset_files",
]

GENERATED_BY = "brain-ldm-bids"
CODE_URL = "https://github.com/brain-ldm-nodes/brain-ldm-nodes"
BIDS_VERSION = "1.10.0"
DESC = "synthetic"
LOCK_NAME = ".brain-ldm-bids.lock"
DEFAULT_WORK_DIR_NAME = ".brain-ldm-bids-work"
GROUP_DIR_NAME = "group"
SEED_FORMULA = (
    "int.from_bytes(hashlib.sha256(f'{BaseSeed}:{Participant}:{SampleIndex}'.encode())"
    ".digest()[:4], 'big')"
)
#: Environment variables a container image sets to be named in GeneratedBy.Container.
CONTAINER_ENV = {"Type": "BRAIN_LDM_CONTAINER_TYPE", "Tag": "BRAIN_LDM_CONTAINER_TAG"}
REFERENCE = (
    "Pinaya et al. 2022, Brain imaging generation with latent diffusion models, arXiv:2209.07162"
)


class OutputDirError(ValueError):
    """``output_dir`` (or the work folder) cannot be used; the one-line message says why."""


class LockHeldError(OutputDirError):
    """Another run holds ``output_dir``'s lock."""


# --------------------------------------------------------------------------- seeds and names


def derive_seed(base_seed: int, label: str, index: int) -> int:
    """The seed of image ``index`` (0-based) of participant ``label``, in [0, 2**32).

    The first 4 bytes (big-endian) of ``sha256(f"{base_seed}:{label}:{index}")``: a function
    of these three values only.
    """
    digest = hashlib.sha256(f"{int(base_seed)}:{label}:{int(index)}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def image_relative_path(label: str, index: int, n_samples: int) -> Path:
    """``sub-<label>/anat/sub-<label>[_run-<index + 1>]_desc-synthetic_T1w.nii.gz``.

    The ``run`` entity numbers the images of a participant when there are several
    (``n_samples > 1``); with one image it is left out, as BIDS allows.
    """
    run = f"_run-{index + 1}" if n_samples > 1 else ""
    return Path(f"sub-{label}", "anat", f"sub-{label}{run}_desc-{DESC}_T1w.nii.gz")


def sidecar_path(image: str | os.PathLike[str]) -> Path:
    """The JSON sidecar of a ``.nii.gz`` / ``.nii`` image."""
    path = Path(image)
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return path.with_name(name[: -len(suffix)] + ".json")
    raise ValueError(f"{path}: not a NIfTI file name (.nii.gz or .nii)")


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class ModelIdentity:
    """What a run needs to know about the model without loading its weights.

    ``model`` is what the nodes load (an absolute bundle folder, or a Hub repo id);
    the sha256 sums, scheduler and grid come from the bundles' ``config.json``.
    """

    model: str
    revision: str | None
    folder: Path
    unet_sha256: str
    vae_sha256: str
    scheduler: Mapping[str, Any]
    image_shape: tuple[int, int, int]

    @classmethod
    def resolve(
        cls, model: str, revision: str | None = None, *, local_files_only: bool | None = True
    ) -> ModelIdentity:
        """Find the ``brain_ldm.1`` bundle and its base VAE bundle; read their configs.

        Raises :class:`brain_ldm_nodes.weights.bundle.BundleError` (one line) when a bundle
        is missing (not in the Hugging Face cache while offline), not a bundle, of the wrong
        type, or lacks its weights file.
        """
        from .weights import bundle

        candidate = Path(model).expanduser()
        name = str(candidate.resolve()) if candidate.is_dir() else str(model)
        folder = bundle.resolve_bundle(name, revision=revision, local_files_only=local_files_only)
        config = bundle.read_bundle_config(folder)
        if not isinstance(config, bundle.ModelBundleConfig):
            raise bundle.BundleError(
                f"{model}: is a {config.bundle_type} bundle (the autoencoder alone); --model needs "
                f"a {bundle.MODEL_BUNDLE} bundle, which names the autoencoder as its base"
            )
        vae_folder = bundle.resolve_base(folder, config.base, local_files_only=local_files_only)
        vae_config = bundle.read_bundle_config(vae_folder)
        if not isinstance(vae_config, bundle.VAEBundleConfig):
            raise bundle.BundleError(
                f"{vae_folder}: the base of {model} must be a {bundle.VAE_BUNDLE} bundle, found "
                f"{vae_config.bundle_type}"
            )
        for where, cfg in ((folder, config), (vae_folder, vae_config)):
            if not (Path(where) / cfg.weights_file).is_file():
                raise bundle.BundleError(f"{where}: weights file {cfg.weights_file} is missing")
        return cls(
            model=name,
            revision=revision,
            folder=Path(folder),
            unet_sha256=config.weights_sha256,
            vae_sha256=vae_config.weights_sha256,
            scheduler=_json_normal(config.scheduler.to_dict()),
            image_shape=tuple(int(size) for size in config.image_shape),
        )

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler["num_train_timesteps"])


def software_versions_text() -> str:
    """The BIDS ``SoftwareVersions`` value (a string): ``"brain_ldm_nodes 0.1.0, jax ..."``.

    :func:`~brain_ldm_nodes.provenance.synthesis_sidecar` records the versions as an object,
    which the BIDS validator refuses for this key (JSON_SCHEMA_VALIDATION_ERROR).
    """
    from .provenance import software_versions

    return ", ".join(f"{name} {version or 'not installed'}"
                     for name, version in software_versions().items())


# --------------------------------------------------------------------------- requests


_MISSING = object()

#: Sidecar keys that determine the voxels: a difference means sampling again.
IMAGE_KEYS: tuple[tuple[str, ...], ...] = (
    ("Conditioning", "Values"),
    ("Seed",),
    ("Sampler", "NumInferenceSteps"),
    ("Sampler", "Scheduler"),
    ("Model", "Source", "model", "weights_sha256"),
    ("Model", "Source", "vae", "weights_sha256"),
    ("Grid", "Shape"),
)
#: Sidecar keys that only describe the image: a difference means rewriting the sidecar.
METADATA_KEYS: tuple[tuple[str, ...], ...] = (
    ("Conditioning", "Derivation"),
    ("Conditioning", "OutsideUnitRange"),
    ("Demographics",),
    ("SeedDerivation",),
    ("SkullStripped",),
)


def _json_normal(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists, keys strings)."""
    return json.loads(json.dumps(value, sort_keys=True))


@dataclass(frozen=True)
class ImageRequest:
    """One synthetic image to have in ``output_dir``: who, which sample, how."""

    participant: Participant
    index: int
    n_samples: int
    base_seed: int
    num_inference_steps: int
    model: ModelIdentity
    columns: Mapping[str, str | None]
    policy: Mapping[str, Any]
    tsv_name: str = "participants.tsv"

    def __post_init__(self) -> None:
        if self.participant.conditioning is None:
            raise ValueError(f"sub-{self.participant.label} has no usable conditioning")
        if not 0 <= self.index < self.n_samples:
            raise ValueError(f"sample index {self.index} is outside 0..{self.n_samples - 1}")

    @property
    def label(self) -> str:
        return self.participant.label

    @property
    def seed(self) -> int:
        return derive_seed(self.base_seed, self.label, self.index)

    @property
    def relative_path(self) -> Path:
        return image_relative_path(self.label, self.index, self.n_samples)

    @property
    def stem(self) -> str:
        return self.relative_path.name[: -len(".nii.gz")]

    @property
    def title(self) -> str:
        """``sub-01 image 2/3``: how progress lines name the image."""
        return f"sub-{self.label} image {self.index + 1}/{self.n_samples}"

    def extra_metadata(self) -> dict[str, Any]:
        """Sidecar keys added to :func:`~brain_ldm_nodes.provenance.synthesis_sidecar`'s.

        The raw cells and where they came from, the seed's derivation, and the BIDS keys
        required of derivative anatomical images.
        """
        return _json_normal({
            "Demographics": {
                "Source": self.tsv_name,
                "ParticipantId": self.participant.participant_id,
                "Columns": dict(self.columns),
                "Values": dict(self.participant.raw),
                "Policy": dict(self.policy),
            },
            "SeedDerivation": {
                "BaseSeed": self.base_seed,
                "Participant": self.label,
                "SampleIndex": self.index,
                "Formula": SEED_FORMULA,
            },
            # Required of derivative anatomical images. The model samples whole-head images
            # like its training data (UK Biobank T1w, rigidly registered, not brain-extracted).
            "SkullStripped": False,
        })

    def expected(self) -> dict[tuple[str, ...], Any]:
        """Sidecar key path -> the value the request implies (IMAGE_KEYS and METADATA_KEYS)."""
        conditioning = self.participant.conditioning
        values = [float(v) for v in conditioning.values]
        extras = self.extra_metadata()
        return {
            ("Conditioning", "Values"): values,
            ("Seed",): self.seed,
            ("Sampler", "NumInferenceSteps"): self.num_inference_steps,
            ("Sampler", "Scheduler"): _json_normal(self.model.scheduler),
            ("Model", "Source", "model", "weights_sha256"): self.model.unet_sha256,
            ("Model", "Source", "vae", "weights_sha256"): self.model.vae_sha256,
            ("Grid", "Shape"): list(self.model.image_shape),
            ("Conditioning", "Derivation"): (
                _json_normal(dict(conditioning.record)) if conditioning.record else _MISSING
            ),
            ("Conditioning", "OutsideUnitRange"): [
                name for name, value in conditioning.as_dict().items() if not 0.0 <= value <= 1.0
            ],
            ("Demographics",): extras["Demographics"],
            ("SeedDerivation",): extras["SeedDerivation"],
            ("SkullStripped",): extras["SkullStripped"],
        }


def plan_images(
    table: ParticipantsTable,
    *,
    n_samples: int,
    base_seed: int,
    num_inference_steps: int,
    model: ModelIdentity,
) -> list[ImageRequest]:
    """Every image of every usable participant of ``table``, in label then sample order."""
    if n_samples < 1:
        raise ValueError(f"n_samples must be ≥ 1, got {n_samples}")
    policy = table.policy.to_dict()
    return [
        ImageRequest(
            participant=participant,
            index=index,
            n_samples=n_samples,
            base_seed=base_seed,
            num_inference_steps=num_inference_steps,
            model=model,
            columns=dict(table.columns),
            policy=policy,
            tsv_name=table.tsv_path.name,
        )
        for participant in table.usable
        for index in range(n_samples)
    ]


# --------------------------------------------------------------------------- what is done


@dataclass(frozen=True)
class Assessment:
    """What an existing output needs: nothing, a new sidecar, or sampling (with why)."""

    action: Literal["complete", "refresh", "generate"]
    reason: str


def _lookup(document: Any, path: Sequence[str]) -> Any:
    for key in path:
        if not isinstance(document, Mapping) or key not in document:
            return _MISSING
        document = document[key]
    return document


def _shown(value: Any, limit: int = 60) -> str:
    text = "(absent)" if value is _MISSING else json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _difference(
    document: Mapping[str, Any],
    expected: Mapping[tuple[str, ...], Any],
    keys: Iterable[tuple[str, ...]],
) -> str | None:
    for path in keys:
        found, wanted = _lookup(document, path), expected[path]
        if found != wanted:
            return f"{'.'.join(path)} is {_shown(found)}, the request gives {_shown(wanted)}"
    return None


def _read_sidecar(path: Path) -> dict[str, Any] | str:
    """The sidecar as a dict, or a one-line reason why it cannot be used."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"{path.name} is not readable JSON ({exc})"
    if not isinstance(document, dict):
        return f"{path.name} is not a JSON object"
    return document


def _image_problem(path: Path, shape: Sequence[int]) -> str | None:
    """Why the NIfTI at ``path`` is not a usable output of ``shape`` (reads the header only)."""
    import nibabel as nib

    try:
        found = tuple(int(n) for n in nib.load(path).shape)
    except Exception as exc:  # nibabel raises several types for damaged files
        return f"{path.name} is not a readable NIfTI image ({type(exc).__name__})"
    if found != tuple(shape):
        return f"{path.name} has shape {found}, the model's grid is {tuple(shape)}"
    return None


def assess(request: ImageRequest, output_dir: str | os.PathLike[str]) -> Assessment:
    """Compare the image of ``request`` in ``output_dir`` (if any) with the request."""
    image = Path(output_dir) / request.relative_path
    sidecar = sidecar_path(image)
    if not sidecar.exists():
        if image.exists():
            return Assessment("generate", f"{image.name} has no sidecar (an interrupted run?)")
        return Assessment("generate", "new")
    document = _read_sidecar(sidecar)
    if isinstance(document, str):
        return Assessment("generate", document)
    if not image.exists():
        return Assessment("generate", f"{sidecar.name} has no image next to it")
    problem = _image_problem(image, request.model.image_shape)
    if problem is not None:
        return Assessment("generate", problem)
    expected = request.expected()
    difference = _difference(document, expected, IMAGE_KEYS)
    if difference is not None:
        return Assessment("generate", difference)
    difference = _difference(document, expected, METADATA_KEYS)
    if difference is not None:
        return Assessment("refresh", difference)
    return Assessment("complete", "complete and matching")


def refresh_sidecar(request: ImageRequest, output_dir: str | os.PathLike[str]) -> Path:
    """Rewrite the sidecar of an image whose voxels match ``request`` but whose description
    does not (``assess(...).action == "refresh"``); the image is left alone."""
    sidecar = sidecar_path(Path(output_dir) / request.relative_path)
    document = _read_sidecar(sidecar)
    if isinstance(document, str):
        raise ValueError(document)
    for path, value in request.expected().items():
        if path in IMAGE_KEYS:
            continue
        parent = document
        for key in path[:-1]:
            parent = parent.setdefault(key, {})
        if value is _MISSING:
            parent.pop(path[-1], None)
        else:
            parent[path[-1]] = value
    return write_json(document, sidecar)


def publish_image(
    in_file: str | os.PathLike[str],
    in_sidecar: str | os.PathLike[str],
    out_file: str | os.PathLike[str],
    metadata: Mapping[str, Any] | None = None,
) -> tuple[Path, Path]:
    """Copy an image and its sidecar (with ``metadata`` keys added) into place, atomically.

    Order matters for resuming: the old sidecar goes first, then the image is replaced,
    then the new sidecar is written; so a sidecar always describes the image beside it.
    Returns ``(image, sidecar)``.
    """
    target = Path(out_file)
    target_sidecar = sidecar_path(target)
    document = json.loads(Path(in_sidecar).read_text(encoding="utf-8"))
    document.update(metadata or {})
    target_sidecar.unlink(missing_ok=True)
    with open(in_file, "rb") as source:
        atomic_write(target, lambda handle: shutil.copyfileobj(source, handle))
    write_json(document, target_sidecar)
    return target, target_sidecar


# --------------------------------------------------------------------------- the folder


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_locations(
    bids_dir: Path, output_dir: Path, work_dir: Path | None = None
) -> None:
    """Refuse output and work folders that would write into the raw dataset.

    ``output_dir`` may be under ``bids_dir/derivatives/`` (the BIDS convention) but not
    elsewhere inside ``bids_dir``, not ``bids_dir`` itself and not a folder containing it.
    Raises :class:`OutputDirError`.
    """
    bids = Path(bids_dir).resolve()
    suggestion = bids / "derivatives" / "brain-ldm"
    for flag, path in (("output_dir", output_dir), ("-w/--work-dir", work_dir)):
        if path is None:
            continue
        where = Path(path).expanduser().resolve()
        if where == bids:
            raise OutputDirError(
                f"{flag} {where} is bids_dir itself; outputs must not be mixed into the raw "
                f"dataset (suggested: {suggestion})"
            )
        if _is_within(bids, where):
            raise OutputDirError(
                f"{flag} {where} contains bids_dir {bids}; choose a folder outside it "
                f"(suggested: {suggestion})"
            )
        if _is_within(where, bids) and not _is_within(where, bids / "derivatives"):
            raise OutputDirError(
                f"{flag} {where} is inside bids_dir {bids} but not under its derivatives/ "
                f"folder, so files written there would read as raw data (suggested: {suggestion})"
            )
        if where.exists() and not where.is_dir():
            raise OutputDirError(f"{flag} {where} exists and is not a directory")
    if work_dir is not None and Path(work_dir).expanduser().resolve() == Path(output_dir).resolve():
        raise OutputDirError(
            f"-w/--work-dir {work_dir} is output_dir itself; Nipype's folders would mix with the "
            f"derivatives (default: output_dir/{DEFAULT_WORK_DIR_NAME})"
        )


def prepare_output_dir(output_dir: Path) -> Path:
    """Create ``output_dir`` (and parents) if needed; :class:`OutputDirError` if that fails."""
    path = Path(output_dir).expanduser().resolve()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputDirError(
            f"output_dir {path}: cannot create it ({exc.strerror or exc}); choose a folder you "
            "can write to"
        ) from None
    return path


def _check_writable(folder: Path) -> None:
    """Create and remove a hidden file in ``folder``; raise :class:`OutputDirError` if refused."""
    probe = folder / f".brain-ldm-bids-probe-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OutputDirError(
            f"output_dir {folder}: not writable ({exc.strerror or exc}); choose a folder you "
            "can write to"
        ) from None


class OutputLock:
    """An exclusive, non-blocking ``flock`` on ``output_dir/.brain-ldm-bids.lock``.

    A second run on the same folder gets :class:`LockHeldError` at once (never waits). The
    lock file names its holder while held and is emptied, not removed, on release (removing a
    lock file lets two processes lock different files of the same name). ``flock`` is
    advisory and, on some network file systems, local to one machine.
    """

    def __init__(self, output_dir: str | os.PathLike[str]):
        self.folder = Path(output_dir)
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None

    def __enter__(self) -> OutputLock:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise OutputDirError(
                f"output_dir {self.folder}: cannot create the lock file {LOCK_NAME} "
                f"({exc.strerror or exc}); choose a folder you can write to"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise LockHeldError(
                f"output_dir {self.folder} is in use by another brain-ldm-bids run ({holder}); "
                "wait for it to finish or choose another output folder"
            ) from None
        try:
            _check_writable(self.folder)
            started = time.strftime("%Y-%m-%d %H:%M:%S")
            holder = f"pid {os.getpid()} on {socket.gethostname()} since {started}\n"
            os.ftruncate(fd, 0)
            os.pwrite(fd, holder.encode(), 0)
        except BaseException:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            raise
        self._fd = fd
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
                os.close(self._fd)
                self._fd = None


def remove_stale_temporaries(output_dir: str | os.PathLike[str]) -> list[Path]:
    """Remove the hidden ``.*.tmp-*`` files a killed run leaves (call it holding the lock)."""
    folder = Path(output_dir)
    patterns = (".*.tmp-*", "sub-*/anat/.*.tmp-*", f"{GROUP_DIR_NAME}/.*.tmp-*",
                f"{GROUP_DIR_NAME}/*/.*.tmp-*")
    removed = []
    for pattern in patterns:
        for path in sorted(folder.glob(pattern)):
            if path.is_file():
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


# --------------------------------------------------------------------------- dataset files


def _generated_by() -> dict[str, Any]:
    entry: dict[str, Any] = {
        "Name": GENERATED_BY,
        "Version": __version__,
        "CodeURL": CODE_URL,
        "Description": "Synthetic T1w images sampled from the Brain LDM conditioned on each "
        "participant's sex, age and volumes from participants.tsv",
    }
    container = {key: os.environ[var] for key, var in CONTAINER_ENV.items() if os.environ.get(var)}
    if container:
        entry["Container"] = container
    return entry


def dataset_description(source: Mapping[str, Any]) -> dict[str, Any]:
    """``dataset_description.json`` of an output made from a dataset whose own description
    is ``source`` (empty if it has none).

    The name includes the source's ``Name``; ``SourceDatasets`` names the source by its
    ``DatasetDOI`` when it has one. A local path is deliberately not recorded: it would make
    the file depend on where the dataset happens to be mounted.
    """
    source = source if isinstance(source, Mapping) else {}
    name = source.get("Name")
    description: dict[str, Any] = {
        "Name": f"Brain LDM synthetic T1w images ({name})" if name else
        "Brain LDM synthetic T1w images",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [_generated_by()],
        "HowToAcknowledge": f"Cite the Brain LDM: {REFERENCE}.",
    }
    doi = str(source.get("DatasetDOI") or "").strip()
    if doi:
        bare = doi.removeprefix("doi:")
        description["SourceDatasets"] = [{"DOI": doi, "URL": f"https://doi.org/{bare}"}]
    return description


def read_own_description(output_dir: Path) -> dict[str, Any] | None:
    """The existing ``dataset_description.json`` of ``output_dir``, None if there is none.

    Raises :class:`OutputDirError` if the folder holds another dataset (raw, or a derivative
    of other software) or the file is not a JSON object.
    """
    path = Path(output_dir) / "dataset_description.json"
    if not path.exists():
        return None
    document = _read_sidecar(path)
    if isinstance(document, str):
        raise OutputDirError(
            f"{path}: {document.split(' ', 1)[1]}; fix or remove it (brain-ldm-bids writes into "
            "an empty folder or one it made)"
        )
    generators = [
        g.get("Name") for g in document.get("GeneratedBy") or [] if isinstance(g, Mapping)
    ]
    if document.get("DatasetType") != "derivative" or GENERATED_BY not in generators:
        if document.get("DatasetType", "raw") != "derivative":
            what = "a raw BIDS dataset"
        else:
            what = f"a derivative dataset of {', '.join(map(str, generators)) or 'other software'}"
        raise OutputDirError(
            f"output_dir {output_dir} holds {what} ({path.name} Name {document.get('Name')!r}); "
            "brain-ldm-bids writes only into an empty folder or one it made"
        )
    return document


def _merged_description(existing: Mapping[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """``new``, keeping an existing description's name and adding its other sources."""
    if existing is None:
        return new
    merged = dict(existing)
    merged["BIDSVersion"], merged["DatasetType"] = new["BIDSVersion"], new["DatasetType"]
    others = [g for g in existing.get("GeneratedBy") or [] if g.get("Name") != GENERATED_BY]
    merged["GeneratedBy"] = new["GeneratedBy"] + others
    sources = list(existing.get("SourceDatasets") or [])
    sources += [s for s in new.get("SourceDatasets", []) if s not in sources]
    if sources:
        merged["SourceDatasets"] = sources
    merged.setdefault("HowToAcknowledge", new["HowToAcknowledge"])
    return merged


README = """\
# Synthetic T1-weighted images from the Brain LDM

Written by `brain-ldm-bids` ({code_url}): for each participant of the source dataset (named
in `dataset_description.json`), synthetic T1w images sampled from the Brain LDM
({reference}), conditioned on the participant's sex, age and volumes read from its
`participants.tsv`. **None of these images was acquired from a person.**

Each `sub-<label>/anat/*_desc-synthetic_T1w.nii.gz` has a JSON sidecar with everything needed to
reproduce it: the raw demographics, the normalised conditioning and how it was derived, the seed
and its derivation, the sampler settings, the model's weights (sha256) and the software versions.
`group/` (from `brain-ldm-bids ... group`) holds a table of all images and an HTML report.
"""


def write_dataset_files(
    output_dir: Path, description: dict[str, Any], existing: Mapping[str, Any] | None
) -> None:
    """Write ``dataset_description.json`` (merged with ``existing``), ``README.md`` if missing,
    and a ``.bidsignore`` that lists ``/group``; unchanged files are not rewritten."""
    folder = Path(output_dir)
    merged = _merged_description(existing, description)
    if existing != merged:
        write_json(merged, folder / "dataset_description.json")
    readme = folder / "README.md"
    if not readme.exists():
        text = README.format(code_url=CODE_URL, reference=REFERENCE)
        atomic_write(readme, lambda handle: handle.write(text.encode("utf-8")))
    ignore = folder / ".bidsignore"
    lines = ignore.read_text(encoding="utf-8").splitlines() if ignore.exists() else []
    wanted = f"/{GROUP_DIR_NAME}"  # anchored at the root; bids-validator-deno matches it
    if wanted not in (line.strip() for line in lines):
        text = "\n".join([*lines, wanted]) + "\n"
        atomic_write(ignore, lambda handle: handle.write(text.encode("utf-8")))
