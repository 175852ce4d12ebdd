"""Nipype interfaces run as real nodes on a tiny random-weight bundle, against library calls."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nipype.interfaces.base import BaseInterface, isdefined
from nipype.pipeline import engine as pe
from traits.api import TraitError

import brain_ldm_nodes.interfaces as interfaces
from brain_ldm_nodes.demographics import (
    CONDITIONING_ORDER,
    DemographicsPolicy,
    normalise_demographics,
)
from brain_ldm_nodes.imaging import conform_t1w, load_latent, load_t1w, model_affine
from brain_ldm_nodes.interfaces import NormaliseDemographics, SampleT1w, VAEDecode, VAEEncode
from brain_ldm_nodes.model_cache import get_model
from brain_ldm_nodes.pipeline import BrainLDM
from brain_ldm_nodes import __version__
from brain_ldm_nodes.provenance import SOFTWARE

REPO = Path(__file__).resolve().parents[1]
SHAPE = (16, 16, 16)  # the tiny bundle's native grid: multiples of 8 = 2 (its VAE) x 4 (its U-Net)
STEPS = 2  # DDIM steps everywhere in these tests: one compiled sampler per process


def build_tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's tiny bundle, made once by ``workflows/make_tiny_bundle.py`` at a fixed
    place under the session's base temp (the ``tiny_model`` fixture, tests/conftest.py)."""
    folder = tmp_path_factory.getbasetemp() / "tiny_bundle" / "model"
    if not (folder / "config.json").exists():
        script = REPO / "workflows" / "make_tiny_bundle.py"
        shape = [str(size) for size in SHAPE]
        subprocess.run(
            [sys.executable, str(script), str(folder), "--image-shape", *shape], check=True
        )
    return folder


def run_node(interface: BaseInterface, base_dir: Path, name: str = "node"):
    """Run ``interface`` as a Nipype node in ``base_dir``; returns the node's outputs."""
    return pe.Node(interface, name=name, base_dir=str(base_dir)).run().outputs


def write_t1w(path: Path, affine: np.ndarray, shape: tuple[int, int, int]) -> Path:
    """A smooth, non-constant int16 test image (a bright blob) with ``affine``."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    data = 1000 * np.exp(-3 * (grid**2).sum(0)) + 50 * grid[0]
    nib.save(nib.Nifti1Image(data.astype(np.int16), affine), path)
    return path


# --------------------------------------------------------------------------- NormaliseDemographics


@pytest.mark.parametrize("sex, sex_value", [("F", 0.0), ("male", 1.0)])
def test_normalise_demographics_node_gives_upstream_values_in_upstream_order(
    tmp_path, sex, sex_value
):
    outputs = run_node(
        NormaliseDemographics(sex=sex, age=63, ventricular_volume=0.2, brain_volume=0.4), tmp_path
    )
    expected = [sex_value, 0.5, 0.2, 0.4]  # age 63 -> (63 - 44) / (82 - 44) = 0.5
    assert outputs.conditioning == expected
    document = json.loads(Path(outputs.out_file).read_text())
    assert document["order"] == ["sex", "age", "ventricular_volume", "brain_volume"]
    assert document["conditioning"] == expected
    direct = normalise_demographics(
        {"sex": sex, "age": 63.0, "ventricular_volume": 0.2, "brain_volume": 0.4}
    )
    assert document["record"] == json.loads(json.dumps(dict(direct.record)))
    assert document["policy"] == DemographicsPolicy().to_dict()


def test_normalise_demographics_records_the_mm3_mapping_as_unpublished_approximation(tmp_path):
    policy_file = tmp_path / "policy.json"
    policy_file.write_text(json.dumps({
        "ventricular_volume_range_mm3": [10000, 110000],
        "brain_volume_range_mm3": [1000000, 1600000],
    }))
    outputs = run_node(
        NormaliseDemographics(sex="M", age=82, ventricular_volume=60000, brain_volume=1300000,
                              policy_file=str(policy_file)),
        tmp_path,
    )
    assert outputs.conditioning == pytest.approx([1.0, 1.0, 0.5, 0.5])
    record = json.loads(Path(outputs.out_file).read_text())["record"]
    for name in ("ventricular_volume", "brain_volume"):
        assert record[name]["approximation"] is True
        assert "unpublished" in record[name]["note"]
        assert record[name]["how"] == "minmax_reference_range"


@pytest.mark.parametrize(
    "age, value, how", [("60-66", 0.5, "range_midpoint"), ("44+", 0.0, "open_ended_lower_bound")]
)
def test_normalise_demographics_accepts_age_ranges_and_open_ended_ages(tmp_path, age, value, how):
    outputs = run_node(
        NormaliseDemographics(sex="F", age=age, ventricular_volume=0.2, brain_volume=0.4), tmp_path
    )
    assert outputs.conditioning[1] == value
    assert json.loads(Path(outputs.out_file).read_text())["record"]["age"]["how"] == how


def test_normalise_demographics_out_of_range_input_overrides_the_policy(tmp_path):
    inputs = dict(sex="F", age=90, ventricular_volume=0.2, brain_volume=0.4)
    with pytest.raises(Exception, match="age: 90 years normalises to"):
        run_node(NormaliseDemographics(**inputs), tmp_path, name="default_error")
    clipped = run_node(NormaliseDemographics(out_of_range="clip", **inputs), tmp_path, name="clip")
    assert clipped.conditioning[1] == 1.0
    record = json.loads(Path(clipped.out_file).read_text())["record"]["age"]
    assert record["clipped"] is True and record["out_of_range_policy"] == "clip"


def test_normalise_demographics_missing_value_names_the_field(tmp_path):
    with pytest.raises(Exception, match="age: missing value"):
        run_node(
            NormaliseDemographics(sex="F", age="n/a", ventricular_volume=0.2, brain_volume=0.4),
            tmp_path,
        )
    # a missing volume takes the MONAI bundle's default (0.4), recorded; strict on request
    outputs = run_node(
        NormaliseDemographics(sex="F", age=63, ventricular_volume=0.2, brain_volume="n/a"),
        tmp_path, name="defaulted",
    )
    assert outputs.conditioning[3] == 0.4
    assert json.loads(Path(outputs.out_file).read_text())["record"]["brain_volume"]["defaulted"]
    strict = tmp_path / "strict.json"
    strict.write_text(json.dumps({"missing_volumes": "error"}))
    with pytest.raises(Exception, match="brain_volume: missing value"):
        run_node(
            NormaliseDemographics(sex="F", age=63, ventricular_volume=0.2, brain_volume="n/a",
                                  policy_file=str(strict)),
            tmp_path, name="strict",
        )


# --------------------------------------------------------------------------- SampleT1w


def test_sample_t1w_node_equals_library_sample_bitwise_as_3d_float32_las(tmp_path, tiny_model):
    conditioning = [1.0, 0.5, 0.2, 0.4]
    outputs = run_node(
        SampleT1w(conditioning=conditioning, seed=7, num_inference_steps=STEPS, model=tiny_model),
        tmp_path,
    )
    image = nib.load(outputs.out_file)
    expected = get_model(tiny_model).sample(
        np.array([conditioning]), [7], num_inference_steps=STEPS
    )
    data = np.asanyarray(image.dataobj)
    assert data.dtype == np.float32 and data.shape == SHAPE
    np.testing.assert_array_equal(data, np.asarray(expected)[0, 0])
    assert nib.aff2axcodes(image.affine) == ("L", "A", "S")
    np.testing.assert_array_equal(image.affine, model_affine(SHAPE))
    assert Path(outputs.out_file).name == "synthetic_T1w.nii.gz"


def test_sample_t1w_sidecar_records_seed_steps_model_versions_and_grid(tmp_path, tiny_model):
    outputs = run_node(
        SampleT1w(conditioning=[0.0, 0.1, 0.2, 0.4], seed=3, num_inference_steps=STEPS,
                  model=tiny_model, out_prefix="sub-01_T1w"),
        tmp_path,
    )
    assert Path(outputs.out_sidecar).name == "sub-01_T1w.json"
    sidecar = json.loads(Path(outputs.out_sidecar).read_text())
    model = get_model(tiny_model)
    assert sidecar["Synthetic"] is True and sidecar["Description"]
    assert sidecar["Seed"] == 3
    assert sidecar["Conditioning"]["Values"] == [0.0, 0.1, 0.2, 0.4]
    assert sidecar["Conditioning"]["Order"] == list(CONDITIONING_ORDER)
    assert "Derivation" not in sidecar["Conditioning"]  # given normalised: nothing to derive
    assert sidecar["Sampler"]["NumInferenceSteps"] == STEPS
    assert sidecar["Sampler"]["Scheduler"] == model.scheduler.to_dict()
    config = json.loads((Path(tiny_model) / "config.json").read_text())
    assert sidecar["Model"]["Source"]["model"]["weights_sha256"] == config["weights_sha256"]
    assert set(sidecar["SoftwarePackages"]) == set(SOFTWARE)
    assert all(sidecar["SoftwarePackages"].values())
    assert sidecar["SoftwareVersions"].startswith(f"brain_ldm_nodes {__version__}, jax ")
    grid = sidecar["Grid"]
    assert grid["Orientation"] == "LAS" and grid["VoxelSizeMM"] == 1.0
    assert grid["Shape"] == list(SHAPE)
    assert grid["Affine"] == model_affine(SHAPE).tolist()
    assert "(0, 0, 0)" in grid["Origin"]


def test_sample_t1w_from_conditioning_file_keeps_derivation_and_same_image(tmp_path, tiny_model):
    normalised = run_node(
        NormaliseDemographics(sex="M", age=63, ventricular_volume=0.2, brain_volume=0.4),
        tmp_path, name="normalise",
    )
    common = dict(seed=5, num_inference_steps=STEPS, model=tiny_model)
    from_file = run_node(
        SampleT1w(conditioning_file=normalised.out_file, **common), tmp_path, name="from_file"
    )
    from_list = run_node(
        SampleT1w(conditioning=normalised.conditioning, **common), tmp_path, name="from_list"
    )
    np.testing.assert_array_equal(
        nib.load(from_file.out_file).get_fdata(), nib.load(from_list.out_file).get_fdata()
    )
    derivation = json.loads(Path(from_file.out_sidecar).read_text())["Conditioning"]["Derivation"]
    assert derivation["age"]["formula"] == "(age_years - 44) / (82 - 44)"


def test_sample_t1w_image_shape_input_changes_the_grid(tmp_path, tiny_model):
    outputs = run_node(
        SampleT1w(conditioning=[1.0, 0.5, 0.2, 0.4], seed=1, num_inference_steps=STEPS,
                  model=tiny_model, image_shape=(8, 16, 8)),
        tmp_path,
    )
    image = nib.load(outputs.out_file)
    assert image.shape == (8, 16, 8)
    np.testing.assert_array_equal(image.affine, model_affine((8, 16, 8)))


def test_sample_t1w_rejects_three_conditioning_values_naming_the_input():
    with pytest.raises(TraitError, match="'conditioning' trait of a _SampleT1wInputSpec"):
        SampleT1w(conditioning=[1.0, 0.5, 0.2])


def test_sample_t1w_rejects_a_conditioning_file_with_three_values_naming_the_file(
    tmp_path, tiny_model
):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"conditioning": [1.0, 0.5, 0.2]}))
    with pytest.raises(Exception, match=r"bad\.json: 'conditioning' must be a list of 4"):
        run_node(SampleT1w(conditioning_file=str(bad), seed=1, model=tiny_model), tmp_path)


def test_sample_t1w_rejects_seeds_outside_32_bits():
    with pytest.raises(TraitError, match="'seed' trait"):
        SampleT1w(seed=2**32)
    with pytest.raises(TraitError, match="'seed' trait"):
        SampleT1w(seed=-1)


def test_missing_mandatory_inputs_give_nipypes_error_naming_them(tmp_path, tiny_model):
    with pytest.raises(ValueError, match="SampleT1w requires a value for input 'model'"):
        run_node(SampleT1w(conditioning=[1.0, 0.5, 0.2, 0.4], seed=1), tmp_path, name="no_model")
    with pytest.raises(
        ValueError, match="requires a value for one of the inputs 'conditioning, conditioning_file'"
    ):
        run_node(SampleT1w(seed=1, model=tiny_model), tmp_path, name="no_conditioning")
    with pytest.raises(ValueError, match="NormaliseDemographics requires a value for input 'age'"):
        run_node(NormaliseDemographics(sex="F", ventricular_volume=0.2, brain_volume=0.4),
                 tmp_path, name="no_age")


def test_conditioning_and_conditioning_file_are_mutually_exclusive(tmp_path):
    conditioning_file = tmp_path / "c.json"
    conditioning_file.write_text("{}")
    sample = SampleT1w(conditioning=[1.0, 0.5, 0.2, 0.4])
    with pytest.raises(OSError, match="mutually exclusive"):
        sample.inputs.conditioning_file = str(conditioning_file)


# --------------------------------------------------------------------------- every interface


@pytest.mark.parametrize("name", interfaces.__all__)
def test_every_input_and_output_trait_has_a_description(name):
    interface = getattr(interfaces, name)
    for spec in (interface.input_spec(), interface.output_spec()):
        for trait_name in spec.copyable_trait_names():
            desc = spec.trait(trait_name).desc
            assert isinstance(desc, str) and len(desc) > 20, f"{name}.{trait_name} lacks a desc"


def test_interfaces_take_the_model_from_the_process_cache(tmp_path, tiny_model, monkeypatch):
    get_model(tiny_model)  # loaded (cached) once

    def refuse(*args, **kwargs):
        raise AssertionError("an interface loaded the model itself")

    monkeypatch.setattr(BrainLDM, "from_pretrained", refuse)
    outputs = run_node(
        SampleT1w(conditioning=[1.0, 0.5, 0.2, 0.4], seed=2, num_inference_steps=STEPS,
                  model=tiny_model),
        tmp_path,
    )
    assert Path(outputs.out_file).exists()


# --------------------------------------------------------------------------- VAEEncode / VAEDecode


@pytest.fixture
def oblique_t1w(tmp_path) -> Path:
    """An RAS, 1.2 mm x 1.2 mm x 1.5 mm image of 20 x 18 x 12 voxels: needs conforming."""
    affine = np.diag([1.2, 1.2, 1.5, 1.0])
    affine[:3, 3] = [-12.0, -10.0, -8.0]
    return write_t1w(tmp_path / "sub-01_T1w.nii.gz", affine, (20, 18, 12))


def test_vae_encode_node_conforms_and_equals_library_encode(tmp_path, tiny_model, oblique_t1w):
    outputs = run_node(
        VAEEncode(in_file=str(oblique_t1w), t1w_space="conform", model=tiny_model), tmp_path
    )
    conformed, record = conform_t1w(load_t1w(oblique_t1w), shape=SHAPE)
    conformed_data = np.asarray(conformed.dataobj, dtype=np.float32)
    written = nib.load(outputs.out_conformed)
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), conformed_data)
    assert nib.aff2axcodes(written.affine) == ("L", "A", "S")

    z_mu, z_sigma = get_model(tiny_model).encode(conformed_data[None, None])
    np.testing.assert_array_equal(load_latent(outputs.out_mu), np.asarray(z_mu)[0])
    np.testing.assert_array_equal(load_latent(outputs.out_sigma), np.asarray(z_sigma)[0])
    assert outputs.out_latent == outputs.out_mu  # the deterministic latent is z_mu
    report = json.loads(Path(outputs.out_report).read_text())
    assert report["Preparation"] == json.loads(json.dumps({**record, "t1w_space": "conform"}))
    assert report["LatentShape"] == list(np.asarray(z_mu).shape[1:])


def test_vae_encode_on_the_model_grid_uses_the_voxels_as_stored(tmp_path, tiny_model):
    data = np.random.default_rng(0).random(SHAPE, dtype=np.float32)
    las = tmp_path / "las.nii.gz"
    nib.save(nib.Nifti1Image(data, model_affine(SHAPE)), las)
    outputs = run_node(
        VAEEncode(in_file=str(las), t1w_space="model-grid", model=tiny_model), tmp_path
    )
    z_mu, _ = get_model(tiny_model).encode(data[None, None])
    np.testing.assert_array_equal(load_latent(outputs.out_latent), np.asarray(z_mu)[0])
    assert not isdefined(outputs.out_conformed)


def test_vae_encode_on_the_model_grid_refuses_a_non_las_image(tmp_path, tiny_model, oblique_t1w):
    with pytest.raises(Exception, match="t1w_space='model-grid' needs an LAS image, got RAS"):
        run_node(
            VAEEncode(in_file=str(oblique_t1w), t1w_space="model-grid", model=tiny_model),
            tmp_path,
        )


def test_vae_decode_node_equals_library_decode_as_3d_float32_las(tmp_path, tiny_model, oblique_t1w):
    encoded = run_node(
        VAEEncode(in_file=str(oblique_t1w), t1w_space="conform", model=tiny_model), tmp_path,
        name="enc",
    )
    outputs = run_node(
        VAEDecode(in_latent=encoded.out_latent, model=tiny_model), tmp_path, name="dec"
    )
    expected = get_model(tiny_model).decode(load_latent(encoded.out_latent)[None])
    image = nib.load(outputs.out_file)
    data = np.asanyarray(image.dataobj)
    assert data.dtype == np.float32 and data.shape == SHAPE
    np.testing.assert_array_equal(data, np.asarray(expected)[0, 0])
    assert nib.aff2axcodes(image.affine) == ("L", "A", "S")
    sidecar = json.loads(Path(outputs.out_sidecar).read_text())
    assert sidecar["Synthetic"] is True
    assert sidecar["Sources"] == [encoded.out_latent]
    assert sidecar["Grid"]["Shape"] == list(SHAPE)


def test_model_checksum_is_part_of_the_hash_and_must_match_the_weights(tmp_path, tiny_model):
    """A bundle re-converted in place keeps its folder name: only model_checksum tells Nipype."""
    from brain_ldm_nodes.weights.identity import ModelIdentity

    checksum = ModelIdentity.resolve(tiny_model).checksum
    unet_sha256, vae_sha256 = checksum.split(":")
    assert json.loads((Path(tiny_model) / "config.json").read_text())["weights_sha256"] == \
        unet_sha256
    common = dict(conditioning=[0.0, 0.1, 0.2, 0.4], seed=3, num_inference_steps=STEPS,
                  model=tiny_model)
    stale = f"{'0' * 64}:{vae_sha256}"
    right, wrong = SampleT1w(**common, model_checksum=checksum), SampleT1w(**common,
                                                                         model_checksum=stale)
    assert right.inputs.get_hashval()[1] != wrong.inputs.get_hashval()[1]
    assert right.inputs.get_hashval()[1] != SampleT1w(**common).inputs.get_hashval()[1]
    assert Path(run_node(right, tmp_path, name="right").out_file).exists()
    with pytest.raises(Exception, match=f"its weights are {checksum}, not model_checksum {stale}"):
        run_node(wrong, tmp_path, name="wrong")
