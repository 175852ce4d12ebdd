"""``brain-ldm-bids`` on participants tables as public BIDS datasets have them.

The tables below are written here, in the shapes seen in public datasets (OpenNeuro and
similar): no volume columns, ages under ``Age (years)`` or ``age_at_first_scan_years`` with
values from 18 to 90, ``n/a`` and ``89+`` cells, sex as ``gender`` M/F or numeric codes
explained by ``participants.json`` Levels, padded cells, a participant_id without ``sub-``,
a UTF-8 BOM and CRLF line ends. What a run must do is worked out by hand from each table:
an image for every participant with a usable sex and an age in 44-82 y by default, and with
``--out-of-range clip`` for the others with a usable sex and age too; one line per skipped
participant naming the row and the reason; a summary grouped by reason.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from brain_ldm_nodes.bids_app.columns import default_column_rank
from brain_ldm_nodes.bids_app.errors import BidsDatasetError
from brain_ldm_nodes.bids_app.participants import read_participants
from brain_ldm_nodes.bids_app.report import write_group_report

from bids_app_support import app, validator_errors
from test_interfaces import STEPS

# --------------------------------------------------------------------------- the tables

GENDER_TABLE = [  # participant_id, Age (years), gender, handedness, site
    ("sub-01", "23.5", "M", "right", "A"),
    ("sub-02", "45", "F", "right", "A"),
    ("sub-03", "n/a", "F", "left", "B"),
    ("sub-04", "63", "m", "right", "B"),
    ("sub-05", "89+", "F", "n/a", "A"),
    ("sub-06", "82", "M", "right", "A"),
    ("sub-07", "44", " F ", "right", "B"),
    ("sub-08", "18", "M", "right", "B"),
    ("sub-09", "70", "n/a", "right", "A"),
    ("sub-10", "90", "F", "right", "B"),
    ("11", "55", "F", "left", "A"),  # no "sub-" prefix
]
# by hand: sex and age usable, age in 44-82 y
GENDER_IN_RANGE = {"02": (0.0, 1 / 38), "04": (1.0, 19 / 38), "06": (1.0, 1.0),
                   "07": (0.0, 0.0), "11": (0.0, 11 / 38)}
GENDER_CLIPPED = {"01": (1.0, 0.0), "05": (0.0, 1.0), "08": (1.0, 0.0), "10": (0.0, 1.0)}
GENDER_UNUSABLE = {"03": "column 'Age (years)': missing value ('n/a')",
                   "09": "column 'gender': missing value ('n/a')"}

NUMERIC_TABLE = [  # participant_id, age_at_first_scan_years, sex, group
    ("sub-A01", "50", "1", "control"),
    ("sub-A02", "47.2", "2", "patient"),
    ("sub-A03", "30", "2", "control"),
    ("sub-A04", "76", "1", "patient"),
    ("sub-A05", "", "1", "control"),
]
NUMERIC_IN_RANGE = {"A01": (1.0, 6 / 38), "A02": (0.0, 3.2 / 38), "A04": (1.0, 32 / 38)}


def write_dataset(root: Path, header: tuple[str, ...], rows: list[tuple[str, ...]],
                  sidecar: dict, *, bom_crlf: bool = False) -> Path:
    """A dataset with this participants table and a 16^3 T1w per participant."""
    import nibabel as nib
    import numpy as np

    root.mkdir(parents=True)
    (root / "dataset_description.json").write_text(json.dumps(
        {"Name": root.name, "BIDSVersion": "1.8.0", "DatasetDOI": "n/a"}))
    newline = "\r\n" if bom_crlf else "\n"
    text = newline.join("\t".join(cells) for cells in [header, *rows]) + newline
    (root / "participants.tsv").write_bytes((b"\xef\xbb\xbf" if bom_crlf else b"")
                                            + text.encode("utf-8"))
    (root / "participants.json").write_text(json.dumps(sidecar))
    for row in rows:
        label = row[0].removeprefix("sub-")
        anat = root / f"sub-{label}" / "anat"
        anat.mkdir(parents=True)
        image = nib.Nifti1Image(np.zeros((16, 16, 16), np.float32), np.eye(4))
        nib.save(image, anat / f"sub-{label}_T1w.nii.gz")
    return root


def gender_dataset(root: Path) -> Path:
    return write_dataset(
        root, ("participant_id", "Age (years)", "gender", "handedness", "site"), GENDER_TABLE,
        {"Age (years)": {"Description": "age at scan", "Units": "year"},
         "gender": {"Description": "self-reported", "Levels": {"M": "male", "F": "female"}}},
        bom_crlf=True)


def numeric_dataset(root: Path) -> Path:
    return write_dataset(
        root, ("participant_id", "age_at_first_scan_years", "sex", "group"), NUMERIC_TABLE,
        {"sex": {"Levels": {"1": "male participant", "2": "female participant"}}})


# --------------------------------------------------------------------------- runs


@pytest.fixture(scope="module", autouse=True)
def app_environment(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.delenv("BRAIN_LDM_MODEL", raising=False)
        yield


def participant(dataset: Path, out: Path, model: Path, *extra: object):
    return app(dataset, out, "participant", "--model", model, "--num-inference-steps", STEPS,
               *extra)


def made(out: Path) -> dict[str, list[float]]:
    """label -> conditioning values of its synthetic image."""
    found = {}
    for sidecar in sorted(out.glob("sub-*/anat/*_desc-synthetic_T1w.json")):
        document = json.loads(sidecar.read_text())
        found[sidecar.name.split("_")[0][4:]] = document["Conditioning"]["Values"]
    return found


def lines_with(text: str, output: str) -> list[str]:
    return [line for line in output.splitlines() if text in line]


def test_gender_table_without_volumes_default_run_then_clip(tmp_path, tiny_model):
    dataset = gender_dataset(tmp_path / "ds-gender")
    out = tmp_path / "out"
    done = participant(dataset, out, tiny_model)
    assert done.code == 0, done.err
    assert done.err == ""

    # an image for exactly the participants with a usable sex and an age in 44-82 y
    images = made(out)
    assert set(images) == set(GENDER_IN_RANGE)
    for label, (sex, age) in GENDER_IN_RANGE.items():
        assert images[label] == pytest.approx([sex, age, 0.2, 0.4]), label

    # the volume defaults are said once, and recorded in every sidecar with the column used
    assert len(lines_with("has no ventricular_volume or brain_volume column", done.out)) == 1
    assert "all participants get the MONAI bundle's defaults 0.2 and 0.4 (recorded" in done.out
    sidecar = json.loads((out / "sub-02/anat/sub-02_desc-synthetic_T1w.json").read_text())
    derivation = sidecar["Conditioning"]["Derivation"]
    for name, value in (("ventricular_volume", 0.2), ("brain_volume", 0.4)):
        assert derivation[name]["defaulted"] is True and derivation[name]["value"] == value
        assert derivation[name]["why"] == f"participants.tsv has no {name} column"
    assert sidecar["Demographics"]["Columns"]["age"] == "Age (years)"
    assert sidecar["Demographics"]["Columns"]["sex"] == "gender"

    # one line per skipped participant, naming its row and reason
    skipped = {"01": "23.5 years normalises to", "03": GENDER_UNUSABLE["03"],
               "05": "89 years normalises to", "08": "18 years normalises to",
               "09": GENDER_UNUSABLE["09"], "10": "90 years normalises to"}
    for label, reason in skipped.items():
        row = [r[0].removeprefix("sub-") for r in GENDER_TABLE].index(label) + 2
        found = lines_with(f"skipped sub-{label}: participants.tsv row {row} (sub-{label})",
                           done.out)
        assert len(found) == 1 and reason in found[0], (label, found)

    # and a summary grouped by reason, each group with what would include it
    summary = done.out[done.out.index("summary:"):]
    assert "5 images written" in summary and "6 participants skipped" in summary
    assert ("2 participants younger than 44 y (training range 44–82 y): --out-of-range clip "
            "samples them at the range edge (recorded)") in summary
    assert "2 participants older than 82 y (training range 44–82 y): --out-of-range clip" \
        in summary
    assert "1 participant without an age (n/a or empty)" in summary
    assert "1 participant without a sex (n/a or empty)" in summary
    assert "skipped sub-" not in summary
    reported = [line[9:] for line in done.out.splitlines()
                if "skipped sub-" in line or "note:" in line or line[9:].startswith("  ")]
    assert reported and all(len(line) <= 200 for line in reported), reported

    # the source's DatasetDOI "n/a" names no source DOI
    description = json.loads((out / "dataset_description.json").read_text())
    assert "SourceDatasets" not in description
    assert validator_errors(out) == []

    # --out-of-range clip: also the others with a usable sex and age, at the range edge
    clip = participant(dataset, out, tiny_model, "--out-of-range", "clip")
    assert clip.code == 0, clip.err
    images = made(out)
    assert set(images) == set(GENDER_IN_RANGE) | set(GENDER_CLIPPED)
    for label, (sex, age) in GENDER_CLIPPED.items():
        assert images[label] == pytest.approx([sex, age, 0.2, 0.4]), label
    record = json.loads((out / "sub-05/anat/sub-05_desc-synthetic_T1w.json").read_text())
    age = record["Conditioning"]["Derivation"]["age"]
    assert age["clipped"] and age["unclipped_value"] == pytest.approx(45 / 38)
    summary = clip.out[clip.out.index("summary:"):]
    assert "4 images written, 0 already complete, 5 sidecars updated" in summary  # policy
    assert "2 participants skipped" in summary
    assert "4 participants sampled at a range edge" in summary
    assert "younger than" not in summary and "older than" not in summary

    report = write_group_report(out)
    assert report.n_images == 9 and report.n_participants == 9


def test_numeric_sex_with_levels_and_age_at_first_scan_years(tmp_path, tiny_model):
    dataset = numeric_dataset(tmp_path / "ds-numeric")
    out = tmp_path / "out"
    done = participant(dataset, out, tiny_model, "--volume-defaults", "0.3", "0.5")
    assert done.code == 0, done.err
    images = made(out)
    assert set(images) == set(NUMERIC_IN_RANGE)
    for label, (sex, age) in NUMERIC_IN_RANGE.items():
        assert images[label] == pytest.approx([sex, age, 0.3, 0.5]), label
    assert "participants.tsv columns: sex 'sex', age 'age_at_first_scan_years'" in done.out
    assert "all participants get the set defaults 0.3 and 0.5 (recorded" in done.out
    sidecar = json.loads((out / "sub-A01/anat/sub-A01_desc-synthetic_T1w.json").read_text())
    brain = sidecar["Conditioning"]["Derivation"]["brain_volume"]
    assert brain["default_source"] == "configured default" and brain["value"] == 0.5
    summary = done.out[done.out.index("summary:"):]
    assert "1 participant younger than 44 y" in summary
    assert "1 participant without an age (n/a or empty)" in summary


def test_missing_volumes_error_refuses_a_table_without_volume_columns(tmp_path, tiny_model):
    dataset = numeric_dataset(tmp_path / "ds-numeric")
    done = participant(dataset, tmp_path / "out", tiny_model, "--missing-volumes", "error")
    assert done.code == 1
    [line] = done.err.splitlines()
    assert "participants.tsv: no column for ventricular_volume" in line
    assert "--missing-volumes default takes the bundle defaults" in line
    assert not (tmp_path / "out").exists()


def test_flags_override_the_demographics_config(tmp_path, tiny_model):
    dataset = numeric_dataset(tmp_path / "ds-numeric")
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"policy": {"out_of_range": "error",
                                             "missing_volumes": "error"}}))
    done = participant(dataset, tmp_path / "out", tiny_model, "--demographics-config", config,
                       "--out-of-range", "clip", "--missing-volumes", "default")
    assert done.code == 0, done.err
    assert set(made(tmp_path / "out")) == {"A01", "A02", "A03", "A04"}


# --------------------------------------------------------------------------- the column rule


@pytest.mark.parametrize("column", [
    "age", "Age", "AGE", "Age (years)", "age_years", "age-years", "Age in years",
    "age_at_first_scan_years", "age_at_scan", "Age at MRI (y)", "participant_age",
    "age_at_scan_1",
])
def test_age_column_variants_are_read(column):
    assert default_column_rank("age", column) == 0


@pytest.mark.parametrize("column", [
    "age_months", "Age (months)", "age_at_onset", "age_group", "page", "stage", "agency",
    "mother_age_at_birth", "age_at_scan_date",
])
def test_columns_that_are_not_an_age_in_years_are_not_read_as_one(column):
    assert default_column_rank("age", column) is None


@pytest.mark.parametrize("column, rank", [
    ("sex", 0), ("Sex (M/F)", 0), ("biological_sex", 0), ("Sex at birth", 0), ("SEX", 0),
    ("gender", 1), ("Gender ", 1), ("gender_identity", None), ("sexual_orientation", None),
])
def test_sex_column_variants(column, rank):
    assert default_column_rank("sex", column) == rank


def _table_dataset(root: Path, header: list[str], rows: list[list[str]]) -> Path:
    root.mkdir()
    (root / "dataset_description.json").write_text('{"Name": "t", "BIDSVersion": "1.8.0"}')
    (root / "participants.tsv").write_text(
        "\n".join("\t".join(cells) for cells in [header, *rows]) + "\n")
    for row in rows:
        (root / row[0] / "anat").mkdir(parents=True)
        (root / row[0] / "anat" / f"{row[0]}_T1w.nii.gz").write_bytes(b"")
    return root


def test_two_age_columns_are_an_error_naming_both(tmp_path):
    root = _table_dataset(tmp_path / "ds", ["participant_id", "sex", "age", "Age (years)"],
                          [["sub-01", "F", "50", "50"]])
    with pytest.raises(BidsDatasetError) as info:
        read_participants(root)
    message = str(info.value)
    assert "columns 'age' and 'Age (years)' could each be the age" in message
    assert '"columns": {"age": ["age"]}' in message
    assert len(message.replace(str(root), "")) <= 200


def test_sex_is_preferred_to_gender_and_the_choice_is_recorded(tmp_path):
    root = _table_dataset(tmp_path / "ds", ["participant_id", "gender", "Sex (M/F)", "age"],
                          [["sub-01", "F", "M", "50"]])
    table = read_participants(root)
    assert table.columns["sex"] == "Sex (M/F)" and table["01"].conditioning.values[0] == 1.0


def test_refusal_of_a_wide_table_without_an_age_is_one_short_line(tmp_path):
    header = ["participant_id", "sex", *[f"measure_{i}" for i in range(90)], "age_months"]
    root = _table_dataset(tmp_path / "ds", header,
                          [["sub-01", "F", *["1"] * 90, "600"]])
    with pytest.raises(BidsDatasetError) as info:
        read_participants(root)
    message = str(info.value).replace(str(root / "participants.tsv"), "participants.tsv")
    assert message.startswith("participants.tsv: no column for age (age, age_at_<scan...>, "
                              "in years); similar: 'age_months'; name yours in "
                              '--demographics-config "columns"')
    assert "measure_" not in message and len(message) <= 200


def test_realistic_cells_bom_crlf_and_ids_without_prefix(tmp_path):
    root = gender_dataset(tmp_path / "ds-gender")
    table = read_participants(root)
    assert [p.label for p in table.usable] == sorted(GENDER_IN_RANGE)
    assert table["11"].row == 12 and table["07"].raw["gender"] == "F"
    assert re.match(r"participants\.tsv row 4 \(sub-03\), column 'Age \(years\)'",
                    table["03"].skip_reason)


@pytest.mark.parametrize("header, rows", [
    (["participant_id", "sex", "age"],  # 60 duplicated ids
     [[f"sub-{i:02d}", "F", "50"] for i in range(60)] * 2),
    (["participant_id", "sex", "age"],  # numeric codes nobody explains
     [[f"sub-{i:02d}", str(i % 9), "50"] for i in range(60)]),
    ([f"col_{i}" for i in range(90)],  # no participant_id among 90 columns
     [["1"] * 90]),
])
def test_whole_table_refusals_stay_short(tmp_path, header, rows):
    root = tmp_path / "ds"
    root.mkdir()
    (root / "dataset_description.json").write_text('{"Name": "t", "BIDSVersion": "1.8.0"}')
    (root / "participants.tsv").write_text(
        "\n".join("\t".join(cells) for cells in [header, *rows]) + "\n")
    (root / "sub-00" / "anat").mkdir(parents=True)
    (root / "sub-00" / "anat" / "sub-00_T1w.nii.gz").write_bytes(b"")
    with pytest.raises(BidsDatasetError) as info:
        read_participants(root)
    message = str(info.value).replace(str(root / "participants.tsv"), "participants.tsv")
    assert message.startswith("participants.tsv: ") and len(message) <= 200, message
