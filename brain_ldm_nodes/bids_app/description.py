"""The dataset's own files: ``dataset_description.json`` (GeneratedBy, SourceDatasets by DOI,
``DatasetLinks``), ``README.md`` and ``.bidsignore``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .._version import __version__
from ..imaging import atomic_write, write_json
from ..provenance import REFERENCE
from .errors import OutputDirError
from .naming import GENERATED_BY, GROUP_DIR_NAME, read_sidecar
from .output_dir import counterfactual_sidecars

__all__ = [
    "BIDS_VERSION",
    "CODE_URL",
    "CONTAINER_ENV",
    "README",
    "bare_doi",
    "check_raw_link",
    "dataset_description",
    "raw_dataset_link",
    "read_own_description",
    "write_dataset_files",
]


CODE_URL = "https://github.com/brain-ldm-nodes/brain-ldm-nodes"
BIDS_VERSION = "1.10.0"
#: Environment variables a container image sets to be named in GeneratedBy.Container.
CONTAINER_ENV = {"Type": "BRAIN_LDM_CONTAINER_TYPE", "Tag": "BRAIN_LDM_CONTAINER_TAG"}


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


def read_own_description(output_dir: Path) -> dict[str, Any] | None:
    """The existing ``dataset_description.json`` of ``output_dir``, None if there is none.

    Raises :class:`OutputDirError` if the folder holds another dataset (raw, or a derivative
    of other software) or the file is not a JSON object.
    """
    path = Path(output_dir) / "dataset_description.json"
    if not path.exists():
        return None
    document = read_sidecar(path)
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
