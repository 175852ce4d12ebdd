"""The BIDS App's group level: a table of every image and an HTML report.

Written under ``output_dir/group/`` (listed in the dataset's ``.bidsignore``)::

    images.tsv       one row per image: participant, run, path, kind, seeds, conditioning,
                     raw values, source, sweep value, reconstruction error
    images.json      what each column of images.tsv means (BIDS-style column descriptions)
    report.html      per subject, its demographics, an orthogonal-slice mosaic per synthetic
                     or counterfactual image, and a strip per sweep (:mod:`.report_html`)
    figures/<image stem>_mosaic.png
    figures/<sweep key>_strip.png     sweep images side by side, ordered by the swept value

The images are found with pybids (``desc-synthetic``, ``desc-counterfactual`` and their
``...Sweep<Field><Value>`` T1w files of the derivative dataset); their sidecars supply the
rest. The figures are drawn by :mod:`.figures`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..conditioning import CONDITIONING_ORDER
from ..imaging import atomic_write
from .errors import ReportError
from .figures import render_mosaic, render_strip
from .naming import COUNTERFACTUAL_DESC, DESC, GROUP_DIR_NAME, SWEEP_INFIX, sidecar_path
from .report_html import html_report, sweep_label, sweep_title

__all__ = [
    "COLUMN_DESCRIPTIONS",
    "GeneratedImage",
    "GroupReport",
    "KINDS",
    "ReportError",
    "TSV_COLUMNS",
    "collect_images",
    "image_kind",
    "image_rows",
    "render_mosaic",
    "render_strip",
    "write_group_report",
]


TSV_COLUMNS = (
    "participant_id", "run", "image", "seed", "base_seed", "sample_index",
    "num_inference_steps", "scheduler", *CONDITIONING_ORDER, "age_years",
    *(f"raw_{name}" for name in CONDITIONING_ORDER), "outside_unit_range",
    "model_weights_sha256", "kind", "session", "source", "edit", "sweep_field", "sweep_value",
    "reconstruction_error_rms", "reconstruction_error_latent",
)
COLUMN_DESCRIPTIONS = {
    "participant_id": "Participant of the source dataset whose demographics conditioned the image",
    "run": "BIDS run entity: the image's index among the participant's synthetic images "
    "(1-based), or the source image's run for counterfactuals; n/a when absent",
    "image": "Path of the image, relative to the derivative dataset's root",
    "seed": "Seed of the image's starting noise (derived from base_seed, participant, sample)",
    "base_seed": "--seed of the run that made the image",
    "sample_index": "0-based index of the image among the participant's images",
    "num_inference_steps": "Sampler steps (U-Net calls)",
    "scheduler": "Sampler (--scheduler): ddim, dpmpp-2m or unipc; counterfactuals are always ddim",
    "sex": "Normalised conditioning: 0 = female, 1 = male",
    "age": "Normalised conditioning: (age_years - 44) / 38 by default",
    "ventricular_volume": "Normalised conditioning: ventricular CSF volume, [0, 1]",
    "brain_volume": "Normalised conditioning: brain volume normalised for head size, [0, 1]",
    "age_years": "Age in years as read from participants.tsv (ranges: their midpoint)",
    "raw_sex": "The participants.tsv cell the sex value came from",
    "raw_age": "The participants.tsv cell the age value came from",
    "raw_ventricular_volume": "The participants.tsv cell the ventricular volume came from",
    "raw_brain_volume": "The participants.tsv cell the brain volume came from",
    "outside_unit_range": "Conditioning values outside [0, 1] (extrapolation), comma-separated",
    "model_weights_sha256": "sha256 of the diffusion model's weights file",
    "kind": "synthetic, synthetic_sweep, counterfactual or counterfactual_sweep",
    "session": "BIDS session entity of the source image (counterfactuals); n/a when absent",
    "source": "Counterfactuals: the real T1w image inverted (BIDS URI, see DatasetLinks)",
    "edit": "Counterfactuals: the --counterfactual edits applied, space-separated",
    "sweep_field": "Sweeps: the conditioning field varied",
    "sweep_value": "Sweeps: the value as requested (years for age; signed: relative)",
    "reconstruction_error_rms": "Counterfactuals: RMS difference between the source (conformed, "
    "[0, 1]) and its regeneration under its own conditioning",
    "reconstruction_error_latent": "Counterfactuals: ||regenerated latent - latent|| / ||latent|| "
    "(the DDIM inversion's error alone)",
}
#: desc label -> kind, for the desc labels this package writes.
KINDS = {DESC: "synthetic", COUNTERFACTUAL_DESC: "counterfactual"}


def image_kind(desc: str | None) -> str | None:
    """``synthetic``, ``synthetic_sweep``, ``counterfactual``, ``counterfactual_sweep`` or
    None (not an image of this package) from a ``desc`` label."""
    if desc in KINDS:
        return KINDS[desc]
    for base, kind in KINDS.items():
        if desc and desc.startswith(base + SWEEP_INFIX) and desc[len(base + SWEEP_INFIX):]:
            return f"{kind}_sweep"
    return None


@dataclass(frozen=True)
class GeneratedImage:
    """A synthetic image of the output dataset and its sidecar's content."""

    path: Path
    relative_path: Path
    label: str
    run: int | None
    sidecar: Mapping[str, Any]
    kind: str = "synthetic"
    session: str | None = None

    @property
    def stem(self) -> str:
        return self.path.name[: -len(".nii.gz")]

    @property
    def conditioning(self) -> Mapping[str, Any]:
        """The conditioning the image was made with (a counterfactual's target)."""
        key = "ConditioningTo" if self.kind.startswith("counterfactual") else "Conditioning"
        return self.sidecar.get(key) or {}

    @property
    def sweep_key(self) -> str | None:
        """Images of one sweep share this: participant, source entities (counterfactuals),
        kind and field, e.g. ``sub-01_ses-1_counterfactualSweepAge``; None if not a sweep."""
        sweep = self.sidecar.get("Sweep")
        if not self.kind.endswith("_sweep") or not isinstance(sweep, Mapping):
            return None
        base = self.stem[: self.stem.index("_desc-")]
        field = "".join(part.capitalize() for part in str(sweep.get("Field", "")).split("_"))
        return f"{base}_{self.kind.removesuffix('_sweep')}Sweep{field}"


@dataclass(frozen=True)
class GroupReport:
    """What :func:`write_group_report` wrote."""

    table: Path
    html: Path
    n_images: int
    n_participants: int
    problems: tuple[str, ...] = ()


def collect_images(
    output_dir: str | os.PathLike[str], labels: Sequence[str] | None = None
) -> tuple[list[GeneratedImage], list[str]]:
    """The dataset's synthetic T1w images with readable sidecars (sorted by participant, run),
    and one-line notes on images left out (no sidecar: an interrupted run; unreadable JSON)."""
    from bids.layout import BIDSLayout

    root = Path(output_dir).resolve()
    layout = BIDSLayout(root, validate=False, is_derivative=True)
    query: dict[str, Any] = {"suffix": "T1w", "extension": ".nii.gz"}
    if labels:
        query["subject"] = list(labels)
    images, problems = [], []
    for found in layout.get(**query):
        path = Path(found.path)
        relative = path.relative_to(root)
        entities = found.get_entities()
        kind = image_kind(entities.get("desc"))
        folder = (f"sub-{entities['subject']}",
                  *((f"ses-{entities['session']}",) if entities.get("session") else ()), "anat")
        if kind is None or relative.parts[:-1] != folder:
            continue  # not ours, or e.g. a node folder of a work directory inside output_dir
        sidecar = sidecar_path(path)
        try:
            document = json.loads(sidecar.read_text(encoding="utf-8"))
        except FileNotFoundError:
            problems.append(f"{relative}: no sidecar (an interrupted run?); left out")
            continue
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            problems.append(f"{relative.with_name(sidecar.name)}: unreadable ({exc}); left out")
            continue
        images.append(GeneratedImage(path, relative, entities["subject"], entities.get("run"),
                                     document, kind, entities.get("session")))
    numbered = {image.label for image in images if image.kind == "synthetic" and image.run}
    for image in [i for i in images if i.kind == "synthetic" and not i.run]:
        if image.label in numbered:  # left by a run with another --n-samples: not counted twice
            images.remove(image)
            problems.append(f"{image.relative_path}: left out, sub-{image.label} also has "
                            "run-numbered images (from a later --n-samples; its participant run "
                            "removes it)")
    order = {"synthetic": 0, "synthetic_sweep": 1, "counterfactual": 2, "counterfactual_sweep": 3}
    images.sort(key=lambda image: (image.label, order[image.kind], image.session or "",
                                   image.run or 0, _sweep_position(image), image.stem))
    return images, problems


def _sweep_position(image: GeneratedImage) -> float:
    """Where a sweep image goes in its strip: by the swept field's resolved value."""
    sweep = image.sidecar.get("Sweep")
    if not isinstance(sweep, Mapping):
        return 0.0
    conditioning = image.conditioning
    values = dict(zip(conditioning.get("Order") or CONDITIONING_ORDER,
                      conditioning.get("Values") or []))
    value = values.get(sweep.get("Field"))
    return float(value) if isinstance(value, (int, float)) else 0.0


def _cell(value: Any) -> str:
    """A TSV cell: n/a for missing, shortest round-trip text for floats, no tabs/newlines."""
    if value is None or value == "":
        return "n/a"
    if isinstance(value, float):
        return repr(value)
    return " ".join(str(value).split())


def image_rows(images: Iterable[GeneratedImage]) -> list[dict[str, str]]:
    """One ``images.tsv`` row (column -> cell text) per image."""
    rows = []
    for image in images:
        sidecar = image.sidecar
        conditioning = image.conditioning
        values = dict(zip(conditioning.get("Order") or CONDITIONING_ORDER,
                          conditioning.get("Values") or []))
        derivation = conditioning.get("Derivation") or {}
        seeds = sidecar.get("SeedDerivation") or {}
        source = ((sidecar.get("Model") or {}).get("Source") or {}).get("model") or {}
        row = {
            "participant_id": f"sub-{image.label}",
            "run": image.run,
            "image": image.relative_path.as_posix(),
            "seed": sidecar.get("Seed"),
            "base_seed": seeds.get("BaseSeed"),
            "sample_index": seeds.get("SampleIndex"),
            "num_inference_steps": (sidecar.get("Sampler") or {}).get("NumInferenceSteps"),
            # Sidecars from before --scheduler (and counterfactuals') have no Name: DDIM.
            "scheduler": (sidecar.get("Sampler") or {}).get("Name", "ddim"),
            **{name: values.get(name) for name in CONDITIONING_ORDER},
            "age_years": (derivation.get("age") or {}).get("age_years"),
            **{f"raw_{name}": _raw_cell(derivation.get(name) or {})
               for name in CONDITIONING_ORDER},
            "outside_unit_range": ",".join(conditioning.get("OutsideUnitRange") or []),
            "model_weights_sha256": source.get("weights_sha256"),
            **_counterfactual_cells(image),
        }
        rows.append({column: _cell(row[column]) for column in TSV_COLUMNS})
    return rows


def _raw_cell(entry: Mapping[str, Any]) -> Any:
    """The participants.tsv cell behind a derivation entry (an edited value keeps it under
    ``from``)."""
    while "raw" not in entry and isinstance(entry.get("from"), Mapping):
        entry = entry["from"]
    return entry.get("raw")


def _counterfactual_cells(image: GeneratedImage) -> dict[str, Any]:
    """The columns after ``model_weights_sha256``: kind, source, edit, sweep, errors."""
    sidecar = image.sidecar
    sweep = sidecar.get("Sweep") if isinstance(sidecar.get("Sweep"), Mapping) else {}
    error = sidecar.get("ReconstructionError") or {}
    sources = sidecar.get("Sources") or []
    return {
        "kind": image.kind,
        "session": image.session,
        "source": sources[0] if sources and image.kind.startswith("counterfactual") else None,
        "edit": " ".join(sidecar.get("Edit") or []),
        "sweep_field": sweep.get("Field"),
        "sweep_value": sweep.get("Value"),
        "reconstruction_error_rms": error.get("ImageRMS"),
        "reconstruction_error_latent": error.get("LatentRelative"),
    }


def _write_text(path: Path, text: str) -> Path:
    payload = text.encode("utf-8")
    return atomic_write(path, lambda handle: handle.write(payload))


def _write_tsv(rows: Sequence[Mapping[str, str]], path: Path) -> Path:
    lines = ["\t".join(TSV_COLUMNS)] + ["\t".join(row[c] for c in TSV_COLUMNS) for row in rows]
    return _write_text(path, "\n".join(lines) + "\n")


def write_group_report(
    output_dir: str | os.PathLike[str],
    *,
    labels: Sequence[str] | None = None,
    progress: Callable[..., None] | None = None,
) -> GroupReport:
    """Write ``group/images.tsv``, ``images.json``, ``report.html`` and the mosaics.

    ``labels`` restricts the report to those participants (all by default); each must have
    images. Mosaics of images no longer present are removed. Raises :class:`ReportError`
    when there is nothing to report.
    """
    root = Path(output_dir).resolve()
    images, problems = collect_images(root, labels)
    if labels:
        missing = sorted(set(labels) - {image.label for image in images})
        if missing:
            raise ReportError(
                f"--participant-label: no images of {', '.join(f'sub-{m}' for m in missing)} in "
                f"{root} (run the participant level for them first)"
            )
    if not images:
        raise ReportError(
            f"{root}: no images (sub-*/[ses-*/]anat/*_desc-{DESC}*_T1w.nii.gz or "
            f"*_desc-{COUNTERFACTUAL_DESC}*_T1w.nii.gz with a sidecar); run the participant "
            "level first"
        )
    description = json.loads((root / "dataset_description.json").read_text(encoding="utf-8"))
    group = root / GROUP_DIR_NAME
    figures_dir = group / "figures"
    rows = image_rows(images)
    figures: dict[str, str] = {}
    singles = [image for image in images if image.sweep_key is None]
    for number, image in enumerate(singles, start=1):
        png = figures_dir / f"{image.stem}_mosaic.png"
        render_mosaic(image.path, png, title=image.stem)
        figures[image.stem] = png.relative_to(group).as_posix()
        if progress is not None:
            progress("[%d/%d] mosaic of %s", number, len(singles), image.relative_path)
    sweeps: dict[str, list[GeneratedImage]] = {}
    for image in images:
        if image.sweep_key is not None:
            sweeps.setdefault(image.sweep_key, []).append(image)  # in strip order already
    strips: dict[str, tuple[str, list[GeneratedImage]]] = {}
    for key, members in sweeps.items():
        png = figures_dir / f"{key}_strip.png"
        render_strip([m.path for m in members], [sweep_label(m) for m in members], png,
                     title=sweep_title(members))
        strips[key] = (png.relative_to(group).as_posix(), members)
        if progress is not None:
            progress("strip of %s (%d images)", key, len(members))
    if not labels:
        wanted = {f"{stem}_mosaic.png" for stem in figures} | {f"{k}_strip.png" for k in strips}
        for old in [*figures_dir.glob("*_mosaic.png"), *figures_dir.glob("*_strip.png")]:
            if old.name not in wanted:
                old.unlink()
    table = _write_tsv(rows, group / "images.tsv")
    columns = {name: {"Description": COLUMN_DESCRIPTIONS[name]} for name in TSV_COLUMNS}
    _write_text(group / "images.json", json.dumps(columns, indent=2, sort_keys=True) + "\n")
    page = _write_text(group / "report.html",
                       html_report(description, images, rows, figures, problems, strips))
    return GroupReport(table, page, len(images), len({i.label for i in images}), tuple(problems))
