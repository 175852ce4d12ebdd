"""How a seed becomes the sampler's starting noise, as constants (no JAX import here):
:func:`brain_ldm_nodes.pipeline.initial_noise` draws with them, the sidecars
(:mod:`brain_ldm_nodes.provenance`) describe them."""

from __future__ import annotations

__all__ = ["PRNG_IMPL", "initial_noise_description"]

#: The PRNG implementation seeds are mapped with; fixed so results do not follow JAX defaults.
PRNG_IMPL = "threefry2x32"


def initial_noise_description() -> str:
    """The sidecars' ``Sampler.InitialNoise``: how ``Seed`` gives the starting latent."""
    return f"jax.random.normal(jax.random.key(Seed, impl='{PRNG_IMPL}'), LatentShape), float32"
