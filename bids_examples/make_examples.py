"""Write the small BIDS datasets in ``bids_examples/`` (run from anywhere; rewrites them).

    python bids_examples/make_examples.py

Every byte is deterministic (gzip mtime 0), so re-running it leaves ``git diff`` empty.
The datasets are described in ``bids_examples/README.md``; the tests in
``tests/test_bids_dataset.py`` pin what reading each one gives.

Images are synthetic 16x16x16 float32 ellipsoids on a 1 mm LAS grid: just enough for
pybids and the BIDS validator, and for code that needs "a T1w file" to open one.
"""

from __future__ import annotations

import gzip
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

HERE = Path(__file__).resolve().parent
BIDS_VERSION = "1.10.0"
SHAPE = (16, 16, 16)

BOM = "\ufeff"

# participants.json entries shared by several datasets
PARTICIPANT_ID = {"Description": "Participant label (sub-<label>)"}
SEX_WORDS = {
    "Description": "Sex of the participant",
    "Levels": {"M": "male", "F": "female"},
}
AGE_YEARS = {"Description": "Age of the participant at the scan", "Units": "year"}
VENTRICLES_NORMALISED = {
    "Description": "Ventricular CSF volume, already normalised to [0, 1] for the Brain LDM",
    "Units": "arbitrary",
}
BRAIN_NORMALISED = {
    "Description": (
        "Grey + white matter volume normalised for head size, already normalised to [0, 1] "
        "for the Brain LDM"
    ),
    "Units": "arbitrary",
}


@dataclass(frozen=True)
class Scan:
    """One image: ``sub-<subject>[/ses-<session>]/anat/..._<suffix>.nii.gz``."""

    subject: str
    suffix: str = "T1w"
    session: str | None = None
    run: int | None = None

    def relative_path(self) -> Path:
        entities = [f"sub-{self.subject}"]
        folder = Path(f"sub-{self.subject}")
        if self.session is not None:
            entities.append(f"ses-{self.session}")
            folder = folder / f"ses-{self.session}"
        if self.run is not None:
            entities.append(f"run-{self.run}")
        return folder / "anat" / ("_".join(entities) + f"_{self.suffix}.nii.gz")


@dataclass(frozen=True)
class Dataset:
    """A dataset: its name, README text, participants files (tsv as exact text) and scans."""

    name: str
    readme: str
    participants_tsv: str
    participants_json: dict
    scans: tuple[Scan, ...]


def _tsv(rows: list[list[str]], newline: str = "\n", bom: bool = False) -> str:
    text = newline.join("\t".join(row) for row in rows) + newline
    return (BOM if bom else "") + text


def _t1w_scans(*subjects: str) -> tuple[Scan, ...]:
    return tuple(Scan(subject) for subject in subjects)


DATASETS: tuple[Dataset, ...] = (
    Dataset(
        name="ds-minimal",
        readme=(
            "Three participants with clean demographics: sex as M/F, age in years, and "
            "both volumes already normalised to [0, 1]. Every participant is usable with "
            "the default configuration."
        ),
        participants_tsv=_tsv(
            [
                ["participant_id", "sex", "age", "ventricular_volume", "brain_volume"],
                ["sub-01", "M", "44", "0.2", "0.4"],
                ["sub-02", "F", "63", "0.5", "0.5"],
                ["sub-03", "F", "82", "0.7", "0.9"],
            ]
        ),
        participants_json={
            "participant_id": PARTICIPANT_ID,
            "sex": SEX_WORDS,
            "age": AGE_YEARS,
            "ventricular_volume": VENTRICLES_NORMALISED,
            "brain_volume": BRAIN_NORMALISED,
        },
        scans=_t1w_scans("01", "02", "03"),
    ),
    Dataset(
        name="ds-messy",
        readme=(
            "A participants.tsv as real spreadsheets export it: UTF-8 byte-order mark, CRLF "
            "line endings, capitalised and space-padded headers ('Gender ', 'Age', 'VCSF', "
            "'Brain_Volume', 'handedness '), padded cells, mixed sex codes (M, f, Male, "
            "female, MALE), ages as ranges ('35-40', '60-66') and open-ended ('89+'), "
            "missing values ('n/a', 'N/A', empty cells) and extra columns that are ignored. "
            "Two ages fall outside the UK Biobank range 44-82 on purpose, so the out-of-range "
            "policy decides what happens to them."
        ),
        participants_tsv=_tsv(
            [
                ["participant_id", "Gender ", "Age", "site", "VCSF", "Brain_Volume", "handedness "],
                ["sub-01", "M", "63", "siteA", "0.31", "0.52", "R"],
                ["sub-02", "f ", "50.5", "siteA", "0.12", "0.61", "L"],
                ["sub-03", "Male", "89+", "siteB", "0.64", "0.33", "R"],
                ["sub-04", " female", "35-40", "siteB", "0.08", "0.71", "n/a"],
                ["sub-05", "M", "60-66", "siteA", "0.45", "0.47", "R"],
                ["sub-06", "F", "n/a", "siteB", "0.22", "0.58", "R"],
                ["sub-07", "", "71", "siteA", "0.5", "0.5", "L"],
                ["sub-08", "MALE", "82.0 ", "siteB", "N/A", "0.4", "R"],
            ],
            newline="\r\n",
            bom=True,
        ),
        participants_json={
            "participant_id": PARTICIPANT_ID,
            "Gender ": {
                "Description": (
                    "Sex of the participant as each site recorded it (M, m, Male, MALE, f, "
                    "female, ...); free text, so no Levels"
                ),
            },
            "Age": {
                "Description": (
                    "Age in years as the sites exported it: a number, a range such as "
                    "35-40, or 89+ for 89 and older; free text, so no Units"
                ),
            },
            "site": {"Description": "Acquisition site"},
            "VCSF": {
                "Description": (
                    "Ventricular CSF volume, already normalised to [0, 1] for the Brain LDM; "
                    "missing values as the sites wrote them (n/a, N/A)"
                ),
            },
            "Brain_Volume": BRAIN_NORMALISED,
            "handedness ": {
                "Description": "Handedness",
                "Levels": {"R": "right", "L": "left"},
            },
        },
        scans=_t1w_scans(*(f"{index:02d}" for index in range(1, 9))),
    ),
    Dataset(
        name="ds-numeric-sex",
        readme=(
            "Sex coded as numbers (1, 2, 3). Numeric codes differ between datasets, so "
            "participants.json says what they mean with Levels: 1 = male, 2 = female, "
            "3 = other. Codes 1 and 2 map through those descriptions; code 3 ('other') "
            "cannot be expressed by the Brain LDM's sex value (0 = female, 1 = male), so "
            "sub-04 is skipped with a reason."
        ),
        participants_tsv=_tsv(
            [
                ["participant_id", "sex", "age", "ventricular_volume", "brain_volume"],
                ["sub-01", "1", "50", "0.3", "0.6"],
                ["sub-02", "2", "70", "0.4", "0.5"],
                ["sub-03", "2", "44.0", "0.1", "0.8"],
                ["sub-04", "3", "60", "0.2", "0.7"],
            ]
        ),
        participants_json={
            "participant_id": PARTICIPANT_ID,
            "sex": {
                "Description": "Sex of the participant, coded as a number",
                "Levels": {"1": "male", "2": "female", "3": "other"},
            },
            "age": AGE_YEARS,
            "ventricular_volume": VENTRICLES_NORMALISED,
            "brain_volume": BRAIN_NORMALISED,
        },
        scans=_t1w_scans("01", "02", "03", "04"),
    ),
    Dataset(
        name="ds-mismatch",
        readme=(
            "participants.tsv and the subject folders disagree: sub-04 has a row but no "
            "folder, sub-03 has a folder but no row. Readers report both and carry on with "
            "sub-01 and sub-02. (The BIDS validator reports this as PARTICIPANT_ID_MISMATCH; "
            "that is the point of this dataset.)"
        ),
        participants_tsv=_tsv(
            [
                ["participant_id", "sex", "age", "ventricular_volume", "brain_volume"],
                ["sub-01", "F", "57", "0.25", "0.5"],
                ["sub-02", "M", "76", "0.6", "0.35"],
                ["sub-04", "F", "48", "0.15", "0.65"],
            ]
        ),
        participants_json={
            "participant_id": PARTICIPANT_ID,
            "sex": SEX_WORDS,
            "age": AGE_YEARS,
            "ventricular_volume": VENTRICLES_NORMALISED,
            "brain_volume": BRAIN_NORMALISED,
        },
        scans=_t1w_scans("01", "02", "03"),
    ),
    Dataset(
        name="ds-volumes-mm3",
        readme=(
            "Volumes in mm^3 under project-specific column names (vcsf_mm3, "
            "brain_volume_mm3). The Brain LDM expects them in [0, 1] and the upstream "
            "mm^3 -> [0, 1] mapping is unpublished, so reading this dataset needs a config "
            "that names the columns and gives reference ranges: "
            "../ds-volumes-mm3.config.json (min-max over illustrative ranges, an "
            "approximation; out_of_range = clip). sub-03's ventricles lie above the range "
            "and are clipped to 1."
        ),
        participants_tsv=_tsv(
            [
                ["participant_id", "sex", "age", "vcsf_mm3", "brain_volume_mm3"],
                ["sub-01", "F", "55", "30000", "1400000"],
                ["sub-02", "M", "70", "55000", "1250000"],
                ["sub-03", "M", "81", "120000", "1160000"],
            ]
        ),
        participants_json={
            "participant_id": PARTICIPANT_ID,
            "sex": SEX_WORDS,
            "age": AGE_YEARS,
            "vcsf_mm3": {
                "Description": "Ventricular CSF volume (as UK Biobank field 25004)",
                "Units": "mm^3",
            },
            "brain_volume_mm3": {
                "Description": (
                    "Grey + white matter volume normalised for head size "
                    "(as UK Biobank field 25009)"
                ),
                "Units": "mm^3",
            },
        },
        scans=_t1w_scans("01", "02", "03"),
    ),
    Dataset(
        name="ds-sessions",
        readme=(
            "Sessions and runs, for finding each participant's T1w images: sub-01 has a T1w "
            "in ses-1 and ses-2, sub-02 has two T1w runs in ses-1, sub-03 has only a T2w. "
            "Column names use the other default aliases: gender, AGE, ventricular_csf_volume, "
            "brain_volume_norm (values already normalised)."
        ),
        participants_tsv=_tsv(
            [
                ["participant_id", "gender", "AGE", "ventricular_csf_volume", "brain_volume_norm"],
                ["sub-01", "female", "52", "0.35", "0.55"],
                ["sub-02", "male", "67", "0.5", "0.45"],
                ["sub-03", "male", "74", "0.55", "0.4"],
            ]
        ),
        participants_json={
            "participant_id": PARTICIPANT_ID,
            "gender": {
                "Description": "Sex of the participant",
                "Levels": {"male": "male", "female": "female"},
            },
            "AGE": AGE_YEARS,
            "ventricular_csf_volume": VENTRICLES_NORMALISED,
            "brain_volume_norm": BRAIN_NORMALISED,
        },
        scans=(
            Scan("01", session="1"),
            Scan("01", session="2"),
            Scan("02", session="1", run=1),
            Scan("02", session="1", run=2),
            Scan("03", suffix="T2w", session="1"),
        ),
    ),
)

CONFIGS: dict[str, dict] = {
    "ds-volumes-mm3.config.json": {
        "columns": {
            "ventricular_volume": ["vcsf_mm3"],
            "brain_volume": ["brain_volume_mm3"],
        },
        "policy": {
            "ventricular_volume_range_mm3": [5000, 105000],
            "brain_volume_range_mm3": [1100000, 1700000],
            "out_of_range": "clip",
        },
    },
}


def _image(index: int) -> bytes:
    """A gzipped 16^3 float32 NIfTI: an ellipsoid whose size depends on ``index``."""
    grid = np.stack(np.meshgrid(*(np.arange(n) - (n - 1) / 2 for n in SHAPE), indexing="ij"))
    radii = np.array([5.0, 6.5, 5.5]) + 0.25 * (index % 4)
    distance = np.sqrt((((grid.T / radii).T) ** 2).sum(axis=0))
    data = np.clip(1.2 - distance, 0.0, 1.0).astype(np.float32)
    affine = np.diag([-1.0, 1.0, 1.0, 1.0])  # 1 mm LAS
    affine[:3, 3] = [(SHAPE[0] - 1) / 2, -(SHAPE[1] - 1) / 2, -(SHAPE[2] - 1) / 2]
    image = nib.Nifti1Image(data, affine)
    image.header.set_xyzt_units("mm", "sec")
    image.header.set_qform(affine, code=1)
    image.header.set_sform(affine, code=1)
    return gzip.compress(image.to_bytes(), mtime=0)


def _json_text(data: dict) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def write_dataset(dataset: Dataset, parent: Path = HERE) -> Path:
    """(Re)write one dataset under ``parent``; returns its root."""
    root = parent / dataset.name
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    description = {
        "Name": f"brain-ldm-nodes example {dataset.name}",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "raw",
        "License": "CC0",
        "Authors": ["brain-ldm-nodes developers"],
        "GeneratedBy": [{"Name": "brain-ldm-nodes bids_examples/make_examples.py"}],
    }
    (root / "dataset_description.json").write_text(_json_text(description), encoding="utf-8")
    readme = (
        f"# {dataset.name}\n\nSynthetic example dataset for brain-ldm-nodes. {dataset.readme}\n"
    )
    (root / "README.md").write_text(readme, encoding="utf-8")
    # newline="" keeps the exact line endings (ds-messy has CRLF on purpose)
    with open(root / "participants.tsv", "w", encoding="utf-8", newline="") as handle:
        handle.write(dataset.participants_tsv)
    (root / "participants.json").write_text(
        _json_text(dataset.participants_json), encoding="utf-8"
    )
    for index, scan in enumerate(dataset.scans):
        path = root / scan.relative_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_image(index))
    return root


def main() -> None:
    for dataset in DATASETS:
        root = write_dataset(dataset)
        print(f"wrote {root.relative_to(HERE.parent)}")
    for name, config in CONFIGS.items():
        (HERE / name).write_text(_json_text(config), encoding="utf-8")
        print(f"wrote {(HERE / name).relative_to(HERE.parent)}")


if __name__ == "__main__":
    main()
