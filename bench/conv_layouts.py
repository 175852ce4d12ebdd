#!/usr/bin/env python
"""Micro-benchmark of the ways :func:`brain_ldm_nodes.models.layers.conv3d` can evaluate a
3-D convolution, on the shapes the Brain LDM's networks use (float32, one example).

    python bench/conv_layouts.py --repeats 5 [--implementations xla,onednn,auto,torch]

For each shape every implementation is compiled first, then timed in interleaved rounds
(A, B, C, A, B, C, …) so that load from other processes hits all alike; the minimum over the
rounds is reported, with GFLOP/s (2·O·I·k³ per output voxel) and the error against the first.
Implementations: the :class:`~brain_ldm_nodes.models.layers.Numerics` names (``auto`` is the
default: oneDNN's direct convolution or the extension's Winograd F(2,3) per shape; ``onednn``:
oneDNN's direct convolution), ``onednn-blocked`` / ``onednn-cl`` (oneDNN direct with its blocked
or the channels-last activation layout), and ``torch`` (PyTorch's ``conv3d``, oneDNN
underneath; imported before our extension so one OpenMP runtime serves both). A second table
times upsample-then-3×3×3 convolutions: the sub-pixel form on oneDNN, ``auto`` (the extension's
27-product form) and PyTorch's ``interpolate`` + ``conv3d`` (MONAI's way).
"""

from __future__ import annotations

import argparse
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from brain_ldm_nodes.models import layers, onednn

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
    (768, 6144, 2, 6, 8, 6, "U-Net up0 sub-pixel upsampler"),
]

# Nearest ×2 upsampling then a 3×3×3 convolution, (in, out, D, H, W of the low-resolution input, label)
UPSAMPLE_SHAPES = [
    (512, 512, 10, 14, 10, "U-Net up1 upsampler → 20×28×20"),
    (768, 768, 5, 7, 5, "U-Net up0 upsampler → 10×14×10"),
    (128, 128, 20, 28, 20, "decoder → 1/4 resolution"),
    (128, 128, 6, 113, 81, "decoder → full resolution, 8-row slab + halo"),
    (128, 64, 6, 113, 81, "decoder skip (nin folded) → full resolution, 8-row slab + halo"),
]
UPSAMPLE_IMPLEMENTATIONS = ("subpixel-onednn", "auto", "torch")


def _function(name: str, pad, k: int):
    """``(x, weight, bias) -> out`` for one implementation (compiled where it is JAX)."""
    if name == "torch":
        import torch

        tensors: dict = {}

        def run(x, weight, bias):
            if not tensors:  # converted once per shape (copies: torch wants writable arrays)
                tensors.update(x=torch.tensor(np.asarray(x))[None], weight=torch.tensor(np.asarray(weight)),
                               bias=torch.tensor(np.asarray(bias)))
            return torch.nn.functional.conv3d(tensors["x"], tensors["weight"], tensors["bias"], padding=pad[0][0])

        return run
    if name.startswith("onednn-"):
        blocked = name == "onednn-blocked"
        return jax.jit(lambda x, w, b: onednn.conv3d(x, w, b, stride=1, padding=pad, blocked=blocked))
    numerics = layers.Numerics(name)
    return jax.jit(lambda x, w, b: layers.conv3d(x, w, b, padding=pad, numerics=numerics))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--implementations", default="xla,auto,onednn-blocked,onednn-cl,torch")
    parser.add_argument("--only", default="", help="substring of the labels to run")
    parser.add_argument("--no-upsampling", dest="upsampling", action="store_false",
                        help="skip the table of upsampling convolutions (sub-pixel on oneDNN, 'auto', PyTorch)")
    args = parser.parse_args()
    names = args.implementations.split(",")
    if "torch" in names or args.upsampling:
        import torch  # first: its libgomp then serves oneDNN's OpenMP calls too

        torch.set_grad_enabled(False)
    print(f"oneDNN extension: {'loaded' if onednn.available() else 'absent'}, {onednn.threads()} threads")
    print("| shape (I→O, k, D×H×W) | " + " | ".join(f"{n} ms (GFLOP/s)" for n in names) + " | max rel. error |")
    print("|---|" + "---|" * (len(names) + 1))
    for cin, cout, k, d, h, w, label in SHAPES:
        if args.only not in label:
            continue
        x = jax.random.normal(jax.random.key(0), (cin, d, h, w))
        weight = jax.random.normal(jax.random.key(1), (cout, cin, k, k, k)) / (cin * k**3) ** 0.5
        bias = jnp.zeros((cout,))
        pad = ((k // 2, k // 2),) * 3 if k == 3 else ((1, 1),) * 3
        functions = {}
        for name in names:
            if name == "winograd" and k != 3:
                continue
            if name == "matmul" and cin * k**3 * d * h * w > 4e8:
                continue  # im2col columns > 1.6 GB
            functions[name] = _function(name, pad, k)
        outputs = {name: np.asarray(function(x, weight, bias)).reshape(-1) for name, function in functions.items()}
        reference = outputs[names[0]]
        errors = {name: float(np.abs(out - reference).max() / np.abs(reference).max()) for name, out in outputs.items()}
        times = {name: [] for name in functions}
        for _ in range(args.repeats):
            for name, function in functions.items():
                start = time.perf_counter()
                jax.block_until_ready(function(x, weight, bias))
                times[name].append(time.perf_counter() - start)
        out_voxels = reference.size // cout
        flops = 2 * cout * cin * k**3 * out_voxels
        cells = [f"{min(times[n]) * 1e3:.0f} ({flops / min(times[n]) / 1e9:.0f})" if n in times else "–"
                 for n in names]
        print(f"| {cin}→{cout}, {k}, {d}×{h}×{w} ({label}) | " + " | ".join(cells)
              + f" | {max(errors.values()):.1e} |", flush=True)
    if args.upsampling:
        upsample_table(args.repeats, args.only)


def _upsample_function(name: str):
    """``(x, weight, bias) -> conv3x3x3(upsample_nearest(x))`` for one implementation."""
    if name == "torch":
        import torch

        tensors: dict = {}

        def run(x, weight, bias):
            if not tensors:
                tensors.update(x=torch.tensor(np.asarray(x))[None], weight=torch.tensor(np.asarray(weight)),
                               bias=torch.tensor(np.asarray(bias)))
            up = torch.nn.functional.interpolate(tensors["x"], scale_factor=2.0, mode="nearest")
            return torch.nn.functional.conv3d(up, tensors["weight"], tensors["bias"], padding=1)

        return run
    numerics = layers.Numerics("onednn" if name == "subpixel-onednn" else name)

    def upsample(x, weight, bias):
        conv = layers.Conv3d(weight.shape[1], weight.shape[0], key=jax.random.key(0), numerics=numerics)
        conv = eqx.tree_at(lambda c: (c.weight, c.bias), conv, (weight, bias))
        return layers.upsample_conv(x, conv)

    return jax.jit(upsample)


def upsample_table(repeats: int, only: str) -> None:
    """Time of each way to compute an upsampling convolution, interleaved; GFLOP/s counted as the
    upsampled 3×3×3 convolution's (2·O·I·27 per output voxel), what MONAI computes."""
    print("\n| upsample then 3×3×3 (I→O, low-resolution D×H×W) | "
          + " | ".join(f"{n} ms (GFLOP/s)" for n in UPSAMPLE_IMPLEMENTATIONS) + " | max rel. error |")
    print("|---|" + "---|" * (len(UPSAMPLE_IMPLEMENTATIONS) + 1))
    for cin, cout, d, h, w, label in UPSAMPLE_SHAPES:
        if only not in label:
            continue
        x = jax.random.normal(jax.random.key(0), (cin, d, h, w))
        weight = jax.random.normal(jax.random.key(1), (cout, cin, 3, 3, 3)) / (cin * 27) ** 0.5
        bias = jnp.zeros((cout,))
        functions = {name: _upsample_function(name) for name in UPSAMPLE_IMPLEMENTATIONS}
        outputs = {name: np.asarray(f(x, weight, bias)).reshape(-1) for name, f in functions.items()}
        reference = outputs[UPSAMPLE_IMPLEMENTATIONS[0]]
        errors = [float(np.abs(out - reference).max() / np.abs(reference).max()) for out in outputs.values()]
        times = {name: [] for name in functions}
        for _ in range(repeats):
            for name, function in functions.items():
                start = time.perf_counter()
                jax.block_until_ready(function(x, weight, bias))
                times[name].append(time.perf_counter() - start)
        flops = 2 * cout * cin * 27 * 8 * d * h * w
        cells = [f"{min(times[n]) * 1e3:.0f} ({flops / min(times[n]) / 1e9:.0f})" for n in UPSAMPLE_IMPLEMENTATIONS]
        print(f"| {cin}→{cout}, {d}×{h}×{w} ({label}) | " + " | ".join(cells) + f" | {max(errors):.1e} |", flush=True)


if __name__ == "__main__":
    main()
