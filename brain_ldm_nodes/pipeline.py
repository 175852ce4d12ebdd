"""``BrainLDM``: conditioning → latent (DDIM, or a multistep solver) → T1w image, plus encode/decode.

Public arrays are **batched**, channels first: images ``(B, 1, D, H, W)`` float32 in [0, 1]
(axes LAS, 1 mm: UPSTREAM.md §2), latents ``(B, 3, D/8, H/8, W/8)``, conditioning ``(B, 4)``
in the order :data:`CONDITIONING_ORDER`. The networks underneath work per example.

Seeds: sample ``i`` of a call gets its starting noise from its own seed only —
``noise = jax.random.normal(jax.random.key(seed_i, impl="threefry2x32"), latent_shape)`` —
see :func:`initial_noise`. With the default ``batch_size=1`` every sample runs through the same
compiled program, so an image depends only on (weights, conditioning, seed, steps, scheduler,
JAX version), never on which other samples share the call: bitwise.
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from .conditioning import CONDITIONING_ORDER  # order of the four values (UPSTREAM.md §1)
from .grid import MODEL_GRID_SHAPE as IMAGE_SHAPE  # the released model's grid (voxels, 1 mm, LAS)
from .models import onednn
from .models.autoencoder import AutoencoderKL, AutoencoderKLConfig
from .models.layers import with_numerics
from .models.streaming import decode_streaming, decode_streaming_layout_ok
from .models.unet import DiffusionModelUNet, DiffusionModelUNetConfig, pack_unet_kernels
from .scheduler import DDIMSchedulerConfig, DDIMTables, ddim_inverse_step, ddim_step, ddim_tables
from .scheduler_names import SCHEDULERS, check_scheduler  # "ddim" and the solvers' names
from .seeding import PRNG_IMPL  # how a seed maps to noise (also named in the sidecars)
from .solvers import SOLVERS, Solver, initial_state, table_row

# Serialises BrainLDM.prepare_unet (packing a U-Net twice at once would free its kernels twice).
_PACKING_LOCK = threading.Lock()

#: Values of the ``precision`` argument of the sampling methods (float32 is the reference).
PRECISIONS = ("float32", "bfloat16")


def initial_noise(seed: int, latent_shape: Sequence[int]) -> Float[Array, "*latent_shape"]:
    """The DDIM starting point N(0, 1) of shape ``latent_shape`` for one ``seed`` in [0, 2³²)."""
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an integer in [0, 2^32), got {seed!r}")
    key = jax.random.key(int(seed), impl=PRNG_IMPL)
    return jax.random.normal(key, tuple(latent_shape), jnp.float32)


def _model_input(latent: Array, conditioning: Array) -> Array:
    """``cat[latent, conditioning broadcast over space]`` for one example: ``(3 + 4, d, h, w)``."""
    spatial = latent.shape[1:]
    broadcast = jnp.broadcast_to(conditioning[:, None, None, None], conditioning.shape + spatial)
    return jnp.concatenate([latent, broadcast], axis=0)


@eqx.filter_jit
def _ddim_update(
    unet: DiffusionModelUNet,
    latents: Float[Array, "batch latent d h w"],
    conditioning: Float[Array, "batch cond"],
    timestep: Array,
    alpha_prod: Array,
    alpha_prod_prev: Array,
    invert: bool = False,
    precision: str = "float32",
) -> Float[Array, "batch latent d h w"]:
    """One compiled DDIM update of a batch: ε = unet(cat[z, cond], t, cond) per example, then
    :func:`ddim_step` (x_t → x_{t_prev}) or, with ``invert``, :func:`ddim_inverse_step`.
    ``precision`` (static): operand dtype of the U-Net's convolutions and linear layers."""

    unet = with_numerics(unet, operand_dtype=precision)

    def predict_noise(latent: Array, cond: Array) -> Array:
        return unet(_model_input(latent, cond), timestep, cond[None, :])

    eps = jax.vmap(predict_noise)(latents, conditioning)
    update = ddim_inverse_step if invert else ddim_step
    return update(eps, alpha_prod, alpha_prod_prev, latents)


def _ddim_loop(
    unet: DiffusionModelUNet,
    tables: DDIMTables,
    conditioning: Float[Array, "batch cond"],
    latents: Float[Array, "batch latent d h w"],
    invert: bool = False,
    progress: Callable[[int, int], None] | None = None,
    precision: str = "float32",
) -> Float[Array, "batch latent d h w"]:
    """The DDIM loop: :func:`_ddim_update` (compiled once, the step's data passed as arrays)
    called once per step.

    Sampling: noise → clean latent, t = 980, 960, …, 0 (50 steps). Inversion (``invert``): the
    same table backwards, clean latent → noise. ``progress(done, total)`` after each step.

    A Python loop on purpose: XLA:CPU runs convolutions inside ``lax.scan``/``while`` bodies
    far slower than in straight-line programs (measured ≈ 30×), and one step is seconds of
    work, so the per-step dispatch costs nothing.
    """
    timesteps = np.asarray(tables.timesteps)
    alpha_prod = np.asarray(tables.alpha_prod)
    alpha_prod_prev = np.asarray(tables.alpha_prod_prev)
    order = range(len(timesteps) - 1, -1, -1) if invert else range(len(timesteps))
    for done, index in enumerate(order, start=1):
        latents = _ddim_update(
            unet, latents, conditioning, jnp.asarray(timesteps[index]),
            jnp.asarray(alpha_prod[index]), jnp.asarray(alpha_prod_prev[index]), invert, precision,
        )
        if progress is not None:
            progress(done, len(timesteps))
    return latents


@eqx.filter_jit
def _solver_update(
    unet: DiffusionModelUNet,
    latents: Float[Array, "batch latent d h w"],
    conditioning: Float[Array, "batch cond"],
    row: Any,
    state: tuple[Array, ...],
    step: Callable[..., tuple[Array, tuple[Array, ...]]],
    precision: str = "float32",
) -> tuple[Float[Array, "batch latent d h w"], tuple[Array, ...]]:
    """One compiled multistep-solver update of a batch: ε = unet(cat[z, cond], t, cond) per
    example at ``row.timestep``, then ``step(ε, z, state, row)`` (static: one of
    :data:`brain_ldm_nodes.solvers.SOLVERS`' steps). Returns ``(z_next, state_next)``."""

    unet = with_numerics(unet, operand_dtype=precision)

    def predict_noise(latent: Array, cond: Array) -> Array:
        return unet(_model_input(latent, cond), row.timesteps, cond[None, :])

    eps = jax.vmap(predict_noise)(latents, conditioning)
    return step(eps, latents, state, row)


def _solver_loop(
    unet: DiffusionModelUNet,
    solver: Solver,
    tables: Any,
    conditioning: Float[Array, "batch cond"],
    latents: Float[Array, "batch latent d h w"],
    progress: Callable[[int, int], None] | None = None,
    precision: str = "float32",
) -> Float[Array, "batch latent d h w"]:
    """A multistep solver's loop: :func:`_solver_update` (compiled once; the step's table row
    and the solver's memory passed as arrays) once per step, as :func:`_ddim_loop`."""
    state = initial_state(solver, latents)
    total = len(tables.timesteps)
    for index in range(total):
        latents, state = _solver_update(
            unet, latents, conditioning, table_row(tables, index), state, solver.step, precision
        )
        if progress is not None:
            progress(index + 1, total)
    return latents


#: Rows of the output's first axis per slab in :meth:`BrainLDM.decode`: (default, ``low_memory``).
DECODE_SLABS = (8, 4)


@eqx.filter_jit
def _decode_in_memory(vae: AutoencoderKL, latents: Array) -> Array:
    """The whole decoder as one compiled program (decoders that cannot stream)."""
    return jax.vmap(vae.decode)(latents)


def _decode(vae: AutoencoderKL, latents: Array, low_memory: bool = False) -> Array:
    """Decode ``(1, 3, d, h, w)`` latents: the full-resolution stage slab by slab
    (:func:`~brain_ldm_nodes.models.streaming.decode_streaming`, exact), one compiled call per
    slab; ``low_memory`` uses thinner slabs."""
    depth = latents.shape[2] * vae.config.downsampling_factor
    slab = math.gcd(depth, DECODE_SLABS[1] if low_memory else DECODE_SLABS[0])
    if slab < 2 or not decode_streaming_layout_ok(vae):
        return _decode_in_memory(vae, latents)
    return jnp.stack([decode_streaming(vae, latent, slab=slab) for latent in latents])


@eqx.filter_jit
def _encode(vae: AutoencoderKL, images: Array) -> tuple[Array, Array]:
    return jax.vmap(vae.encode)(images)


@dataclasses.dataclass(frozen=True)
class Counterfactual:
    """Result of :meth:`BrainLDM.counterfactual`; images ``(B, 1, D, H, W)``, latents ``(B, 3, d, h, w)``."""

    edited: Array
    reconstruction: Array
    noise: Array
    latent: Array
    reconstructed_latent: Array
    edited_latent: Array


@dataclasses.dataclass
class BrainLDM:
    """The Brain LDM: autoencoder + conditional U-Net + DDIM schedule.

    Build one with :meth:`from_pretrained` (a converted bundle), :meth:`random` (random
    weights, any architecture), or directly from modules.
    """

    vae: AutoencoderKL
    unet: DiffusionModelUNet
    scheduler: DDIMSchedulerConfig = dataclasses.field(default_factory=DDIMSchedulerConfig)
    #: Where the weights came from (bundle ids, revisions, folders, sha256): for sidecars.
    source: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: The image grid ``(D, H, W)`` the model was trained on; the default for sampling.
    image_shape: tuple[int, int, int] = IMAGE_SHAPE
    # Set by from_pretrained: pack the U-Net's kernels for oneDNN on its first use (prepare_unet).
    _pack_unet_on_first_use: bool = dataclasses.field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.image_shape = tuple(int(size) for size in self.image_shape)
        self.latent_shape()  # the native grid must fit the networks
        expected_in = self.vae.config.latent_channels + self.unet.config.cross_attention_dim
        if self.unet.config.in_channels != expected_in:
            raise ValueError(
                f"U-Net in_channels {self.unet.config.in_channels} != latent channels "
                f"{self.vae.config.latent_channels} + conditioning size {self.unet.config.cross_attention_dim}"
            )
        if self.unet.config.out_channels != self.vae.config.latent_channels:
            raise ValueError(
                f"U-Net out_channels {self.unet.config.out_channels} != latent channels "
                f"{self.vae.config.latent_channels}"
            )

    @classmethod
    def random(
        cls,
        *,
        key: PRNGKeyArray,
        vae_config: AutoencoderKLConfig | None = None,
        unet_config: DiffusionModelUNetConfig | None = None,
        scheduler: DDIMSchedulerConfig | None = None,
        image_shape: Sequence[int] = IMAGE_SHAPE,
    ) -> BrainLDM:
        """A model with random weights (upstream architecture unless configs are given).

        ``image_shape`` is its native grid (for tiny test models, a small one such as (32, 32, 32)).
        """
        vae_key, unet_key = jax.random.split(key)
        return cls(
            AutoencoderKL(vae_config, key=vae_key),
            DiffusionModelUNet(unet_config, key=unet_key),
            scheduler or DDIMSchedulerConfig(),
            image_shape=tuple(image_shape),
        )

    @classmethod
    def from_pretrained(
        cls,
        repo_id_or_path: str | os.PathLike,
        *,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool | None = None,
        token: str | bool | None = None,
        verify: bool = True,
    ) -> BrainLDM:
        """Load a ``brain_ldm.1`` bundle and its base ``brain_ldm.vae`` bundle.

        Args:
            repo_id_or_path: a bundle folder, or a Hugging Face Hub repo id.
            revision: Hub branch, tag or commit (ignored for folders).
            cache_dir: Hugging Face cache (default: ``HF_HUB_CACHE`` / ``HF_HOME``).
            local_files_only: never download (``HF_HUB_OFFLINE=1`` does the same).
            token: Hub token for private repos.
            verify: check each weights file against the sha256 in its ``config.json``.

        Raises:
            brain_ldm_nodes.weights.bundle.BundleError: with the bundle and the reason.
        """
        from .weights import bundle
        from .weights.identity import resolve_model_bundles

        found = resolve_model_bundles(repo_id_or_path, revision=revision, cache_dir=cache_dir,
                                      local_files_only=local_files_only, token=token)
        unet = bundle.load_bundle_weights(found.folder, found.config, verify=verify)
        vae = bundle.load_bundle_weights(found.vae_folder, found.vae_config, verify=verify)
        model = cls(vae, unet, found.config.scheduler, found.source(), tuple(found.config.image_shape))
        # oneDNN's kernel layout once, at the first sampling call: not paid by encode/decode-only use
        model._pack_unet_on_first_use = True
        return model

    def prepare_unet(self) -> DiffusionModelUNet:
        """The U-Net as sampling runs it; every method that runs the U-Net calls this first.

        For a model from :meth:`from_pretrained` on CPU with the oneDNN extension, the first call
        packs the U-Net's convolution kernels into oneDNN's layout
        (:func:`~brain_ldm_nodes.models.unet.pack_unet_kernels`: ≈ 3 s for the released model;
        no second copy: each plain kernel is freed once packed, so a reference to :attr:`unet`
        taken before that call must not be used after it) and :attr:`unet` becomes the packed
        network. Nodes that only encode or decode never pay for it. Other models are returned as
        they are. Call it yourself to pay the packing before timing or serving. Thread-safe.
        """
        if self._pack_unet_on_first_use:
            with _PACKING_LOCK:
                if self._pack_unet_on_first_use:
                    latent_spatial = self.latent_shape()[1:]
                    self.unet = pack_unet_kernels(self.unet, latent_spatial, consume=True)
                    self._pack_unet_on_first_use = False
        return self.unet

    def save_pretrained(
        self,
        path: str | os.PathLike,
        *,
        vae_path: str | os.PathLike | None = None,
        base_repo_id: str | None = None,
        base_revision: str | None = None,
        provenance: dict[str, Any] | None = None,
    ) -> Path:
        """Write this model as a ``brain_ldm.1`` bundle at ``path`` and its base.

        The base VAE bundle is written to ``vae_path`` (default: ``brain_ldm.vae`` beside
        ``path``) and referred to by relative path; with ``base_repo_id`` it is also (or, when
        ``vae_path`` is not given, only) referred to by Hub repo id + ``base_revision``, and
        not written. Returns ``path``.
        """
        from .weights import bundle

        path = Path(path)
        relative = None
        if vae_path is not None or base_repo_id is None:
            vae_path = Path(vae_path) if vae_path is not None else path.parent / bundle.VAE_BUNDLE
            bundle.save_vae_bundle(
                vae_path, self.vae.config, bundle.module_tensors(self.vae), provenance=provenance
            )
            relative = os.path.relpath(vae_path.resolve(), path.resolve())
        base = bundle.BaseReference(repo_id=base_repo_id, revision=base_revision, path=relative)
        return bundle.save_model_bundle(
            path, self.unet.config, bundle.module_tensors(self.unet), self.scheduler, base,
            provenance=provenance, image_shape=self.image_shape,
        )

    # -- shapes ------------------------------------------------------------------------------
    @property
    def conditioning_size(self) -> int:
        return self.unet.config.cross_attention_dim

    @property
    def image_multiple(self) -> int:
        """Every image size must be a multiple of this (32 for the released model)."""
        return self.vae.config.downsampling_factor * self.unet.config.spatial_multiple

    def latent_shape(self, image_shape: Sequence[int] | None = None) -> tuple[int, int, int, int]:
        """``(latent_channels, D/8, H/8, W/8)`` for a ``(D, H, W)`` grid (default :attr:`image_shape`).

        Raises:
            ValueError: if a size is not a positive multiple of :attr:`image_multiple`.
        """
        shape = tuple(int(s) for s in (self.image_shape if image_shape is None else image_shape))
        multiple = self.image_multiple
        if len(shape) != 3 or any(s <= 0 or s % multiple for s in shape):
            raise ValueError(
                f"image shape {shape} is not three positive multiples of {multiple} "
                f"(the U-Net halves the latent twice; e.g. {IMAGE_SHAPE})"
            )
        factor = self.vae.config.downsampling_factor
        return (self.vae.config.latent_channels,) + tuple(s // factor for s in shape)

    # -- sampling ----------------------------------------------------------------------------
    def _check_conditioning(self, conditioning: Array | np.ndarray) -> Array:
        cond = jnp.asarray(conditioning, jnp.float32)
        if cond.ndim == 1:
            cond = cond[None, :]
        if cond.ndim != 2 or cond.shape[1] != self.conditioning_size:
            raise ValueError(
                f"conditioning must be (batch, {self.conditioning_size}) in the order "
                f"{CONDITIONING_ORDER}, got shape {tuple(np.shape(conditioning))}"
            )
        if not bool(jnp.all(jnp.isfinite(cond))):
            raise ValueError("conditioning contains NaN or infinite values")
        return cond

    def sample_latents(
        self,
        conditioning: Float[Array, "batch 4"] | np.ndarray,
        seeds: Sequence[int] | int,
        *,
        num_inference_steps: int = 50,
        image_shape: Sequence[int] | None = None,
        batch_size: int = 1,
        progress: Callable[[int, int], None] | None = None,
        precision: str = "float32",
        scheduler: str = "ddim",
    ) -> Float[Array, "batch 3 d h w"]:
        """Clean latents by DDIM (eta = 0, default) or a multistep ODE solver from per-sample seeds.

        Args:
            conditioning: ``(B, 4)`` (or ``(4,)``), order :data:`CONDITIONING_ORDER`, values in
                [0, 1] (others are extrapolation; accepted, as upstream).
            seeds: one integer per sample (or one int for B = 1); see :func:`initial_noise`.
            num_inference_steps: sampler steps = U-Net calls (50 upstream, DDIM).
            image_shape: image grid ``(D, H, W)`` in voxels, multiples of :attr:`image_multiple`
                (default :attr:`image_shape`, the model's training grid).
            batch_size: samples per compiled call. 1 (default) makes every image independent of
                the others in the call, bitwise; larger is faster on accelerators and equal up
                to float rounding.
            progress: called as ``progress(step, num_inference_steps)`` after every DDIM step
                of every batch (e.g. to report progress; it cannot change the result).
            precision: ``"float32"`` (default, the reference) or ``"bfloat16"``: the U-Net's
                convolution and linear-layer operands in bfloat16, accumulated in float32
                (normalisation, softmax and the DDIM update stay float32). Measured error of one
                U-Net step vs float32: see README "Performance" (≈ 7e-3); ≈ 12 % faster on XLA:CPU.
            scheduler: one of :data:`SCHEDULERS`. ``"ddim"`` (default): the bundle's sampler,
                timesteps 980, 960, …, 0 for 50 steps, bitwise the released behaviour per seed.
                ``"dpmpp-2m"`` (DPM-Solver++ 2M) or ``"unipc"`` (UniPC-2M, bh2): the same
                probability-flow ODE to second order, as diffusers' schedulers with diffusers'
                default ``"linspace"`` timesteps (999, …); ≈ DDIM-50's accuracy in ≈ 16–21
                steps (README "Faster samplers").

        Returns:
            ``(B, 3, D/8, H/8, W/8)`` float32.
        """
        cond = self._check_conditioning(conditioning)
        seed_list = [seeds] if isinstance(seeds, (int, np.integer)) else list(seeds)
        if len(seed_list) != cond.shape[0]:
            raise ValueError(f"got {len(seed_list)} seeds for {cond.shape[0]} conditioning rows")
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        latent_shape = self.latent_shape(image_shape)
        noise = jnp.stack([initial_noise(seed, latent_shape) for seed in seed_list])
        return self.denoise(noise, cond, num_inference_steps=num_inference_steps,
                            batch_size=batch_size, progress=progress, precision=precision,
                            scheduler=scheduler)

    def denoise(
        self,
        noise: Float[Array, "batch 3 d h w"] | np.ndarray,
        conditioning: Float[Array, "batch 4"] | np.ndarray,
        *,
        num_inference_steps: int = 50,
        batch_size: int = 1,
        progress: Callable[[int, int], None] | None = None,
        precision: str = "float32",
        scheduler: str = "ddim",
    ) -> Float[Array, "batch 3 d h w"]:
        """Clean latents from given starting noise (e.g. from :meth:`invert_latents`).

        ``noise`` ``(B, 3, d, h, w)`` with d, h, w multiples of the U-Net's factor (4); other
        arguments as :meth:`sample_latents`. Noise from :meth:`invert_latents` is DDIM's: only
        ``scheduler="ddim"`` with the same steps regenerates the inverted latent.
        """
        cond = self._check_conditioning(conditioning)
        noise = self._check_latents(noise, cond.shape[0])
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        check_scheduler(scheduler)
        unet = self.prepare_unet()
        if scheduler == "ddim":
            tables = ddim_tables(self.scheduler, num_inference_steps)

            def run(cond: Array, noise: Array) -> Array:
                return _ddim_loop(unet, tables, cond, noise, progress=progress, precision=precision)
        else:
            solver = SOLVERS[scheduler]
            tables = solver.tables(self.scheduler, num_inference_steps)

            def run(cond: Array, noise: Array) -> Array:
                return _solver_loop(unet, solver, tables, cond, noise, progress=progress,
                                    precision=precision)

        return jnp.concatenate([
            run(cond[start:start + batch_size], noise[start:start + batch_size])
            for start in range(0, cond.shape[0], batch_size)
        ])

    def invert_latents(
        self,
        latents: Float[Array, "batch 3 d h w"] | np.ndarray,
        conditioning: Float[Array, "batch 4"] | np.ndarray,
        *,
        num_inference_steps: int = 50,
    ) -> Float[Array, "batch 3 d h w"]:
        """DDIM inversion (eta = 0, the sampler's schedule run backwards): the starting noise
        from which :meth:`denoise` with the same conditioning and steps regenerates ``latents``
        (approximately; the error shrinks with more steps). One sample per compiled call.
        Always DDIM: the multistep solvers have no implemented inverse."""
        cond = self._check_conditioning(conditioning)
        latents = self._check_latents(latents, cond.shape[0])
        tables = ddim_tables(self.scheduler, num_inference_steps)
        unet = self.prepare_unet()
        return jnp.concatenate([
            _ddim_loop(unet, tables, cond[i:i + 1], latents[i:i + 1], True)
            for i in range(cond.shape[0])
        ])

    def counterfactual(
        self,
        t1w: Float[Array, "batch 1 D H W"] | np.ndarray,
        conditioning_from: Float[Array, "batch 4"] | np.ndarray,
        conditioning_to: Float[Array, "batch 4"] | np.ndarray,
        *,
        num_inference_steps: int = 50,
    ) -> Counterfactual:
        """What ``t1w`` would look like under other demographics.

        Encodes ``t1w`` (on the model grid, [0, 1]) to its deterministic latent, inverts the
        DDIM trajectory under ``conditioning_from`` (the subject's own demographics) to its
        noise, then samples forward from that noise under ``conditioning_to``.
        """
        images = jnp.asarray(t1w, jnp.float32)
        self.latent_shape(images.shape[2:] if images.ndim == 5 else ())
        latent, _ = self.encode(images)
        noise = self.invert_latents(latent, conditioning_from, num_inference_steps=num_inference_steps)
        reconstructed_latent = self.denoise(noise, conditioning_from, num_inference_steps=num_inference_steps)
        edited_latent = self.denoise(noise, conditioning_to, num_inference_steps=num_inference_steps)
        return Counterfactual(
            edited=self.decode(edited_latent),
            reconstruction=self.decode(reconstructed_latent),
            noise=noise,
            latent=latent,
            reconstructed_latent=reconstructed_latent,
            edited_latent=edited_latent,
        )

    def _check_latents(self, latents: Array | np.ndarray, batch: int) -> Array:
        latents = jnp.asarray(latents, jnp.float32)
        channels = self.vae.config.latent_channels
        multiple = self.unet.config.spatial_multiple
        if latents.ndim != 5 or latents.shape[1] != channels or any(s % multiple for s in latents.shape[2:]):
            raise ValueError(
                f"latents must be (batch, {channels}, d, h, w) with d, h, w multiples of {multiple}, "
                f"got {tuple(latents.shape)}"
            )
        if latents.shape[0] != batch:
            raise ValueError(f"got {latents.shape[0]} latents for {batch} conditioning rows")
        return latents

    def sample(
        self,
        conditioning: Float[Array, "batch 4"] | np.ndarray,
        seeds: Sequence[int] | int,
        *,
        num_inference_steps: int = 50,
        image_shape: Sequence[int] | None = None,
        batch_size: int = 1,
        low_memory: bool = False,
        progress: Callable[[int, int], None] | None = None,
        precision: str = "float32",
        scheduler: str = "ddim",
    ) -> Float[Array, "batch 1 D H W"]:
        """Synthetic T1w images ``(B, 1, D, H, W)`` float32, ≈ [0, 1] (not clipped, as upstream).

        Arguments as :meth:`sample_latents`; the latents are decoded one sample at a time
        (``low_memory``: see :meth:`decode`).
        """
        latents = self.sample_latents(
            conditioning, seeds, num_inference_steps=num_inference_steps,
            image_shape=image_shape, batch_size=batch_size, progress=progress, precision=precision,
            scheduler=scheduler,
        )
        return self.decode(latents, low_memory=low_memory)

    # -- autoencoder -------------------------------------------------------------------------
    def encode(
        self, images: Float[Array, "batch 1 D H W"] | np.ndarray
    ) -> tuple[Float[Array, "batch 3 d h w"], Float[Array, "batch 3 d h w"]]:
        """Posterior ``(z_mu, z_sigma)`` of images ``(B, 1, D, H, W)`` in [0, 1]; ``z_mu`` is
        the deterministic latent. Sizes must be multiples of the autoencoder's factor (8); to
        sample from or invert the latent they must be multiples of :attr:`image_multiple`."""
        images = jnp.asarray(images, jnp.float32)
        if images.ndim != 5 or images.shape[1] != self.vae.config.in_channels:
            raise ValueError(
                f"images must be (batch, {self.vae.config.in_channels}, D, H, W), "
                f"got {tuple(images.shape)}"
            )
        factor = self.vae.config.downsampling_factor
        if any(size % factor for size in images.shape[2:]):
            raise ValueError(f"image shape {tuple(images.shape[2:])} is not three multiples of {factor}")
        onednn.release_scratch()  # the U-Net's convolution scratch is not the autoencoder's
        pairs = [_encode(self.vae, images[i:i + 1]) for i in range(images.shape[0])]
        return jnp.concatenate([p[0] for p in pairs]), jnp.concatenate([p[1] for p in pairs])

    def decode(
        self, latents: Float[Array, "batch 3 d h w"] | np.ndarray, *, low_memory: bool = False
    ) -> Float[Array, "batch 1 D H W"]:
        """Images ``(B, 1, 8d, 8h, 8w)`` from latents ``(B, 3, d, h, w)``, one sample at a time.

        The decoder's full-resolution stage runs slab by slab with exact GroupNorm statistics
        (:mod:`brain_ldm_nodes.models.streaming`), equal to the whole-volume decoder up to float
        rounding: peak ≈ 4 GiB instead of ≈ 13 GiB at 160×224×160, and no slower on CPU.
        ``low_memory=True`` uses slabs of 4 instead of 8 rows: less transient memory (going
        from 16 to 8 rows saved ≈ 0.1 GiB at 160×224×160), more halo recomputation.
        """
        latents = jnp.asarray(latents, jnp.float32)
        if latents.ndim != 5 or latents.shape[1] != self.vae.config.latent_channels:
            raise ValueError(
                f"latents must be (batch, {self.vae.config.latent_channels}, d, h, w), "
                f"got {tuple(latents.shape)}"
            )
        onednn.release_scratch()  # the U-Net's convolution scratch (up to ≈ 0.6 GB) is not the decoder's
        return jnp.concatenate([
            _decode(self.vae, latents[i:i + 1], low_memory) for i in range(latents.shape[0])
        ])


__all__ = ["BrainLDM", "CONDITIONING_ORDER", "Counterfactual", "IMAGE_SHAPE", "SCHEDULERS", "initial_noise"]
