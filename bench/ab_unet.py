#!/usr/bin/env python
"""This round's U-Net step changes, before/after, interleaved in one process.

    python bench/ab_unet.py --repeats 3

Times the full-size U-Net step (batch 1, 20×28×20, converted bundle) in three variants, in
turn within each repeat so they share the machine's load: ``before`` (kernels reordered by
oneDNN on every call, sub-pixel kernels folded with the former 0/1 einsum), ``fold`` (slice-sum
fold, kernels still reordered per call) and ``after`` (slice-sum fold, kernels packed once, as
``from_pretrained`` loads them). Prints per-repeat times, median ratios and the max relative
difference between the variants' outputs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path


def einsum_subpixel_weights(weight):
    """The former fold (before 2026-11-30): an einsum with 0/1 matrices."""
    import jax.numpy as jnp

    from brain_ldm_nodes.models.layers import PRECISION

    fold = jnp.array([[[1, 0, 0], [0, 1, 1]], [[1, 1, 0], [0, 0, 1]]], weight.dtype)
    kernels = jnp.einsum("apk,bql,crm,oiklm->abcoipqr", fold, fold, fold, weight, precision=PRECISION)
    return kernels.reshape((8 * weight.shape[0], weight.shape[1], 2, 2, 2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=Path(tempfile.gettempdir()) / "brain-ldm-bench" / "converted"
                        / "brain_ldm.1")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np

    from brain_ldm_nodes.models import layers
    from brain_ldm_nodes.pipeline import BrainLDM, _model_input

    packed = BrainLDM.from_pretrained(args.bundle).prepare_unet()
    z = jnp.asarray(np.random.default_rng(0).standard_normal((1, 3, 20, 28, 20), dtype=np.float32))
    cond = jnp.asarray(np.array([[1.0, 0.7, 0.7, 0.5]], np.float32))

    def compiled(unet, fold):
        layers_fold = layers.subpixel_weights
        layers.subpixel_weights = fold  # read at trace time by layers.upsample_conv
        try:
            function = jax.jit(lambda unet, z, c: jax.vmap(
                lambda z, c: unet(_model_input(z, c), jnp.asarray(500.0), c[None]))(z, c)).lower(unet, z, cond).compile()
        finally:
            layers.subpixel_weights = layers_fold
        return lambda: function(unet, z, cond).block_until_ready()

    plain = layers.unpack_kernels(packed)  # a second copy of the weights (2.2 GB) for the A/B only
    variants = {"before": compiled(plain, einsum_subpixel_weights), "fold": compiled(plain, layers.subpixel_weights),
                "after": compiled(packed, layers.subpixel_weights)}
    outputs = {name: np.asarray(run()) for name, run in variants.items()}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        load = os.getloadavg()[0]
        for name, run in variants.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
        print(json.dumps({"load1": load, **{name: t[-1] for name, t in times.items()}}), flush=True)
    reference = outputs["before"]
    print(json.dumps({
        "median_s": {name: statistics.median(t) for name, t in times.items()},
        "min_s": {name: min(t) for name, t in times.items()},
        "ratio_after_before": statistics.median(a / b for a, b in zip(times["after"], times["before"])),
        "ratio_fold_before": statistics.median(a / b for a, b in zip(times["fold"], times["before"])),
        "max_relative_difference": {name: float(np.abs(out - reference).max() / np.abs(reference).max())
                                    for name, out in outputs.items()},
    }))


if __name__ == "__main__":
    main()
