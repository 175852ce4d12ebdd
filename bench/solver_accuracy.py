#!/usr/bin/env python
"""Accuracy of DDIM and the multistep solvers vs a 1000-step DDIM reference (README "Faster samplers").

    python bench/solver_accuracy.py                      # the smooth tiny network (≈ 5 min, 2 cores)
    python bench/solver_accuracy.py --network full-size  # released architecture, random weights,
                                                         # 32³ image / 4³ latent (≈ 5 GB, longer)

Every sampler starts from the same noise (``initial_noise(seed, ...)``, as ``sample_latents``)
and the same conditioning; the error of a run is the final latent's normwise relative error
``max|z − z_ref| / max|z_ref|`` (as the tests' ``relative_error``), averaged over the seeds.
The reference is DDIM with 1000 steps (timesteps 999, 998, …, 0: the ODE from t = 999 to the
clean sample, as the solvers' ``linspace`` timesteps). Its own error is estimated by comparing it
with DPM-Solver++ 2M at 999 steps (a second-order solution of the same ODE): printed as "reference
floor". DDIM keeps the bundle's "leading" timesteps (980, 960, …, 0 for 50 steps; it starts at
t = (n−1)·⌊1000/n⌋, e.g. 800 for 5 steps), so part of its error at few steps is that late start.

"smooth": the network of tests/test_inversion.py (tiny U-Net with random weights, output
convolution × 0.3: a smoother, more realistic ε), 16³ image, 8³ latent.

Writes ``bench/results/solver_accuracy_<network>.json`` and ``.md`` and, for the smooth network,
the log–log plot ``docs/figures/solver_accuracy.png`` (with ``--plot``).
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

from brain_ldm_nodes import AutoencoderKLConfig, BrainLDM, DiffusionModelUNetConfig, initial_noise
from brain_ldm_nodes.scheduler_names import SCHEDULER_TITLES, SCHEDULERS

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TABLE_STEPS = (5, 10, 15, 20, 25, 50)
SCAN_STEPS = tuple(range(5, 26))  # the solvers at every count, to find where they meet DDIM-50
REFERENCE_STEPS = 1000


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--network", choices=("smooth", "full-size"), default="smooth")
    parser.add_argument("--seeds", type=int, default=4, help="samples averaged (default 4)")
    parser.add_argument("--plot", action="store_true", help="write docs/figures/solver_accuracy.png")
    parser.add_argument("--no-scan", action="store_true", help="only the table's step counts")
    args = parser.parse_args()

    model = smooth_model() if args.network == "smooth" else full_size_model()
    rng = np.random.default_rng(0)
    conditioning = rng.uniform(0.1, 0.9, (args.seeds, 4)).astype(np.float32)
    seeds = list(range(args.seeds))
    noise = np.stack([np.asarray(initial_noise(seed, model.latent_shape())) for seed in seeds])

    def run(scheduler: str, steps: int) -> np.ndarray:
        start = time.perf_counter()
        latents = np.asarray(model.denoise(noise, conditioning, num_inference_steps=steps,
                                           batch_size=len(seeds), scheduler=scheduler))
        print(f"  {scheduler} {steps}: {time.perf_counter() - start:.1f} s", flush=True)
        return latents

    reference = run("ddim", REFERENCE_STEPS)
    floor = float(np.mean(relative_errors(run("dpmpp-2m", REFERENCE_STEPS - 1), reference)))
    errors: dict[str, dict[int, float]] = {name: {} for name in SCHEDULERS}
    for name in SCHEDULERS:
        counts = TABLE_STEPS if name == "ddim" or args.no_scan else sorted(set(TABLE_STEPS) | set(SCAN_STEPS))
        for steps in counts:
            errors[name][steps] = float(np.mean(relative_errors(run(name, steps), reference)))

    target = errors["ddim"][50]
    matches = {
        name: min((n for n, e in sorted(errors[name].items()) if e <= target), default=None)
        for name in SCHEDULERS if name != "ddim"
    }
    header = "| steps (U-Net calls) | " + " | ".join(SCHEDULER_TITLES[n] for n in SCHEDULERS) + " |"
    lines = [header, "|---" * (len(SCHEDULERS) + 1) + "|"]
    for steps in TABLE_STEPS:
        lines.append(f"| {steps} | " + " | ".join(f"{errors[n][steps]:.2e}" for n in SCHEDULERS) + " |")
    summary = [
        f"network: {args.network}, latent {model.latent_shape()}, {args.seeds} seeds; reference DDIM-"
        f"{REFERENCE_STEPS}; reference floor (DPM-Solver++ 2M-{REFERENCE_STEPS - 1} vs it): {floor:.1e}",
        f"DDIM-50 error: {target:.2e}",
        *(f"{SCHEDULER_TITLES[n]} reaches it at {m} steps ({m / 50:.2f}× DDIM-50's U-Net calls)"
          if m else f"{SCHEDULER_TITLES[n]} does not reach it by 25 steps" for n, m in matches.items()),
    ]
    text = "\n".join(lines + [""] + summary)
    print(text)
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    stem = results / f"solver_accuracy_{args.network}"
    stem.with_suffix(".md").write_text(text + "\n")
    stem.with_suffix(".json").write_text(json.dumps({
        "network": args.network, "latent_shape": list(model.latent_shape()), "seeds": seeds,
        "reference": f"ddim-{REFERENCE_STEPS}", "reference_floor": floor, "errors": errors,
        "matches_ddim_50_at": matches, "jax": jax.__version__,
    }, indent=2) + "\n")
    if args.plot:
        plot(errors, target, args.network)


def plot(errors: dict[str, dict[int, float]], target: float, network: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(5.0, 3.6), dpi=110)
    for name, marker in zip(SCHEDULERS, "osD"):
        steps = sorted(errors[name])
        axes.loglog(steps, [errors[name][n] for n in steps], marker=marker, markersize=3.5,
                    label=SCHEDULER_TITLES[name])
    axes.axhline(target, color="grey", linestyle="--", linewidth=0.8, label="DDIM-50's error")
    axes.set_xlabel("steps (U-Net calls)")
    axes.set_ylabel("final latent error vs DDIM-1000")
    axes.set_xticks(list(TABLE_STEPS), [str(n) for n in TABLE_STEPS])
    axes.minorticks_off()
    axes.set_title(f"Sampler accuracy ({network} network)", fontsize=10)
    axes.grid(True, which="major", linewidth=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    out = REPO / "docs" / "figures" / "solver_accuracy.png"
    figure.savefig(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
