"""Copy a node's image and sidecar into a derivative dataset, atomically."""

from __future__ import annotations

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from ..imaging import atomic_write, publish_image


class _PublishDerivativeInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="NIfTI image to publish, copied byte for byte")
    in_sidecar = File(
        exists=True, mandatory=True, desc="JSON sidecar of in_file; published with metadata added"
    )
    out_file = traits.Str(
        mandatory=True,
        desc="absolute destination path of the image (.nii.gz); the sidecar goes beside it "
        "with .json; folders are created",
    )
    metadata = traits.Dict(
        traits.Str, traits.Any,
        desc="JSON-serialisable keys added to (or replacing those of) the sidecar",
    )


class _PublishDerivativeOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="the published image (the out_file input)")
    out_sidecar = File(exists=True, desc="the published sidecar, beside out_file with .json")


class PublishDerivative(SimpleInterface):
    """Publish an image + sidecar at ``out_file`` (:func:`brain_ldm_nodes.imaging.publish_image`).

    The old sidecar is removed first and the new one written last, each file atomically, so
    a sidecar next to an image always describes it, even if the process is killed midway.
    Run this node with ``overwrite=True``: it writes outside its working directory.
    """

    input_spec = _PublishDerivativeInputSpec
    output_spec = _PublishDerivativeOutputSpec

    def _run_interface(self, runtime):
        metadata = self.inputs.metadata if isdefined(self.inputs.metadata) else {}
        image, sidecar = publish_image(
            self.inputs.in_file, self.inputs.in_sidecar, self.inputs.out_file, metadata
        )
        self._results["out_file"] = str(image)
        self._results["out_sidecar"] = str(sidecar)
        return runtime


class _PublishFileInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="file to publish, copied byte for byte")
    out_file = traits.Str(
        mandatory=True, desc="absolute destination path; folders are created"
    )


class _PublishFileOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="the published file (the out_file input)")


class PublishFile(SimpleInterface):
    """Copy one file (e.g. a registration transform) into a derivative dataset, atomically.

    Run this node with ``overwrite=True``: it writes outside its working directory.
    """

    input_spec = _PublishFileInputSpec
    output_spec = _PublishFileOutputSpec

    def _run_interface(self, runtime):
        from pathlib import Path

        payload = Path(self.inputs.in_file).read_bytes()
        target = atomic_write(self.inputs.out_file, lambda handle: handle.write(payload))
        self._results["out_file"] = str(target)
        return runtime
