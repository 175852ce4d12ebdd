"""The BIDS App's output folder: names, seeds, what is already done, locking, dataset files.

No JAX and no Nipype here (nibabel only reads headers), so all of it is testable alone.

Layout of ``output_dir`` (a BIDS derivative dataset)::

    dataset_description.json        DatasetType "derivative", GeneratedBy, SourceDatasets
    README.md                       what the dataset is (written once, never overwritten)
    .bidsignore                     lists /group (the group report is not BIDS) and *_xfm.txt
    sub-<label>/anat/sub-<label>_desc-synthetic_T1w.nii.gz + .json           (--n-samples 1)
    sub-<label>/anat/sub-<label>_run-<n>_desc-synthetic_T1w.nii.gz + .json    (n = 1..N)
    sub-<label>/anat/sub-<label>_desc-syntheticSweep<Field><Value>_T1w.nii.gz    (--sweep)
    sub-<label>/[ses-<s>/]anat/<source entities>_desc-counterfactual_T1w.nii.gz  (--counterfactual)
    sub-<label>/[ses-<s>/]anat/<source entities>_desc-counterfactualSweep<Field><Value>_T1w...
    group/                          the group level (:mod:`brain_ldm_nodes.report`)
    .brain-ldm-bids.lock            flock-ed while a run uses the folder (shared by participant
                                    runs, exclusive for the group level)
    .brain-ldm-bids-locks/          one flock per participant being processed
    .brain-ldm-bids-work/<run>/     the default Nipype work folder of a run (removed after a
                                    clean run)

Seeds: image ``n`` (0-based) of participant ``X`` uses :func:`derive_seed` ``(seed, X, n)``,
so it does not depend on which other participants a run includes. A synthetic sweep uses the
seed of image 0 for every value, so the value equal to the participant's own gives image 0.

Counterfactuals (:class:`CounterfactualRequest`) are made from each real T1w of a participant
(``<source entities>`` = the source's file name without ``_T1w``), by DDIM inversion under the
participant's own conditioning: no seed. Their sidecars name the source as a BIDS URI
(``bids:raw:<path in bids_dir>``, resolved by ``DatasetLinks.raw`` in
``dataset_description.json``) and record its sha256, so a changed source is redone.

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
import re
import shutil
import socket
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ._version import __version__
from .imaging import atomic_write, write_json
from .hashing import sha256_of as file_sha256
from .scheduler_names import SCHEDULER_METHODS, SCHEDULER_TITLES, check_scheduler
from .weights.identity import ModelIdentity

if TYPE_CHECKING:  # pragma: no cover - typing only; keeps pybids out of this module's imports
    from .bids import Participant, ParticipantsTable
    from .demographics import Conditioning
    from .edits import EditValue, Sweep

__all__ = [
    "BIDS_VERSION",
    "COUNTERFACTUAL_DESC",
    "DEFAULT_WORK_DIR_NAME",
    "GENERATED_BY",
    "LOCK_NAME",
    "LOCKS_DIR_NAME",
    "Assessment",
    "CounterfactualRequest",
    "ImageRequest",
    "SweepPoint",
    "LockHeldError",
    "ModelIdentity",
    "OutputDirError",
    "OutputLock",
    "ParticipantLocks",
    "check_submissions",
    "clear_submission",
    "queued_jobs",
    "record_submission",
    "assess",
    "bare_doi",
    "check_creatable",
    "check_locations",
    "check_raw_link",
    "counterfactual_sidecars",
    "dataset_description",
    "derive_seed",
    "image_relative_path",
    "plan_counterfactuals",
    "plan_images",
    "plan_sweeps",
    "prepare_output_dir",
    "publish_image",
    "raw_dataset_link",
    "read_own_description",
    "refresh_sidecar",
    "default_work_dir",
    "remove_image",
    "remove_stale_temporaries",
    "stale_synthetic_images",
    "stale_transforms",
    "remove_stale_top_level_temporaries",
    "sidecar_path",
    "write_dataset_files",
]

GENERATED_BY = "brain-ldm-bids"
CODE_URL = "https://github.com/brain-ldm-nodes/brain-ldm-nodes"
BIDS_VERSION = "1.10.0"
DESC = "synthetic"
COUNTERFACTUAL_DESC = "counterfactual"
SWEEP_INFIX = "Sweep"  # desc-syntheticSweepAge50, desc-counterfactualSweepAgePlus10
LOCK_NAME = ".brain-ldm-bids.lock"
LOCKS_DIR_NAME = ".brain-ldm-bids-locks"
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




# --------------------------------------------------------------------------- requests


_MISSING = object()

#: Sidecar keys that determine the voxels: a difference means sampling again.
IMAGE_KEYS: tuple[tuple[str, ...], ...] = (
    ("Conditioning", "Values"),
    ("Seed",),
    ("Sampler", "NumInferenceSteps"),
    ("Sampler", "Scheduler"),
    ("Sampler", "Method"),  # --scheduler: what ran (DDIM sidecars have always carried it)
    ("Model", "Source", "model", "weights_sha256"),
    ("Model", "Source", "vae", "weights_sha256"),
    ("Grid", "Shape"),
)
#: Sidecar keys that only describe the image: a difference means rewriting the sidecar.
METADATA_KEYS: tuple[tuple[str, ...], ...] = (
    ("Sampler", "Name"),  # the --scheduler name (absent from sidecars before it existed)
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
    #: A point of a conditioning sweep (``index`` 0: the seed of the participant's image 0).
    sweep: SweepPoint | None = None
    #: The sampler (``brain_ldm_nodes.scheduler_names.SCHEDULERS``): ``--scheduler``.
    scheduler: str = "ddim"

    image_keys = property(lambda self: IMAGE_KEYS)
    metadata_keys = property(
        lambda self: METADATA_KEYS + ((("Sweep",),) if self.sweep is not None else ())
    )

    def __post_init__(self) -> None:
        if self.participant.conditioning is None:
            raise ValueError(f"sub-{self.participant.label} has no usable conditioning")
        if not 0 <= self.index < self.n_samples:
            raise ValueError(f"sample index {self.index} is outside 0..{self.n_samples - 1}")
        if self.sweep is not None and self.index != 0:
            raise ValueError("a sweep uses the seed of image 0 (index 0)")
        check_scheduler(self.scheduler)

    @property
    def label(self) -> str:
        return self.participant.label

    @property
    def conditioning(self) -> Conditioning:
        """The conditioning sampled: the participant's own, or the sweep point's."""
        return self.sweep.conditioning if self.sweep is not None else self.participant.conditioning

    @property
    def conditioning_key(self) -> str:
        """Name of the conditioning JSON the sampler reads (one per distinct conditioning)."""
        return self.stem if self.sweep is not None else self.participant.participant_id

    def conditionings(self) -> dict[str, Conditioning]:
        """``{conditioning_key: conditioning}`` the workflow needs written."""
        return {self.conditioning_key: self.conditioning}

    @property
    def seed(self) -> int:
        return derive_seed(self.base_seed, self.label, self.index)

    @property
    def relative_path(self) -> Path:
        if self.sweep is not None:
            desc = DESC + self.sweep.desc_suffix
            return Path(f"sub-{self.label}", "anat", f"sub-{self.label}_desc-{desc}_T1w.nii.gz")
        return image_relative_path(self.label, self.index, self.n_samples)

    @property
    def stem(self) -> str:
        return self.relative_path.name[: -len(".nii.gz")]

    @property
    def title(self) -> str:
        """``sub-01 image 2/3`` or ``sub-01 sweep age=50 (1/7)``: how progress lines name it."""
        if self.sweep is not None:
            return f"sub-{self.label} sweep {self.sweep.title}"
        return f"sub-{self.label} image {self.index + 1}/{self.n_samples}"

    @property
    def start_message(self) -> str:
        steps, sampler = self.num_inference_steps, SCHEDULER_TITLES[self.scheduler]
        return f"{self.title} (seed {self.seed}): sampling, {steps} {sampler} steps"

    def extra_metadata(self) -> dict[str, Any]:
        """Sidecar keys added to :func:`~brain_ldm_nodes.provenance.synthesis_sidecar`'s.

        The raw cells and where they came from, the seed's derivation, and the BIDS keys
        required of derivative anatomical images.
        """
        sweep = {"Sweep": self.sweep.metadata()} if self.sweep is not None else {}
        return _json_normal({
            **sweep,
            "Demographics": _demographics(self),
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
        conditioning = self.conditioning
        values = [float(v) for v in conditioning.values]
        extras = self.extra_metadata()
        sweep = {("Sweep",): extras["Sweep"]} if self.sweep is not None else {}
        return {
            **sweep,
            ("Conditioning", "Values"): values,
            ("Seed",): self.seed,
            ("Sampler", "NumInferenceSteps"): self.num_inference_steps,
            ("Sampler", "Scheduler"): _json_normal(self.model.scheduler),
            ("Sampler", "Method"): SCHEDULER_METHODS[self.scheduler],
            ("Sampler", "Name"): self.scheduler,
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
    scheduler: str = "ddim",
) -> list[ImageRequest]:
    """Every image of every usable participant of ``table``, in label then sample order,
    sampled by ``scheduler``."""
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
            scheduler=scheduler,
        )
        for participant in table.usable
        for index in range(n_samples)
    ]


def _demographics(request: Any) -> dict[str, Any]:
    """The ``Demographics`` sidecar entry: the participants.tsv cells and how they were read."""
    return {
        "Source": request.tsv_name,
        "ParticipantId": request.participant.participant_id,
        "Columns": dict(request.columns),
        "Values": dict(request.participant.raw),
        "Policy": dict(request.policy),
    }


@dataclass(frozen=True)
class SweepPoint:
    """Value ``index`` of ``sweep``, resolved for one participant into ``conditioning``."""

    sweep: Sweep
    index: int
    conditioning: Conditioning

    @property
    def value(self) -> EditValue:
        return self.sweep.values[self.index]

    @property
    def desc_suffix(self) -> str:
        """``SweepAge50``: appended to the base ``desc`` label (letters and digits only)."""
        return f"{SWEEP_INFIX}{self.sweep.field_token}{self.value.token}"

    @property
    def title(self) -> str:
        return f"{self.value.spec} ({self.index + 1}/{len(self.sweep.values)})"

    def metadata(self) -> dict[str, Any]:
        """The ``Sweep`` sidecar entry."""
        return {**self.sweep.describe(), "Value": self.value.text, "Index": self.index}


def _resolve_points(
    participant: Participant, sweeps: Sequence[Sweep], policy: Any, notes: list[str], what: str
) -> list[SweepPoint]:
    """Every sweep value applied to ``participant``'s conditioning; values that cannot be
    (out of range under the policy) are left out with a note."""
    from .edits import EditError, apply_edits

    points = []
    for sweep in sweeps:
        for index, value in enumerate(sweep.values):
            try:
                conditioning = apply_edits(participant.conditioning, [value], policy, how="sweep")
            except EditError as exc:
                notes.append(f"{what} of sub-{participant.label}: --sweep {sweep.text}: value "
                             f"{value.text} left out: {exc}")
                continue
            points.append(SweepPoint(sweep, index, conditioning))
    return points


def plan_sweeps(
    table: ParticipantsTable,
    sweeps: Sequence[Sweep],
    *,
    base_seed: int,
    num_inference_steps: int,
    model: ModelIdentity,
    scheduler: str = "ddim",
) -> tuple[list[ImageRequest], list[str]]:
    """Synthetic sweep images of every usable participant (all from the seed of its image 0),
    sampled by ``scheduler``, and one-line notes on values left out."""
    policy = table.policy.to_dict()
    requests, notes = [], []
    for participant in table.usable:
        for point in _resolve_points(participant, sweeps, table.policy, notes, "sweep"):
            requests.append(ImageRequest(
                participant=participant, index=0, n_samples=1, base_seed=base_seed,
                num_inference_steps=num_inference_steps, model=model,
                columns=dict(table.columns), policy=policy, tsv_name=table.tsv_path.name,
                sweep=point, scheduler=scheduler,
            ))
    return requests, notes


#: Counterfactual sidecar keys that determine the voxels.
COUNTERFACTUAL_IMAGE_KEYS: tuple[tuple[str, ...], ...] = (
    ("SourceSHA256",),
    ("ConditioningFrom", "Values"),
    ("ConditioningTo", "Values"),
    ("Sampler", "NumInferenceSteps"),
    ("Sampler", "Scheduler"),
    ("Model", "Source", "model", "weights_sha256"),
    ("Model", "Source", "vae", "weights_sha256"),
    ("Grid", "Shape"),
    ("Preparation", "t1w_space"),
)




@dataclass(frozen=True)
class CounterfactualRequest:
    """One counterfactual of a participant's real T1w to have in ``output_dir``.

    ``source_relative`` is the T1w's path inside ``bids_dir`` (POSIX); ``edits`` the
    ``--counterfactual`` edits (empty for a sweep point); ``target`` the resolved conditioning;
    ``t1w_space`` where the source is (``CounterfactualSeriesT1w.t1w_space``: ``"native"``
    registers it to MNI152).

    ``source_dataset`` is the ``DatasetLinks`` key of the dataset holding the source
    (``"raw"``: bids_dir; ``"fmriprep"``: a ``--t1w-derivatives`` folder) and
    ``source_space`` its ``space-`` label, if any. ``output_space`` ``"model"`` is the model
    grid (no ``space-`` entity: its affine is the model's, not MNI coordinates; the source's
    ``space-``, ``res-`` and ``desc-`` entities are dropped); ``"source"`` the counterfactual
    resampled back onto the source's grid (``source_shape``) with the inverse transform,
    named ``space-<source space>`` (``space-T1w`` for a raw T1w: the image-based coordinate
    system of the T1w).
    """

    participant: Participant
    source: Path
    source_relative: str
    source_sha256: str
    target: Conditioning
    num_inference_steps: int
    model: ModelIdentity
    columns: Mapping[str, str | None]
    policy: Mapping[str, Any]
    tsv_name: str = "participants.tsv"
    edits: tuple[EditValue, ...] = ()
    sweep: SweepPoint | None = None
    t1w_space: str = "native"
    source_dataset: str = "raw"
    source_space: str | None = None
    output_space: Literal["model", "source"] = "model"
    source_shape: tuple[int, int, int] | None = None

    @property
    def image_keys(self) -> tuple[tuple[str, ...], ...]:
        return (*COUNTERFACTUAL_IMAGE_KEYS, ("OutputSpace",))

    def __post_init__(self) -> None:
        if self.participant.conditioning is None:
            raise ValueError(f"sub-{self.participant.label} has no usable conditioning")
        if (self.sweep is None) == (not self.edits):
            raise ValueError("a counterfactual has either edits or a sweep point")
        if not Path(self.source_relative).name.endswith(("_T1w.nii.gz", "_T1w.nii")):
            raise ValueError(f"{self.source_relative}: not a T1w image name")
        if self.output_space == "source" and self.source_shape is None:
            raise ValueError("a counterfactual on the source's grid needs the source's shape")

    @property
    def label(self) -> str:
        return self.participant.label

    @property
    def source_uri(self) -> str:
        """``bids:raw:<path>``: the source as a BIDS URI (``DatasetLinks.raw``; or
        ``bids:fmriprep:<path>`` for a ``--t1w-derivatives`` source)."""
        return f"bids:{self.source_dataset}:{self.source_relative}"

    @property
    def source_group(self) -> str:
        """The source's entities (``sub-02_ses-1_run-1``): one inversion per source."""
        name = Path(self.source_relative).name
        return name[: name.rindex("_T1w")]

    def entities(self, output_space: str) -> str:
        """The output's entities before ``desc-``: the source's, without ``desc-`` (fMRIPrep's
        ``desc-preproc``: one ``desc-`` per name), and on the model grid without ``space-``
        and ``res-`` either; on the source's grid with ``space-T1w`` if it has no space."""
        kept = [part for part in self.source_group.split("_") if not part.startswith("desc-")]
        if output_space == "model":
            return "_".join(p for p in kept if not p.startswith(("space-", "res-")))
        if not any(part.startswith("space-") for part in kept):
            kept.append("space-T1w")
        return "_".join(kept)

    def _path(self, output_space: str) -> Path:
        desc = COUNTERFACTUAL_DESC + (self.sweep.desc_suffix if self.sweep is not None else "")
        folder = Path(self.source_relative).parent
        return folder / f"{self.entities(output_space)}_desc-{desc}_T1w.nii.gz"

    @property
    def relative_path(self) -> Path:
        return self._path(self.output_space)

    @property
    def grid_stem(self) -> str:
        """The stem of this counterfactual on the model grid (the series node's output; a
        source-grid request is that image resampled)."""
        return self._path("model").name[: -len(".nii.gz")]

    @property
    def output_shape(self) -> tuple[int, ...]:
        """The shape the published image has: the model's grid or the source's."""
        return tuple(self.source_shape if self.output_space == "source"
                     else self.model.image_shape)

    @property
    def stem(self) -> str:
        return self.relative_path.name[: -len(".nii.gz")]

    @property
    def title(self) -> str:
        what = (f"sweep {self.sweep.title}" if self.sweep is not None
                else " ".join(edit.spec for edit in self.edits))
        where = " (on the source's grid)" if self.output_space == "source" else ""
        return f"{self.source_group} counterfactual {what}{where}"

    @property
    def start_message(self) -> str:
        return (f"{self.source_group}: DDIM inversion + counterfactuals, "
                f"{self.num_inference_steps} steps each")

    @property
    def seed(self) -> None:
        return None

    @property
    def metadata_keys(self) -> tuple[tuple[str, ...], ...]:
        what = ("Sweep",) if self.sweep is not None else ("Edit",)
        return (("Sources",), ("ConditioningFrom", "Derivation"), ("ConditioningTo", "Derivation"),
                ("Demographics",), what, ("SkullStripped",), ("Preparation", "source_dataset"),
                ("Preparation", "source_space"))

    def conditionings(self) -> dict[str, Conditioning]:
        """``{key: conditioning}`` the workflow needs written: own (inversion) and target
        (keyed by :attr:`grid_stem`: one per model-grid image, whatever its output spaces)."""
        return {self.participant.participant_id: self.participant.conditioning,
                self.grid_stem: self.target}

    def extra_metadata(self) -> dict[str, Any]:
        """Sidecar keys added to :func:`~brain_ldm_nodes.provenance.counterfactual_sidecar`'s:
        the source as a BIDS URI and its sha256, the edit or sweep point, the demographics."""
        what = ({"Sweep": self.sweep.metadata()} if self.sweep is not None
                else {"Edit": [edit.spec for edit in self.edits]})
        extra: dict[str, Any] = {}
        if self.source_dataset != "raw":  # merged into the node's Preparation record
            extra["Preparation"] = {"source_dataset": self.source_dataset,
                                    "source_space": self.source_space}
        if self.output_space == "source":
            extra["OutputSpace"] = "source"
            extra["SpatialReference"] = self.source_uri
        return _json_normal({
            "Sources": [self.source_uri],
            "SourceSHA256": self.source_sha256,
            **what,
            "Demographics": _demographics(self),
            # The model regenerates whole-head images like its training data.
            "SkullStripped": False,
            **extra,
        })

    def expected(self) -> dict[tuple[str, ...], Any]:
        """Sidecar key path -> the value the request implies (image and metadata keys)."""
        own = self.participant.conditioning
        extras = self.extra_metadata()

        def record(conditioning: Conditioning) -> Any:
            return _json_normal(dict(conditioning.record)) if conditioning.record else _MISSING

        expected = {
            ("SourceSHA256",): self.source_sha256,
            ("ConditioningFrom", "Values"): [float(v) for v in own.values],
            ("ConditioningTo", "Values"): [float(v) for v in self.target.values],
            ("Sampler", "NumInferenceSteps"): self.num_inference_steps,
            ("Sampler", "Scheduler"): _json_normal(self.model.scheduler),
            ("Model", "Source", "model", "weights_sha256"): self.model.unet_sha256,
            ("Model", "Source", "vae", "weights_sha256"): self.model.vae_sha256,
            ("Grid", "Shape"): list(self.model.image_shape),
            ("Preparation", "t1w_space"): self.t1w_space,
            ("Sources",): extras["Sources"],
            ("ConditioningFrom", "Derivation"): record(own),
            ("ConditioningTo", "Derivation"): record(self.target),
            ("Demographics",): extras["Demographics"],
            ("SkullStripped",): extras["SkullStripped"],
            ("OutputSpace",): extras.get("OutputSpace", _MISSING),
            ("Preparation", "source_dataset"): _lookup(extras, ("Preparation", "source_dataset")),
            ("Preparation", "source_space"): _lookup(extras, ("Preparation", "source_space")),
        }
        key = "Sweep" if self.sweep is not None else "Edit"
        expected[(key,)] = extras[key]
        return expected


def plan_counterfactuals(
    table: ParticipantsTable,
    sources: Mapping[str, Sequence[Path]],
    *,
    bids_dir: Path,
    edits: Sequence[EditValue],
    sweeps: Sequence[Sweep],
    num_inference_steps: int,
    model: ModelIdentity,
    t1w_space: str = "native",
    output_spaces: Sequence[str] = ("model",),
    source_dataset: str = "raw",
    source_spaces: Mapping[Path, tuple[str, str | None]] | None = None,
) -> tuple[list[CounterfactualRequest], list[str]]:
    """Counterfactuals of every real T1w of every usable participant: one per source with
    ``edits`` (if any), and one per value of each sweep, each in every ``output_spaces``
    (``"model"``, ``"source"``); with one-line notes on what is left out (participants
    without a T1w, edits out of range under the policy).

    ``sources`` maps a participant label to its T1w images (absolute paths under
    ``bids_dir``), e.g. from :func:`brain_ldm_nodes.bids.find_t1w_images`, or under a
    derivatives folder (``source_dataset`` its ``DatasetLinks`` key, ``bids_dir`` its root,
    ``source_spaces`` image -> ``(t1w_space, space label)``, e.g. from
    :func:`brain_ldm_nodes.bids.find_preprocessed_t1w`).
    """
    import nibabel as nib

    from .annex import bids_path, not_retrieved, retrieve_hint
    from .edits import EditError, apply_edits

    policy = table.policy.to_dict()
    root = Path(bids_dir).resolve()
    requests: list[CounterfactualRequest] = []
    notes: list[str] = []
    for participant in table.usable:
        images = sources.get(participant.label) or ()
        if not images:
            pattern = "*_T1w" if source_dataset == "raw" else "*_desc-preproc_T1w, usable"
            notes.append(f"sub-{participant.label}: no T1w image (anat/{pattern}.nii[.gz]) "
                         f"in {root}; no counterfactual for it")
            continue
        targets: list[tuple[Conditioning, tuple[EditValue, ...], SweepPoint | None]] = []
        if edits:
            try:
                targets.append((apply_edits(participant.conditioning, edits, table.policy),
                                tuple(edits), None))
            except EditError as exc:
                notes.append(f"counterfactual of sub-{participant.label}: --counterfactual "
                             f"{' '.join(e.spec for e in edits)} left out: {exc}")
        for point in _resolve_points(participant, sweeps, table.policy, notes, "counterfactual"):
            targets.append((point.conditioning, (), point))
        for image in images:
            path = bids_path(image)  # an annexed file is a link: keep its BIDS name
            relative = path.relative_to(root).as_posix()
            if not_retrieved(path):
                notes.append(f"sub-{participant.label}: no counterfactual of "
                             f"{retrieve_hint(path)}")
                continue
            try:
                digest = file_sha256(path)
            except OSError as exc:
                notes.append(f"{relative}: cannot read it ({exc.strerror or exc}); no "
                             "counterfactual of it (existing ones are left as they are)")
                continue
            space, label = (source_spaces or {}).get(image, (t1w_space, None))
            shape = None
            if "source" in output_spaces:
                try:
                    shape = tuple(int(n) for n in nib.load(path).shape[:3])
                except Exception as exc:  # nibabel raises several types for damaged files
                    notes.append(f"{relative}: not a readable NIfTI image ({type(exc).__name__})"
                                 "; no counterfactual of it")
                    continue
            for target, edit, point in targets:
                for output_space in output_spaces:
                    requests.append(CounterfactualRequest(
                        participant=participant, source=path, source_relative=relative,
                        source_sha256=digest, target=target,
                        num_inference_steps=num_inference_steps, model=model,
                        columns=dict(table.columns), policy=policy,
                        tsv_name=table.tsv_path.name, edits=edit, sweep=point, t1w_space=space,
                        source_dataset=source_dataset, source_space=label,
                        output_space=output_space, source_shape=shape,
                    ))
    return requests, notes


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


def assess(
    request: ImageRequest | CounterfactualRequest, output_dir: str | os.PathLike[str]
) -> Assessment:
    """Compare the image of ``request`` in ``output_dir`` (if any) with the request: its
    ``image_keys`` decide whether to make it again, its ``metadata_keys`` whether to rewrite
    only the sidecar."""
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
    problem = _image_problem(image, getattr(request, "output_shape", request.model.image_shape))
    if problem is not None:
        return Assessment("generate", problem)
    expected = request.expected()
    difference = _difference(document, expected, request.image_keys)
    if difference is not None:
        return Assessment("generate", difference)
    difference = _difference(document, expected, request.metadata_keys)
    if difference is not None:
        return Assessment("refresh", difference)
    return Assessment("complete", "complete and matching")


def refresh_sidecar(
    request: ImageRequest | CounterfactualRequest, output_dir: str | os.PathLike[str]
) -> Path:
    """Rewrite the sidecar of an image whose voxels match ``request`` but whose description
    does not (``assess(...).action == "refresh"``); the image is left alone."""
    sidecar = sidecar_path(Path(output_dir) / request.relative_path)
    document = _read_sidecar(sidecar)
    if isinstance(document, str):
        raise ValueError(document)
    for path, value in request.expected().items():
        if path in request.image_keys:
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
    metadata = dict(metadata or {})
    if isinstance(metadata.get("Preparation"), Mapping):  # added to the node's record
        metadata["Preparation"] = {**document.get("Preparation", {}), **metadata["Preparation"]}
    document.update(metadata)
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


def check_creatable(output_dir: Path) -> None:
    """Refuse an ``output_dir`` that cannot be created or written, without creating it:
    its nearest existing ancestor must be a folder this process may write into.
    Raises :class:`OutputDirError` (the words :func:`prepare_output_dir` would use)."""
    path = Path(output_dir).expanduser().resolve()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    problem = None
    if not existing.is_dir():
        problem = os.strerror(20)  # ENOTDIR: "Not a directory"
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = os.strerror(13)  # EACCES: "Permission denied"
    if problem is not None:
        what = "not writable" if existing == path else "cannot create it"
        raise OutputDirError(
            f"output_dir {path}: {what} ({problem}); choose a folder you can write to"
        )


def stale_synthetic_images(
    output_dir: str | os.PathLike[str], label: str, n_samples: int
) -> list[Path]:
    """Synthetic images of ``sub-<label>`` that a request for ``n_samples`` images does not
    produce: ``sub-<label>_desc-synthetic_T1w`` when ``n_samples > 1``, ``_run-<k>_`` ones
    when ``n_samples == 1`` or ``k > n_samples`` (sweeps and counterfactuals are not touched).
    """
    folder = Path(output_dir) / f"sub-{label}" / "anat"
    wanted = {image_relative_path(label, i, n_samples).name for i in range(n_samples)}
    pattern = re.compile(rf"^sub-{re.escape(label)}(?:_run-[1-9][0-9]*)?_desc-{DESC}_T1w\.nii\.gz$")
    found = [path for path in folder.glob(f"sub-{label}*_desc-{DESC}_T1w.*")]
    images = {p if p.name.endswith(".nii.gz") else p.with_name(p.name[:-5] + ".nii.gz")
              for p in found if p.name.endswith((".nii.gz", ".json"))}
    return sorted(p for p in images if pattern.match(p.name) and p.name not in wanted)


def stale_transforms(output_dir: str | os.PathLike[str], label: str) -> list[Path]:
    """Registration transforms of ``sub-<label>`` (``*_from-T1w_to-*_xfm.txt``) that no image
    sidecar of the participant names in ``RegistrationTransform`` any more, e.g. after a run
    with ``--t1w-space conform`` (no registration) or from a ``--t1w-derivatives`` source in
    MNI space over an earlier registered one."""
    folder = Path(output_dir)
    subject = folder / f"sub-{label}"
    transforms = sorted([*subject.glob("anat/*_from-T1w_to-*_xfm.txt"),
                         *subject.glob("ses-*/anat/*_from-T1w_to-*_xfm.txt")])
    if not transforms:
        return []
    named = set()
    for sidecar in [*subject.glob("anat/*_T1w.json"), *subject.glob("ses-*/anat/*_T1w.json")]:
        document = _read_sidecar(sidecar)
        if isinstance(document, dict) and isinstance(document.get("RegistrationTransform"), str):
            named.add(document["RegistrationTransform"])
    return [path for path in transforms
            if f"bids::{path.relative_to(folder).as_posix()}" not in named]


def remove_image(image: Path) -> None:
    """Remove an output image and its sidecar: the sidecar first, so that an interrupted
    removal leaves at most an image without a sidecar (left out of the group report, and
    removed or redone by the next run), never a sidecar describing a missing image."""
    sidecar_path(image).unlink(missing_ok=True)
    image.unlink(missing_ok=True)


def counterfactual_sidecars(output_dir: str | os.PathLike[str]) -> list[Path]:
    """The sidecars of every counterfactual image in ``output_dir``."""
    folder = Path(output_dir)
    return sorted([*folder.glob(f"sub-*/anat/*_desc-{COUNTERFACTUAL_DESC}*_T1w.json"),
                   *folder.glob(f"sub-*/ses-*/anat/*_desc-{COUNTERFACTUAL_DESC}*_T1w.json")])


def check_raw_link(
    existing: Mapping[str, Any] | None, raw_link: str, output_dir: Path, *, key: str = "raw"
) -> None:
    """Refuse to re-point ``DatasetLinks.raw`` while counterfactuals made from the dataset it
    names are in ``output_dir``: their ``bids:raw:`` sources would then name files of another
    dataset. Raises :class:`OutputDirError` naming both links and what to do."""
    old = ((existing or {}).get("DatasetLinks") or {}).get(key)
    if not old or old == raw_link:
        return
    made = counterfactual_sidecars(output_dir)
    if made:
        raise OutputDirError(
            f"output_dir {output_dir}: its {len(made)} counterfactuals name sources in {old} "
            f"(DatasetLinks.{key}), this run reads {raw_link}; use another output_dir, or remove "
            "them first"
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


def _holder_line() -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    return f"pid {os.getpid()} on {socket.gethostname()} since {started}\n"


def _open_lock_file(path: Path, folder: Path) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise OutputDirError(
            f"output_dir {folder}: cannot create the lock file {path.relative_to(folder)} "
            f"({exc.strerror or exc}); choose a folder you can write to"
        ) from None


def _read_holder(fd: int) -> str:
    return os.pread(fd, 200, 0).decode("utf-8", "replace").strip()


def _release(fd: int, *, clear: bool) -> None:
    try:
        if clear:
            os.ftruncate(fd, 0)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _busy(folder: Path, holder: str, what: str = "") -> LockHeldError:
    return LockHeldError(
        f"output_dir {folder} is in use by another brain-ldm-bids run ({holder or 'another process'})"
        f"{what}; wait for it to finish or choose another output folder"
    )


def _participant_lock_holders(folder: Path) -> str:
    """Who holds participant locks (from their lock files), for an error message."""
    holders = []
    for path in sorted((folder / LOCKS_DIR_NAME).glob("sub-*.lock")):
        try:
            line = path.read_text(encoding="utf-8").strip()
        except OSError:
            continue
        if line and line not in holders:
            holders.append(f"{line}, {path.stem}")
    return "; ".join(holders[:3]) + (" …" if len(holders) > 3 else "")


# ------------------------------------------------------------ jobs that outlive the command
#: ``output_dir/.brain-ldm-bids-locks/sub-<label>.jobs``: a graph-plugin submission (SLURMGraph)
#: whose jobs make that participant's images after the command has returned.
SUBMISSION_SUFFIX = ".jobs"


def _submission_records(folder: Path, labels: Iterable[str] | None) -> list[Path]:
    locks = folder / LOCKS_DIR_NAME
    if labels is None:
        return sorted(locks.glob(f"sub-*{SUBMISSION_SUFFIX}"))
    return [path for label in sorted(set(labels))
            if (path := locks / f"sub-{label}{SUBMISSION_SUFFIX}").exists()]


def record_submission(output_dir: str | os.PathLike[str], labels: Iterable[str], *,
                      comment: str, plugin: str, work_dir: Path) -> None:
    """Note that ``labels`` are being made by ``plugin`` jobs carrying SLURM comment
    ``comment`` (call it holding their :class:`ParticipantLocks`, before submitting). Until
    ``squeue`` lists none of those jobs, later runs on these participants (and the group
    level) are refused (:func:`check_submissions`)."""
    labels = sorted(set(labels))
    record = {"plugin": plugin, "comment": comment, "work_dir": str(work_dir),
              "participants": labels, "submitted_by": _holder_line().strip()}
    for label in labels:
        write_json(record, Path(output_dir) / LOCKS_DIR_NAME / f"sub-{label}{SUBMISSION_SUFFIX}")


def clear_submission(output_dir: str | os.PathLike[str], labels: Iterable[str]) -> None:
    """Forget the submission records of ``labels`` (the submission failed)."""
    for path in _submission_records(Path(output_dir), labels):
        path.unlink(missing_ok=True)


def queued_jobs(comment: str) -> list[str] | str:
    """``["<job id> <name> <state>", ...]`` of the SLURM jobs whose comment is ``comment``
    that are queued or running (``squeue`` lists nothing else; COMPLETING ones are left out),
    or a ``str`` saying why ``squeue`` could not be asked."""
    import shutil as _shutil
    import subprocess

    if _shutil.which("squeue") is None:
        return "squeue is not installed here"
    try:
        done = subprocess.run(["squeue", "--noheader", "--format=%i|%j|%T|%k"],
                              capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"squeue failed: {exc}"
    if done.returncode != 0:
        first = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[0]
        return f"squeue failed: {first}"
    jobs = []
    for line in done.stdout.splitlines():
        fields = line.strip().split("|", 3)
        # COMPLETING: the job's programs have ended, only SLURM's epilog is left
        if len(fields) == 4 and fields[3].strip() == comment and fields[2] != "COMPLETING":
            jobs.append(f"{fields[0]} {fields[1]} {fields[2]}")
    return jobs


def check_submissions(output_dir: str | os.PathLike[str],
                      labels: Iterable[str] | None = None) -> None:
    """Refuse (:class:`LockHeldError`, one line naming the jobs) while jobs of a recorded
    submission that makes ``labels`` (``None``: any participant) are queued or running; the
    records of submissions whose jobs have all left the queue are removed."""
    folder = Path(output_dir)
    by_comment: dict[str, list[Path]] = {}
    records: dict[str, dict[str, Any]] = {}
    for path in _submission_records(folder, labels):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            comment = str(record["comment"])
        except (OSError, ValueError, KeyError, TypeError):
            path.unlink(missing_ok=True)  # half-written by a killed run: nothing was submitted
            continue
        by_comment.setdefault(comment, []).append(path)
        records[comment] = record
    for comment, paths in by_comment.items():
        record = records[comment]
        who = ", ".join(path.name.removesuffix(SUBMISSION_SUFFIX) for path in paths[:3]) + (
            ", …" if len(paths) > 3 else "")
        jobs = queued_jobs(comment)
        if isinstance(jobs, str):
            raise LockHeldError(
                f"output_dir {folder}: {who} were submitted as {record.get('plugin')} jobs "
                f"(--comment={comment}) and {jobs}, so it is unknown whether they still run; "
                f"run where squeue answers, or delete {paths[0].parent}/sub-*{SUBMISSION_SUFFIX} "
                "once those jobs have left the queue"
            )
        if jobs:
            shown = "; ".join(jobs[:3]) + (f"; … ({len(jobs)} jobs)" if len(jobs) > 3 else "")
            raise LockHeldError(
                f"output_dir {folder}: {who} are being made by {record.get('plugin')} jobs still "
                f"queued or running ({shown}; --comment={comment}); wait for them or cancel "
                "them (scancel), then run again"
            )
        for path in paths:
            path.unlink(missing_ok=True)


class OutputLock:
    """A non-blocking ``flock`` on ``output_dir/.brain-ldm-bids.lock``.

    Exclusive (default; the group level, and anyone who must be alone in the folder): a second
    run gets :class:`LockHeldError` at once, never waits. Shared (``shared=True``): what
    :class:`ParticipantLocks` takes, so that runs on different participants (e.g. the tasks of
    a SLURM job array) work side by side while no exclusive holder is in. An exclusive holder
    writes its name into the lock file; the file is emptied, not removed, on release (removing
    a lock file lets two processes lock different files of the same name). ``flock`` is
    advisory and, on some network file systems, local to one machine (NFSv4 and Lustre mounted
    with ``flock`` share it between machines).
    """

    def __init__(self, output_dir: str | os.PathLike[str], *, shared: bool = False):
        self.folder = Path(output_dir)
        self.path = self.folder / LOCK_NAME
        self.shared = shared
        self._fd: int | None = None

    def __enter__(self) -> OutputLock:
        fd = _open_lock_file(self.path, self.folder)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError:
            holder = _read_holder(fd) or _participant_lock_holders(self.folder)
            os.close(fd)
            raise _busy(self.folder, holder) from None
        try:
            _check_writable(self.folder)
            if not self.shared:
                check_submissions(self.folder)  # jobs of any participant still publishing
                os.ftruncate(fd, 0)
                os.pwrite(fd, _holder_line().encode(), 0)
        except BaseException:
            _release(fd, clear=False)
            raise
        self._fd = fd
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            _release(fd, clear=not self.shared)


class ParticipantLocks:
    """What a participant-level run holds: ``output_dir``'s lock shared, plus an exclusive
    ``flock`` on ``output_dir/.brain-ldm-bids-locks/sub-<label>.lock`` per participant.

    Runs on disjoint participants (one SLURM array task per participant) therefore run side by
    side in one output folder; a run on a participant that another run holds, or while the
    group level (exclusive) runs, gets :class:`LockHeldError` at once, naming the holder.
    Files shared by all runs (``dataset_description.json``, ``README.md``, ``.bidsignore``)
    are written under :meth:`dataset_files`, a short blocking lock.
    """

    def __init__(self, output_dir: str | os.PathLike[str], labels: Iterable[str]):
        self.folder = Path(output_dir)
        self.labels = sorted(set(labels))
        self._output_lock = OutputLock(self.folder, shared=True)
        self._fds: list[int] = []

    def __enter__(self) -> ParticipantLocks:
        self._output_lock.__enter__()
        try:
            locks = self.folder / LOCKS_DIR_NAME
            locks.mkdir(exist_ok=True)
            for label in self.labels:
                fd = _open_lock_file(locks / f"sub-{label}.lock", self.folder)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    holder = _read_holder(fd)
                    os.close(fd)
                    raise _busy(self.folder, holder, f" for sub-{label}") from None
                self._fds.append(fd)
                os.ftruncate(fd, 0)
                os.pwrite(fd, _holder_line().encode(), 0)
            check_submissions(self.folder, self.labels)  # graph-plugin jobs still publishing
        except BaseException:
            self.__exit__()
            raise
        return self

    def record_submission(self, *, comment: str, plugin: str, work_dir: Path) -> None:
        """:func:`record_submission` for this run's participants."""
        record_submission(self.folder, self.labels, comment=comment, plugin=plugin,
                          work_dir=work_dir)

    def clear_submission(self) -> None:
        clear_submission(self.folder, self.labels)

    def __exit__(self, *exc_info: object) -> None:
        while self._fds:
            _release(self._fds.pop(), clear=True)
        self._output_lock.__exit__()

    @contextmanager
    def dataset_files(self, timeout_s: float = 600.0) -> Iterator[None]:
        """Exclusive, blocking (up to ``timeout_s``) lock for the files every run shares."""
        fd = _open_lock_file(self.folder / LOCKS_DIR_NAME / "dataset.lock", self.folder)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise _busy(self.folder, f"waited {timeout_s:.0f} s",
                                " for dataset_description.json") from None
                time.sleep(0.05)
        try:
            yield
        finally:
            _release(fd, clear=False)


def remove_stale_temporaries(
    output_dir: str | os.PathLike[str], labels: Iterable[str] | None = None
) -> list[Path]:
    """Remove the hidden ``.*.tmp-*`` files a killed run leaves.

    ``labels=None``: everywhere (call it holding :class:`OutputLock` exclusively). With
    ``labels``: in those participants' folders and in ``group/`` only (call it holding their
    :class:`ParticipantLocks`; other participants' temporaries may belong to a live run); the
    top-level ones under :meth:`ParticipantLocks.dataset_files`.
    """
    folder = Path(output_dir)
    if labels is None:
        patterns = [".*.tmp-*", "sub-*/anat/.*.tmp-*", "sub-*/ses-*/anat/.*.tmp-*"]
    else:
        patterns = [f"sub-{label}/{where}anat/.*.tmp-*" for label in labels
                    for where in ("", "ses-*/")]
    patterns += [f"{GROUP_DIR_NAME}/.*.tmp-*", f"{GROUP_DIR_NAME}/*/.*.tmp-*"]
    removed = []
    for pattern in patterns:
        for path in sorted(folder.glob(pattern)):
            if path.is_file():
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def default_work_dir(output_dir: str | os.PathLike[str], labels: Iterable[str]) -> Path:
    """``output_dir/.brain-ldm-bids-work/<run>``: one work folder per set of participants,
    so that concurrent runs on other participants (array tasks) never share or remove it, and
    re-running the same command finds its own (Nipype's cache) again. ``<run>`` is
    ``sub-<label>`` for one participant, else ``participants-<sha256 of the labels>[:12]``."""
    unique = sorted(set(labels))
    if len(unique) == 1:
        run = f"sub-{unique[0]}"
    else:
        run = "participants-" + hashlib.sha256(" ".join(unique).encode()).hexdigest()[:12]
    return Path(output_dir) / DEFAULT_WORK_DIR_NAME / run


def remove_stale_top_level_temporaries(output_dir: str | os.PathLike[str]) -> list[Path]:
    """The top-level ``.*.tmp-*`` files (call it under :meth:`ParticipantLocks.dataset_files`)."""
    removed = []
    for path in sorted(Path(output_dir).glob(".*.tmp-*")):
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


def dataset_description(
    source: Mapping[str, Any], *, raw_link: str | None = None,
    links: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """``dataset_description.json`` of an output made from a dataset whose own description
    is ``source`` (empty if it has none); ``raw_link`` (see :func:`raw_dataset_link`) becomes
    ``DatasetLinks.raw``, which resolves the ``bids:raw:`` URIs of counterfactual sidecars.

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
    bare = bare_doi(source.get("DatasetDOI"))
    if bare:
        description["SourceDatasets"] = [{"DOI": f"doi:{bare}", "URL": f"https://doi.org/{bare}"}]
    if raw_link or links:
        description["DatasetLinks"] = {**({"raw": raw_link} if raw_link else {}),
                                       **(links or {})}
    return description


_DOI_PREFIX_RE = re.compile(
    r"^(?:doi:\s*|(?:https?://)?(?:dx\.)?doi\.org/)", re.IGNORECASE
)
_DOI_RE = re.compile(r"^10\.\d{4,9}/\S+$")


def bare_doi(value: Any) -> str | None:
    """The DOI in a ``DatasetDOI`` value, without prefix (``10.18112/openneuro.ds000001.v1``),
    or None when there is none: empty, ``n/a`` and other text that is not ``10.<n>/<suffix>``.

    Accepted spellings: ``10.x/y``, ``doi:10.x/y``, ``https://doi.org/10.x/y``,
    ``http://dx.doi.org/10.x/y``, ``doi.org/10.x/y`` (any case, surrounding space).
    """
    if not isinstance(value, str):
        return None
    text = value.strip()
    for _ in range(2):  # "doi:https://doi.org/10..." seen in the wild
        text = _DOI_PREFIX_RE.sub("", text).strip()
    return text if _DOI_RE.match(text) else None


def raw_dataset_link(source: Mapping[str, Any], bids_dir: Path, output_dir: Path) -> str:
    """What ``DatasetLinks.raw`` names: the source's ``DatasetDOI`` (``doi:...``) when it has
    one, else the path of ``bids_dir`` relative to ``output_dir`` (e.g. ``../..`` for
    ``bids_dir/derivatives/brain-ldm``), so that moving both together keeps it valid."""
    bare = bare_doi((source or {}).get("DatasetDOI"))
    if bare:
        return f"doi:{bare}"
    return Path(os.path.relpath(Path(bids_dir).resolve(), Path(output_dir).resolve())).as_posix()


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
    sources = [s for s in existing.get("SourceDatasets") or []  # drop "https://doi.org/n/a"
               if not isinstance(s, Mapping) or "DOI" not in s or bare_doi(s["DOI"])]
    sources += [s for s in new.get("SourceDatasets", []) if s not in sources]
    if sources:
        merged["SourceDatasets"] = sources
    merged.setdefault("HowToAcknowledge", new["HowToAcknowledge"])
    if new.get("DatasetLinks"):
        merged["DatasetLinks"] = {**(existing.get("DatasetLinks") or {}), **new["DatasetLinks"]}
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
`*_desc-counterfactual_T1w` images (from `--counterfactual`) are model outputs too: a
participant's real T1w (named in `Sources` as a `bids:raw:` URI, see `DatasetLinks`) encoded,
its DDIM trajectory inverted under the participant's own demographics, and sampled forward
under edited ones; their sidecars record both conditionings and the reconstruction error.
`*Sweep<Field><Value>` images vary one conditioning value from the same starting noise.
`group/` (from `brain-ldm-bids ... group`) holds a table of all images and an HTML report.
"""


def write_dataset_files(
    output_dir: Path, description: dict[str, Any], existing: Mapping[str, Any] | None
) -> None:
    """Write ``dataset_description.json`` (merged with ``existing``), ``README.md`` if missing,
    and a ``.bidsignore`` that lists ``/group`` and ``*_xfm.txt`` (registration transforms);
    unchanged files are not rewritten."""
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
    # /group: anchored at the root (bids-validator-deno matches it); *_xfm.txt: registration
    # transforms (fMRIPrep's naming; not yet in the BIDS schema).
    present = {line.strip() for line in lines}
    missing = [w for w in (f"/{GROUP_DIR_NAME}", "*_xfm.txt") if w not in present]
    if missing:
        text = "\n".join([*lines, *missing]) + "\n"
        atomic_write(ignore, lambda handle: handle.write(text.encode("utf-8")))
