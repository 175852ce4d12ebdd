"""README snippets run as written: the Quick start and the Nipype example (a relative model path
in a real Workflow, from another working directory, under Linear and MultiProc).

The snippet text is read from README.md, so the README and what is tested cannot drift apart.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import pytest

from brain_ldm_nodes import interfaces, workflows

from test_interfaces import REPO, SHAPE

README = REPO / "README.md"


def readme_block(language: str, marker: str) -> str:
    """The one fenced ``language`` block of README.md that contains ``marker``."""
    blocks = re.findall(rf"^```{language}\n(.*?)^```", README.read_text(encoding="utf-8"),
                        flags=re.M | re.S)
    found = [block for block in blocks if marker in block]
    assert len(found) == 1, f"README: {len(found)} {language} blocks contain {marker!r}"
    return found[0]


def environment() -> dict[str, str]:
    """This interpreter first on PATH (``python`` in a snippet), this checkout importable."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # no network in tests
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def test_quick_start_runs_as_written(tmp_path):
    """The bash line makes the bundle the Python block loads by its relative name."""
    (tmp_path / "workflows").symlink_to(REPO / "workflows")  # "from the repository's root"
    bash = readme_block("bash", "make_tiny_bundle.py converted/brain_ldm.1")
    python = readme_block("python", "seeds=[42], num_inference_steps=50)")
    python += "\nassert images.shape == (1, 1, 32, 32, 32), images.shape\nprint('quick start ok')\n"
    # before the bundle exists: a folder-like name is a missing folder, not a Hub repo
    done = subprocess.run([sys.executable, "-c", python], cwd=tmp_path, env=environment(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert "converted/brain_ldm.1: no such bundle folder" in last, last
    assert last.index("no such bundle folder") < last.index("Hugging Face"), last

    done = subprocess.run(["bash", "-euc", bash], cwd=tmp_path, env=environment(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    done = subprocess.run([sys.executable, "-c", python], cwd=tmp_path, env=environment(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "quick start ok" in done.stdout


@pytest.fixture
def project_with_relative_model(tmp_path, tiny_model, monkeypatch) -> Path:
    """A project folder holding ``converted/brain_ldm.1`` (the tiny bundle), as the cwd."""
    project = tmp_path / "project"
    (project / "converted").mkdir(parents=True)
    (project / "converted" / "brain_ldm.1").symlink_to(tiny_model)
    vae = tiny_model.with_name(tiny_model.name + "-vae")
    (project / "converted" / vae.name).symlink_to(vae)
    monkeypatch.chdir(project)
    return project


def test_readme_nipype_example_runs_in_a_workflow_linear_then_multiproc(
    project_with_relative_model, tmp_path, monkeypatch
):
    project = project_with_relative_model
    snippet = readme_block("python", 'SampleT1w(model="converted/brain_ldm.1"')
    namespace: dict = {}
    exec(compile(snippet, "README.md (Nipype)", "exec"), namespace)  # runs it (Linear)
    linear = sorted((project / "work" / "synthesis" / "sample_t1w").glob("*.nii.gz"))
    assert len(linear) == 1 and nib.load(linear[0]).shape == SHAPE

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the relative name means nothing here
    workflow = namespace["workflow"]
    workflow.base_dir = str(elsewhere / "work")
    workflow.config["execution"]["poll_sleep_duration"] = 0.1
    workflow.run(plugin="MultiProc", plugin_args={"n_procs": 2, "mp_context": "forkserver"})
    multiproc = sorted((elsewhere / "work" / "synthesis" / "sample_t1w").glob("*.nii.gz"))
    assert len(multiproc) == 1
    assert multiproc[0].read_bytes() == linear[0].read_bytes()


MODEL_INTERFACES = [interfaces.SampleT1w, interfaces.VAEEncode, interfaces.VAEDecode,
                    interfaces.CounterfactualT1w, interfaces.CounterfactualSeriesT1w]
WORKFLOW_BUILDERS = [workflows.init_synthesis_wf, workflows.init_encode_decode_wf,
                     workflows.init_counterfactual_wf]


@pytest.mark.parametrize("interface", MODEL_INTERFACES, ids=lambda i: i.__name__)
def test_every_interface_makes_a_relative_model_folder_absolute(project_with_relative_model,
                                                               interface):
    absolute = str(project_with_relative_model / "converted" / "brain_ldm.1")
    assert interface(model="converted/brain_ldm.1").inputs.model == absolute
    assert interface(model=Path("converted/brain_ldm.1")).inputs.model == absolute
    node = interface()
    node.inputs.model = "./converted/brain_ldm.1"
    assert node.inputs.model == absolute
    assert interface(model="lab/brain-ldm").inputs.model == "lab/brain-ldm"  # a Hub repo id


@pytest.mark.parametrize("builder", WORKFLOW_BUILDERS, ids=lambda b: b.__name__)
def test_every_workflow_makes_a_relative_model_folder_absolute(project_with_relative_model,
                                                              builder):
    absolute = str(project_with_relative_model / "converted" / "brain_ldm.1")
    workflow = builder(model="converted/brain_ldm.1")
    models = {node.fullname: node.inputs.model for node in workflow._get_all_nodes()
              if "model" in node.inputs.copyable_trait_names()}
    assert models and set(models.values()) == {absolute}, models
