#!/usr/bin/env python
"""Side-by-side benchmark: brain-ldm-nodes (JAX) vs MONAI 1.6.1 (PyTorch), same CPU, same weights.

    python bench/benchmark.py --workdir /tmp/brain-ldm-bench --repeats 3

Builds upstream-format checkpoints once (MONAI networks at the released architecture with
random weights, ``torch.save`` with the old key names), converts them with ``brain-ldm-convert``
and loads the same weights into both implementations. Every figure runs in its own fresh
process so that its peak RSS is its own; each reports min/median over ``--repeats``. Results
go to ``bench/results/benchmark.{json,md}`` (or ``--out``).

Figures: U-Net step at the 20×28×20 latent, VAE decode to 160×224×160, a full sample
(``--steps`` DDIM steps + decode), compile time (with the oneDNN extension, the default, and
without it: ``BRAIN_LDM_NODES_ONEDNN=0``), ``from_pretrained`` from a warm cache, and this CPU's
measured float32 peak (a large matrix product, JAX and PyTorch). Needs the ``[test]`` extra.
The per-convolution table is ``bench/conv_layouts.py``.

Compile time is measured three times, each in a fresh process: without JAX's persistent
compilation cache, with an empty cache (cold) and with the cache the cold run filled (warm).
Each run reports (a) the DDIM step — ``jax.jit(step).lower(...)`` and ``.compile()`` timed
separately, nothing executed — and (b) decode — the sum of JAX's own compile-event durations
(tracing, lowering to MLIR, XLA compilation or persistent-cache retrieval, from
``jax.monitoring``) during the first ``BrainLDM.decode`` call, i.e. compile time alone although
the call also runs — and the first step call (compile + run) as before.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
LATENT = (1, 3, 20, 28, 20)


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _timed(function, repeats: int) -> dict:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return {"min_s": min(times), "median_s": statistics.median(times), "runs_s": times}


# -- workers: one figure, one implementation, one process ------------------------------------------
def worker(impl: str, figure: str, workdir: Path, repeats: int, steps: int) -> dict:
    import numpy as np

    rng = np.random.default_rng(0)
    latent = rng.standard_normal(LATENT, dtype=np.float32)
    conditioning = np.array([[1.0, 0.7, 0.7, 0.5]], np.float32)
    if impl == "monai":
        return _monai_worker(figure, workdir, repeats, steps, latent, conditioning)
    return _jax_worker(figure, workdir, repeats, steps, latent, conditioning)


def _monai_worker(figure, workdir, repeats, steps, latent, conditioning) -> dict:
    import torch
    from monai.networks.nets import AutoencoderKL, DiffusionModelUNet
    from monai.networks.schedulers import DDIMScheduler

    torch.set_grad_enabled(False)
    result: dict = {"threads": torch.get_num_threads()}
    if figure == "peak":
        n = 4096
        a = torch.randn(n, n)
        a @ a
        result.update(_timed(lambda: a @ a, repeats))
        result["gflops"] = 2 * n**3 / result["min_s"] / 1e9
        return result
    vae = unet = None
    if figure in ("decode", "sample"):
        vae = AutoencoderKL(spatial_dims=3, in_channels=1, out_channels=1, channels=(64, 128, 128, 128),
                            latent_channels=3, num_res_blocks=2, attention_levels=(False,) * 4,
                            with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False).eval()
        vae.load_old_state_dict(torch.load(workdir / "upstream" / "autoencoder.pt", weights_only=True))
    if figure in ("unet", "sample"):
        unet = DiffusionModelUNet(spatial_dims=3, in_channels=7, out_channels=3, channels=(256, 512, 768),
                                  num_res_blocks=2, attention_levels=(False, True, True),
                                  num_head_channels=(0, 512, 768), resblock_updown=True,
                                  with_conditioning=True, cross_attention_dim=4, upcast_attention=True).eval()
        unet.load_old_state_dict(torch.load(workdir / "upstream" / "model.pt", weights_only=True))
    cond = torch.from_numpy(conditioning)
    z = torch.from_numpy(latent)

    def unet_step():
        x = torch.cat([z, cond[:, :, None, None, None].expand(-1, -1, *z.shape[2:])], dim=1)
        return unet(x, torch.tensor([500]), context=cond[:, None, :])

    def sample():
        scheduler = DDIMScheduler(num_train_timesteps=1000, schedule="scaled_linear_beta", beta_start=0.0015,
                                  beta_end=0.0205, clip_sample=False)
        ratio = 1000 // steps
        scheduler.num_inference_steps = steps
        scheduler.timesteps = torch.arange(steps - 1, -1, -1) * ratio
        latents = z.clone()
        for t in scheduler.timesteps:
            x = torch.cat([latents, cond[:, :, None, None, None].expand(-1, -1, *z.shape[2:])], dim=1)
            eps = unet(x, torch.tensor([int(t)]), context=cond[:, None, :])
            latents, _ = scheduler.step(eps, int(t), latents)
        return vae.decode(latents)

    function = {"unet": unet_step, "decode": lambda: vae.decode(z), "sample": sample}[figure]
    result.update(_timed(function, repeats))
    result["peak_rss_gib"] = _peak_rss_gib()
    return result


#: jax.monitoring events whose durations add up to compile time (dispatch.py in jax 0.10).
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")


def _compile_clock() -> dict:
    """Seconds spent compiling since this call, by event (updated live)."""
    import jax

    totals = {event: 0.0 for event in COMPILE_EVENTS}

    def listener(event: str, duration: float, **_: object) -> None:
        if event in totals:
            totals[event] += duration

    jax.monitoring.register_event_duration_secs_listener(listener)
    return totals


def _jax_worker(figure, workdir, repeats, steps, latent, conditioning) -> dict:
    import jax
    import jax.numpy as jnp

    if figure == "compile_cached":
        jax.config.update("jax_compilation_cache_dir", str(workdir / "jax-cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    from brain_ldm_nodes import BrainLDM
    from brain_ldm_nodes.pipeline import _ddim_loop
    from brain_ldm_nodes.scheduler import ddim_tables

    from brain_ldm_nodes.models import onednn

    result: dict = {"jax": jax.__version__, "devices": str(jax.devices()), "onednn": onednn.available(),
                    "onednn_threads": onednn.threads()}
    if figure == "peak":
        n = 4096
        a = jax.random.normal(jax.random.key(0), (n, n))
        matmul = jax.jit(lambda a: a @ a)
        matmul(a).block_until_ready()
        result.update(_timed(lambda: matmul(a).block_until_ready(), repeats))
        result["gflops"] = 2 * n**3 / result["min_s"] / 1e9
        return result
    if figure == "decode":
        # The autoencoder alone, as MONAI's worker loads it: the peak RSS is the decoder's,
        # not that plus the U-Net's 2.2 GB of weights.
        from brain_ldm_nodes.pipeline import _decode
        from brain_ldm_nodes.weights import bundle

        folder = workdir / "converted" / "brain_ldm.vae"
        vae = bundle.load_bundle_weights(folder, bundle.read_bundle_config(folder))
        z = jnp.asarray(latent)
        _decode(vae, z).block_until_ready()
        result.update(_timed(lambda: _decode(vae, z).block_until_ready(), repeats))
        result["peak_rss_gib"] = _peak_rss_gib()
        return result
    start = time.perf_counter()
    model = BrainLDM.from_pretrained(workdir / "converted" / "brain_ldm.1")
    jax.block_until_ready(jax.tree_util.tree_leaves(model.unet))
    result["load_s"] = time.perf_counter() - start
    start = time.perf_counter()
    model.prepare_unet()  # oneDNN kernel packing, which sampling does at its first call
    result["prepare_unet_s"] = time.perf_counter() - start
    z = jnp.asarray(latent)
    cond = jnp.asarray(conditioning)
    if figure == "load":
        result.update(_timed(lambda: jax.block_until_ready(jax.tree_util.tree_leaves(
            BrainLDM.from_pretrained(workdir / "converted" / "brain_ldm.1").unet)), repeats))
    elif figure in ("unet", "compile", "compile_cached"):
        import equinox as eqx

        @eqx.filter_jit
        def step(unet, z, cond):
            x = jnp.concatenate([z, jnp.broadcast_to(cond[:, :, None, None, None], (1, 4, *z.shape[2:]))], axis=1)
            return jax.vmap(unet)(x, jnp.array([500]), cond[:, None, :])

        if figure != "unet":  # compile alone: the DDIM step, lowered and compiled, not run
            params, static = eqx.partition(model.unet, eqx.is_array)
            pure_step = jax.jit(lambda params, z, cond: step(eqx.combine(params, static), z, cond))
            start = time.perf_counter()
            lowered = pure_step.lower(params, z, cond)
            result["step_lower_s"] = time.perf_counter() - start
            start = time.perf_counter()
            lowered.compile()
            result["step_compile_s"] = time.perf_counter() - start
        start = time.perf_counter()
        step(model.unet, z, cond).block_until_ready()
        result["first_call_s"] = time.perf_counter() - start
        if figure == "unet":
            result.update(_timed(lambda: step(model.unet, z, cond).block_until_ready(), repeats))
        else:
            clock = _compile_clock()
            start = time.perf_counter()
            model.decode(z).block_until_ready()
            result["decode_first_call_s"] = time.perf_counter() - start
            result["decode_compile_s"] = sum(clock.values())
            result["decode_compile_events_s"] = dict(clock)
    elif figure == "sample":
        tables = ddim_tables(model.scheduler, steps)

        def sample():
            return model.decode(_ddim_loop(model.unet, tables, cond, z)).block_until_ready()

        sample()
        result.update(_timed(sample, repeats))
    result["peak_rss_gib"] = _peak_rss_gib()
    return result


# -- driver ----------------------------------------------------------------------------------------
def prepare(workdir: Path) -> None:
    """Write upstream-format checkpoints and their converted bundles once."""
    if (workdir / "converted" / "brain_ldm.1" / "config.json").is_file():
        return
    sys.path.insert(0, str(HERE.parent / "tests"))
    from monai_oracle import monai_autoencoder, monai_unet  # noqa: E402
    from upstream_fixtures import to_old_monai_names  # noqa: E402
    import torch

    from brain_ldm_nodes import AutoencoderKLConfig, DiffusionModelUNetConfig

    (workdir / "upstream").mkdir(parents=True, exist_ok=True)
    torch.save(to_old_monai_names(monai_autoencoder(AutoencoderKLConfig(), seed=0).state_dict()),
               workdir / "upstream" / "autoencoder.pt")
    torch.save(to_old_monai_names(monai_unet(DiffusionModelUNetConfig(), seed=1).state_dict()),
               workdir / "upstream" / "model.pt")
    subprocess.run(["brain-ldm-convert", "--autoencoder", str(workdir / "upstream" / "autoencoder.pt"),
                    "--unet", str(workdir / "upstream" / "model.pt"), "-o", str(workdir / "converted")],
                   check=True)


def run_worker(impl: str, figure: str, args: argparse.Namespace, env: dict | None = None) -> dict:
    command = [sys.executable, __file__, "--worker", impl, figure, "--workdir", str(args.workdir),
               "--repeats", str(args.repeats), "--steps", str(args.steps)]
    print(f"[bench] {impl:5s} {figure} {' '.join(f'{k}={v}' for k, v in (env or {}).items())}…", flush=True)
    output = subprocess.run(command, check=True, capture_output=True, text=True,
                            env={**os.environ, **(env or {})}).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "brain-ldm-bench")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps of the full-sample figure")
    parser.add_argument("--figures", default="unet,decode,sample,compile,load,peak",
                        help="comma-separated subset of unet,decode,sample,compile,load,peak")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "benchmark")
    parser.add_argument("--worker", nargs=2, metavar=("IMPL", "FIGURE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.workdir, args.repeats, args.steps)))
        return

    prepare(args.workdir)
    figures = args.figures.split(",")
    results: dict = {"machine": {"cpus": os.cpu_count(), "processor": platform.processor(),
                                 "python": platform.python_version()},
                     "steps": args.steps, "repeats": args.repeats, "figures": {}}
    for figure in ("unet", "decode", "sample"):
        if figure in figures:
            ours, theirs = run_worker("jax", figure, args), run_worker("monai", figure, args)
            results["figures"][figure] = {"jax": ours, "monai": theirs,
                                          "ratio_median": ours["median_s"] / theirs["median_s"],
                                          "ratio_peak_rss": ours["peak_rss_gib"] / theirs["peak_rss_gib"]}
    if "compile" in figures:
        import shutil

        for label, env in (("compile", {}), ("compile_xla", {"BRAIN_LDM_NODES_ONEDNN": "0"})):
            cache = args.workdir / "jax-cache"
            if cache.exists():
                shutil.rmtree(cache)
            runs = {"no_cache": run_worker("jax", "compile", args, env),
                    "cache_cold": run_worker("jax", "compile_cached", args, env),
                    "cache_warm": run_worker("jax", "compile_cached", args, env)}
            results["figures"][label] = {
                f"{name}_{key}": run[key] for name, run in runs.items()
                for key in ("first_call_s", "step_lower_s", "step_compile_s", "decode_compile_s",
                            "decode_first_call_s")
            }
    if "peak" in figures:
        results["figures"]["peak"] = {"jax": run_worker("jax", "peak", args),
                                      "monai": run_worker("monai", "peak", args)}
    if "load" in figures:
        results["figures"]["load"] = run_worker("jax", "load", args)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    args.out.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))


def markdown(results: dict) -> str:
    rows = ["| figure | ours (min / median) | MONAI (min / median) | ratio (median) | peak RSS ours / MONAI |"
            " GFLOP/s ours / MONAI (fraction of the measured peak) |",
            "|---|---|---|---|---|---|"]
    peak = results["figures"].get("peak")
    peak_gflops = max(peak["jax"]["gflops"], peak["monai"]["gflops"]) if peak else None
    # multiply-adds ×2 of one U-Net step at 20×28×20 and of one decode to 160×224×160 (UPSTREAM.md §7)
    tflop = {"unet": 1.45, "decode": 15.1, "sample": 1.45 * results["steps"] + 15.1}
    for name, label in (("unet", "U-Net step, 20×28×20 latent"), ("decode", "VAE decode → 160×224×160"),
                        ("sample", f"full sample ({results['steps']} steps + decode)")):
        figure = results["figures"].get(name)
        if figure:
            ours, theirs = figure["jax"], figure["monai"]
            rows.append(f"| {label} | {ours['min_s']:.1f} / {ours['median_s']:.1f} s | "
                        f"{theirs['min_s']:.1f} / {theirs['median_s']:.1f} s | {figure['ratio_median']:.2f} | "
                        f"{ours['peak_rss_gib']:.1f} / {theirs['peak_rss_gib']:.1f} GiB | "
                        + " / ".join(f"{tflop[name] * 1e3 / run['median_s']:.0f}" for run in (ours, theirs))
                        + (f" ({tflop[name] * 1e3 / ours['median_s'] / peak_gflops:.0%} / "
                           f"{tflop[name] * 1e3 / theirs['median_s'] / peak_gflops:.0%})" if peak_gflops else "")
                        + " |")
    for key_, suffix in (("compile", ""), ("compile_xla", " — XLA path (no oneDNN)")):
        compile_ = results["figures"].get(key_)
        if not compile_:
            continue

        def triple(key: str) -> str:
            return " / ".join(f"{compile_[f'{name}_{key}']:.1f}" for name in ("no_cache", "cache_cold", "cache_warm"))

        rows.append(f"| U-Net step first call (compile + run), no cache / cold cache / warm cache{suffix} | "
                    f"{triple('first_call_s')} s | | | | |")
        rows.append(f"| DDIM step compile alone (`lower` + `compile`), no cache / cold / warm{suffix} | "
                    f"{triple('step_lower_s')} + {triple('step_compile_s')} s | | | | |")
        rows.append(f"| decode compile alone (JAX compile events), no cache / cold / warm{suffix} | "
                    f"{triple('decode_compile_s')} s | | | | |")
    peak = results["figures"].get("peak")
    if peak:
        rows.append(f"| float32 peak, 4096² matrix product (JAX / PyTorch) | {peak['jax']['gflops']:.0f} GFLOP/s | "
                    f"{peak['monai']['gflops']:.0f} GFLOP/s | | | |")
    load = results["figures"].get("load")
    if load:
        rows.append(f"| `from_pretrained`, warm cache | {load['min_s']:.1f} / {load['median_s']:.1f} s | | | | |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    main()
