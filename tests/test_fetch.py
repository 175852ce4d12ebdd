"""``brain-ldm-fetch`` against a real HTTP server on loopback (``fake_hub.py``), then the
compute-node side: the same cache with ``HF_HUB_OFFLINE=1`` and the server gone.

Everything runs in fresh processes (the console scripts), since huggingface_hub reads
``HF_ENDPOINT``, ``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE`` when it is imported.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import equinox as eqx
import jax
import numpy as np
import pytest

from brain_ldm_nodes import AutoencoderKLConfig, DiffusionModelUNetConfig
from brain_ldm_nodes.cli import fetch as fetch_cli
from brain_ldm_nodes.models.autoencoder import AutoencoderKL
from brain_ldm_nodes.models.unet import DiffusionModelUNet
from brain_ldm_nodes.scheduler import DDIMSchedulerConfig
from brain_ldm_nodes.weights import bundle
from brain_ldm_nodes.weights.mapping import named_parameters

from fake_hub import FakeHub, fake_commit

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MODEL_REPO = "lab/brain-ldm"
VAE_REPO = "lab/brain-ldm-vae"
MODEL_COMMIT = fake_commit(MODEL_REPO)
VAE_COMMIT = fake_commit(VAE_REPO)
BUNDLE_FILES = {"model": ["README.md", "config.json", "unet.safetensors"],
                "base": ["README.md", "autoencoder.safetensors", "config.json"]}
TINY_VAE = AutoencoderKLConfig(channels=(32, 32), num_res_blocks=(1, 1))
TINY_UNET = DiffusionModelUNetConfig(
    channels=(32, 32, 32), num_res_blocks=(1, 1, 1), num_head_channels=(0, 32, 32)
)


def random_tensors(network: type, config, seed: int) -> dict[str, np.ndarray]:
    """Random float32 weights in a bundle's layout, named as ``network`` (no JAX init: fast)."""
    skeleton = eqx.filter_eval_shape(network, config, key=jax.random.key(0))
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(leaf.shape, dtype=np.float32)
            for name, leaf in named_parameters(skeleton).items()}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """``source/model`` (brain_ldm.1, its base named only by Hub repo id + commit) and
    ``source/base`` (brain_ldm.vae): what the fake hub publishes."""
    folder = tmp_path_factory.mktemp("source")
    bundle.save_vae_bundle(folder / "base", TINY_VAE, random_tensors(AutoencoderKL, TINY_VAE, 1))
    bundle.save_model_bundle(
        folder / "model", TINY_UNET, random_tensors(DiffusionModelUNet, TINY_UNET, 2),
        DDIMSchedulerConfig(), bundle.BaseReference(repo_id=VAE_REPO, revision=VAE_COMMIT),
        image_shape=(16, 16, 16),
    )
    return folder


@pytest.fixture
def hub():
    server = FakeHub(lifetime_s=60).start()
    try:
        yield server
    finally:
        server.stop()


def publish(hub: FakeHub, model: Path, base: Path) -> None:
    assert hub.add_repo(VAE_REPO, base) == VAE_COMMIT
    assert hub.add_repo(MODEL_REPO, model) == MODEL_COMMIT


def environment(tmp_path: Path, endpoint: str, **extra: str) -> dict[str, str]:
    """This environment without any HF_* setting, a cache under ``tmp_path`` and ``endpoint``."""
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(("HF_", "HUGGINGFACE_")) and name != "TRANSFORMERS_OFFLINE"}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_CACHE=str(tmp_path / "hf" / "hub"),
               HF_ENDPOINT=endpoint, HF_HUB_DISABLE_TELEMETRY="1", **extra)
    return env


def run(script: str, *args: object, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / script), *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=120, check=False)


def error_lines(done: subprocess.CompletedProcess) -> list[str]:
    return [line for line in done.stderr.splitlines() if line.strip()]


COMPUTE_NODE = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import numpy as np
    from safetensors.numpy import load_file
    from brain_ldm_nodes import BrainLDM
    from brain_ldm_nodes.weights.identity import ModelIdentity
    from brain_ldm_nodes.weights.bundle import module_tensors

    repo, source = sys.argv[1], Path(sys.argv[2])
    identity = ModelIdentity.resolve(repo, local_files_only=True)
    model = BrainLDM.from_pretrained(repo)
    compared = {}
    for part, network, file in (("model", model.unet, "unet.safetensors"),
                                ("base", model.vae, "autoencoder.safetensors")):
        ours, theirs = module_tensors(network), load_file(str(source / part / file))
        compared[part] = {"names_equal": sorted(ours) == sorted(theirs), "count": len(theirs),
                          "different": sorted(name for name in theirs
                                              if not np.array_equal(ours.get(name), theirs[name]))}
    print(json.dumps({"identity_folder": str(identity.folder), "vae_sha256": identity.vae_sha256,
                      "model_folder": model.source["model"]["folder"],
                      "vae_folder": model.source["vae"]["folder"], "compared": compared}))
""")


def test_fetch_downloads_model_and_base_then_compute_node_loads_them_offline(source, hub, tmp_path):
    publish(hub, source / "model", source / "base")
    done = run("brain-ldm-fetch", MODEL_REPO, env=environment(tmp_path, hub.url))
    assert done.returncode == 0, done.stderr

    cache = tmp_path / "hf" / "hub"
    export = (f"export HF_HUB_OFFLINE=1 HF_HUB_CACHE={shlex.quote(str(cache))}; brain-ldm-bids "
              f"BIDS_DIR OUTPUT_DIR participant --model {MODEL_REPO} --revision {MODEL_COMMIT}")
    assert export in done.stdout.splitlines()[-1]
    assert f"{VAE_REPO}  commit {VAE_COMMIT}" in done.stdout
    assert "sha256 ok" in done.stdout and "not checked" not in done.stdout
    assert sorted(hub.downloads(MODEL_REPO)) == BUNDLE_FILES["model"]
    assert sorted(hub.downloads(VAE_REPO)) == BUNDLE_FILES["base"]
    assert hub.unhandled() == []
    assert not any("xet" in request.path.lower() for request in hub.requests)

    endpoint, port = hub.url, hub.port
    hub.stop()
    with pytest.raises(OSError):  # nothing listens there any more: a download could not succeed
        socket.create_connection(("127.0.0.1", port), timeout=2).close()

    node = subprocess.run([sys.executable, "-c", COMPUTE_NODE, MODEL_REPO, str(source)],
                          capture_output=True, text=True, timeout=120, check=False,
                          env=environment(tmp_path, endpoint, HF_HUB_OFFLINE="1"))
    assert node.returncode == 0, node.stderr
    found = json.loads(node.stdout.splitlines()[-1])
    snapshots = {"model": cache / "models--lab--brain-ldm" / "snapshots" / MODEL_COMMIT,
                 "base": cache / "models--lab--brain-ldm-vae" / "snapshots" / VAE_COMMIT}
    assert found["identity_folder"] == found["model_folder"] == str(snapshots["model"])
    assert found["vae_folder"] == str(snapshots["base"])
    expected_vae_sha = json.loads((source / "base" / "config.json").read_text())["weights_sha256"]
    assert found["vae_sha256"] == expected_vae_sha
    for part in ("model", "base"):
        assert found["compared"][part]["names_equal"] and found["compared"][part]["count"] > 0
        assert found["compared"][part]["different"] == [], part


def test_compute_node_without_the_model_names_brain_ldm_fetch(tmp_path):
    bids = shutil.copytree(REPO / "bids_examples" / "ds-minimal", tmp_path / "bids")
    # a closed port as the Hub: if offline mode leaked a request, it could not be answered
    done = run("brain-ldm-bids", bids, tmp_path / "out", "participant", "--model", MODEL_REPO,
               env=environment(tmp_path, "http://127.0.0.1:9", HF_HUB_OFFLINE="1"))
    assert done.returncode == 1, done.stderr
    lines = error_lines(done)
    assert len(lines) == 1, done.stderr
    assert MODEL_REPO in lines[0] and f"`brain-ldm-fetch {MODEL_REPO}`" in lines[0]
    assert "HF_HUB_CACHE" in lines[0]


def test_fetch_refuses_when_hf_hub_offline_is_set(source, hub, tmp_path):
    publish(hub, source / "model", source / "base")
    env = environment(tmp_path, hub.url, HF_HUB_OFFLINE="1")
    done = run("brain-ldm-fetch", MODEL_REPO, env=env)
    assert done.returncode == 1
    lines = error_lines(done)
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("brain-ldm-fetch: error: ")
    assert MODEL_REPO in lines[0] and "HF_HUB_OFFLINE" in lines[0] and "cannot download" in lines[0]
    assert hub.requests == []
    assert not (tmp_path / "hf" / "hub" / "models--lab--brain-ldm").exists()


@pytest.mark.parametrize("tampered", ["model", "base"])
def test_fetch_rejects_a_served_file_whose_sha256_differs_from_config_json(
    source, hub, tmp_path, tampered
):
    folders = {part: shutil.copytree(source / part, tmp_path / "served" / part)
               for part in ("model", "base")}
    weights = folders[tampered] / BUNDLE_FILES[tampered][1 if tampered == "base" else 2]
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # the last byte of the last tensor: still a readable safetensors file
    weights.write_bytes(bytes(data))
    publish(hub, folders["model"], folders["base"])

    env = environment(tmp_path, hub.url)
    done = run("brain-ldm-fetch", MODEL_REPO, env=env)
    assert done.returncode == 1, done.stdout
    lines = error_lines(done)
    assert len(lines) == 1, done.stderr
    repo, commit = (MODEL_REPO, MODEL_COMMIT) if tampered == "model" else (VAE_REPO, VAE_COMMIT)
    assert f"{repo}@{commit}: {weights.name} has sha256" in lines[0]
    assert "does not match" not in done.stdout and done.stdout == ""

    unchecked = run("brain-ldm-fetch", MODEL_REPO, "--no-verify", env=env)
    assert unchecked.returncode == 0, unchecked.stderr
    assert "sha256 not checked (--no-verify)" in unchecked.stdout


def test_fetch_of_an_unknown_repo_names_it(source, hub, tmp_path):
    publish(hub, source / "model", source / "base")
    done = run("brain-ldm-fetch", "lab/no-such-model", env=environment(tmp_path, hub.url))
    assert done.returncode == 1
    lines = error_lines(done)
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("brain-ldm-fetch: error: lab/no-such-model: no such model repo on "
                               f"{hub.url}")
    assert "accepted:" in lines[0]
    assert [(r.method, r.status) for r in hub.requests] == [("GET", 404)]
    assert hub.unhandled() == []


def test_fetch_of_a_bundle_folder_only_verifies(source, tmp_path, capsys):
    local = tmp_path / "local"
    shutil.copytree(source / "base", local / "brain_ldm.vae")
    shutil.copytree(source / "model", local / "brain_ldm.1")
    config = json.loads((local / "brain_ldm.1" / "config.json").read_text())
    config["base"] = {"repo_id": None, "revision": None, "path": "../brain_ldm.vae"}
    (local / "brain_ldm.1" / "config.json").write_text(json.dumps(config))

    assert fetch_cli.main([str(local / "brain_ldm.1")]) == 0
    out = capsys.readouterr().out
    assert "nothing needed downloading" in out
    assert f"--model {local / 'brain_ldm.1'}" in out and "HF_HUB_OFFLINE" not in out

    weights = local / "brain_ldm.vae" / "autoencoder.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 0x01]))
    assert fetch_cli.main([str(local / "brain_ldm.1")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "autoencoder.safetensors has sha256" in err


def test_bad_command_line_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        fetch_cli.main(["lab/brain-ldm", "--revision"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("brain-ldm-fetch: error: argument --revision")
    assert len(err.splitlines()) == 1


def test_fake_hub_stops_by_itself_after_its_lifetime():
    server = FakeHub(lifetime_s=0.2).start()
    port = server.port
    deadline = time.monotonic() + 5
    while server.running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not server.running
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
