#!/usr/bin/env python
"""Ours and MONAI 1.6.1 in ONE process, interleaved: U-Net step and decode time ratios on a
shared, loaded machine (the 1-minute load average is recorded with every timed call).

    python bench/side_by_side.py --workdir /tmp/brain-ldm-bench --repeats 3

Uses (and writes, if missing) the checkpoints ``bench/benchmark.py`` prepares (MONAI networks at the released
architecture with random weights; ours loaded from their conversion with
``BrainLDM.from_pretrained``, as users do). Each repeat times ours then MONAI's call back to
back, so both see the same load; the figure is the median of the per-pair ratios. Also prints
the relative error between the two outputs (the parity check of the timed runs).

Decode runs at a proxy size by default: latent 10×14×10 → 80×112×80 image (``--decode-latent``),
the same code path as the full 20×28×20 → 160×224×160 (the streaming decoder, slab 8) at 1/8
of the voxels, because MONAI's full-size decode alone peaks at ≈ 10 GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "brain-ldm-bench")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--figures", default="unet,decode")
    parser.add_argument("--decode-latent", default="10,14,10")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from monai.networks.nets import AutoencoderKL, DiffusionModelUNet

    from brain_ldm_nodes.models import onednn
    from brain_ldm_nodes.pipeline import BrainLDM, _decode, _model_input

    torch.set_grad_enabled(False)
    rng = np.random.default_rng(0)
    cond = np.array([[1.0, 0.7, 0.7, 0.5]], np.float32)
    results: dict = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                     "onednn": onednn.available(), "onednn_threads": onednn.threads(), "figures": {}}
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from benchmark import prepare

    prepare(args.workdir)  # the same checkpoints as bench/benchmark.py, written once
    model = BrainLDM.from_pretrained(args.workdir / "converted" / "brain_ldm.1")

    def pairs(ours, theirs, compare) -> dict:
        ours(), theirs()  # compile / warm up
        runs = []
        for _ in range(args.repeats):
            load = os.getloadavg()[0]
            start = time.perf_counter()
            a = ours()
            t_ours = time.perf_counter() - start
            start = time.perf_counter()
            b = theirs()
            t_theirs = time.perf_counter() - start
            runs.append({"ours_s": t_ours, "monai_s": t_theirs, "ratio": t_ours / t_theirs, "load1": load,
                         "load1_after": os.getloadavg()[0]})
            print(json.dumps(runs[-1]), flush=True)
        return {"runs": runs, "ratio_median": statistics.median(r["ratio"] for r in runs),
                "relative_error": compare(a, b)}

    def relative_error(a, b) -> float:
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    if "unet" in args.figures:
        unet = DiffusionModelUNet(spatial_dims=3, in_channels=7, out_channels=3, channels=(256, 512, 768),
                                  num_res_blocks=2, attention_levels=(False, True, True),
                                  num_head_channels=(0, 512, 768), resblock_updown=True, with_conditioning=True,
                                  cross_attention_dim=4, upcast_attention=True).eval()
        unet.load_old_state_dict(torch.load(args.workdir / "upstream" / "model.pt", weights_only=True))
        z = rng.standard_normal((1, 3, 20, 28, 20), dtype=np.float32)
        zj, cj = jnp.asarray(z), jnp.asarray(cond)
        step = jax.jit(lambda unet, z, c: jax.vmap(lambda z, c: unet(_model_input(z, c), jnp.asarray(500.0),
                                                                       c[None]))(z, c))
        zt, ct = torch.from_numpy(z), torch.from_numpy(cond)
        x = torch.cat([zt, ct[:, :, None, None, None].expand(-1, -1, *zt.shape[2:])], dim=1)
        results["figures"]["unet"] = pairs(lambda: step(model.prepare_unet(), zj, cj).block_until_ready(),
                                           lambda: unet(x, torch.tensor([500]), context=ct[:, None, :]),
                                           lambda a, b: relative_error(a, b.numpy()))
        del unet
    if "decode" in args.figures:
        vae = AutoencoderKL(spatial_dims=3, in_channels=1, out_channels=1, channels=(64, 128, 128, 128),
                            latent_channels=3, num_res_blocks=2, attention_levels=(False,) * 4,
                            with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False).eval()
        vae.load_old_state_dict(torch.load(args.workdir / "upstream" / "autoencoder.pt", weights_only=True))
        shape = tuple(int(n) for n in args.decode_latent.split(","))
        z = rng.standard_normal((1, 3, *shape), dtype=np.float32)
        zj, zt = jnp.asarray(z), torch.from_numpy(z)
        results["figures"]["decode"] = {"latent": shape, **pairs(
            lambda: _decode(model.vae, zj).block_until_ready(), lambda: vae.decode(zt),
            lambda a, b: relative_error(a, b.numpy()))}
    print(json.dumps(results, indent=1))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
