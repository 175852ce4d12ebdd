"""Tests for the BIDS App's reading side (brain_ldm_nodes.bids_app: dataset, participants,
columns): the example datasets, and bad or odd participants files."""

from __future__ import annotations

import functools
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from brain_ldm_nodes.bids_app.columns import DEFAULT_COLUMN_ALIASES, BidsConfig
from brain_ldm_nodes.bids_app.dataset import find_t1w_images, load_layout
from brain_ldm_nodes.bids_app.errors import BidsConfigError, BidsDatasetError
from brain_ldm_nodes.bids_app.participants import (
    MAX_PARTICIPANTS_TSV_BYTES,
    ParticipantsTable,
    read_participants,
)
from brain_ldm_nodes.demographics import DemographicsError, DemographicsPolicy

EXAMPLES = Path(__file__).resolve().parents[1] / "bids_examples"
HEADER = "participant_id\tsex\tage\tventricular_volume\tbrain_volume"


@functools.lru_cache(maxsize=None)
def _example_layout(name: str):
    return load_layout(EXAMPLES / name)


def _read_example(name: str, config: BidsConfig | None = None, **kwargs) -> ParticipantsTable:
    return read_participants(EXAMPLES / name, config, layout=_example_layout(name), **kwargs)


def _values(table: ParticipantsTable, label: str) -> tuple[float, ...]:
    conditioning = table[label].conditioning
    assert conditioning is not None, table[label].skip_reason
    return conditioning.values


def _policy_config(**policy) -> BidsConfig:
    return BidsConfig(policy=DemographicsPolicy(**policy))


def _dataset(
    root: Path,
    tsv: str | bytes | None,
    *,
    subjects: tuple[str, ...] = ("01", "02", "03"),
    participants_json: dict | str | None = None,
    description: dict | str | None = None,
) -> Path:
    """A tiny dataset: description, participants files and empty-named T1w files."""
    root.mkdir(parents=True, exist_ok=True)
    if description is None:
        description = {"Name": "test", "BIDSVersion": "1.10.0"}
    if description != "absent":
        text = description if isinstance(description, str) else json.dumps(description)
        (root / "dataset_description.json").write_text(text, encoding="utf-8")
    if tsv is not None:
        path = root / "participants.tsv"
        path.write_bytes(tsv if isinstance(tsv, bytes) else tsv.encode("utf-8"))
    if participants_json is not None:
        text = (
            participants_json
            if isinstance(participants_json, str)
            else json.dumps(participants_json)
        )
        (root / "participants.json").write_text(text, encoding="utf-8")
    for label in subjects:
        anat = root / f"sub-{label}" / "anat"
        anat.mkdir(parents=True, exist_ok=True)
        (anat / f"sub-{label}_T1w.nii.gz").write_bytes(b"")
    return root


def _tsv(*rows: str, header: str = HEADER) -> str:
    return "\n".join((header, *rows)) + "\n"


CLEAN_ROWS = ("sub-01\tM\t63\t0.2\t0.3", "sub-02\tF\t44\t0.4\t0.5", "sub-03\tF\t82\t0.6\t0.7")


# =========================================================================== example datasets


def test_ds_minimal_gives_the_hand_computed_conditioning_for_all_three():
    table = _read_example("ds-minimal")
    assert table.labels == ("01", "02", "03")
    assert not table.skipped and not table.problems
    assert _values(table, "01") == (1.0, 0.0, 0.2, 0.4)  # M, 44 y -> 0
    assert _values(table, "sub-02") == (0.0, 0.5, 0.5, 0.5)  # F, 63 y -> (63-44)/38
    assert _values(table, "03") == (0.0, 1.0, 0.7, 0.9)  # F, 82 y -> 1
    assert table["02"].row == 3
    assert dict(table["02"].raw) == {
        "sex": "F", "age": "63", "ventricular_volume": "0.5", "brain_volume": "0.5"
    }
    assert table.tsv_path == EXAMPLES.resolve() / "ds-minimal" / "participants.tsv"


def test_ds_messy_reads_bom_crlf_padded_headers_and_mixed_sex_codes():
    table = _read_example("ds-messy")
    assert dict(table.columns) == {
        "sex": "Gender", "age": "Age", "ventricular_volume": "VCSF",
        "brain_volume": "Brain_Volume",
    }
    assert _values(table, "01") == (1.0, 0.5, 0.31, 0.52)
    assert _values(table, "02") == pytest.approx((0.0, 6.5 / 38, 0.12, 0.61))  # 'f ', 50.5 y
    assert _values(table, "05") == (1.0, 0.5, 0.45, 0.47)  # '60-66' -> midpoint 63
    assert table["05"].conditioning.record["age"]["how"] == "range_midpoint"
    # extra columns (site, handedness) are not among the raw values used
    assert dict(table["01"].raw) == {
        "Gender": "M", "Age": "63", "VCSF": "0.31", "Brain_Volume": "0.52"
    }
    assert [p.label for p in table.usable] == ["01", "02", "05", "08"]  # 08: VCSF N/A


def test_ds_messy_ages_outside_44_82_are_skipped_under_the_default_error_policy():
    table = _read_example("ds-messy")
    assert table["03"].skip_reason == (
        "participants.tsv row 4 (sub-03), column 'Age' ('89+'): 89 years normalises to "
        "1.184 (range 44-82 y), outside [0, 1] (out_of_range 'clip' or 'allow' would use it)"
    )
    assert table["04"].skip_reason.startswith(
        "participants.tsv row 5 (sub-04), column 'Age' ('35-40'): 37.5 years normalises "
        "to -0.1711"
    )


def test_ds_messy_clip_policy_clips_89_plus_to_1_and_35_40_to_0():
    table = _read_example("ds-messy", _policy_config(out_of_range="clip"))
    assert _values(table, "03") == (1.0, 1.0, 0.64, 0.33)
    assert _values(table, "04") == (0.0, 0.0, 0.08, 0.71)
    age_03 = table["03"].conditioning.record["age"]
    assert age_03["how"] == "open_ended_lower_bound" and age_03["age_years"] == 89
    assert age_03["clipped"] and age_03["unclipped_value"] == pytest.approx(45 / 38)
    assert table["04"].conditioning.record["age"]["unclipped_value"] == pytest.approx(-6.5 / 38)


def test_ds_messy_allow_policy_extrapolates_outside_0_1():
    table = _read_example("ds-messy", _policy_config(out_of_range="allow"))
    assert _values(table, "03")[1] == pytest.approx(45 / 38)  # 1.184
    assert _values(table, "04")[1] == pytest.approx(-6.5 / 38)
    assert table["03"].conditioning.record["age"]["extrapolated"]


def test_ds_messy_missing_values_skip_without_defaults_and_use_bundle_defaults_with_them():
    table = _read_example("ds-messy")
    assert table["06"].skip_reason == (
        "participants.tsv row 7 (sub-06), column 'Age': missing value ('n/a') and no "
        "default configured (provide it, or set defaults['age'] in the demographics policy)"
    )
    assert table["06"].skip_kind == "age_missing"
    assert "row 8 (sub-07), column 'Gender': missing value" in table["07"].skip_reason
    assert table["07"].skip_kind == "sex_missing"
    # a missing volume cell takes the bundle default, recorded with the row and cell
    assert _values(table, "08") == (1.0, 1.0, 0.2, 0.4)
    vcsf = table["08"].conditioning.record["ventricular_volume"]
    assert vcsf["defaulted"] and vcsf["value"] == 0.2
    assert vcsf["why"] == "participants.tsv row 9 (sub-08), column 'VCSF' is 'N/A'"
    strict = _read_example("ds-messy", _policy_config(missing_volumes="error"))
    assert "row 9 (sub-08), column 'VCSF': missing value ('N/A')" in strict["08"].skip_reason
    assert strict["08"].skip_kind == "volume_missing"

    defaults = read_participants(
        EXAMPLES / "ds-messy",
        BidsConfig(policy=DemographicsPolicy.bundle_defaults()),
        layout=_example_layout("ds-messy"),
    )
    assert _values(defaults, "06") == (0.0, 0.1, 0.22, 0.58)
    assert _values(defaults, "07") == (0.0, (71 - 44) / 38, 0.5, 0.5)
    assert _values(defaults, "08") == (1.0, 1.0, 0.2, 0.4)
    assert defaults["06"].conditioning.record["age"]["defaulted"]


def test_ds_numeric_sex_maps_codes_through_participants_json_levels():
    table = _read_example("ds-numeric-sex")
    assert _values(table, "01") == pytest.approx((1.0, 6 / 38, 0.3, 0.6))  # 1 = male
    assert _values(table, "02") == pytest.approx((0.0, 26 / 38, 0.4, 0.5))  # 2 = female
    assert _values(table, "03") == (0.0, 0.0, 0.1, 0.8)
    assert table.policy.sex_codes["1"] == 1.0 and table.policy.sex_codes["2"] == 0.0
    assert table["04"].skip_reason == (
        "participants.tsv row 5 (sub-04), column 'sex': unknown code '3' (accepted: 1, 2, f, "
        "female, m, male, man, w, woman); participants.json Levels describe '3' as 'other', "
        "which is neither female nor male"
    )


def test_ds_numeric_sex_accepts_a_config_mapping_that_agrees_with_the_levels():
    config = _policy_config(sex_codes={"1": 1, "2": 0, "m": 1, "f": 0})
    assert _values(_read_example("ds-numeric-sex", config), "02")[0] == 0.0


def test_ds_mismatch_reports_the_row_without_folder_and_the_folder_without_row():
    table = _read_example("ds-mismatch")
    assert table.labels == ("01", "02", "03", "04")
    assert [p.label for p in table.usable] == ["01", "02"]
    assert table["03"].skip_reason == (
        "sub-03: no row in participants.tsv (add one with its sex and age)"
    )
    assert table["03"].row is None and not table["03"].raw
    assert table["04"].skip_reason == (
        "participants.tsv row 4 (sub-04): folder sub-04/ does not exist"
    )
    assert table["04"].raw["age"] == "48"


def test_ds_volumes_mm3_without_its_config_uses_the_bundle_volume_defaults():
    table = _read_example("ds-volumes-mm3")  # its columns vcsf_mm3, brain_volume_mm3 unnamed
    assert table.columns["ventricular_volume"] is None and table.columns["brain_volume"] is None
    assert [_values(table, label)[2:] for label in table.labels] == [(0.2, 0.4)] * 3
    record = table["01"].conditioning.record["brain_volume"]
    assert record["why"] == "participants.tsv has no brain_volume column"


def test_ds_volumes_mm3_with_missing_volumes_error_is_refused_in_one_short_line():
    with pytest.raises(BidsDatasetError) as info:
        _read_example("ds-volumes-mm3", _policy_config(missing_volumes="error"))
    message = str(info.value)
    assert "ds-volumes-mm3/participants.tsv: no column for ventricular_volume" in message
    assert "(ventricular_volume, vcsf...)" in message
    assert "brain_volume (brain_volume...)" in message
    assert "similar: 'vcsf_mm3', 'brain_volume_mm3'" in message
    assert "--missing-volumes default" in message
    assert len(message.split("participants.tsv", 1)[1]) <= 200


def test_ds_volumes_mm3_with_its_shipped_config_min_max_scales_and_clips():
    config = BidsConfig.from_json(EXAMPLES / "ds-volumes-mm3.config.json")
    table = _read_example("ds-volumes-mm3", config)
    assert _values(table, "01") == pytest.approx((0.0, 11 / 38, 0.25, 0.5))
    assert _values(table, "02") == pytest.approx((1.0, 26 / 38, 0.5, 0.25))
    assert _values(table, "03") == pytest.approx((1.0, 37 / 38, 1.0, 0.1))
    ventricles = table["03"].conditioning.record["ventricular_volume"]
    assert ventricles["clipped"] and ventricles["unclipped_value"] == pytest.approx(1.15)
    assert ventricles["approximation"] and ventricles["reference_range_mm3"] == [5000, 105000]


def test_ds_volumes_mm3_without_reference_ranges_skips_everyone_naming_the_policy_key():
    config = BidsConfig.from_json(EXAMPLES / "ds-volumes-mm3.config.json")
    no_ranges = BidsConfig(columns=config.columns)
    table = _read_example("ds-volumes-mm3", no_ranges)
    assert not table.usable
    reason = table["01"].skip_reason
    assert reason.startswith(
        "participants.tsv row 2 (sub-01), column 'vcsf_mm3': 30000 looks like mm^3"
    )
    assert "ventricular_volume_range_mm3 = [low, high]" in reason


def test_ds_sessions_uses_the_other_default_column_aliases():
    table = _read_example("ds-sessions")
    assert dict(table.columns) == {
        "sex": "gender", "age": "AGE", "ventricular_volume": "ventricular_csf_volume",
        "brain_volume": "brain_volume_norm",
    }
    assert _values(table, "01") == pytest.approx((0.0, 8 / 38, 0.35, 0.55))


def test_find_t1w_images_returns_every_session_and_run_sorted():
    layout = _example_layout("ds-sessions")
    root = EXAMPLES.resolve() / "ds-sessions"
    assert find_t1w_images(layout, "sub-01") == (
        root / "sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz",
        root / "sub-01/ses-2/anat/sub-01_ses-2_T1w.nii.gz",
    )
    assert [p.name for p in find_t1w_images(layout, "02", session="ses-1")] == [
        "sub-02_ses-1_run-1_T1w.nii.gz", "sub-02_ses-1_run-2_T1w.nii.gz"
    ]
    assert find_t1w_images(layout, "01", session="2")[0].name == "sub-01_ses-2_T1w.nii.gz"
    assert find_t1w_images(layout, "03") == ()  # only a T2w


def test_participant_labels_filter_accepts_labels_with_and_without_sub():
    table = _read_example("ds-minimal", participant_labels=["sub-03", "01", "01"])
    assert table.labels == ("01", "03")
    assert _read_example("ds-minimal", participant_labels="sub-02").labels == ("02",)


def test_participant_to_dict_is_json_serialisable():
    table = _read_example("ds-messy")
    encoded = json.loads(json.dumps([p.to_dict() for p in table]))
    assert encoded[0]["participant_id"] == "sub-01"
    assert encoded[0]["conditioning"]["age"] == 0.5
    assert encoded[2]["conditioning"] is None and "89+" in encoded[2]["skip_reason"]


def test_every_example_dataset_is_under_1_mb():
    for dataset in sorted(EXAMPLES.glob("ds-*/")):
        size = sum(f.stat().st_size for f in dataset.rglob("*") if f.is_file())
        assert size < 1_000_000, dataset


def test_examples_match_what_make_examples_writes_byte_for_byte(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("make_examples", EXAMPLES / "make_examples.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "make_examples", module)  # dataclasses look it up
    spec.loader.exec_module(module)
    for dataset in module.DATASETS:
        fresh = module.write_dataset(dataset, tmp_path)
        committed = EXAMPLES / dataset.name
        fresh_files = sorted(p.relative_to(fresh) for p in fresh.rglob("*") if p.is_file())
        assert fresh_files == sorted(
            p.relative_to(committed) for p in committed.rglob("*") if p.is_file()
        )
        for relative in fresh_files:
            assert (fresh / relative).read_bytes() == (committed / relative).read_bytes(), relative
    for name, config in module.CONFIGS.items():
        assert json.loads((EXAMPLES / name).read_text()) == config


# =========================================================================== whole-dataset errors


def test_missing_bids_dir_is_refused_naming_the_path(tmp_path):
    with pytest.raises(BidsDatasetError, match=r"nowhere: the BIDS dataset directory does not"):
        read_participants(tmp_path / "nowhere")


def test_bids_dir_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / "participants.tsv"
    path.write_text(_tsv(*CLEAN_ROWS))
    with pytest.raises(BidsDatasetError, match=r"participants.tsv: not a directory \(expected"):
        read_participants(path)


def test_missing_dataset_description_is_refused_and_says_validation_can_be_skipped(tmp_path):
    root = _dataset(tmp_path / "ds", _tsv(*CLEAN_ROWS), description="absent")
    with pytest.raises(BidsDatasetError) as info:
        read_participants(root)
    assert str(info.value).startswith(f"{root}: 'dataset_description.json' is missing")
    assert "skip BIDS validation" in str(info.value)
    assert "\n" not in str(info.value)


def test_validate_false_reads_a_dataset_without_dataset_description(tmp_path):
    root = _dataset(tmp_path / "ds", _tsv(*CLEAN_ROWS), description="absent")
    table = read_participants(root, validate=False)
    assert [p.label for p in table.usable] == ["01", "02", "03"]


def test_invalid_json_dataset_description_is_refused_naming_the_file(tmp_path):
    root = _dataset(tmp_path / "ds", _tsv(*CLEAN_ROWS), description="{not json")
    with pytest.raises(BidsDatasetError, match=r"not a valid json file.*dataset_description"):
        read_participants(root)


def test_dataset_description_without_bidsversion_is_refused_naming_the_field(tmp_path):
    root = _dataset(tmp_path / "ds", _tsv(*CLEAN_ROWS), description={"Name": "x"})
    with pytest.raises(BidsDatasetError, match=r"Mandatory 'BIDSVersion' field missing"):
        read_participants(root)


def test_invalid_participants_json_is_refused_naming_the_file(tmp_path):
    root = _dataset(tmp_path / "ds", _tsv(*CLEAN_ROWS), participants_json="{oops")
    with pytest.raises(BidsDatasetError, match=r"participants\.json.*Expecting property name"):
        read_participants(root)


def test_missing_participants_tsv_is_refused(tmp_path):
    root = _dataset(tmp_path / "ds", None)
    with pytest.raises(BidsDatasetError, match=r"ds: no participants.tsv at the dataset root"):
        read_participants(root)


@pytest.mark.parametrize(
    "content, expected",
    [
        ("", r"participants.tsv: empty \(expected a header row with participant_id"),
        ("\r\n  \n", r"participants.tsv: empty"),
        (HEADER + "\n\n", r"participants.tsv: has a header but no participant rows"),
        (b"\x1f\x8b\x08\x00\x00\x00\x00\x00", r"participants.tsv: contains NUL bytes, so it is"),
        ("\ufeffparticipant_id\tsex\nsub-01\tM\n".encode("utf-16"), r"encoded as UTF-16"),
        (
            (HEADER + "\nsub-01\tM\t63\t0.2\t0.3\nsub-02\tf\u00e9\t63\t0.2\t0.3\n").encode(
                "latin-1"
            ),
            r"participants.tsv: not UTF-8 text \(byte 0xe9 on line 3\)",
        ),
    ],
    ids=["empty", "blank-lines", "header-only", "binary", "utf16", "latin1"],
)
def test_unreadable_participants_tsv_is_refused_with_one_line(tmp_path, content, expected):
    root = _dataset(tmp_path / "ds", content)
    with pytest.raises(BidsDatasetError, match=expected) as info:
        read_participants(root)
    assert "\n" not in str(info.value)


def test_huge_participants_tsv_is_refused_before_reading_and_states_the_limit(tmp_path):
    root = _dataset(tmp_path / "ds", _tsv(*CLEAN_ROWS))
    with open(root / "participants.tsv", "r+b") as handle:
        handle.truncate(MAX_PARTICIPANTS_TSV_BYTES + 1)  # sparse: nothing is written
    with pytest.raises(BidsDatasetError, match=r"participants.tsv: 50.0 MiB is over the 50 MiB"):
        read_participants(root)


def test_tsv_without_participant_id_column_lists_the_header_found(tmp_path):
    root = _dataset(tmp_path / "ds", _tsv("01\tM\t63", header="subject\tsex\tage"))
    with pytest.raises(BidsDatasetError) as info:
        read_participants(root)
    assert str(info.value).endswith(
        "participants.tsv: no participant_id column in the header (found: 'subject', 'sex', "
        "'age')"
    )


def test_comma_separated_tsv_is_refused_with_a_hint(tmp_path):
    root = _dataset(tmp_path / "ds", "participant_id,sex,age\nsub-01,M,63\n")
    with pytest.raises(BidsDatasetError, match=r"looks comma-separated, but BIDS .tsv files are"):
        read_participants(root)


def test_duplicate_participant_ids_are_refused_naming_the_rows(tmp_path):
    rows = (*CLEAN_ROWS, "03\tM\t70\t0.2\t0.3")  # 'sub-03' and '03' are the same participant
    root = _dataset(tmp_path / "ds", _tsv(*rows))
    with pytest.raises(BidsDatasetError, match=r"duplicate participant_id: sub-03 in rows 4, 5"):
        read_participants(root)


def test_two_columns_matching_the_same_alias_are_refused_naming_both(tmp_path):
    header = "participant_id\tsex\tage\tventricular_volume\tbrain_volume\tSex "
    root = _dataset(tmp_path / "ds", _tsv("sub-01\tM\t63\t0.2\t0.3\tM", header=header))
    with pytest.raises(BidsDatasetError, match=r"columns 'sex' and 'Sex' could each be the sex"):
        read_participants(root)
    config = BidsConfig(columns={"sex": ["sex"]})
    with pytest.raises(BidsDatasetError, match=r"columns 2 \('sex'\), 6 \('Sex'\) all match 'sex'"):
        read_participants(root, config)


def test_missing_age_column_without_a_default_is_refused_naming_the_aliases(tmp_path):
    header = "participant_id\tsex\tventricular_volume\tbrain_volume"
    root = _dataset(tmp_path / "ds", _tsv("sub-01\tM\t0.2\t0.3", header=header))
    expected = r"no column for age \(age, age_at_<scan\.\.\.>, in years\); name yours in --demo"
    with pytest.raises(BidsDatasetError, match=expected):
        read_participants(root)


def test_missing_column_with_a_policy_default_uses_the_default(tmp_path):
    header = "participant_id\tsex\tage\tbrain_volume"
    root = _dataset(tmp_path / "ds", _tsv("sub-01\tM\t63\t0.3", header=header), subjects=("01",))
    table = read_participants(root, _policy_config(defaults={"ventricular_volume": 0.2}))
    assert table.columns["ventricular_volume"] is None
    assert _values(table, "01") == (1.0, 0.5, 0.2, 0.3)


def test_all_numeric_sex_without_a_mapping_is_refused_saying_how_to_map_it(tmp_path):
    rows = ("sub-01\t1\t63\t0.2\t0.3", "sub-02\t2\t63\t0.2\t0.3", "sub-03\tn/a\t63\t0.2\t0.3")
    root = _dataset(tmp_path / "ds", _tsv(*rows))
    with pytest.raises(BidsDatasetError) as info:
        read_participants(root)
    message = str(info.value)
    assert "participants.tsv: column 'sex' holds only numeric codes (1, 2)" in message
    assert '"sex_codes"' in message and '"Levels"' in message


def test_numeric_sex_with_an_explicit_config_mapping_is_read(tmp_path):
    rows = ("sub-01\t1\t63\t0.2\t0.3", "sub-02\t2.0\t63\t0.2\t0.3")
    root = _dataset(tmp_path / "ds", _tsv(*rows), subjects=("01", "02"))
    table = read_participants(root, _policy_config(sex_codes={"1": 0, "2": 1}))
    assert _values(table, "01")[0] == 0.0 and _values(table, "02")[0] == 1.0


def test_levels_without_recognisable_descriptions_are_refused_naming_them(tmp_path):
    rows = ("sub-01\t1\t63\t0.2\t0.3", "sub-02\t2\t63\t0.2\t0.3")
    levels = {"sex": {"Levels": {"1": "group A", "2": "group B"}}}
    root = _dataset(tmp_path / "ds", _tsv(*rows), participants_json=levels)
    with pytest.raises(BidsDatasetError) as info:
        read_participants(root)
    message = str(info.value)
    assert "participants.json: the Levels of column 'sex' ('1' = 'group A', '2' = " in message
    assert "describe no code as female or male (accepted descriptions: f, female" in message


def test_levels_with_free_text_descriptions_of_known_codes_are_accepted(tmp_path):
    rows = ("sub-01\tM\t63\t0.2\t0.3", "sub-02\tF\t63\t0.2\t0.3")
    levels = {"sex": {"Levels": {"M": "Male participant", "F": "Female participant"}}}
    root = _dataset(tmp_path / "ds", _tsv(*rows), participants_json=levels, subjects=("01", "02"))
    table = read_participants(root)
    assert _values(table, "01")[0] == 1.0 and _values(table, "02")[0] == 0.0


def test_levels_contradicting_the_config_sex_codes_are_refused(tmp_path):
    rows = ("sub-01\t1\t63\t0.2\t0.3",)
    levels = {"sex": {"Levels": {"1": "female", "2": "male"}}}
    root = _dataset(tmp_path / "ds", _tsv(*rows), participants_json=levels, subjects=("01",))
    with pytest.raises(BidsDatasetError, match=r"describe code '1' as 0 .* map it to 1; fix one"):
        read_participants(root, _policy_config(sex_codes={"1": 1, "2": 0}))


def test_unknown_participant_labels_are_refused_naming_them(tmp_path):
    root = _dataset(tmp_path / "ds", _tsv(*CLEAN_ROWS))
    with pytest.raises(BidsDatasetError) as info:
        read_participants(root, participant_labels=["01", "sub-07", "08"])
    assert str(info.value) == (
        f"--participant-label: 07, 08 not found in {root.resolve()} (participants: 01, 02, 03)"
    )


@pytest.mark.parametrize("label", ["", "sub-", "sub-01/anat", "01_T1w", "sub-0 1"])
def test_malformed_participant_label_argument_is_refused(tmp_path, label):
    root = _dataset(tmp_path / "ds", _tsv(*CLEAN_ROWS))
    with pytest.raises(BidsDatasetError, match=r"--participant-label .* is not a BIDS participant"):
        read_participants(root, participant_labels=[label])


def test_layout_of_another_directory_is_refused(tmp_path):
    root = _dataset(tmp_path / "ds", _tsv(*CLEAN_ROWS))
    with pytest.raises(BidsDatasetError, match=r"layout is of .*ds-minimal, not of"):
        read_participants(root, layout=_example_layout("ds-minimal"))


# =========================================================================== per-participant


def test_unknown_sex_code_skips_only_that_row_naming_row_column_and_accepted_codes(tmp_path):
    rows = ("sub-01\tM\t63\t0.2\t0.3", "sub-02\tX\t63\t0.2\t0.3", "sub-03\tF\t63\t0.2\t0.3")
    table = read_participants(_dataset(tmp_path / "ds", _tsv(*rows)))
    assert [p.label for p in table.usable] == ["01", "03"]
    assert table["02"].skip_reason == (
        "participants.tsv row 3 (sub-02), column 'sex': unknown code 'X' (accepted: f, "
        "female, m, male, man, w, woman; numeric codes need an explicit sex_codes mapping)"
    )


def test_unparseable_age_is_skipped_with_the_accepted_formats(tmp_path):
    rows = ("sub-01\tM\tsixty\t0.2\t0.3",)
    table = read_participants(_dataset(tmp_path / "ds", _tsv(*rows), subjects=("01",)))
    assert table["01"].skip_reason == (
        "participants.tsv row 2 (sub-01), column 'age': 'sixty' is not an age in years "
        "(accepted: years as a number, a range like '35-40', or open-ended like '89+')"
    )


def test_negative_volume_is_skipped_naming_the_column(tmp_path):
    rows = ("sub-01\tM\t63\t-0.2\t0.3",)
    table = read_participants(_dataset(tmp_path / "ds", _tsv(*rows), subjects=("01",)))
    assert table["01"].skip_reason == (
        "participants.tsv row 2 (sub-01), column 'ventricular_volume': '-0.2' is negative "
        "(volumes are >= 0)"
    )


def test_row_with_more_cells_than_the_header_is_skipped(tmp_path):
    rows = ("sub-01\tM\t63\t0.2\t0.3\textra", "sub-02\tF\t63\t0.2\t0.3\t\t")
    table = read_participants(_dataset(tmp_path / "ds", _tsv(*rows), subjects=("01", "02")))
    assert table["01"].skip_reason == (
        "participants.tsv row 2 (sub-01): 6 cells but the header has 5 columns, so its "
        "values may be shifted (accepted: one tab-separated cell per header column)"
    )
    assert table["02"].usable  # trailing empty cells are harmless


def test_short_row_treats_the_absent_trailing_cells_as_missing(tmp_path):
    rows = ("sub-01\tM\t63\t0.2",)
    root = _dataset(tmp_path / "ds", _tsv(*rows), subjects=("01",))
    strict = read_participants(root, _policy_config(missing_volumes="error"))
    assert "column 'brain_volume': missing value" in strict["01"].skip_reason
    table = read_participants(root, _policy_config(defaults={"brain_volume": 0.45}))
    assert _values(table, "01") == (1.0, 0.5, 0.2, 0.45)


def test_rows_without_a_valid_participant_id_become_problems_not_participants(tmp_path):
    rows = (*CLEAN_ROWS, "\tM\t63\t0.2\t0.3", "sub-04 M 63\t\t\t\t")
    table = read_participants(_dataset(tmp_path / "ds", _tsv(*rows)))
    assert table.labels == ("01", "02", "03")
    assert table.problems[0].startswith(
        "participants.tsv row 5: participant_id '' is not a BIDS participant label"
    )
    assert table.problems[1].startswith("participants.tsv row 6: participant_id 'sub-04 M 63'")


def test_subject_folder_without_bids_files_is_reported(tmp_path):
    root = _dataset(tmp_path / "ds", _tsv(*CLEAN_ROWS, "sub-04\tM\t63\t0.2\t0.3"))
    (root / "sub-04" / "notes").mkdir(parents=True)
    (root / "sub-04" / "notes" / "todo.txt").write_text("scan me")
    (root / "sub-05").mkdir()
    table = read_participants(root)
    assert table["04"].skip_reason == (
        "participants.tsv row 5 (sub-04): folder sub-04/ holds no files that pybids indexes "
        "as BIDS"
    )
    assert table.problems == (
        "sub-05/: no files that pybids indexes as BIDS and no row in participants.tsv; ignored",
    )


def test_row_numbers_are_file_lines_with_blank_lines_cr_endings_and_quotes(tmp_path):
    text = 'participant_id\t"SEX"\tAge \r\rsub-01\t"m"\t63\r\rsub-02\t" F "\tabc\r'
    root = _dataset(tmp_path / "ds", text, subjects=("01", "02"))
    defaults = {"ventricular_volume": 0.2, "brain_volume": 0.3}
    table = read_participants(root, _policy_config(defaults=defaults))
    assert table.columns["sex"] == "SEX" and table.columns["age"] == "Age"
    assert _values(table, "01") == (1.0, 0.5, 0.2, 0.3) and table["01"].row == 3
    assert table["02"].skip_reason.startswith("participants.tsv row 5 (sub-02), column 'Age':")


def test_participant_id_column_name_matches_ignoring_case_and_padding(tmp_path):
    header = " Participant_ID \tGender\tAGE\tVentricular Volume\tbrain-volume"
    text = _tsv(*CLEAN_ROWS, header=header)
    table = read_participants(_dataset(tmp_path / "ds", text))
    assert _values(table, "01") == (1.0, 0.5, 0.2, 0.3)
    assert table.columns["ventricular_volume"] == "Ventricular Volume"


# =========================================================================== configuration


def test_config_round_trips_through_to_dict_and_a_json_file(tmp_path):
    config = BidsConfig.from_dict(
        {"columns": {"age": ["age_years", "age"]}, "policy": {"out_of_range": "clip"}}
    )
    assert config.columns["age"] == ("age_years", "age")
    assert config.columns["sex"] == DEFAULT_COLUMN_ALIASES["sex"]  # untouched: defaults
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config.to_dict()))
    assert BidsConfig.from_json(path) == config
    assert hash(BidsConfig.from_json(path)) == hash(config)


def test_config_column_alias_is_used_to_find_the_column(tmp_path):
    header = "participant_id\tsex\tage_at_scan\tventricular_volume\tbrain_volume"
    root = _dataset(tmp_path / "ds", _tsv(*CLEAN_ROWS, header=header))
    table = read_participants(root, BidsConfig(columns={"age": "Age_At_Scan"}))
    assert table.columns["age"] == "age_at_scan" and _values(table, "02")[1] == 0.0


@pytest.mark.parametrize(
    "content, expected",
    [
        ('{"colums": {}}', r"config.json: unknown configuration key 'colums' \(accepted: "
                           r"columns, policy\)"),
        ('{"policy": {"out_of_rang": "clip"}}', r"config.json \(policy\): unknown demographics "
                                                r"policy key 'out_of_rang' \(accepted: sex_codes"),
        ('{"policy": {"out_of_range": "wrap"}}', r"config.json \(policy\): out_of_range: 'wrap' "
                                                 r"is not one of error, clip, allow"),
        ('{"columns": {"height": ["h"]}}', r"config.json: columns: unknown field 'height' "
                                           r"\(accepted: sex, age"),
        ('{"columns": {"age": []}}', r"config.json: columns\['age'\]: expected a non-empty list"),
        ('{"columns": {"age": ["vcsf"]}}', r"config.json: columns: 'vcsf' is listed for both "
                                           r"'age' and 'ventricular_volume'"),
        ('{"columns": {"sex": ["participant_id"]}}', r"'participant_id' cannot be a demograph"),
        ("[1, 2]", r"config.json: the configuration must be a JSON object"),
        ('{"policy": ', r"config.json: not valid JSON"),
    ],
    ids=["top-key", "policy-key", "policy-value", "columns-field", "columns-empty",
         "alias-twice", "alias-id", "not-object", "bad-json"],
)
def test_bad_config_file_is_refused_naming_the_file_and_key(tmp_path, content, expected):
    path = tmp_path / "config.json"
    path.write_text(content)
    with pytest.raises(BidsConfigError, match=expected):
        BidsConfig.from_json(path)


def test_config_errors_are_demographics_errors_for_one_except_clause():
    assert issubclass(BidsConfigError, DemographicsError)
    assert issubclass(BidsDatasetError, ValueError)
