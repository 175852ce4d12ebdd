#!/usr/bin/env python
"""Registration figure and timing for the README: a moved head, registered onto the model grid.

    PYTHONPATH=$PWD python bench/registration_figure.py [--out docs/figures/registration.png]

The input is the MNI152 template that nilearn ships, given a synthetic scalp, skull and neck
(tests/registration_support.py) and moved by 15 deg / 20 mm onto an LPS, 1.2 x 1 x 1 mm,
12-degree oblique grid. Columns: that input put on the grid without registration
(``conform_t1w``: reorient, resample, centre-crop), the same input after ``register_t1w``, and
the template on the grid. Prints the time per registration and the recovered-transform errors.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from registration_support import (  # noqa: E402
    grid_affine,
    moved_image,
    rigid,
    synthetic_head,
    transform_errors,
)

from brain_ldm_nodes.imaging import conform_t1w, save_t1w  # noqa: E402
from brain_ldm_nodes.registration import (  # noqa: E402
    load_template,
    register_t1w,
    resample_to_model_grid,
)
from brain_ldm_nodes.bids_app.figures import render_strip  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path,
                        default=REPO / "docs" / "figures" / "registration_synthetic_head.png")
    parser.add_argument("--repeats", type=int, default=1, help="registrations to time")
    args = parser.parse_args()

    motion = rigid((-15, 5, 10), (-20, 10, 15))
    shape = (200, 220, 230)
    moved = moved_image(synthetic_head(), motion, shape,
                        grid_affine(shape, (1.2, 1, 1), "LPS", 12, (5, -10, -20)))
    seconds = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        result = register_t1w(moved)
        seconds.append(time.perf_counter() - started)
    rms_mm, angle_deg = transform_errors(result.transform, motion)
    print(f"register_t1w: {np.median(seconds):.1f} s (median of {len(seconds)}), "
          f"error RMS {rms_mm:.2f} mm over the brain, {angle_deg:.2f} deg, NCC {result.ncc:.3f}, "
          f"Mattes MI {result.metric:.3f}")

    conformed, _ = conform_t1w(moved)
    template = resample_to_model_grid(load_template()[0]).image
    with tempfile.TemporaryDirectory() as folder:
        paths = []
        for name, image in (("moved", conformed), ("registered", result.image),
                            ("template", template)):
            paths.append(save_t1w(np.asarray(image.dataobj), Path(folder) / f"{name}.nii.gz"))
        render_strip(
            paths,
            ["input, conformed (no registration)", "register_t1w", "MNI152 2009a template"],
            args.out,
            title=f"15 deg / 20 mm motion, LPS 1.2 mm oblique: recovered to {rms_mm:.2f} mm RMS",
        )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
