"""Higher-order multistep ODE solvers beyond the bundle: DPM-Solver++ 2M and UniPC-2M (bh2).

With eta = 0, DDIM (:mod:`brain_ldm_nodes.scheduler`) is a first-order solver of the
probability-flow ODE. DPM-Solver++ (Lu et al. 2022, "2M": second-order multistep, data
prediction) and UniPC (Zhao et al. 2023: the 2M predictor UniP plus the corrector UniC, variant
``bh2``, ``predict_x0``) reuse the previous steps' data predictions x̂₀ to reach the same ODE
solution in fewer U-Net calls. They are written here as diffusers' ``DPMSolverMultistepScheduler``
and ``UniPCMultistepScheduler`` (diffusers 0.42) compute them with the configuration
``beta_schedule="scaled_linear"``, the released β (0.0015 → 0.0205, 1000 steps; UPSTREAM.md §6),
``prediction_type="epsilon"``, ``solver_order=2`` and everything else at diffusers' defaults
(``lower_order_final=True``, ``final_sigmas_type="zero"``, ``timestep_spacing="linspace"``,
``solver_type="midpoint"`` / ``"bh2"``, no thresholding, no Karras σ).

Same shape as DDIM: the schedule is data — a NamedTuple of per-step arrays built once in NumPy
(:func:`dpmpp_2m_tables`, :func:`unipc_tables`) — and a step is a pure function
``step(eps, sample, state, row) -> (sample_next, state_next)`` (:func:`dpmpp_2m_step`,
:func:`unipc_step`) of one table row. The multistep memory (previous x̂₀, the sample before the
corrector) is an explicit tuple of arrays, starting from :func:`initial_state`. Lower-order steps
(the first; the last, which lands on σ = 0) are the same function with zero coefficients for the
missing history, so one compiled program serves every step.

Float32 on purpose: diffusers builds these tables from float32 tensors (ᾱ from a float32 β ramp
with a float64-accumulated cumprod, σ, α, λ = log α − log σ and h in float32), and h is a
difference of λ's of size ≈ 5, so a float64 table differs from diffusers' by ≈ 1e-6 relative in h.
The tables below repeat diffusers' float32 operations in NumPy, so their coefficients are within
an ulp of diffusers' and whole trajectories agree to ≈ 1e-7 (tests/test_solvers.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NamedTuple

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from .scheduler import DDIMSchedulerConfig, Latent, data_prediction

#: Timestep spacings as diffusers names them (Lin et al. 2023, table 2).
DiffusersSpacing = Literal["linspace", "leading", "trailing"]
DIFFUSERS_SPACINGS: tuple[str, ...] = ("linspace", "leading", "trailing")
#: diffusers' default for both DPMSolverMultistepScheduler and UniPCMultistepScheduler.
DEFAULT_SPACING: DiffusersSpacing = "linspace"

F32 = np.float32


# -- the schedule as diffusers builds it ---------------------------------------------------------
def _torch_linspace_float32(start: float, end: float, count: int) -> np.ndarray:
    """``torch.linspace(start, end, count, dtype=float32)`` on CPU, bitwise.

    PyTorch steps from both ends with a float32 step and a fused multiply-add (one rounding):
    ``start + step·i`` for the first half, ``end − step·(count−1−i)`` for the second.
    """
    start32, end32 = F32(start), F32(end)
    if count == 1:
        return np.array([start32])
    step = (end32 - start32) / F32(count - 1)
    index = np.arange(count)
    from_start = np.float64(start32) + np.float64(step) * index  # exact product: one rounding below
    from_end = np.float64(end32) - np.float64(step) * (count - 1 - index)
    return np.where(index < count // 2, from_start, from_end).astype(F32)


def diffusers_alphas_cumprod(config: DDIMSchedulerConfig) -> np.ndarray:
    """ᾱ_t, t = 0 … T−1, float32 ``(T,)``, bitwise as diffusers' ``scaled_linear`` schedule.

    ``betas = torch.linspace(β_start**0.5, β_end**0.5, T, float32) ** 2``;
    ``ᾱ = torch.cumprod(1 − betas)``, which PyTorch accumulates in float64. The DDIM sampler keeps
    :func:`brain_ldm_nodes.scheduler.alphas_cumprod` (the same schedule, ≤ 6e-7 relative apart)
    so that DDIM results stay bitwise what they were.
    """
    ramp = _torch_linspace_float32(config.beta_start**0.5, config.beta_end**0.5, config.num_train_timesteps)
    alphas = F32(1.0) - ramp * ramp
    return np.cumprod(alphas.astype(np.float64)).astype(F32)


def diffusers_timesteps(
    config: DDIMSchedulerConfig, num_inference_steps: int, spacing: DiffusersSpacing = DEFAULT_SPACING
) -> np.ndarray:
    """Timesteps int64 ``(n,)`` in sampling order as diffusers' multistep schedulers set them.

    ``"linspace"``: ``round(linspace(0, T−1, n+1))`` reversed, last dropped (999, 979, …, 20
    for n = 50); ``"leading"``: ``k·(T // (n+1))`` for k = n … 1, plus ``steps_offset``
    (950, 931, …, 19); ``"trailing"``: ``round(arange(T, 0, −T/n)) − 1`` (999, 979, …, 19).
    """
    total = config.num_train_timesteps
    if not 1 <= num_inference_steps <= total:
        raise ValueError(f"num_inference_steps must be in [1, {total}], got {num_inference_steps}")
    if spacing == "linspace":
        timesteps = np.linspace(0, total - 1, num_inference_steps + 1).round()[::-1][:-1].astype(np.int64)
    elif spacing == "leading":
        ratio = total // (num_inference_steps + 1)
        timesteps = (np.arange(0, num_inference_steps + 1) * ratio).round()[::-1][:-1].astype(np.int64)
        timesteps = timesteps + config.steps_offset
    elif spacing == "trailing":
        timesteps = np.arange(total, 0, -total / num_inference_steps).round().astype(np.int64) - 1
    else:
        raise ValueError(f"timestep spacing {spacing!r} is not one of {', '.join(DIFFUSERS_SPACINGS)}")
    if len(np.unique(timesteps)) != len(timesteps):  # n = T with "linspace" or "leading"
        raise ValueError(
            f"num_inference_steps {num_inference_steps} repeats timesteps with {spacing!r} spacing "
            f"(a multistep solver needs distinct ones; use at most {total - 1})"
        )
    return timesteps.copy()


def diffusers_sigmas(
    config: DDIMSchedulerConfig, num_inference_steps: int, spacing: DiffusersSpacing = DEFAULT_SPACING
) -> tuple[np.ndarray, np.ndarray]:
    """``(timesteps (n,) int64, sigmas (n+1,) float32)``: σ_t = sqrt((1 − ᾱ_t) / ᾱ_t) at each
    timestep, then σ = 0 (``final_sigmas_type="zero"``: the last step lands on the clean sample)."""
    cumprod = diffusers_alphas_cumprod(config)
    timesteps = diffusers_timesteps(config, num_inference_steps, spacing)
    sigmas = np.sqrt((F32(1.0) - cumprod) / cumprod)
    return timesteps, np.concatenate([sigmas[timesteps], [F32(0.0)]]).astype(F32)


def alpha_sigma_lambda(sigmas: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(α_t, σ_t, λ_t)`` float32 from the variance-exploding σ: α = 1/sqrt(σ² + 1),
    σ_t = σ·α, λ = log α − log σ_t (+inf at σ = 0), as diffusers computes them."""
    sigmas = np.asarray(sigmas, F32)
    alpha = F32(1.0) / np.sqrt(sigmas * sigmas + F32(1.0))
    sigma = sigmas * alpha
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sigma)
    return alpha.astype(F32), sigma.astype(F32), lam.astype(F32)


def _column(values: list[np.float32] | np.ndarray, integer: bool = False) -> Array:
    """A table column as a JAX array: float32 (values already rounded as diffusers rounds
    them), or int32 for timesteps."""
    return jnp.asarray(np.asarray(values, np.int32 if integer else np.float32))


# -- DPM-Solver++ 2M -----------------------------------------------------------------------------
class DPMSolverTables(NamedTuple):
    """Per-step data of a DPM-Solver++ 2M run of n steps, in sampling order; all ``(n,)``.

    ``timesteps`` int32; ``alpha``, ``sigma``: α_s, σ_s at the current step (for x̂₀);
    ``sample_coeff`` σ_t/σ_s; ``x0_coeff`` α_t(e^{−h} − 1); ``inv_r0`` 1/r₀ = h/h₀;
    ``d1_coeff`` ½·α_t(e^{−h} − 1). First-order steps (the first and the last) have
    ``inv_r0 = d1_coeff = 0``. float32.
    """

    timesteps: Array
    alpha: Array
    sigma: Array
    sample_coeff: Array
    x0_coeff: Array
    inv_r0: Array
    d1_coeff: Array


def dpmpp_2m_tables(
    config: DDIMSchedulerConfig, num_inference_steps: int, spacing: DiffusersSpacing = DEFAULT_SPACING
) -> DPMSolverTables:
    """The :class:`DPMSolverTables` of a run of ``num_inference_steps`` steps.

    Step i goes from σ_i to σ_{i+1}; h = λ_{i+1} − λ_i, h₀ = λ_i − λ_{i−1}, r₀ = h₀/h. It is
    first order at i = 0 (no history) and at i = n−1 (``final_sigmas_type="zero"`` forces it in
    diffusers; with ``lower_order_final`` and n < 15 it would be anyway), second order otherwise.
    """
    timesteps, sigmas = diffusers_sigmas(config, num_inference_steps, spacing)
    alpha, sigma, lam = alpha_sigma_lambda(sigmas)
    n = num_inference_steps
    columns: dict[str, list] = {name: [] for name in DPMSolverTables._fields[1:]}
    for i in range(n):
        h = lam[i + 1] - lam[i]
        x0_coeff = alpha[i + 1] * (np.exp(-h) - F32(1.0))
        second_order = 0 < i < n - 1
        if second_order:
            r0 = (lam[i] - lam[i - 1]) / h
            inv_r0, d1_coeff = F32(1.0) / r0, F32(0.5) * x0_coeff
        else:
            inv_r0, d1_coeff = F32(0.0), F32(0.0)
        row = {"alpha": alpha[i], "sigma": sigma[i], "sample_coeff": sigma[i + 1] / sigma[i],
               "x0_coeff": x0_coeff, "inv_r0": inv_r0, "d1_coeff": d1_coeff}
        for name, value in row.items():
            columns[name].append(value)
    return DPMSolverTables(_column(timesteps, integer=True), *(_column(columns[name]) for name in columns))


def dpmpp_2m_step(
    eps: Latent,
    sample: Latent,
    state: tuple[Latent],
    row: DPMSolverTables,
) -> tuple[Latent, tuple[Latent]]:
    """One DPM-Solver++ 2M step (midpoint form) x_s → x_t from ε(x_s, s); ``row`` is one row
    of :class:`DPMSolverTables` (scalars); ``state`` = (x̂₀ of the previous step,).

    ``D1 = (x̂₀ − x̂₀_prev)/r₀``;
    ``x_t = (σ_t/σ_s)·x_s − α_t(e^{−h} − 1)·x̂₀ − ½·α_t(e^{−h} − 1)·D1``.
    Returns ``(x_t, (x̂₀,))``.
    """
    (x0_prev,) = state
    x0 = data_prediction(eps, sample, row.alpha, row.sigma)
    d1 = row.inv_r0 * (x0 - x0_prev)
    return row.sample_coeff * sample - row.x0_coeff * x0 - row.d1_coeff * d1, (x0,)


# -- UniPC-2M (bh2, predict_x0) ------------------------------------------------------------------
class UniPCTables(NamedTuple):
    """Per-step data of a UniPC-2M (bh2) run of n steps, in sampling order; all ``(n,)`` float32
    except ``timesteps`` (int32).

    Step i first corrects the sample it was given (UniC, from σ_{i−1} to σ_i, using the new x̂₀;
    ``use_corrector`` is 0 at i = 0), then predicts the next one (UniP, σ_i → σ_{i+1}).
    Each update is ``c_sample·x − c_m0·m₀ − c_res·(ρ₁·(m₁ − m₀)/r₁ + ρ_t·D)`` with
    coefficients (σ_t/σ_s, α_t·(e^{−h} − 1), α_t·(e^{−h} − 1)) (bh2: B(h) = e^{−h} − 1).
    Predictor: m₀ = x̂₀ now, m₁ = x̂₀ of the previous step, ρ₁ = ½ (0 when first order), no D.
    Corrector: m₀ = previous x̂₀, m₁ = the one before, D = x̂₀ now − m₀, (ρ₁, ρ_t) solve
    UniC's 2×2 system (order 2) or are (0, ½) (order 1).
    """

    timesteps: Array
    alpha: Array
    sigma: Array
    use_corrector: Array
    c_sample: Array
    c_m0: Array
    c_res: Array
    c_rk: Array
    c_rho1: Array
    c_rho_t: Array
    p_sample: Array
    p_m0: Array
    p_res: Array
    p_rk: Array
    p_rho1: Array


def _unipc_coefficients(lam: np.ndarray, alpha: np.ndarray, sigma: np.ndarray, t: int, s0: int):
    """Common UniPC terms for an update σ_{s0} → σ_t:
    (σ_t/σ_s0, α_t·h_φ₁, α_t·B_h, h, hh, h_φ₁, B_h)."""
    h = lam[t] - lam[s0]
    hh = -h
    h_phi_1 = np.expm1(hh)
    b_h = np.expm1(hh)  # bh2
    return sigma[t] / sigma[s0], alpha[t] * h_phi_1, alpha[t] * b_h, h, hh, h_phi_1, b_h


def _unic_rhos(rk: np.float32, hh: np.float32, h_phi_1: np.float32, b_h: np.float32) -> np.ndarray:
    """UniC's order-2 weights: solve [[1, 1], [r_k, 1]]·ρ = b with
    b_k = k!·h_φ_{k+1}(hh)/B(h), h_φ₂ = h_φ₁/hh − 1, h_φ₃ = h_φ₂/hh − ½, in float32 as
    diffusers."""
    h_phi_k = h_phi_1 / hh - F32(1.0)
    b = [h_phi_k * F32(1) / b_h]
    h_phi_k = h_phi_k / hh - F32(0.5)
    b.append(h_phi_k * F32(2) / b_h)
    matrix = np.array([[1.0, 1.0], [rk, 1.0]], F32)
    return np.linalg.solve(matrix, np.array(b, F32)).astype(F32)


def unipc_tables(
    config: DDIMSchedulerConfig, num_inference_steps: int, spacing: DiffusersSpacing = DEFAULT_SPACING
) -> UniPCTables:
    """The :class:`UniPCTables` of a run of ``num_inference_steps`` steps.

    Orders as diffusers with ``lower_order_final``: the predictor is first order at the first
    step and at the last (σ → 0), second order otherwise; the corrector at step i has the order
    of step i−1's predictor.
    """
    timesteps, sigmas = diffusers_sigmas(config, num_inference_steps, spacing)
    alpha, sigma, lam = alpha_sigma_lambda(sigmas)
    n = num_inference_steps
    order = [1 if i == 0 or i == n - 1 else 2 for i in range(n)]
    rows: list[dict[str, np.float32]] = []
    with np.errstate(divide="ignore", invalid="ignore"):  # the last predictor has h = +inf
        for i in range(n):
            row = {"alpha": alpha[i], "sigma": sigma[i], "use_corrector": F32(i > 0)}
            if i > 0:
                c_sample, c_m0, c_res, h, hh, h_phi_1, b_h = _unipc_coefficients(lam, alpha, sigma, i, i - 1)
                if order[i - 1] == 2:
                    rk = (lam[i - 2] - lam[i - 1]) / h
                    rho1, rho_t = _unic_rhos(rk, hh, h_phi_1, b_h)
                else:
                    rk, rho1, rho_t = F32(1.0), F32(0.0), F32(0.5)
                row.update(c_sample=c_sample, c_m0=c_m0, c_res=c_res, c_rk=rk, c_rho1=rho1, c_rho_t=rho_t)
            else:
                row.update(c_sample=F32(1.0), c_m0=F32(0.0), c_res=F32(0.0), c_rk=F32(1.0), c_rho1=F32(0.0),
                           c_rho_t=F32(0.0))
            p_sample, p_m0, p_res, h, *_ = _unipc_coefficients(lam, alpha, sigma, i + 1, i)
            if order[i] == 2:
                p_rk, p_rho1 = (lam[i - 1] - lam[i]) / h, F32(0.5)
            else:
                p_rk, p_rho1 = F32(1.0), F32(0.0)
            row.update(p_sample=p_sample, p_m0=p_m0, p_res=p_res, p_rk=p_rk, p_rho1=p_rho1)
            rows.append(row)
    fields = UniPCTables._fields[1:]
    return UniPCTables(
        _column(timesteps, integer=True), *(_column([row[name] for row in rows]) for name in fields)
    )


def unipc_step(
    eps: Latent,
    sample: Latent,
    state: tuple[Latent, Latent, Latent],
    row: UniPCTables,
) -> tuple[Latent, tuple[Latent, ...]]:
    """One UniPC-2M step from ε(x_s, s): correct x_s (UniC), then predict x_t (UniP).

    ``state`` = (the previous step's corrected sample, its x̂₀, the x̂₀ before); ``row`` one row
    of :class:`UniPCTables`. The network was evaluated at the uncorrected x_s (as in UniPC: the
    corrector costs no extra call). Returns ``(x_t, (x_s corrected, x̂₀, previous x̂₀))``.
    """
    last_sample, m_prev, m_prev2 = state
    x0 = data_prediction(eps, sample, row.alpha, row.sigma)
    correction = row.c_rho1 * ((m_prev2 - m_prev) / row.c_rk) + row.c_rho_t * (x0 - m_prev)
    corrected = row.c_sample * last_sample - row.c_m0 * m_prev - row.c_res * correction
    sample = jnp.where(row.use_corrector > 0, corrected, sample)
    prediction = row.p_rho1 * ((m_prev - x0) / row.p_rk)
    return row.p_sample * sample - row.p_m0 * x0 - row.p_res * prediction, (sample, x0, m_prev)


# -- the registry the pipeline uses --------------------------------------------------------------
class Solver(NamedTuple):
    """A multistep solver: ``tables(config, n, spacing)`` → per-step NamedTuple with
    ``timesteps``; ``step(eps, sample, state, row)`` → ``(sample, state)``; ``memory`` arrays
    of the sample's shape in its state."""

    tables: Callable[..., NamedTuple]
    step: Callable[..., tuple[Array, tuple[Array, ...]]]
    memory: int


SOLVERS: dict[str, Solver] = {
    "dpmpp-2m": Solver(dpmpp_2m_tables, dpmpp_2m_step, 1),
    "unipc": Solver(unipc_tables, unipc_step, 3),
}


def initial_state(solver: Solver, sample: Latent) -> tuple[Latent, ...]:
    """The multistep memory before the first step: zeros (first-order steps weight it by 0)."""
    return tuple(jnp.zeros_like(sample) for _ in range(solver.memory))


def table_row(tables: NamedTuple, index: int) -> NamedTuple:
    """Row ``index`` of a per-step table as a NamedTuple of scalar arrays."""
    return type(tables)(*(column[index] for column in tables))


__all__ = [
    "DEFAULT_SPACING", "DIFFUSERS_SPACINGS", "DPMSolverTables", "SOLVERS", "Solver", "UniPCTables",
    "alpha_sigma_lambda", "data_prediction", "diffusers_alphas_cumprod", "diffusers_sigmas",
    "diffusers_timesteps", "dpmpp_2m_step", "dpmpp_2m_tables", "initial_state", "table_row",
    "unipc_step", "unipc_tables",
]
