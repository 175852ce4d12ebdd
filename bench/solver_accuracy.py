#!/usr/bin/env python
"""Accuracy of DDIM and the multistep solvers vs 1000-step DDIM references (README "Faster samplers").

    python bench/solver_accuracy.py --plot               # the smooth tiny network (≈ 10 min, 2 cores)
    python bench/solver_accuracy.py --network full-size  # released architecture, random weights,
                                                         # 32³ image / 4³ latent (≈ 5 GB, longer)

Every sampler starts from the same noise (``initial_noise(seed, ...)``, as ``sample_latents``)
and the same conditioning; the error of a run is the final latent's normwise relative error
``max|z − z_ref| / max|z_ref|`` (as the tests' ``relative_error``), averaged over the seeds.

What a sampler converges to depends on where it starts: the solvers (diffusers' ``linspace``
timesteps 999, …) solve the probability-flow ODE from t = 999; DDIM as the bundle runs it
("leading": 980, 960, …, 0 for 50 steps) takes the same noise as x_980 — starting at
t = (n−1)·⌊1000/n⌋ in general, e.g. 800 for 5 steps — a different noise → image map, ≈ 18 %
away from the t = 999 one on this network. So there are two references, both DDIM with unit
steps: from t = 999 (999, 998, …, 0 = DDIM-1000 "leading") for the solvers and for DDIM on the
solvers' timesteps ("DDIM, same timesteps": the first-order baseline on the same ODE), and from
t = 980 (981 steps) for DDIM-50 as released — its own discretisation error, the accuracy a
solver must match to give an image as close to its exact ODE solution as DDIM-50's is to its.
Each reference's own error is estimated against DPM-Solver++ 2M with 999 steps ("floor").

"smooth": the network of tests/test_inversion.py (tiny U-Net with random weights, output
convolution × 0.3: a smoother, more realistic ε), 16³ image, 8³ latent.

Writes ``bench/results/solver_accuracy_<network>.json`` and ``.md`` and, with ``--plot``, the
log–log plot ``docs/figures/solver_accuracy_<network>.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import equinox as eqx
import jax
import numpy as np

import jax.numpy as jnp

from brain_ldm_nodes import AutoencoderKLConfig, BrainLDM, DiffusionModelUNetConfig, initial_noise
from brain_ldm_nodes.pipeline import _ddim_loop
from brain_ldm_nodes.scheduler import DDIMTables, alphas_cumprod
from brain_ldm_nodes.scheduler_names import SCHEDULER_TITLES
from brain_ldm_nodes.solvers import diffusers_timesteps

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TABLE_STEPS = (5, 10, 15, 20, 25, 50)
SCAN_STEPS = tuple(range(5, 26))  # the solvers at every count, to find where they meet DDIM-50
REFERENCE_STEPS = 1000
FAST_REFERENCE_STEPS = 250


def smooth_model() -> BrainLDM:
    """tests/test_inversion.py's ``smooth_model``."""
    model = BrainLDM.random(
        key=jax.random.key(0),
        vae_config=AutoencoderKLConfig(channels=(32, 32), num_res_blocks=(1, 1)),
        unet_config=DiffusionModelUNetConfig(channels=(32, 32, 32), num_res_blocks=(1, 1, 1),
                                             num_head_channels=(0, 32, 32)),
        image_shape=(16, 16, 16),
    )
    unet = eqx.tree_at(lambda u: u.out_conv.weight, model.unet, model.unet.out_conv.weight * 0.3)
    return dataclasses.replace(model, unet=unet)


def full_size_model() -> BrainLDM:
    """The released architecture with random weights at a 32³ image (4³ latent)."""
    return BrainLDM.random(key=jax.random.key(0), image_shape=(32, 32, 32))


def relative_errors(latents: np.ndarray, reference: np.ndarray) -> list[float]:
    return [float(np.max(np.abs(z - r)) / np.max(np.abs(r))) for z, r in zip(latents, reference)]


def ddim_on(model: BrainLDM, timesteps: np.ndarray) -> DDIMTables:
    """DDIM tables for the given timesteps (sampling order), each step to the next, the last to
    the clean sample (ᾱ = 1), on the bundle's ᾱ table."""
    cumprod = alphas_cumprod(model.scheduler)
    prev = np.concatenate([cumprod[timesteps[1:]], [np.float32(1.0)]]).astype(np.float32)
    return DDIMTables(jnp.asarray(timesteps, jnp.int32), jnp.asarray(cumprod[timesteps]), jnp.asarray(prev))


#: Columns: (key, title, reference start).
COLUMNS = (
    ("ddim", "DDIM as released (980, 960, …)", 999),
    ("ddim-same", "DDIM, same timesteps (999, …)", 999),
    ("dpmpp-2m", "DPM-Solver++ 2M", 999),
    ("unipc", "UniPC-2M", 999),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--network", choices=("smooth", "full-size"), default="smooth")
    parser.add_argument("--seeds", type=int, default=4, help="samples averaged (default 4)")
    parser.add_argument("--plot", action="store_true", help="write docs/figures/solver_accuracy_<network>.png")
    parser.add_argument("--no-scan", action="store_true", help="only the table's step counts")
    parser.add_argument("--fast", action="store_true",
                        help=f"cheaper: reference DPM-Solver++ 2M with {FAST_REFERENCE_STEPS} steps instead "
                             "of DDIM-1000, DDIM on the solvers' timesteps only, no scan (the "
                             "crossing with DDIM-50 interpolated log-log); for the full-size network")
    args = parser.parse_args()

    model = smooth_model() if args.network == "smooth" else full_size_model()
    rng = np.random.default_rng(0)
    conditioning = rng.uniform(0.1, 0.9, (args.seeds, 4)).astype(np.float32)
    seeds = list(range(args.seeds))
    noise = np.stack([np.asarray(initial_noise(seed, model.latent_shape())) for seed in seeds])
    cond = jnp.asarray(conditioning)

    def timed(label: str, function) -> np.ndarray:
        start = time.perf_counter()
        latents = np.asarray(function())
        print(f"  {label}: {time.perf_counter() - start:.1f} s", flush=True)
        return latents

    def run(name: str, steps: int) -> np.ndarray:
        if name == "ddim-same":
            tables = ddim_on(model, diffusers_timesteps(model.scheduler, steps))
            return timed(f"{name} {steps}", lambda: _ddim_loop(model.unet, tables, cond, jnp.asarray(noise)))
        return timed(f"{name} {steps}", lambda: model.denoise(
            noise, conditioning, num_inference_steps=steps, batch_size=len(seeds), scheduler=name))

    def error(latents: np.ndarray, reference: np.ndarray) -> float:
        return float(np.mean(relative_errors(latents, reference)))

    if args.fast:
        fast(args, model, run, error)
        return
    reference = run("ddim", REFERENCE_STEPS)  # 999, 998, …, 0
    reference_980 = timed("ddim 980..0", lambda: _ddim_loop(
        model.unet, ddim_on(model, np.arange(980, -1, -1)), cond, jnp.asarray(noise)))
    second_order = run("dpmpp-2m", REFERENCE_STEPS - 1)
    floor = error(second_order, reference)
    errors: dict[str, dict[int, float]] = {key: {} for key, _, _ in COLUMNS}
    for key, _, _ in COLUMNS:
        scan = key in ("dpmpp-2m", "unipc") and not args.no_scan
        for steps in sorted(set(TABLE_STEPS) | (set(SCAN_STEPS) if scan else set())):
            errors[key][steps] = error(run(key, steps), reference)
    ddim_50 = run("ddim", 50)
    released_own = error(ddim_50, reference_980)
    offset = error(reference_980, reference)

    def first_match(key: str, target: float) -> int | None:
        return min((n for n, e in sorted(errors[key].items()) if e <= target), default=None)

    targets = {"DDIM-50 as released, vs its own exact solution (from t = 980)": released_own,
               "DDIM-50 on the solvers' timesteps (same ODE)": errors["ddim-same"][50]}
    lines = ["| steps (U-Net calls) | " + " | ".join(title for _, title, _ in COLUMNS) + " |",
             "|---" * (len(COLUMNS) + 1) + "|"]
    for steps in TABLE_STEPS:
        lines.append(f"| {steps} | " + " | ".join(f"{errors[key][steps]:.2e}" for key, _, _ in COLUMNS) + " |")
    summary = [
        f"network: {args.network}, latent {model.latent_shape()}, {args.seeds} seeds; errors vs DDIM-"
        f"{REFERENCE_STEPS} (999, …, 0); its floor (vs DPM-Solver++ 2M-{REFERENCE_STEPS - 1}): {floor:.1e}; "
        f"DDIM from 980 (unit steps) differs from it by {offset:.2e}",
    ]
    matches: dict[str, dict[str, int | None]] = {}
    for label, target in targets.items():
        summary.append(f"{label}: {target:.2e}")
        matches[label] = {key: first_match(key, target) for key in ("dpmpp-2m", "unipc")}
        for key, m in matches[label].items():
            summary.append(f"  {SCHEDULER_TITLES[key]} reaches it at {m} steps ({m / 50:.2f}× DDIM-50's U-Net calls)"
                           if m else f"  {SCHEDULER_TITLES[key]} does not reach it by 25 steps")
    text = "\n".join(lines + [""] + summary)
    print(text)
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    stem = results / f"solver_accuracy_{args.network}"
    stem.with_suffix(".md").write_text(text + "\n")
    stem.with_suffix(".json").write_text(json.dumps({
        "network": args.network, "latent_shape": list(model.latent_shape()), "seeds": seeds,
        "reference": f"ddim-{REFERENCE_STEPS}", "reference_floor": floor,
        "ddim_from_980_vs_reference": offset, "targets": targets, "errors": errors,
        "matches": matches, "jax": jax.__version__,
    }, indent=2) + "\n")
    if args.plot:
        plot(errors, targets, args.network)


def fast(args, model: BrainLDM, run, error) -> None:
    """``--fast``: DDIM on the solvers' timesteps and the solvers vs DPM-Solver++ 2M-250."""
    reference = run("dpmpp-2m", FAST_REFERENCE_STEPS)
    keys = ("ddim-same", "dpmpp-2m", "unipc")
    errors = {key: {steps: error(run(key, steps), reference) for steps in TABLE_STEPS} for key in keys}
    target = errors["ddim-same"][50]

    def crossing(key: str) -> float | None:
        """Steps at which the solver's error meets ``target``, log–log between grid points."""
        points = sorted(errors[key].items())
        for (n0, e0), (n1, e1) in zip(points, points[1:]):
            if e0 > target >= e1:
                return float(np.exp(np.log(n0) + (np.log(e0 / target) / np.log(e0 / e1)) * np.log(n1 / n0)))
        return None

    titles = {"ddim-same": "DDIM, same timesteps (999, …)", **{k: SCHEDULER_TITLES[k] for k in keys[1:]}}
    lines = ["| steps (U-Net calls) | " + " | ".join(titles[k] for k in keys) + " |", "|---" * 4 + "|"]
    lines += [f"| {n} | " + " | ".join(f"{errors[k][n]:.2e}" for k in keys) + " |" for n in TABLE_STEPS]
    summary = [f"network: {args.network}, latent {model.latent_shape()}, {args.seeds} seeds; errors vs "
               f"DPM-Solver++ 2M-{FAST_REFERENCE_STEPS}; DDIM-50 (same timesteps): {target:.2e}"]
    matches = {key: crossing(key) for key in keys[1:]}
    summary += [f"  {SCHEDULER_TITLES[k]} reaches it at ≈ {m:.1f} steps ({m / 50:.2f}× DDIM-50's U-Net calls)"
                if m else f"  {SCHEDULER_TITLES[k]}: no crossing in 5–50" for k, m in matches.items()]
    text = "\n".join(lines + [""] + summary)
    print(text)
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    stem = results / f"solver_accuracy_{args.network}_fast"
    stem.with_suffix(".md").write_text(text + "\n")
    stem.with_suffix(".json").write_text(json.dumps({
        "network": args.network, "latent_shape": list(model.latent_shape()), "seeds": args.seeds,
        "reference": f"dpmpp-2m-{FAST_REFERENCE_STEPS}", "errors": errors, "target": target,
        "matches": matches, "jax": jax.__version__,
    }, indent=2) + "\n")


def plot(errors: dict[str, dict[int, float]], targets: dict[str, float], network: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(5.6, 3.8), dpi=100)
    for (key, title, _), marker in zip(COLUMNS, "ovsD"):
        steps = sorted(errors[key])
        axes.loglog(steps, [errors[key][n] for n in steps], marker=marker, markersize=3.5, label=title)
    for (label, target), style in zip(targets.items(), ("--", ":")):
        axes.axhline(target, color="grey", linestyle=style, linewidth=0.9,
                     label="DDIM-50 released, own error" if style == "--" else "DDIM-50, same timesteps")
    axes.set_xlabel("steps (U-Net calls)")
    axes.set_ylabel("final latent error vs DDIM-1000")
    axes.set_xticks(list(TABLE_STEPS), [str(n) for n in TABLE_STEPS])
    axes.minorticks_off()
    axes.set_title(f"Sampler accuracy ({network} network)", fontsize=10)
    axes.grid(True, which="major", linewidth=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    out = REPO / "docs" / "figures" / f"solver_accuracy_{network}.png"
    figure.savefig(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
