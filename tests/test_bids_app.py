"""The BIDS App ``brain-ldm-bids`` end to end on the example datasets, with the tiny bundle.

Most runs call ``main(argv)`` in this process (the sampler compiles once); the console script
runs in fresh processes for the kill/resume, concurrency and Hub tests. Those share a
persistent JAX compilation cache, and MultiProc workers start by forkserver.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from brain_ldm_nodes import __version__
from brain_ldm_nodes.bids_app.locks import OutputLock
from brain_ldm_nodes.bids_app.naming import LOCK_NAME, LOCKS_DIR_NAME, derive_seed
from brain_ldm_nodes.bids_app.output_dir import default_work_dir
from brain_ldm_nodes.interfaces import SampleT1w
from brain_ldm_nodes.model_cache import get_model
from brain_ldm_nodes.bids_app.report import TSV_COLUMNS
from brain_ldm_nodes.weights.bundle import read_bundle_config

from bids_app_support import (
    CONSOLE_SCRIPT,
    app,
    console,
    console_env,
    copy_dataset,
    tree,
    validator_errors,
)
from test_interfaces import STEPS

MINIMAL = {  # ds-minimal: label -> (raw cells, conditioning) as bids_examples/README.md says
    "01": ({"sex": "M", "age": "44", "ventricular_volume": "0.2", "brain_volume": "0.4"},
           [1.0, 0.0, 0.2, 0.4]),
    "02": ({"sex": "F", "age": "63", "ventricular_volume": "0.5", "brain_volume": "0.5"},
           [0.0, 0.5, 0.5, 0.5]),
    "03": ({"sex": "F", "age": "82", "ventricular_volume": "0.7", "brain_volume": "0.9"},
           [0.0, 1.0, 0.7, 0.9]),
}


@pytest.fixture(scope="module", autouse=True)
def app_environment(tmp_path_factory):
    """Offline Hub; one persistent JAX compilation cache for the processes started here."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("JAX_COMPILATION_CACHE_DIR",
                     str(tmp_path_factory.getbasetemp() / "bids_app_jax_cache"))
        patch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
        yield


def participant(dataset: Path, out: Path, model: Path, *extra: object):
    return app(dataset, out, "participant", "--model", model, "--num-inference-steps", STEPS,
               *extra)


def sidecar_of(out: Path, label: str, run: int | None = None) -> dict:
    entity = f"_run-{run}" if run else ""
    return json.loads((out / f"sub-{label}/anat/sub-{label}{entity}_desc-synthetic_T1w.json")
                      .read_text())


# --------------------------------------------------------------------------- end to end


def test_ds_minimal_participant_then_group_is_a_valid_derivative_with_reproducible_images(
    tmp_path, tiny_model
):
    dataset = copy_dataset("ds-minimal", tmp_path / "ds-minimal")
    source = json.loads((dataset / "dataset_description.json").read_text())
    source["DatasetDOI"] = "doi:10.0000/example.ds-minimal"
    (dataset / "dataset_description.json").write_text(json.dumps(source))
    out = tmp_path / "derivatives"
    done = participant(dataset, out, tiny_model, "--n-samples", 2)
    assert done.code == 0, done.err
    assert done.err == ""
    assert "[6/6] sub-03 image 2/2 done" in done.out and "summary: 6 images written" in done.out
    assert "sub-02_run-1_desc-synthetic_T1w: DDIM step 2/2" in done.out  # per-step progress

    names = sorted(p.relative_to(out).as_posix() for p in out.glob("sub-*/anat/*"))
    assert names == [f"sub-{label}/anat/sub-{label}_run-{run}_desc-synthetic_T1w.{ext}"
                     for label in MINIMAL for run in (1, 2) for ext in ("json", "nii.gz")]
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert description["GeneratedBy"][0]["Name"] == "brain-ldm-bids"
    assert description["GeneratedBy"][0]["Version"] == __version__
    assert description["GeneratedBy"][0]["CodeURL"].startswith("https://")
    assert description["SourceDatasets"] == [{
        "DOI": "doi:10.0000/example.ds-minimal",
        "URL": "https://doi.org/10.0000/example.ds-minimal",
    }]
    assert description["Name"] == f"Brain LDM synthetic T1w images ({source['Name']})"
    assert not (out / ".brain-ldm-bids-work").exists()  # default work folder removed

    config = read_bundle_config(tiny_model)
    model = get_model(str(tiny_model))
    for label, (raw, conditioning) in MINIMAL.items():
        for index in (0, 1):
            sidecar = sidecar_of(out, label, index + 1)
            # the documented formula, computed here by hand (not by derive_seed)
            digest = hashlib.sha256(f"0:{label}:{index}".encode()).digest()
            seed = int.from_bytes(digest[:4], "big")
            assert seed == derive_seed(0, label, index)
            assert sidecar["Synthetic"] is True and sidecar["SkullStripped"] is False
            assert sidecar["Seed"] == seed
            derivation = sidecar["SeedDerivation"]
            assert derivation == {
                "BaseSeed": 0, "Participant": label, "SampleIndex": index,
                "Formula": ("int.from_bytes(hashlib.sha256(f'{BaseSeed}:{Participant}:"
                            "{SampleIndex}'.encode()).digest()[:4], 'big')")}
            # the recorded formula reproduces the seed from the recorded values alone
            assert eval(derivation["Formula"], {"hashlib": hashlib}, {  # noqa: S307
                key: derivation[key] for key in ("BaseSeed", "Participant", "SampleIndex")
            }) == seed
            assert sidecar["Conditioning"]["Values"] == conditioning
            assert sidecar["Conditioning"]["Derivation"]["age"]["raw"] == raw["age"]
            assert sidecar["Demographics"]["Values"] == raw
            assert sidecar["Demographics"]["Policy"]["out_of_range"] == "error"
            assert sidecar["Sampler"]["NumInferenceSteps"] == STEPS
            assert sidecar["Sampler"]["Scheduler"] == config.scheduler.to_dict()
            assert sidecar["Model"]["Source"]["model"]["weights_sha256"] == config.weights_sha256
            assert sidecar["Grid"]["Shape"] == [16, 16, 16]
            assert isinstance(sidecar["SoftwareVersions"], str)  # BIDS wants a string
            image = nib.load(out / f"sub-{label}/anat/sub-{label}_run-{index + 1}"
                                   "_desc-synthetic_T1w.nii.gz")
            expected = model.sample(np.array([conditioning]), [seed], num_inference_steps=STEPS)
            np.testing.assert_array_equal(np.asanyarray(image.dataobj), np.asarray(expected)[0, 0])

    group = app(dataset, out, "group")
    assert group.code == 0, group.err
    with open(out / "group" / "images.tsv", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    assert list(rows[0]) == list(TSV_COLUMNS) and len(rows) == 6
    assert [(r["participant_id"], r["run"]) for r in rows] == [
        (f"sub-{label}", str(run)) for label in MINIMAL for run in (1, 2)]
    assert rows[2]["sex"] == "0.0" and rows[2]["age"] == "0.5" and rows[2]["raw_age"] == "63"
    page = (out / "group" / "report.html").read_text()
    for row in rows:
        png = out / "group" / "figures" / (Path(row["image"]).name[:-7] + "_mosaic.png")
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f'src="figures/{png.name}"' in page
    assert validator_errors(out) == []


def test_ds_messy_skips_unusable_participants_with_reasons_and_passes_the_validator(
    tmp_path, tiny_model
):
    dataset = copy_dataset("ds-messy", tmp_path / "ds-messy")
    out = tmp_path / "out"
    done = participant(dataset, out, tiny_model)
    assert done.code == 0, done.err
    assert sorted(p.name for p in out.glob("sub-*/anat/*.nii.gz")) == [
        f"sub-{label}_desc-synthetic_T1w.nii.gz" for label in ("01", "02", "05", "08")]
    assert "skipped sub-03: participants.tsv row 4 (sub-03), column 'Age' ('89+')" in done.out
    assert "skipped sub-06: participants.tsv row 7 (sub-06), column 'Age': missing value" \
        in done.out
    assert "note: 1 participant has no value in column 'VCSF': the ventricular_volume " \
        "default 0.2 is used (recorded)" in done.out
    summary = done.out[done.out.index("summary:"):]
    assert "4 images written" in summary and "4 participants skipped" in summary
    assert "1 participant older than 82 y" in summary and "1 participant younger" in summary
    assert sidecar_of(out, "05")["Demographics"]["Values"]["Age"] == "60-66"
    assert sidecar_of(out, "08")["Conditioning"]["Derivation"]["ventricular_volume"]["why"] == \
        "participants.tsv row 9 (sub-08), column 'VCSF' is 'N/A'"

    assert app(dataset, out, "group").code == 0
    rows = (out / "group" / "images.tsv").read_text().splitlines()
    assert len(rows) == 5 and "\t60-66\t" in rows[3]
    assert validator_errors(out) == []


def test_an_image_depends_on_base_seed_participant_and_index_only(
    tmp_path, tiny_model, finished_run
):
    dataset, full_run = finished_run
    alone = tmp_path / "alone"
    assert participant(dataset, alone, tiny_model, "--participant-label", "sub-02").code == 0
    assert [p.name for p in alone.glob("sub-*")] == ["sub-02"]
    for name in ("sub-02_desc-synthetic_T1w.nii.gz", "sub-02_desc-synthetic_T1w.json"):
        assert (alone / "sub-02/anat" / name).read_bytes() == \
               (full_run / "sub-02/anat" / name).read_bytes()

    other_seed = tmp_path / "seed7"
    assert participant(dataset, other_seed, tiny_model, "--participant-label", "02",
                       "--seed", 7).code == 0
    seed = sidecar_of(other_seed, "02")["Seed"]
    assert seed == derive_seed(7, "02", 0) != derive_seed(0, "02", 0)
    image = "sub-02/anat/sub-02_desc-synthetic_T1w.nii.gz"
    assert not np.array_equal(np.asanyarray(nib.load(other_seed / image).dataobj),
                              np.asanyarray(nib.load(full_run / image).dataobj))


# --------------------------------------------------------------------------- re-runs


def test_rerun_of_a_complete_output_samples_nothing_and_changes_no_byte(
    tmp_path, tiny_model, finished_run, monkeypatch
):
    dataset, finished = finished_run
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    before = tree(out)

    def refuse(self, runtime):
        raise AssertionError("SampleT1w ran again")

    monkeypatch.setattr(SampleT1w, "_run_interface", refuse)
    done = participant(dataset, out, tiny_model)
    assert done.code == 0, done.err
    assert "3 images: 3 already complete, 0 to sample" in done.out
    assert tree(out) == before


def test_changed_policy_rewrites_only_sidecars_and_changed_seed_resamples(
    tmp_path, tiny_model, finished_run
):
    dataset, finished = finished_run
    config = tmp_path / "clip.json"
    config.write_text(json.dumps({"policy": {"out_of_range": "clip"}}))
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    images = {path: path.read_bytes() for path in out.glob("sub-*/anat/*.nii.gz")}

    done = participant(dataset, out, tiny_model, "--demographics-config", config)
    assert done.code == 0, done.err
    assert done.out.count(": sidecar updated (Conditioning.Derivation is") == 3
    assert {path: path.read_bytes() for path in images} == images
    fresh = tmp_path / "fresh"
    assert participant(dataset, fresh, tiny_model, "--demographics-config", config).code == 0
    assert tree(out) == tree(fresh)  # as if made with this policy from the start

    done = participant(dataset, out, tiny_model, "--demographics-config", config,
                       "--participant-label", "01", "--seed", 3)
    assert done.code == 0, done.err
    assert "sub-01 image 1/1: sampling again: Seed is" in done.out
    assert sidecar_of(out, "01")["Seed"] == derive_seed(3, "01", 0)
    assert sidecar_of(out, "02")["Seed"] == derive_seed(0, "02", 0)  # not asked for: untouched


def test_kill_9_mid_run_then_resume_gives_the_bytes_of_an_uninterrupted_run(tmp_path, tiny_model):
    dataset = copy_dataset("ds-minimal", tmp_path / "ds-minimal")
    args = ["participant", "--model", str(tiny_model), "--num-inference-steps", str(STEPS),
            "--n-samples", "3"]
    killed = tmp_path / "killed"
    process = subprocess.Popen([str(CONSOLE_SCRIPT), str(dataset), str(killed), *args],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               env=console_env())
    deadline = time.monotonic() + 120
    while not list(killed.glob("sub-*/anat/*.json")):
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline, "no output within 120 s"
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL

    sidecars = sorted(killed.glob("sub-*/anat/*.json"))
    assert 0 < len(sidecars) < 9, "the run was not interrupted mid-way"
    for path in killed.glob("sub-*/anat/*"):  # nothing visible is half-written
        if path.name.endswith(".json"):
            json.loads(path.read_text())
            assert path.with_name(path.name[:-5] + ".nii.gz").exists()
        else:
            assert path.name.endswith(".nii.gz")
            assert np.asanyarray(nib.load(path).dataobj).shape == (16, 16, 16)

    resumed = app(dataset, killed, *args)
    assert resumed.code == 0, resumed.err
    assert f"{len(sidecars)} already complete, {9 - len(sidecars)} to sample" in resumed.out
    uninterrupted = tmp_path / "uninterrupted"
    assert app(dataset, uninterrupted, *args).code == 0
    assert tree(killed) == tree(uninterrupted)
    assert not list(killed.rglob(".*.tmp-*"))


def test_a_second_run_on_a_busy_output_dir_is_refused_and_the_first_completes(
    tmp_path, tiny_model
):
    dataset = copy_dataset("ds-minimal", tmp_path / "ds-minimal")
    out = tmp_path / "out"
    args = ["participant", "--model", str(tiny_model), "--num-inference-steps", str(STEPS)]
    first = subprocess.Popen([str(CONSOLE_SCRIPT), str(dataset), str(out), *args],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=console_env())
    lock, deadline = out / LOCKS_DIR_NAME / "sub-01.lock", time.monotonic() + 120
    while not (lock.exists() and lock.read_text().startswith("pid")):
        assert first.poll() is None and time.monotonic() < deadline
        time.sleep(0.005)
    second = app(dataset, out, *args)
    group = app(dataset, out, "group")
    stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr.decode()
    for refused in (second, group):
        assert refused.code == 1 and len(refused.err_lines) == 1
        assert refused.err_lines[0].startswith(f"brain-ldm-bids: error: output_dir {out} is in use "
                                               f"by another brain-ldm-bids run (pid {first.pid}")
    assert len(list(out.glob("sub-*/anat/*_T1w.json"))) == 3
    assert lock.read_text() == ""  # released
    assert validator_errors(out) == []


def test_multiproc_with_forkserver_gives_the_bytes_of_linear(tmp_path, tiny_model, finished_run):
    dataset, linear = finished_run
    out = tmp_path / "multiproc"
    done = participant(dataset, out, tiny_model, "--nprocs", 2)
    assert done.code == 0, done.err
    assert "[3/3]" in done.out
    assert tree(out) == tree(linear)


def test_a_failing_image_is_reported_and_the_others_are_written(
    tmp_path, tiny_model, finished_run, monkeypatch
):
    dataset, _ = finished_run
    real_run = SampleT1w._run_interface

    def fail_for_sub02(self, runtime):
        if self.inputs.out_prefix.startswith("sub-02"):
            raise RuntimeError("simulated out-of-memory")
        return real_run(self, runtime)

    monkeypatch.setattr(SampleT1w, "_run_interface", fail_for_sub02)
    out = tmp_path / "out"
    done = participant(dataset, out, tiny_model)
    assert done.code == 1
    work = default_work_dir(out, ["01", "02", "03"])
    assert work.parent == out / ".brain-ldm-bids-work"
    assert done.err_lines == [f"brain-ldm-bids: error: 1 of 3 images failed (reasons above; "
                              f"crash files in {work / 'crash'})"]
    assert "failed sub-02 image 1/1: RuntimeError: simulated out-of-memory" in done.out
    assert "sub-02 image 1/1 done" not in done.out and "[2/3] sub-03 image 1/1 done" in done.out
    assert "Traceback" not in done.out + done.err
    assert sorted(p.name for p in out.glob("sub-*/anat/*.json")) == [
        "sub-01_desc-synthetic_T1w.json", "sub-03_desc-synthetic_T1w.json"]
    assert list((work / "crash").glob("crash-*.txt"))

    monkeypatch.setattr(SampleT1w, "_run_interface", real_run)
    again = participant(dataset, out, tiny_model)  # the re-run makes only what is missing
    assert again.code == 0 and "2 already complete, 1 to sample" in again.out


# --------------------------------------------------------------------------- console script


def test_hub_repo_id_from_the_offline_cache_is_used_and_recorded(
    tmp_path, tiny_model, finished_run
):
    from upstream_fixtures import publish_to_hf_cache  # imports torch: only here

    commit_model, commit_vae = "c" * 40, "d" * 40
    model = get_model(str(tiny_model))
    model.save_pretrained(tmp_path / "bundle", vae_path=tmp_path / "bundle-vae",
                          base_repo_id="lab/tiny-vae", base_revision=commit_vae)
    cache = tmp_path / "hf" / "hub"
    publish_to_hf_cache(cache, "lab/tiny-vae", tmp_path / "bundle-vae", commit_vae)
    publish_to_hf_cache(cache, "lab/tiny", tmp_path / "bundle", commit_model)
    dataset, local_run = finished_run
    out = tmp_path / "out"
    env = {**console_env(), "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_HUB_CACHE", None)
    done = console(dataset, out, "participant", "--model", "lab/tiny", "--revision", "main",
                   "--participant-label", "01", "--num-inference-steps", STEPS, env=env)
    assert done.code == 0, done.err
    source = sidecar_of(out, "01")["Model"]["Source"]
    assert source["model"]["id"] == "lab/tiny" and source["model"]["revision"] == "main"
    assert commit_model in source["model"]["folder"] and source["vae"]["id"] == "lab/tiny-vae"
    image = "sub-01/anat/sub-01_desc-synthetic_T1w.nii.gz"
    assert (out / image).read_bytes() == (local_run / image).read_bytes()  # same weights


def test_console_script_prints_version_and_help():
    version = console("--version")
    assert version.code == 0 and version.out.strip() == f"brain-ldm-bids {__version__}"
    usage = console("--help")
    assert usage.code == 0
    for option in ("--participant-label", "--work-dir", "--nprocs", "--mem", "--model",
                   "--revision", "--seed", "--n-samples", "--num-inference-steps", "--plugin",
                   "--plugin-args", "--demographics-config", "--skip-bids-validation", "--verbose",
                   "--out-of-range {error,clip,allow}", "--missing-volumes {default,error}",
                   "--volume-defaults VENTRICULAR BRAIN"):
        assert option in usage.out
    # what happens to a table without volume columns, and how columns are found
    text = " ".join(usage.out.split())
    assert "every participant gets the MONAI bundle's defaults, ventricular 0.2 and brain 0.4" \
        in text
    assert "'Age (years)', 'age_years', 'age_at_first_scan_years'" in text
    assert "two candidates for one field are an error naming both" in text
    assert "skipped participants grouped by reason" in text


def test_the_lock_is_released_when_a_run_holding_it_ends(tmp_path):
    with OutputLock(tmp_path):
        assert (tmp_path / LOCK_NAME).read_text().startswith(f"pid {os.getpid()} ")
    with OutputLock(tmp_path):  # can be taken again
        pass
    assert (tmp_path / LOCK_NAME).read_text() == ""


# --------------------------------------------------------------------------- re-runs and details


def test_more_samples_after_one_removes_the_unnumbered_image_and_the_report_counts_right(
    tmp_path, tiny_model, finished_run
):
    _, finished = finished_run  # ds-minimal with --n-samples 1: sub-XX_desc-synthetic_T1w
    dataset = copy_dataset("ds-minimal", tmp_path / "ds-minimal")
    out = shutil.copytree(finished, tmp_path / "out")
    one = {label: (out / f"sub-{label}/anat/sub-{label}_desc-synthetic_T1w.nii.gz").read_bytes()
           for label in MINIMAL}
    done = participant(dataset, out, tiny_model, "--n-samples", 2, "--participant-label", "01",
                       "02")
    assert done.code == 0, done.err
    for label in ("01", "02"):
        assert not list(out.glob(f"sub-{label}/anat/sub-{label}_desc-synthetic_T1w.*"))
        assert f"removed sub-{label}/anat/sub-{label}_desc-synthetic_T1w.nii.gz and its " \
               "sidecar: --n-samples 2 does not make it" in done.out
        # run-1 is the image the unnumbered one was (same seed): nothing is lost
        assert (out / f"sub-{label}/anat/sub-{label}_run-1_desc-synthetic_T1w.nii.gz"
                ).read_bytes() == one[label]
    # sub-03 was not in this run: left alone
    assert (out / "sub-03/anat/sub-03_desc-synthetic_T1w.nii.gz").read_bytes() == one["03"]
    group = app(dataset, out, "group")
    assert group.code == 0, group.err
    assert "summary: 5 images of 3 participants" in group.out
    # an unnumbered image beside run-numbered ones (say, from an older version) is not counted
    for ext in ("nii.gz", "json"):
        shutil.copyfile(out / f"sub-03/anat/sub-03_desc-synthetic_T1w.{ext}",
                        out / f"sub-03/anat/sub-03_run-1_desc-synthetic_T1w.{ext}")
    group = app(dataset, out, "group")
    assert group.code == 0, group.err
    assert "summary: 5 images of 3 participants" in group.out
    assert "note: sub-03/anat/sub-03_desc-synthetic_T1w.nii.gz: left out, sub-03 also has " \
        "run-numbered images" in group.out
    (out / "sub-03/anat/sub-03_run-1_desc-synthetic_T1w.json").unlink()
    (out / "sub-03/anat/sub-03_run-1_desc-synthetic_T1w.nii.gz").unlink()

    back = participant(dataset, out, tiny_model, "--participant-label", "01")
    assert back.code == 0, back.err
    assert sorted(p.name for p in out.glob("sub-01/anat/*.nii.gz")) == [
        "sub-01_desc-synthetic_T1w.nii.gz"]


@pytest.mark.parametrize("given, bare", [
    ("n/a", None), ("N/A", None), ("", None), ("   ", None), (None, None), ("TBD", None),
    ("https://doi.org/n/a", None),
    ("doi:10.18112/openneuro.ds000030.v1.0.0", "10.18112/openneuro.ds000030.v1.0.0"),
    ("10.18112/openneuro.ds000030.v1.0.0", "10.18112/openneuro.ds000030.v1.0.0"),
    ("https://doi.org/10.1234/abc.5", "10.1234/abc.5"),
    ("http://dx.doi.org/10.1234/abc.5", "10.1234/abc.5"),
    ("doi.org/10.1234/abc.5", "10.1234/abc.5"),
    (" DOI: 10.1234/abc.5 ", "10.1234/abc.5"),
])
def test_a_dataset_doi_gives_a_correct_doi_url_pair_or_none(given, bare):
    from brain_ldm_nodes.bids_app.description import dataset_description, raw_dataset_link

    description = dataset_description({"Name": "x", "DatasetDOI": given})
    link = raw_dataset_link({"DatasetDOI": given}, Path("/data/ds"), Path("/data/ds/derivatives/x"))
    if bare is None:
        assert "SourceDatasets" not in description
        assert link == "../.."
    else:
        assert description["SourceDatasets"] == [
            {"DOI": f"doi:{bare}", "URL": f"https://doi.org/{bare}"}]
        assert link == f"doi:{bare}"


def test_the_time_left_is_estimated_from_images_after_the_first(monkeypatch):
    """The first image includes compilation: no estimate after it; later ones use the pace
    since the first was written."""
    import logging
    from types import SimpleNamespace

    from brain_ldm_nodes.bids_app import progress as cli_run

    requests = [SimpleNamespace(stem=f"s{i}", title=f"image {i}", num_inference_steps=10,
                                relative_path=Path(f"s{i}.nii.gz")) for i in range(4)]
    clock = iter([0.0, 600.0, 600.0, 610.0, 610.0, 620.0])  # compile 600 s, then 10 s each
    monkeypatch.setattr(cli_run.time, "monotonic", lambda: next(clock))
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    monkeypatch.setattr(cli_run.log, "handlers", [handler])
    monkeypatch.setattr(cli_run.log, "level", logging.INFO)
    progress = cli_run.Progress(requests)
    for request in requests[:3]:
        progress._starts[request.stem] = next(clock)
        progress._progress(request, "publish", "end")
    assert lines[0] == "[1/4] image 0 done in 10:00 (1:00 per step): s0.nii.gz"  # no estimate
    assert lines[1].endswith("; about 20.0 s left"), lines[1]
    assert lines[2].endswith("; about 10.0 s left"), lines[2]
