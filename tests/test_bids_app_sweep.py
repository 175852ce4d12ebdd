"""``brain-ldm-bids ... participant --sweep``: synthetic conditioning sweeps from one seed per
participant, their group-level strips, and the edit/sweep grammar
(:mod:`brain_ldm_nodes.edits`).

ds-minimal's participants are 44, 63 and 82 years old, so ``age=44:82:19`` holds each one's
own age: that sweep image must be the participant's ``desc-synthetic`` image, bitwise (same
seed, same conditioning), which ties the sweep to the already tested synthesis path.
"""

from __future__ import annotations

import csv
import json
from decimal import Decimal
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from brain_ldm_nodes.demographics import Conditioning, DemographicsPolicy
from brain_ldm_nodes.bids_app.naming import derive_seed
from brain_ldm_nodes.edits import EditError, apply_edits, parse_edit, parse_sweep
from brain_ldm_nodes.interfaces import SampleT1w

from bids_app_support import app, copy_dataset, tree, validator_errors
from test_interfaces import STEPS

OWN_AGE = {"01": 44, "02": 63, "03": 82}
OWN_SEX = {"01": "Male", "02": "Female", "03": "Female"}
AGES = (44, 63, 82)


@pytest.fixture(scope="module", autouse=True)
def app_environment():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def swept(tmp_path_factory, tiny_model) -> tuple[Path, Path]:
    """ds-minimal with ``--sweep age=44:82:19 sex=F,M``, participant then group level."""
    base = tmp_path_factory.mktemp("sweep")
    dataset = copy_dataset("ds-minimal", base / "ds-minimal")
    out = base / "out"
    done = app(dataset, out, "participant", "--model", tiny_model, "--num-inference-steps",
               STEPS, "--sweep", "age=44:82:19", "sex=F,M")
    assert done.code == 0, done.err
    assert "summary: 18 images written" in done.out  # 3 x (1 synthetic + 3 ages + 2 sexes)
    group = app(dataset, out, "group")
    assert group.code == 0, group.err
    return dataset, out


def image(out: Path, label: str, desc: str) -> Path:
    return out / f"sub-{label}" / "anat" / f"sub-{label}_desc-{desc}_T1w.nii.gz"


def voxels(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(path).dataobj)


def test_a_sweep_uses_one_seed_changes_only_the_swept_value_and_passes_the_validator(swept):
    _, out = swept
    for label, own_age in OWN_AGE.items():
        synthetic = image(out, label, "synthetic")
        base = json.loads(synthetic.with_name(synthetic.name[:-7] + ".json").read_text())
        ages = {}
        for age in AGES:
            path = image(out, label, f"syntheticSweepAge{age}")
            sidecar = json.loads(path.with_name(path.name[:-7] + ".json").read_text())
            assert sidecar["Seed"] == derive_seed(0, label, 0) == base["Seed"]
            values = list(base["Conditioning"]["Values"])
            values[1] = (age - 44) / 38
            assert sidecar["Conditioning"]["Values"] == pytest.approx(values, abs=1e-12)
            assert sidecar["Sweep"] == {"Field": "age", "Spec": "age=44:82:19",
                                        "Values": ["44", "63", "82"], "Value": str(age),
                                        "Index": AGES.index(age)}
            ages[age] = voxels(path)
        np.testing.assert_array_equal(ages[own_age], voxels(synthetic))  # own age: same image
        assert len({a.tobytes() for a in ages.values()}) == 3  # distinct values, distinct images
        sexes = [voxels(image(out, label, f"syntheticSweepSex{sex}")) for sex in ("Female", "Male")]
        assert not np.array_equal(*sexes)
        np.testing.assert_array_equal(
            voxels(image(out, label, f"syntheticSweepSex{OWN_SEX[label]}")), voxels(synthetic))
    assert validator_errors(out) == []


def test_the_sweep_is_deterministic_byte_for_byte_and_a_rerun_samples_nothing(
    tmp_path, tiny_model, swept, monkeypatch
):
    dataset, first = swept
    second = tmp_path / "again"
    done = app(dataset, second, "participant", "--model", tiny_model, "--num-inference-steps",
               STEPS, "--sweep", "age=44:82:19", "sex=F,M")
    assert done.code == 0, done.err
    participant_files = {k: v for k, v in tree(first).items() if not k.startswith("group/")}
    assert tree(second) == participant_files

    def refuse(self, runtime):
        raise AssertionError("SampleT1w ran again")

    monkeypatch.setattr(SampleT1w, "_run_interface", refuse)
    rerun = app(dataset, second, "participant", "--model", tiny_model, "--num-inference-steps",
                STEPS, "--sweep", "age=44:82:19", "sex=F,M")
    assert rerun.code == 0, rerun.err
    assert "18 images: 18 already complete, 0 to sample" in rerun.out
    assert tree(second) == participant_files


def test_group_report_has_one_strip_per_sweep_in_value_order_and_lists_every_image(swept):
    _, out = swept
    with open(out / "group" / "images.tsv", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    assert len(rows) == 18
    sweep_rows = [r for r in rows if r["participant_id"] == "sub-02" and r["sweep_field"] == "age"]
    assert [r["sweep_value"] for r in sweep_rows] == ["44", "63", "82"]
    assert {r["kind"] for r in sweep_rows} == {"synthetic_sweep"}
    assert [float(r["age_years"]) for r in sweep_rows] == [44.0, 63.0, 82.0]
    figures = out / "group" / "figures"
    strips = sorted(p.name for p in figures.glob("*_strip.png"))
    assert strips == [f"sub-{label}_syntheticSweep{field}_strip.png"
                      for label in OWN_AGE for field in ("Age", "Sex")]
    assert sorted(p.name for p in figures.glob("*_mosaic.png")) == [
        f"sub-{label}_desc-synthetic_T1w_mosaic.png" for label in OWN_AGE]
    page = (out / "group" / "report.html").read_text()
    for name in strips:
        assert f'src="figures/{name}"' in page
    assert "sub-02: age sweep (own 63 y), synthetic" in page


def test_relative_sweep_values_out_of_range_leave_out_only_those_images(tmp_path, tiny_model):
    dataset = copy_dataset("ds-minimal", tmp_path / "ds")
    out = tmp_path / "out"
    done = app(dataset, out, "participant", "--model", tiny_model, "--num-inference-steps",
               STEPS, "--sweep", "age=-19:+19:19")
    assert done.code == 0, done.err
    assert "sweep of sub-01: --sweep age=-19:+19:19: value -19 left out: age: age=-19 gives " \
           "25 years" in done.out
    assert "value +19 left out" in done.out and done.out.count("left out") == 2
    made = sorted(p.name for p in out.glob("sub-*/anat/*Sweep*.nii.gz"))
    assert made == sorted(
        f"sub-{label}_desc-syntheticSweepAge{token}_T1w.nii.gz"
        for label, tokens in {"01": ["Plus0", "Plus19"], "02": ["Minus19", "Plus0", "Plus19"],
                              "03": ["Minus19", "Plus0"]}.items() for token in tokens)


@pytest.mark.parametrize("extra, expected", [
    (["--sweep", "age=50"], "argument --sweep: 'age=50': a sweep needs at least 2 values"),
    (["--sweep", "age=50:80:0"], "STEP '0' must be a positive number"),
    (["--sweep", "age=80:50:5"], "STOP 50 is below START 80"),
    (["--sweep", "sex=0:1:1"], "sex takes a list, not a range (accepted: sex=F,M or sex=0,1)"),
    (["--sweep", "age=50,+5"], "mixes relative (signed) and absolute values"),
    (["--sweep", "age=1:1000:1"], "1000 values, more than the 50 accepted"),
    (["--sweep", "age=50,60", "age=70,80"], "--sweep: age is given twice"),
    (["--sweep", "age=30:80:10"], "--sweep age=30:80:10: age: age=30 gives 30 years, which "
     "normalises to -0.3684, outside [0, 1]"),
])
def test_bad_sweeps_end_in_one_line_naming_the_argument_exit_2(tmp_path, tiny_model, extra,
                                                               expected):
    out = tmp_path / "out"
    done = app(copy_dataset("ds-minimal", tmp_path / "ds"), out, "participant", "--model",
               tiny_model, *extra)
    assert done.code == 2
    assert len(done.err_lines) == 1 and expected in done.err_lines[0]
    assert not out.exists()


# --------------------------------------------------------------------------- the grammar


@pytest.mark.parametrize("text, values, tokens", [
    ("age=50:80:10", ["50", "60", "70", "80"], ["50", "60", "70", "80"]),
    ("Age=-10:+10:10", ["-10", "+0", "+10"], ["Minus10", "Plus0", "Plus10"]),
    ("brain-volume=0.2:0.8:0.2", ["0.2", "0.4", "0.6", "0.8"], ["0p2", "0p4", "0p6", "0p8"]),
    ("age=50:61:5", ["50", "55", "60"], ["50", "55", "60"]),
    ("sex=female,M", ["F", "M"], ["Female", "Male"]),
    ("ventricular_volume=+0.05,-0.05", ["+0.05", "-0.05"], ["Plus0p05", "Minus0p05"]),
])
def test_sweeps_parse_to_exact_values_and_bids_safe_tokens(text, values, tokens):
    sweep = parse_sweep(text)
    assert [v.text for v in sweep.values] == values
    assert [v.token for v in sweep.values] == tokens
    assert all(token.isalnum() for token in tokens)


def test_edits_resolve_against_the_participants_own_values_and_the_policy():
    own = Conditioning((0.0, 0.5, 0.3, 0.6), {"age": {"age_years": 63.0}})
    older = apply_edits(own, [parse_edit("age=+10"), parse_edit("sex=flip")])
    assert older.values == pytest.approx((1.0, 29 / 38, 0.3, 0.6))
    assert older.record["age"]["from"] == {"age_years": 63.0}
    absolute = apply_edits(own, [parse_edit("age=75"), parse_edit("brain_volume=-0.1")])
    assert absolute.values == pytest.approx((0.0, 31 / 38, 0.3, 0.5))
    with pytest.raises(EditError, match="age=\\+30 gives 93 years"):
        apply_edits(own, [parse_edit("age=+30")])
    clipped = apply_edits(own, [parse_edit("age=+30")], DemographicsPolicy(out_of_range="clip"))
    assert clipped.values[1] == 1.0 and clipped.record["age"]["clipped"] is True
    assert parse_sweep("age=0.1:0.3:0.1").values[2].number == Decimal("0.3")  # no float drift
