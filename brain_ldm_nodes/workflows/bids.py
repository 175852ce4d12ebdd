"""The BIDS App's workflow: one sampling node and one publishing node per requested image."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from itertools import groupby
from pathlib import Path

import networkx as nx
from nipype.pipeline import engine as pe
from nipype.pipeline.plugins import LinearPlugin

from ..derivatives import ImageRequest, software_versions_text
from ..interfaces import PublishDerivative, SampleT1w
from .synthesis import FULL_SIZE_MEM_GB


def init_brain_ldm_bids_wf(
    *,
    requests: Sequence[ImageRequest],
    conditioning_files: Mapping[str, str | os.PathLike[str]],
    output_dir: str | os.PathLike[str],
    revision: str | None = None,
    mem_gb: float = FULL_SIZE_MEM_GB,
    name: str = "brain_ldm_bids_wf",
) -> pe.Workflow:
    """Sample the images of ``requests`` and publish them into ``output_dir``.

    Workflow graph (one sub-workflow per participant)::

        single_subject_<label>_wf:  sample_t1w_<n> → ds_t1w_<n>    for each requested image n

    The model is each request's ``model.model`` (a bundle folder or Hub repo id), loaded once
    per process by the model cache. Nothing flows in or out: the publishing nodes write the
    derivatives themselves (atomically, sidecar last), so this workflow has no
    inputnode/outputnode.

    Parameters
    ----------
    requests
        The images to make (:func:`brain_ldm_nodes.derivatives.plan_images`, usually only
        those :func:`~brain_ldm_nodes.derivatives.assess` found missing or outdated).
    conditioning_files
        Participant label -> conditioning JSON
        (:func:`brain_ldm_nodes.provenance.write_conditioning`), the sampler's input.
    output_dir
        The derivative dataset's root (absolute).
    revision
        Hub revision of the model (ignored for bundle folders).
    mem_gb
        Memory one sampling node needs (GB), for MultiProc's scheduling.
    name
        Workflow name.
    """
    if not requests:
        raise ValueError("no images requested: there is nothing to build a workflow for")
    workflow = pe.Workflow(name=name)
    for label, group in groupby(requests, key=lambda request: request.label):
        subject_wf = init_single_subject_wf(
            requests=list(group),
            conditioning_file=conditioning_files[label],
            output_dir=output_dir,
            revision=revision,
            mem_gb=mem_gb,
            name=f"single_subject_{label}_wf",
        )
        workflow.add_nodes([subject_wf])
    return workflow


def init_single_subject_wf(
    *,
    requests: Sequence[ImageRequest],
    conditioning_file: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    revision: str | None = None,
    mem_gb: float = FULL_SIZE_MEM_GB,
    name: str = "single_subject_wf",
) -> pe.Workflow:
    """The images of one participant: ``sample_t1w_<n>`` (:class:`SampleT1w`) then
    ``ds_t1w_<n>`` (:class:`PublishDerivative`) for each request, ``n`` = sample index + 1.

    The sampler writes ``<stem>.nii.gz`` + ``<stem>.json`` in its node folder (``stem`` the
    image's BIDS name, e.g. ``sub-01_run-2_desc-synthetic_T1w``); the publisher copies them to
    ``output_dir/sub-<label>/anat/`` and adds the request's BIDS metadata
    (:meth:`ImageRequest.extra_metadata`; ``SoftwareVersions`` as the string BIDS requires).
    Publishers always run (``overwrite=True``): the
    decision to (re)write an image is taken before the workflow is built.
    """
    workflow = pe.Workflow(name=name)
    labels = {request.label for request in requests}
    if len(labels) != 1:
        raise ValueError(f"requests of one participant expected, got {sorted(labels)}")
    root = Path(output_dir)
    versions = software_versions_text()
    for request in requests:
        number = request.index + 1
        sample = pe.Node(
            SampleT1w(
                conditioning_file=str(conditioning_file),
                seed=request.seed,
                num_inference_steps=request.num_inference_steps,
                model=request.model.model,
                out_prefix=request.stem,
            ),
            name=f"sample_t1w_{number}",
            mem_gb=mem_gb,
        )
        if revision is not None:
            sample.inputs.revision = revision
        publish = pe.Node(
            PublishDerivative(
                out_file=str(root / request.relative_path),
                metadata={**request.extra_metadata(), "SoftwareVersions": versions},
            ),
            name=f"ds_t1w_{number}",
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
    return workflow


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
