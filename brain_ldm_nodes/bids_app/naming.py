"""Names in the App's output folder (a BIDS derivative dataset), and the seeds.

Layout of ``output_dir``::

    dataset_description.json        DatasetType "derivative", GeneratedBy, SourceDatasets
    README.md                       what the dataset is (written once, never overwritten)
    .bidsignore                     lists /group (the group report is not BIDS) and *_xfm.txt
    sub-<label>/anat/sub-<label>_desc-synthetic_T1w.nii.gz + .json           (--n-samples 1)
    sub-<label>/anat/sub-<label>_run-<n>_desc-synthetic_T1w.nii.gz + .json    (n = 1..N)
    sub-<label>/anat/sub-<label>_desc-syntheticSweep<Field><Value>_T1w.nii.gz    (--sweep)
    sub-<label>/[ses-<s>/]anat/<source entities>_desc-counterfactual_T1w.nii.gz  (--counterfactual)
    sub-<label>/[ses-<s>/]anat/<source entities>_desc-counterfactualSweep<Field><Value>_T1w...
    group/                          the group level (:mod:`brain_ldm_nodes.bids_app.report`)
    .brain-ldm-bids.lock            flock-ed while a run uses the folder (shared by participant
                                    runs, exclusive for the group level)
    .brain-ldm-bids-locks/          one flock per participant being processed
    .brain-ldm-bids-work/<run>/     the default Nipype work folder of a run (removed after a
                                    clean run)

Seeds: image ``n`` (0-based) of participant ``X`` uses :func:`derive_seed` ``(seed, X, n)``,
so it does not depend on which other participants a run includes. A synthetic sweep uses the
seed of image 0 for every value, so the value equal to the participant's own gives image 0.
Counterfactuals have no seed (DDIM inversion of a real T1w).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ..imaging import sidecar_path

__all__ = [
    "COUNTERFACTUAL_DESC",
    "DEFAULT_WORK_DIR_NAME",
    "DESC",
    "GENERATED_BY",
    "GROUP_DIR_NAME",
    "LOCKS_DIR_NAME",
    "LOCK_NAME",
    "SEED_FORMULA",
    "SWEEP_INFIX",
    "derive_seed",
    "image_relative_path",
    "read_sidecar",
    "sidecar_path",
]


#: The App's name: its console script, ``GeneratedBy.Name``, the prefix of its lines.
GENERATED_BY = "brain-ldm-bids"
DESC = "synthetic"
COUNTERFACTUAL_DESC = "counterfactual"
SWEEP_INFIX = "Sweep"  # desc-syntheticSweepAge50, desc-counterfactualSweepAgePlus10
LOCK_NAME = ".brain-ldm-bids.lock"
LOCKS_DIR_NAME = ".brain-ldm-bids-locks"
DEFAULT_WORK_DIR_NAME = ".brain-ldm-bids-work"
GROUP_DIR_NAME = "group"
SEED_FORMULA = (
    "int.from_bytes(hashlib.sha256(f'{BaseSeed}:{Participant}:{SampleIndex}'.encode())"
    ".digest()[:4], 'big')"
)


def derive_seed(base_seed: int, label: str, index: int) -> int:
    """The seed of image ``index`` (0-based) of participant ``label``, in [0, 2**32).

    The first 4 bytes (big-endian) of ``sha256(f"{base_seed}:{label}:{index}")``: a function
    of these three values only.
    """
    digest = hashlib.sha256(f"{int(base_seed)}:{label}:{int(index)}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def image_relative_path(label: str, index: int, n_samples: int) -> Path:
    """``sub-<label>/anat/sub-<label>[_run-<index + 1>]_desc-synthetic_T1w.nii.gz``.

    The ``run`` entity numbers the images of a participant when there are several
    (``n_samples > 1``); with one image it is left out, as BIDS allows.
    """
    run = f"_run-{index + 1}" if n_samples > 1 else ""
    return Path(f"sub-{label}", "anat", f"sub-{label}{run}_desc-{DESC}_T1w.nii.gz")


def read_sidecar(path: Path) -> dict[str, Any] | str:
    """The sidecar as a dict, or a one-line reason why it cannot be used."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"{path.name} is not readable JSON ({exc})"
    if not isinstance(document, dict):
        return f"{path.name} is not a JSON object"
    return document
