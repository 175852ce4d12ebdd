"""What the App makes, one request per image: a synthetic image (:class:`ImageRequest`, a
sweep value :class:`SweepPoint`) or a counterfactual of a real T1w (:class:`CounterfactualRequest`).

A request knows its output name, the conditioning its nodes read, the sidecar keys the
publishing node adds (``extra_metadata``) and what its sidecar must hold (``expected``: built
by the functions that write the sidecar, :mod:`brain_ldm_nodes.provenance`), which the resume
check (:mod:`brain_ldm_nodes.bids_app.resume`) compares with an existing one.

Counterfactuals are made from each real T1w of a participant (``<source entities>`` = the
source's file name without ``_T1w``), by DDIM inversion under the participant's own
conditioning: no seed. Their sidecars name the source as a BIDS URI
(``bids:raw:<path in bids_dir>``, resolved by ``DatasetLinks.raw`` in
``dataset_description.json``) and record its sha256, so a changed source is redone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ..provenance import described_conditioning, grid_convention, json_normal, sampler_settings
from ..scheduler_names import SCHEDULER_TITLES, check_scheduler
from .naming import (
    COUNTERFACTUAL_DESC,
    DESC,
    SEED_FORMULA,
    SWEEP_INFIX,
    derive_seed,
    image_relative_path,
)
from .resume import lookup

if TYPE_CHECKING:  # pragma: no cover - typing only; keeps pybids out of this module's imports
    from ..conditioning import Conditioning
    from ..edits import EditValue, Sweep
    from ..weights.identity import ModelIdentity
    from .participants import Participant

__all__ = [
    "COUNTERFACTUAL_IMAGE_KEYS",
    "CounterfactualRequest",
    "IMAGE_KEYS",
    "ImageRequest",
    "METADATA_KEYS",
    "SweepPoint",
]


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


@dataclass(frozen=True, kw_only=True)
class _ParticipantRequest:
    """What every request has: whose demographics (read from which columns of which table,
    under which policy), the model, the number of steps, and a sweep point if it is one."""

    participant: Participant
    num_inference_steps: int
    model: ModelIdentity
    columns: Mapping[str, str | None]
    policy: Mapping[str, Any]
    tsv_name: str = "participants.tsv"
    #: A point of a conditioning sweep (synthetic: the seed of the participant's image 0).
    sweep: SweepPoint | None = None

    def __post_init__(self) -> None:
        if self.participant.conditioning is None:
            raise ValueError(f"sub-{self.participant.label} has no usable conditioning")

    @property
    def label(self) -> str:
        return self.participant.label

    def demographics(self) -> dict[str, Any]:
        """The ``Demographics`` sidecar entry: the participants.tsv cells and how they were
        read."""
        return {
            "Source": self.tsv_name,
            "ParticipantId": self.participant.participant_id,
            "Columns": dict(self.columns),
            "Values": dict(self.participant.raw),
            "Policy": dict(self.policy),
        }


def _model_and_grid(model: ModelIdentity) -> dict[str, Any]:
    """The sidecar's ``Model.Source`` weights and ``Grid.Shape`` as the model's configs give
    them (what :func:`~brain_ldm_nodes.provenance.grid_convention` records)."""
    return {
        "Model": {"Source": {"model": {"weights_sha256": model.unet_sha256},
                             "vae": {"weights_sha256": model.vae_sha256}}},
        "Grid": {"Shape": grid_convention(model.image_shape)["Shape"]},
    }


@dataclass(frozen=True, kw_only=True)
class ImageRequest(_ParticipantRequest):
    """One synthetic image to have in ``output_dir``: who, which sample, how (a sweep point
    uses ``index`` 0: the seed of the participant's image 0)."""

    index: int
    n_samples: int
    base_seed: int
    #: The sampler (``brain_ldm_nodes.scheduler_names.SCHEDULERS``): ``--scheduler``.
    scheduler: str = "ddim"

    image_keys = property(lambda self: IMAGE_KEYS)
    metadata_keys = property(
        lambda self: METADATA_KEYS + ((("Sweep",),) if self.sweep is not None else ())
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.index < self.n_samples:
            raise ValueError(f"sample index {self.index} is outside 0..{self.n_samples - 1}")
        if self.sweep is not None and self.index != 0:
            raise ValueError("a sweep uses the seed of image 0 (index 0)")
        check_scheduler(self.scheduler)

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
        return json_normal({
            **sweep,
            "Demographics": self.demographics(),
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
        """Sidecar key path -> the value the request implies (``image_keys`` and
        ``metadata_keys``), from the functions that write the sidecar: the parts of
        :func:`~brain_ldm_nodes.provenance.synthesis_sidecar` and :meth:`extra_metadata`."""
        written = json_normal({
            "Conditioning": described_conditioning(self.conditioning),
            "Seed": self.seed,
            "Sampler": sampler_settings(self.num_inference_steps, self.model.scheduler,
                                        self.scheduler),
            **_model_and_grid(self.model),
            **self.extra_metadata(),
        })
        return {path: lookup(written, path) for path in (*self.image_keys, *self.metadata_keys)}


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


@dataclass(frozen=True, kw_only=True)
class CounterfactualRequest(_ParticipantRequest):
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

    source: Path
    source_relative: str
    source_sha256: str
    target: Conditioning
    edits: tuple[EditValue, ...] = ()
    t1w_space: str = "native"
    source_dataset: str = "raw"
    source_space: str | None = None
    output_space: Literal["model", "source"] = "model"
    source_shape: tuple[int, int, int] | None = None

    @property
    def image_keys(self) -> tuple[tuple[str, ...], ...]:
        return (*COUNTERFACTUAL_IMAGE_KEYS, ("OutputSpace",))

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.sweep is None) == (not self.edits):
            raise ValueError("a counterfactual has either edits or a sweep point")
        if not Path(self.source_relative).name.endswith(("_T1w.nii.gz", "_T1w.nii")):
            raise ValueError(f"{self.source_relative}: not a T1w image name")
        if self.output_space == "source" and self.source_shape is None:
            raise ValueError("a counterfactual on the source's grid needs the source's shape")

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
        return json_normal({
            "Sources": [self.source_uri],
            "SourceSHA256": self.source_sha256,
            **what,
            "Demographics": self.demographics(),
            # The model regenerates whole-head images like its training data.
            "SkullStripped": False,
            **extra,
        })

    def expected(self) -> dict[tuple[str, ...], Any]:
        """Sidecar key path -> the value the request implies (``image_keys`` and
        ``metadata_keys``), from the functions that write the sidecar: the parts of
        :func:`~brain_ldm_nodes.provenance.counterfactual_sidecar` (its ``Preparation``
        record's ``t1w_space``) and :meth:`extra_metadata`."""
        extras = self.extra_metadata()
        written = json_normal({
            "ConditioningFrom": described_conditioning(self.participant.conditioning),
            "ConditioningTo": described_conditioning(self.target),
            "Sampler": sampler_settings(self.num_inference_steps, self.model.scheduler),
            **_model_and_grid(self.model),
            **extras,
            "Preparation": {"t1w_space": self.t1w_space, **extras.get("Preparation", {})},
        })
        return {path: lookup(written, path) for path in (*self.image_keys, *self.metadata_keys)}
