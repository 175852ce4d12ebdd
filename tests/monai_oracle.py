"""MONAI (PyTorch) reference networks with perturbed random weights: the test oracle.

Imported only by tests. MONAI missing is an error here, never a skip: parity is the point.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.networks.nets import AutoencoderKL as MonaiAutoencoderKL
from monai.networks.nets import DiffusionModelUNet as MonaiDiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler

from brain_ldm_nodes import AutoencoderKLConfig, DiffusionModelUNetConfig, DDIMSchedulerConfig

torch.set_grad_enabled(False)


def monai_autoencoder(config: AutoencoderKLConfig, *, seed: int) -> MonaiAutoencoderKL:
    """The MONAI autoencoder of ``config`` (attention-free, as the Brain LDM), perturbed."""
    torch.manual_seed(seed)
    net = MonaiAutoencoderKL(
        spatial_dims=3,
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        channels=config.channels,
        latent_channels=config.latent_channels,
        num_res_blocks=config.num_res_blocks,
        attention_levels=(False,) * len(config.channels),
        norm_num_groups=config.norm_num_groups,
        norm_eps=config.norm_eps,
        with_encoder_nonlocal_attn=False,
        with_decoder_nonlocal_attn=False,
    )
    return perturb(net.eval(), seed=seed)


def monai_unet(config: DiffusionModelUNetConfig, *, seed: int) -> MonaiDiffusionModelUNet:
    """The MONAI conditional U-Net of ``config``, perturbed."""
    torch.manual_seed(seed)
    net = MonaiDiffusionModelUNet(
        spatial_dims=3,
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        channels=config.channels,
        num_res_blocks=config.num_res_blocks,
        attention_levels=config.attention_levels,
        num_head_channels=config.num_head_channels,
        norm_num_groups=config.norm_num_groups,
        norm_eps=config.norm_eps,
        resblock_updown=config.resblock_updown,
        with_conditioning=True,
        transformer_num_layers=config.transformer_num_layers,
        cross_attention_dim=config.cross_attention_dim,
        upcast_attention=True,
    )
    return perturb(net.eval(), seed=seed)


def perturb(net: torch.nn.Module, *, seed: int) -> torch.nn.Module:
    """Move every parameter away from its initialisation, in place.

    MONAI zero-initialises some output convolutions and sets norm affines to 1/0; with those
    a dropped bias, a swapped norm affine or a missing block could go unnoticed. Every tensor
    gets Gaussian noise of the scale of a typical weight of its layer (1/sqrt(fan_in) for
    weights and biases, 0.2 around 1/0 for norm scales/shifts).
    """
    generator = torch.Generator().manual_seed(seed)
    for module in net.modules():
        is_norm = isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm))
        for name, param in module.named_parameters(recurse=False):
            noise = torch.randn(param.shape, generator=generator, dtype=param.dtype)
            if is_norm:
                param.copy_((1.0 if name == "weight" else 0.0) + 0.2 * noise)
            else:
                fan_in = param[0].numel() if param.ndim > 1 else param.numel()
                param.add_(noise / np.sqrt(fan_in))
    return net


def state_dict_numpy(net: torch.nn.Module) -> dict[str, np.ndarray]:
    return {name: tensor.detach().numpy() for name, tensor in net.state_dict().items()}


def monai_scheduler(config: DDIMSchedulerConfig) -> DDIMScheduler:
    return DDIMScheduler(
        num_train_timesteps=config.num_train_timesteps,
        schedule="scaled_linear_beta",
        beta_start=config.beta_start,
        beta_end=config.beta_end,
        clip_sample=False,
        set_alpha_to_one=config.set_alpha_to_one,
        prediction_type="epsilon",
    )


def set_leading_timesteps(scheduler: DDIMScheduler, num_inference_steps: int) -> None:
    """MONAI 1.4/1.5 ``set_timesteps`` (980, 960, …, 0): the bundle as authored.

    MONAI 1.6.1 spaces timesteps with ``linspace``; the bundle was written for the older
    spacing (UPSTREAM.md §6), so the oracle pins it explicitly.
    """
    ratio = scheduler.num_train_timesteps // num_inference_steps
    scheduler.num_inference_steps = num_inference_steps
    scheduler.timesteps = torch.from_numpy((np.arange(num_inference_steps) * ratio)[::-1].copy())


def monai_sample(
    unet: MonaiDiffusionModelUNet,
    vae: MonaiAutoencoderKL,
    scheduler: DDIMScheduler,
    conditioning: np.ndarray,
    noise: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """The bundle's sampling loop written with MONAI modules: ``(latent, image)`` as numpy.

    For each t: ε = unet(cat[z, cond broadcast], t, context=cond[:, None, :]); z = step(ε, t, z).
    """
    cond = torch.from_numpy(np.asarray(conditioning, np.float32))
    latent = torch.from_numpy(np.array(noise, np.float32))
    spatial = latent.shape[2:]
    cond_volume = cond[:, :, None, None, None].expand(-1, -1, *spatial)
    for timestep in scheduler.timesteps:
        t = torch.full((latent.shape[0],), int(timestep), dtype=torch.long)
        eps = unet(torch.cat([latent, cond_volume], dim=1), t, context=cond[:, None, :])
        latent, _ = scheduler.step(eps, int(timestep), latent)
    image = vae.decode(latent)
    return latent.numpy(), image.numpy()


def relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
    """max |ours − reference| / max |reference| (normwise; elementwise is ill-posed near 0)."""
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    assert ours.shape == reference.shape, (ours.shape, reference.shape)
    return float(np.max(np.abs(ours - reference)) / np.max(np.abs(reference)))
