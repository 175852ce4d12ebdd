"""Planning: every image a run should have, as requests (:mod:`.requests`), with one-line notes
on what is left out (participants without a T1w, edits or sweep values out of range).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..hashing import sha256_of
from .requests import CounterfactualRequest, ImageRequest, SweepPoint

if TYPE_CHECKING:  # pragma: no cover - typing only; keeps pybids out of this module's imports
    from ..conditioning import Conditioning
    from ..edits import EditValue, Sweep
    from ..weights.identity import ModelIdentity
    from .participants import Participant, ParticipantsTable

__all__ = [
    "plan_counterfactuals",
    "plan_images",
    "plan_sweeps",
    "resolve_points",
]


def plan_images(
    table: ParticipantsTable,
    *,
    n_samples: int,
    base_seed: int,
    num_inference_steps: int,
    model: ModelIdentity,
    scheduler: str = "ddim",
) -> list[ImageRequest]:
    """Every image of every usable participant of ``table``, in label then sample order,
    sampled by ``scheduler``."""
    if n_samples < 1:
        raise ValueError(f"n_samples must be ≥ 1, got {n_samples}")
    policy = table.policy.to_dict()
    return [
        ImageRequest(
            participant=participant,
            index=index,
            n_samples=n_samples,
            base_seed=base_seed,
            num_inference_steps=num_inference_steps,
            model=model,
            columns=dict(table.columns),
            policy=policy,
            tsv_name=table.tsv_path.name,
            scheduler=scheduler,
        )
        for participant in table.usable
        for index in range(n_samples)
    ]


def resolve_points(
    participant: Participant, sweeps: Sequence[Sweep], policy: Any, notes: list[str], what: str
) -> list[SweepPoint]:
    """Every sweep value applied to ``participant``'s conditioning; values that cannot be
    (out of range under the policy) are left out with a note."""
    from ..edits import EditError, apply_edits

    points = []
    for sweep in sweeps:
        for index, value in enumerate(sweep.values):
            try:
                conditioning = apply_edits(participant.conditioning, [value], policy, how="sweep")
            except EditError as exc:
                notes.append(f"{what} of sub-{participant.label}: --sweep {sweep.text}: value "
                             f"{value.text} left out: {exc}")
                continue
            points.append(SweepPoint(sweep, index, conditioning))
    return points


def plan_sweeps(
    table: ParticipantsTable,
    sweeps: Sequence[Sweep],
    *,
    base_seed: int,
    num_inference_steps: int,
    model: ModelIdentity,
    scheduler: str = "ddim",
) -> tuple[list[ImageRequest], list[str]]:
    """Synthetic sweep images of every usable participant (all from the seed of its image 0),
    sampled by ``scheduler``, and one-line notes on values left out."""
    policy = table.policy.to_dict()
    requests, notes = [], []
    for participant in table.usable:
        for point in resolve_points(participant, sweeps, table.policy, notes, "sweep"):
            requests.append(ImageRequest(
                participant=participant, index=0, n_samples=1, base_seed=base_seed,
                num_inference_steps=num_inference_steps, model=model,
                columns=dict(table.columns), policy=policy, tsv_name=table.tsv_path.name,
                sweep=point, scheduler=scheduler,
            ))
    return requests, notes


def plan_counterfactuals(
    table: ParticipantsTable,
    sources: Mapping[str, Sequence[Path]],
    *,
    bids_dir: Path,
    edits: Sequence[EditValue],
    sweeps: Sequence[Sweep],
    num_inference_steps: int,
    model: ModelIdentity,
    t1w_space: str = "native",
    output_spaces: Sequence[str] = ("model",),
    source_dataset: str = "raw",
    source_spaces: Mapping[Path, tuple[str, str | None]] | None = None,
) -> tuple[list[CounterfactualRequest], list[str]]:
    """Counterfactuals of every real T1w of every usable participant: one per source with
    ``edits`` (if any), and one per value of each sweep, each in every ``output_spaces``
    (``"model"``, ``"source"``); with one-line notes on what is left out (participants
    without a T1w, edits out of range under the policy).

    ``sources`` maps a participant label to its T1w images (absolute paths under
    ``bids_dir``), e.g. from :func:`brain_ldm_nodes.bids_app.dataset.find_t1w_images`, or under a
    derivatives folder (``source_dataset`` its ``DatasetLinks`` key, ``bids_dir`` its root,
    ``source_spaces`` image -> ``(t1w_space, space label)``, e.g. from
    :func:`brain_ldm_nodes.bids_app.dataset.find_preprocessed_t1w`).
    """
    import nibabel as nib

    from ..annex import bids_path, not_retrieved, retrieve_hint
    from ..edits import EditError, apply_edits

    policy = table.policy.to_dict()
    root = Path(bids_dir).resolve()
    requests: list[CounterfactualRequest] = []
    notes: list[str] = []
    for participant in table.usable:
        images = sources.get(participant.label) or ()
        if not images:
            pattern = "*_T1w" if source_dataset == "raw" else "*_desc-preproc_T1w, usable"
            notes.append(f"sub-{participant.label}: no T1w image (anat/{pattern}.nii[.gz]) "
                         f"in {root}; no counterfactual for it")
            continue
        targets: list[tuple[Conditioning, tuple[EditValue, ...], SweepPoint | None]] = []
        if edits:
            try:
                targets.append((apply_edits(participant.conditioning, edits, table.policy),
                                tuple(edits), None))
            except EditError as exc:
                notes.append(f"counterfactual of sub-{participant.label}: --counterfactual "
                             f"{' '.join(e.spec for e in edits)} left out: {exc}")
        for point in resolve_points(participant, sweeps, table.policy, notes, "counterfactual"):
            targets.append((point.conditioning, (), point))
        for image in images:
            path = bids_path(image)  # an annexed file is a link: keep its BIDS name
            relative = path.relative_to(root).as_posix()
            if not_retrieved(path):
                notes.append(f"sub-{participant.label}: no counterfactual of "
                             f"{retrieve_hint(path)}")
                continue
            try:
                digest = sha256_of(path)
            except OSError as exc:
                notes.append(f"{relative}: cannot read it ({exc.strerror or exc}); no "
                             "counterfactual of it (existing ones are left as they are)")
                continue
            space, label = (source_spaces or {}).get(image, (t1w_space, None))
            shape = None
            if "source" in output_spaces:
                try:
                    shape = tuple(int(n) for n in nib.load(path).shape[:3])
                except Exception as exc:  # nibabel raises several types for damaged files
                    notes.append(f"{relative}: not a readable NIfTI image ({type(exc).__name__})"
                                 "; no counterfactual of it")
                    continue
            for target, edit, point in targets:
                for output_space in output_spaces:
                    requests.append(CounterfactualRequest(
                        participant=participant, source=path, source_relative=relative,
                        source_sha256=digest, target=target,
                        num_inference_steps=num_inference_steps, model=model,
                        columns=dict(table.columns), policy=policy,
                        tsv_name=table.tsv_path.name, edits=edit, sweep=point, t1w_space=space,
                        source_dataset=source_dataset, source_space=label,
                        output_space=output_space, source_shape=shape,
                    ))
    return requests, notes
