"""Raw demographics → the normalised conditioning vector, as a JSON file."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from ..conditioning import CONDITIONING_ORDER
from ..demographics import DemographicsPolicy, normalise_demographics
from ..provenance import write_conditioning

_MISSING = "'n/a' (or '') means missing: the policy's defaults apply, else an error"
_VOLUME = (
    "{what}: mm^3 if > 1 (min-max scaled over the policy's {name}_range_mm3, an approximation: "
    "the upstream mm^3 -> [0, 1] mapping is unpublished), or already normalised if in [0, 1] "
    "(used as given); 'n/a' (or '') means missing: the policy's default (the MONAI bundle's "
    "{default} unless policy_file sets another) is "
    "used and recorded, unless the policy's missing_volumes is 'error'"
)


class _NormaliseDemographicsInputSpec(BaseInterfaceInputSpec):
    sex = traits.Either(
        traits.Str, traits.Float, mandatory=True,
        desc="sex code, mapped to 0 (female) or 1 (male) by the policy's sex_codes: text such as "
        f"'F', 'M', 'female', 'male'; numeric codes (e.g. 1/2) need a policy_file; {_MISSING}",
    )
    age = traits.Either(
        traits.Float, traits.Str, mandatory=True,
        desc="age in years, >= 0: a number, a range such as '35-40' (midpoint) or open-ended "
        "such as '89+' (its bound); normalised as (years - 44) / (82 - 44) by default, so "
        f"44-82 years map to [0, 1]; {_MISSING}",
    )
    ventricular_volume = traits.Either(
        traits.Float, traits.Str, mandatory=True,
        desc=_VOLUME.format(what="ventricular CSF volume", name="ventricular_volume",
                             default=0.2),
    )
    brain_volume = traits.Either(
        traits.Float, traits.Str, mandatory=True,
        desc=_VOLUME.format(
            what="grey + white matter volume normalised for head size", name="brain_volume",
            default=0.4,
        ),
    )
    policy_file = File(
        exists=True,
        desc="JSON object of DemographicsPolicy fields (sex_codes, age_min_years, age_max_years "
        "[years], ventricular_volume_range_mm3, brain_volume_range_mm3 [mm^3, [low, high]], "
        "out_of_range, missing_volumes, age_range_policy, age_open_ended_policy, defaults "
        "[normalised, 0-1]); default: the upstream policy (ages 44-82 years, no mm^3 ranges, "
        "missing volumes take the bundle defaults 0.2 / 0.4)",
    )
    out_of_range = traits.Enum(
        "error", "clip", "allow",
        desc="normalised values outside [0, 1]: 'error', 'clip' to [0, 1], or 'allow' "
        "(extrapolation; the network accepts them); overrides the policy's choice "
        "(default: the policy's, 'error' unless policy_file says otherwise)",
    )
    out_filename = traits.Str(
        "conditioning.json", usedefault=True,
        desc="name of the JSON file written in the node's working directory",
    )


class _NormaliseDemographicsOutputSpec(TraitedSpec):
    out_file = File(
        exists=True,
        desc="JSON: 'conditioning' (4 floats), 'order' [sex, age, ventricular_volume, "
        "brain_volume], 'record' (how each value was derived), 'policy'",
    )
    conditioning = traits.List(
        traits.Float, minlen=4, maxlen=4,
        desc="the 4 normalised values in the order [sex, age, ventricular_volume, brain_volume]",
    )


class NormaliseDemographics(SimpleInterface):
    """Normalise one participant's sex, age and volumes to the Brain LDM's conditioning.

    Delegates to :func:`brain_ldm_nodes.demographics.normalise_demographics`; the JSON keeps
    the derivation record (formulas, reference ranges, and an explicit note when a mm^3
    volume was mapped with the unpublished, approximated min-max range).

    >>> from brain_ldm_nodes.interfaces import NormaliseDemographics
    >>> norm = NormaliseDemographics(sex="F", age=63, ventricular_volume=0.2, brain_volume=0.4)
    """

    input_spec = _NormaliseDemographicsInputSpec
    output_spec = _NormaliseDemographicsOutputSpec

    def _run_interface(self, runtime):
        policy = (
            DemographicsPolicy.from_json(self.inputs.policy_file)
            if isdefined(self.inputs.policy_file)
            else DemographicsPolicy()
        )
        if isdefined(self.inputs.out_of_range):
            policy = dataclasses.replace(policy, out_of_range=self.inputs.out_of_range)
        raw = {name: getattr(self.inputs, name) for name in CONDITIONING_ORDER}
        conditioning = normalise_demographics(raw, policy)
        out_file = write_conditioning(
            conditioning, Path(runtime.cwd) / self.inputs.out_filename, policy
        )
        self._results["out_file"] = str(out_file)
        self._results["conditioning"] = list(conditioning.values)
        return runtime
