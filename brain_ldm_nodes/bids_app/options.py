"""The command line's values, checked together and turned into what a run uses: the model,
the Nipype plugin, the compilation cache, the demographics configuration, edits and sweeps.
Problems raise :class:`~brain_ldm_nodes.bids_app.errors.UsageError` (exit status 2).
"""

from __future__ import annotations

import math
import os
from argparse import Namespace
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..imaging import MODEL_GRID_SHAPE
from .errors import UsageError, one_line
from .logs import log

if TYPE_CHECKING:  # pragma: no cover
    from ..demographics import DemographicsPolicy
    from ..weights.identity import ModelIdentity
    from .columns import BidsConfig

__all__ = [
    "available_plugins",
    "check_scheduler_args",
    "compilation_cache_dir",
    "demographics_config",
    "derivatives_key",
    "edits_and_sweeps",
    "hub_offline",
    "named_model",
    "node_mem_gb",
    "plugin_settings",
    "resolve_model",
]


def named_model(args: Namespace) -> tuple[str, str]:
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


def resolve_model(model: str, revision: str | None, named_by: str = "--model") -> ModelIdentity:
    """The model's identity (configs; weights files checked against their sha256 once, not
    loaded); errors name where the model came from."""
    from ..weights.identity import ModelIdentity
    from ..weights.bundle import BundleError, UnreadableBundleError, WeightsMismatchError

    try:
        return ModelIdentity.resolve(model, revision, local_files_only=hub_offline())
    except (WeightsMismatchError, UnreadableBundleError) as exc:  # once here, not per image
        raise BundleError(f"{named_by}: {one_line(exc)}") from exc
    except BundleError as exc:
        raise BundleError(
            f"{named_by}: {one_line(exc)} (accepted: a brain_ldm.1 bundle folder, e.g. from "
            "brain-ldm-convert, or a Hugging Face Hub repo id in the local cache)"
        ) from exc


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` is 1 unless the user set it: Hub models come from the local cache."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return os.environ["HF_HUB_OFFLINE"].strip().lower() in {"1", "on", "yes", "true"}


def compilation_cache_dir(args: Namespace) -> Path | None:
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


def plugin_settings(args: Namespace) -> tuple[str, dict[str, Any]]:
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


def node_mem_gb(image_shape: Sequence[int], full_size_gb: float) -> float:
    """Memory (GB) one model node needs on ``image_shape``: its measured full-grid figure
    ``full_size_gb`` (``workflows._common.SAMPLE_MEM_GB`` or ``FULL_SIZE_MEM_GB``) scaled
    by the grid's size."""
    scale = math.prod(image_shape) / math.prod(MODEL_GRID_SHAPE)
    return round(max(0.25, full_size_gb * scale), 2)


def demographics_config(args: Namespace) -> BidsConfig:
    """``--demographics-config`` (or the defaults) with the policy flags applied over it."""
    from dataclasses import replace

    from .columns import BidsConfig
    from ..conditioning import DemographicsError

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
        raise UsageError(f"{one_line(exc)} (from the flags over --demographics-config)") from None


def edits_and_sweeps(
    args: Namespace, policy: DemographicsPolicy | None
) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """``--counterfactual`` edits and ``--sweep`` sweeps, checked together and against the
    demographics policy (absolute values outside [0, 1] under out_of_range 'error')."""
    from ..conditioning import Conditioning
    from ..demographics import DemographicsPolicy
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


def check_scheduler_args(args: Namespace, num_train_timesteps: int) -> None:
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


def derivatives_key(description: dict[str, Any]) -> str:
    """The ``DatasetLinks`` key of a ``--t1w-derivatives`` folder: its first ``GeneratedBy``
    name in lower case letters and digits (``fmriprep``), else ``derivatives``."""
    import re

    generators = [g for g in description.get("GeneratedBy") or [] if isinstance(g, dict)]
    first = str(generators[0].get("Name", "")) if generators else ""
    name = re.sub(r"[^0-9a-z]", "", first.lower())
    return name if name and name != "raw" else "derivatives"
