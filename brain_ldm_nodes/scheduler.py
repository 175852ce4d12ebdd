"""DDIM (Song et al. 2021) as pure functions over arrays, as the Brain LDM bundle runs it.

Facts: ``shared/UPSTREAM.md`` §6. The schedule is data (:class:`DDIMTables`), built once by
:func:`ddim_tables`; a step is :func:`ddim_step`; the sampling loop (a ``lax.scan``) lives in
:mod:`brain_ldm_nodes.pipeline`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, NamedTuple

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

TimestepSpacing = Literal["leading", "monai-1.6"]
#: A latent (or a batch of them): any shape, the same for every argument of a step.
Latent = Float[Array, "*shape"]
#: One value of the schedule (ᾱ_t, α_t, σ_t, ...) as a 0-d array.
Scalar = Float[Array, ""]


@dataclasses.dataclass(frozen=True)
class DDIMSchedulerConfig:
    """The noise schedule and DDIM options; defaults are the released bundle's.

    ``timestep_spacing``:
        ``"leading"`` — timesteps ``t_k = k·(T // n)`` for k = n−1 … 0 (980, 960, …, 0 for
        n = 50), as MONAI 1.4/1.5 and the bundle as authored.
        ``"monai-1.6"`` — ``round(linspace(T−1, 0, n))`` (999, 979, …, 0), as MONAI 1.6 sets
        them, still with ``t_prev = t − T // n`` as MONAI 1.6 steps (a known mismatch).
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.0015
    beta_end: float = 0.0205
    beta_schedule: Literal["scaled_linear_beta"] = "scaled_linear_beta"
    prediction_type: Literal["epsilon"] = "epsilon"
    clip_sample: bool = False
    set_alpha_to_one: bool = True
    steps_offset: int = 0
    timestep_spacing: TimestepSpacing = "leading"

    def __post_init__(self) -> None:
        if self.beta_schedule != "scaled_linear_beta":
            raise ValueError(f"beta_schedule {self.beta_schedule!r} is not supported (scaled_linear_beta)")
        if self.prediction_type != "epsilon":
            raise ValueError(f"prediction_type {self.prediction_type!r} is not supported (epsilon)")
        if self.clip_sample:
            raise ValueError("clip_sample=True is not supported (the Brain LDM samples without clipping)")
        if self.timestep_spacing not in ("leading", "monai-1.6"):
            raise ValueError(
                f"timestep_spacing {self.timestep_spacing!r} is not one of 'leading', 'monai-1.6'"
            )
        if not 0 <= self.steps_offset < self.num_train_timesteps:
            raise ValueError(f"steps_offset {self.steps_offset} must be in [0, {self.num_train_timesteps})")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DDIMSchedulerConfig:
        return cls(**data)


def alphas_cumprod(config: DDIMSchedulerConfig) -> np.ndarray:
    """ᾱ_t for t = 0 … T−1, float32 ``(T,)``.

    ``betas = linspace(sqrt(β_start), sqrt(β_end), T) ** 2`` and ``ᾱ = cumprod(1 − β)``, in
    float32 and in sequence as PyTorch computes them (UPSTREAM.md §6).
    """
    roots = np.linspace(
        np.float32(config.beta_start) ** 0.5, np.float32(config.beta_end) ** 0.5,
        config.num_train_timesteps, dtype=np.float32,
    )
    betas = roots * roots
    return np.cumprod(np.float32(1.0) - betas, dtype=np.float32)


def _float32_linspace(start: float, end: float, count: int) -> np.ndarray:
    """``torch.linspace(start, end, count)`` in float32: symmetric from both ends.

    MONAI 1.6 rounds this ramp; a float64 ramp rounds 499.5 − ε differently (n = 999).
    """
    start32, end32 = np.float32(start), np.float32(end)
    if count == 1:
        return np.array([start32])
    step = (end32 - start32) / np.float32(count - 1)
    index = np.arange(count)
    from_start = start32 + step * index.astype(np.float32)
    from_end = end32 - step * (count - 1 - index).astype(np.float32)
    return np.where(index < count // 2, from_start, from_end).astype(np.float32)


class DDIMTables(NamedTuple):
    """Per-step data for one sampling run of ``n`` steps, in sampling order (noisy → clean).

    ``timesteps`` int32 ``(n,)``; ``alpha_prod`` ᾱ_t and ``alpha_prod_prev`` ᾱ_{t_prev}
    float32 ``(n,)`` (ᾱ_prev = 1 where t_prev < 0, ``set_alpha_to_one``).
    """

    timesteps: Array
    alpha_prod: Array
    alpha_prod_prev: Array


def ddim_timesteps(config: DDIMSchedulerConfig, num_inference_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """``(timesteps, prev_timesteps)`` int64 ``(n,)`` in sampling order; prev < 0 means "clean"."""
    total = config.num_train_timesteps
    if not 1 <= num_inference_steps <= total:
        raise ValueError(f"num_inference_steps must be in [1, {total}], got {num_inference_steps}")
    ratio = total // num_inference_steps
    if config.timestep_spacing == "leading":
        timesteps = (np.arange(num_inference_steps) * ratio)[::-1] + config.steps_offset
    else:
        ramp = _float32_linspace(total - 1 - config.steps_offset, 0, num_inference_steps)
        timesteps = np.round(ramp).astype(np.int64) + config.steps_offset
    return timesteps.astype(np.int64), (timesteps - ratio).astype(np.int64)


def ddim_tables(config: DDIMSchedulerConfig, num_inference_steps: int) -> DDIMTables:
    """The :class:`DDIMTables` of a run of ``num_inference_steps`` steps."""
    cumprod = alphas_cumprod(config)
    timesteps, prev = ddim_timesteps(config, num_inference_steps)
    final = np.float32(1.0) if config.set_alpha_to_one else cumprod[0]
    alpha_prev = np.where(prev >= 0, cumprod[np.maximum(prev, 0)], final).astype(np.float32)
    return DDIMTables(
        jnp.asarray(timesteps, jnp.int32), jnp.asarray(cumprod[timesteps]), jnp.asarray(alpha_prev)
    )


def data_prediction(eps: Latent, sample: Latent, alpha: Scalar, sigma: Scalar) -> Latent:
    """x̂₀ = (x − σ_s·ε) / α_s: the clean-sample prediction of an ε-prediction network."""
    return (sample - sigma * eps) / alpha


def ddim_step(eps: Latent, alpha_prod: Scalar, alpha_prod_prev: Scalar, sample: Latent) -> Latent:
    """One deterministic (eta = 0) DDIM step x_t → x_{t_prev} with ε-prediction (UPSTREAM.md §6).

    ``x0 = (x − sqrt(1−ᾱ_t)·ε) / sqrt(ᾱ_t)``;  ``x_prev = sqrt(ᾱ_prev)·x0 + sqrt(1−ᾱ_prev)·ε``.
    """
    x0 = data_prediction(eps, sample, jnp.sqrt(alpha_prod), jnp.sqrt(1 - alpha_prod))
    return jnp.sqrt(alpha_prod_prev) * x0 + jnp.sqrt(1 - alpha_prod_prev) * eps


def ddim_inverse_step(
    eps: Latent, alpha_prod: Scalar, alpha_prod_prev: Scalar, sample_prev: Latent
) -> Latent:
    """The algebraic inverse of :func:`ddim_step` for a given ε: x_{t_prev} → x_t.

    ``x0 = (x_prev − sqrt(1−ᾱ_prev)·ε) / sqrt(ᾱ_prev)``;  ``x_t = sqrt(ᾱ_t)·x0 + sqrt(1−ᾱ_t)·ε``.
    DDIM inversion evaluates ε at (x_prev, t) instead of the unknown (x_t, t): the only
    approximation, which shrinks as steps get smaller.
    """
    return ddim_step(eps, alpha_prod_prev, alpha_prod, sample_prev)
