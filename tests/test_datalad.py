"""DataLad / git-annex datasets: every file a symlink into ``.git/annex/objects``.

The datasets are real git-annex repositories made here from ``bids_examples/ds-sessions``
(Debian's ``git-annex``; ``.ci/run`` installs it): a clone with everything retrieved, one with
the text files and sub-01 only (sub-02's T1w images are dangling links), and one with nothing
retrieved. Outputs must name the BIDS path of each source (never the annex object) and be the
bytes a plain copy of the dataset gives; an unretrieved file is one line naming it and
``datalad get``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from brain_ldm_nodes.imaging import load_t1w

from bids_app_support import EXAMPLES, app, tree
from test_interfaces import STEPS

T1W_01 = "sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz"
T1W_02 = "sub-02/ses-1/anat/sub-02_ses-1_run-1_T1w.nii.gz"


def git(*args: str, cwd: Path) -> None:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.org",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.org"}
    subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True)


@pytest.fixture(scope="module")
def annexed(tmp_path_factory) -> dict[str, Path]:
    """``{"source", "full", "partial", "bare"}``: the annexed dataset and three clones."""
    assert shutil.which("git-annex"), "git-annex is needed (apt-get install git-annex)"
    base = tmp_path_factory.mktemp("annex")
    source = base / "source"
    shutil.copytree(EXAMPLES / "ds-sessions", source)
    git("init", "-q", cwd=source)
    git("annex", "init", "-q", "source", cwd=source)
    git("-c", "annex.largefiles=anything", "annex", "add", "-q", ".", cwd=source)  # all annexed
    git("commit", "-q", "-m", "ds-sessions", cwd=source)
    clones = {"source": source}
    for name, get in (("full", ["."]),
                      ("partial", ["dataset_description.json", "participants.tsv",
                                   "participants.json", "README.md", "sub-01"]),
                      ("bare", [])):
        clone = base / name
        git("clone", "-q", str(source), str(clone), cwd=base)
        git("annex", "init", "-q", name, cwd=clone)
        if get:
            git("annex", "get", "-q", *get, cwd=clone)
        clones[name] = clone
    for name in ("source", "full", "partial", "bare"):  # really links into the annex
        for relative in (T1W_01, "participants.tsv", "dataset_description.json"):
            link = clones[name] / relative
            assert link.is_symlink() and ".git/annex/objects" in os.readlink(link), link
    assert not (clones["partial"] / T1W_02).exists() and (clones["partial"] / T1W_01).exists()
    return clones


def participant(dataset: Path, out: Path, model: Path, *extra: object):
    return app(dataset, out, "participant", "--model", model, "--num-inference-steps", STEPS,
               *extra)


def test_every_mode_on_a_retrieved_annexed_dataset_names_the_bids_paths(annexed, tiny_model,
                                                                        tmp_path):
    full = annexed["full"]
    # the toy T1w images (16³ phantoms) cannot be registered to MNI: conform them instead
    counterfactual = ["--counterfactual", "age=+10", "--sweep", "age=50:60:10",
                      "--t1w-space", "conform"]
    runs = {"counterfactual": counterfactual, "synthetic": ["--sweep", "age=50:60:10"]}
    for name, extra in runs.items():
        out = tmp_path / name
        done = participant(full, out, tiny_model, *extra)
        assert done.code == 0, done.err + done.out[-3000:]
        assert done.err == ""
        group = app(full, out, "group")
        assert group.code == 0, group.err
        for path in out.rglob("*"):
            if path.is_file() and path.suffix in (".json", ".tsv", ".html"):
                assert ".git/annex" not in path.read_text(), path
    sidecar = json.loads((tmp_path / "counterfactual" / T1W_01.replace(
        "_T1w.nii.gz", "_desc-counterfactual_T1w.json")).read_text())
    assert f"bids:raw:{T1W_01}" in json.dumps(sidecar)

    # the bytes of a plain copy of the same dataset (one participant: it is enough)
    plain = shutil.copytree(EXAMPLES / "ds-sessions", tmp_path / "plain")
    from_plain = tmp_path / "from-plain"
    from_annex = tmp_path / "from-annex"
    for dataset, out in ((plain, from_plain), (full, from_annex)):
        done = participant(dataset, out, tiny_model, *counterfactual, "--participant-label", "01")
        assert done.code == 0, done.err
    images = {key: value for key, value in tree(from_annex).items() if key.startswith("sub-")}
    assert len([key for key in images if key.endswith(".nii.gz")]) == 6  # 2 sources x 3
    assert images == {key: value for key, value in tree(from_plain).items()
                      if key.startswith("sub-")}


def test_unretrieved_images_are_skipped_with_one_line_each(annexed, tiny_model, tmp_path):
    partial = annexed["partial"]
    out = tmp_path / "out"
    done = participant(partial, out, tiny_model, "--counterfactual", "age=+10",
                       "--t1w-space", "conform")
    assert done.code == 0, done.err + done.out[-3000:]
    for relative in (T1W_02, T1W_02.replace("run-1", "run-2")):
        lines = [line for line in done.out.splitlines() if relative in line]
        assert len(lines) == 1, done.out
        assert f"datalad get {partial / relative}" in lines[0] and "not retrieved" in lines[0]
    written = sorted(path.relative_to(out).as_posix() for path in out.rglob("*.nii.gz"))
    assert written == ["sub-01/ses-1/anat/sub-01_ses-1_desc-counterfactual_T1w.nii.gz",
                       "sub-01/ses-2/anat/sub-01_ses-2_desc-counterfactual_T1w.nii.gz"]
    # synthetic images read no image: every participant gets one
    synthetic = participant(partial, tmp_path / "synthetic", tiny_model)
    assert synthetic.code == 0 and "3 images written" in synthetic.out, synthetic.err


def test_unretrieved_dataset_files_are_one_line(annexed, tiny_model, tmp_path):
    bare = annexed["bare"]
    done = participant(bare, tmp_path / "out", tiny_model)
    assert done.code == 1 and len(done.err_lines) == 1, done.err
    assert done.err_lines[0].endswith(
        f"{bare / 'dataset_description.json'}: annexed file not retrieved (no content in this "
        f"clone); run `datalad get {bare / 'dataset_description.json'}`")
    git("annex", "get", "-q", "dataset_description.json", cwd=bare)
    done = participant(bare, tmp_path / "out", tiny_model)
    assert done.code == 1 and len(done.err_lines) == 1, done.err
    assert done.err_lines[0].endswith(f"run `datalad get {bare / 'participants.tsv'}`")
    git("annex", "get", "-q", "participants.tsv", cwd=bare)
    done = participant(bare, tmp_path / "out", tiny_model)  # pybids reads every JSON file
    assert done.code == 1 and len(done.err_lines) == 1, done.err
    assert f"run `datalad get {bare / 'participants.json'}`" in done.err_lines[0]
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("*.nii.gz"))


def test_library_and_nipype_readers_go_through_the_link(annexed):
    from nipype.interfaces.base import traits

    from brain_ldm_nodes.interfaces import CounterfactualT1w, VAEEncode

    partial = annexed["partial"]
    image = load_t1w(partial / T1W_01)
    reference = nib.load(EXAMPLES / "ds-sessions" / T1W_01)
    np.testing.assert_array_equal(np.asanyarray(image.dataobj), np.asanyarray(reference.dataobj))
    assert VAEEncode(in_file=str(partial / T1W_01)).inputs.in_file == str(partial / T1W_01)
    with pytest.raises(FileNotFoundError, match=r"not retrieved .*; run `datalad get .*run-1_T1w"):
        load_t1w(partial / T1W_02)
    for interface in (VAEEncode, CounterfactualT1w):
        with pytest.raises(traits.TraitError, match=r"in_file.*not retrieved.*datalad get"):
            interface(in_file=str(partial / T1W_02))
