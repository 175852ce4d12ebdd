"""Bad or odd inputs to ``brain-ldm-bids``: each gives a clear message and loses nothing.

Every case starts from a copy of ds-minimal and a copy of a finished output folder for it
(3 images). A case changes one thing (a file of the dataset, an argument, the output
folder, ...) and runs ``main(argv)``. Cases that make the run impossible must end with exit
status 1 (2 for the command line) and exactly one line on stderr that names the file,
row/column or argument and what is accepted; no traceback. Odd participant values must skip
that participant with a one-line reason and leave the others alone. In every case the output
folder and the dataset are left exactly as they were.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from brain_ldm_nodes.bids_app.locks import OutputLock

from bids_app_support import (
    CONSOLE_SCRIPT,
    app,
    console_env,
    tree,
)
from test_interfaces import STEPS


@dataclass
class Ctx:
    """What a case may change: the dataset copy, the finished output copy, the model, a folder."""

    dataset: Path
    out: Path
    model: Path
    tmp: Path

    @property
    def tsv(self) -> Path:
        return self.dataset / "participants.tsv"

    def rewrite_tsv(self, old: str, new: str) -> None:
        text = self.tsv.read_text()
        assert old in text
        self.tsv.write_text(text.replace(old, new, 1))

    def participant(self, *extra: object, out: Path | None = None) -> list[object]:
        return [self.dataset, out or self.out, "participant", "--model", self.model,
                "--num-inference-steps", STEPS, *extra]


@dataclass(frozen=True)
class Case:
    setup: Callable[[Ctx], list[object]]
    code: int
    expected: tuple[str, ...]  # substrings of the single stderr line (or, code 0, of stdout)


def _ctx_write(path_of: Callable[[Ctx], Path], data: bytes | str) -> Callable[[Ctx], None]:
    def write(ctx: Ctx) -> None:
        path = path_of(ctx)
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return write


def with_tsv(text_or_bytes: bytes | str, *extra: object) -> Callable[[Ctx], list[object]]:
    def setup(ctx: Ctx) -> list[object]:
        _ctx_write(lambda c: c.tsv, text_or_bytes)(ctx)
        return ctx.participant(*extra)
    return setup


def replacing(old: str, new: str, *extra: object) -> Callable[[Ctx], list[object]]:
    def setup(ctx: Ctx) -> list[object]:
        ctx.rewrite_tsv(old, new)
        return ctx.participant(*extra)
    return setup


def args(*extra: object) -> Callable[[Ctx], list[object]]:
    return lambda ctx: ctx.participant(*extra)


def huge_tsv(ctx: Ctx) -> list[object]:
    with open(ctx.tsv, "r+b") as handle:  # sparse: 60 MiB on paper, nothing on disk
        handle.truncate(60 * 2**20)
    return ctx.participant()


def no_levels_numeric_sex(ctx: Ctx) -> list[object]:
    ctx.tsv.write_text(ctx.tsv.read_text().replace("\tM\t", "\t1\t").replace("\tF\t", "\t2\t"))
    (ctx.dataset / "participants.json").unlink()
    return ctx.participant()


def two_age_columns(ctx: Ctx) -> list[object]:
    lines = ctx.tsv.read_text().splitlines()
    ctx.tsv.write_text("\n".join(f"{line}\t{'age_at_first_scan_years' if i == 0 else '50'}"
                                 for i, line in enumerate(lines)) + "\n")
    return ctx.participant()


def no_volume_columns_strict(ctx: Ctx) -> list[object]:
    lines = [line.split("\t")[:3] for line in ctx.tsv.read_text().splitlines()]
    ctx.tsv.write_text("\n".join("\t".join(cells) for cells in lines) + "\n")
    return ctx.participant("--missing-volumes", "error")


def no_description(ctx: Ctx) -> list[object]:
    (ctx.dataset / "dataset_description.json").unlink()
    return ctx.participant()


def config_file(content: str) -> Callable[[Ctx], list[object]]:
    def setup(ctx: Ctx) -> list[object]:
        path = ctx.tmp / "config.json"
        path.write_text(content)
        return ctx.participant("--demographics-config", path)
    return setup


def model_arg(value: Callable[[Ctx], object]) -> Callable[[Ctx], list[object]]:
    def setup(ctx: Ctx) -> list[object]:
        argv = ctx.participant()
        argv[argv.index("--model") + 1] = value(ctx)
        return argv
    return setup


def folder_without_config(ctx: Ctx) -> Path:
    folder = ctx.tmp / "not-a-bundle"
    folder.mkdir()
    return folder


def truncated_weights(ctx: Ctx) -> Path:
    """A copy of the model whose U-Net weights file lost its last bytes (the outputs are
    complete, so nothing else would read the weights)."""
    copy = ctx.tmp / "models" / "model"
    shutil.copytree(ctx.model, copy)
    shutil.copytree(ctx.model.with_name(ctx.model.name + "-vae"), copy.with_name("model-vae"))
    weights = copy / "unet.safetensors"
    os.truncate(weights, weights.stat().st_size - 100)
    return copy


def output_at(where: Callable[[Ctx], Path]) -> Callable[[Ctx], list[object]]:
    return lambda ctx: ctx.participant(out=where(ctx))


def output_file(ctx: Ctx) -> list[object]:
    path = ctx.tmp / "a-file"
    path.write_text("not a folder")
    return ctx.participant(out=path)


def output_under_a_file(ctx: Ctx) -> list[object]:
    path = ctx.tmp / "a-file"
    path.write_text("not a folder")
    return ctx.participant(out=path / "out")


def output_of_other_software(ctx: Ctx) -> list[object]:
    description = ctx.out / "dataset_description.json"
    document = json.loads(description.read_text())
    document["GeneratedBy"] = [{"Name": "fMRIPrep", "Version": "24.1.0"}]
    description.write_text(json.dumps(document))
    return ctx.participant()


def work_dir_at(where: Callable[[Ctx], Path]) -> Callable[[Ctx], list[object]]:
    return lambda ctx: ctx.participant("-w", where(ctx))


def all_selected_unusable(ctx: Ctx) -> list[object]:
    ctx.rewrite_tsv("sub-01\tM\t", "sub-01\tX\t")
    return ctx.participant("--participant-label", "01")


def no_model_anywhere(ctx: Ctx) -> list[object]:
    argv = ctx.participant()
    index = argv.index("--model")
    del argv[index:index + 2]
    return argv


def group(extra: tuple[object, ...] = (), out: Callable[[Ctx], Path] | None = None):
    return lambda ctx: [ctx.dataset, out(ctx) if out else ctx.out, "group", *extra]


BAD = {
    # --- the command line (exit status 2)
    "no --model and no BRAIN_LDM_MODEL": Case(no_model_anywhere, 2, (
        "no model given: pass --model (a brain_ldm.1 bundle folder", "or set BRAIN_LDM_MODEL")),
    "negative --n-samples": Case(args("--n-samples", "-1"), 2, (
        "argument --n-samples: -1 must be an integer ≥ 1",)),
    "zero --n-samples": Case(args("--n-samples", "0"), 2, ("argument --n-samples: 0 must be",)),
    "text --n-samples": Case(args("--n-samples", "many"), 2, (
        "argument --n-samples: 'many' is not an integer (accepted: 1, 2, ...)",)),
    "--seed of 2^32": Case(args("--seed", str(2**32)), 2, (
        "argument --seed: 4294967296 is outside the accepted 0 to 4294967295",)),
    "negative --seed": Case(args("--seed", "-3"), 2, ("argument --seed: -3 is outside",)),
    "zero --num-inference-steps": Case(args("--num-inference-steps", "0"), 2, (
        "argument --num-inference-steps: 0 must be an integer ≥ 1",)),
    "--num-inference-steps above the training steps": Case(
        args("--num-inference-steps", "1001"), 2, (
            "--num-inference-steps 1001: the model was trained with 1000 timesteps "
            "(accepted: 1 to 1000)",)),
    "--plugin-args not JSON": Case(args("--plugin-args", "{bad"), 2, (
        "argument --plugin-args: inline JSON is not valid JSON",
        """accepted: a JSON object such as '{"sbatch_args": "-p short"}'""")),
    "--plugin-args a JSON list": Case(args("--plugin-args", "[1, 2]"), 2, (
        "argument --plugin-args: inline JSON is a JSON list, not an object",)),
    "--plugin-args a missing file": Case(args("--plugin-args", "no/such/args.json"), 2, (
        "argument --plugin-args", "or the path of a file holding one")),
    "unknown --plugin": Case(args("--plugin", "Slurm"), 2, (
        "--plugin 'Slurm' is not a Nipype plugin (accepted: ", "Linear", "MultiProc", "SLURM")),
    "--mem not a size": Case(args("--mem", "lots"), 2, (
        "argument --mem/--mem-gb: 'lots' is not a memory size (accepted: e.g. 16GB",)),
    "zero --nprocs": Case(args("--nprocs", "0"), 2, ("argument --nprocs", "0 must be")),
    "bids_dir missing": Case(lambda c: [c.tmp / "nope", c.out, "participant"], 2, (
        "argument bids_dir:", "nope: no such directory (expected the root folder of a BIDS")),
    "bids_dir a file": Case(lambda c: [c.tsv, c.out, "participant"], 2, (
        "participants.tsv: not a directory (expected the root folder of a BIDS dataset)",)),
    "unknown analysis level": Case(lambda c: [c.dataset, c.out, "session"], 2, (
        "argument analysis_level: invalid choice: 'session' "
        "(choose from 'participant', 'group')",)),
    # --- the dataset (exit status 1)
    "--participant-label not a label": Case(args("--participant-label", "sub-01_T1w"), 1, (
        "--participant-label 'sub-01_T1w' is not a BIDS participant label (accepted: letters "
        "and digits",)),
    "unknown --participant-label": Case(args("--participant-label", "09"), 1, (
        "--participant-label: 09 not found in", "(participants: 01, 02, 03)")),
    "missing participants.tsv": Case(
        lambda c: (c.tsv.unlink(), c.participant())[1], 1, (
            "no participants.tsv at the dataset root",)),
    "empty participants.tsv": Case(with_tsv(""), 1, (
        "participants.tsv: empty (expected a header row with participant_id",)),
    "binary participants.tsv": Case(with_tsv(b"\x00\x01\x02PK\x03\x04" * 50), 1, (
        "participants.tsv: contains NUL bytes, so it is a binary file",)),
    "UTF-16 participants.tsv": Case(with_tsv("participant_id\tsex\n".encode("utf-16")), 1, (
        "participants.tsv: encoded as UTF-16; BIDS text files must be UTF-8",)),
    "Latin-1 participants.tsv": Case(
        with_tsv("participant_id\tsex\tage\tventricular_volume\tbrain_volume\n"
                 "sub-01\tmännlich\t44\t0.2\t0.4\n".encode("latin-1")), 1, (
            "participants.tsv: not UTF-8 text (byte 0xe4 on line 2)",)),
    "huge participants.tsv": Case(huge_tsv, 1, (
        "participants.tsv: 60.0 MiB is over the 50 MiB limit for participants.tsv",)),
    "participants.tsv with a header only": Case(
        with_tsv("participant_id\tsex\tage\tventricular_volume\tbrain_volume\n"), 1, (
            "has a header but no participant rows",)),
    "comma-separated participants.tsv": Case(
        with_tsv("participant_id,sex,age\nsub-01,M,44\n"), 1, (
            "participants.tsv: no participant_id column in the header",
            "it looks comma-separated, but BIDS .tsv files are tab-separated")),
    "duplicate participant ids": Case(
        replacing("sub-03\t", "sub-01\t"), 1, (
            "participants.tsv: duplicate participant_id: sub-01 in rows 2, 4",)),
    "no age column": Case(replacing("\tage\t", "\tyears\t"), 1, (
        "participants.tsv: no column for age (age, age_at_<scan...>, in years); name yours in "
        '--demographics-config "columns"',)),
    "two age columns": Case(two_age_columns, 1, (
        "participants.tsv: columns 'age' and 'age_at_first_scan_years' could each be the age; "
        "name the one to use in --demographics-config",)),
    "no volume columns under --missing-volumes error": Case(no_volume_columns_strict, 1, (
        "participants.tsv: no column for ventricular_volume (ventricular_volume, vcsf...), "
        "brain_volume (brain_volume...); --missing-volumes default takes the bundle defaults",)),
    "--out-of-range not a choice": Case(args("--out-of-range", "maybe"), 2, (
        "argument --out-of-range: invalid choice: 'maybe' (choose from",)),
    "--volume-defaults outside [0, 1]": Case(args("--volume-defaults", "0.2", "4"), 2, (
        "argument --volume-defaults: 4 is outside [0, 1] (accepted: a normalised volume",)),
    "--volume-defaults one value": Case(args("--volume-defaults", "0.2"), 2, (
        "argument --volume-defaults: expected 2 arguments",)),
    "output_dir that cannot be created, before the model is looked at": Case(
        lambda c: output_under_a_file(c)[:3] + ["--model", c.tmp / "no-model",
                                                "--num-inference-steps", STEPS], 1, (
            "a-file/out: cannot create it (Not a directory); choose a folder you can write to",)),
    "numeric sex codes nobody explains": Case(no_levels_numeric_sex, 1, (
        "column 'sex' holds only numeric codes (1, 2)", "participants.json")),
    "missing dataset_description.json": Case(no_description, 1, (
        "dataset_description.json", "--skip-bids-validation")),
    "dataset_description.json not JSON": Case(
        lambda c: (_ctx_write(lambda x: x.dataset / "dataset_description.json", "{nope")(c),
                   c.participant())[1], 1, ("dataset_description.json",)),
    "every selected participant unusable": Case(all_selected_unusable, 1, (
        "participants.tsv: none of the 1 selected participants can be used",)),
    "--demographics-config missing": Case(
        lambda c: c.participant("--demographics-config", c.tmp / "none.json"), 1, (
            "none.json: cannot read the configuration",)),
    "--demographics-config not JSON": Case(config_file("{oops"), 1, (
        "config.json: not valid JSON",)),
    "--demographics-config unknown key": Case(config_file('{"colums": {}}'), 1, (
        "config.json: unknown configuration key 'colums' (accepted: columns, policy)",)),
    "--demographics-config bad policy value": Case(
        config_file('{"policy": {"out_of_range": "maybe"}}'), 1, (
            "out_of_range: 'maybe' is not one of error, clip, allow",)),
    # --- the model (exit status 1)
    "model folder missing": Case(model_arg(lambda c: c.tmp / "no-model"), 1, (
        "--model: ", "no-model: no such bundle folder (accepted: a brain_ldm.1 bundle folder")),
    "model not in the offline Hub cache": Case(
        model_arg(lambda c: "nobody/no-such-brain-ldm"), 1, (
            "--model: nobody/no-such-brain-ldm: not found in the Hugging Face cache and "
            "downloads are off",)),
    "model folder that is not a bundle": Case(model_arg(folder_without_config), 1, (
        "not-a-bundle: not a brain-ldm bundle (no config.json)",)),
    "model weights truncated (outputs complete)": Case(model_arg(truncated_weights), 1, (
        "--model: ", "model/unet.safetensors: sha256 ", "does not match", "in config.json")),
    "model that is the VAE bundle": Case(
        model_arg(lambda c: c.model.with_name(c.model.name + "-vae")), 1, (
            "is a brain_ldm.vae bundle (the autoencoder alone); --model needs a brain_ldm.1",)),
    # --- the output and work folders (exit status 1)
    "output_dir is bids_dir": Case(output_at(lambda c: c.dataset), 1, (
        "is bids_dir itself", "suggested: ", "derivatives/brain-ldm")),
    "output_dir inside bids_dir": Case(output_at(lambda c: c.dataset / "out"), 1, (
        "is inside bids_dir", "but not under its derivatives/ folder")),
    "output_dir containing bids_dir": Case(output_at(lambda c: c.dataset.parent), 1, (
        "contains bids_dir",)),
    "output_dir a file": Case(output_file, 1, ("a-file exists and is not a directory",)),
    "output_dir under a file": Case(output_under_a_file, 1, (
        "a-file/out: cannot create it (Not a directory); choose a folder you can write to",)),
    "output_dir holding a raw dataset": Case(
        lambda c: c.participant(out=shutil.copytree(c.dataset, c.tmp / "raw-copy")), 1, (
            "holds a raw BIDS dataset (dataset_description.json Name",)),
    "output_dir holding another pipeline's derivatives": Case(output_of_other_software, 1, (
        "holds a derivative dataset of fMRIPrep",)),
    "output_dir with a broken dataset_description.json": Case(
        lambda c: ((c.out / "dataset_description.json").write_text("{broken"), c.participant())[1],
        1, ("dataset_description.json: is not readable JSON", "fix or remove it")),
    "work dir inside bids_dir": Case(work_dir_at(lambda c: c.dataset / "work"), 1, (
        "-w/--work-dir ", "is inside bids_dir")),
    "work dir is output_dir": Case(work_dir_at(lambda c: c.out), 1, (
        "-w/--work-dir ", "is output_dir itself")),
    # --- the group level
    "group level without outputs": Case(group(out=lambda c: c.tmp / "empty"), 1, (
        "empty: no such directory (run the participant level first)",)),
    "group level on a folder that is not an output": Case(
        group(out=lambda c: (c.tmp / "plain").mkdir() or c.tmp / "plain"), 1, (
            "has no dataset_description.json, so it is not an output of brain-ldm-bids",)),
    "group level for a participant without images": Case(
        group(("--participant-label", "09")), 1, (
            "--participant-label: no images of sub-09 in",)),
}

ODD = {  # a participant's values: skipped with a reason naming row and column; others kept
    "unknown sex code": Case(replacing("sub-01\tM\t", "sub-01\tX\t"), 0, (
        "skipped sub-01: participants.tsv row 2 (sub-01), column 'sex': unknown code 'X' "
        "(accepted: f, female, m, male",)),
    "non-numeric age": Case(replacing("\t44\t", "\tforty\t"), 0, (
        "row 2 (sub-01), column 'age': 'forty' is not an age in years (accepted: years as a "
        "number, a range like '35-40', or open-ended like '89+')",)),
    "negative age": Case(replacing("\t44\t", "\t-5\t"), 0, (
        "row 2 (sub-01), column 'age': '-5' is negative",)),
    "age out of range": Case(replacing("\t44\t", "\t120\t"), 0, (
        "column 'age': 120 years normalises to 2 (range 44-82 y), outside [0, 1] "
        "(out_of_range 'clip' or 'allow' would use it)",)),
    "volume in mm^3 without a reference range": Case(replacing("\t0.2\t", "\t25000\t"), 0, (
        "column 'ventricular_volume': 25000 looks like mm^3 (> 1), but no reference "
        "range is configured",)),
    "row with more cells than the header": Case(replacing("sub-02\tF\t63\t0.5\t0.5",
                                                          "sub-02\tF\t63\t0.5\t0.5\tleft"), 0, (
        "row 3 (sub-02): 6 cells but the header has 5 columns",)),
    "row without a folder": Case(
        lambda c: (c.tsv.write_text(c.tsv.read_text() + "sub-09\tF\t70\t0.3\t0.3\n"),
                   c.participant())[1], 0, (
            "skipped sub-09: participants.tsv row 5 (sub-09): folder sub-09/ does not exist",)),
    "folder without a row": Case(
        lambda c: ((c.dataset / "sub-04/anat").mkdir(parents=True),
                   shutil.copyfile(c.dataset / "sub-03/anat/sub-03_T1w.nii.gz",
                                   c.dataset / "sub-04/anat/sub-04_T1w.nii.gz"),
                   c.participant())[2], 0, (
            "skipped sub-04: sub-04: no row in participants.tsv",)),
    "BOM, CRLF, padded cells": Case(
        lambda c: (c.tsv.write_bytes(b"\xef\xbb\xbf" + c.tsv.read_bytes()
                                     .replace(b"\tsex\t", b"\t sex \t").replace(b"\t", b" \t")
                                     .replace(b"\n", b"  \r\n")),
                   c.participant())[1], 0, (
            "summary: 0 images written, 3 already complete, 0 sidecars updated",)),
}


@pytest.fixture
def ctx(tmp_path, tiny_model, finished_run, monkeypatch) -> Ctx:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("BRAIN_LDM_MODEL", raising=False)
    dataset, out = finished_run
    return Ctx(shutil.copytree(dataset, tmp_path / "ds-minimal"),
               shutil.copytree(out, tmp_path / "out"), tiny_model, tmp_path)


def run_case(ctx: Ctx, case: Case):
    argv = case.setup(ctx)
    dataset_before, out_before = tree(ctx.dataset), tree(ctx.out)
    outcome = app(*argv)
    assert tree(ctx.dataset) == dataset_before, "the dataset changed"
    assert tree(ctx.out) == out_before, "the output folder changed"
    assert "Traceback" not in outcome.out + outcome.err
    return outcome


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_ends_in_one_clear_line_and_changes_nothing(ctx, name):
    case = BAD[name]
    outcome = run_case(ctx, case)
    assert outcome.code == case.code, outcome.err
    assert len(outcome.err_lines) == 1, outcome.err
    line = outcome.err_lines[0]
    assert line.startswith("brain-ldm-bids: error: ")
    for text in case.expected:
        assert text in line


@pytest.mark.parametrize("name", list(ODD))
def test_odd_participant_values_skip_that_participant_with_a_reason(ctx, name):
    case = ODD[name]
    outcome = run_case(ctx, case)
    assert outcome.code == 0, outcome.err
    assert outcome.err == ""
    summary = outcome.out[outcome.out.index("summary:"):]
    for text in case.expected:  # one line per skipped participant, before the summary
        assert len([line for line in outcome.out.splitlines() if text in line]) == 1, text
    assert "skipped sub-" not in summary  # the summary groups them, one line per reason
    if "1 participants skipped" in summary:
        assert len([line for line in summary.splitlines() if " 1 participant " in line]) == 1


def test_at_least_thirty_bad_or_odd_inputs_are_covered():
    assert len(BAD) + len(ODD) >= 30


def test_missing_description_is_accepted_with_skip_bids_validation(ctx):
    (ctx.dataset / "dataset_description.json").unlink()
    outcome = app(*ctx.participant("--skip-bids-validation"))
    assert outcome.code == 0, outcome.err
    assert "3 already complete" in outcome.out


def test_a_run_while_another_holds_the_output_dir_is_refused(ctx):
    before = tree(ctx.out)
    with OutputLock(ctx.out):
        for argv in (ctx.participant(), [ctx.dataset, ctx.out, "group"]):
            outcome = app(*argv)
            assert outcome.code == 1 and len(outcome.err_lines) == 1
            assert f"output_dir {ctx.out} is in use by another brain-ldm-bids run (pid " \
                   f"{os.getpid()} on " in outcome.err_lines[0]
            assert "wait for it to finish or choose another output folder" in outcome.err
        assert (ctx.out / ".brain-ldm-bids.lock").read_text().startswith(f"pid {os.getpid()}")
    assert tree(ctx.out) == before


def test_unwritable_output_dir_is_one_line_from_the_console_script(ctx):
    """Root ignores permission bits, so as root the run drops CAP_DAC_OVERRIDE (setpriv)."""
    command = [str(CONSOLE_SCRIPT), *map(str, ctx.participant())]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv: permission bits cannot be enforced")
        command = [setpriv, "--bounding-set=-dac_override,-dac_read_search",
                   "--inh-caps=-dac_override,-dac_read_search", *command]
    before = tree(ctx.out)
    ctx.out.chmod(0o555)
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=console_env(),
                              check=False)
    finally:
        ctx.out.chmod(0o755)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 1, done.stderr
    assert lines == [f"brain-ldm-bids: error: output_dir {ctx.out}: not writable (Permission "
                     "denied); choose a folder you can write to"]
    assert tree(ctx.out) == before


def test_main_module_runs_like_the_console_script():
    done = subprocess.run([sys.executable, "-m", "brain_ldm_nodes.cli.run", "--version"],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0 and done.stdout.startswith("brain-ldm-bids ")


def test_a_model_bundle_that_cannot_be_read_is_one_line(ctx):
    """A bundle on shared storage that this user may not read (made 0700 by a colleague)."""
    model = truncated_weights(ctx)  # a private copy; its weights do not matter here
    locked = [model, model.with_name("model-vae")]
    for path in locked:
        path.chmod(0o000)
    # root reads everything: drop the capabilities that let it (util-linux setpriv)
    as_user = (["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
               if os.geteuid() == 0 else [])
    try:
        argv = [ctx.dataset, ctx.out, "participant", "--model", model,
                "--num-inference-steps", STEPS]
        done = subprocess.run([*as_user, str(CONSOLE_SCRIPT), *map(str, argv)],
                              capture_output=True, text=True, env=console_env(), check=False)
    finally:
        for path in locked:
            path.chmod(0o755)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1, done.stderr
    assert lines[0].startswith(f"brain-ldm-bids: error: --model: {model}: cannot read the bundle "
                               "(Permission denied"), lines[0]
    assert f"chmod -R a+rX {model}" in lines[0]
