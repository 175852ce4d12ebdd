"""The samplers the public API and every entry point accept, by name (no JAX import here:
the CLI parser, the Nipype traits and the sidecars use these without loading a model).

``"ddim"`` is the bundle's sampler and the default: DDIM 50 reproduces the released behaviour
bitwise per seed. The others are multistep ODE solvers (:mod:`brain_ldm_nodes.solvers`).
Inversion and counterfactuals are always DDIM (no inverse of the others is implemented).
"""

from __future__ import annotations

DEFAULT_SCHEDULER = "ddim"
#: Accepted values of ``scheduler=`` / ``--scheduler``, default first.
SCHEDULERS: tuple[str, ...] = ("ddim", "dpmpp-2m", "unipc")
#: What each name runs, as the sidecars record it (``Sampler.Method``). The DDIM text is the
#: one sidecars have always carried, so earlier outputs still match on resume.
SCHEDULER_METHODS: dict[str, str] = {
    "ddim": "DDIM, eta = 0",
    "dpmpp-2m": (
        "DPM-Solver++ 2M (ODE, data prediction, midpoint; first order at the first and last "
        "step, final sigma 0) with linspace timesteps, on the Scheduler's betas: diffusers "
        "DPMSolverMultistepScheduler(algorithm_type='dpmsolver++', solver_order=2) defaults"
    ),
    "unipc": (
        "UniPC-2M (ODE, bh2, predict_x0, corrector on; first order at the first and last step, "
        "final sigma 0) with linspace timesteps, on the Scheduler's betas: diffusers "
        "UniPCMultistepScheduler(solver_order=2) defaults"
    ),
}
#: Short names for progress lines ("20 DPM-Solver++ 2M steps").
SCHEDULER_TITLES: dict[str, str] = {"ddim": "DDIM", "dpmpp-2m": "DPM-Solver++ 2M", "unipc": "UniPC-2M"}


def check_scheduler(scheduler: object) -> str:
    """``scheduler`` if it is one of :data:`SCHEDULERS`, else a one-line ValueError naming them."""
    if not isinstance(scheduler, str) or scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {', '.join(SCHEDULERS)}; got {scheduler!r}")
    return scheduler
