"""Several counterfactuals of one real T1w from a single DDIM inversion.

:meth:`BrainLDM.counterfactual` inverts once per call; a conditioning sweep of a real image
needs the inverted noise once and one forward pass per value. :func:`counterfactual_series`
does that through the public ``BrainLDM`` API only (encode, invert_latents, denoise, decode),
so each of its images equals ``model.counterfactual(t1w, own, target)`` bitwise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover - typing only
    from .pipeline import BrainLDM

__all__ = ["CounterfactualSeries", "counterfactual_series"]


@dataclass(frozen=True)
class CounterfactualSeries:
    """Result of :func:`counterfactual_series` (numpy, float32).

    ``edited`` ``(N, D, H, W)``: one image per target conditioning; ``reconstruction``
    ``(D, H, W)``: regenerated under the own conditioning; ``noise``, ``latent`` (``z_mu`` of
    the input) and ``reconstructed_latent``: ``(3, d, h, w)``.
    """

    edited: np.ndarray
    reconstruction: np.ndarray
    noise: np.ndarray
    latent: np.ndarray
    reconstructed_latent: np.ndarray


def counterfactual_series(
    model: BrainLDM,
    t1w: np.ndarray,
    conditioning_from: np.ndarray,
    conditionings_to: np.ndarray,
    *,
    num_inference_steps: int = 50,
    progress: Callable[[str, int, int], None] | None = None,
) -> CounterfactualSeries:
    """Invert ``t1w`` once under ``conditioning_from``; sample forward under each target.

    Args:
        model: the Brain LDM.
        t1w: ``(D, H, W)`` on the model grid, intensities in [0, 1] (``conform_t1w``).
        conditioning_from: ``(4,)`` the subject's own normalised conditioning.
        conditionings_to: ``(N, 4)`` targets, N ≥ 1.
        num_inference_steps: DDIM steps of the inversion and of every forward pass.
        progress: ``progress(stage, step, total)`` after each DDIM step, stage one of
            ``"reconstruction"``, ``"target k/N"`` (the inversion itself reports nothing).

    Cost: 1 inversion + (N + 1) forward passes of ``num_inference_steps`` U-Net evaluations,
    instead of 3 N for N separate ``counterfactual`` calls.
    """
    image = np.asarray(t1w, np.float32)
    own = np.asarray(conditioning_from, np.float32).reshape(1, -1)
    targets = np.asarray(conditionings_to, np.float32)
    if image.ndim != 3:
        raise ValueError(f"t1w must be (D, H, W), got shape {image.shape}")
    if targets.ndim != 2 or targets.shape[0] < 1:
        raise ValueError(f"conditionings_to must be (N, 4) with N ≥ 1, got {targets.shape}")
    steps = int(num_inference_steps)

    def reporter(stage: str) -> Callable[[int, int], None] | None:
        if progress is None:
            return None
        return lambda step, total: progress(stage, step, total)

    latent, _ = model.encode(image[None, None])
    noise = model.invert_latents(latent, own, num_inference_steps=steps)
    reconstructed = model.denoise(noise, own, num_inference_steps=steps,
                                  progress=reporter("reconstruction"))
    edited = [
        model.denoise(noise, targets[k:k + 1], num_inference_steps=steps,
                      progress=reporter(f"target {k + 1}/{len(targets)}"))
        for k in range(len(targets))
    ]
    return CounterfactualSeries(
        edited=np.stack([np.asarray(model.decode(z))[0, 0] for z in edited]),
        reconstruction=np.asarray(model.decode(reconstructed))[0, 0],
        noise=np.asarray(noise)[0],
        latent=np.asarray(latent)[0],
        reconstructed_latent=np.asarray(reconstructed)[0],
    )
