"""The Brain LDM autoencoder as nodes: T1w → latent (``VAEEncode``) → T1w (``VAEDecode``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.affines import voxel_sizes
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    traits,
)

from ..imaging import MODEL_ORIENTATION, load_latent, save_latent, save_t1w, write_json
from ..provenance import decode_sidecar, encode_report
from ._common import (
    InputImage,
    cached_model,
    model_checksum_trait,
    model_trait,
    prepare_t1w,
    revision_trait,
    t1w_space_trait,
)


def as_is_encoder_input(
    img: nib.spatialimages.SpatialImage, multiple: int
) -> tuple[np.ndarray, dict[str, Any]]:
    """Voxels of an image already on a model-style grid (``t1w_space='model-grid'``); a record.

    Requires LAS orientation, 1 mm voxels and sizes that are multiples of ``multiple`` (the
    autoencoder's factor, 8 for the released model); intensities are used as stored (the model
    expects ~[0, 1]). Raises ``ValueError`` saying which requirement failed.
    """
    shape = tuple(int(n) for n in img.shape)
    orientation = "".join(nib.aff2axcodes(img.affine))
    zooms = [float(z) for z in voxel_sizes(img.affine)]
    hint = "; use t1w_space='native' to register it onto the model grid"
    if orientation != "".join(MODEL_ORIENTATION):
        raise ValueError(f"t1w_space='model-grid' needs an LAS image, got {orientation}{hint}")
    if not np.allclose(zooms, 1.0, atol=1e-3):
        raise ValueError(f"t1w_space='model-grid' needs 1 mm voxels, got {zooms} mm{hint}")
    if any(size % multiple for size in shape):
        raise ValueError(
            f"t1w_space='model-grid' needs sizes that are multiples of {multiple}, got "
            f"{shape}{hint}"
        )
    data = np.asarray(img.dataobj, dtype=np.float32)
    record = {
        "method": "none (t1w_space='model-grid'): voxels used as stored, no resampling or "
        "scaling",
        "source_shape": list(shape),
        "source_zooms_mm": zooms,
        "source_orientation": orientation,
        "intensity_min": float(data.min()),
        "intensity_max": float(data.max()),
    }
    return data, record


class _VAEEncodeInputSpec(BaseInterfaceInputSpec):
    in_file = InputImage(
        exists=True, mandatory=True,
        desc="T1-weighted NIfTI, 3-D (or 4-D with one volume); any orientation and voxel size "
        "unless t1w_space='model-grid'",
    )
    t1w_space = t1w_space_trait()
    model = model_trait()
    revision = revision_trait()
    model_checksum = model_checksum_trait()


class _VAEEncodeOutputSpec(TraitedSpec):
    out_latent = File(
        exists=True,
        desc="deterministic latent z_mu (the same file as out_mu): 4-D float32 NIfTI "
        "(d, h, w, 3), 8 mm LAS, centred like the image",
    )
    out_mu = File(exists=True, desc="posterior mean z_mu, latent NIfTI (d, h, w, 3)")
    out_sigma = File(
        exists=True, desc="posterior standard deviation z_sigma, latent NIfTI (d, h, w, 3)"
    )
    out_conformed = File(
        exists=True,
        desc="the input on the model grid (registered, or conformed; not for t1w_space="
        "'model-grid'): 3-D float32 NIfTI in [0, 1], 1 mm LAS",
    )
    out_transform = File(
        exists=True,
        desc="ITK text transform (MNI152 -> source world; BIDS from-T1w_to-MNI152NLin2009aSym"
        "_mode-image_xfm) when t1w_space is 'native' or 'MNI'",
    )
    out_registration = File(
        exists=True, desc="JSON record of the registration (method, template, quality)"
    )
    out_report = File(exists=True, desc="JSON: how the input was prepared, latent shape, model")


class VAEEncode(SimpleInterface):
    """Encode a T1w image with the Brain LDM autoencoder (``BrainLDM.encode``)."""

    input_spec = _VAEEncodeInputSpec
    output_spec = _VAEEncodeOutputSpec

    def _run_interface(self, runtime):
        model = cached_model(self.inputs)
        cwd = Path(runtime.cwd)
        data, preparation, files = prepare_t1w(
            self.inputs.in_file, self.inputs.t1w_space, model,
            model.vae.config.downsampling_factor, cwd,
        )
        self._results.update(files)
        z_mu, z_sigma = (np.asarray(z[0]) for z in model.encode(data[None, None]))
        self._results["out_mu"] = str(save_latent(z_mu, cwd / "latent_mu.nii.gz"))
        self._results["out_sigma"] = str(save_latent(z_sigma, cwd / "latent_sigma.nii.gz"))
        self._results["out_latent"] = self._results["out_mu"]
        report = encode_report(
            model, in_file=self.inputs.in_file, preparation=preparation,
            latent_shape=z_mu.shape, z_sigma=z_sigma,
        )
        self._results["out_report"] = str(write_json(report, cwd / "encode_report.json"))
        return runtime


class _VAEDecodeInputSpec(BaseInterfaceInputSpec):
    in_latent = File(
        exists=True, mandatory=True,
        desc="latent NIfTI (d, h, w, 3) as written by VAEEncode or save_latent; the image is "
        "(8d, 8h, 8w) voxels for the released model",
    )
    model = model_trait()
    revision = revision_trait()
    model_checksum = model_checksum_trait()
    out_prefix = traits.Str(
        "decoded_T1w", usedefault=True,
        desc="file name stem in the node's working directory: <out_prefix>.nii.gz and .json",
    )


class _VAEDecodeOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="decoded T1w: 3-D float32 NIfTI, 1 mm LAS, centred, ~[0, 1]")
    out_sidecar = File(exists=True, desc="JSON sidecar: source latent, model, versions, grid")


class VAEDecode(SimpleInterface):
    """Decode a latent to a T1w image with the Brain LDM autoencoder (``BrainLDM.decode``)."""

    input_spec = _VAEDecodeInputSpec
    output_spec = _VAEDecodeOutputSpec

    def _run_interface(self, runtime):
        model = cached_model(self.inputs)
        latent = load_latent(self.inputs.in_latent)
        image = np.asarray(model.decode(latent[None])[0, 0])
        stem = Path(runtime.cwd) / self.inputs.out_prefix
        out_file = save_t1w(image, f"{stem}.nii.gz", description="Brain LDM decoded T1w")
        sidecar = decode_sidecar(model, latent_file=self.inputs.in_latent, image_shape=image.shape)
        self._results["out_file"] = str(out_file)
        self._results["out_sidecar"] = str(write_json(sidecar, f"{stem}.json"))
        return runtime
