"""T1w → latent → reconstructed T1w."""

from __future__ import annotations

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from ..interfaces import VAEDecode, VAEEncode
from ._common import FULL_SIZE_MEM_GB, model_node


def init_encode_decode_wf(
    *,
    model: str,
    revision: str | None = None,
    t1w_space: str = "native",
    mem_gb: float = FULL_SIZE_MEM_GB,
    name: str = "encode_decode_wf",
):
    """Encode a T1w image to the Brain LDM latent and decode it back (a reconstruction).

    Workflow graph::

        inputnode → vae_encode (register to MNI152 + encode) → vae_decode → outputnode

    Parameters
    ----------
    model, revision
        The Brain LDM: a ``brain_ldm.1`` bundle folder or Hugging Face Hub repo id, and its Hub
        branch, tag or commit (``None``: the default branch; ignored for folders).
    t1w_space
        Where the input is (``VAEEncode.t1w_space``): ``"native"`` (default) registers it
        rigidly to MNI152 onto the model grid (:func:`brain_ldm_nodes.registration.register_t1w`);
        ``"MNI"`` only resamples an image already in MNI152 2009 space (fMRIPrep);
        ``"model-grid"`` uses it as stored (LAS, 1 mm, sizes multiples of 8, ~[0, 1]);
        ``"conform"`` reorients and centre-crops without registration.
    mem_gb
        Memory one encode or decode node needs, for MultiProc scheduling (GB).
    name
        Workflow name.

    Inputs
    ------
    t1w
        T1-weighted NIfTI.

    Outputs
    -------
    reconstruction
        Decoded T1w NIfTI (float32, 1 mm LAS, centred) and ``reconstruction_sidecar``, its JSON.
    latent
        Deterministic latent z_mu (4-D NIfTI, channels last), and ``latent_sigma``, z_sigma.
    conformed
        The input on the model grid, as encoded (not for ``t1w_space="model-grid"``).
    transform, registration
        ITK transform file (MNI152 → source world) and the registration record (JSON), for
        ``t1w_space`` ``"native"`` or ``"MNI"``.
    report
        JSON of how the input was prepared (the registration record) and the model used.
    """
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=["t1w"]), name="inputnode")
    out_fields = ["reconstruction", "reconstruction_sidecar", "latent", "latent_sigma", "report"]
    prepared = [] if t1w_space == "model-grid" else ["conformed"]
    registered = ["transform", "registration"] if t1w_space in ("native", "MNI") else []
    outputnode = pe.Node(
        niu.IdentityInterface(fields=out_fields + prepared + registered), name="outputnode"
    )
    encode = model_node(
        VAEEncode(model=str(model), t1w_space=t1w_space),
        name="vae_encode", revision=revision, mem_gb=mem_gb,
    )
    decode = model_node(
        VAEDecode(model=str(model)), name="vae_decode", revision=revision, mem_gb=mem_gb
    )

    # fmt: off
    workflow.connect([
        (inputnode, encode, [("t1w", "in_file")]),
        (encode, decode, [("out_latent", "in_latent")]),
        (encode, outputnode, [("out_latent", "latent"),
                              ("out_sigma", "latent_sigma"),
                              ("out_report", "report")]),
        (decode, outputnode, [("out_file", "reconstruction"),
                              ("out_sidecar", "reconstruction_sidecar")]),
    ])
    if prepared:
        workflow.connect([(encode, outputnode, [("out_conformed", "conformed")])])
    if registered:
        workflow.connect([(encode, outputnode, [("out_transform", "transform"),
                                                ("out_registration", "registration")])])
    # fmt: on
    return workflow
