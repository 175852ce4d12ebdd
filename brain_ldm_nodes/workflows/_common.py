"""What the ``init_*_wf`` builders share: the memory a full-size node needs, model nodes."""

from __future__ import annotations

from nipype.interfaces.base import BaseInterface
from nipype.pipeline import engine as pe

#: Peak memory (GB) of one full-size (160 x 224 x 160) sample on CPU (UPSTREAM.md §7: ~10.5 GB).
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
