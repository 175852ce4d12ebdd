"""Rigid registration of T1w images to MNI152 onto the model grid (brain_ldm_nodes.registration).

The ground truth is built here, independently of the code under test: the template (or a
synthetic head made from it) moved by a known rigid motion onto a grid of another orientation,
voxel size and field of view (tests/registration_support.py). The transform file's meaning is
checked with SimpleITK itself as the oracle.
"""

from __future__ import annotations

import time

import nibabel as nib
import numpy as np
import pytest
from nibabel.affines import apply_affine

from brain_ldm_nodes.imaging import MODEL_GRID_SHAPE, model_affine
from brain_ldm_nodes.registration import (
    GRID_CENTRE_MNI_MM,
    RegistrationError,
    load_template,
    read_itk_transform,
    register_t1w,
    resample_to_model_grid,
    resample_to_source,
    write_itk_transform,
)
from registration_support import (
    grid_affine,
    moved_image,
    rigid,
    synthetic_head,
    transform_errors,
)

FAST_LEVELS = ((4, 2.0), (2, 1.0))  # final level at 2 mm: the tests' speed setting


@pytest.fixture(scope="module")
def head() -> nib.Nifti1Image:
    return synthetic_head()


@pytest.fixture(scope="module")
def template() -> nib.Nifti1Image:
    return load_template()[0]


def _check_grid_image(image: nib.Nifti1Image, shape=MODEL_GRID_SHAPE) -> None:
    data = np.asarray(image.dataobj)
    assert image.shape == tuple(shape)
    assert data.dtype == np.float32
    assert nib.aff2axcodes(image.affine) == ("L", "A", "S")
    np.testing.assert_allclose(image.affine, model_affine(shape))
    assert data.min() == 0.0 and data.max() == 1.0


def test_template_is_the_documented_mni152_variant(template):
    _, record = load_template()
    assert record["name"] == "MNI152NLin2009aSym"
    assert record["skull_stripped"]
    assert template.shape == (197, 233, 189)
    assert nib.aff2axcodes(template.affine) == ("R", "A", "S")
    # The grid centre is the centre of the template brain's bounding box (documented choice).
    brain = np.argwhere(np.asarray(template.dataobj) > 0)
    low = apply_affine(template.affine, brain.min(0))
    high = apply_affine(template.affine, brain.max(0))
    np.testing.assert_allclose((low + high) / 2, GRID_CENTRE_MNI_MM, atol=0.5)
    # ... and the model grid then holds the whole brain.
    half = (np.asarray(MODEL_GRID_SHAPE) - 1) / 2
    assert np.all(low >= np.asarray(GRID_CENTRE_MNI_MM) - half)
    assert np.all(high <= np.asarray(GRID_CENTRE_MNI_MM) + half)


@pytest.mark.parametrize(
    ("case", "angles", "shift", "shape", "zooms", "orientation", "tilt", "levels"),
    [
        # Skull-stripped input, RAS, 1 mm, smaller field of view; the default (1 mm) pyramid.
        ("brain-RAS-1mm", (10, -8, 5), (12, -15, 8), (180, 216, 180), (1, 1, 1), "RAS", 0, None),
        # Head with scalp and neck, LPS, 1.2 x 1 x 1 mm, oblique header (12 degrees).
        ("head-LPS-oblique", (-15, 5, 10), (-20, 10, 15), (200, 220, 230), (1.2, 1, 1), "LPS",
         12, FAST_LEVELS),
        # Head, PIR-ordered sagittal grid, 1 x 1.3 x 1 mm, large rotation about z.
        ("head-PIR", (5, 12, -15), (8, 20, -12), (200, 180, 230), (1, 1.3, 1), "PIR", 0,
         FAST_LEVELS),
    ],
)
def test_register_t1w_recovers_known_rigid_motion(
    case, angles, shift, shape, zooms, orientation, tilt, levels, head, template
):
    source = template if case.startswith("brain") else head
    motion = rigid(angles, shift)
    moved = moved_image(
        source, motion, shape, grid_affine(shape, zooms, orientation, tilt, (5, -10, -20))
    )
    started = time.perf_counter()
    result = register_t1w(moved, **({} if levels is None else {"levels": levels}))
    seconds = time.perf_counter() - started
    rms_mm, angle_deg = transform_errors(result.transform, motion)
    print(f"{case}: {seconds:.1f} s, RMS {rms_mm:.2f} mm, {angle_deg:.2f} deg, "
          f"NCC {result.ncc:.3f}")
    assert rms_mm < 1.0
    assert angle_deg < 1.0
    _check_grid_image(result.image)
    assert result.ncc > 0.7
    assert result.record["library"].startswith("SimpleITK ")
    assert result.record["template"]["name"] == "MNI152NLin2009aSym"
    assert result.metric is not None and result.metric < 0


def test_register_t1w_custom_shape_and_percentile_scaling(template):
    moved = moved_image(
        template, rigid((0, 0, 8), (5, 0, 0)), (150, 180, 150),
        grid_affine((150, 180, 150), (1, 1, 1), "LAS"),
    )
    result = register_t1w(moved, shape=(96, 128, 96), intensity="percentile", levels=FAST_LEVELS)
    _check_grid_image(result.image, (96, 128, 96))
    assert result.record["intensity_percentiles"] == [0.5, 99.5]
    data = np.asarray(result.image.dataobj)
    assert np.mean(data == 1.0) >= 0.004  # the top 0.5 % is clipped to 1


def test_resample_to_model_grid_of_an_mni_image_is_the_template(template):
    result = resample_to_model_grid(template)  # already in MNI space: identity
    assert result.ncc > 0.999
    _check_grid_image(result.image)
    # Voxel (i, j, k) of the grid is MNI point grid_to_template @ model_affine @ (i, j, k).
    point = np.array([0.0, -17.0, 5.0])  # the grid centre ...
    voxel = (np.asarray(MODEL_GRID_SHAPE) - 1) / 2  # ... is voxel (79.5, 111.5, 79.5)
    np.testing.assert_allclose(
        apply_affine(result.grid_to_template @ result.image.affine, voxel), point
    )


def test_transform_file_is_read_by_simpleitk_with_the_same_meaning(tmp_path):
    sitk = pytest.importorskip("SimpleITK")  # a runtime dependency: must be installed
    motion = rigid((7, -4, 12), (3, -9, 14))
    path = write_itk_transform(
        motion, tmp_path / "sub-01_from-T1w_to-MNI152NLin2009aSym_mode-image_xfm.txt"
    )
    itk = sitk.ReadTransform(str(path))
    flip = np.array([-1.0, -1.0, 1.0])
    for point in ([0.0, 0.0, 0.0], [40.0, -60.0, 25.0], [-70.0, 10.0, -30.0]):
        lps_out = np.asarray(itk.TransformPoint(list(flip * point)))
        np.testing.assert_allclose(flip * lps_out, apply_affine(motion, point), atol=1e-9)
    np.testing.assert_allclose(read_itk_transform(path), motion, atol=1e-12)


def test_resample_to_source_round_trip(template):
    motion = rigid((6, 0, -5), (4, 8, -3))
    affine = grid_affine((150, 190, 160), (1.2, 1, 1), "LPS")
    moved = moved_image(template, motion, (150, 190, 160), affine)
    result = resample_to_model_grid(moved, motion)  # the true transform
    back = resample_to_source(result.image, result, moved)
    assert back.shape == moved.shape
    np.testing.assert_allclose(back.affine, moved.affine)
    original = np.asarray(moved.dataobj)
    brain = original > 0.2 * original.max()
    scaled = original / original.max()
    # Two linear interpolations blur a little; the images agree closely inside the brain.
    assert np.corrcoef(np.asarray(back.dataobj)[brain], scaled[brain])[0, 1] > 0.95


@pytest.mark.parametrize(
    ("shape", "message"),
    [((64, 64), "expects a 3-D T1w image"), ((16, 16, 16, 2), "expects a 3-D T1w image"),
     ((16, 16, 1), "single slice")],
)
def test_register_t1w_refuses_non_volumes(shape, message):
    image = nib.Nifti1Image(np.random.default_rng(0).random(shape).astype(np.float32), np.eye(4))
    with pytest.raises(ValueError, match=message):
        register_t1w(image)


def test_register_t1w_squeezes_a_single_volume_4d_image(template):
    moved = moved_image(template, rigid((0, 4, 0), (0, 6, 0)), (150, 180, 150),
                        grid_affine((150, 180, 150), (1, 1, 1), "RAS"))
    four_d = nib.Nifti1Image(np.asarray(moved.dataobj)[..., None], moved.affine)
    result = register_t1w(four_d, levels=FAST_LEVELS)
    assert result.image.ndim == 3
    assert transform_errors(result.transform, rigid((0, 4, 0), (0, 6, 0)))[0] < 1.0


def test_register_t1w_refuses_what_it_cannot_align():
    noise = np.random.default_rng(1).random((120, 140, 120)).astype(np.float32)
    image = nib.Nifti1Image(noise, grid_affine(noise.shape, (1, 1, 1), "RAS"))
    with pytest.raises(RegistrationError, match="normalised cross-correlation .* < 0.5") as info:
        register_t1w(image, levels=((4, 2.0),))  # one coarse level: it fails at any resolution
    assert info.value.ncc is not None and info.value.ncc < 0.5
    assert "\n" not in str(info.value)


def test_misaligned_input_is_refused_not_returned(template):
    # A correctly registered input passes; the same input claimed to be in MNI space while
    # shifted by 20 mm and rotated by 15 degrees does not.
    moved = moved_image(template, rigid((15, 0, 0), (0, 20, 0)), (170, 200, 170),
                        grid_affine((170, 200, 170), (1, 1, 1), "RAS"))
    with pytest.raises(RegistrationError, match="does not match the MNI152 template"):
        resample_to_model_grid(moved)


def test_register_t1w_refuses_constant_images():
    image = nib.Nifti1Image(np.ones((40, 40, 40), np.float32), np.eye(4))
    with pytest.raises(ValueError, match="constant"):
        register_t1w(image)
