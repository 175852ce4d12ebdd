"""A real T1w → its counterfactual under other demographics (DDIM inversion)."""

from __future__ import annotations

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from ..interfaces import CounterfactualT1w, ResampleToSource
from ._common import FULL_SIZE_MEM_GB, model_node


def init_counterfactual_wf(
    *,
    model: str,
    revision: str | None = None,
    num_inference_steps: int = 50,
    t1w_space: str = "native",
    to_source: bool = False,
    mem_gb: float = FULL_SIZE_MEM_GB,
    name: str = "counterfactual_wf",
):
    """Make a counterfactual of a real T1w image: the same brain under other demographics.

    The image is encoded to the Brain LDM latent, its DDIM trajectory (eta = 0) is inverted
    under the subject's own conditioning to the starting noise, and sampled forward from that
    noise under the new conditioning. Sampling forward under the original conditioning gives
    the reconstruction, whose error the sidecar records.

    Workflow graph::

        inputnode → counterfactual_t1w (register + encode + invert + denoise x2) → outputnode

    Parameters
    ----------
    model, revision
        The Brain LDM: a ``brain_ldm.1`` bundle folder or Hugging Face Hub repo id, and its Hub
        branch, tag or commit (``None``: the default branch; ignored for folders).
    num_inference_steps
        DDIM steps of both the inversion and the sampling (50 upstream); more steps give a
        smaller reconstruction error and take proportionally longer (three passes of steps).
    t1w_space
        Where the input is (``CounterfactualT1w.t1w_space``): ``"native"`` (default) registers
        it rigidly to MNI152 onto the model grid; ``"MNI"`` only resamples an image already in
        MNI152 2009 space (fMRIPrep); ``"model-grid"`` uses it as stored (LAS, 1 mm, sizes
        multiples of 32 for the released model, ~[0, 1]); ``"conform"`` reorients and
        centre-crops without registration.
    to_source
        Also resample the counterfactual back onto the input T1w's own grid with the inverse
        of the registration (``ResampleToSource``; output ``counterfactual_source``). Needs
        ``t1w_space`` ``"native"`` or ``"MNI"``.
    mem_gb
        Memory the counterfactual node needs, for MultiProc scheduling (GB); about that of one
        sample at the full grid on CPU, far less for small test models.
    name
        Workflow name.

    Inputs
    ------
    t1w
        The subject's T1-weighted NIfTI.
    conditioning_from
        The subject's own 4 normalised values [sex, age, ventricular_volume, brain_volume]
        (e.g. ``NormaliseDemographics``' ``conditioning`` output).
    conditioning_to
        The 4 normalised values to regenerate the image under.

    Outputs
    -------
    counterfactual
        The counterfactual T1w NIfTI (float32, 1 mm LAS, centred).
    reconstruction
        The image regenerated under ``conditioning_from`` (same grid).
    noise
        The inverted starting noise (latent NIfTI, channels last).
    sidecar
        JSON of the counterfactual: source image and its preparation (registration method,
        template, transform file, quality), both conditionings, DDIM settings,
        reconstruction error, model, versions, grid.
    transform
        ITK transform file MNI152 → source world (``t1w_space`` ``"native"``/``"MNI"``; else
        undefined): resample the counterfactual back onto the source with it.
    counterfactual_source
        With ``to_source=True``: the counterfactual on the input T1w's grid (float32, the
        source's shape and affine, 0 outside the model grid).
    """
    if to_source and t1w_space not in ("native", "MNI"):
        raise ValueError(
            f"to_source=True needs t1w_space 'native' or 'MNI' (a registration to invert), "
            f"got {t1w_space!r}"
        )
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(
        niu.IdentityInterface(fields=["t1w", "conditioning_from", "conditioning_to"]),
        name="inputnode",
    )
    outputnode = pe.Node(
        niu.IdentityInterface(
            fields=["counterfactual", "reconstruction", "noise", "sidecar", "transform"]
            + (["counterfactual_source"] if to_source else [])
        ),
        name="outputnode",
    )
    counterfactual = model_node(
        CounterfactualT1w(
            model=str(model), t1w_space=t1w_space, num_inference_steps=num_inference_steps
        ),
        name="counterfactual_t1w", revision=revision, mem_gb=mem_gb,
    )

    # fmt: off
    workflow.connect([
        (inputnode, counterfactual, [("t1w", "in_file"),
                                     ("conditioning_from", "conditioning_from"),
                                     ("conditioning_to", "conditioning_to")]),
        (counterfactual, outputnode, [("out_file", "counterfactual"),
                                      ("out_reconstruction", "reconstruction"),
                                      ("out_noise", "noise"),
                                      ("out_sidecar", "sidecar")]),
    ])
    if t1w_space in ("native", "MNI"):
        workflow.connect([(counterfactual, outputnode, [("out_transform", "transform")])])
    if to_source:
        back = pe.Node(ResampleToSource(out_prefix="counterfactual_T1w_space-source"),
                       name="resample_to_source")
        workflow.connect([
            (inputnode, back, [("t1w", "source_file")]),
            (counterfactual, back, [("out_file", "in_file"),
                                    ("out_transform", "transform")]),
            (back, outputnode, [("out_file", "counterfactual_source")]),
        ])
    # fmt: on
    return workflow
