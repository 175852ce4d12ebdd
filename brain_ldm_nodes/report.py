"""The BIDS App's group level: a table of every synthetic image and an HTML report.

Written under ``output_dir/group/`` (listed in the dataset's ``.bidsignore``)::

    images.tsv       one row per image: participant, run, path, seeds, conditioning, raw values
    images.json      what each column of images.tsv means (BIDS-style column descriptions)
    report.html      per subject, its demographics and an orthogonal-slice mosaic per image
    figures/<image stem>_mosaic.png

The images are found with pybids (``desc-synthetic`` T1w files of the derivative dataset);
their sidecars supply the rest. Mosaics are drawn with matplotlib's object API (no pyplot
state), 5 slices per plane between 30 % and 70 % of the axis, in neurological convention
(the subject's left on the viewer's left).
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
from .derivatives import DESC, GROUP_DIR_NAME, sidecar_path
from .imaging import atomic_write

__all__ = [
    "GeneratedImage",
    "GroupReport",
    "ReportError",
    "collect_images",
    "image_rows",
    "render_mosaic",
    "write_group_report",
]

SLICE_FRACTIONS = (0.3, 0.4, 0.5, 0.6, 0.7)
TSV_COLUMNS = (
    "participant_id", "run", "image", "seed", "base_seed", "sample_index",
    "num_inference_steps", *CONDITIONING_ORDER, "age_years",
    *(f"raw_{name}" for name in CONDITIONING_ORDER), "outside_unit_range",
    "model_weights_sha256",
)
COLUMN_DESCRIPTIONS = {
    "participant_id": "Participant of the source dataset whose demographics conditioned the image",
    "run": "Index of the image among the participant's images (1-based); n/a when it has one",
    "image": "Path of the image, relative to the derivative dataset's root",
    "seed": "Seed of the image's starting noise (derived from base_seed, participant, sample)",
    "base_seed": "--seed of the run that made the image",
    "sample_index": "0-based index of the image among the participant's images",
    "num_inference_steps": "DDIM steps",
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
}


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

    @property
    def stem(self) -> str:
        return self.path.name[: -len(".nii.gz")]


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
    query: dict[str, Any] = {"suffix": "T1w", "desc": DESC, "extension": ".nii.gz"}
    if labels:
        query["subject"] = list(labels)
    images, problems = [], []
    for found in layout.get(**query):
        path = Path(found.path)
        relative = path.relative_to(root)
        entities = found.get_entities()
        if relative.parts[:2] != (f"sub-{entities['subject']}", "anat") or len(relative.parts) != 3:
            continue  # e.g. a node folder of a work directory kept inside output_dir
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
                                     document))
    images.sort(key=lambda image: (image.label, image.run or 0))
    return images, problems


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
        conditioning = sidecar.get("Conditioning") or {}
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
            **{name: values.get(name) for name in CONDITIONING_ORDER},
            "age_years": (derivation.get("age") or {}).get("age_years"),
            **{f"raw_{name}": (derivation.get(name) or {}).get("raw")
               for name in CONDITIONING_ORDER},
            "outside_unit_range": ",".join(conditioning.get("OutsideUnitRange") or []),
            "model_weights_sha256": source.get("weights_sha256"),
        }
        rows.append({column: _cell(row[column]) for column in TSV_COLUMNS})
    return rows


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


def _html_report(description: Mapping[str, Any], images: Sequence[GeneratedImage],
                 rows: Sequence[Mapping[str, str]], figures: Mapping[str, str],
                 problems: Sequence[str]) -> str:
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
        '<p class="warning">Every image here was <b>sampled from the Brain LDM</b>, a generative '
        "model, using the participant's demographics; none was acquired from a person.</p>",
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
        f"<th>{_e(c)}</th>" for c in ("participant_id", "run", "seed", *CONDITIONING_ORDER,
                                       "age_years", "outside_unit_range")) + "</tr>")
    for row in rows:
        cells = [f'<a href="#{_e(row["participant_id"])}">{_e(row["participant_id"])}</a>']
        cells += [_e(row["run"]), _e(row["seed"])]
        cells += [_e(_short(row[c])) for c in (*CONDITIONING_ORDER, "age_years")]
        cells += [_e(row["outside_unit_range"])]
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
            caption = (f"{image.relative_path.as_posix()} · seed {row['seed']} · "
                       f"{_conditioning_text(row)}")
            out.append(
                f'<figure><img src="{_e(figures[image.stem])}" loading="lazy" '
                f'alt="slices of {_e(image.stem)}"><figcaption>{_e(caption)}</figcaption></figure>'
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
            f"{root}: no synthetic images (sub-*/anat/*_desc-{DESC}_T1w.nii.gz with a sidecar); "
            "run the participant level first"
        )
    description = json.loads((root / "dataset_description.json").read_text(encoding="utf-8"))
    group = root / GROUP_DIR_NAME
    figures_dir = group / "figures"
    rows = image_rows(images)
    figures: dict[str, str] = {}
    for number, image in enumerate(images, start=1):
        png = figures_dir / f"{image.stem}_mosaic.png"
        render_mosaic(image.path, png, title=image.stem)
        figures[image.stem] = png.relative_to(group).as_posix()
        if progress is not None:
            progress("[%d/%d] mosaic of %s", number, len(images), image.relative_path)
    if not labels:
        wanted = {f"{stem}_mosaic.png" for stem in figures}
        for old in figures_dir.glob("*_mosaic.png"):
            if old.name not in wanted:
                old.unlink()
    table = _write_tsv(rows, group / "images.tsv")
    columns = {name: {"Description": COLUMN_DESCRIPTIONS[name]} for name in TSV_COLUMNS}
    _write_text(group / "images.json", json.dumps(columns, indent=2, sort_keys=True) + "\n")
    page = _write_text(group / "report.html",
                       _html_report(description, images, rows, figures, problems))
    return GroupReport(table, page, len(images), len({i.label for i in images}), tuple(problems))
