"""``brain-ldm-bids ... --counterfactual --t1w-derivatives DIR``: real T1w from an fMRIPrep
derivatives folder (already in MNI space: resampled, not registered), ``--output-space source``
and stale transforms. No registration runs here: the images are the MNI152 template on
fMRIPrep-like grids (tests/registration_support.py), so these tests are fast.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.affines import apply_affine, from_matvec
from scipy import ndimage

from brain_ldm_nodes.imaging import model_affine
from brain_ldm_nodes.registration import GRID_CENTRE_MNI_MM, load_template, resample_to_model_grid

from bids_app_support import app, copy_dataset, tree, validator_errors
from registration_support import moved_image
from test_interfaces import SHAPE, STEPS

#: fMRIPrep's MNI152NLin2009cAsym res-1 grid (TemplateFlow tpl-MNI152NLin2009cAsym_res-01).
FMRIPREP_SHAPE = (193, 229, 193)
FMRIPREP_AFFINE = from_matvec(np.eye(3), [-96.0, -132.0, -78.0])
FMRIPREP_DESCRIPTION = {
    "Name": "fMRIPrep - fMRI PREProcessing workflow",
    "BIDSVersion": "1.9.0",
    "DatasetType": "derivative",
    "GeneratedBy": [{"Name": "fMRIPrep", "Version": "23.2.1",
                     "CodeURL": "https://github.com/nipreps/fmriprep/archive/23.2.1.tar.gz"}],
}
MNI_SOURCE = "sub-01/anat/sub-01_space-MNI152NLin2009cAsym_desc-preproc_T1w.nii.gz"


@pytest.fixture(scope="module", autouse=True)
def app_environment():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield


def template_on(shape, affine, scale: float = 1.0) -> nib.Nifti1Image:
    """The MNI152 template seen on an MNI grid (identity motion), int16 (0 to 1000 x scale)."""
    image = moved_image(load_template()[0], np.eye(4), shape, affine)
    data = np.round(np.asarray(image.dataobj) * scale).astype(np.int16)
    return nib.Nifti1Image(data, affine)


def fake_fmriprep(folder: Path) -> Path:
    """A small fMRIPrep derivatives folder: sub-01 in MNI152NLin2009cAsym (used), in
    MNI152NLin6Asym (the same output: noted, not used) and in MNIColin27 (not MNI152: noted)."""
    anat = folder / "sub-01" / "anat"
    anat.mkdir(parents=True)
    (folder / "dataset_description.json").write_text(json.dumps(FMRIPREP_DESCRIPTION))
    nib.save(template_on(FMRIPREP_SHAPE, FMRIPREP_AFFINE), folder / MNI_SOURCE)
    small = from_matvec(np.eye(3) * 2, [-96.0, -132.0, -78.0])
    nib.save(template_on((97, 115, 97), small),
             anat / "sub-01_space-MNI152NLin6Asym_res-2_desc-preproc_T1w.nii.gz")
    nib.save(template_on((97, 115, 97), small),
             anat / "sub-01_space-MNIColin27_desc-preproc_T1w.nii.gz")
    return folder


def test_an_mni_image_on_fmriprep_grid_lands_on_the_template_on_the_model_grid():
    """A 2009c-grid image (other field of view, origin and scale than the template's own file)
    resampled onto the model grid equals the template sampled independently (scipy) at the
    grid's MNI points; the same comparison 3 mm off fails, so the check can fail."""
    source = template_on(FMRIPREP_SHAPE, FMRIPREP_AFFINE, scale=3.0)
    shape = (160, 224, 160)
    result = resample_to_model_grid(source, shape=shape)
    got = np.asarray(result.image.dataobj, dtype=np.float64)
    assert result.image.shape == shape
    np.testing.assert_allclose(result.image.affine, model_affine(shape))

    template, _ = load_template()
    ijk = np.indices(shape).reshape(3, -1).T

    def oracle(offset_mm) -> np.ndarray:
        mni = apply_affine(model_affine(shape), ijk) + np.asarray(GRID_CENTRE_MNI_MM) + offset_mm
        voxels = apply_affine(np.linalg.inv(template.affine), mni).T
        values = ndimage.map_coordinates(np.asarray(template.dataobj, np.float64), voxels,
                                         order=1, mode="constant").reshape(shape)
        return (values - values.min()) / (values.max() - values.min())

    brain = oracle(np.zeros(3)) > 0.05
    expected = oracle(np.zeros(3))
    # Two linear interpolations (source grid, then model grid) against one; both grids sit on
    # whole MNI mm here, so they agree closely (measured: 4e-5 mean, NCC 0.99999998).
    assert np.abs(got - expected)[brain].mean() < 1e-3
    assert np.corrcoef(got[brain], expected[brain])[0, 1] > 0.9999
    shifted = oracle(np.array([0.0, 3.0, 0.0]))  # measured: 0.084
    assert np.abs(got - shifted)[brain].mean() > 0.03
    # The brain's centroid sits where the template's does, in MNI mm.
    centroid = apply_affine(model_affine(shape), ndimage.center_of_mass(got * brain))
    np.testing.assert_allclose(
        centroid, apply_affine(model_affine(shape), ndimage.center_of_mass(expected * brain)),
        atol=0.2)


def test_fmriprep_derivatives_are_the_source_and_outputs_are_valid_bids(tmp_path, tiny_model):
    dataset = copy_dataset("ds-minimal", tmp_path / "ds")
    fmriprep = fake_fmriprep(dataset / "derivatives" / "fmriprep")
    out = dataset / "derivatives" / "brain-ldm"
    args = [dataset, out, "participant", "--model", tiny_model, "--num-inference-steps", STEPS,
            "--participant-label", "01", "--counterfactual", "age=+10",
            "--t1w-derivatives", fmriprep, "--output-space", "model", "source"]
    done = app(*args)
    assert done.code == 0, done.err
    assert ("sub-01/anat/sub-01_space-MNI152NLin6Asym_res-2_desc-preproc_T1w.nii.gz: not used; "
            f"{MNI_SOURCE} makes the same output") in done.out
    assert "sub-01_space-MNIColin27_desc-preproc_T1w.nii.gz: space-MNIColin27 is not an MNI152 " \
           "space; not used" in done.out

    anat = out / "sub-01" / "anat"
    assert sorted(p.name for p in anat.iterdir()) == [
        "sub-01_desc-counterfactual_T1w.json",
        "sub-01_desc-counterfactual_T1w.nii.gz",
        "sub-01_space-MNI152NLin2009cAsym_desc-counterfactual_T1w.json",
        "sub-01_space-MNI152NLin2009cAsym_desc-counterfactual_T1w.nii.gz",
    ]  # no transform: the source was in MNI space, nothing was registered
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetLinks"] == {"raw": "../..", "fmriprep": "../fmriprep"}

    grid = json.loads((anat / "sub-01_desc-counterfactual_T1w.json").read_text())
    assert grid["Sources"] == [f"bids:fmriprep:{MNI_SOURCE}"]
    assert grid["SourceSHA256"] is not None
    preparation = grid["Preparation"]
    assert preparation["t1w_space"] == "MNI"
    assert "not registered" in preparation["method"]
    assert preparation["source_dataset"] == "fmriprep"
    assert preparation["source_space"] == "MNI152NLin2009cAsym"
    assert preparation["source_shape"] == list(FMRIPREP_SHAPE)
    assert "RegistrationTransform" not in grid and "OutputSpace" not in grid
    assert grid["ConditioningFrom"]["Values"][1] == pytest.approx(0.0)  # participants.tsv: 44 y
    model_image = nib.load(anat / "sub-01_desc-counterfactual_T1w.nii.gz")
    assert model_image.shape == SHAPE

    on_source = anat / "sub-01_space-MNI152NLin2009cAsym_desc-counterfactual_T1w.nii.gz"
    image = nib.load(on_source)
    assert image.shape == FMRIPREP_SHAPE
    np.testing.assert_allclose(image.affine, FMRIPREP_AFFINE)
    sidecar = json.loads(on_source.with_name(on_source.name[:-7] + ".json").read_text())
    assert sidecar["OutputSpace"] == "source"
    assert sidecar["SpatialReference"] == f"bids:fmriprep:{MNI_SOURCE}"
    assert sidecar["Sources"] == grid["Sources"]
    # The model grid's 16 mm box lands around MNI (0, -17, 5) (the identity transform), and
    # holds the model-grid image's values.
    data = np.asarray(image.dataobj)
    inside = np.argwhere(data != 0)
    box = apply_affine(FMRIPREP_AFFINE, inside)
    np.testing.assert_allclose(box.mean(axis=0), GRID_CENTRE_MNI_MM, atol=1.0)
    assert np.ptp(box, axis=0).max() <= 16.0
    assert data.max() <= np.asarray(model_image.dataobj).max() + 1e-6
    assert validator_errors(out) == []

    before = tree(out)
    again = app(*args)
    assert again.code == 0, again.err
    assert "2 images: 2 already complete, 0 to sample" in again.out
    assert tree(out) == before
    group = app(dataset, out, "group")
    assert group.code == 0, group.err


def test_a_folder_that_is_not_a_derivative_dataset_is_one_line(tmp_path, tiny_model):
    dataset = copy_dataset("ds-minimal", tmp_path / "ds")
    folder = tmp_path / "fmriprep"
    (folder / "sub-01" / "anat").mkdir(parents=True)
    common = [dataset, tmp_path / "out", "participant", "--model", tiny_model,
              "--counterfactual", "age=+10", "--t1w-derivatives", folder]
    done = app(*common)
    assert done.code == 1
    assert done.err_lines == [
        f"brain-ldm-bids: error: --t1w-derivatives {folder}: no dataset_description.json "
        "(accepted: a BIDS derivatives folder such as fMRIPrep's output, whose "
        "dataset_description.json has DatasetType derivative)"]
    (folder / "dataset_description.json").write_text(json.dumps({"Name": "x"}))
    done = app(*common)
    assert done.code == 1 and len(done.err_lines) == 1
    assert "DatasetType is 'raw', not 'derivative'" in done.err
    refused = app(dataset, tmp_path / "out", "participant", "--model", tiny_model,
                  "--t1w-derivatives", folder)
    assert refused.code == 2 and len(refused.err_lines) == 1
    assert "--t1w-derivatives applies to the real T1w of --counterfactual" in refused.err
    refused = app(dataset, tmp_path / "out", "participant", "--model", tiny_model,
                  "--counterfactual", "age=+10", "--output-space", "source",
                  "--t1w-space", "conform")
    assert refused.code == 2 and len(refused.err_lines) == 1
    assert "--output-space source needs the transform of a registration" in refused.err
    assert not (tmp_path / "out").exists()


def test_switching_to_conform_removes_the_transform_no_image_uses(tmp_path, tiny_model):
    """A raw T1w declared in MNI space (--t1w-space MNI: its identity transform is published),
    then conformed: the transform goes, with a line, as stale images do."""
    dataset = copy_dataset("ds-minimal", tmp_path / "ds")
    nib.save(template_on(FMRIPREP_SHAPE, FMRIPREP_AFFINE),
             dataset / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    out = tmp_path / "out"
    common = [dataset, out, "participant", "--model", tiny_model, "--num-inference-steps", STEPS,
              "--participant-label", "01", "--counterfactual", "age=+10"]
    assert app(*common, "--t1w-space", "MNI").code == 0
    xfm = out / "sub-01/anat/sub-01_from-T1w_to-MNI152NLin2009aSym_mode-image_xfm.txt"
    assert xfm.exists()
    # An unrelated participant's transform is not this run's business.
    other = out / "sub-02/anat/sub-02_from-T1w_to-MNI152NLin2009aSym_mode-image_xfm.txt"
    other.parent.mkdir(parents=True)
    other.write_text(xfm.read_text())
    done = app(*common, "--t1w-space", "conform")
    assert done.code == 0, done.err
    assert not xfm.exists()
    assert ("removed sub-01/anat/sub-01_from-T1w_to-MNI152NLin2009aSym_mode-image_xfm.txt: no "
            "image uses this transform any more") in done.out
    assert other.exists()
    assert validator_errors(out) == []


def test_which_preprocessed_t1w_are_used_and_how_outputs_are_named(tmp_path):
    """fMRIPrep names -> sources (space rule, one per output) and valid output names: one
    desc- entity; the model grid without space-/res-; the source grid with the source's."""
    from brain_ldm_nodes.bids_app.dataset import find_preprocessed_t1w
    from brain_ldm_nodes.bids_app.participants import read_participants
    from brain_ldm_nodes.bids_app.plan import plan_counterfactuals
    from brain_ldm_nodes.weights.identity import ModelIdentity
    from brain_ldm_nodes.edits import parse_edit

    folder = tmp_path / "fmriprep"
    names = ["sub-01/ses-1/anat/sub-01_ses-1_desc-preproc_T1w.nii.gz",  # T1w space: registered
             "sub-01/ses-2/anat/sub-01_ses-2_space-MNI152NLin6Asym_res-2_desc-preproc_T1w.nii.gz",
             "sub-01/ses-2/anat/sub-01_ses-2_desc-preproc_T1w.nii.gz",  # same output as ^
             "sub-01/ses-2/anat/sub-01_ses-2_space-MNI152NLin6Asym_res-2_desc-brain_mask.nii.gz"]
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(np.zeros((4, 5, 6), np.int16), np.eye(4)), folder / name)
    found, notes = find_preprocessed_t1w(folder, "01")
    assert {p.relative_to(folder).as_posix(): v for p, v in found.items()} == {
        names[0]: ("native", None), names[1]: ("MNI", "MNI152NLin6Asym")}
    assert notes == [f"{names[2]}: not used; {names[1]} makes the same output (sub-01_ses-2)"]
    found_mni, notes = find_preprocessed_t1w(folder, "sub-01", t1w_space="MNI")
    assert [p.relative_to(folder).as_posix() for p in found_mni] == [names[1]]
    assert notes[0].startswith(f"{names[0]}: it has no space- entity (the T1w's own space)")

    dataset = copy_dataset("ds-minimal", tmp_path / "ds")
    table = read_participants(dataset, participant_labels=["01"])
    model = ModelIdentity.__new__(ModelIdentity)
    requests, _ = plan_counterfactuals(
        table, {"01": list(found)}, bids_dir=folder, edits=[parse_edit("age=+5")], sweeps=[],
        num_inference_steps=2, model=model, output_spaces=("model", "source"),
        source_dataset="fmriprep", source_spaces=found)
    assert [r.relative_path.as_posix() for r in requests] == [
        "sub-01/ses-1/anat/sub-01_ses-1_desc-counterfactual_T1w.nii.gz",
        "sub-01/ses-1/anat/sub-01_ses-1_space-T1w_desc-counterfactual_T1w.nii.gz",
        "sub-01/ses-2/anat/sub-01_ses-2_desc-counterfactual_T1w.nii.gz",
        "sub-01/ses-2/anat/sub-01_ses-2_space-MNI152NLin6Asym_res-2_desc-counterfactual_T1w.nii.gz",
    ]
    assert [r.t1w_space for r in requests] == ["native", "native", "MNI", "MNI"]
    assert requests[3].source_uri == f"bids:fmriprep:{names[1]}"
    assert requests[3].output_shape == (4, 5, 6)
