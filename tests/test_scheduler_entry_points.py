"""``scheduler`` at every entry point: the SampleT1w node, the synthesis workflow and
``brain-ldm-bids --scheduler`` (sidecar and resume), with the tiny bundle."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from brain_ldm_nodes.interfaces import SampleT1w
from brain_ldm_nodes.model_cache import get_model
from brain_ldm_nodes.scheduler_names import SCHEDULER_METHODS, SCHEDULERS
from brain_ldm_nodes.workflows.synthesis import init_synthesis_wf

from bids_app_support import app, tree
from test_interfaces import STEPS, run_node

SOLVER_STEPS = 3  # first order, second order, first order (to σ = 0)


def test_sample_t1w_node_runs_the_named_scheduler_and_records_it(tmp_path, tiny_model):
    conditioning = [1.0, 0.5, 0.2, 0.4]
    outputs = run_node(
        SampleT1w(conditioning=conditioning, seed=7, num_inference_steps=SOLVER_STEPS,
                  model=str(tiny_model), scheduler="dpmpp-2m"),
        tmp_path,
    )
    expected = get_model(str(tiny_model)).sample(
        np.array([conditioning]), [7], num_inference_steps=SOLVER_STEPS, scheduler="dpmpp-2m"
    )
    np.testing.assert_array_equal(np.asanyarray(nib.load(outputs.out_file).dataobj),
                                  np.asarray(expected)[0, 0])
    sampler = json.loads(Path(outputs.out_sidecar).read_text())["Sampler"]
    assert sampler["Name"] == "dpmpp-2m"
    assert sampler["Method"] == SCHEDULER_METHODS["dpmpp-2m"]
    assert "DPMSolverMultistepScheduler" in sampler["Method"]
    assert sampler["NumInferenceSteps"] == SOLVER_STEPS


def test_sample_t1w_scheduler_trait_accepts_only_the_known_names():
    assert SampleT1w().inputs.scheduler == "ddim"
    with pytest.raises(Exception, match="dpm"):
        SampleT1w(scheduler="dpm++")


def test_synthesis_workflow_passes_the_scheduler_to_its_sampler():
    for name in SCHEDULERS:
        workflow = init_synthesis_wf(model="some/model", scheduler=name)
        assert workflow.get_node("sample_t1w").inputs.scheduler == name


def test_bids_app_scheduler_is_recorded_and_a_different_one_is_a_different_image(
    tmp_path, tiny_model, finished_run
):
    dataset, finished = finished_run
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    image = out / "sub-02/anat/sub-02_desc-synthetic_T1w.nii.gz"
    sidecar = image.with_name("sub-02_desc-synthetic_T1w.json")
    ddim_image = image.read_bytes()
    assert json.loads(sidecar.read_text())["Sampler"]["Name"] == "ddim"

    args = ("participant", "--model", tiny_model, "--num-inference-steps", STEPS,
            "--participant-label", "02")
    done = app(dataset, out, *args, "--scheduler", "dpmpp-2m")
    assert done.code == 0, done.err
    assert "sub-02 image 1/1: sampling again: Sampler.Method is" in done.out
    assert f"{STEPS} DPM-Solver++ 2M steps" in done.out
    assert json.loads(sidecar.read_text())["Sampler"]["Name"] == "dpmpp-2m"
    assert image.read_bytes() != ddim_image
    before = tree(out)
    again = app(dataset, out, *args, "--scheduler", "dpmpp-2m")
    assert again.code == 0 and "1 already complete, 0 to sample" in again.out
    assert tree(out) == before
    group = app(dataset, out, "group")
    assert group.code == 0, group.err
    rows = (out / "group" / "images.tsv").read_text().splitlines()
    column = rows[0].split("\t").index("scheduler")
    assert sorted(row.split("\t")[column] for row in rows[1:]) == ["ddim", "ddim", "dpmpp-2m"]
    back = app(dataset, out, *args)  # the default, DDIM, again: the original image
    assert back.code == 0 and "sampling again: Sampler.Method is" in back.out
    assert image.read_bytes() == ddim_image


def test_bids_app_ddim_sidecar_without_a_scheduler_name_is_only_refreshed(
    tmp_path, tiny_model, finished_run
):
    """Outputs written before --scheduler existed (no Sampler.Name) are DDIM: not resampled."""
    dataset, finished = finished_run
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    sidecar = out / "sub-01/anat/sub-01_desc-synthetic_T1w.json"
    document = json.loads(sidecar.read_text())
    del document["Sampler"]["Name"]
    sidecar.write_text(json.dumps(document, indent=2))
    image = sidecar.with_name("sub-01_desc-synthetic_T1w.nii.gz").read_bytes()
    done = app(dataset, out, "participant", "--model", tiny_model, "--num-inference-steps", STEPS,
               "--participant-label", "01")
    assert done.code == 0, done.err
    assert "sidecar updated (Sampler.Name is (absent)" in done.out
    assert json.loads(sidecar.read_text())["Sampler"]["Name"] == "ddim"
    assert sidecar.with_name("sub-01_desc-synthetic_T1w.nii.gz").read_bytes() == image


def test_bids_app_counterfactuals_refuse_another_scheduler_in_one_line(
    tmp_path, tiny_model, finished_run
):
    dataset, _ = finished_run
    done = app(dataset, tmp_path / "out", "participant", "--model", tiny_model,
               "--counterfactual", "age=+10", "--scheduler", "unipc")
    assert done.code == 2 and len(done.err_lines) == 1, done.err
    assert "--scheduler unipc" in done.err and "DDIM" in done.err


def test_bids_app_solver_with_as_many_steps_as_training_steps_is_refused_in_one_line(
    tmp_path, tiny_model, finished_run
):
    dataset, _ = finished_run
    done = app(dataset, tmp_path / "out", "participant", "--model", tiny_model,
               "--num-inference-steps", 1000, "--scheduler", "dpmpp-2m")
    assert done.code == 2 and len(done.err_lines) == 1, done.err
    assert "accepted 1 to 999" in done.err


def test_bids_app_help_names_the_schedulers_and_says_counterfactuals_stay_ddim():
    done = app("--help")
    assert done.code == 0
    text = " ".join(done.out.split())
    assert "--scheduler {ddim,dpmpp-2m,unipc}" in text
    assert "Inversion and counterfactuals always use DDIM" in text
