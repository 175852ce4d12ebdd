"""The Brain LDM autoencoder as nodes: T1w → latent (``VAEEncode``) → T1w (``VAEDecode``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from nipype.interfaces.base import File, SimpleInterface, TraitedSpec

from ..imaging import load_latent, save_latent, save_t1w, write_json
from ..provenance import decode_sidecar, encode_report
from ._common import (
    InputImage,
    ModelInputSpec,
    PreparedT1wOutputSpec,
    cached_model,
    model_and_t1w,
    out_prefix_trait,
    t1w_space_trait,
)


class _VAEEncodeInputSpec(ModelInputSpec):
    in_file = InputImage(
        exists=True, mandatory=True,
        desc="T1-weighted NIfTI, 3-D (or 4-D with one volume); any orientation and voxel size "
        "unless t1w_space='model-grid'",
    )
    t1w_space = t1w_space_trait()


class _VAEEncodeOutputSpec(PreparedT1wOutputSpec):
    out_latent = File(
        exists=True,
        desc="deterministic latent z_mu (the same file as out_mu): 4-D float32 NIfTI "
        "(d, h, w, 3), 8 mm LAS, centred like the image",
    )
    out_mu = File(exists=True, desc="posterior mean z_mu, latent NIfTI (d, h, w, 3)")
    out_sigma = File(
        exists=True, desc="posterior standard deviation z_sigma, latent NIfTI (d, h, w, 3)"
    )
    out_report = File(exists=True, desc="JSON: how the input was prepared, latent shape, model")


class VAEEncode(SimpleInterface):
    """Encode a T1w image with the Brain LDM autoencoder (``BrainLDM.encode``)."""

    input_spec = _VAEEncodeInputSpec
    output_spec = _VAEEncodeOutputSpec

    def _run_interface(self, runtime):
        cwd = Path(runtime.cwd)
        model, data, preparation, files = model_and_t1w(self.inputs, cwd, invertible=False)
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


class _VAEDecodeInputSpec(ModelInputSpec):
    in_latent = File(
        exists=True, mandatory=True,
        desc="latent NIfTI (d, h, w, 3) as written by VAEEncode or save_latent; the image is "
        "(8d, 8h, 8w) voxels for the released model",
    )
    out_prefix = out_prefix_trait("decoded_T1w", "<out_prefix>.nii.gz and .json")


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
