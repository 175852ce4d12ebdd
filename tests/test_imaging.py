"""Tests for brain_ldm_nodes.imaging against the upstream grid facts (UPSTREAM.md section 2)."""

from __future__ import annotations

import gzip
import json
import os

import nibabel as nib
import numpy as np
import pytest
from nibabel.affines import apply_affine, voxel_sizes

from brain_ldm_nodes.imaging import (
    MODEL_GRID_SHAPE,
    atomic_write,
    conform_t1w,
    latent_affine,
    load_latent,
    load_t1w,
    model_affine,
    save_latent,
    save_t1w,
    scale_minmax,
    write_json,
)

# --------------------------------------------------------------------------- grid and affine


def test_model_grid_shape_is_upstream_160_224_160():
    assert MODEL_GRID_SHAPE == (160, 224, 160)


def test_model_affine_orientation_is_las_per_nibabel():
    assert nib.aff2axcodes(model_affine()) == ("L", "A", "S")


def test_model_affine_has_1mm_isotropic_voxels():
    np.testing.assert_allclose(voxel_sizes(model_affine()), [1.0, 1.0, 1.0])


def test_model_affine_maps_grid_centre_voxel_to_world_origin():
    centre = (np.array(MODEL_GRID_SHAPE) - 1) / 2
    np.testing.assert_allclose(apply_affine(model_affine(), centre), [0.0, 0.0, 0.0], atol=1e-12)


def test_model_affine_puts_axis0_index0_on_subject_right_and_axes1_2_anterior_superior():
    affine = model_affine()
    first = apply_affine(affine, [0, 0, 0])
    last = apply_affine(affine, np.array(MODEL_GRID_SHAPE) - 1)
    assert first[0] > 0 > last[0]  # RAS+ world: x > 0 is the subject's right
    assert first[1] < 0 < last[1]  # posterior -> anterior
    assert first[2] < 0 < last[2]  # inferior -> superior


def test_latent_affine_voxel_centres_are_centres_of_their_8x8x8_image_blocks():
    image = model_affine()
    latent = latent_affine((20, 28, 20))
    assert nib.aff2axcodes(latent) == ("L", "A", "S")
    for k in [(0, 0, 0), (19, 27, 19), (3, 11, 7)]:
        block = np.stack(
            np.meshgrid(*[np.arange(8 * i, 8 * i + 8) for i in k], indexing="ij"), -1
        ).reshape(-1, 3)
        np.testing.assert_allclose(
            apply_affine(latent, k), apply_affine(image, block).mean(0), atol=1e-9
        )


# --------------------------------------------------------------------------- atomic writes


def test_atomic_write_success_leaves_only_the_target(tmp_path):
    target = tmp_path / "out.bin"
    atomic_write(target, lambda handle: handle.write(b"new"))
    assert target.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_atomic_write_uses_hidden_temp_in_same_directory_not_named_like_nifti_or_json(tmp_path):
    during = []
    atomic_write(tmp_path / "sub-01_T1w.nii.gz", lambda handle: during.extend(os.listdir(tmp_path)))
    assert len(during) == 1  # the temporary file, in the target's directory
    name = during[0]
    assert name.startswith(".") and name != "sub-01_T1w.nii.gz"
    assert not name.endswith((".nii.gz", ".nii", ".json"))


def test_atomic_write_keeps_old_target_and_removes_temp_when_writer_raises_midway(tmp_path):
    target = tmp_path / "sub-01_T1w.json"
    target.write_bytes(b"old content")

    def write_half_then_fail(handle):
        handle.write(b"partial new con")
        handle.flush()
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        atomic_write(target, write_half_then_fail)
    assert target.read_bytes() == b"old content"
    assert os.listdir(tmp_path) == ["sub-01_T1w.json"]


def test_save_t1w_keeps_old_file_when_serialisation_fails(tmp_path, monkeypatch):
    target = tmp_path / "img.nii.gz"
    save_t1w(np.ones((4, 5, 6)), target)
    before = target.read_bytes()

    def explode(self, stream, **kwargs):
        stream.write(b"\x00" * 100)
        raise OSError("no space left")

    monkeypatch.setattr(nib.Nifti1Image, "to_stream", explode)
    with pytest.raises(OSError, match="no space left"):
        save_t1w(np.zeros((4, 5, 6)), target)
    assert target.read_bytes() == before
    assert os.listdir(tmp_path) == ["img.nii.gz"]


def test_write_json_is_sorted_indented_utf8_with_trailing_newline(tmp_path):
    path = write_json({"b": 1, "a": "Gehirn \u00e9", "c": [1, 2]}, tmp_path / "x.json")
    expected = '{\n  "a": "Gehirn \u00e9",\n  "b": 1,\n  "c": [\n    1,\n    2\n  ]\n}\n'
    assert path.read_bytes() == expected.encode("utf-8")


def test_write_json_converts_numpy_scalars_and_arrays(tmp_path):
    path = write_json({"v": np.float32(0.5), "a": np.arange(3)}, tmp_path / "x.json")
    assert json.loads(path.read_text()) == {"a": [0, 1, 2], "v": 0.5}


def test_write_json_refuses_nan_and_writes_nothing(tmp_path):
    with pytest.raises(ValueError):
        write_json({"x": float("nan")}, tmp_path / "x.json")
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------- save / load T1w


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_save_t1w_round_trip_keeps_float32_data_model_affine_mm_units_codes_and_descrip(
    tmp_path, suffix
):
    rng = np.random.default_rng(0)
    array = rng.random((16, 20, 12))
    path = save_t1w(array, tmp_path / f"sub-01_T1w{suffix}", description="synthetic T1w")
    loaded = nib.load(path)
    assert isinstance(loaded, nib.Nifti1Image)
    assert loaded.get_data_dtype() == np.float32
    np.testing.assert_array_equal(loaded.get_fdata(dtype=np.float32), array.astype(np.float32))
    np.testing.assert_allclose(loaded.affine, model_affine((16, 20, 12)))
    header = loaded.header
    assert header.get_xyzt_units()[0] == "mm"
    assert int(header["qform_code"]) == 2 and int(header["sform_code"]) == 2
    np.testing.assert_allclose(header.get_qform(), model_affine((16, 20, 12)), atol=1e-5)
    assert header["descrip"].item() == b"synthetic T1w"
    assert os.listdir(tmp_path) == [f"sub-01_T1w{suffix}"]


def test_save_t1w_nii_gz_is_gzip_and_nii_is_not(tmp_path):
    gz = save_t1w(np.ones((3, 3, 3)), tmp_path / "a.nii.gz")
    raw = save_t1w(np.ones((3, 3, 3)), tmp_path / "b.nii")
    assert gz.read_bytes()[:2] == b"\x1f\x8b"
    assert raw.read_bytes()[:2] != b"\x1f\x8b"
    with gzip.open(gz) as stream:  # valid gzip stream end to end
        assert len(stream.read()) == len(raw.read_bytes())


def test_save_t1w_uses_given_affine(tmp_path):
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    path = save_t1w(np.ones((3, 3, 3)), tmp_path / "a.nii.gz", affine=affine)
    np.testing.assert_allclose(nib.load(path).affine, affine)


def test_save_t1w_refuses_4d_array_naming_its_shape(tmp_path):
    with pytest.raises(ValueError, match=r"3-D.*\(1, 8, 8, 8\)"):
        save_t1w(np.zeros((1, 8, 8, 8)), tmp_path / "a.nii.gz")
    assert os.listdir(tmp_path) == []


def test_save_t1w_refuses_non_nifti_suffix(tmp_path):
    with pytest.raises(ValueError, match=r"\.nii\.gz"):
        save_t1w(np.zeros((4, 4, 4)), tmp_path / "a.mgz")


def test_save_t1w_refuses_nan_values(tmp_path):
    array = np.zeros((4, 4, 4))
    array[1, 1, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        save_t1w(array, tmp_path / "a.nii.gz")


def test_load_t1w_missing_file_names_the_file(tmp_path):
    missing = tmp_path / "nope_T1w.nii.gz"
    with pytest.raises(FileNotFoundError, match="nope_T1w.nii.gz"):
        load_t1w(missing)


def test_load_t1w_text_file_is_not_a_nifti_error_naming_the_file(tmp_path):
    bogus = tmp_path / "bogus_T1w.nii.gz"
    bogus.write_text("participant_id\tage\n")
    with pytest.raises(ValueError, match="bogus_T1w.nii.gz.*NIfTI"):
        load_t1w(bogus)


def test_load_t1w_rejects_non_nifti_image_format(tmp_path):
    path = tmp_path / "brain.mgz"
    nib.save(nib.MGHImage(np.ones((4, 4, 4), np.float32), np.eye(4)), path)
    with pytest.raises(ValueError, match="brain.mgz: not a NIfTI"):
        load_t1w(path)


def test_load_t1w_rejects_multi_volume_4d_naming_the_shape(tmp_path):
    path = tmp_path / "bold.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4, 2), np.float32), np.eye(4)), path)
    with pytest.raises(ValueError, match=r"bold.nii.gz.*3-D.*\(4, 4, 4, 2\)"):
        load_t1w(path)


def test_load_t1w_squeezes_single_volume_4d_to_3d(tmp_path):
    path = tmp_path / "one.nii.gz"
    data = np.arange(64, dtype=np.float32).reshape(4, 4, 4, 1)
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0])), path)
    image = load_t1w(path)
    assert image.shape == (4, 4, 4)
    np.testing.assert_array_equal(np.asarray(image.dataobj), data[..., 0])
    np.testing.assert_allclose(image.affine, np.diag([2.0, 2.0, 2.0, 1.0]))


def test_load_t1w_rejects_non_finite_voxels_naming_the_file(tmp_path):
    path = tmp_path / "nan_T1w.nii"
    data = np.ones((4, 4, 4), np.float32)
    data[0, 0, 0] = np.inf
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    with pytest.raises(ValueError, match="nan_T1w.nii: 1 voxels are NaN or infinite"):
        load_t1w(path)


# --------------------------------------------------------------------------- latents


def test_save_latent_round_trip_is_4d_nifti_with_8mm_las_affine_centred_like_image(tmp_path):
    rng = np.random.default_rng(1)
    latent = rng.standard_normal((3, 20, 28, 20)).astype(np.float32)
    path = save_latent(latent, tmp_path / "sub-01_latent.nii.gz")
    image = nib.load(path)
    assert image.shape == (20, 28, 20, 3)
    np.testing.assert_array_equal(image.get_fdata(dtype=np.float32)[..., 2], latent[2])
    assert nib.aff2axcodes(image.affine) == ("L", "A", "S")
    np.testing.assert_allclose(voxel_sizes(image.affine), [8.0, 8.0, 8.0])
    np.testing.assert_allclose(apply_affine(image.affine, [9.5, 13.5, 9.5]), [0, 0, 0], atol=1e-9)
    loaded = load_latent(path)
    assert loaded.dtype == np.float32 and loaded.shape == (3, 20, 28, 20)
    np.testing.assert_array_equal(loaded, latent)


def test_save_latent_refuses_batched_latent_naming_shape(tmp_path):
    with pytest.raises(ValueError, match=r"\(C, d, h, w\).*\(1, 3, 4, 4, 4\)"):
        save_latent(np.zeros((1, 3, 4, 4, 4)), tmp_path / "z.nii.gz")


# --------------------------------------------------------------------------- scaling / conform


def test_scale_minmax_maps_min_to_0_max_to_1_as_float32():
    scaled = scale_minmax(np.array([[-5.0, 0.0], [5.0, 15.0]]))
    assert scaled.dtype == np.float32
    np.testing.assert_allclose(scaled, [[0.0, 0.25], [0.5, 1.0]])


def test_scale_minmax_constant_image_is_a_clear_error():
    with pytest.raises(ValueError, match="constant image"):
        scale_minmax(np.full((3, 3, 3), 7.0))


def _synthetic_image(affine: np.ndarray, shape, cube_world_mm, half_width_mm=6.0):
    """Background 10, a bright (1000) cube around a world point; returns the image."""
    voxels = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    world = apply_affine(affine, voxels)
    inside = np.all(np.abs(world - np.asarray(cube_world_mm)) <= half_width_mm, axis=-1)
    data = np.where(inside, 1000.0, 10.0).astype(np.float32)
    return nib.Nifti1Image(data, affine)


def _centred(directions: np.ndarray, shape) -> np.ndarray:
    """Affine with the given 3x3 directions whose centre voxel is at world (0, 0, 0)."""
    affine = np.eye(4)
    affine[:3, :3] = directions
    affine[:3, 3] = -directions @ ((np.asarray(shape) - 1) / 2)
    return affine


def _bright_centroid_world(image: nib.Nifti1Image) -> np.ndarray:
    data = np.asarray(image.dataobj)
    weights = np.clip(data - 0.5, 0, None)
    index = np.argwhere(weights > 0)
    centroid = (index * weights[weights > 0][:, None]).sum(0) / weights[weights > 0].sum()
    return apply_affine(image.affine, centroid)


# Subject's right (x > 0), anterior, inferior: axis-0 index must land below the centre.
CUBE_WORLD_MM = (23.0, 31.0, -17.0)


@pytest.mark.parametrize(
    "directions, shape",
    [
        (np.diag([2.0, 2.0, 2.0]), (64, 80, 70)),  # RAS, 2 mm, different shape
        # axis0 -> posterior, axis1 -> inferior, axis2 -> right (a "PIR" acquisition), 1.5 mm
        (np.array([[0, 0, 1.5], [-1.5, 0, 0], [0, -1.5, 0]]), (90, 77, 101)),
    ],
    ids=["RAS_2mm", "PIR_1.5mm"],
)
def test_conform_keeps_offset_cube_at_its_world_position_on_las_model_grid(directions, shape):
    source = _synthetic_image(_centred(directions, shape), shape, CUBE_WORLD_MM)
    conformed, _ = conform_t1w(source)
    assert conformed.shape == MODEL_GRID_SHAPE
    np.testing.assert_allclose(conformed.affine, model_affine())
    centroid = _bright_centroid_world(conformed)
    np.testing.assert_allclose(centroid, CUBE_WORLD_MM, atol=1.0)
    # LAS: the right-sided cube sits at low axis-0 indices, anterior/inferior as expected.
    index = np.argwhere(np.asarray(conformed.dataobj) > 0.5).mean(0)
    assert index[0] < 79.5 and index[1] > 111.5 and index[2] < 79.5


def test_conform_output_is_float32_in_unit_range_on_160_224_160_grid_with_record():
    shape = (64, 80, 70)
    source = _synthetic_image(_centred(np.diag([2.0, 2.0, 2.0]), shape), shape, CUBE_WORLD_MM)
    conformed, record = conform_t1w(source)
    data = np.asarray(conformed.dataobj)
    assert data.dtype == np.float32 and data.shape == (160, 224, 160)
    assert data.min() == 0.0 and data.max() == 1.0
    assert nib.aff2axcodes(conformed.affine) == ("L", "A", "S")
    assert record["source_shape"] == [64, 80, 70]
    assert record["source_zooms_mm"] == [2.0, 2.0, 2.0]
    assert record["source_orientation"] == "RAS"
    assert record["intensity_min"] == 10.0 and record["intensity_max"] == 1000.0
    assert record["source_centre_world_mm"] == [0.0, 0.0, 0.0]
    assert "not registration to MNI" in record["method"]
    json.dumps(record)  # sidecar-ready


def test_conform_maps_input_centre_to_grid_centre_even_when_input_is_off_origin():
    shape = (40, 50, 44)
    affine = _centred(np.diag([2.0, 2.0, 2.0]), shape)
    affine[:3, 3] += [30.0, -12.0, 55.0]  # scanner centre far from the isocentre
    source = _synthetic_image(affine, shape, [30.0, -12.0, 55.0])  # cube at the image centre
    conformed, record = conform_t1w(source, shape=(64, 64, 64))
    np.testing.assert_allclose(_bright_centroid_world(conformed), [0, 0, 0], atol=1.0)
    np.testing.assert_allclose(record["source_centre_world_mm"], [30.0, -12.0, 55.0])


def test_conform_matches_nibabel_processing_conform_when_both_centres_are_whole_voxels():
    # Odd shapes make nibabel's integer centre (n - 1) // 2 exact, so the two must agree.
    from nibabel.processing import conform

    rng = np.random.default_rng(2)
    data = rng.random((31, 37, 29)).astype(np.float32)
    data[0, 0, 0] = 0.0  # padding value 0 in both
    source = nib.Nifti1Image(data, _centred(np.diag([2.0, 2.0, 2.0]), data.shape))
    out_shape = (41, 45, 39)
    ours, _ = conform_t1w(source, shape=out_shape)
    reference = conform(
        source, out_shape=out_shape, voxel_size=(1, 1, 1), order=1, orientation="LAS"
    )
    np.testing.assert_allclose(
        np.asarray(ours.dataobj), scale_minmax(np.asarray(reference.dataobj)), atol=1e-5
    )


def test_conform_constant_image_is_a_clear_error():
    source = nib.Nifti1Image(np.full((8, 8, 8), 3.0, np.float32), np.eye(4))
    with pytest.raises(ValueError, match="constant image"):
        conform_t1w(source, shape=(16, 16, 16))


def test_conform_refuses_4d_input_naming_shape():
    source = nib.Nifti1Image(np.ones((8, 8, 8, 2), np.float32), np.eye(4))
    with pytest.raises(ValueError, match=r"3-D.*\(8, 8, 8, 2\)"):
        conform_t1w(source)

