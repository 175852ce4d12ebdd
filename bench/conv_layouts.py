#!/usr/bin/env python
"""Micro-benchmark of the ways :func:`brain_ldm_nodes.models.layers.conv3d` can evaluate a
3-D convolution, on the shapes the Brain LDM's networks use (float32, one example).

    python bench/conv_layouts.py --repeats 5 [--implementations xla,planes,matmul,winograd]

For each shape every implementation is compiled first, then timed in interleaved rounds
(A, B, C, A, B, C, …) so that load from other processes hits all alike; the minimum over the
rounds is reported, with GFLOP/s (2·O·I·k³ per output voxel) and the error against ``xla``.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from brain_ldm_nodes.models import layers

# (in, out, kernel, D, H, W, label)
SHAPES = [
    (256, 256, 3, 20, 28, 20, "U-Net level 0"),
    (768, 256, 3, 20, 28, 20, "U-Net up2 conv1"),
    (512, 512, 3, 20, 28, 20, "U-Net up1 upsampler conv1"),
    (512, 512, 3, 10, 14, 10, "U-Net level 1"),
    (1280, 512, 3, 10, 14, 10, "U-Net up1 conv1"),
    (768, 768, 3, 5, 7, 5, "U-Net level 2"),
    (1536, 768, 3, 5, 7, 5, "U-Net up0 conv1"),
    (128, 128, 3, 40, 56, 40, "decoder 1/4 resolution"),
    (128, 128, 3, 20, 112, 80, "decoder 1/2 resolution, 20-row slab"),
    (128, 64, 3, 10, 224, 160, "decoder full resolution, 8-row slab + halo"),
    (64, 64, 3, 10, 224, 160, "decoder full resolution, 8-row slab + halo"),
    (128, 1024, 2, 6, 113, 81, "sub-pixel upsample to full resolution, 4-row slab"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--implementations", default="xla,planes,matmul,winograd")
    parser.add_argument("--only", default="", help="substring of the labels to run")
    args = parser.parse_args()
    names = args.implementations.split(",")
    print("| shape (I→O, k, D×H×W) | " + " | ".join(f"{n} ms (GFLOP/s)" for n in names) + " | max rel. error |")
    print("|---|" + "---|" * (len(names) + 1))
    for cin, cout, k, d, h, w, label in SHAPES:
        if args.only not in label:
            continue
        x = jax.random.normal(jax.random.key(0), (cin, d, h, w))
        weight = jax.random.normal(jax.random.key(1), (cout, cin, k, k, k)) / (cin * k**3) ** 0.5
        bias = jnp.zeros((cout,))
        pad = ((k // 2, k // 2),) * 3 if k == 3 else ((1, 1),) * 3
        compiled, errors = {}, {}
        for name in names:
            if name == "winograd" and k != 3:
                continue
            if name == "matmul" and cin * k**3 * d * h * w > 4e8:
                continue  # im2col columns > 1.6 GB
            with layers.conv_implementation(name):
                compiled[name] = jax.jit(lambda x, w, b: layers.conv3d(x, w, b, padding=pad)).lower(
                    x, weight, bias).compile()
        reference = compiled[names[0]](x, weight, bias)
        times = {name: [] for name in compiled}
        for _ in range(args.repeats):
            for name, function in compiled.items():
                start = time.perf_counter()
                function(x, weight, bias).block_until_ready()
                times[name].append(time.perf_counter() - start)
        out_voxels = reference.shape[1] * reference.shape[2] * reference.shape[3]
        flops = 2 * cout * cin * k**3 * out_voxels
        for name, function in compiled.items():
            out = function(x, weight, bias)
            errors[name] = float(jnp.abs(out - reference).max() / jnp.abs(reference).max())
        cells = [f"{min(times[n]) * 1e3:.0f} ({flops / min(times[n]) / 1e9:.0f})" if n in times else "–"
                 for n in names]
        print(f"| {cin}→{cout}, {k}, {d}×{h}×{w} ({label}) | " + " | ".join(cells)
              + f" | {max(errors.values()):.1e} |", flush=True)


if __name__ == "__main__":
    main()
