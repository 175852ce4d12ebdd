"""A real T1w → the model grid: rigid registration to MNI152, resampling, intensity scaling."""

from __future__ import annotations

from collections.abc import Sequence

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from ..interfaces.registration import RegisterT1w


def init_t1w_to_model_grid_wf(
    *,
    in_space: str = "native",
    shape: Sequence[int] | None = None,
    intensity: str = "minmax",
    min_ncc: float | None = None,
    mem_gb: float = 1.0,
    name: str = "t1w_to_model_grid_wf",
):
    """Put a T1w on the Brain LDM's grid as upstream's training images were: rigidly
    registered to MNI152, 1 mm LAS, 160 x 224 x 160, min-max scaled to [0, 1].

    Workflow graph::

        inputnode → register_t1w (SimpleITK rigid registration + resampling) → outputnode

    Parameters
    ----------
    in_space
        ``"native"``: register (default). ``"MNI"``: the input is already in MNI152 2009 space
        (fMRIPrep ``space-MNI152NLin2009cAsym``), only resample.
    shape
        Output grid in voxels; default the model's 160 x 224 x 160.
    intensity
        ``"minmax"`` (upstream) or ``"percentile"`` (0.5th..99.5th, clipped).
    min_ncc
        Quality threshold (NCC with the template); default
        :data:`brain_ldm_nodes.registration.DEFAULT_MIN_NCC`. Below it the node fails with
        ``RegistrationError``.
    mem_gb
        Memory the node needs (GB); about 1 GB for a 256^3 T1w.
    name
        Workflow name.

    Inputs
    ------
    t1w
        T1-weighted NIfTI, any orientation, voxel size and field of view.

    Outputs
    -------
    t1w_grid
        The T1w on the model grid (3-D float32 NIfTI, 1 mm LAS, [0, 1]).
    transform
        ITK text transform ``from-T1w_to-MNI152NLin2009aSym_mode-image_xfm`` (maps MNI points
        to source points, as ANTs and fMRIPrep write them).
    report
        JSON record: method, library, template, metric, levels, intensity scaling, quality.
    """
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=["t1w"]), name="inputnode")
    outputnode = pe.Node(
        niu.IdentityInterface(fields=["t1w_grid", "transform", "report"]), name="outputnode"
    )
    register = pe.Node(
        RegisterT1w(in_space=in_space, intensity=intensity), name="register_t1w", mem_gb=mem_gb
    )
    if shape is not None:
        register.inputs.shape = tuple(int(n) for n in shape)
    if min_ncc is not None:
        register.inputs.min_ncc = float(min_ncc)

    # fmt: off
    workflow.connect([
        (inputnode, register, [("t1w", "in_file")]),
        (register, outputnode, [("out_file", "t1w_grid"),
                                ("out_transform", "transform"),
                                ("out_report", "report")]),
    ])
    # fmt: on
    return workflow
