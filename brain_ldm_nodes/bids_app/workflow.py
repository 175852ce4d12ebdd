"""The BIDS App's Nipype workflow: per requested image a publishing node, fed by a sampling node
(synthetic images and sweeps) or by one counterfactual node per real T1w (its counterfactuals
and counterfactual sweep share one DDIM inversion)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import networkx as nx
from nipype.pipeline import engine as pe
from nipype.pipeline.plugins import LinearPlugin

from ..interfaces import (
    CounterfactualSeriesT1w,
    PublishDerivative,
    PublishFile,
    ResampleToSource,
    SampleT1w,
)
from ..registration import TEMPLATE_NAME
from ..workflows._common import FULL_SIZE_MEM_GB, SAMPLE_MEM_GB
from .requests import CounterfactualRequest, ImageRequest


def init_brain_ldm_bids_wf(
    *,
    requests: Sequence[ImageRequest | CounterfactualRequest],
    name: str = "brain_ldm_bids_wf",
    **subject: Any,
) -> pe.Workflow:
    """Sample the images of ``requests`` and publish them into ``output_dir``.

    Workflow graph (one sub-workflow per participant, :func:`init_single_subject_wf`)::

        single_subject_<label>_wf:  sample_t1w_<n> → ds_t1w_<n>    for each requested image n
                                    sample_<stem> → ds_<stem>      for each synthetic sweep image
                                    counterfactual_<source> → ds_<stem>   for each real T1w

    The model is each request's ``model.model`` (a bundle folder or Hub repo id), loaded once
    per process by the model cache. Nothing flows in or out: the publishing nodes write the
    derivatives themselves (atomically, sidecar last), so this workflow has no
    inputnode/outputnode.

    Parameters
    ----------
    requests
        The images to make (:func:`brain_ldm_nodes.bids_app.plan.plan_images`, usually only
        those :func:`~brain_ldm_nodes.bids_app.resume.assess` found missing or outdated), of
        any participants.
    name
        Workflow name.
    subject
        ``conditioning_files``, ``output_dir`` and optionally ``revision``, ``mem_gb`` and
        ``counterfactual_mem_gb``: passed to :func:`init_single_subject_wf` for each participant.
    """
    if not requests:
        raise ValueError("no images requested: there is nothing to build a workflow for")
    workflow = pe.Workflow(name=name)
    by_label: dict[str, list[ImageRequest | CounterfactualRequest]] = {}
    for request in requests:  # in the order given, whatever the kinds' interleaving
        by_label.setdefault(request.label, []).append(request)
    for label, group in by_label.items():
        subject_wf = init_single_subject_wf(
            requests=group, name=f"single_subject_{label}_wf", **subject
        )
        workflow.add_nodes([subject_wf])
    return workflow


def init_single_subject_wf(
    *,
    requests: Sequence[ImageRequest | CounterfactualRequest],
    conditioning_files: Mapping[str, str | os.PathLike[str]],
    output_dir: str | os.PathLike[str],
    revision: str | None = None,
    mem_gb: float = SAMPLE_MEM_GB,
    counterfactual_mem_gb: float = FULL_SIZE_MEM_GB,
    name: str = "single_subject_wf",
) -> pe.Workflow:
    """The images of one participant: ``sample_t1w_<n>`` (:class:`SampleT1w`) then
    ``ds_t1w_<n>`` (:class:`PublishDerivative`) for each request, ``n`` = sample index + 1.

    The sampler writes ``<stem>.nii.gz`` + ``<stem>.json`` in its node folder (``stem`` the
    image's BIDS name, e.g. ``sub-01_run-2_desc-synthetic_T1w``); the publisher copies them to
    ``output_dir/sub-<label>/anat/`` and adds the request's BIDS metadata
    (:meth:`ImageRequest.extra_metadata`).
    Publishers always run (``overwrite=True``): the
    decision to (re)write an image is taken before the workflow is built.

    Synthetic sweep images get ``sample_<stem>`` / ``ds_<stem>`` nodes (``stem`` with ``-``
    as ``_``). Counterfactual requests of one real T1w share one
    ``counterfactual_<source entities>`` node (:class:`CounterfactualSeriesT1w`: one
    inversion, one forward pass per image), each image with its own ``ds_<stem>``; the
    sidecar's ``Sources`` becomes the ``bids:raw:`` URI of the source. With the requests'
    ``t1w_space`` ``"native"`` (register to MNI152) or ``"MNI"`` (a source without
    ``space-``), ``ds_xfm_<source entities>`` publishes the transform as ``<output
    entities>_from-T1w_to-MNI152NLin2009aSym_mode-image_xfm.txt`` beside the images, and their
    sidecars name it (``RegistrationTransform``); a ``space-MNI152*`` source (fMRIPrep) has
    none to publish (identity). A request with ``output_space="source"`` gets
    ``to_source_<stem>`` (:class:`ResampleToSource`) between the series node and its
    publisher; the series node makes each model-grid image once.

    Parameters
    ----------
    requests
        The images of one participant.
    conditioning_files
        Conditioning key -> conditioning JSON
        (:func:`brain_ldm_nodes.provenance.write_conditioning`): every key of every request's
        ``conditionings()``.
    output_dir
        The derivative dataset's root (absolute).
    revision
        Hub revision of the model (ignored for bundle folders).
    mem_gb
        Memory one sampling node needs (GB), for MultiProc's and SLURM's scheduling.
    counterfactual_mem_gb
        Memory one counterfactual node (encode, invert, sample, decode) needs (GB).
    name
        Workflow name.
    """
    workflow = pe.Workflow(name=name)
    labels = {request.label for request in requests}
    if len(labels) != 1:
        raise ValueError(f"requests of one participant expected, got {sorted(labels)}")
    root = Path(output_dir)
    series: dict[str, list[CounterfactualRequest]] = {}
    for request in requests:
        if isinstance(request, CounterfactualRequest):
            series.setdefault(request.source_group, []).append(request)
            continue
        number = request.index + 1 if request.sweep is None else _node_name(request.stem)
        sample = pe.Node(
            SampleT1w(
                conditioning_file=str(conditioning_files[request.conditioning_key]),
                seed=request.seed,
                num_inference_steps=request.num_inference_steps,
                scheduler=request.scheduler,
                model=request.model.model,
                model_checksum=request.model.checksum,
                out_prefix=request.stem,
            ),
            name=f"sample_t1w_{number}" if request.sweep is None else f"sample_{number}",
            mem_gb=mem_gb,
        )
        if revision is not None:
            sample.inputs.revision = revision
        publish = pe.Node(
            PublishDerivative(
                out_file=str(root / request.relative_path),
                metadata=request.extra_metadata(),
            ),
            name=f"ds_t1w_{number}" if request.sweep is None else f"ds_{number}",
            overwrite=True,
            # A file copy in the main process. No processor or memory claimed, so MultiProc
            # publishes each image when it is sampled, not after every sampler has run.
            run_without_submitting=True,
            n_procs=0,
            mem_gb=0.0,
        )
        # fmt: off
        workflow.connect([
            (sample, publish, [("out_file", "in_file"),
                               ("out_sidecar", "in_sidecar")]),
        ])
        # fmt: on
    for source_group, members in series.items():
        first = members[0]
        grid_stems = list(dict.fromkeys(r.grid_stem for r in members))  # each image once
        counterfactual = pe.Node(
            CounterfactualSeriesT1w(
                in_file=str(first.source),
                conditioning_from_file=str(
                    conditioning_files[first.participant.participant_id]),
                conditioning_to_files=[str(conditioning_files[stem]) for stem in grid_stems],
                num_inference_steps=first.num_inference_steps,
                model=first.model.model,
                model_checksum=first.model.checksum,
                out_prefixes=grid_stems,
                t1w_space=first.t1w_space,
            ),
            name=f"counterfactual_{_node_name(source_group)}",
            mem_gb=counterfactual_mem_gb,
        )
        if revision is not None:
            counterfactual.inputs.revision = revision
        transform = None
        if first.t1w_space in ("native", "MNI") and first.source_space is None:
            # <output entities>_from-T1w_to-<template>_mode-image_xfm.txt beside the images.
            transform = (Path(first.source_relative).parent
                         / f"{first.entities('model')}_from-T1w_to-{TEMPLATE_NAME}"
                           "_mode-image_xfm.txt")
            publish_xfm = pe.Node(
                PublishFile(out_file=str(root / transform)),
                name=f"ds_xfm_{_node_name(source_group)}",
                overwrite=True, run_without_submitting=True, n_procs=0, mem_gb=0.0,
            )
            workflow.connect([(counterfactual, publish_xfm, [("out_transform", "in_file")])])
        for request in members:
            index = grid_stems.index(request.grid_stem)
            publish = pe.Node(
                PublishDerivative(
                    out_file=str(root / request.relative_path),
                    metadata={
                        **request.extra_metadata(),
                        **({} if transform is None else
                           {"RegistrationTransform": f"bids::{transform.as_posix()}"}),
                    },
                ),
                name=f"ds_{_node_name(request.stem)}",
                overwrite=True,
                run_without_submitting=True,
                n_procs=0,
                mem_gb=0.0,
            )
            workflow.connect([(counterfactual, publish,
                               [(("out_sidecars", _pick, index), "in_sidecar")])])
            if request.output_space == "source":
                to_source = pe.Node(
                    ResampleToSource(source_file=str(first.source), out_prefix=request.stem),
                    name=f"to_source_{_node_name(request.stem)}",
                )
                # fmt: off
                workflow.connect([
                    (counterfactual, to_source, [(("out_files", _pick, index), "in_file"),
                                                 ("out_transform", "transform")]),
                    (to_source, publish, [("out_file", "in_file")]),
                ])
                # fmt: on
            else:
                workflow.connect([(counterfactual, publish,
                                   [(("out_files", _pick, index), "in_file")])])
    return workflow


def _pick(items, index):
    """``items[index]`` (a connection function: Nipype runs its source, so no globals)."""
    return items[index]


def _node_name(stem: str) -> str:
    """A Nipype node name from a BIDS stem (letters, digits and ``_``)."""
    return re.sub(r"\W", "_", stem)


class ImageByImageLinearPlugin(LinearPlugin):
    """Nipype's Linear plugin, run on one connected component of the graph at a time.

    Linear runs nodes in topological order, which here means every sampler before any
    publisher: nothing would reach ``output_dir`` until all images are sampled. Run
    component by component (one component = one image: sampler then publisher), each
    image is published as soon as it is sampled, so an interrupted run keeps what it made.
    A failing image does not stop the others; the first error is raised at the end, as
    Linear does.
    """

    def run(self, graph, config, updatehash=False):
        order = {node: position for position, node in enumerate(nx.topological_sort(graph))}
        components = sorted(
            nx.weakly_connected_components(graph), key=lambda nodes: min(order[n] for n in nodes)
        )
        errors = []
        for nodes in components:
            try:
                super().run(graph.subgraph(nodes).copy(), config, updatehash=updatehash)
            except Exception as exc:  # reported by the status callback and the crash file
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        if errors:
            raise RuntimeError(f"{len(errors)} images failed; re-raising the first") from errors[0]
