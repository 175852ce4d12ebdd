#!/usr/bin/env python
"""Peak memory of one full-size sample as the BIDS App's node runs it: ``BrainLDM.from_pretrained``
(U-Net + autoencoder resident), ``sample`` (``--steps`` DDIM steps + decode to 160×224×160).

    python bench/sample_peak.py --bundle /tmp/brain-ldm-bench/converted/brain_ldm.1 --steps 2

Prints the process's peak resident set (``VmHWM``) and the peak of the resident set sampled every
0.1 s during loading, sampling and decoding separately. The sampling loop is a Python loop over
one compiled step that frees its buffers after each step, so the peak of a 50-step sample equals
that of a short one: run with two step counts (e.g. 1 and 3) to see it does not grow per step.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=Path(tempfile.gettempdir()) / "brain-ldm-bench" / "converted"
                        / "brain_ldm.1")
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()

    import jax

    from brain_ldm_nodes.models import onednn
    from brain_ldm_nodes.pipeline import BrainLDM

    phase = ["import"]
    peaks: dict[str, float] = {}
    stop = threading.Event()

    def monitor() -> None:
        while not stop.is_set():
            rss = _status_kib("VmRSS") / 2**20
            peaks[phase[0]] = max(peaks.get(phase[0], 0.0), rss)
            time.sleep(0.1)

    thread = threading.Thread(target=monitor, daemon=True)
    thread.start()
    start = time.perf_counter()
    phase[0] = "load"
    model = BrainLDM.from_pretrained(args.bundle)
    jax.block_until_ready(jax.tree_util.tree_leaves((model.unet, model.vae)))
    timings = {"load_s": time.perf_counter() - start}
    phase[0] = "sample_latents"
    start = time.perf_counter()
    latents = model.sample_latents([[1.0, 0.7, 0.7, 0.5]], [0], num_inference_steps=args.steps)
    latents.block_until_ready()
    timings["sample_latents_s"] = time.perf_counter() - start
    phase[0] = "decode"
    start = time.perf_counter()
    image = model.decode(latents)
    image.block_until_ready()
    timings["decode_s"] = time.perf_counter() - start
    stop.set()
    thread.join()
    result = {"steps": args.steps, "image_shape": list(image.shape), "onednn": onednn.available(),
              "peak_rss_gib": _status_kib("VmHWM") / 2**20,
              "phase_peak_rss_gib": {k: round(v, 3) for k, v in peaks.items()}, **timings}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
