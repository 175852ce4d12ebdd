"""``BrainLDM.sample_latents(..., scheduler=...)`` end to end against MONAI's U-Net stepped by
diffusers' schedulers, and the ``scheduler=`` argument's contract.

End-to-end tolerance 1e-5 (normwise relative, latents): our U-Net evaluations are within
~1e-6 of MONAI's here (tests/test_parity_sampler.py allows 1e-3 for a whole DDIM sample) and the
solvers' steps within ~5e-7 of diffusers' (tests/test_solvers.py); the errors feed back through
10–20 evaluations. Measured ≤ 1.3e-6 (the ``tiny_oracle`` of tests/conftest.py); DDIM with the
same steps is ≈ 0.4–0.6 away (measured once), a wrong timestep, order or coefficient ≥ 1e-3.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import brain_ldm_nodes.pipeline as pipeline
from brain_ldm_nodes import initial_noise
from brain_ldm_nodes.scheduler_names import SCHEDULERS
from brain_ldm_nodes.solvers import SOLVERS, Solver

from monai_oracle import relative_error
from test_solvers import diffusers_scheduler

END_TO_END_TOLERANCE = 1e-5


def diffusers_sample(net, name: str, steps: int, conditioning: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """The bundle's loop (UPSTREAM.md §6) with MONAI's U-Net, stepped by diffusers' scheduler."""
    scheduler = diffusers_scheduler(name)
    scheduler.set_timesteps(steps)
    cond = torch.from_numpy(conditioning)
    latent = torch.from_numpy(noise.copy())
    cond_volume = cond[:, :, None, None, None].expand(-1, -1, *latent.shape[2:])
    for timestep in scheduler.timesteps:
        t = torch.full((latent.shape[0],), int(timestep), dtype=torch.long)
        eps = net(torch.cat([latent, cond_volume], dim=1), t, context=cond[:, None, :])
        latent = scheduler.step(eps, timestep, latent).prev_sample
    return latent.numpy()


@pytest.mark.parametrize("name,steps", [("dpmpp-2m", 20), ("unipc", 10)])
def test_sample_latents_matches_monai_unet_with_diffusers_scheduler(tiny_oracle, name, steps, monkeypatch):
    """Also: one compiled U-Net + step program serves every step (traced once, as DDIM's;
    no lax.scan), and progress is reported after every step."""
    model, net = tiny_oracle.model, tiny_oracle.monai_unet
    conditioning = np.array([[1.0, 0.7, 0.7, 0.5], [0.0, 0.1, 0.2, 0.4]], np.float32)
    seeds = [3, 4]
    noise = np.stack([np.asarray(initial_noise(seed, model.latent_shape())) for seed in seeds])
    reference = diffusers_sample(net, name, steps, conditioning, noise)

    traces, done = [], []
    solver = SOLVERS[name]

    def counting_step(*args):
        traces.append(1)
        return solver.step(*args)

    monkeypatch.setitem(pipeline.SOLVERS, name, Solver(solver.tables, counting_step, solver.memory))
    ours = model.sample_latents(conditioning, seeds, num_inference_steps=steps, scheduler=name,
                                progress=lambda step, total: done.append((step, total)))
    error = relative_error(ours, reference)
    print(f"{name} {steps} steps: latent error vs diffusers {error:.1e} "
          f"(vs the starting noise {relative_error(ours, noise):.1e})")
    assert error <= END_TO_END_TOLERANCE
    assert len(traces) == 1
    assert done == [(k, steps) for k in range(1, steps + 1)] * len(seeds)


def test_scheduler_names_are_ddim_and_the_solvers():
    assert SCHEDULERS == ("ddim", "dpmpp-2m", "unipc") and set(SCHEDULERS[1:]) == set(SOLVERS)
    assert pipeline.SCHEDULERS is SCHEDULERS


@pytest.mark.parametrize("method", ["sample", "sample_latents", "denoise"])
def test_unknown_scheduler_is_one_line_naming_the_accepted(tiny_oracle, method):
    model = tiny_oracle.model
    args = (np.zeros((1, 3, 4, 4, 4), np.float32),) if method == "denoise" else ()
    with pytest.raises(ValueError) as info:
        getattr(model, method)(*args, np.zeros((1, 4)), *(() if method == "denoise" else ([0],)),
                               num_inference_steps=2, scheduler="dpm++")
    message = str(info.value)
    assert "\n" not in message and "'dpm++'" in message
    assert all(name in message for name in SCHEDULERS)


def test_ddim_is_the_default_and_unchanged_by_the_keyword(tiny_oracle):
    model = tiny_oracle.model
    default = model.sample_latents(np.zeros((1, 4)), [5], num_inference_steps=4)
    named = model.sample_latents(np.zeros((1, 4)), [5], num_inference_steps=4, scheduler="ddim")
    np.testing.assert_array_equal(np.asarray(default), np.asarray(named))


def test_readme_faster_samplers_snippet_runs_as_written(tiny_oracle):
    """The README's "Faster samplers" snippet, with the Quick start's ``model`` and
    ``conditioning`` (here the tiny model)."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Faster samplers", 1)[1]
    snippet = section.split("```python\n", 1)[1].split("```", 1)[0]
    model = tiny_oracle.model
    namespace = {"model": model, "conditioning": np.array([[1.0, 0.7, 0.7, 0.5]])}
    exec(snippet, namespace)
    assert namespace["images"].shape == (1, 1) + model.image_shape
    assert namespace["SCHEDULERS"] == SCHEDULERS
