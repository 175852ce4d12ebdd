"""Conditioning + seed → a synthetic T1w NIfTI and its JSON sidecar."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from nipype.interfaces.base import File, SimpleInterface, TraitedSpec, isdefined, traits

from ..imaging import save_t1w, write_json
from ..provenance import synthesis_sidecar
from ..scheduler_names import SCHEDULER_TITLES, SCHEDULERS
from ._common import (
    ModelInputSpec,
    cached_model,
    conditioning_input,
    conditioning_traits,
    out_prefix_trait,
)

#: Largest seed: JAX's threefry keys hold 32 bits (larger seeds would silently wrap around).
MAX_SEED = 2**32 - 1
#: ``"<out_prefix>: DDIM step k/N"`` (or another sampler's name) lines while sampling, about ten per image, at INFO. It has
#: no handler: silent unless an application (e.g. brain-ldm-bids) attaches one.
progress_log = logging.getLogger("brain_ldm_nodes.progress")
_CONDITIONING_XOR = ["conditioning", "conditioning_file"]  # exactly one of them


class _SampleT1wInputSpec(ModelInputSpec):
    conditioning, conditioning_file = conditioning_traits(
        _CONDITIONING_XOR, "the conditioning to sample under"
    )
    seed = traits.Range(
        low=0, high=MAX_SEED, mandatory=True,
        desc=f"integer seed of the starting noise, 0 to {MAX_SEED}; same seed, same image",
    )
    num_inference_steps = traits.Range(
        low=1, high=1000, value=50, usedefault=True,
        desc="sampler steps (U-Net calls), 1 to the scheduler's training steps (1000; 999 for "
        "the multistep solvers); 50 upstream (DDIM)",
    )
    scheduler = traits.Enum(
        *SCHEDULERS, usedefault=True,
        desc="sampler: 'ddim' (default; the bundle's, bitwise the released behaviour at 50 steps), "
        "'dpmpp-2m' (DPM-Solver++ 2M) or 'unipc' (UniPC-2M): multistep ODE solvers, about as "
        "accurate as DDIM-50 in 16-21 steps (README 'Faster samplers')",
    )
    image_shape = traits.Tuple(
        traits.Int, traits.Int, traits.Int,
        desc="output grid (D, H, W) in 1 mm voxels, each a positive multiple of the model's "
        "image_multiple (32 for the released model); default: the model's native grid "
        "(160, 224, 160 for the released model)",
    )
    out_prefix = out_prefix_trait("synthetic_T1w", "<out_prefix>.nii.gz and .json")


class _SampleT1wOutputSpec(TraitedSpec):
    out_file = File(
        exists=True,
        desc="synthetic T1w: 3-D float32 NIfTI, 1 mm LAS, centred affine, intensities ~[0, 1]",
    )
    out_sidecar = File(
        exists=True,
        desc="JSON sidecar: conditioning and its derivation, seed, sampler settings, model "
        "source and sha256, software versions, grid convention, Synthetic: true",
    )


class SampleT1w(SimpleInterface):
    """Sample one synthetic T1w image with the Brain LDM (``BrainLDM.sample``; DDIM, eta = 0, or
    the multistep solver named by ``scheduler``).

    The image depends only on (weights, conditioning, seed, steps, scheduler, JAX version):
    re-running with the same inputs reproduces it bitwise.
    """

    input_spec = _SampleT1wInputSpec
    output_spec = _SampleT1wOutputSpec

    def _run_interface(self, runtime):
        conditioning = conditioning_input(
            self.inputs.conditioning, self.inputs.conditioning_file
        )
        model = cached_model(self.inputs)
        shape = self.inputs.image_shape if isdefined(self.inputs.image_shape) else model.image_shape
        steps, seed = self.inputs.num_inference_steps, self.inputs.seed
        every, name = max(1, steps // 10), self.inputs.out_prefix
        scheduler = self.inputs.scheduler
        title = SCHEDULER_TITLES[scheduler]

        def progress(step: int, total: int) -> None:
            if step % every == 0 or step == total:
                progress_log.info("%s: %s step %d/%d", name, title, step, total)

        image = model.sample(
            conditioning.as_array()[None], [seed], num_inference_steps=steps, image_shape=shape,
            progress=progress, scheduler=scheduler,
        )
        stem = Path(runtime.cwd) / self.inputs.out_prefix
        out_file = save_t1w(
            np.asarray(image[0, 0]), f"{stem}.nii.gz", description="Brain LDM synthetic T1w"
        )
        sidecar = synthesis_sidecar(
            model, conditioning=conditioning, seed=seed, num_inference_steps=steps,
            image_shape=shape, scheduler=scheduler,
        )
        self._results["out_file"] = str(out_file)
        self._results["out_sidecar"] = str(write_json(sidecar, f"{stem}.json"))
        return runtime
