"""The BIDS App's group level: a table of every image and an HTML report.

Written under ``output_dir/group/`` (listed in the dataset's ``.bidsignore``)::

    images.tsv       one row per image: participant, run, path, kind, seeds, conditioning,
                     raw values, source, sweep value, reconstruction error
    images.json      what each column of images.tsv means (BIDS-style column descriptions)
    report.html      per subject, its demographics, an orthogonal-slice mosaic per synthetic
                     or counterfactual image, and a strip per sweep
    figures/<image stem>_mosaic.png
    figures/<sweep key>_strip.png     sweep images side by side, ordered by the swept value

The images are found with pybids (``desc-synthetic``, ``desc-counterfactual`` and their
``...Sweep<Field><Value>`` T1w files of the derivative dataset); their sidecars supply the
rest. Figures are drawn with matplotlib's object API (no pyplot state); mosaics show 5 slices
per plane between 30 % and 70 % of the axis, strips the middle slice of each plane, all in
neurological convention (the subject's left on the viewer's left).
"""

from __future__ import annotations

import html
import io
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ._version import __version__
from .demographics import CONDITIONING_ORDER
from .derivatives import COUNTERFACTUAL_DESC, DESC, GROUP_DIR_NAME, SWEEP_INFIX, sidecar_path
from .imaging import atomic_write

__all__ = [
    "GeneratedImage",
    "GroupReport",
    "ReportError",
    "collect_images",
    "image_rows",
    "render_mosaic",
    "render_strip",
    "write_group_report",
]

SLICE_FRACTIONS = (0.3, 0.4, 0.5, 0.6, 0.7)
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


class ReportError(ValueError):
    """The group level cannot run; the one-line message says why."""


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


# --------------------------------------------------------------------------- mosaics


def _planes(volume: np.ndarray) -> list[tuple[str, list[np.ndarray]]]:
    """Sagittal, coronal and axial slices of an LAS volume, oriented for ``imshow(origin="lower")``:
    anterior or superior up, the subject's left on the viewer's left (neurological)."""
    size_x, size_y, size_z = volume.shape

    def picks(size: int) -> list[int]:
        return sorted({min(size - 1, int(round(f * (size - 1)))) for f in SLICE_FRACTIONS})

    # LAS: x runs right -> left, so showing x increasing to the right puts the subject's left
    # on the viewer's right; flip x for the neurological convention.
    return [
        ("sagittal", [volume[i, :, :].T for i in picks(size_x)]),             # y right, z up
        ("coronal", [volume[::-1, j, :].T for j in picks(size_y)]),           # x (L..R), z up
        ("axial", [volume[::-1, :, k].T for k in picks(size_z)]),             # x (L..R), y up
    ]


def render_mosaic(image: str | os.PathLike[str], out_png: str | os.PathLike[str], *,
                  title: str = "") -> Path:
    """Draw 5 slices per plane (rows: sagittal, coronal, axial) of a 3-D NIfTI into a PNG.

    Grey levels span the 0.5th to 99.5th percentile of the volume. Written atomically.
    """
    import nibabel as nib
    from matplotlib.figure import Figure

    volume = np.asarray(nib.load(image).dataobj, dtype=np.float32)
    if volume.ndim != 3:
        raise ReportError(f"{image}: expected a 3-D image, got shape {volume.shape}")
    low, high = np.percentile(volume, [0.5, 99.5])
    if not high > low:
        high = low + 1.0
    planes = _planes(volume)
    columns = max(len(slices) for _, slices in planes)
    figure = Figure(figsize=(1.6 * columns, 1.7 * len(planes) + 0.3), facecolor="black")
    grid = figure.subplots(len(planes), columns, squeeze=False)
    for row, (plane, slices) in enumerate(planes):
        for column in range(columns):
            axes = grid[row][column]
            axes.set_axis_off()
            if column < len(slices):
                axes.imshow(slices[column], cmap="gray", vmin=low, vmax=high, origin="lower",
                            interpolation="nearest")
        grid[row][0].text(-0.08, 0.5, plane, color="white", fontsize=8, rotation=90,
                          ha="right", va="center", transform=grid[row][0].transAxes)
    for row, (left, right) in enumerate([("P", "A"), ("L", "R"), ("L", "R")]):
        for side, x in ((left, 0.02), (right, 0.9)):
            grid[row][0].text(x, 0.04, side, color="yellow", fontsize=7,
                              transform=grid[row][0].transAxes)
    if title:
        figure.suptitle(title, color="white", fontsize=9)
    figure.subplots_adjust(left=0.05, right=0.99, bottom=0.01, top=0.92 if title else 0.99,
                           wspace=0.03, hspace=0.05)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, facecolor="black",
                   metadata={"Software": f"brain-ldm-nodes {__version__} (matplotlib)"})
    payload = buffer.getvalue()
    return atomic_write(out_png, lambda handle: handle.write(payload))


def _middle_slices(volume: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """The middle sagittal, coronal and axial slices, oriented as :func:`_planes` does."""
    x, y, z = (size // 2 for size in volume.shape)
    return [("sagittal", volume[x, :, :].T), ("coronal", volume[::-1, y, :].T),
            ("axial", volume[::-1, :, z].T)]


def render_strip(images: Sequence[str | os.PathLike[str]], labels: Sequence[str],
                 out_png: str | os.PathLike[str], *, title: str = "") -> Path:
    """Draw 3-D NIfTIs side by side (columns, in the order given, each headed by its label)
    as their middle sagittal, coronal and axial slices (rows), into a PNG.

    One grey scale for all of them (0.5th to 99.5th percentile of all voxels), so that
    intensity differences along the strip show. Written atomically.
    """
    import nibabel as nib
    from matplotlib.figure import Figure

    if len(images) != len(labels) or not images:
        raise ReportError(f"render_strip: {len(images)} images and {len(labels)} labels")
    volumes = [np.asarray(nib.load(image).dataobj, dtype=np.float32) for image in images]
    shapes = {volume.shape for volume in volumes}
    if len(shapes) != 1 or len(next(iter(shapes))) != 3:
        raise ReportError(f"render_strip: expected 3-D images of one shape, got {sorted(shapes)}")
    low, high = np.percentile(np.concatenate([v.ravel() for v in volumes]), [0.5, 99.5])
    if not high > low:
        high = low + 1.0
    columns, rows = len(volumes), 3
    figure = Figure(figsize=(1.5 * columns + 0.4, 1.5 * rows + (0.7 if title else 0.4)),
                    facecolor="black")
    grid = figure.subplots(rows, columns, squeeze=False)
    for column, (volume, label) in enumerate(zip(volumes, labels)):
        for row, (plane, data) in enumerate(_middle_slices(volume)):
            axes = grid[row][column]
            axes.set_axis_off()
            axes.imshow(data, cmap="gray", vmin=low, vmax=high, origin="lower",
                        interpolation="nearest")
            if column == 0:
                axes.text(-0.08, 0.5, plane, color="white", fontsize=8, rotation=90,
                          ha="right", va="center", transform=axes.transAxes)
        grid[0][column].set_title(label, color="white", fontsize=8, pad=3)
    for row, (left, right) in enumerate([("P", "A"), ("L", "R"), ("L", "R")]):
        for side, x in ((left, 0.02), (right, 0.88)):
            grid[row][0].text(x, 0.04, side, color="yellow", fontsize=7,
                              transform=grid[row][0].transAxes)
    if title:
        figure.suptitle(title, color="white", fontsize=9)
    top = 1 - (0.75 if title else 0.35) / (1.5 * rows + (0.7 if title else 0.4))
    figure.subplots_adjust(left=0.4 / (1.5 * columns + 0.4), right=0.995, bottom=0.01,
                           top=top, wspace=0.03, hspace=0.05)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, facecolor="black",
                   metadata={"Software": f"brain-ldm-nodes {__version__} (matplotlib)"})
    payload = buffer.getvalue()
    return atomic_write(out_png, lambda handle: handle.write(payload))


def _sweep_label(image: GeneratedImage) -> str:
    """A strip column's heading: ``50 y``, ``+10 y (73 y)``, ``female``, ``0.4``."""
    sweep = image.sidecar.get("Sweep") or {}
    field, value = sweep.get("Field"), str(sweep.get("Value", "?"))
    entry = ((image.conditioning.get("Derivation") or {}).get(field) or {})
    if field == "sex":
        return {"F": "female", "M": "male"}.get(value, value)
    if field == "age":
        years = entry.get("age_years")
        shown = f"{years:g} y" if isinstance(years, (int, float)) else ""
        return f"{value} y ({shown})" if value[:1] in "+-" and shown else f"{value} y"
    resolved = entry.get("value")
    if value[:1] in "+-" and isinstance(resolved, (int, float)):
        return f"{value} ({resolved:.3g})"
    return value


def _sweep_title(members: Sequence[GeneratedImage]) -> str:
    first = members[0]
    sweep = first.sidecar.get("Sweep") or {}
    name = str(sweep.get("Field", "?"))
    entry = (first.conditioning.get("Derivation") or {}).get(name) or {}
    own = entry.get("from_age_years", entry.get("from_value"))
    own_text = (f" (own {own:.3g}{' y' if name == 'age' else ''})"
                if isinstance(own, (int, float)) and name != "sex" else "")
    field = name.replace("_", " ")
    if first.kind == "counterfactual_sweep":
        source = (first.sidecar.get("Sources") or ["?"])[0]
        return (f"sub-{first.label}: {field} sweep{own_text} of {source.rsplit('/', 1)[-1]} "
                "(inverted)")
    return (f"sub-{first.label}: {field} sweep{own_text}, synthetic, "
            f"seed {first.sidecar.get('Seed', '?')}")


# --------------------------------------------------------------------------- HTML

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 70em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ccc; }
.warning { background: #fff3cd; border: 1px solid #e0c36a; padding: .6em 1em; }
table { border-collapse: collapse; font-size: .85em; margin: .5em 0 1em; }
th, td { border: 1px solid #ddd; padding: .2em .5em; text-align: left; }
th { background: #f3f3f3; }
figure { display: inline-block; margin: .5em 1em .5em 0; }
figure img { background: black; max-width: 100%; }
figcaption { font-size: .8em; color: #444; max-width: 40em; }
code { font-size: .9em; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _short(cell: str) -> str:
    """A TSV cell for reading: numbers to 4 significant digits, text as is."""
    try:
        return f"{float(cell):.4g}"
    except ValueError:
        return cell


def _conditioning_text(row: Mapping[str, str]) -> str:
    sex = {"0.0": "female", "1.0": "male"}.get(row["sex"], _short(row["sex"]))
    return (f"sex {sex}, age {_short(row['age'])} ({_short(row['age_years'])} y), "
            f"ventricular volume {_short(row['ventricular_volume'])}, "
            f"brain volume {_short(row['brain_volume'])}")


def _caption(image: GeneratedImage, row: Mapping[str, str]) -> str:
    """A mosaic's caption: path, seed or source + edit + reconstruction error, conditioning."""
    parts = [image.relative_path.as_posix()]
    if image.kind == "counterfactual":
        parts += [f"from {row['source']}", f"edit {row['edit']}",
                  f"reconstruction RMS {_short(row['reconstruction_error_rms'])}, latent "
                  f"{_short(row['reconstruction_error_latent'])}"]
    else:
        parts.append(f"seed {row['seed']}")
    return " · ".join(parts + [_conditioning_text(row)])


def _html_report(description: Mapping[str, Any], images: Sequence[GeneratedImage],
                 rows: Sequence[Mapping[str, str]], figures: Mapping[str, str],
                 problems: Sequence[str],
                 strips: Mapping[str, tuple[str, Sequence[GeneratedImage]]] | None = None,
                 ) -> str:
    participants = sorted({image.label for image in images})
    sources = ", ".join(
        entry.get("DOI") or entry.get("URL") or "?"
        for entry in description.get("SourceDatasets") or [] if isinstance(entry, Mapping)
    )
    models = sorted({row["model_weights_sha256"] for row in rows})
    out = [
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        f"<title>brain-ldm-bids group report: {_e(description.get('Name', ''))}</title>",
        f"<style>{_STYLE}</style>", "</head>", "<body>",
        "<h1>Synthetic T1w images: group report</h1>",
        '<p class="warning">Every image here is <b>output of the Brain LDM</b>, a generative '
        "model: sampled using the participant's demographics or, for counterfactuals, "
        "regenerated from the participant's real T1w (inverted to its starting noise) under "
        "edited demographics; none was acquired from a person.</p>",
        "<table>",
        f"<tr><th>Dataset</th><td>{_e(description.get('Name', ''))}</td></tr>",
        f"<tr><th>Source datasets</th><td>{_e(sources or 'n/a')}</td></tr>",
        f"<tr><th>Participants</th><td>{len(participants)}</td></tr>",
        f"<tr><th>Images</th><td>{len(images)}</td></tr>",
        "<tr><th>Model weights (sha256)</th>"
        f"<td><code>{'<br>'.join(map(_e, models))}</code></td></tr>",
        f"<tr><th>Report</th><td>brain-ldm-bids {_e(__version__)}; table: "
        '<a href="images.tsv">images.tsv</a></td></tr>',
        "</table>",
    ]
    if problems:
        out.append("<h2>Notes</h2><ul>" + "".join(f"<li>{_e(p)}</li>" for p in problems) + "</ul>")
    out.append("<h2>All images</h2><table><tr>" + "".join(
        f"<th>{_e(c)}</th>" for c in ("participant_id", "kind", "session", "run", "seed",
                                       *CONDITIONING_ORDER, "age_years", "edit / sweep",
                                       "outside_unit_range")) + "</tr>")
    for row in rows:
        cells = [f'<a href="#{_e(row["participant_id"])}">{_e(row["participant_id"])}</a>']
        cells += [_e(row["kind"]), _e(row["session"]), _e(row["run"]), _e(row["seed"])]
        cells += [_e(_short(row[c])) for c in (*CONDITIONING_ORDER, "age_years")]
        swept = (f"{row['sweep_field']}={row['sweep_value']}"
                 if row["sweep_field"] != "n/a" else row["edit"])
        cells += [_e(swept), _e(row["outside_unit_range"])]
        out.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    out.append("</table>")
    for label in participants:
        subject = [(image, row) for image, row in zip(images, rows) if image.label == label]
        demographics = subject[0][0].sidecar.get("Demographics") or {}
        raw = ", ".join(f"{k} = {v!r}" for k, v in (demographics.get("Values") or {}).items())
        out.append(f'<section id="sub-{_e(label)}"><h2>sub-{_e(label)}</h2>')
        source = demographics.get("Source", "participants.tsv")
        out.append(f"<p>{_e(source)}: {_e(raw or 'n/a')}</p>")
        for image, row in subject:
            if image.stem not in figures:
                continue  # a sweep image: in its strip below
            out.append(
                f'<figure><img src="{_e(figures[image.stem])}" loading="lazy" '
                f'alt="slices of {_e(image.stem)}"><figcaption>{_e(_caption(image, row))}'
                "</figcaption></figure>"
            )
        for key, (png, members) in (strips or {}).items():
            if members[0].label != label:
                continue
            caption = (f"{_sweep_title(members)}: {len(members)} images ordered by the swept "
                       "value, same starting noise; middle slices, one grey scale")
            out.append(
                f'<figure><img src="{_e(png)}" loading="lazy" alt="sweep {_e(key)}">'
                f"<figcaption>{_e(caption)}</figcaption></figure>"
            )
        out.append("</section>")
    out += ["</body>", "</html>"]
    return "\n".join(out) + "\n"


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
        render_strip([m.path for m in members], [_sweep_label(m) for m in members], png,
                     title=_sweep_title(members))
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
                       _html_report(description, images, rows, figures, problems, strips))
    return GroupReport(table, page, len(images), len({i.label for i in images}), tuple(problems))
