"""Argument parser of ``brain-ldm-bids`` (BIDS Apps conventions, as fMRIPrep's)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from .._version import __version__
from ..scheduler_names import DEFAULT_SCHEDULER, SCHEDULERS

_T = TypeVar("_T")

DESCRIPTION = """\
brain-ldm-bids: synthetic T1w images from a BIDS dataset's participants.tsv.

For every participant, sex and age are read from participants.tsv (and ventricular CSF and
brain volume where it has columns for them; where not, every participant gets the MONAI
bundle's defaults, ventricular 0.2 and brain 0.4, said once and recorded in each sidecar),
normalised to the Brain LDM's conditioning ([sex, age, ventricular_volume, brain_volume] in
[0, 1]) and used to sample synthetic T1w images, written
as a BIDS derivative dataset: sub-<label>/anat/sub-<label>_desc-synthetic_T1w.nii.gz + .json
(with --n-samples N > 1: sub-<label>_run-<1..N>_desc-synthetic_T1w). Re-runs skip images that
are complete and match the request. The 'group' level summarises output_dir: group/images.tsv
(every image with its conditioning) and group/report.html (slice mosaics per subject).
With --counterfactual, the participant level makes counterfactuals of each participant's real
T1w images instead (DDIM inversion under its own demographics, regeneration under edited ones);
--sweep adds images that vary one conditioning value from the same noise (strips in the report).
"""

EPILOG = """\
examples:
  brain-ldm-bids /data/ds /data/ds/derivatives/brain-ldm participant --model /models/brain_ldm.1
  brain-ldm-bids /data/ds /data/ds/derivatives/brain-ldm participant --participant-label 01 02 \\
      --n-samples 3 --seed 7 --nprocs 2
  brain-ldm-bids /data/ds /data/ds/derivatives/brain-ldm group
  # counterfactuals of every real T1w, 10 years older, and an age sweep from the same noise:
  brain-ldm-bids /data/ds /data/ds/derivatives/brain-ldm participant \
      --counterfactual age=+10 --sweep age=50:80:10
  # synthetic images plus, per participant, sex F and M from one seed:
  brain-ldm-bids /data/ds /data/ds/derivatives/brain-ldm participant --sweep sex=F,M

participants.tsv:
  columns are found by name, ignoring case, punctuation and a trailing unit: age is 'age' or
  'age_at_<scan|mri|imaging|visit|session|acquisition|baseline...>' in years ('Age (years)',
  'age_years', 'age_at_first_scan_years'; 'age_months' is not read), sex is 'sex',
  'biological_sex' or 'sex_at_birth', else 'gender' ('Sex (M/F)'); two candidates for one
  field are an error naming both. Sex codes: M/F/male/female (any case), others through
  participants.json Levels. Ages: 63, 63.5, '63y', ranges '35-40' (midpoint), '89+' (89).
  'n/a' or empty: missing (a missing sex or age skips the participant). Ages outside the
  training range 44-82 y skip the participant unless --out-of-range clip or allow. The run
  ends with the skipped participants grouped by reason, each with what would include them.

environment:
  BRAIN_LDM_MODEL      default for --model (BRAIN_LDM_MODEL_REVISION: its --revision)
  BRAIN_LDM_COMPILATION_CACHE  default for --compilation-cache-dir
  HF_HUB_OFFLINE       1 unless set: Hub models come from the local Hugging Face cache only
  HF_HOME, HF_HUB_CACHE  where that cache is

exit status: 0 done (participants with unusable values are skipped, not errors); 1 the dataset,
model or output folder cannot be used, or some images failed; 2 bad command line.
"""


class _OneLineErrorParser(argparse.ArgumentParser):
    """Reports a bad command line in one line on stderr (no usage block), exit status 2."""

    def error(self, message: str):  # noqa: D102 - argparse API
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _existing_dir(value: str) -> Path:
    path = Path(value).expanduser()
    if not path.exists():
        raise argparse.ArgumentTypeError(
            f"{value}: no such directory (expected the root folder of a BIDS dataset)"
        )
    if not path.is_dir():
        raise argparse.ArgumentTypeError(
            f"{value}: not a directory (expected the root folder of a BIDS dataset)"
        )
    return path.resolve()


def _parsed(value: str, convert: Callable[[str], _T], what: str, accepted: str) -> _T:
    """``convert(value)``; its ``ValueError`` becomes one line: ``'<value>' is not <what>
    (accepted: <accepted>)``."""
    try:
        return convert(value)
    except ValueError:
        message = f"{value!r} is not {what} (accepted: {accepted})"
        raise argparse.ArgumentTypeError(message) from None


def _positive_int(value: str) -> int:
    number = _parsed(value, int, "an integer", "1, 2, ...")
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value} must be an integer ≥ 1")
    return number


def _non_negative_int(value: str) -> int:
    number = _parsed(value, int, "an integer", f"0 to {2**32 - 1}")
    if number < 0 or number >= 2**32:
        raise argparse.ArgumentTypeError(f"{value} is outside the accepted 0 to {2**32 - 1}")
    return number


_JSON_EXAMPLE = """'{"sbatch_args": "-p short"}'"""


def _unit_interval(value: str) -> float:
    number = _parsed(value, float, "a number", "a normalised volume in [0, 1], e.g. 0.2")
    if not 0.0 <= number <= 1.0:
        raise argparse.ArgumentTypeError(
            f"{value} is outside [0, 1] (accepted: a normalised volume, e.g. 0.2)"
        )
    return number


def _json_object(value: str) -> dict:
    """A JSON object given inline or as the path of a JSON file."""
    text, where = value, "inline JSON"
    candidate = Path(value).expanduser()
    if not value.lstrip().startswith(("{", "[")) and candidate.is_file():
        where = str(candidate)
        try:
            text = candidate.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise argparse.ArgumentTypeError(f"{candidate}: cannot read ({error})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(
            f"{where} is not valid JSON ({error}); accepted: a JSON object such as "
            f"{_JSON_EXAMPLE}, or the path of a file holding one"
        ) from None
    if not isinstance(data, dict):
        raise argparse.ArgumentTypeError(
            f"{where} is a JSON {type(data).__name__}, not an object; "
            f"accepted: e.g. {_JSON_EXAMPLE}"
        )
    return data


def _from_edits(parse: str, value: str) -> Any:
    """``brain_ldm_nodes.edits.<parse>(value)``; its ``EditError`` becomes the argument error."""
    from .. import edits

    try:
        return getattr(edits, parse)(value, argument="")
    except edits.EditError as error:
        raise argparse.ArgumentTypeError(str(error).strip()) from None


def _edit(value: str) -> Any:
    """One ``--counterfactual`` edit (``brain_ldm_nodes.edits.parse_edit``)."""
    return _from_edits("parse_edit", value)


def _sweep(value: str) -> Any:
    """One ``--sweep`` (``brain_ldm_nodes.edits.parse_sweep``)."""
    return _from_edits("parse_sweep", value)


def _memory_gb(value: str) -> float:
    text = value.strip().upper().removesuffix("B")
    scale = 1.0
    for suffix, factor in (("G", 1.0), ("M", 1 / 1024), ("T", 1024.0)):
        if text.endswith(suffix):
            text, scale = text[:-1], factor
            break
    number = _parsed(value, lambda _: float(text) * scale, "a memory size",
                     "e.g. 16GB, 16000MB, 0.5T, 16")
    if not number > 0 or number == float("inf"):
        raise argparse.ArgumentTypeError(f"{value} must be a positive, finite memory size")
    return number


def get_parser() -> argparse.ArgumentParser:
    """The ``brain-ldm-bids`` parser; building it runs nothing."""
    parser = _OneLineErrorParser(
        prog="brain-ldm-bids", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("bids_dir", type=_existing_dir,
                        help="the root folder of a BIDS dataset (with participants.tsv)")
    parser.add_argument("output_dir", type=Path,
                        help="the output folder (a BIDS derivative dataset; created if missing)")
    parser.add_argument("analysis_level", choices=["participant", "group"],
                        help="'participant': synthesise images; 'group': summarise output_dir")

    selection = parser.add_argument_group("selecting participants")
    selection.add_argument("--participant-label", "--participant_label", nargs="+", metavar="LABEL",
                           help="participants to process, with or without 'sub-' (default: all)")
    selection.add_argument("--skip-bids-validation", "--skip_bids_validation", action="store_true",
                           help="do not validate bids_dir with pybids (a missing dataset_description.json "
                                "is then tolerated)")
    table = parser.add_argument_group("reading participants.tsv")
    table.add_argument("--demographics-config", type=Path, metavar="JSON",
                       help="column names, sex codes, mm³ volume reference ranges and other "
                            "policy settings (format: bids_examples/README.md); the flags below "
                            "override the file")
    table.add_argument("--out-of-range", choices=["error", "clip", "allow"], default=None,
                       help="normalised values outside [0, 1] (e.g. ages outside 44-82 y): "
                            "'error' skips the participant (default), 'clip' uses the range "
                            "edge, 'allow' extrapolates; either is recorded in the sidecar")
    table.add_argument("--missing-volumes", choices=["default", "error"], default=None,
                       help="a volume with no column, or an empty/'n/a' cell: 'default' "
                            "(default) uses the volume defaults and records it in the "
                            "sidecar; 'error' refuses a table without the columns and skips "
                            "participants with an empty cell")
    table.add_argument("--volume-defaults", nargs=2, type=_unit_interval, default=None,
                       metavar=("VENTRICULAR", "BRAIN"),
                       help="normalised ventricular and brain volume used when missing "
                            "(default: the MONAI bundle's 0.2 0.4)")

    model = parser.add_argument_group("model and sampling")
    model.add_argument("--model", default=None,
                       help="brain_ldm.1 bundle: a local folder (from brain-ldm-convert) or a "
                            "Hugging Face Hub repo id in the local cache (put there by "
                            "brain-ldm-fetch) (default: $BRAIN_LDM_MODEL)")
    model.add_argument("--revision",
                       help="Hub revision (branch, tag or commit) of --model; ignored for folders")
    model.add_argument("--seed", type=_non_negative_int, default=0,
                       help="base seed; image n of participant sub-X uses a seed derived from "
                            "(seed, X, n) only, so results do not depend on who else is processed")
    model.add_argument("--n-samples", type=_positive_int, default=1,
                       help="synthetic images per participant (default 1)")
    model.add_argument("--num-inference-steps", type=_positive_int, default=50,
                       help="sampler steps = U-Net calls (default 50, DDIM as upstream)")
    model.add_argument("--scheduler", choices=SCHEDULERS, default=DEFAULT_SCHEDULER,
                       help="sampler of the synthetic images: ddim (default; the bundle's, 50 "
                            "steps reproduce the released model), or a multistep ODE solver, "
                            "dpmpp-2m (DPM-Solver++ 2M) or unipc (UniPC-2M), about as accurate "
                            "as DDIM-50 in 16-21 steps (README 'Faster samplers'); recorded in "
                            "each sidecar (Sampler.Name), and a different one makes a different "
                            "image. Inversion and counterfactuals always use DDIM")

    edits = parser.add_argument_group(
        "counterfactuals and sweeps",
        "EDIT and SWEEP values: age in years (age=75; signed = relative to the participant's\n"
        "own: age=+10, age=-5), sex F/M/0/1 (the model's 0 = female, 1 = male; flip for\n"
        "--counterfactual), ventricular_volume and brain_volume normalised (=0.6, or signed\n"
        "=+0.1). Results outside [0, 1] follow --out-of-range.",
    )
    edits.add_argument("--counterfactual", nargs="*", type=_edit, metavar="EDIT",
                       help="instead of synthetic images, make counterfactuals of each "
                            "participant's real T1w images (every session and run): encode, "
                            "invert the DDIM trajectory under the participant's own demographics, "
                            "sample forward with the EDITs applied (all together, one per field), "
                            "e.g. age=+10 sex=flip -> <source>_desc-counterfactual_T1w; the "
                            "sidecar records the source, both conditionings and the "
                            "reconstruction error. No EDIT: only the --sweep images")
    edits.add_argument("--sweep", nargs="+", type=_sweep, metavar="SWEEP",
                       help="conditioning sweeps, each FIELD=START:STOP:STEP (inclusive) or "
                            "FIELD=V1,V2,..., e.g. age=50:80:5, age=-10:+10:5, sex=F,M: one image "
                            "per value from the same starting noise (synthetic: the seed of the "
                            "participant's image 1, desc-syntheticSweep<Field><Value>; with "
                            "--counterfactual: each real T1w's inverted noise, "
                            "desc-counterfactualSweep<Field><Value>); the other values stay the "
                            "participant's own. The group level draws one strip per sweep")

    edits.add_argument("--t1w-space", choices=["native", "MNI", "conform"], default="native",
                       help="where the real T1w images of --counterfactual are: native (default) "
                            "= scanner space, registered rigidly to the MNI152 template onto the "
                            "model grid, the transform published as <source>_from-T1w_to-"
                            "MNI152NLin2009aSym_mode-image_xfm.txt; MNI = already in MNI152 2009 "
                            "space (e.g. fMRIPrep space-MNI152NLin2009cAsym), only resampled; "
                            "conform = reorient and centre-crop without registration (toy data)")
    edits.add_argument("--t1w-derivatives", type=Path, metavar="DIR", default=None,
                       help="take the real T1w of --counterfactual from a derivatives folder "
                            "instead of bids_dir, e.g. derivatives/fmriprep: its sub-*/[ses-*/]"
                            "anat/*_space-MNI152*_desc-preproc_T1w.nii.gz are already in MNI "
                            "space (only resampled onto the model grid, not registered); images "
                            "without space- are prepared as --t1w-space says; other spaces are "
                            "left out with a note. Sources are named bids:<key>:<path> "
                            "(DatasetLinks.<key>, key 'fmriprep' for fMRIPrep); participants "
                            "still come from bids_dir's participants.tsv")
    edits.add_argument("--output-space", nargs="+", choices=["model", "source"],
                       default=["model"], metavar="{model,source}",
                       help="where the counterfactuals are written: model (default) = the "
                            "model's grid; source = resampled back onto the source T1w's grid "
                            "with the inverse of its transform, named space-T1w (raw T1w) or "
                            "space-<its space> (--t1w-derivatives); both: 'model source'. Not "
                            "with --t1w-space conform (no transform)")

    execution = parser.add_argument_group("execution")
    execution.add_argument("-w", "--work-dir", type=Path,
                           help="Nipype working directory (default: "
                                "output_dir/.brain-ldm-bids-work/<run>, one per set of "
                                "participants, removed after a run without failures; on a "
                                "cluster, a node-local or scratch folder is faster)")
    execution.add_argument("--nprocs", "--n-cpus", "--nthreads", type=_positive_int,
                           help="images sampled in parallel with the MultiProc plugin (default "
                                "1: the Linear plugin; JAX already uses every core within one "
                                "process)")
    execution.add_argument("--mem", "--mem-gb", dest="mem_gb", type=_memory_gb, metavar="MEM",
                           help="memory limit for the MultiProc plugin, e.g. 16GB (default: "
                                "90%% of the machine's)")
    execution.add_argument("--plugin", default=None,
                           help="Nipype execution plugin: Linear, MultiProc, SLURM, SLURMGraph, … "
                                "(default: MultiProc if --nprocs > 1, else Linear). SLURM waits "
                                "for its jobs; SLURMGraph submits them all and returns (run the "
                                "command again later to check and complete)")
    execution.add_argument("--plugin-args", type=_json_object, default=None, metavar="JSON",
                           help="plugin arguments as a JSON object or a JSON file, passed to "
                                "Nipype over the defaults (MultiProc: n_procs, memory_gb, "
                                "mp_context=forkserver)")

    execution.add_argument("--compilation-cache-dir", metavar="DIR|none", default=None,
                           help="JAX's persistent compilation cache, shared by every job: only "
                                "the first process compiles (default: "
                                "$BRAIN_LDM_COMPILATION_CACHE, else $JAX_COMPILATION_CACHE_DIR, "
                                "else ~/.cache/brain-ldm-nodes/jax; 'none' disables it). On a "
                                "cluster, a folder on a file system all nodes share")

    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more output: -v lists every image and Nipype's node log; -vv also "
                             "shows tracebacks on errors")
    parser.add_argument("--debug", action="store_true",
                        help="tracebacks on errors and Nipype's debug log (as -vv)")
    parser.add_argument("--version", action="version", version=f"brain-ldm-bids {__version__}")
    return parser
