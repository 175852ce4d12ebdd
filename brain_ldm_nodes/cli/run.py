"""``brain-ldm-bids``: the BIDS App's entry point.

:func:`main` parses the command line, checks it, reads the dataset, plans which images are
missing, builds the Nipype workflow that samples them, runs it and prints a summary. Known
problems (a dataset, model, configuration or output folder that cannot be used, another run
holding the output folder) end in one line on stderr and exit status 1 (2 for a bad command
line); tracebacks only with ``-vv``/``--debug``.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import shutil
import sys
import time
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._version import __version__
from ..scheduler_names import SCHEDULER_TITLES
from .parser import get_parser

PROG = "brain-ldm-bids"
LOGGER_NAME = "brain_ldm_bids"
EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130

log = logging.getLogger(LOGGER_NAME)


class UsageError(ValueError):
    """A command-line value that parses but cannot be used (exit status 2)."""


class _FailedImages(RuntimeError):
    """Some images could not be made (the summary lists them), or the plugin could not run."""


def _known_errors() -> tuple[type[BaseException], ...]:
    """Exceptions whose message is the whole story (imports deferred: they pull in pybids)."""
    from ..bids import BidsDatasetError
    from ..demographics import DemographicsError
    from ..derivatives import OutputDirError
    from ..report import ReportError
    from ..weights.bundle import BundleError

    return (UsageError, _FailedImages, BidsDatasetError, DemographicsError, OutputDirError,
            BundleError, ReportError)


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return " ".join(lines) or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``brain-ldm-bids`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    try:
        args = get_parser().parse_args(argv)
    except SystemExit as exit_:  # --help, --version, or a bad command line (already printed)
        return int(exit_.code or 0)
    debug = args.debug or args.verbose >= 2
    try:
        with _logging(args.verbose, debug):
            if args.analysis_level == "participant":
                return run_participant_level(args)
            return run_group_level(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        known = isinstance(exc, _known_errors())
        if debug:
            traceback.print_exc()
        message = _one_line(exc)
        if not known:
            message = (f"unexpected {type(exc).__name__}: {message} (run with --debug for the "
                       "traceback, and please report it)")
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, UsageError) else EXIT_FAILED


# --------------------------------------------------------------------------- logging


_NIPYPE_LEVELS = ("workflow_level", "interface_level", "utils_level")


@contextmanager
def _logging(verbose: int, debug: bool) -> Iterator[None]:
    """Progress on stdout (our logger); Nipype's own log only with -v (DEBUG with -vv).
    Nipype's levels are process-wide: they are put back afterwards (``main`` may run in a
    process that uses Nipype otherwise, e.g. tests)."""
    from nipype import config as nipype_config
    from nipype import logging as nipype_logging

    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    # The sampling node's per-step lines (in this process: the Linear plugin; MultiProc
    # workers do not print them).
    step_log = logging.getLogger("brain_ldm_nodes.progress")
    for logger in (log, step_log):
        logger.handlers[:] = [handler]
        logger.setLevel(logging.DEBUG if verbose else logging.INFO)
        logger.propagate = False
    previous = {option: nipype_config.get("logging", option) for option in _NIPYPE_LEVELS}
    level = "DEBUG" if debug else "INFO" if verbose else "CRITICAL"
    for option in _NIPYPE_LEVELS:
        nipype_config.set("logging", option, level)
    nipype_logging.update_logging(nipype_config)
    try:
        yield
    finally:
        for option, value in previous.items():
            nipype_config.set("logging", option, value)
        nipype_logging.update_logging(nipype_config)
        log.handlers.clear()
        step_log.handlers.clear()


@contextmanager
def _quiet_worker_logging(work_dir: Path, verbose: int) -> Iterator[None]:
    """Worker processes read Nipype's configuration afresh: while the workflow runs, point
    them at one that matches our verbosity (unless the user has their own
    ``NIPYPE_CONFIG_DIR``)."""
    if verbose or "NIPYPE_CONFIG_DIR" in os.environ:
        yield
        return
    folder = work_dir / "nipype_config"
    folder.mkdir(parents=True, exist_ok=True)
    levels = "\n".join(f"{option} = CRITICAL" for option in _NIPYPE_LEVELS)
    (folder / "nipype.cfg").write_text(f"[logging]\n{levels}\n", encoding="utf-8")
    os.environ["NIPYPE_CONFIG_DIR"] = str(folder)
    try:
        yield
    finally:
        os.environ.pop("NIPYPE_CONFIG_DIR", None)


# --------------------------------------------------------------------------- options


def _model_name(args) -> tuple[str, str]:
    """The model to use and where it was named (``--model`` or ``BRAIN_LDM_MODEL``)."""
    if args.model:
        return args.model, "--model"
    model = os.environ.get("BRAIN_LDM_MODEL", "").strip()
    if not model:
        raise UsageError(
            "no model given: pass --model (a brain_ldm.1 bundle folder, e.g. from "
            "brain-ldm-convert, or a Hugging Face Hub repo id in the local cache) or set "
            "BRAIN_LDM_MODEL"
        )
    return model, "BRAIN_LDM_MODEL"


def _resolve_model(model: str, revision: str | None, named_by: str = "--model"):
    """The model's identity (configs; weights files checked against their sha256 once, not
    loaded); errors name where the model came from."""
    from ..derivatives import ModelIdentity
    from ..weights.bundle import BundleError, UnreadableBundleError, WeightsMismatchError

    try:
        return ModelIdentity.resolve(model, revision, local_files_only=_hub_offline())
    except (WeightsMismatchError, UnreadableBundleError) as exc:  # once here, not per image
        raise BundleError(f"{named_by}: {_one_line(exc)}") from exc
    except BundleError as exc:
        raise BundleError(
            f"{named_by}: {_one_line(exc)} (accepted: a brain_ldm.1 bundle folder, e.g. from "
            "brain-ldm-convert, or a Hugging Face Hub repo id in the local cache)"
        ) from exc


def _hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` is 1 unless the user set it: Hub models come from the local cache."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return os.environ["HF_HUB_OFFLINE"].strip().lower() in {"1", "on", "yes", "true"}


def _compilation_cache_dir(args) -> Path | None:
    """--compilation-cache-dir (``none`` disables), else the environment's or the default."""
    from ..compilation_cache import DISABLED, default_compilation_cache_dir

    value = getattr(args, "compilation_cache_dir", None)
    if value is None:
        folder, named_by = default_compilation_cache_dir(), "the default compilation cache"
    elif value.strip().lower() in DISABLED:
        return None
    else:
        folder, named_by = Path(value).expanduser(), "--compilation-cache-dir"
    if folder is None:
        return None
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"{named_by} {folder}: cannot create it ({exc.strerror or exc}); "
                         "accepted: a folder you can write to, or 'none'") from None
    return folder.resolve()


def available_plugins() -> list[str]:
    """Nipype execution plugins by the names ``Workflow.run(plugin=...)`` accepts."""
    from nipype.pipeline import plugins

    return sorted(name[: -len("Plugin")] for name in dir(plugins)
                  if name.endswith("Plugin") and name != "Plugin" and name[0].isupper())


def _plugin_settings(args) -> tuple[str, dict[str, Any]]:
    """Plugin name and arguments: MultiProc (forkserver) for --nprocs > 1, else Linear;
    --plugin-args override the defaults."""
    nprocs = args.nprocs or 1
    name = args.plugin or ("MultiProc" if nprocs > 1 else "Linear")
    accepted = available_plugins()
    if name not in accepted:
        raise UsageError(
            f"--plugin {name!r} is not a Nipype plugin (accepted: {', '.join(accepted)})"
        )
    plugin_args: dict[str, Any] = {}
    if name == "MultiProc":
        # forkserver: forking a process that has run JAX (multithreaded) can deadlock.
        plugin_args = {"n_procs": args.nprocs or os.cpu_count() or 1, "mp_context": "forkserver"}
        if args.mem_gb is not None:
            plugin_args["memory_gb"] = args.mem_gb
    elif args.nprocs and args.nprocs > 1 and name == "Linear":
        log.info("note: --nprocs %d is ignored by the Linear plugin", args.nprocs)
    plugin_args.update(args.plugin_args or {})
    if name in {"SLURM", "SLURMGraph", "SGE", "SGEGraph", "PBS", "PBSGraph", "LSF", "OAR"}:
        # Nipype's batch plugins name jobs after $LOGNAME, which containers and CI shells
        # may lack (a KeyError deep in the plugin otherwise).
        import getpass

        os.environ.setdefault("LOGNAME", getpass.getuser())
    return name, plugin_args


def _node_mem_gb(image_shape: Sequence[int]) -> float:
    """Memory one sampling node needs: the full-grid figure scaled by the grid's size."""
    from ..pipeline import IMAGE_SHAPE
    from ..workflows.synthesis import FULL_SIZE_MEM_GB

    scale = math.prod(image_shape) / math.prod(IMAGE_SHAPE)
    return round(max(0.25, FULL_SIZE_MEM_GB * scale), 2)


# --------------------------------------------------------------------------- participant level


@dataclass
class Progress:
    """Nipype ``status_callback``: one line when an image starts and when it is written,
    with the time it took, the running count and an estimate of the time left.

    The estimate uses the pace since the first image was written (the first includes
    compilation and loading, which later images do not repeat), so there is none before
    the second image."""

    requests: Sequence[Any]
    started_at: float = field(default_factory=time.monotonic)
    written: list[str] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)
    _starts: dict[str, float] = field(default_factory=dict)
    _first_written_at: float | None = None

    def __post_init__(self) -> None:
        self._by_stem = {request.stem: request for request in self.requests}

    def _requests_of(self, node) -> tuple[list[Any], str]:
        """The requests a node works on (a counterfactual node: several) and its kind."""
        from ..interfaces import (
            CounterfactualSeriesT1w,
            PublishDerivative,
            ResampleToSource,
            SampleT1w,
        )

        interface = node.interface
        if isinstance(interface, SampleT1w):
            stems, kind = [node.inputs.out_prefix], "sample"
        elif isinstance(interface, CounterfactualSeriesT1w):  # model-grid stems: all spaces
            made = set(node.inputs.out_prefixes)
            return [r for r in self.requests if getattr(r, "grid_stem", None) in made], "sample"
        elif isinstance(interface, ResampleToSource):
            stems, kind = [node.inputs.out_prefix], "resample"
        elif isinstance(interface, PublishDerivative):
            stems, kind = [Path(node.inputs.out_file).name[: -len(".nii.gz")]], "publish"
        else:
            return [], ""
        return [self._by_stem[stem] for stem in stems if stem in self._by_stem], kind

    def __call__(self, node, status: str) -> None:
        requests, kind = self._requests_of(node)
        if not requests:
            return
        if kind == "sample" and status == "start":
            for request in requests:
                self._starts[request.stem] = time.monotonic()
            log.info("%s", requests[0].start_message)
        elif status == "exception":
            for request in requests:
                self.failures[request.stem] = _node_failure(node)
            log.info("%s FAILED: %s", requests[0].title, self.failures[requests[0].stem])
        else:
            self._progress(requests[0], kind, status)

    def _progress(self, request, kind: str, status: str) -> None:
        stem = request.stem
        if kind == "publish" and status == "end":
            if stem in self.failures:  # Linear reports "end" for the nodes it skips
                return
            self.written.append(stem)
            now = time.monotonic()
            took = now - self._starts.get(stem, now)
            per_step = took / request.num_inference_steps
            done, total = len(self.written), len(self.requests)
            left = ""
            if self._first_written_at is None:
                self._first_written_at = now
            elif done < total:
                pace = (now - self._first_written_at) / (done - 1)  # after compilation
                left = f"; about {_duration(pace * (total - done))} left"
            log.info("[%d/%d] %s done in %s (%s per step): %s%s", done, total, request.title,
                     _duration(took), _duration(per_step), request.relative_path, left)


def _node_failure(node) -> str:
    """The last line of a failed node's traceback (from its result file)."""
    try:
        text = node.result.runtime.traceback or ""
    except Exception:  # no result file: the crash file is all there is
        text = ""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[-1] if lines else f"node {node.fullname} failed (see its crash file)"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _source_description(layout) -> dict[str, Any]:
    try:
        description = layout.get_dataset_description()
    except Exception:  # missing or broken and --skip-bids-validation: nothing to cite
        return {}
    return dict(description) if isinstance(description, dict) else {}


def _write_conditioning_files(table, folder: Path, requests: Sequence[Any]) -> dict[str, Path]:
    """One conditioning JSON per key of the requests' ``conditionings()`` (a participant's
    own: ``sub-<label>``; a sweep point or counterfactual target: its image's stem),
    rewritten only if it changed (so Nipype's hashes, and its cache in a kept work folder,
    stay valid)."""
    import json

    from ..provenance import conditioning_document, write_conditioning

    wanted = {}
    for request in requests:
        wanted.update(request.conditionings())
    files = {}
    for key, conditioning in wanted.items():
        path = folder / f"{key}_conditioning.json"
        document = json.loads(json.dumps(conditioning_document(conditioning, table.policy)))
        try:
            current = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            current = None
        if current != document:
            write_conditioning(conditioning, path, table.policy)
        files[key] = path
    return files


def _edits_and_sweeps(args, policy) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """``--counterfactual`` edits and ``--sweep`` sweeps, checked together and against the
    demographics policy (absolute values outside [0, 1] under out_of_range 'error')."""
    from ..demographics import Conditioning, DemographicsPolicy
    from ..edits import EditError, apply_edits

    policy = policy or DemographicsPolicy()
    edits, sweeps = tuple(args.counterfactual or ()), tuple(args.sweep or ())
    for flag, items in (("--counterfactual", [e.field for e in edits]),
                        ("--sweep", [s.field for s in sweeps])):
        repeated = sorted({name for name in items if items.count(name) > 1})
        if repeated:
            raise UsageError(f"{flag}: {repeated[0]} is given twice (accepted: one "
                             f"{'edit' if flag == '--counterfactual' else 'sweep'} per field)")
    if args.counterfactual is not None and not edits and not sweeps:
        raise UsageError("--counterfactual needs at least one EDIT (e.g. age=+10), or --sweep "
                         "for counterfactual sweeps only")
    if args.counterfactual is not None and args.n_samples > 1:
        raise UsageError(f"--n-samples {args.n_samples} applies to synthetic images; "
                         "--counterfactual makes one image per real T1w and edit (accepted: "
                         "drop --n-samples, or run the synthetic images separately)")
    if args.counterfactual is None:
        for flag, given in (("--t1w-derivatives", args.t1w_derivatives is not None),
                            ("--output-space", args.output_space != ["model"])):
            if given:
                raise UsageError(f"{flag} applies to the real T1w of --counterfactual "
                                 "(accepted: add --counterfactual EDIT..., or drop it)")
    if "source" in args.output_space and args.t1w_space == "conform":
        raise UsageError("--output-space source needs the transform of a registration: "
                         "--t1w-space conform has none (accepted: --t1w-space native or MNI, "
                         "or --output-space model)")
    neutral = Conditioning((0.5, 0.5, 0.5, 0.5))
    checks = [("--counterfactual", edit.spec, edit) for edit in edits]
    checks += [("--sweep", sweep.text, value) for sweep in sweeps for value in sweep.values]
    for flag, given, value in checks:
        if value.kind != "absolute":
            continue  # relative values depend on the participant: checked per participant
        try:
            apply_edits(neutral, [value], policy)
        except EditError as exc:
            raise UsageError(f"{flag} {given}: {exc}") from None
    return edits, sweeps


def _plan(args, table, layout, identity, edits, sweeps) -> tuple[list[Any], list[str]]:
    """The images this run should have: synthetic (and synthetic sweeps), or counterfactuals
    of every real T1w (and counterfactual sweeps); with notes on what is left out."""
    from ..bids import find_t1w_images
    from ..derivatives import plan_counterfactuals, plan_images, plan_sweeps

    steps = args.num_inference_steps
    output_spaces = tuple(dict.fromkeys(args.output_space))  # given order, once each
    if args.counterfactual is not None and args.t1w_derivatives is not None:
        from ..bids import find_preprocessed_t1w

        sources, spaces, notes = {}, {}, []
        for participant in table.usable:
            found, found_notes = find_preprocessed_t1w(
                args.t1w_derivatives, participant.label, t1w_space=args.t1w_space)
            sources[participant.label] = list(found)
            spaces.update(found)
            notes += found_notes
        requests, more = plan_counterfactuals(
            table, sources, bids_dir=args.t1w_derivatives, edits=edits, sweeps=sweeps,
            num_inference_steps=steps, model=identity, t1w_space=args.t1w_space,
            output_spaces=output_spaces, source_dataset=args.t1w_derivatives_key,
            source_spaces=spaces)
        return requests, notes + more
    if args.counterfactual is not None:
        sources = {p.label: find_t1w_images(layout, p.label) for p in table.usable}
        return plan_counterfactuals(table, sources, bids_dir=args.bids_dir, edits=edits,
                                    sweeps=sweeps, num_inference_steps=steps, model=identity,
                                    t1w_space=args.t1w_space, output_spaces=output_spaces)
    requests = plan_images(table, n_samples=args.n_samples, base_seed=args.seed,
                           num_inference_steps=steps, model=identity, scheduler=args.scheduler)
    swept, notes = plan_sweeps(table, sweeps, base_seed=args.seed, num_inference_steps=steps,
                               model=identity, scheduler=args.scheduler)
    return requests + swept, notes


def _check_scheduler_args(args, num_train_timesteps: int) -> None:
    """--scheduler: counterfactuals are DDIM only; the multistep solvers need distinct
    timesteps (at most num_train_timesteps − 1 steps)."""
    if args.scheduler == "ddim":
        return
    if args.counterfactual is not None:
        raise UsageError(
            f"--scheduler {args.scheduler}: counterfactuals (--counterfactual) always use DDIM "
            "(no inverse of the other samplers is implemented); drop --scheduler"
        )
    if args.num_inference_steps >= num_train_timesteps:
        raise UsageError(
            f"--num-inference-steps {args.num_inference_steps} with --scheduler {args.scheduler}: "
            f"accepted 1 to {num_train_timesteps - 1} (the solver's timesteps must be distinct)"
        )


def run_participant_level(args) -> int:
    from ..bids import BidsDatasetError, load_layout, read_participants
    from ..compilation_cache import use_compilation_cache
    from ..derivatives import (
        ParticipantLocks,
        assess,
        check_creatable,
        check_locations,
        check_raw_link,
        dataset_description,
        default_work_dir,
        prepare_output_dir,
        raw_dataset_link,
        read_own_description,
        refresh_sidecar,
        remove_stale_temporaries,
        remove_stale_top_level_temporaries,
        write_dataset_files,
    )

    bids_dir = args.bids_dir
    output_dir = args.output_dir.expanduser().resolve()
    work_dir = args.work_dir.expanduser().resolve() if args.work_dir else None
    check_locations(bids_dir, output_dir, work_dir)
    check_creatable(output_dir)  # before the model is loaded: locations first
    read_own_description(output_dir)  # refuse another dataset before reading anything
    if work_dir is not None and output_dir in work_dir.parents:
        hidden = work_dir.relative_to(output_dir).parts[0].startswith(".")
        if not hidden:
            log.info("note: -w %s is inside output_dir; the BIDS validator will report it "
                     "unless its name starts with '.' or it is listed in .bidsignore", work_dir)
    model_name, named_by = _model_name(args)
    if named_by == "BRAIN_LDM_MODEL" and args.revision is None:  # e.g. a container's model
        args.revision = os.environ.get("BRAIN_LDM_MODEL_REVISION", "").strip() or None
    plugin, plugin_args = _plugin_settings(args)
    compilation_cache = _compilation_cache_dir(args)
    log.info("%s %s: participant level; %s -> %s", PROG, __version__, bids_dir, output_dir)

    config = _demographics_config(args)
    edits, sweeps = _edits_and_sweeps(args, config.policy)
    derivatives_description = None
    if args.t1w_derivatives is not None:
        from ..bids import read_derivatives_description

        args.t1w_derivatives = args.t1w_derivatives.expanduser().resolve()
        derivatives_description = read_derivatives_description(
            args.t1w_derivatives, "--t1w-derivatives")
        args.t1w_derivatives_key = _derivatives_key(derivatives_description)
        log.info("real T1w from %s (%s; sources named bids:%s:...)", args.t1w_derivatives,
                 derivatives_description.get("Name", "no Name"), args.t1w_derivatives_key)
    layout = load_layout(bids_dir, validate=not args.skip_bids_validation)
    table = read_participants(
        bids_dir, config, participant_labels=args.participant_label, layout=layout
    )
    for problem in table.problems:
        log.info("note: %s", problem)
    _report_columns(table)
    for participant in table.skipped:  # one line each, naming the row and the reason
        log.info("skipped sub-%s: %s", participant.label, participant.skip_reason)
    if not table.usable:
        for line in skip_summary(table):
            log.info("  %s", line)
        raise BidsDatasetError(
            f"{table.tsv_path}: none of the {len(table)} selected participants can be used "
            "(reasons above, grouped with the flags that would include them)"
        )

    identity = _resolve_model(model_name, args.revision, named_by)
    if args.num_inference_steps > identity.num_train_timesteps:
        raise UsageError(
            f"--num-inference-steps {args.num_inference_steps}: the model was trained with "
            f"{identity.num_train_timesteps} timesteps "
            f"(accepted: 1 to {identity.num_train_timesteps})"
        )
    _check_scheduler_args(args, identity.num_train_timesteps)
    if args.revision and Path(identity.model).is_dir():
        log.info("note: --revision is ignored for a bundle folder (%s)", identity.model)
    log.info("model %s: weights sha256 %s, grid %s; %d %s steps, base seed %d",
             identity.model, identity.unet_sha256[:12], "x".join(map(str, identity.image_shape)),
             args.num_inference_steps, SCHEDULER_TITLES[args.scheduler], args.seed)

    output_dir = prepare_output_dir(output_dir)
    labels = [participant.label for participant in table.usable]
    # Runs on other participants (e.g. SLURM array tasks) may work in output_dir meanwhile.
    with ParticipantLocks(output_dir, labels) as locks:
        with locks.dataset_files():
            existing = read_own_description(output_dir)
            stale = remove_stale_top_level_temporaries(output_dir)
            source = _source_description(layout)
            link = (raw_dataset_link(source, bids_dir, output_dir)
                    if args.counterfactual is not None else None)
            links = {}
            if derivatives_description is not None:
                links[args.t1w_derivatives_key] = raw_dataset_link(
                    derivatives_description, args.t1w_derivatives, output_dir)
            if link is not None:  # outputs and DatasetLinks.raw must agree
                check_raw_link(existing, link, output_dir)
            for key, value in links.items():
                check_raw_link(existing, value, output_dir, key=key)
            write_dataset_files(
                output_dir, dataset_description(source, raw_link=link, links=links), existing)
        for path in [*stale, *remove_stale_temporaries(output_dir, labels)]:
            log.info("removed %s (left by an interrupted run)", path.relative_to(output_dir))
        requests, notes = _plan(args, table, layout, identity, edits, sweeps)
        for note in notes:
            log.info("note: %s", note)
        if not requests:
            raise BidsDatasetError("no image to make: every requested image was left out "
                                   "(each one's reason is printed above)")
        to_make, refreshed, complete = [], [], []
        for request in requests:
            assessment = assess(request, output_dir)
            if assessment.action == "complete":
                complete.append(request)
                log.debug("%s: already complete (%s)", request.title, request.relative_path)
            elif assessment.action == "refresh":
                refresh_sidecar(request, output_dir)
                refreshed.append(request)
                log.info("%s: sidecar updated (%s)", request.title, assessment.reason)
            else:
                to_make.append(request)
                if assessment.reason != "new":
                    log.info("%s: sampling again: %s", request.title, assessment.reason)
        log.info("%d participants, %d skipped; %d images: %d already complete, %d to sample",
                 len(table), len(table.skipped), len(requests), len(complete), len(to_make))

        failures: dict[str, str] | None = {}
        work = work_dir or default_work_dir(output_dir, labels)
        if to_make:
            submission = _graph_submission(locks, plugin, work)
            if submission is not None:
                plugin_args = {**plugin_args, "sbatch_args": " ".join(filter(None, [
                    str(plugin_args.get("sbatch_args", "")).strip(), f"--comment={submission}"]))}
            with use_compilation_cache(compilation_cache) as cache:
                if cache is not None:
                    log.info("compilation cache: %s", cache)
                try:
                    failures = _run_workflow(args, to_make, table, identity, output_dir, work,
                                             plugin, plugin_args)
                except BaseException:
                    if submission is not None and not _jobs_queued(submission):
                        locks.clear_submission()  # nothing was submitted: nothing to wait for
                    raise
        if failures is None:  # a graph plugin submitted every job and returned
            log.info("submitted %d images as %s jobs, which publish into %s themselves; when "
                     "they have finished, run the same command again (any plugin): it reports "
                     "what is complete and redoes what failed. Until then runs on these "
                     "participants and the group level are refused. Work folder (kept for the "
                     "jobs): %s", len(to_make), plugin, output_dir, work)
            return 0
        if args.counterfactual is None:
            _remove_stale_images(output_dir, table, args.n_samples, failures, to_make)
        else:
            _remove_stale_transforms(output_dir, table, failures, to_make)
        _print_summary(table, len(to_make) - len(failures), complete, refreshed, failures,
                       to_make)
        if failures:
            raise _FailedImages(f"{len(failures)} of {len(to_make)} images failed (reasons above; "
                                f"crash files in {work / 'crash'})")
        if work_dir is None and work.exists():
            shutil.rmtree(work, ignore_errors=True)
            with suppress(OSError):  # the shared parent, once no other run uses it
                work.parent.rmdir()
    return 0


def _derivatives_key(description: dict[str, Any]) -> str:
    """The ``DatasetLinks`` key of a ``--t1w-derivatives`` folder: its first ``GeneratedBy``
    name in lower case letters and digits (``fmriprep``), else ``derivatives``."""
    import re

    generators = [g for g in description.get("GeneratedBy") or [] if isinstance(g, dict)]
    first = str(generators[0].get("Name", "")) if generators else ""
    name = re.sub(r"[^0-9a-z]", "", first.lower())
    return name if name and name != "raw" else "derivatives"


def _graph_submission(locks, plugin: str, work: Path) -> str | None:
    """For SLURMGraph, whose jobs outlive the command (and its participant locks): a SLURM
    comment for every job, recorded with the locks so that later runs on these participants
    are refused while ``squeue`` lists such a job. ``None`` for other plugins."""
    if plugin == "SLURMGraph":
        comment = f"brain-ldm-bids:{secrets.token_hex(8)}"
        locks.record_submission(comment=comment, plugin=plugin, work_dir=work)
        return comment
    if plugin.endswith("Graph"):
        log.info("note: the %s jobs will outlive this command and its participant locks; do "
                 "not start another run on these participants until they have finished", plugin)
    return None


def _jobs_queued(comment: str) -> bool:
    from ..derivatives import queued_jobs

    jobs = queued_jobs(comment)
    return isinstance(jobs, list) and bool(jobs)


def _run_workflow(args, requests, table, identity, output_dir: Path, work: Path,
                  plugin: str, plugin_args: dict[str, Any]) -> dict[str, str] | None:
    """Build and run the workflow; returns ``{stem: reason}`` of the images that failed, or
    ``None`` when a graph plugin (SLURMGraph, ...) has submitted the jobs without waiting."""
    from ..derivatives import assess
    from ..workflows.bids import ImageByImageLinearPlugin, init_brain_ldm_bids_wf

    conditioning_files = _write_conditioning_files(table, work / "conditioning", requests)
    workflow = init_brain_ldm_bids_wf(
        requests=requests, conditioning_files=conditioning_files, output_dir=output_dir,
        revision=args.revision, mem_gb=_node_mem_gb(identity.image_shape),
    )
    workflow.base_dir = str(work)
    workflow.config["execution"].update({
        "crashdump_dir": str(work / "crash"),
        "crashfile_format": "txt",
        "stop_on_first_crash": False,
        "poll_sleep_duration": 0.2,
    })
    progress = Progress(requests)
    arguments = dict(plugin_args)
    if not plugin.endswith("Graph"):  # graph plugins submit everything at once, no callbacks
        arguments["status_callback"] = progress
    runner: Any = plugin
    if plugin == "Linear":  # publish each image as soon as it is sampled
        runner = ImageByImageLinearPlugin(plugin_args=arguments)
    error: Exception | None = None
    try:
        with _quiet_worker_logging(work, args.verbose):
            workflow.run(plugin=runner, plugin_args=arguments)
    except Exception as exc:  # node failures are reported per image below
        error = exc
    if plugin.endswith("Graph"):
        if error is not None:
            raise _FailedImages(f"the {plugin} plugin could not submit the jobs: "
                                f"{_one_line(error)}")
        return None
    failures = {}
    for request in requests:
        if assess(request, output_dir).action != "complete":
            failures[request.stem] = progress.failures.get(request.stem) or (
                f"not run: {_one_line(error)}" if error else "not written (unknown reason)")
    if error is not None and not progress.failures and len(failures) == len(requests):
        raise _FailedImages(f"the {plugin} plugin could not run the workflow: {_one_line(error)}")
    return failures


def _print_summary(table, written: int, complete, refreshed, failures, requests) -> None:
    by_stem = {request.stem: request for request in requests}
    log.info("summary: %d images written, %d already complete, %d sidecars updated, "
             "%d failed; %d participants skipped", written, len(complete), len(refreshed),
             len(failures), len(table.skipped))
    for line in skip_summary(table):
        log.info("  %s", line)
    for stem, reason in failures.items():
        log.info("  failed %s: %s", by_stem[stem].title, reason)


def _demographics_config(args):
    """``--demographics-config`` (or the defaults) with the policy flags applied over it."""
    from dataclasses import replace

    from ..bids import BidsConfig
    from ..demographics import DemographicsError

    config = BidsConfig.from_json(args.demographics_config) if args.demographics_config \
        else BidsConfig()
    changes: dict[str, Any] = {}
    if args.out_of_range is not None:
        changes["out_of_range"] = args.out_of_range
    if args.missing_volumes is not None:
        changes["missing_volumes"] = args.missing_volumes
    if args.volume_defaults is not None:
        ventricular, brain = args.volume_defaults
        changes["defaults"] = {**config.policy.defaults, "ventricular_volume": ventricular,
                               "brain_volume": brain}
    if not changes:
        return config
    try:
        return replace(config, policy=replace(config.policy, **changes))
    except DemographicsError as exc:
        raise UsageError(f"{_one_line(exc)} (from the flags over --demographics-config)") from None


def _report_columns(table) -> None:
    """One line: which participants.tsv column each field comes from; one line per volume
    that takes a default (no column: everyone; empty cells: how many)."""
    from ..demographics import VOLUME_FIELDS

    used = ", ".join(f"{name} {column!r}" for name, column in table.columns.items() if column)
    log.info("%s columns: %s", table.tsv_path.name, used or "none")
    absent = [name for name in VOLUME_FIELDS if table.columns[name] is None]
    defaults = {name: table.policy.default_for(name) for name in VOLUME_FIELDS}
    if absent and all(defaults[name] for name in absent):
        values = " and ".join(f"{defaults[name][0]:g}" for name in absent)
        source = "the MONAI bundle's default" if all(
            defaults[name][1].startswith("MONAI") for name in absent) else "the set default"
        log.info("note: %s has no %s column: all participants get %s%s %s (recorded in "
                 "sidecars; --volume-defaults, --missing-volumes)", table.tsv_path.name,
                 " or ".join(absent), source, "s" if len(absent) > 1 else "", values)
    for name in VOLUME_FIELDS:
        if table.columns[name] is None or defaults[name] is None:
            continue
        count = sum(1 for p in table.usable if p.conditioning.record[name].get("defaulted"))
        if count:
            who = "1 participant has" if count == 1 else f"{count} participants have"
            log.info("note: %s no value in column %r: the %s default %g is used (recorded)",
                     who, table.columns[name], name, defaults[name][0])


_SKIP_GROUPS = {  # kind -> (who, what would include them); {lo}, {hi}: the age range
    "age_below": ("younger than {lo:g} y (training range {lo:g}–{hi:g} y)",
                  "--out-of-range clip samples them at the range edge (recorded)"),
    "age_above": ("older than {hi:g} y (training range {lo:g}–{hi:g} y)",
                  "--out-of-range clip samples them at the range edge (recorded)"),
    "volume_out_of_range": ("with a volume outside [0, 1] after normalisation",
                            "--out-of-range clip uses the range edge (recorded)"),
    "volume_mm3_no_range": ("with volumes in mm³ but no reference range",
                            "set *_range_mm3 in --demographics-config (an approximation)"),
    "volume_missing": ("without a volume value",
                       "--missing-volumes default uses the volume defaults (recorded)"),
    "volume_unparsed": ("whose volume is not a number", "correct participants.tsv"),
    "age_missing": ("without an age (n/a or empty)", "add it to participants.tsv"),
    "age_unparsed": ("whose age is not in years", "correct it (accepted: 63, 63.5, 35-40, 89+)"),
    "sex_missing": ("without a sex (n/a or empty)", "add it to participants.tsv"),
    "sex_unknown": ("with a sex code that means neither F nor M here ({codes})",
                    "describe it in participants.json Levels or map it in "
                    "--demographics-config sex_codes"),
    "sex_other": ("whose sex participants.json describes as neither female nor male",
                  "the model's sex value cannot express it"),
    "no_row": ("with a folder but no participants.tsv row", "add their rows"),
    "no_folder": ("with a participants.tsv row but no sub-<label>/ folder",
                  "check participant_id against the folders"),
    "shifted_row": ("whose row has more cells than the header", "correct those rows"),
    "other": ("for other reasons", "see the lines above"),
}


def skip_summary(table) -> list[str]:
    """The skipped participants of ``table`` grouped by reason, one line per group with the
    count and what would include them (the per-participant lines come earlier)."""
    groups: dict[str, list[Any]] = {}
    for participant in table.skipped:
        kind = participant.skip_kind if participant.skip_kind in _SKIP_GROUPS else "other"
        groups.setdefault(kind, []).append(participant)
    policy, lines = table.policy, []
    for kind, (who, fix) in _SKIP_GROUPS.items():
        members = groups.get(kind)
        if not members:
            continue
        codes = sorted({str(p.raw.get(table.columns["sex"] or "", "")).strip()
                        for p in members} - {""})
        shown = ", ".join(repr(code) for code in codes[:3]) + (", ..." if len(codes) > 3 else "")
        text = who.format(lo=policy.age_min_years, hi=policy.age_max_years, codes=shown)
        noun = "participant" if len(members) == 1 else "participants"
        lines.append(f"{len(members)} {noun} {text}: {fix}")
    clipped = sum(1 for p in table.usable
                  if any(entry.get("clipped") for entry in p.conditioning.record.values()))
    if clipped:
        lines.append(f"{clipped} participants sampled at a range edge (--out-of-range clip; "
                     "recorded as clipped in their sidecars)")
    return lines


def _remove_stale_images(output_dir: Path, table, n_samples: int, failures, requests) -> None:
    """Remove the synthetic images of this run's participants that the current --n-samples
    does not produce (e.g. sub-01_desc-synthetic_T1w after --n-samples 2), once all of the
    participant's requested images are complete; one line each."""
    from ..derivatives import remove_image, stale_synthetic_images

    failed = {request.label for request in requests if request.stem in (failures or {})}
    for participant in table.usable:
        if participant.label in failed:
            continue
        for image in stale_synthetic_images(output_dir, participant.label, n_samples):
            remove_image(image)
            log.info("removed %s and its sidecar: --n-samples %d does not make it",
                     image.relative_to(output_dir), n_samples)


def _remove_stale_transforms(output_dir: Path, table, failures, requests) -> None:
    """Remove the registration transforms of this run's participants that no image names
    any more (e.g. after switching to --t1w-space conform), once all of the participant's
    requested images are complete; one line each, as for stale images."""
    from ..derivatives import stale_transforms

    failed = {request.label for request in requests if request.stem in (failures or {})}
    for participant in table.usable:
        if participant.label in failed:
            continue
        for path in stale_transforms(output_dir, participant.label):
            path.unlink(missing_ok=True)
            log.info("removed %s: no image uses this transform any more",
                     path.relative_to(output_dir))


# --------------------------------------------------------------------------- group level


def run_group_level(args) -> int:
    from ..bids import normalise_participant_label
    from ..derivatives import OutputDirError, OutputLock, read_own_description
    from ..report import write_group_report

    output_dir = args.output_dir.expanduser().resolve()
    if not output_dir.is_dir():
        raise OutputDirError(
            f"output_dir {output_dir}: no such directory (run the participant level first)"
        )
    if read_own_description(output_dir) is None:
        raise OutputDirError(
            f"output_dir {output_dir} has no dataset_description.json, so it is not an output of "
            f"{PROG} (run the participant level first)"
        )
    labels = None
    if args.participant_label:
        labels = sorted({normalise_participant_label(label, what="--participant-label")
                         for label in args.participant_label})
    log.info("%s %s: group level; %s", PROG, __version__, output_dir)
    with OutputLock(output_dir):
        report = write_group_report(output_dir, labels=labels, progress=log.info)
    for problem in report.problems:
        log.info("note: %s", problem)
    log.info("summary: %d images of %d participants in %s and %s", report.n_images,
             report.n_participants, report.table.relative_to(output_dir),
             report.html.relative_to(output_dir))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
