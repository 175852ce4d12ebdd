"""A real T1w onto the model grid as a node: rigid registration to MNI152 (``RegisterT1w``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from ..imaging import load_t1w, save_t1w, write_json
from ..registration import (
    DEFAULT_MIN_NCC,
    TEMPLATE_NAME,
    read_itk_transform,
    register_t1w,
    resample_to_model_grid,
    resample_to_source,
    write_itk_transform,
)
from ._common import out_prefix_trait


class _RegisterT1wInputSpec(BaseInterfaceInputSpec):
    in_file = File(
        exists=True, mandatory=True,
        desc="T1-weighted NIfTI, 3-D (or 4-D with one volume); any orientation, voxel size and "
        "field of view; header roughly upright (scanner headers are)",
    )
    in_space = traits.Enum(
        "native", "MNI", usedefault=True,
        desc="'native' (default): register rigidly to the MNI152 template. 'MNI': the image is "
        "already in MNI152 2009 space (e.g. fMRIPrep's space-MNI152NLin2009cAsym "
        "desc-preproc T1w): only resampled onto the grid (identity transform)",
    )
    shape = traits.Tuple(
        traits.Int, traits.Int, traits.Int,
        desc="output grid in voxels (1 mm, LAS); default the model's 160 x 224 x 160",
    )
    intensity = traits.Enum(
        "minmax", "percentile", usedefault=True,
        desc="scaling to [0, 1] after resampling: 'minmax' (upstream) or 'percentile' "
        "(0.5th..99.5th percentiles, clipped)",
    )
    min_ncc = traits.Float(
        DEFAULT_MIN_NCC, usedefault=True,
        desc="refuse results whose normalised cross-correlation with the template (inside its "
        "brain mask) is below this (RegistrationError)",
    )
    out_prefix = out_prefix_trait(
        "T1w",
        "<out_prefix>_space-grid.nii.gz, <out_prefix>_registration.json and "
        f"<out_prefix>_from-T1w_to-{TEMPLATE_NAME}_mode-image_xfm.txt",
    )


class _RegisterT1wOutputSpec(TraitedSpec):
    out_file = File(
        exists=True, desc="the T1w on the model grid: 3-D float32 NIfTI, 1 mm LAS, [0, 1]"
    )
    out_transform = File(
        exists=True,
        desc="ITK text transform (AffineTransform_double_3_3, LPS) mapping MNI152 points to "
        "source points, i.e. resampling the source into MNI space (ANTs/fMRIPrep convention)",
    )
    out_report = File(
        exists=True,
        desc="JSON record: method, library and version, template (name, file, sha256), metric, "
        "levels, intensity scaling, quality (ncc_with_template, metric_value), timing",
    )


class RegisterT1w(SimpleInterface):
    """Rigidly register a T1w to MNI152 and resample it onto the model grid
    (:func:`brain_ldm_nodes.registration.register_t1w`)."""

    input_spec = _RegisterT1wInputSpec
    output_spec = _RegisterT1wOutputSpec

    def _run_interface(self, runtime):
        image = load_t1w(self.inputs.in_file)
        shape = self.inputs.shape if isdefined(self.inputs.shape) else None
        function = register_t1w if self.inputs.in_space == "native" else resample_to_model_grid
        try:
            result = function(
                image, shape=shape, intensity=self.inputs.intensity, min_ncc=self.inputs.min_ncc
            )
        except ValueError as exc:  # RegistrationError too: one line naming the file
            raise type(exc)(f"{self.inputs.in_file}: {exc}") from exc
        stem = Path(runtime.cwd) / self.inputs.out_prefix
        transform = write_itk_transform(
            result.transform, f"{stem}_from-T1w_to-{TEMPLATE_NAME}_mode-image_xfm.txt"
        )
        record = {
            **result.record,
            "in_space": self.inputs.in_space,
            "source_file": str(self.inputs.in_file),
            "transform_file": transform.name,
        }
        data = result.image.get_fdata(dtype="float32")
        self._results["out_file"] = str(save_t1w(
            data, f"{stem}_space-grid.nii.gz", description="Brain LDM T1w registered to MNI152"
        ))
        self._results["out_transform"] = str(transform)
        self._results["out_report"] = str(write_json(record, f"{stem}_registration.json"))
        return runtime


class _ResampleToSourceInputSpec(BaseInterfaceInputSpec):
    in_file = File(
        exists=True, mandatory=True,
        desc="image on the model grid (e.g. a counterfactual): 3-D NIfTI, 1 mm LAS, "
        "imaging.model_affine",
    )
    source_file = File(
        exists=True, mandatory=True, desc="the T1w whose grid the output takes (shape, affine)"
    )
    transform = File(
        exists=True, mandatory=True,
        desc="ITK text transform MNI -> source world, as RegisterT1w / VAEEncode / "
        "CounterfactualT1w write it (from-T1w_to-MNI152NLin2009aSym_mode-image_xfm.txt)",
    )
    out_prefix = out_prefix_trait("T1w_space-source", "<out_prefix>.nii.gz")


class _ResampleToSourceOutputSpec(TraitedSpec):
    out_file = File(
        exists=True,
        desc="in_file resampled (linear) onto the source's grid: float32, the source's shape "
        "and affine, 0 outside the model grid",
    )


class ResampleToSource(SimpleInterface):
    """Put a model-grid image back onto the source T1w's grid with the inverse of its
    registration (:func:`brain_ldm_nodes.registration.resample_to_source`)."""

    input_spec = _ResampleToSourceInputSpec
    output_spec = _ResampleToSourceOutputSpec

    def _run_interface(self, runtime):
        source = load_t1w(self.inputs.source_file)
        grid_image = load_t1w(self.inputs.in_file)
        result = resample_to_source(
            grid_image, read_itk_transform(self.inputs.transform), source
        )
        out = Path(runtime.cwd) / f"{self.inputs.out_prefix}.nii.gz"
        self._results["out_file"] = str(save_t1w(
            np.asarray(result.dataobj), out, affine=source.affine,
            description="Brain LDM output resampled onto the source T1w grid",
        ))
        return runtime
