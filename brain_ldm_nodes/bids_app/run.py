"""The BIDS App's two levels: the participant level (read the dataset, plan the images,
check what is done, build and run the workflow that makes the rest) and the group level.
"""

from __future__ import annotations

import json
import os
from argparse import Namespace
import secrets
import shutil
from collections.abc import Mapping, Sequence
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._version import __version__
from ..provenance import conditioning_document, write_conditioning
from ..scheduler_names import SCHEDULER_TITLES
from ..weights.identity import ModelIdentity
from .description import (
    check_raw_link,
    dataset_description,
    raw_dataset_link,
    read_own_description,
    write_dataset_files,
)
from .errors import BidsDatasetError, FailedImages, OutputDirError, UsageError, one_line
from .locks import OutputLock, ParticipantLocks, queued_jobs
from .logs import log, quiet_worker_logging
from .naming import GENERATED_BY
from .options import (
    check_scheduler_args,
    compilation_cache_dir,
    demographics_config,
    derivatives_key,
    edits_and_sweeps,
    named_model,
    node_mem_gb,
    plugin_settings,
    resolve_model,
)
from .output_dir import (
    check_creatable,
    check_locations,
    default_work_dir,
    prepare_output_dir,
    remove_image,
    remove_stale_temporaries,
    remove_stale_top_level_temporaries,
    stale_synthetic_images,
    stale_transforms,
)
from .plan import plan_counterfactuals, plan_images, plan_sweeps
from .progress import Progress, print_summary, report_columns, skip_summary
from .resume import assess, refresh_sidecar

if TYPE_CHECKING:  # pragma: no cover
    from .columns import BidsConfig
    from .participants import ParticipantsTable

#: The App's name in its lines (``brain-ldm-bids``).
PROG = GENERATED_BY

__all__ = [
    "PROG",
    "run_group_level",
    "run_participant_level",
]


def run_participant_level(args: Namespace) -> int:
    """The participant level: check the folders and options, read the dataset, resolve the
    model, then, holding the participants' locks, update the dataset files, plan the images,
    check which are done and make the rest. Returns the exit status (0); known problems raise
    (:mod:`.errors`)."""
    from ..compilation_cache import use_compilation_cache

    output_dir, work_dir = _checked_folders(args)
    model, named_by = named_model(args)
    if named_by == "BRAIN_LDM_MODEL" and args.revision is None:  # e.g. a container's model
        args.revision = os.environ.get("BRAIN_LDM_MODEL_REVISION", "").strip() or None
    plugin, plugin_args = plugin_settings(args)
    compilation_cache = compilation_cache_dir(args)
    log.info("%s %s: participant level; %s -> %s", PROG, __version__, args.bids_dir, output_dir)

    config = demographics_config(args)
    edits, sweeps = edits_and_sweeps(args, config.policy)
    derivatives_description = _t1w_derivatives(args)
    layout, table = _read_dataset(args, config)
    identity = _model_identity(args, model, named_by)

    output_dir = prepare_output_dir(output_dir)
    labels = [participant.label for participant in table.usable]
    # Runs on other participants (e.g. SLURM array tasks) may work in output_dir meanwhile.
    with ParticipantLocks(output_dir, labels) as locks:
        with locks.dataset_files():
            stale = _update_dataset_files(args, layout, output_dir, derivatives_description)
        for path in [*stale, *remove_stale_temporaries(output_dir, labels)]:
            log.info("removed %s (left by an interrupted run)", path.relative_to(output_dir))
        requests, notes = _plan(args, table, layout, identity, edits, sweeps)
        for note in notes:
            log.info("note: %s", note)
        if not requests:
            raise BidsDatasetError("no image to make: every requested image was left out "
                                   "(each one's reason is printed above)")
        to_make, refreshed, complete = _assess_all(requests, output_dir)
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
        print_summary(table, len(to_make) - len(failures), complete, refreshed, failures,
                      to_make)
        if failures:
            raise FailedImages(f"{len(failures)} of {len(to_make)} images failed (reasons above; "
                               f"crash files in {work / 'crash'})")
        if work_dir is None and work.exists():
            shutil.rmtree(work, ignore_errors=True)
            with suppress(OSError):  # the shared parent, once no other run uses it
                work.parent.rmdir()
    return 0


def _checked_folders(args: Namespace) -> tuple[Path, Path | None]:
    """``output_dir`` and ``-w`` (absolute), refused before anything is read or loaded if they
    would write into the raw dataset, cannot be created, or hold another dataset."""
    output_dir = args.output_dir.expanduser().resolve()
    work_dir = args.work_dir.expanduser().resolve() if args.work_dir else None
    check_locations(args.bids_dir, output_dir, work_dir)
    check_creatable(output_dir)  # before the model is loaded: locations first
    read_own_description(output_dir)  # refuse another dataset before reading anything
    if work_dir is not None and output_dir in work_dir.parents:
        hidden = work_dir.relative_to(output_dir).parts[0].startswith(".")
        if not hidden:
            log.info("note: -w %s is inside output_dir; the BIDS validator will report it "
                     "unless its name starts with '.' or it is listed in .bidsignore", work_dir)
    return output_dir, work_dir


def _t1w_derivatives(args: Namespace) -> dict[str, Any] | None:
    """``--t1w-derivatives``' own description (None without it); sets ``args.t1w_derivatives``
    absolute and ``args.t1w_derivatives_key``, its ``DatasetLinks`` key."""
    if args.t1w_derivatives is None:
        return None
    from .dataset import read_derivatives_description

    args.t1w_derivatives = args.t1w_derivatives.expanduser().resolve()
    description = read_derivatives_description(args.t1w_derivatives, "--t1w-derivatives")
    args.t1w_derivatives_key = derivatives_key(description)
    log.info("real T1w from %s (%s; sources named bids:%s:...)", args.t1w_derivatives,
             description.get("Name", "no Name"), args.t1w_derivatives_key)
    return description


def _read_dataset(args: Namespace, config: BidsConfig) -> tuple[Any, ParticipantsTable]:
    """The pybids layout and the participants table; one line per problem and skipped
    participant; :class:`BidsDatasetError` when no selected participant can be used."""
    from .dataset import load_layout
    from .participants import read_participants

    layout = load_layout(args.bids_dir, validate=not args.skip_bids_validation)
    table = read_participants(
        args.bids_dir, config, participant_labels=args.participant_label, layout=layout
    )
    for problem in table.problems:
        log.info("note: %s", problem)
    report_columns(table)
    for participant in table.skipped:  # one line each, naming the row and the reason
        log.info("skipped sub-%s: %s", participant.label, participant.skip_reason)
    if not table.usable:
        for line in skip_summary(table):
            log.info("  %s", line)
        raise BidsDatasetError(
            f"{table.tsv_path}: none of the {len(table)} selected participants can be used "
            "(reasons above, grouped with the flags that would include them)"
        )
    return layout, table


def _model_identity(args: Namespace, model: str, named_by: str) -> ModelIdentity:
    """The model's identity (:func:`.options.resolve_model`), checked against the steps and
    sampler asked for, and named in one line."""
    identity = resolve_model(model, args.revision, named_by)
    if args.num_inference_steps > identity.num_train_timesteps:
        raise UsageError(
            f"--num-inference-steps {args.num_inference_steps}: the model was trained with "
            f"{identity.num_train_timesteps} timesteps "
            f"(accepted: 1 to {identity.num_train_timesteps})"
        )
    check_scheduler_args(args, identity.num_train_timesteps)
    if args.revision and Path(identity.model).is_dir():
        log.info("note: --revision is ignored for a bundle folder (%s)", identity.model)
    log.info("model %s: weights sha256 %s, grid %s; %d %s steps, base seed %d",
             identity.model, identity.unet_sha256[:12], "x".join(map(str, identity.image_shape)),
             args.num_inference_steps, SCHEDULER_TITLES[args.scheduler], args.seed)
    return identity


def _update_dataset_files(
    args: Namespace, layout: Any, output_dir: Path, derivatives_description: dict[str, Any] | None
) -> list[Path]:
    """Write ``dataset_description.json`` (with the ``DatasetLinks`` counterfactual sources
    need, refused if they would re-point existing ones), README and ``.bidsignore`` (call it
    under :meth:`ParticipantLocks.dataset_files`); returns the stale top-level temporaries it
    removed."""
    existing = read_own_description(output_dir)
    stale = remove_stale_top_level_temporaries(output_dir)
    source = _source_description(layout)
    link = (raw_dataset_link(source, args.bids_dir, output_dir)
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
    return stale


def _assess_all(
    requests: Sequence[Any], output_dir: Path
) -> tuple[list[Any], list[Any], list[Any]]:
    """``(to_make, refreshed, complete)``: each request :func:`.resume.assess`-ed, sidecars
    that only describe differently rewritten; one line per image redone or refreshed."""
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
    return to_make, refreshed, complete


def _source_description(layout: Any) -> dict[str, Any]:
    try:
        description = layout.get_dataset_description()
    except Exception:  # missing or broken and --skip-bids-validation: nothing to cite
        return {}
    return dict(description) if isinstance(description, dict) else {}


def _write_conditioning_files(
    table: ParticipantsTable, folder: Path, requests: Sequence[Any]
) -> dict[str, Path]:
    """One conditioning JSON per key of the requests' ``conditionings()`` (a participant's
    own: ``sub-<label>``; a sweep point or counterfactual target: its image's stem),
    rewritten only if it changed (so Nipype's hashes, and its cache in a kept work folder,
    stay valid)."""
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


def _plan(
    args: Namespace, table: ParticipantsTable, layout: Any, identity: ModelIdentity,
    edits: Sequence[Any], sweeps: Sequence[Any],
) -> tuple[list[Any], list[str]]:
    """The images this run should have: synthetic (and synthetic sweeps), or counterfactuals
    of every real T1w (and counterfactual sweeps); with notes on what is left out."""
    from .dataset import find_t1w_images

    steps = args.num_inference_steps
    output_spaces = tuple(dict.fromkeys(args.output_space))  # given order, once each
    if args.counterfactual is not None and args.t1w_derivatives is not None:
        from .dataset import find_preprocessed_t1w

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


def _graph_submission(locks: ParticipantLocks, plugin: str, work: Path) -> str | None:
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
    jobs = queued_jobs(comment)
    return isinstance(jobs, list) and bool(jobs)


def _run_workflow(args: Namespace, requests: Sequence[Any], table: ParticipantsTable,
                  identity: ModelIdentity, output_dir: Path, work: Path,
                  plugin: str, plugin_args: dict[str, Any]) -> dict[str, str] | None:
    """Build and run the workflow; returns ``{stem: reason}`` of the images that failed, or
    ``None`` when a graph plugin (SLURMGraph, ...) has submitted the jobs without waiting."""
    from ..workflows._common import FULL_SIZE_MEM_GB, SAMPLE_MEM_GB
    from .workflow import ImageByImageLinearPlugin, init_brain_ldm_bids_wf

    conditioning_files = _write_conditioning_files(table, work / "conditioning", requests)
    workflow = init_brain_ldm_bids_wf(
        requests=requests, conditioning_files=conditioning_files, output_dir=output_dir,
        revision=args.revision, mem_gb=node_mem_gb(identity.image_shape, SAMPLE_MEM_GB),
        counterfactual_mem_gb=node_mem_gb(identity.image_shape, FULL_SIZE_MEM_GB),
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
        with quiet_worker_logging(work, args.verbose):
            workflow.run(plugin=runner, plugin_args=arguments)
    except Exception as exc:  # node failures are reported per image below
        error = exc
    if plugin.endswith("Graph"):
        if error is not None:
            raise FailedImages(f"the {plugin} plugin could not submit the jobs: "
                               f"{one_line(error)}")
        return None
    failures = {}
    for request in requests:
        if assess(request, output_dir).action != "complete":
            failures[request.stem] = progress.failures.get(request.stem) or (
                f"not run: {one_line(error)}" if error else "not written (unknown reason)")
    if error is not None and not progress.failures and len(failures) == len(requests):
        raise FailedImages(f"the {plugin} plugin could not run the workflow: {one_line(error)}")
    return failures


def _remove_stale_images(output_dir: Path, table: ParticipantsTable, n_samples: int,
                         failures: Mapping[str, str], requests: Sequence[Any]) -> None:
    """Remove the synthetic images of this run's participants that the current --n-samples
    does not produce (e.g. sub-01_desc-synthetic_T1w after --n-samples 2), once all of the
    participant's requested images are complete; one line each."""
    failed = {request.label for request in requests if request.stem in (failures or {})}
    for participant in table.usable:
        if participant.label in failed:
            continue
        for image in stale_synthetic_images(output_dir, participant.label, n_samples):
            remove_image(image)
            log.info("removed %s and its sidecar: --n-samples %d does not make it",
                     image.relative_to(output_dir), n_samples)


def _remove_stale_transforms(output_dir: Path, table: ParticipantsTable,
                             failures: Mapping[str, str], requests: Sequence[Any]) -> None:
    """Remove the registration transforms of this run's participants that no image names
    any more (e.g. after switching to --t1w-space conform), once all of the participant's
    requested images are complete; one line each, as for stale images."""
    failed = {request.label for request in requests if request.stem in (failures or {})}
    for participant in table.usable:
        if participant.label in failed:
            continue
        for path in stale_transforms(output_dir, participant.label):
            path.unlink(missing_ok=True)
            log.info("removed %s: no image uses this transform any more",
                     path.relative_to(output_dir))


def run_group_level(args: Namespace) -> int:
    """The group level: the table and report of every image (:mod:`.report`), holding
    ``output_dir``'s lock alone."""
    from .dataset import normalise_participant_label
    from .report import write_group_report

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
