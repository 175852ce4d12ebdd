"""Build of the optional oneDNN convolution extension (metadata: pyproject.toml).

``brain_ldm_nodes/csrc/onednn_conv3d.cc`` is one XLA FFI handler calling oneDNN's convolution;
it is compiled against the packaged oneDNN (``onednn-devel-cpu-gomp``: headers, and the
``onednn-cpu-gomp`` library it depends on) and jaxlib's FFI headers, all build requirements.
The extension is optional: without a C++ compiler, on another platform, or with
``BRAIN_LDM_NODES_BUILD_ONEDNN=0`` the package installs without it and convolutions run on XLA.
"""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from pathlib import Path

from setuptools import Extension, setup


def _locate(distribution: str, filename: str) -> Path | None:
    """Folder holding ``filename`` among the files installed by ``distribution``."""
    try:
        files = metadata.distribution(distribution).files or []
    except metadata.PackageNotFoundError:
        return None
    for file in files:
        if file.name == filename:
            return Path(file.locate()).resolve().parent
    return None


def _onednn_extension() -> list[Extension]:
    if os.environ.get("BRAIN_LDM_NODES_BUILD_ONEDNN", "1").lower() in ("0", "off", "false", "no"):
        print("brain-ldm-nodes: BRAIN_LDM_NODES_BUILD_ONEDNN=0, not building the oneDNN extension")
        return []
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return []
    include = _locate("onednn-devel-cpu-gomp", "dnnl.hpp")
    library = _locate("onednn-cpu-gomp", "libdnnl.so")
    try:
        import jaxlib  # its include/ holds the XLA FFI headers (what jax.ffi.include_dir() returns)

        ffi_include = str(Path(jaxlib.__file__).resolve().parent / "include")
    except ImportError:
        ffi_include = None
    if include is None or library is None or ffi_include is None:
        print("brain-ldm-nodes: oneDNN or jaxlib headers not found, not building the oneDNN extension")
        return []
    return [Extension(
        "brain_ldm_nodes._onednn_conv3d",
        sources=["brain_ldm_nodes/csrc/onednn_conv3d.cc"],
        include_dirs=[str(include), ffi_include],
        library_dirs=[str(library)],
        libraries=["dnnl"],
        extra_compile_args=["-std=c++17", "-O2", "-fopenmp", "-fvisibility=hidden"],
        extra_link_args=["-fopenmp"],
        language="c++",
        optional=True,  # a failed build leaves the pure-XLA package
    )]


setup(ext_modules=_onednn_extension())
