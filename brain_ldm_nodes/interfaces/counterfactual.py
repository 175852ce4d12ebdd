"""A real T1w + two conditionings → its counterfactual T1w (DDIM inversion), and a sidecar;
or + several target conditionings → several counterfactuals from one inversion (sweeps)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from nipype.interfaces.base import File, SimpleInterface, traits

from ..imaging import save_latent, save_t1w, write_json
from ..provenance import counterfactual_sidecar, read_conditioning, reconstruction_error
from ._common import (
    CONDITIONING_FILE_DESC,
    InputImage,
    ModelInputSpec,
    PreparedT1wOutputSpec,
    conditioning_input,
    conditioning_traits,
    model_and_t1w,
    out_prefix_trait,
    t1w_space_trait,
)

_FROM_XOR = ["conditioning_from", "conditioning_from_file"]  # exactly one of them
_TO_XOR = ["conditioning_to", "conditioning_to_file"]  # exactly one of them


class _CounterfactualT1wInputSpec(ModelInputSpec):
    in_file = InputImage(
        exists=True, mandatory=True,
        desc="the subject's real T1-weighted NIfTI, 3-D (or 4-D with one volume); any "
        "orientation and voxel size unless t1w_space='model-grid' (then LAS, 1 mm, sizes "
        "multiples of the model's image_multiple, 32 for the released model, ~[0, 1])",
    )
    t1w_space = t1w_space_trait()
    conditioning_from, conditioning_from_file = conditioning_traits(
        _FROM_XOR, "the subject's own conditioning, used for the inversion"
    )
    conditioning_to, conditioning_to_file = conditioning_traits(
        _TO_XOR, "the counterfactual conditioning, used to sample forward"
    )
    num_inference_steps = traits.Range(
        low=1, high=1000, value=50, usedefault=True,
        desc="DDIM steps of both the inversion and the sampling, 1 to the scheduler's "
        "training steps (1000); 50 upstream; more steps, smaller reconstruction error",
    )
    out_prefix = out_prefix_trait(
        "counterfactual_T1w",
        "<out_prefix>.nii.gz and .json, <out_prefix>_reconstruction.nii.gz, "
        "<out_prefix>_noise.nii.gz",
    )


class _CounterfactualT1wOutputSpec(PreparedT1wOutputSpec):
    out_file = File(
        exists=True,
        desc="counterfactual T1w (regenerated under conditioning_to): 3-D float32 NIfTI, "
        "1 mm LAS, centred affine, intensities ~[0, 1]",
    )
    out_reconstruction = File(
        exists=True,
        desc="reconstruction (regenerated under conditioning_from from the same noise): 3-D "
        "float32 NIfTI, 1 mm LAS, centred, ~[0, 1]; compare with the conformed input",
    )
    out_noise = File(
        exists=True,
        desc="inverted DDIM starting noise: latent NIfTI (d, h, w, 3), 8 mm LAS, centred",
    )
    out_sidecar = File(
        exists=True,
        desc="JSON sidecar: source image and its preparation, both conditionings, DDIM "
        "settings, reconstruction error, model source and sha256, software versions, grid",
    )


class CounterfactualT1w(SimpleInterface):
    """Counterfactual of a real T1w under other demographics (``BrainLDM.counterfactual``).

    Registers the image onto the model grid (``t1w_space``), encodes it to z_mu, inverts the
    DDIM trajectory (eta = 0) under ``conditioning_from`` to its starting noise, and samples
    forward from that noise under ``conditioning_to`` (the counterfactual) and under
    ``conditioning_from`` (the reconstruction, whose distance from the input the sidecar
    records). Given the input on the grid, deterministic: the same grid image reproduces the
    outputs bitwise (ITK's threaded registration may differ in the last digits between runs).
    """

    input_spec = _CounterfactualT1wInputSpec
    output_spec = _CounterfactualT1wOutputSpec

    def _run_interface(self, runtime):
        conditioning_from = conditioning_input(
            self.inputs.conditioning_from, self.inputs.conditioning_from_file
        )
        conditioning_to = conditioning_input(
            self.inputs.conditioning_to, self.inputs.conditioning_to_file
        )
        model, data, preparation, files = model_and_t1w(
            self.inputs, Path(runtime.cwd), invertible=True
        )
        self._results.update(files)
        steps = self.inputs.num_inference_steps
        result = model.counterfactual(
            data[None, None],
            conditioning_from.as_array()[None],
            conditioning_to.as_array()[None],
            num_inference_steps=steps,
        )
        edited = np.asarray(result.edited[0, 0])
        reconstruction = np.asarray(result.reconstruction[0, 0])
        error = reconstruction_error(
            reconstruction, data,
            np.asarray(result.reconstructed_latent[0]), np.asarray(result.latent[0]),
        )
        stem = Path(runtime.cwd) / self.inputs.out_prefix
        self._results["out_file"] = str(
            save_t1w(edited, f"{stem}.nii.gz", description="Brain LDM counterfactual T1w")
        )
        self._results["out_reconstruction"] = str(
            save_t1w(reconstruction, f"{stem}_reconstruction.nii.gz",
                     description="Brain LDM DDIM-inversion reconstruction")
        )
        self._results["out_noise"] = str(
            save_latent(np.asarray(result.noise[0]), f"{stem}_noise.nii.gz")
        )
        sidecar = counterfactual_sidecar(
            model, in_file=self.inputs.in_file, preparation=preparation,
            conditioning_from=conditioning_from, conditioning_to=conditioning_to,
            num_inference_steps=steps, image_shape=data.shape, error=error,
        )
        self._results["out_sidecar"] = str(write_json(sidecar, f"{stem}.json"))
        return runtime


class _CounterfactualSeriesT1wInputSpec(ModelInputSpec):
    in_file = _CounterfactualT1wInputSpec.class_traits()["in_file"]
    t1w_space = t1w_space_trait()
    conditioning_from_file = File(
        exists=True, mandatory=True,
        desc=f"the subject's own conditioning, used for the inversion: {CONDITIONING_FILE_DESC}",
    )
    conditioning_to_files = traits.List(
        File(exists=True), minlen=1, mandatory=True,
        desc=f"one conditioning JSON per output image, sampled forward from the same inverted "
        f"noise: {CONDITIONING_FILE_DESC}",
    )
    num_inference_steps = _CounterfactualT1wInputSpec.class_traits()["num_inference_steps"]
    out_prefixes = traits.List(
        traits.Str, minlen=1, mandatory=True,
        desc="one file name stem per conditioning_to_files entry, in the same order: "
        "<prefix>.nii.gz and <prefix>.json in the node's working directory",
    )


class _CounterfactualSeriesT1wOutputSpec(PreparedT1wOutputSpec):
    out_files = traits.List(
        File(exists=True),
        desc="one counterfactual T1w per target, in input order: 3-D float32 NIfTI, 1 mm LAS, "
        "centred affine, intensities ~[0, 1]",
    )
    out_sidecars = traits.List(
        File(exists=True),
        desc="one JSON sidecar per target (as CounterfactualT1w's; the reconstruction error is "
        "the same in all, it belongs to the shared inversion)",
    )
    out_reconstruction = _CounterfactualT1wOutputSpec.class_traits()["out_reconstruction"]
    out_noise = _CounterfactualT1wOutputSpec.class_traits()["out_noise"]


class CounterfactualSeriesT1w(SimpleInterface):
    """Several counterfactuals of one real T1w from one DDIM inversion
    (:func:`brain_ldm_nodes.inversion.counterfactual_series`), e.g. a conditioning sweep.

    Image k equals ``CounterfactualT1w`` with ``conditioning_to_file = conditioning_to_files[k]``
    bitwise, at the cost of one inversion for all of them.
    """

    input_spec = _CounterfactualSeriesT1wInputSpec
    output_spec = _CounterfactualSeriesT1wOutputSpec

    def _run_interface(self, runtime):
        from ..inversion import counterfactual_series
        from .sampling import progress_log

        prefixes = list(self.inputs.out_prefixes)
        if len(prefixes) != len(self.inputs.conditioning_to_files):
            raise ValueError(
                f"out_prefixes has {len(prefixes)} entries, conditioning_to_files "
                f"{len(self.inputs.conditioning_to_files)}: one prefix per target expected"
            )
        own = read_conditioning(self.inputs.conditioning_from_file)
        targets = [read_conditioning(path) for path in self.inputs.conditioning_to_files]
        model, data, preparation, files = model_and_t1w(
            self.inputs, Path(runtime.cwd), invertible=True
        )
        self._results.update(files)
        steps = self.inputs.num_inference_steps
        every, name = max(1, steps // 5), Path(self.inputs.in_file).name

        def progress(stage: str, step: int, total: int) -> None:
            if step == total or step % every == 0:
                progress_log.info("%s: %s, DDIM step %d/%d", name, stage, step, total)

        progress_log.info("%s: DDIM inversion, %d steps", name, steps)
        series = counterfactual_series(
            model, data, own.as_array(), np.stack([t.as_array() for t in targets]),
            num_inference_steps=steps, progress=progress,
        )
        error = reconstruction_error(series.reconstruction, data, series.reconstructed_latent,
                                     series.latent)
        cwd = Path(runtime.cwd)
        self._results["out_reconstruction"] = str(save_t1w(
            series.reconstruction, cwd / "reconstruction.nii.gz",
            description="Brain LDM DDIM-inversion reconstruction"))
        self._results["out_noise"] = str(save_latent(series.noise, cwd / "noise.nii.gz"))
        files, sidecars = [], []
        for prefix, target, edited in zip(prefixes, targets, series.edited):
            files.append(str(save_t1w(edited, cwd / f"{prefix}.nii.gz",
                                      description="Brain LDM counterfactual T1w")))
            sidecar = counterfactual_sidecar(
                model, in_file=self.inputs.in_file, preparation=preparation,
                conditioning_from=own, conditioning_to=target, num_inference_steps=steps,
                image_shape=data.shape, error=error,
            )
            sidecars.append(str(write_json(sidecar, cwd / f"{prefix}.json")))
        self._results["out_files"] = files
        self._results["out_sidecars"] = sidecars
        return runtime
