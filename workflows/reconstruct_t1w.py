#!/usr/bin/env python
"""Encode T1w images to the Brain LDM latent and decode them back, with ``init_encode_decode_wf``.

    python workflows/reconstruct_t1w.py --model PATH_OR_REPO --out DIR T1W [T1W ...] \
        [--t1w-space {native,MNI,model-grid,conform}] [--nprocs 2]

For every input ``<stem>[_T1w].nii[.gz]`` writes into ``DIR``: ``<stem>_desc-reconstruction_T1w``
(``.nii.gz`` + ``.json``), ``<stem>_desc-mu_latent.nii.gz`` and ``<stem>_desc-sigma_latent.nii.gz``
(4-D, channels last), ``<stem>_desc-conformed_T1w.nii.gz`` (the input on the model grid, unless
``--t1w-space model-grid``), ``<stem>_encode.json`` (how the input was prepared) and, when
registered (the default), ``<stem>_from-T1w_to-MNI152NLin2009aSym_mode-image_xfm.txt``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from nipype.interfaces import io as nio
from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from brain_ldm_nodes.workflows import init_encode_decode_wf
from brain_ldm_nodes.workflows.execution import run_workflow


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("t1w", type=Path, nargs="+", help="T1-weighted NIfTI files")
    parser.add_argument("--model", required=True, help="brain_ldm.1 bundle folder or Hub repo id")
    parser.add_argument("--revision", help="Hub revision of --model")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--t1w-space", choices=["native", "MNI", "model-grid", "conform"],
                        default="native",
                        help="native: register rigidly to MNI152 (default); MNI: already in "
                        "MNI152 2009 space (fMRIPrep), only resample; model-grid: already LAS, "
                        "1 mm, sizes multiples of 8, in [0, 1]; conform: reorient and "
                        "centre-crop without registration")
    parser.add_argument("--no-conform", dest="t1w_space", action="store_const",
                        const="model-grid", help="the same as --t1w-space model-grid")
    parser.add_argument("--nprocs", type=int, default=1,
                        help="parallel processes (MultiProc if > 1)")
    parser.add_argument("--mem-gb", type=float, default=12.0,
                        help="GB per encode/decode process, for MultiProc (default: %(default)s)")
    parser.add_argument("--work-dir", type=Path,
                        help="Nipype working directory (default: OUT/work)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def build_workflow(args: argparse.Namespace) -> pe.Workflow:
    work_dir = args.work_dir or args.out / "work"
    workflow = pe.Workflow(name="reconstruct_t1w", base_dir=str(work_dir.resolve()))
    inputs = pe.Node(niu.IdentityInterface(fields=["t1w"]), name="inputs")
    inputs.iterables = [("t1w", [str(path.resolve()) for path in args.t1w])]
    encode_decode_wf = init_encode_decode_wf(
        model=args.model, revision=args.revision, t1w_space=args.t1w_space, mem_gb=args.mem_gb
    )
    sink = pe.Node(nio.DataSink(base_directory=str(args.out.resolve()), parameterization=False),
                   name="sink")
    outputs = ["reconstruction", "reconstruction_sidecar", "latent", "latent_sigma", "report"]
    outputs += [] if args.t1w_space == "model-grid" else ["conformed"]
    outputs += ["transform"] if args.t1w_space in ("native", "MNI") else []

    # fmt: off
    workflow.connect([
        (inputs, encode_decode_wf, [("t1w", "inputnode.t1w")]),
        (inputs, sink, [(("t1w", substitutions), "substitutions")]),
        (encode_decode_wf, sink, [(f"outputnode.{name}", f"@{name}") for name in outputs]),
    ])
    # fmt: on
    return workflow


def substitutions(t1w: str) -> list:
    """DataSink renames for one input. Self-contained: Nipype runs connect functions from
    their source text, without this module's globals."""
    stem = t1w.rsplit("/", 1)[-1]
    for suffix in (".nii.gz", ".nii"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    stem = stem[: -len("_T1w")] if stem.endswith("_T1w") else stem
    return [
        ("decoded_T1w", f"{stem}_desc-reconstruction_T1w"),
        ("latent_mu", f"{stem}_desc-mu_latent"),
        ("latent_sigma", f"{stem}_desc-sigma_latent"),
        ("conformed_T1w", f"{stem}_desc-conformed_T1w"),
        ("encode_report", f"{stem}_encode"),
        ("from-T1w_to-", f"{stem}_from-T1w_to-"),
    ]


def main(argv: list[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    if not run_workflow(build_workflow(args), nprocs=args.nprocs, prog="reconstruct_t1w",
                        debug=args.debug):
        return 1
    print(f"wrote reconstructions of {len(args.t1w)} images to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
