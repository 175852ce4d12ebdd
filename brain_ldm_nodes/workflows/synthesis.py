"""Demographics → synthetic T1w."""

from __future__ import annotations

from collections.abc import Sequence

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from ..interfaces import NormaliseDemographics, SampleT1w
from ._common import FULL_SIZE_MEM_GB, SAMPLE_MEM_GB, model_node

__all__ = ["FULL_SIZE_MEM_GB", "SAMPLE_MEM_GB", "init_synthesis_wf"]


def init_synthesis_wf(
    *,
    model: str,
    revision: str | None = None,
    num_inference_steps: int = 50,
    scheduler: str = "ddim",
    image_shape: Sequence[int] | None = None,
    out_of_range: str | None = None,
    mem_gb: float = SAMPLE_MEM_GB,
    name: str = "synthesis_wf",
):
    """Synthesise one T1w image from one participant's demographics and a seed.

    Workflow graph::

        inputnode → normalise_demographics → sample_t1w → outputnode

    Iterate over participants and seeds with ``iterables`` on the inputnode (or on a node
    feeding it), e.g. one image per seed::

        wf.get_node("inputnode").iterables = [("seed", [1, 2, 3])]

    and several participants in lockstep (``synchronize``) from a separate source node;
    ``workflows/synthesise_cohort.py`` shows both.

    Parameters
    ----------
    model, revision
        The Brain LDM: a ``brain_ldm.1`` bundle folder or Hugging Face Hub repo id, and its Hub
        branch, tag or commit (``None``: the default branch; ignored for folders).
    num_inference_steps
        Sampler steps = U-Net calls (50 upstream, DDIM).
    scheduler
        ``"ddim"`` (default, the bundle's sampler), ``"dpmpp-2m"`` or ``"unipc"``
        (multistep ODE solvers: DDIM-50's accuracy in about 16-21 steps); see
        ``BrainLDM.sample_latents``.
    image_shape
        Output grid ``(D, H, W)`` in 1 mm voxels, multiples of 32 for the released model;
        ``None``: the model's native grid (160, 224, 160).
    out_of_range
        ``"error"``, ``"clip"`` or ``"allow"`` for normalised values outside [0, 1];
        ``None``: the policy's choice (``"error"`` by default).
    mem_gb
        Memory one sampling node needs, for MultiProc scheduling (GB); the default is the
        measured full-grid figure on CPU (:data:`SAMPLE_MEM_GB`), far more than small test
        models need.
    name
        Workflow name.

    Inputs
    ------
    sex
        Sex code ('F'/'M', 'female'/'male', or numeric with a policy's sex_codes).
    age
        Age in years (number, '35-40' or '89+').
    ventricular_volume, brain_volume
        mm^3 (needs reference ranges in the policy; approximate mapping) or already in [0, 1].
    seed
        Integer seed of the starting noise, 0 to 2**32 - 1.
    policy_file
        Optional DemographicsPolicy JSON.

    Outputs
    -------
    t1w
        Synthetic T1w NIfTI (float32, 1 mm LAS, centred).
    sidecar
        Its JSON sidecar (conditioning and derivation, seed, model, versions, grid).
    conditioning
        The 4 normalised values [sex, age, ventricular_volume, brain_volume].
    conditioning_file
        The conditioning JSON (values, order, derivation record, policy).
    """
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(
        niu.IdentityInterface(
            fields=["sex", "age", "ventricular_volume", "brain_volume", "seed", "policy_file"],
            mandatory_inputs=False,  # policy_file is optional; the interfaces check the rest
        ),
        name="inputnode",
    )
    outputnode = pe.Node(
        niu.IdentityInterface(fields=["t1w", "sidecar", "conditioning", "conditioning_file"]),
        name="outputnode",
    )
    normalise = pe.Node(NormaliseDemographics(), name="normalise_demographics")
    if out_of_range is not None:
        normalise.inputs.out_of_range = out_of_range
    sample = model_node(
        SampleT1w(model=str(model), num_inference_steps=num_inference_steps, scheduler=scheduler),
        name="sample_t1w", revision=revision, mem_gb=mem_gb,
    )
    if image_shape is not None:
        sample.inputs.image_shape = tuple(int(size) for size in image_shape)

    # fmt: off
    workflow.connect([
        (inputnode, normalise, [("sex", "sex"),
                                ("age", "age"),
                                ("ventricular_volume", "ventricular_volume"),
                                ("brain_volume", "brain_volume"),
                                ("policy_file", "policy_file")]),
        (inputnode, sample, [("seed", "seed")]),
        (normalise, sample, [("out_file", "conditioning_file")]),
        (normalise, outputnode, [("conditioning", "conditioning"),
                                 ("out_file", "conditioning_file")]),
        (sample, outputnode, [("out_file", "t1w"),
                              ("out_sidecar", "sidecar")]),
    ])
    # fmt: on
    return workflow
