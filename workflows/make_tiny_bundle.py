#!/usr/bin/env python
"""Write a tiny random-weight Brain LDM bundle for trying the example workflows in seconds.

    python workflows/make_tiny_bundle.py OUT [--seed 0] [--image-shape 32 32 32]

``OUT`` becomes a ``brain_ldm.1`` bundle (native grid 32 x 32 x 32 voxels unless
``--image-shape`` says otherwise; multiples of 8 for this tiny architecture) and ``OUT-vae``
its base ``brain_ldm.vae`` bundle. Pass ``OUT`` as ``--model`` to the other scripts. The images it
makes are noise-like: the weights are random, only the plumbing is real.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax

from brain_ldm_nodes import AutoencoderKLConfig, BrainLDM, DiffusionModelUNetConfig

TINY_VAE = AutoencoderKLConfig(channels=(32, 32), num_res_blocks=(1, 1))
TINY_UNET = DiffusionModelUNetConfig(
    channels=(32, 32, 32), num_res_blocks=(1, 1, 1), num_head_channels=(0, 32, 32)
)
TINY_SHAPE = (32, 32, 32)


def make_tiny_bundle(
    out: Path, *, seed: int = 0, image_shape: tuple[int, int, int] = TINY_SHAPE
) -> Path:
    """Save a random-weight tiny model at ``out`` (its VAE at ``out-vae``); returns ``out``."""
    model = BrainLDM.random(
        key=jax.random.key(seed),
        vae_config=TINY_VAE,
        unet_config=TINY_UNET,
        image_shape=image_shape,
    )
    return model.save_pretrained(
        out,
        vae_path=out.with_name(f"{out.name}-vae"),
        provenance={"note": f"random weights (seed {seed}) for examples and tests"},
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder for the brain_ldm.1 bundle")
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed of the random weights")
    parser.add_argument(
        "--image-shape", type=int, nargs=3, default=TINY_SHAPE, metavar=("D", "H", "W"),
        help="native grid in voxels, multiples of 8 (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    print(make_tiny_bundle(args.out.resolve(), seed=args.seed, image_shape=tuple(args.image_shape)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
