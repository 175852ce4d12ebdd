"""The group report's HTML page (one self-contained file beside ``images.tsv``), and the
headings of sweep strips.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .._version import __version__
from ..conditioning import CONDITIONING_ORDER

if TYPE_CHECKING:  # pragma: no cover
    from .report import GeneratedImage

__all__ = [
    "html_report",
    "sweep_label",
    "sweep_title",
]


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


def html_report(description: Mapping[str, Any], images: Sequence[GeneratedImage],
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
            caption = (f"{sweep_title(members)}: {len(members)} images ordered by the swept "
                       "value, same starting noise; middle slices, one grey scale")
            out.append(
                f'<figure><img src="{_e(png)}" loading="lazy" alt="sweep {_e(key)}">'
                f"<figcaption>{_e(caption)}</figcaption></figure>"
            )
        out.append("</section>")
    out += ["</body>", "</html>"]
    return "\n".join(out) + "\n"


def sweep_label(image: GeneratedImage) -> str:
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


def sweep_title(members: Sequence[GeneratedImage]) -> str:
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
