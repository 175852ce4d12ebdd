"""CounterfactualT1w and init_counterfactual_wf on the tiny random-weight bundle.

The node must be a thin wrapper: its files equal a direct ``BrainLDM.counterfactual`` call on
the conformed input, bitwise. The sampler is compiled once per process (STEPS DDIM steps).
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nipype.interfaces.base import isdefined

from brain_ldm_nodes.demographics import CONDITIONING_ORDER, normalise_demographics
from brain_ldm_nodes.imaging import conform_t1w, load_latent, load_t1w, model_affine
from brain_ldm_nodes.interfaces import CounterfactualT1w
from brain_ldm_nodes.model_cache import get_model
from brain_ldm_nodes.provenance import SOFTWARE, write_conditioning
from brain_ldm_nodes.workflows import init_counterfactual_wf

from test_interfaces import REPO, SHAPE, STEPS, run_node, write_t1w

FROM = [0.0, 0.5, 0.2, 0.4]  # female, 63 years
TO = [0.0, 1.0, 0.2, 0.4]  # the same, 82 years
BIDS_T1W = REPO / "bids_examples" / "ds-minimal" / "sub-01" / "anat" / "sub-01_T1w.nii.gz"


@pytest.fixture
def t1w(tmp_path) -> Path:
    """An RAS, 1.2 mm x 1.2 mm x 1.5 mm image of 20 x 18 x 12 voxels: needs conforming."""
    affine = np.diag([1.2, 1.2, 1.5, 1.0])
    affine[:3, 3] = [-12.0, -10.0, -8.0]
    return write_t1w(tmp_path / "sub-01_T1w.nii.gz", affine, (20, 18, 12))


def conformed_data(path: Path) -> np.ndarray:
    conformed, _ = conform_t1w(load_t1w(path), shape=SHAPE)
    return np.asarray(conformed.dataobj, dtype=np.float32)


def image_data(path: str) -> np.ndarray:
    image = nib.load(path)
    assert nib.aff2axcodes(image.affine) == ("L", "A", "S")
    np.testing.assert_array_equal(image.affine, model_affine(SHAPE))
    data = np.asanyarray(image.dataobj)
    assert data.dtype == np.float32 and data.shape == SHAPE
    return data


def test_counterfactual_node_equals_library_counterfactual_of_the_conformed_input_bitwise(
    tmp_path, tiny_model, t1w
):
    outputs = run_node(
        CounterfactualT1w(in_file=str(t1w), conditioning_from=FROM, conditioning_to=TO,
                          num_inference_steps=STEPS, model=tiny_model, t1w_space="conform"),
        tmp_path,
    )
    expected = get_model(tiny_model).counterfactual(
        conformed_data(t1w)[None, None],
        np.asarray([FROM], np.float32),
        np.asarray([TO], np.float32),
        num_inference_steps=STEPS,
    )
    np.testing.assert_array_equal(image_data(outputs.out_file), np.asarray(expected.edited)[0, 0])
    np.testing.assert_array_equal(
        image_data(outputs.out_reconstruction), np.asarray(expected.reconstruction)[0, 0]
    )
    np.testing.assert_array_equal(load_latent(outputs.out_noise), np.asarray(expected.noise)[0])
    # a different target conditioning changes the image (the tiny U-Net is conditioned too)
    assert not np.array_equal(np.asarray(expected.edited), np.asarray(expected.reconstruction))


def test_same_conditioning_from_files_gives_the_reconstruction_and_a_full_sidecar(
    tmp_path, tiny_model, t1w
):
    own = normalise_demographics(
        {"sex": "F", "age": 63.0, "ventricular_volume": 0.2, "brain_volume": 0.4}
    )
    conditioning_file = write_conditioning(own, tmp_path / "conditioning.json")
    outputs = run_node(
        CounterfactualT1w(in_file=str(t1w), conditioning_from_file=str(conditioning_file),
                          conditioning_to_file=str(conditioning_file),
                          num_inference_steps=STEPS, model=tiny_model, t1w_space="conform"),
        tmp_path,
    )
    edited, reconstruction = image_data(outputs.out_file), image_data(outputs.out_reconstruction)
    np.testing.assert_array_equal(edited, reconstruction)

    sidecar = json.loads(Path(outputs.out_sidecar).read_text())
    assert sidecar["Synthetic"] is True
    assert sidecar["Sources"] == [str(t1w)]
    for key in ("ConditioningFrom", "ConditioningTo"):
        assert sidecar[key]["Values"] == list(own.values)
        assert sidecar[key]["Order"] == list(CONDITIONING_ORDER)
        assert sidecar[key]["Derivation"] == json.loads(json.dumps(dict(own.record)))
    assert sidecar["Sampler"]["NumInferenceSteps"] == STEPS
    assert sidecar["Sampler"]["Scheduler"] == get_model(tiny_model).scheduler.to_dict()
    assert sidecar["Model"]["Source"] == json.loads(json.dumps(get_model(tiny_model).source))
    assert set(sidecar["SoftwarePackages"]) == set(SOFTWARE)
    assert isinstance(sidecar["SoftwareVersions"], str)  # BIDS wants a string
    assert sidecar["Grid"]["Shape"] == list(SHAPE)
    assert sidecar["Preparation"]["source_shape"] == [20, 18, 12]

    error = sidecar["ReconstructionError"]
    data = conformed_data(t1w).astype(np.float64)
    difference = reconstruction.astype(np.float64) - data
    assert error["ImageMaxAbs"] == pytest.approx(np.abs(difference).max(), rel=1e-12)
    assert error["ImageRMS"] == pytest.approx(np.sqrt(np.mean(difference**2)), rel=1e-12)
    for name in ("ImageMaxAbs", "ImageRMS", "LatentRelative", "LatentMaxAbs"):
        assert np.isfinite(error[name]) and error[name] >= 0, name


def test_sidecar_records_both_conditionings_given_as_values(tmp_path, tiny_model, t1w):
    outputs = run_node(
        CounterfactualT1w(in_file=str(t1w), conditioning_from=FROM, conditioning_to=TO,
                          num_inference_steps=STEPS, model=tiny_model, t1w_space="conform"),
        tmp_path,
    )
    sidecar = json.loads(Path(outputs.out_sidecar).read_text())
    assert sidecar["ConditioningFrom"]["Values"] == FROM
    assert sidecar["ConditioningTo"]["Values"] == TO
    assert "Derivation" not in sidecar["ConditioningFrom"]
    assert np.isfinite(sidecar["ReconstructionError"]["LatentRelative"])


def test_counterfactual_wf_runs_on_a_bids_example_t1w_with_the_linear_plugin(
    tmp_path, tiny_model
):
    workflow = init_counterfactual_wf(
        model=tiny_model, num_inference_steps=STEPS, t1w_space="conform", mem_gb=0.5
    )
    workflow.base_dir = str(tmp_path)
    workflow.inputs.inputnode.t1w = str(BIDS_T1W)
    workflow.inputs.inputnode.conditioning_from = FROM
    workflow.inputs.inputnode.conditioning_to = TO
    graph = workflow.run(plugin="Linear")

    node = next(n for n in graph.nodes() if n.name == "counterfactual_t1w")
    result = node.result.outputs  # the outputnode (an identity) is pruned from the run graph
    outputnode = workflow.get_node("outputnode")
    wired = {
        (source, target)
        for _, _, data in workflow._graph.in_edges(outputnode, data=True)
        for source, target in data["connect"]
    }
    assert wired == {("out_file", "counterfactual"), ("out_reconstruction", "reconstruction"),
                     ("out_noise", "noise"), ("out_sidecar", "sidecar")}
    expected = get_model(tiny_model).counterfactual(
        conformed_data(BIDS_T1W)[None, None],
        np.asarray([FROM], np.float32),
        np.asarray([TO], np.float32),
        num_inference_steps=STEPS,
    )
    np.testing.assert_array_equal(
        image_data(result.out_file), np.asarray(expected.edited)[0, 0]
    )
    np.testing.assert_array_equal(
        image_data(result.out_reconstruction), np.asarray(expected.reconstruction)[0, 0]
    )
    np.testing.assert_array_equal(load_latent(result.out_noise), np.asarray(expected.noise)[0])
    sidecar = json.loads(Path(result.out_sidecar).read_text())
    assert sidecar["Sources"] == [str(BIDS_T1W)]


def test_workflow_passes_its_settings_to_the_node():
    workflow = init_counterfactual_wf(
        model="some/repo", revision="v1", num_inference_steps=7, t1w_space="model-grid"
    )
    inputs = workflow.get_node("counterfactual_t1w").inputs
    assert (inputs.model, inputs.revision) == ("some/repo", "v1")
    assert inputs.num_inference_steps == 7 and inputs.t1w_space == "model-grid"
    assert set(workflow.get_node("outputnode").inputs.copyable_trait_names()) == {
        "counterfactual", "reconstruction", "noise", "sidecar", "transform"
    }


def test_every_input_and_output_has_a_description():
    for spec in (CounterfactualT1w.input_spec(), CounterfactualT1w.output_spec()):
        for name in spec.copyable_trait_names():
            desc = spec.trait(name).desc
            assert isinstance(desc, str) and len(desc) > 20, f"CounterfactualT1w.{name}"


@pytest.mark.parametrize("which", ["from", "to"])
def test_conditioning_values_and_file_are_mutually_exclusive(tmp_path, which):
    conditioning_file = tmp_path / "c.json"
    conditioning_file.write_text("{}")
    node = CounterfactualT1w(**{f"conditioning_{which}": FROM})
    with pytest.raises(OSError, match="mutually exclusive"):
        setattr(node.inputs, f"conditioning_{which}_file", str(conditioning_file))


def test_missing_conditioning_is_refused_naming_both_inputs(tmp_path, tiny_model, t1w):
    node = CounterfactualT1w(in_file=str(t1w), conditioning_to=TO, model=tiny_model)
    assert not isdefined(node.inputs.conditioning_from)
    with pytest.raises(
        ValueError, match="one of the inputs 'conditioning_from, conditioning_from_file'"
    ):
        run_node(node, tmp_path)
