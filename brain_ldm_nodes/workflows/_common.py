"""What the ``init_*_wf`` builders share: the memory a full-size node needs, model nodes."""

from __future__ import annotations

from nipype.interfaces.base import BaseInterface
from nipype.pipeline import engine as pe

# Memory (GB) MultiProc and SLURM reserve per full-size (160 x 224 x 160) model node on CPU,
# from measured peak RSS with the whole model loaded (2026-11-30, 2-core AVX2, oneDNN path):
#: A sample (DDIM steps + streaming decode; ``bench/sample_peak.py``): 5.7 GiB = 6.1 GB
#: (the XLA fallback 6.6 GiB = 7.1 GB); 8 GB covers both with >= 13 % margin.
SAMPLE_MEM_GB = 8.0
#: An encode in memory (the autoencoder and counterfactual nodes): 9.4 GiB = 10.1 GB;
#: 12 GB leaves a 19 % margin.
FULL_SIZE_MEM_GB = 12.0


def model_node(
    interface: BaseInterface, *, name: str, revision: str | None, mem_gb: float
) -> pe.Node:
    """A node running ``interface`` (built with its ``model`` input), at Hub ``revision`` when
    given, that MultiProc schedules as needing ``mem_gb`` GB."""
    node = pe.Node(interface, name=name, mem_gb=mem_gb)
    if revision is not None:
        node.inputs.revision = revision
    return node
