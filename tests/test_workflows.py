"""Workflows under the Linear and MultiProc plugins, Nipype's cache, and the example scripts.

MultiProc workers start by ``forkserver``: the test process has already run JAX, which is
multithreaded, and forking it can deadlock. Worker processes and the example scripts share a
persistent JAX compilation cache (under the session's temp folder) so each compiles once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from brain_ldm_nodes.imaging import conform_t1w, load_latent, load_t1w
from brain_ldm_nodes.interfaces import SampleT1w
from brain_ldm_nodes.model_cache import get_model
from brain_ldm_nodes.workflows import init_encode_decode_wf, init_synthesis_wf

from test_interfaces import REPO, SHAPE, STEPS, write_t1w

#: participant label, sex, age (years), ventricular_volume, brain_volume
COHORT = [("01", "F", 63.0, 0.2, 0.4), ("02", "M", 82.0, 0.7, 0.5)]
SEEDS = [1, 2]
PLUGINS = {
    "Linear": {"plugin": "Linear"},
    "MultiProc": {"plugin": "MultiProc", "plugin_args": {"n_procs": 2, "mp_context": "forkserver"}},
}


@pytest.fixture(scope="module", autouse=True)
def shared_jax_cache(tmp_path_factory):
    """Persistent compilation cache for processes started from here (workers, scripts)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path_factory.mktemp("jax_cache")))
        patch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
        yield


def run(workflow: pe.Workflow, plugin: str):
    workflow.config["execution"]["poll_sleep_duration"] = 0.1  # MultiProc's default is 2 s
    return workflow.run(**PLUGINS[plugin])


def cohort_synthesis(model: str, base_dir: Path) -> pe.Workflow:
    """``init_synthesis_wf`` iterated over participants (in lockstep) and over seeds."""
    workflow = pe.Workflow(name="cohort", base_dir=str(base_dir))
    fields = ["label", "sex", "age", "ventricular_volume", "brain_volume"]  # COHORT's columns
    participants = pe.Node(niu.IdentityInterface(fields=fields), name="participants")
    participants.iterables = [
        (field, [row[index] for row in COHORT]) for index, field in enumerate(fields)
    ]
    participants.synchronize = True  # one row at a time, not the product of the columns
    synthesis_wf = init_synthesis_wf(model=model, num_inference_steps=STEPS, mem_gb=0.5)
    synthesis_wf.get_node("inputnode").iterables = [("seed", SEEDS)]  # x every participant
    workflow.connect([
        (participants, synthesis_wf, [(field, f"inputnode.{field}") for field in fields[1:]]),
    ])
    return workflow


def sampled_images(base_dir: Path) -> dict[tuple[str, int], Path]:
    """``{(label, seed): synthetic T1w}`` found in the work folder of :func:`cohort_synthesis`."""
    found = {}
    for path in (base_dir / "cohort" / "synthesis_wf").glob("_age_*/_seed_*/sample_t1w/*.nii.gz"):
        parameters = path.parents[2].name  # _age_63.0_brain_volume_0.4_label_01_sex_F_...
        label = parameters.split("_label_")[1].split("_")[0]
        found[label, int(path.parents[1].name.removeprefix("_seed_"))] = path
    return found


@pytest.mark.parametrize("plugin", ["Linear", "MultiProc"])
def test_synthesis_wf_over_participants_and_seeds_gives_the_library_images(
    tmp_path, tiny_model, plugin
):
    run(cohort_synthesis(tiny_model, tmp_path), plugin)
    images = sampled_images(tmp_path)
    assert set(images) == {(row[0], seed) for row in COHORT for seed in SEEDS}
    model = get_model(tiny_model)
    for label, sex, age, ventricles, brain in COHORT:
        conditioning = [1.0 if sex == "M" else 0.0, (age - 44) / 38, ventricles, brain]
        for seed in SEEDS:
            expected = model.sample(np.array([conditioning]), [seed], num_inference_steps=STEPS)
            data = np.asanyarray(nib.load(images[label, seed]).dataobj)
            np.testing.assert_array_equal(data, np.asarray(expected)[0, 0])
            sidecar_file = images[label, seed].with_suffix("").with_suffix(".json")
            sidecar = json.loads(sidecar_file.read_text())
            assert sidecar["Seed"] == seed and sidecar["Conditioning"]["Values"] == conditioning


def test_rerunning_synthesis_wf_reuses_nipypes_cache_without_sampling_again(
    tmp_path, tiny_model, monkeypatch
):
    def make() -> pe.Workflow:
        workflow = init_synthesis_wf(model=tiny_model, num_inference_steps=STEPS, mem_gb=0.5)
        workflow.base_dir = str(tmp_path)
        workflow.get_node("inputnode").inputs.trait_set(
            sex="F", age=63, ventricular_volume=0.2, brain_volume=0.4, seed=9
        )
        return workflow

    run(make(), "Linear")
    node_dir = tmp_path / "synthesis_wf" / "sample_t1w"
    watched = [node_dir / "synthetic_T1w.nii.gz", node_dir / "result_sample_t1w.pklz"]
    before = [path.stat().st_mtime_ns for path in watched]

    def refuse(self, runtime):
        raise AssertionError("SampleT1w ran again")

    monkeypatch.setattr(SampleT1w, "_run_interface", refuse)
    run(make(), "Linear")
    assert [path.stat().st_mtime_ns for path in watched] == before


def test_synthesis_wf_missing_participant_value_fails_naming_the_input(tmp_path, tiny_model):
    workflow = init_synthesis_wf(model=tiny_model, num_inference_steps=STEPS, mem_gb=0.5)
    workflow.base_dir = str(tmp_path)
    workflow.config["execution"]["crashdump_dir"] = str(tmp_path)
    inputnode = workflow.get_node("inputnode")
    inputnode.inputs.trait_set(sex="F", ventricular_volume=0.2, brain_volume=0.4, seed=1)
    with pytest.raises(ValueError, match="NormaliseDemographics requires a value for input 'age'"):
        run(workflow, "Linear")  # Linear re-raises the node's own error


@pytest.fixture
def t1w(tmp_path) -> Path:
    affine = np.diag([1.2, 1.2, 1.5, 1.0])
    affine[:3, 3] = [-12.0, -10.0, -8.0]
    return write_t1w(tmp_path / "sub-01_T1w.nii.gz", affine, (20, 18, 12))


@pytest.mark.parametrize("plugin", ["Linear", "MultiProc"])
def test_encode_decode_wf_reconstruction_equals_library_decode_of_encode(
    tmp_path, tiny_model, t1w, plugin
):
    workflow = init_encode_decode_wf(model=tiny_model, t1w_space="conform", mem_gb=0.5)
    workflow.base_dir = str(tmp_path)
    workflow.inputs.inputnode.t1w = str(t1w)
    run(workflow, plugin)

    model = get_model(tiny_model)
    conformed, _ = conform_t1w(load_t1w(t1w), shape=SHAPE)
    z_mu, _ = model.encode(np.asarray(conformed.dataobj, dtype=np.float32)[None, None])
    expected = np.asarray(model.decode(z_mu))[0, 0]
    folder = tmp_path / "encode_decode_wf"
    np.testing.assert_array_equal(load_latent(folder / "vae_encode" / "latent_mu.nii.gz"),
                                  np.asarray(z_mu)[0])
    reconstruction = nib.load(folder / "vae_decode" / "decoded_T1w.nii.gz")
    np.testing.assert_array_equal(np.asanyarray(reconstruction.dataobj), expected)
    assert nib.aff2axcodes(reconstruction.affine) == ("L", "A", "S")
    assert (folder / "vae_encode" / "conformed_T1w.nii.gz").exists()


def test_encode_decode_wf_on_the_model_grid_has_no_conformed_output(tmp_path, tiny_model):
    workflow = init_encode_decode_wf(model=tiny_model, t1w_space="model-grid", mem_gb=0.5)
    outputs = workflow.get_node("outputnode").inputs.copyable_trait_names()
    assert "conformed" not in outputs and "transform" not in outputs
    assert workflow.get_node("vae_encode").inputs.t1w_space == "model-grid"


def test_encode_decode_wf_registers_by_default(tiny_model):
    workflow = init_encode_decode_wf(model=tiny_model, mem_gb=0.5)
    assert workflow.get_node("vae_encode").inputs.t1w_space == "native"
    outputs = workflow.get_node("outputnode").inputs.copyable_trait_names()
    assert {"conformed", "transform", "registration"} <= set(outputs)


# --------------------------------------------------------------------------- example scripts


def script(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "workflows" / name), *args],
        cwd=cwd, capture_output=True, text=True, check=False, env=os.environ.copy(),
    )


def test_example_scripts_synthesise_a_cohort_then_reconstruct_it(tmp_path, tiny_model):
    out = tmp_path / "cohort"
    done = script("synthesise_cohort.py", "--model", tiny_model, "--out", str(out),
                  "--seeds", "3", "4", "--steps", str(STEPS), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    images = sorted(out.glob("sub-*/sub-*_seed-*_T1w.nii.gz"))
    assert [path.name for path in images] == [
        "sub-01_seed-3_T1w.nii.gz", "sub-01_seed-4_T1w.nii.gz",
        "sub-02_seed-3_T1w.nii.gz", "sub-02_seed-4_T1w.nii.gz",
    ]
    sidecar = json.loads((out / "sub-02" / "sub-02_seed-4_T1w.json").read_text())
    assert sidecar["Seed"] == 4 and sidecar["Conditioning"]["Values"][0] == 1.0  # sub-02 is male
    expected = get_model(tiny_model).sample(
        np.array([sidecar["Conditioning"]["Values"]]), [4], num_inference_steps=STEPS
    )
    np.testing.assert_array_equal(
        np.asanyarray(nib.load(out / "sub-02" / "sub-02_seed-4_T1w.nii.gz").dataobj),
        np.asarray(expected)[0, 0],
    )

    recon = tmp_path / "recon"
    done = script("reconstruct_t1w.py", "--model", tiny_model, "--out", str(recon),
                  str(images[0]), "--t1w-space", "conform", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    stem = "sub-01_seed-3"
    for suffix in ("desc-reconstruction_T1w.nii.gz", "desc-reconstruction_T1w.json",
                   "desc-mu_latent.nii.gz", "desc-sigma_latent.nii.gz",
                   "desc-conformed_T1w.nii.gz", "encode.json"):
        assert (recon / f"{stem}_{suffix}").exists(), suffix
    assert nib.load(recon / f"{stem}_desc-reconstruction_T1w.nii.gz").shape == SHAPE


def test_example_script_reports_a_bad_model_in_one_line(tmp_path):
    done = script("synthesise_cohort.py", "--model", str(tmp_path / "missing"), "--out",
                  str(tmp_path / "out"), "--steps", "1", cwd=tmp_path)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("synthesise_cohort: ") and "no such bundle folder" in last
