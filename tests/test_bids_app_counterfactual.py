"""``brain-ldm-bids ... participant --counterfactual``: counterfactuals of the participants' real
T1w images (DDIM inversion), on the bids_examples datasets with the tiny bundle.

Expected conditionings are worked out here from participants.tsv by hand (bids_examples/
README.md), and images are checked against ``BrainLDM.counterfactual`` on the conformed source,
a code path that does not go through the App, its workflow or ``counterfactual_series``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import jax
import nibabel as nib
import numpy as np
import pytest

from brain_ldm_nodes import AutoencoderKLConfig, BrainLDM, DiffusionModelUNetConfig
from brain_ldm_nodes.imaging import conform_t1w, load_t1w, model_affine
from brain_ldm_nodes.interfaces import CounterfactualSeriesT1w
from brain_ldm_nodes.model_cache import get_model

from bids_app_support import app, copy_dataset, tree, validator_errors
from test_interfaces import SHAPE, STEPS

SESSIONS_OWN = {  # ds-sessions: gender, AGE, ventricular_csf_volume, brain_volume_norm
    "01": [0.0, (52 - 44) / 38, 0.35, 0.55],
    "02": [1.0, (67 - 44) / 38, 0.5, 0.45],
}
SESSIONS_SOURCES = {
    "01": ["sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz",
           "sub-01/ses-2/anat/sub-01_ses-2_T1w.nii.gz"],
    "02": ["sub-02/ses-1/anat/sub-02_ses-1_run-1_T1w.nii.gz",
           "sub-02/ses-1/anat/sub-02_ses-1_run-2_T1w.nii.gz"],
}


@pytest.fixture(scope="module", autouse=True)
def app_environment(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield


def participant(dataset: Path, out: Path, model: Path, *extra: object):
    # The example T1w images are 16^3 toys, not heads: conformed, not registered to MNI
    # (registration in the App: test_bids_app_counterfactual_registers_a_real_t1w below).
    return app(dataset, out, "participant", "--model", model, "--num-inference-steps", STEPS,
               "--t1w-space", "conform", *extra)


def derivative(source: str, desc: str) -> str:
    return source.replace("_T1w.nii.gz", f"_desc-{desc}_T1w.nii.gz")


def voxels(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(path).dataobj)


def conformed(path: Path, shape=SHAPE) -> np.ndarray:
    image, _ = conform_t1w(load_t1w(path), shape=shape)
    return np.asarray(image.dataobj, dtype=np.float32)


def test_counterfactuals_of_every_session_and_run_are_valid_derivatives_with_full_sidecars(
    tmp_path, tiny_model
):
    dataset = copy_dataset("ds-sessions", tmp_path / "ds-sessions")
    out = dataset / "derivatives" / "brain-ldm"
    done = participant(dataset, out, tiny_model, "--counterfactual", "age=+10", "sex=flip")
    assert done.code == 0, done.err
    assert "note: sub-03: no T1w image" in done.out  # ds-sessions' sub-03 has only a T2w
    names = sorted(p.relative_to(out).as_posix() for p in out.glob("sub-*/ses-*/anat/*.nii.gz"))
    assert names == sorted(derivative(s, "counterfactual") for ss in SESSIONS_SOURCES.values()
                           for s in ss)
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetLinks"] == {"raw": "../.."}  # bids:raw: resolves to the dataset

    model = get_model(str(tiny_model))
    for label, sources in SESSIONS_SOURCES.items():
        own = SESSIONS_OWN[label]
        target = [1.0 - own[0], own[1] + 10 / 38, own[2], own[3]]
        for source in sources:
            image = out / derivative(source, "counterfactual")
            sidecar = json.loads(image.with_name(image.name[:-7] + ".json").read_text())
            assert sidecar["Sources"] == [f"bids:raw:{source}"]
            assert sidecar["SourceSHA256"] == hashlib.sha256(
                (dataset / source).read_bytes()).hexdigest()
            assert sidecar["Edit"] == ["age=+10", "sex=flip"]
            assert sidecar["ConditioningFrom"]["Values"] == pytest.approx(own, abs=1e-12)
            assert sidecar["ConditioningTo"]["Values"] == pytest.approx(target, abs=1e-12)
            age = sidecar["ConditioningTo"]["Derivation"]["age"]
            assert age["age_years"] == age["from_age_years"] + 10 and age["edit"] == "age=+10"
            assert sidecar["ConditioningTo"]["Derivation"]["sex"]["from"]["raw"] in {"female",
                                                                                     "male"}
            assert sidecar["Sampler"]["NumInferenceSteps"] == STEPS
            assert sidecar["Model"]["Source"]["model"]["weights_sha256"] == \
                model.source["model"]["weights_sha256"]
            assert sidecar["Synthetic"] is True and sidecar["SkullStripped"] is False
            error = sidecar["ReconstructionError"]
            assert all(np.isfinite(error[k]) and error[k] > 0 for k in
                       ("ImageRMS", "ImageMaxAbs", "LatentRelative", "LatentMaxAbs"))
            assert isinstance(sidecar["SoftwareVersions"], str)
            expected = model.counterfactual(conformed(dataset / source)[None, None],
                                            np.array([own]), np.array([target]),
                                            num_inference_steps=STEPS)
            np.testing.assert_array_equal(voxels(image), np.asarray(expected.edited)[0, 0])
            np.testing.assert_array_equal(nib.load(image).affine, model_affine(SHAPE))

    group = app(dataset, out, "group")
    assert group.code == 0, group.err
    rows = (out / "group" / "images.tsv").read_text().splitlines()
    header = rows[0].split("\t")
    first = dict(zip(header, rows[1].split("\t")))
    assert first["kind"] == "counterfactual" and first["session"] == "1"
    assert first["source"] == f"bids:raw:{SESSIONS_SOURCES['01'][0]}"
    assert first["edit"] == "age=+10 sex=flip" and first["raw_age"] == "52"
    assert float(first["age_years"]) == 62.0
    page = (out / "group" / "report.html").read_text()
    assert "sub-01_ses-1_desc-counterfactual_T1w_mosaic.png" in page
    assert validator_errors(out) == []


def test_one_changed_value_changes_the_image_and_the_own_value_gives_the_reconstruction(
    tmp_path, tiny_model
):
    """A counterfactual sweep of sub-01 of ds-minimal (44 years): the 44-year image is the
    reconstruction, so the sidecar's reconstruction error must be its distance from the
    conformed source; the 63- and 82-year images differ from it and from each other, in age only.
    """
    dataset = copy_dataset("ds-minimal", tmp_path / "ds-minimal")
    out = tmp_path / "out"
    done = participant(dataset, out, tiny_model, "--participant-label", "01",
                       "--counterfactual", "--sweep", "age=44:82:19")
    assert done.code == 0, done.err
    anat = out / "sub-01" / "anat"
    images = {age: anat / f"sub-01_desc-counterfactualSweepAge{age}_T1w.nii.gz"
              for age in (44, 63, 82)}
    assert sorted(p.name for p in anat.glob("*.nii.gz")) == sorted(p.name for p in
                                                                    images.values())
    data = {age: voxels(path).astype(np.float64) for age, path in images.items()}
    assert not np.array_equal(data[44], data[63]) and not np.array_equal(data[63], data[82])
    sidecars = {age: json.loads(path.with_name(path.name[:-7] + ".json").read_text())
                for age, path in images.items()}
    for age, sidecar in sidecars.items():
        assert sidecar["ConditioningTo"]["Values"] == pytest.approx(
            [1.0, (age - 44) / 38, 0.2, 0.4], abs=1e-12)
        assert sidecar["Sweep"]["Value"] == str(age) and sidecar["Sweep"]["Field"] == "age"
    source = conformed(dataset / "sub-01" / "anat" / "sub-01_T1w.nii.gz").astype(np.float64)
    error = sidecars[44]["ReconstructionError"]
    assert error["ImageRMS"] == pytest.approx(np.sqrt(np.mean((data[44] - source) ** 2)),
                                              rel=1e-6)
    assert error["ImageMaxAbs"] == pytest.approx(np.abs(data[44] - source).max(), rel=1e-6)
    assert sidecars[63]["ReconstructionError"] == error  # one inversion for the whole sweep

    group = app(dataset, out, "group")
    assert group.code == 0, group.err
    strip = out / "group" / "figures" / "sub-01_counterfactualSweepAge_strip.png"
    assert strip.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f'src="figures/{strip.name}"' in (out / "group" / "report.html").read_text()
    assert not list((out / "group" / "figures").glob("*Sweep*_mosaic.png"))


def test_rerun_skips_complete_counterfactuals_and_redoes_what_changed(
    tmp_path, tiny_model, monkeypatch
):
    dataset = copy_dataset("ds-minimal", tmp_path / "ds-minimal")
    out = tmp_path / "out"
    args = ["--participant-label", "02", "--counterfactual", "age=+5", "--sweep", "sex=F,M"]
    assert participant(dataset, out, tiny_model, *args).code == 0
    before = tree(out)
    real_run = CounterfactualSeriesT1w._run_interface

    def refuse(self, runtime):
        raise AssertionError("CounterfactualSeriesT1w ran again")

    monkeypatch.setattr(CounterfactualSeriesT1w, "_run_interface", refuse)
    again = participant(dataset, out, tiny_model, *args)
    assert again.code == 0, again.err
    assert "3 images: 3 already complete, 0 to sample" in again.out
    assert tree(out) == before

    made = []

    def record(self, runtime):
        made.append(list(self.inputs.out_prefixes))
        return real_run(self, runtime)

    monkeypatch.setattr(CounterfactualSeriesT1w, "_run_interface", record)
    changed = participant(dataset, out, tiny_model, "--participant-label", "02",
                          "--counterfactual", "age=+6", "--sweep", "sex=F,M")
    assert changed.code == 0, changed.err
    assert "sub-02 counterfactual age=+6: sampling again: ConditioningTo.Values is" in changed.out
    assert made == [["sub-02_desc-counterfactual_T1w"]]  # the sweep images were complete

    source = dataset / "sub-02" / "anat" / "sub-02_T1w.nii.gz"
    image = nib.load(source)
    nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj) * 2, image.affine), source)
    made.clear()
    assert participant(dataset, out, tiny_model, *args).code == 0
    assert made == [["sub-02_desc-counterfactual_T1w",  # a changed source: all made again
                     "sub-02_desc-counterfactualSweepSexFemale_T1w",
                     "sub-02_desc-counterfactualSweepSexMale_T1w"]]


@pytest.mark.parametrize("extra, expected", [
    (["--counterfactual", "age=abc"],
     "argument --counterfactual: 'age=abc': 'abc' is not a number (years; accepted: age=75"),
    (["--counterfactual", "height=+1"], "argument --counterfactual: 'height=+1': unknown field"),
    (["--counterfactual", "sex=other"], "'other' is not a sex value (accepted: F, M, 0, 1, flip"),
    (["--counterfactual", "age=+10", "age=+5"],
     "--counterfactual: age is given twice (accepted: one edit per field)"),
    (["--counterfactual"], "--counterfactual needs at least one EDIT (e.g. age=+10)"),
    (["--counterfactual", "age=+1", "--n-samples", "2"],
     "--n-samples 2 applies to synthetic images"),
    (["--counterfactual", "age=90"], "--counterfactual age=90: age: age=90 gives 90 years, "
     "which normalises to 1.211, outside [0, 1] (out_of_range 'clip' or 'allow' would use it)"),
])
def test_bad_counterfactual_values_end_in_one_line_naming_the_argument_exit_2(
    tmp_path, tiny_model, extra, expected
):
    out = tmp_path / "out"
    done = participant(copy_dataset("ds-minimal", tmp_path / "ds"), out, tiny_model, *extra)
    assert done.code == 2
    assert len(done.err_lines) == 1 and done.err_lines[0].startswith("brain-ldm-bids: error: ")
    assert expected in done.err_lines[0]
    assert not out.exists()


@pytest.mark.slow
def test_counterfactual_on_the_real_size_grid_with_a_tiny_weight_model(tmp_path):
    """160 x 224 x 160, the released grid: a 16^3 example T1w is conformed (padded) onto it."""
    model = BrainLDM.random(
        key=jax.random.key(1),
        vae_config=AutoencoderKLConfig(channels=(8, 8, 8, 8), num_res_blocks=(1, 1, 1, 1),
                                       norm_num_groups=8),
        unet_config=DiffusionModelUNetConfig(channels=(8, 8, 8), num_res_blocks=(1, 1, 1),
                                             num_head_channels=(0, 8, 8), norm_num_groups=8),
        image_shape=(160, 224, 160),
    )
    bundle = model.save_pretrained(tmp_path / "model", vae_path=tmp_path / "model-vae")
    dataset = copy_dataset("ds-minimal", tmp_path / "ds-minimal")
    out = tmp_path / "out"
    done = app(dataset, out, "participant", "--model", bundle, "--num-inference-steps", 1,
               "--participant-label", "03", "--counterfactual", "age=-20",
               "--t1w-space", "conform")
    assert done.code == 0, done.err
    image = nib.load(out / "sub-03" / "anat" / "sub-03_desc-counterfactual_T1w.nii.gz")
    assert image.shape == (160, 224, 160)
    np.testing.assert_array_equal(image.affine, model_affine((160, 224, 160)))
    assert np.isfinite(np.asanyarray(image.dataobj)).all()
    sidecar = json.loads((out / "sub-03/anat/sub-03_desc-counterfactual_T1w.json").read_text())
    assert sidecar["Grid"]["Shape"] == [160, 224, 160]
    assert sidecar["Preparation"]["source_shape"] == [16, 16, 16]
    assert sidecar["ConditioningTo"]["Values"][1] == pytest.approx((62 - 44) / 38)
    shutil.rmtree(tmp_path / "model")


def test_counterfactuals_from_another_dataset_are_refused_so_outputs_and_links_agree(
    tmp_path, tiny_model
):
    dataset = copy_dataset("ds-minimal", tmp_path / "a" / "ds-minimal")
    out = tmp_path / "out"
    args = ["--participant-label", "02", "--counterfactual", "age=+5"]
    assert participant(dataset, out, tiny_model, *args).code == 0
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetLinks"] == {"raw": "../a/ds-minimal"}
    before = tree(out)

    other = copy_dataset("ds-minimal", tmp_path / "b" / "ds-minimal")
    (other / "sub-02/anat/sub-02_T1w.nii.gz").write_bytes(b"not a NIfTI")  # unreadable
    refused = participant(other, out, tiny_model, *args)
    assert refused.code == 1
    [line] = refused.err.splitlines()
    assert (f"output_dir {out}: its 1 counterfactuals name sources in ../a/ds-minimal "
            "(DatasetLinks.raw), this run reads ../b/ds-minimal; use another output_dir, or "
            "remove them first") in line
    assert tree(out) == before  # the old counterfactual and its link, unchanged


def test_a_source_that_cannot_be_read_is_left_out_with_a_note(tmp_path):
    from brain_ldm_nodes.bids_app.participants import read_participants
    from brain_ldm_nodes.bids_app.plan import plan_counterfactuals
    from brain_ldm_nodes.weights.identity import ModelIdentity
    from brain_ldm_nodes.edits import parse_edit

    dataset = copy_dataset("ds-minimal", tmp_path / "ds-minimal")
    table = read_participants(dataset, participant_labels=["02"])
    missing = dataset / "sub-02" / "anat" / "sub-02_run-9_T1w.nii.gz"  # gone since listed
    model = ModelIdentity.__new__(ModelIdentity)
    requests, notes = plan_counterfactuals(
        table, {"02": [missing]}, bids_dir=dataset, edits=[parse_edit("age=+5")], sweeps=[],
        num_inference_steps=2, model=model)
    assert requests == []
    assert notes == ["sub-02/anat/sub-02_run-9_T1w.nii.gz: cannot read it (No such file or "
                     "directory); no counterfactual of it (existing ones are left as they are)"]


def test_bids_app_counterfactual_registers_a_real_t1w_and_publishes_the_transform(
    tmp_path, tiny_model
):
    """The default --t1w-space native: a head-like T1w (the MNI152 template moved by a known
    rigid motion, LPS, 1.2 mm) is registered; the transform is published beside the image with
    fMRIPrep's naming, recovers the motion, and the sidecar records the registration. With
    --output-space model source the counterfactual is also put back on the T1w's grid
    (space-T1w) where the known motion says the model grid lies."""
    from nibabel.affines import apply_affine
    from brain_ldm_nodes.registration import read_itk_transform
    from registration_support import grid_affine, moved_image, rigid, transform_errors
    from brain_ldm_nodes.registration import load_template

    dataset = copy_dataset("ds-minimal", tmp_path / "ds")
    motion = rigid((6, -4, 8), (8, -10, 6))
    shape = (150, 180, 160)
    moved = moved_image(load_template()[0], motion, shape,
                        grid_affine(shape, (1.2, 1, 1), "LPS", 8))
    source = dataset / "sub-01" / "anat" / "sub-01_T1w.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(moved.dataobj).astype(np.int16), moved.affine), source)
    out = tmp_path / "out"
    done = app(dataset, out, "participant", "--model", tiny_model, "--num-inference-steps",
               STEPS, "--participant-label", "01", "--counterfactual", "age=+10",
               "--output-space", "model", "source")
    assert done.code == 0, done.err
    xfm = out / "sub-01/anat/sub-01_from-T1w_to-MNI152NLin2009aSym_mode-image_xfm.txt"
    rms_mm, angle_deg = transform_errors(read_itk_transform(xfm), motion)
    assert rms_mm < 1.0 and angle_deg < 1.0
    sidecar = json.loads((out / "sub-01/anat/sub-01_desc-counterfactual_T1w.json").read_text())
    assert sidecar["RegistrationTransform"] == (
        "bids::sub-01/anat/sub-01_from-T1w_to-MNI152NLin2009aSym_mode-image_xfm.txt")
    preparation = sidecar["Preparation"]
    assert preparation["t1w_space"] == "native"
    assert preparation["library"].startswith("SimpleITK")
    assert preparation["template"]["name"] == "MNI152NLin2009aSym"
    assert preparation["ncc_with_template"] > 0.5
    on_source = out / "sub-01/anat/sub-01_space-T1w_desc-counterfactual_T1w.nii.gz"
    image = nib.load(on_source)
    assert image.shape == shape
    np.testing.assert_allclose(image.affine, moved.affine)
    source_sidecar = json.loads(on_source.with_name(on_source.name[:-7] + ".json").read_text())
    assert source_sidecar["OutputSpace"] == "source"
    assert source_sidecar["RegistrationTransform"] == sidecar["RegistrationTransform"]
    # The model grid's 16 mm box, centred on MNI (0, -17, 5), moved by the known motion.
    inside = apply_affine(moved.affine, np.argwhere(np.asarray(image.dataobj) != 0))
    np.testing.assert_allclose(inside.mean(axis=0), apply_affine(motion, [0.0, -17.0, 5.0]),
                               atol=1.5)
    assert validator_errors(out) == []
    # The space is part of what the voxels depend on: another --t1w-space redoes the image.
    again = app(dataset, out, "participant", "--model", tiny_model, "--num-inference-steps",
                STEPS, "--participant-label", "01", "--counterfactual", "age=+10",
                "--t1w-space", "conform")
    assert again.code == 0, again.err
    sidecar = json.loads((out / "sub-01/anat/sub-01_desc-counterfactual_T1w.json").read_text())
    assert sidecar["Preparation"]["t1w_space"] == "conform"
    assert "RegistrationTransform" not in sidecar
    # The space-T1w image of the first run still names the transform: it stays (a transform
    # no image names is removed: test_bids_app_fmriprep.py).
    assert xfm.exists() and "removed" not in again.out
