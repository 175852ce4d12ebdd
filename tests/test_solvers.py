"""DPM-Solver++ 2M and UniPC-2M (brain_ldm_nodes.solvers) against diffusers 0.42.

diffusers is the oracle, configured as the solvers document: scaled-linear β 0.0015 → 0.0205
(UPSTREAM.md §6), ε-prediction, solver_order=2, the rest at diffusers' defaults.

Tolerances. Timesteps are integers: equal. ᾱ: equal bitwise (our table repeats PyTorch's float32
linspace-with-FMA and its float64-accumulated cumprod). σ: ≤ 1 ulp (PyTorch's vectorised float32
sqrt is not correctly rounded; NumPy's is). Every
step's output over whole trajectories: ≤ 1e-6 normwise relative (``relative_error``); the
per-step coefficients (λ = log α − log σ, h, e^{−h}, UniC's 2×2 solve) are float32 in both, but
NumPy's and PyTorch's float32 log/exp/solve may round an ulp apart and XLA may fuse a
multiply-add, so equality is not promised; we measure ≤ ~3e-7. A wrong coefficient (an order,
an index, a sign, float64 tables instead of float32) shows as ≥ 1e-5.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

from brain_ldm_nodes.scheduler import DDIMSchedulerConfig
from brain_ldm_nodes.solvers import (
    SOLVERS,
    diffusers_alphas_cumprod,
    diffusers_sigmas,
    diffusers_timesteps,
    initial_state,
    table_row,
)

from monai_oracle import relative_error

STEP_TOLERANCE = 1e-6
STEP_COUNTS = [1, 2, 3, 5, 10, 20, 25, 50]
SPACINGS = ["linspace", "leading", "trailing"]


def diffusers_scheduler(name: str, spacing: str = "linspace"):
    config = DDIMSchedulerConfig()
    common = dict(
        num_train_timesteps=config.num_train_timesteps, beta_schedule="scaled_linear",
        beta_start=config.beta_start, beta_end=config.beta_end, prediction_type="epsilon",
        solver_order=2, timestep_spacing=spacing,
    )
    if name == "dpmpp-2m":
        return DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", **common)
    return UniPCMultistepScheduler(**common)


def test_alphas_cumprod_equal_diffusers_bitwise():
    ours = diffusers_alphas_cumprod(DDIMSchedulerConfig())
    for name in SOLVERS:
        np.testing.assert_array_equal(ours, diffusers_scheduler(name).alphas_cumprod.numpy())


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_timesteps_and_sigmas_equal_diffusers(name, spacing):
    for steps in STEP_COUNTS + [7, 15, 100, 999]:
        scheduler = diffusers_scheduler(name, spacing)
        scheduler.set_timesteps(steps)
        timesteps, sigmas = diffusers_sigmas(DDIMSchedulerConfig(), steps, spacing)
        np.testing.assert_array_equal(timesteps, scheduler.timesteps.numpy(), err_msg=f"{steps}")
        # PyTorch's vectorised float32 sqrt (not correctly rounded) puts 173 of the 1000 σ an ulp
        # away from NumPy's correctly rounded one: ≤ 1 ulp (≤ 1.2e-7 relative) is the contract.
        np.testing.assert_array_max_ulp(sigmas, scheduler.sigmas.numpy(), maxulp=1)
        tables = SOLVERS[name].tables(DDIMSchedulerConfig(), steps, spacing)
        np.testing.assert_array_equal(np.asarray(tables.timesteps), timesteps)


def test_default_spacing_is_linspace_from_999():
    fifty = diffusers_timesteps(DDIMSchedulerConfig(), 50).tolist()
    assert fifty[:3] == [999, 979, 959] and fifty[-2:] == [40, 20] and len(set(fifty)) == 50
    ten = [999, 899, 799, 699, 599, 500, 400, 300, 200, 100]
    assert diffusers_timesteps(DDIMSchedulerConfig(), 10).tolist() == ten


def run_trajectory(name: str, steps: int, spacing: str, seed: int, resync: bool = True):
    """Our solver and diffusers' from the same noise, fed the same random model outputs;
    the normwise relative error of every step's output.

    ``resync=True``: the outputs are ``0.6·tanh(x) + 0.5·noise`` (unrelated to any data, so x̂₀
    is ≈ 300 at t = 999 while x is ≈ 5: a harsh test, every step's terms cancel ~50-fold), and
    each step starts both from diffusers' sample, so each error is that step's own.
    ``resync=False``: both run free over the whole trajectory on the outputs of a noisy
    point-mass denoiser, ``ε = (x − sqrt(ᾱ_t)·x₀*)/sqrt(1 − ᾱ_t) + 0.3·sqrt(ᾱ_t)·noise`` (x̂₀ =
    x₀* + O(0.3), as a trained network's), each evaluated at its own sample (as a network
    would be: the exact denoiser damps a perturbation of x, ε held fixed would amplify it by
    α_t/α_s ≈ 150 over the trajectory), so the errors are the two recursions' accumulated
    rounding.
    """
    scheduler = diffusers_scheduler(name, spacing)
    scheduler.set_timesteps(steps)
    cumprod = scheduler.alphas_cumprod.numpy().astype(np.float64)
    solver = SOLVERS[name]
    tables = solver.tables(DDIMSchedulerConfig(), steps, spacing)
    step = jax.jit(solver.step)
    rng = np.random.default_rng(seed)
    reference = rng.standard_normal((2, 3, 4, 6, 4), dtype=np.float32)
    clean = rng.uniform(-1, 1, reference.shape)
    ours = jnp.asarray(reference)
    state = initial_state(solver, ours)
    errors = []
    for index, timestep in enumerate(scheduler.timesteps):
        noise = rng.standard_normal(reference.shape, dtype=np.float32)
        if resync:
            eps = ours_eps = (0.6 * np.tanh(reference) + 0.5 * noise).astype(np.float32)
        else:
            alpha_bar = cumprod[int(timestep)]

            def denoiser(sample: np.ndarray) -> np.ndarray:
                return ((sample - np.sqrt(alpha_bar) * clean) / np.sqrt(1 - alpha_bar)
                        + 0.3 * np.sqrt(alpha_bar) * noise).astype(np.float32)

            eps, ours_eps = denoiser(reference), denoiser(np.asarray(ours, np.float64))
        ours, state = step(jnp.asarray(ours_eps), ours, state, table_row(tables, index))
        reference = scheduler.step(
            torch.from_numpy(eps), timestep, torch.from_numpy(reference)
        ).prev_sample.numpy()
        errors.append(relative_error(ours, reference))
        if resync:
            ours = jnp.asarray(reference)  # the next step starts from the same point
    return errors


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_every_step_matches_diffusers(name, spacing):
    worst = {}
    for steps in STEP_COUNTS:
        errors = run_trajectory(name, steps, spacing, seed=steps)
        worst[steps] = max(errors)
    print(name, spacing, {k: f"{v:.1e}" for k, v in worst.items()})
    assert max(worst.values()) <= STEP_TOLERANCE, worst


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_free_running_trajectories_match_diffusers(name):
    for steps in (5, 10, 20, 25, 50):
        errors = run_trajectory(name, steps, "linspace", seed=100 + steps, resync=False)
        assert max(errors) <= STEP_TOLERANCE, (steps, max(errors))


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_step_counts_that_repeat_timesteps_are_refused(name):
    with pytest.raises(ValueError, match="repeats timesteps"):
        SOLVERS[name].tables(DDIMSchedulerConfig(), 1000, "linspace")
    SOLVERS[name].tables(DDIMSchedulerConfig(), 1000, "trailing")
