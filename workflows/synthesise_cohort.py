#!/usr/bin/env python
"""Synthesise T1w images for a small cohort, several seeds each, with ``init_synthesis_wf``.

    python workflows/synthesise_cohort.py --model PATH_OR_REPO --out DIR \
        [--participants participants.tsv] [--seeds 1 2] [--steps 50] [--nprocs 2]

Without ``--participants`` a built-in demo cohort is used. A TSV needs the columns
``participant_id, sex, age, ventricular_volume, brain_volume`` (volumes already in [0, 1],
or mm^3 with a ``--policy`` JSON giving reference ranges). Writes
``DIR/sub-<label>/sub-<label>_seed-<seed>_T1w.nii.gz`` and ``.json`` for every participant and
seed, and keeps Nipype's cache in ``--work-dir``: re-running skips what is done.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from nipype.interfaces import io as nio
from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from brain_ldm_nodes.demographics import CONDITIONING_ORDER
from brain_ldm_nodes.workflows import init_synthesis_wf
from brain_ldm_nodes.workflows.execution import run_workflow

#: participant_id, sex, age (years), ventricular_volume, brain_volume (normalised, [0, 1])
DEMO_COHORT = [
    dict(participant_id="01", sex="F", age="63", ventricular_volume="0.2", brain_volume="0.4"),
    dict(participant_id="02", sex="M", age="75", ventricular_volume="0.7", brain_volume="0.5"),
]


def subject_folder(label: str) -> str:
    """DataSink container of a participant (a module-level function, as Nipype requires)."""
    return f"sub-{label}"


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="brain_ldm.1 bundle folder or Hub repo id")
    parser.add_argument("--revision", help="Hub revision of --model")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--participants", type=Path,
                        help="participants TSV (default: a demo cohort)")
    parser.add_argument("--policy", type=Path,
                        help="DemographicsPolicy JSON (sex codes, mm^3 ranges)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1], help="seeds per participant")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps (default: %(default)s)")
    parser.add_argument("--image-shape", type=int, nargs=3, metavar=("D", "H", "W"),
                        help="output grid in voxels (default: the model's native grid)")
    parser.add_argument("--nprocs", type=int, default=1,
                        help="parallel processes (MultiProc if > 1)")
    parser.add_argument("--mem-gb", type=float, default=12.0,
                        help="GB per sampling process, for MultiProc (default: %(default)s)")
    parser.add_argument("--work-dir", type=Path,
                        help="Nipype working directory (default: OUT/work)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def read_cohort(path: Path | None) -> list[dict[str, str]]:
    if path is None:
        return DEMO_COHORT
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def build_workflow(args: argparse.Namespace) -> pe.Workflow:
    cohort = read_cohort(args.participants)
    work_dir = args.work_dir or args.out / "work"
    workflow = pe.Workflow(name="synthesise_cohort", base_dir=str(work_dir.resolve()))

    # One row per participant, iterated in lockstep; every participant crossed with every seed.
    fields = ["label", *CONDITIONING_ORDER]
    participants = pe.Node(niu.IdentityInterface(fields=fields), name="participants")
    participants.iterables = [
        ("label", [row["participant_id"].removeprefix("sub-") for row in cohort]),
        *[(name, [row[name] for row in cohort]) for name in CONDITIONING_ORDER],
    ]
    participants.synchronize = True
    seeds = pe.Node(niu.IdentityInterface(fields=["seed"]), name="seeds")
    seeds.iterables = [("seed", args.seeds)]

    synthesis_wf = init_synthesis_wf(
        model=args.model, revision=args.revision, num_inference_steps=args.steps,
        image_shape=args.image_shape, mem_gb=args.mem_gb,
    )
    if args.policy is not None:
        synthesis_wf.inputs.inputnode.policy_file = str(args.policy.resolve())

    file_name = "sub-%(label)s_seed-%(seed)d_T1w"  # + .nii.gz / .json (keep_ext)
    rename_t1w = pe.Node(niu.Rename(format_string=file_name, keep_ext=True), name="rename_t1w")
    rename_sidecar = pe.Node(niu.Rename(format_string=file_name, keep_ext=True),
                             name="rename_sidecar")
    sink = pe.Node(nio.DataSink(base_directory=str(args.out.resolve()), parameterization=False),
                   name="sink")

    # fmt: off
    workflow.connect([
        (participants, synthesis_wf, [(f, f"inputnode.{f}") for f in CONDITIONING_ORDER]),
        (seeds, synthesis_wf, [("seed", "inputnode.seed")]),
        (synthesis_wf, rename_t1w, [("outputnode.t1w", "in_file")]),
        (synthesis_wf, rename_sidecar, [("outputnode.sidecar", "in_file")]),
        (participants, rename_t1w, [("label", "label")]),
        (participants, rename_sidecar, [("label", "label")]),
        (seeds, rename_t1w, [("seed", "seed")]),
        (seeds, rename_sidecar, [("seed", "seed")]),
        (participants, sink, [(("label", subject_folder), "container")]),
        (rename_t1w, sink, [("out_file", "@t1w")]),
        (rename_sidecar, sink, [("out_file", "@sidecar")]),
    ])
    # fmt: on
    return workflow


def main(argv: list[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    if not run_workflow(build_workflow(args), nprocs=args.nprocs, prog="synthesise_cohort",
                        debug=args.debug):
        return 1
    print(f"wrote {len(read_cohort(args.participants)) * len(args.seeds)} images to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
