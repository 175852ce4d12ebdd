"""Registration as Nipype nodes: RegisterT1w, init_t1w_to_model_grid_wf, and the default
``t1w_space='native'`` (register) of VAEEncode / CounterfactualT1w.

Ground truth: the MNI152 template moved by a known rigid motion (tests/registration_support.py);
transform files are read back with SimpleITK as the oracle.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.affines import apply_affine

from brain_ldm_nodes.imaging import MODEL_GRID_SHAPE, load_latent, model_affine
from brain_ldm_nodes.interfaces import CounterfactualT1w, VAEEncode
from brain_ldm_nodes.model_cache import get_model
from brain_ldm_nodes.registration import load_template, read_itk_transform
from brain_ldm_nodes.workflows import init_t1w_to_model_grid_wf
from registration_support import grid_affine, moved_image, rigid, transform_errors
from test_interfaces import run_node, write_t1w

MOTION = rigid((8, -6, 10), (-10, 15, 12))


@pytest.fixture(scope="module")
def moved_t1w(tmp_path_factory) -> Path:
    """The template moved by MOTION onto an LPS, 1.2 x 1 x 1 mm, oblique grid (a fake scan)."""
    template, _ = load_template()
    shape = (170, 210, 190)
    image = moved_image(template, MOTION, shape, grid_affine(shape, (1.2, 1, 1), "LPS", 10))
    path = tmp_path_factory.mktemp("moved") / "sub-01_T1w.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj).astype(np.int16), image.affine), path)
    return path


def test_t1w_to_model_grid_wf_registers_and_writes_transform_and_report(tmp_path, moved_t1w):
    sitk = pytest.importorskip("SimpleITK")  # a runtime dependency: must be installed
    workflow = init_t1w_to_model_grid_wf()
    workflow.base_dir = str(tmp_path)
    workflow.inputs.inputnode.t1w = str(moved_t1w)
    graph = workflow.run(plugin="Linear")
    outputs = next(n for n in graph.nodes() if n.name == "register_t1w").result.outputs

    image = nib.load(outputs.out_file)
    assert image.shape == MODEL_GRID_SHAPE and nib.aff2axcodes(image.affine) == ("L", "A", "S")
    np.testing.assert_allclose(image.affine, model_affine(MODEL_GRID_SHAPE))
    assert Path(outputs.out_transform).name == (
        "T1w_from-T1w_to-MNI152NLin2009aSym_mode-image_xfm.txt"
    )
    # The file, read by SimpleITK, maps MNI points (LPS) to the source's points.
    itk = sitk.ReadTransform(outputs.out_transform)
    flip = np.array([-1.0, -1.0, 1.0])
    matrix = read_itk_transform(outputs.out_transform)
    for point in ([0.0, -17.0, 5.0], [50.0, 20.0, 40.0]):
        np.testing.assert_allclose(
            flip * np.asarray(itk.TransformPoint(list(flip * point))),
            apply_affine(matrix, point), atol=1e-6,
        )
    rms_mm, angle_deg = transform_errors(matrix, MOTION)
    assert rms_mm < 1.0 and angle_deg < 1.0
    report = json.loads(Path(outputs.out_report).read_text())
    assert report["library"].startswith("SimpleITK")
    assert report["template"]["name"] == "MNI152NLin2009aSym"
    assert report["metric"].startswith("Mattes mutual information")
    assert [level["shrink"] for level in report["levels"]] == [4, 2, 1]
    assert report["intensity_scaling"].startswith("min-max")
    assert report["ncc_with_template"] > 0.7 and report["metric_value"] < 0
    assert report["transform_file"] == Path(outputs.out_transform).name


def test_vae_encode_registers_by_default(tmp_path, tiny_model, moved_t1w):
    outputs = run_node(VAEEncode(in_file=str(moved_t1w), model=tiny_model), tmp_path)
    grid = np.asarray(nib.load(outputs.out_conformed).dataobj, dtype=np.float32)
    model = get_model(tiny_model)
    assert grid.shape == model.image_shape
    z_mu, _ = model.encode(grid[None, None])
    np.testing.assert_array_equal(load_latent(outputs.out_mu), np.asarray(z_mu)[0])
    assert transform_errors(read_itk_transform(outputs.out_transform), MOTION)[0] < 1.0
    preparation = json.loads(Path(outputs.out_report).read_text())["Preparation"]
    assert preparation["t1w_space"] == "native"
    assert preparation["template"]["name"] == "MNI152NLin2009aSym"
    assert preparation["transform_file"] == Path(outputs.out_transform).name
    assert preparation["ncc_with_template"] > 0.5
    assert Path(outputs.out_registration).exists()


def test_counterfactual_of_an_mni_space_t1w_is_resampled_not_registered(tmp_path, tiny_model):
    # An fMRIPrep-style input: already in MNI space (here the template itself, as int16).
    template, _ = load_template()
    path = tmp_path / "sub-01_space-MNI152NLin2009cAsym_desc-preproc_T1w.nii.gz"
    data = (np.asarray(template.dataobj) * 1000).astype(np.int16)
    nib.save(nib.Nifti1Image(data, template.affine), path)
    outputs = run_node(
        CounterfactualT1w(in_file=str(path), t1w_space="MNI", model=tiny_model,
                          conditioning_from=[0, 0.5, 0.5, 0.5],
                          conditioning_to=[1, 0.5, 0.5, 0.5], num_inference_steps=2),
        tmp_path,
    )
    np.testing.assert_allclose(read_itk_transform(outputs.out_transform), np.eye(4), atol=1e-12)
    preparation = json.loads(Path(outputs.out_sidecar).read_text())["Preparation"]
    assert preparation["method"].startswith("resampling onto the model grid (input already in MNI")
    assert preparation["ncc_with_template"] > 0.99


def test_a_t1w_that_does_not_register_fails_the_node_in_one_line(tmp_path, tiny_model):
    blob = write_t1w(tmp_path / "sub-01_T1w.nii.gz", np.diag([1.2, 1.2, 1.5, 1.0]), (20, 18, 12))
    with pytest.raises(Exception) as info:
        run_node(VAEEncode(in_file=str(blob), model=tiny_model), tmp_path)
    assert "RegistrationError" in str(info.value)
    assert f"{blob}: rigid registration to the MNI152 template failed" in str(info.value)


def test_resample_to_source_node_inverts_the_registration_exactly_for_a_linear_image(tmp_path):
    # A grid image whose value is a linear function of the MNI point: linear interpolation
    # reproduces it exactly, so the source-grid output is known voxel by voxel.
    from brain_ldm_nodes.interfaces import ResampleToSource
    from brain_ldm_nodes.registration import GRID_CENTRE_MNI_MM, write_itk_transform

    shape = (40, 48, 40)
    ijk = np.indices(shape).reshape(3, -1).T
    mni = apply_affine(model_affine(shape), ijk) + np.asarray(GRID_CENTRE_MNI_MM)
    direction = np.array([0.3, -0.2, 0.5])
    grid = tmp_path / "grid.nii.gz"
    nib.save(nib.Nifti1Image((mni @ direction).reshape(shape).astype(np.float32),
                             model_affine(shape)), grid)
    source_shape = (50, 60, 45)
    source_affine = grid_affine(source_shape, (1.2, 1, 1), "LPS", 10, (3, -12, 4))
    source = tmp_path / "source.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(source_shape, np.float32), source_affine), source)
    transform = write_itk_transform(MOTION, tmp_path / "xfm.txt")

    outputs = run_node(ResampleToSource(in_file=str(grid), source_file=str(source),
                                        transform=str(transform)), tmp_path)
    result = nib.load(outputs.out_file)
    assert result.shape == source_shape
    np.testing.assert_allclose(result.affine, source_affine, atol=1e-5)
    voxels = np.indices(source_shape).reshape(3, -1).T
    points = apply_affine(np.linalg.inv(MOTION), apply_affine(source_affine, voxels))
    inside = np.all(np.abs(points - GRID_CENTRE_MNI_MM) < (np.asarray(shape) - 1) / 2 - 1, axis=1)
    assert inside.sum() > 1000
    got = np.asarray(result.dataobj).reshape(-1)[inside]
    np.testing.assert_allclose(got, points[inside] @ direction, atol=1e-3)


def test_counterfactual_wf_can_resample_back_to_the_source():
    from brain_ldm_nodes.workflows import init_counterfactual_wf

    workflow = init_counterfactual_wf(model="some/repo", to_source=True)
    assert "counterfactual_source" in workflow.get_node("outputnode").inputs.copyable_trait_names()
    assert workflow.get_node("resample_to_source") is not None
    with pytest.raises(ValueError, match="to_source=True needs t1w_space 'native' or 'MNI'"):
        init_counterfactual_wf(model="some/repo", t1w_space="conform", to_source=True)


def test_readme_registration_snippet_runs(tmp_path, moved_t1w, monkeypatch):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Real T1w onto the model grid (registration)", 1)[1]
    snippet = section.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub-01_T1w.nii.gz").symlink_to(moved_t1w)
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    result = namespace["result"]
    assert transform_errors(result.transform, MOTION)[0] < 1.0
    written = tmp_path / "sub-01_from-T1w_to-MNI152NLin2009aSym_mode-image_xfm.txt"
    np.testing.assert_allclose(read_itk_transform(written), result.transform, atol=1e-9)
