"""Upstream .pt → brain-ldm-convert → bundles → BrainLDM.from_pretrained, against MONAI. Offline."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from brain_ldm_nodes import AutoencoderKLConfig, BrainLDM, DiffusionModelUNetConfig
from brain_ldm_nodes.cli import convert as convert_cli
from brain_ldm_nodes.weights import convert as convert_module
from brain_ldm_nodes.weights.bundle import BundleError

from monai_oracle import relative_error
from upstream_fixtures import publish_to_hf_cache, write_config_json, write_upstream_checkpoints

TOLERANCE = 1e-4  # float32 parity, as in test_parity_networks.py
TINY_VAE = AutoencoderKLConfig(channels=(32, 32), num_res_blocks=(1, 1))
TINY_UNET = DiffusionModelUNetConfig(
    channels=(32, 32, 32), num_res_blocks=(1, 1, 1), num_head_channels=(0, 32, 32)
)
COMMIT_VAE = "a" * 40
COMMIT_MODEL = "b" * 40


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    folder = tmp_path_factory.mktemp("upstream")
    autoencoder_pt, model_pt, vae, unet = write_upstream_checkpoints(folder, TINY_VAE, TINY_UNET, seed=21)
    configs = (write_config_json(folder / "vae.json", TINY_VAE), write_config_json(folder / "unet.json", TINY_UNET))
    return autoencoder_pt, model_pt, vae, unet, configs


def convert_args(upstream, output: Path, *extra: str) -> list[str]:
    autoencoder_pt, model_pt, _, _, (vae_json, unet_json) = upstream
    return ["--autoencoder", str(autoencoder_pt), "--unet", str(model_pt), "-o", str(output),
            "--autoencoder-config", str(vae_json), "--unet-config", str(unet_json), *extra]


@pytest.fixture(scope="module")
def converted(upstream, tmp_path_factory):
    output = tmp_path_factory.mktemp("converted")
    assert convert_cli.main(convert_args(upstream, output)) == 0
    return output


def assert_model_matches_monai(model: BrainLDM, monai_vae, monai_unet) -> None:
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((1, 3, 4, 4, 8), dtype=np.float32)
    images = rng.random((1, 1, 8, 8, 16), dtype=np.float32)
    assert relative_error(model.decode(latents), monai_vae.decode(torch.from_numpy(latents)).numpy()) <= TOLERANCE
    z_mu, _ = model.encode(images)
    assert relative_error(z_mu, monai_vae.encode(torch.from_numpy(images))[0].numpy()) <= TOLERANCE
    x = rng.standard_normal((1, 7, 4, 4, 8), dtype=np.float32)
    context = rng.random((1, 1, 4), dtype=np.float32)
    eps = jax.vmap(model.unet)(jnp.asarray(x), jnp.asarray([321]), jnp.asarray(context))
    reference = monai_unet(torch.from_numpy(x), torch.tensor([321]), context=torch.from_numpy(context))
    assert relative_error(eps, reference.numpy()) <= TOLERANCE


def test_convert_then_from_pretrained_matches_monai(upstream, converted):
    _, _, monai_vae, monai_unet, _ = upstream
    assert sorted(p.name for p in (converted / "brain_ldm.vae").iterdir()) == [
        "README.md", "autoencoder.safetensors", "config.json"]
    assert sorted(p.name for p in (converted / "brain_ldm.1").iterdir()) == [
        "README.md", "config.json", "unet.safetensors"]
    model = BrainLDM.from_pretrained(converted / "brain_ldm.1")
    assert_model_matches_monai(model, monai_vae, monai_unet)
    assert model.source["model"]["weights_sha256"] == json.loads(
        (converted / "brain_ldm.1" / "config.json").read_text())["weights_sha256"]


def test_model_bundle_stores_only_the_unet_and_names_its_base(converted):
    config = json.loads((converted / "brain_ldm.1" / "config.json").read_text())
    assert config["bundle_type"] == "brain_ldm.1"
    assert config["base"] == {"path": "../brain_ldm.vae", "repo_id": None, "revision": None}
    assert config["scheduler"]["beta_start"] == 0.0015 and config["scheduler"]["timestep_spacing"] == "leading"
    assert config["conditioning_order"] == ["sex", "age", "ventricular_volume", "brain_volume"]
    from safetensors import safe_open

    with safe_open(str(converted / "brain_ldm.1" / "unet.safetensors"), framework="numpy") as handle:
        names = list(handle.keys())
    assert names and not any(name.startswith(("encoder.", "decoder.")) for name in names)
    card = (converted / "brain_ldm.1" / "README.md").read_text()
    assert card.startswith("---\nlicense: apache-2.0\n") and "library_name: brain-ldm-nodes" in card


def test_console_script_help_names_each_file():
    result = subprocess.run(["brain-ldm-convert", "--help"], capture_output=True, text=True, check=True)
    assert "--autoencoder AUTOENCODER_PT" in result.stdout and "models/autoencoder.pt" in result.stdout
    assert "--unet MODEL_PT" in result.stdout and "models/model.pt" in result.stdout
    assert "hf upload" in result.stdout


def test_md5_of_random_weights_warns_and_released_md5_is_recognised(upstream, tmp_path, caplog, monkeypatch):
    with caplog.at_level(logging.INFO):
        assert convert_cli.main(convert_args(upstream, tmp_path / "a")) == 0
    assert "is not the released autoencoder checkpoint" in caplog.text
    caplog.clear()
    autoencoder_pt = upstream[0]
    from brain_ldm_nodes.weights.torch_checkpoint import file_md5

    monkeypatch.setitem(convert_module.UPSTREAM_MD5, "autoencoder", file_md5(autoencoder_pt))
    with caplog.at_level(logging.INFO):
        assert convert_cli.main(convert_args(upstream, tmp_path / "b")) == 0
    assert "matches the released autoencoder checkpoint" in caplog.text
    provenance = json.loads((tmp_path / "b" / "brain_ldm.vae" / "config.json").read_text())["provenance"]
    assert provenance["source"]["is_released_checkpoint"] is True


def test_save_pretrained_round_trips_bitwise(tmp_path):
    model = BrainLDM.random(key=jax.random.key(3), vae_config=TINY_VAE, unet_config=TINY_UNET)
    model.save_pretrained(tmp_path / "mine")
    assert (tmp_path / "brain_ldm.vae" / "config.json").is_file()
    loaded = BrainLDM.from_pretrained(tmp_path / "mine")
    for ours, theirs in ((model.vae, loaded.vae), (model.unet, loaded.unet)):
        for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(theirs)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert loaded.vae.config == TINY_VAE and loaded.unet.config == TINY_UNET


def _packed_kernels(unet) -> int:
    from brain_ldm_nodes.models import onednn

    is_packed = lambda node: isinstance(node, onednn.PackedKernel)  # noqa: E731
    return sum(map(is_packed, jax.tree_util.tree_leaves(unet, is_leaf=is_packed)))


def test_from_pretrained_packs_the_unet_kernels_at_first_sampling_only(tmp_path):
    """The U-Net's kernels are packed for oneDNN when sampling first needs them (not at load,
    not for encode/decode), once; sampling gives bitwise the same latents as the plain network,
    and saving a packed model writes the same plain kernels."""
    from brain_ldm_nodes.models import onednn

    model = BrainLDM.random(key=jax.random.key(3), vae_config=TINY_VAE, unet_config=TINY_UNET,
                            image_shape=(16, 16, 16))
    model.save_pretrained(tmp_path / "mine")
    loaded = BrainLDM.from_pretrained(tmp_path / "mine")
    assert _packed_kernels(loaded.unet) == 0  # load: nothing packed
    images = np.asarray(loaded.decode(loaded.encode(np.zeros((1, 1, 16, 16, 16), np.float32))[0]))
    assert np.isfinite(images).all() and _packed_kernels(loaded.unet) == 0  # autoencoder only
    cond = np.array([[0.0, 0.5, 0.4, 0.6]], np.float32)
    latents = loaded.sample_latents(cond, seeds=[7], num_inference_steps=2)
    packed = _packed_kernels(loaded.unet)
    assert (packed > 0) == onednn.available()
    assert loaded.prepare_unet() is loaded.unet and _packed_kernels(loaded.unet) == packed  # once
    np.testing.assert_array_equal(np.asarray(latents), np.asarray(model.sample_latents(cond, seeds=[7],
                                                                                        num_inference_steps=2)))
    loaded.save_pretrained(tmp_path / "again")
    again = BrainLDM.from_pretrained(tmp_path / "again")
    for a, b in zip(jax.tree_util.tree_leaves(model.unet), jax.tree_util.tree_leaves(again.unet)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_hub_cache_offline_resolves_model_and_base_by_repo_id(upstream, tmp_path):
    """Bundles published into a cache laid out as huggingface_hub's, loaded with
    HF_HUB_OFFLINE=1 in a fresh process; the base is found by repo id at a pinned revision."""
    from huggingface_hub import scan_cache_dir

    output = tmp_path / "converted"
    args = convert_args(upstream, output, "--base-repo-id", "lab/brain-ldm-vae", "--base-revision", COMMIT_VAE)
    assert convert_cli.main(args) == 0
    cache = tmp_path / "hf" / "hub"
    publish_to_hf_cache(cache, "lab/brain-ldm-vae", output / "brain_ldm.vae", COMMIT_VAE)
    publish_to_hf_cache(cache, "lab/brain-ldm", output / "brain_ldm.1", COMMIT_MODEL)
    scanned = {repo.repo_id: {rev.commit_hash for rev in repo.revisions} for repo in scan_cache_dir(cache).repos}
    assert scanned == {"lab/brain-ldm-vae": {COMMIT_VAE}, "lab/brain-ldm": {COMMIT_MODEL}}

    latents = np.random.default_rng(0).standard_normal((1, 3, 4, 4, 8), dtype=np.float32)
    np.save(tmp_path / "latents.npy", latents)
    script = textwrap.dedent(f"""
        import sys, numpy as np
        from brain_ldm_nodes import BrainLDM
        model = BrainLDM.from_pretrained("lab/brain-ldm", revision=sys.argv[1])
        assert model.source["vae"]["id"] == "lab/brain-ldm-vae", model.source
        assert "{COMMIT_VAE}" in model.source["vae"]["folder"], model.source
        np.save(sys.argv[2], np.asarray(model.decode(np.load(sys.argv[3]))))
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_HUB_CACHE", None)
    for revision in ("main", COMMIT_MODEL):
        out = tmp_path / f"decoded-{revision[:4]}.npy"
        subprocess.run([sys.executable, "-c", script, revision, str(out), str(tmp_path / "latents.npy")],
                       env=env, check=True)
        reference = upstream[2].decode(torch.from_numpy(latents)).numpy()
        assert relative_error(np.load(out), reference) <= TOLERANCE


def test_offline_without_cached_model_is_one_clear_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty")}
    script = "from brain_ldm_nodes import BrainLDM; BrainLDM.from_pretrained('lab/not-cached')"
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert result.returncode != 0
    assert "lab/not-cached: not found in the Hugging Face cache and downloads are off" in result.stderr


def test_malicious_pickle_is_refused_by_the_cli_without_running_it(upstream, tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "autoencoder.pt"
    torch.save({"encoder.blocks.0.conv.weight": Exploit()}, evil)
    args = convert_args(upstream, tmp_path / "out")
    args[1] = str(evil)
    result = subprocess.run(["brain-ldm-convert", *args], capture_output=True, text=True)
    assert result.returncode == 1
    assert not marker.exists()
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert lines[0].startswith(f"brain-ldm-convert: error: {evil}: refused to unpickle global")
    assert "system" in lines[0]
    assert not (tmp_path / "out").exists()


def test_truncated_checkpoint_is_a_clear_error(upstream, tmp_path, capsys):
    truncated = tmp_path / "model.pt"
    data = upstream[1].read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    args = convert_args(upstream, tmp_path / "out")
    args[3] = str(truncated)
    assert convert_cli.main(args) == 1
    assert f"brain-ldm-convert: error: {truncated}:" in capsys.readouterr().err


def test_wrong_keys_are_listed(upstream, tmp_path, capsys):
    state = torch.load(upstream[0], weights_only=True)
    state["encoder.blocks.99.conv.weight"] = torch.zeros(1)
    del state["quant_conv_mu.conv.bias"]
    state["post_quant_conv.conv.weight"] = torch.zeros(3, 3, 1, 1, 2)
    broken = tmp_path / "autoencoder.pt"
    torch.save(state, broken)
    args = convert_args(upstream, tmp_path / "out")
    args[1] = str(broken)
    assert convert_cli.main(args) == 1
    err = capsys.readouterr().err
    assert "1 unknown key(s): encoder.blocks.99.weight" in err
    assert "1 missing key(s): quant_conv_mu.bias" in err
    assert "post_quant_conv.weight: got (3, 3, 1, 1, 2), expected (3, 3, 1, 1, 1)" in err


def test_non_float32_checkpoint_is_a_clear_error(upstream, tmp_path, capsys):
    state = {k: v.half() for k, v in torch.load(upstream[0], weights_only=True).items()}
    half = tmp_path / "autoencoder.pt"
    torch.save(state, half)
    args = convert_args(upstream, tmp_path / "out")
    args[1] = str(half)
    assert convert_cli.main(args) == 1
    assert "expected float32 tensors only" in capsys.readouterr().err


def test_checksum_mismatch_is_refused(converted, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(converted, copy)
    weights = copy / "brain_ldm.1" / "unet.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"unet.safetensors: sha256 [0-9a-f]{64} does not match"):
        BrainLDM.from_pretrained(copy / "brain_ldm.1")


def test_verified_weights_are_not_hashed_again_until_the_file_changes(converted, tmp_path, monkeypatch):
    """A verification record skips the sha256 of an unchanged file; any rewrite — even one that
    keeps size and modification time — is hashed again, and corruption is still refused."""
    import shutil

    from brain_ldm_nodes.weights import bundle

    copy = tmp_path / "copy"
    shutil.copytree(converted, copy)
    monkeypatch.setenv(bundle.VERIFY_RECORDS_ENV, str(tmp_path / "records"))
    hashed = []
    real_sha256 = bundle.sha256_of
    monkeypatch.setattr(bundle, "sha256_of", lambda path: hashed.append(Path(path).name) or real_sha256(path))

    BrainLDM.from_pretrained(copy / "brain_ldm.1")
    assert sorted(hashed) == ["autoencoder.safetensors", "unet.safetensors"]
    assert len(list((tmp_path / "records").glob("*.json"))) == 2
    hashed.clear()
    BrainLDM.from_pretrained(copy / "brain_ldm.1")
    assert hashed == []

    weights = copy / "brain_ldm.1" / "unet.safetensors"
    status = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(status.st_atime_ns, status.st_mtime_ns))  # same size and mtime
    with pytest.raises(BundleError, match=r"unet.safetensors: sha256 [0-9a-f]{64} does not match"):
        BrainLDM.from_pretrained(copy / "brain_ldm.1")
    assert hashed == ["unet.safetensors"]

    monkeypatch.setenv(bundle.VERIFY_RECORDS_ENV, "off")
    hashed.clear()
    BrainLDM.from_pretrained(converted / "brain_ldm.1")
    assert sorted(hashed) == ["autoencoder.safetensors", "unet.safetensors"]


def test_safetensors_reader_matches_safetensors_and_refuses_bad_files(converted, tmp_path):
    from safetensors.numpy import load_file

    from brain_ldm_nodes.weights.bundle import read_safetensors

    weights = converted / "brain_ldm.1" / "unet.safetensors"
    ours, theirs = read_safetensors(weights), load_file(str(weights))
    assert sorted(ours) == sorted(theirs)
    for name, array in theirs.items():
        np.testing.assert_array_equal(ours[name], array)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(weights.read_bytes()[:-4])
    with pytest.raises(BundleError, match="not a readable safetensors file"):
        read_safetensors(truncated)
    (tmp_path / "garbage.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(BundleError, match="not a readable safetensors file"):
        read_safetensors(tmp_path / "garbage.safetensors")


def test_loading_a_vae_bundle_as_the_model_is_a_clear_error(converted):
    with pytest.raises(BundleError, match=r"is a brain_ldm.vae bundle .* needs a brain_ldm.1 bundle"):
        BrainLDM.from_pretrained(converted / "brain_ldm.vae")


def test_missing_base_bundle_is_a_clear_error(converted, tmp_path):
    import shutil

    shutil.copytree(converted / "brain_ldm.1", tmp_path / "alone")
    with pytest.raises(BundleError, match=r"base bundle path '../brain_ldm.vae' .* does not exist"):
        BrainLDM.from_pretrained(tmp_path / "alone")


@pytest.mark.slow
def test_full_size_checkpoints_convert_and_match_monai(tmp_path):
    """Both networks at the released architecture (553M + 13.8M parameters), old key names."""
    autoencoder_pt, model_pt, monai_vae, monai_unet = write_upstream_checkpoints(
        tmp_path / "upstream", AutoencoderKLConfig(), DiffusionModelUNetConfig(), seed=5
    )
    result = subprocess.run(
        ["brain-ldm-convert", "--autoencoder", str(autoencoder_pt), "--unet", str(model_pt),
         "-o", str(tmp_path / "out")], capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    model_pt.unlink()  # free the disk; the bundle must stand alone now
    model = BrainLDM.from_pretrained(tmp_path / "out" / "brain_ldm.1")
    assert model.latent_shape() == (3, 20, 28, 20)
    assert_model_matches_monai(model, monai_vae, monai_unet)


# -- same tensors, same bytes; permissions as the umask says; unreadable bundles -----------------
def _bundle_files(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.suffix == ".safetensors"}


def test_saving_the_same_tensors_again_gives_the_same_bytes_and_sha256(upstream, tmp_path):
    """save_pretrained, make_tiny_bundle.py with one seed and brain-ldm-convert of one checkpoint,
    each repeated: identical weights files, so identical weights_sha256 (resumed runs do not
    sample again after a re-conversion)."""
    import importlib.util

    from brain_ldm_nodes.weights.bundle import read_bundle_config

    model = BrainLDM.random(key=jax.random.key(3), vae_config=TINY_VAE, unet_config=TINY_UNET,
                            image_shape=(16, 16, 16))
    spec = importlib.util.spec_from_file_location(
        "make_tiny_bundle", Path(__file__).resolve().parents[1] / "workflows" / "make_tiny_bundle.py")
    tiny_script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny_script)
    routes = {
        "save_pretrained": lambda out: model.save_pretrained(out / "brain_ldm.1"),
        "make_tiny_bundle": lambda out: tiny_script.make_tiny_bundle(out / "brain_ldm.1", seed=5,
                                                                     image_shape=(16, 16, 16)),
        "brain-ldm-convert": lambda out: convert_cli.main(convert_args(upstream, out)),
    }
    for route, save in routes.items():
        written = []
        for attempt in range(5):  # safetensors' metadata order changed between calls
            out = tmp_path / route / str(attempt)
            save(out)
            folders = sorted(path for path in out.iterdir() if (path / "config.json").is_file())
            assert len(folders) == 2, folders
            written.append({folder.name: (_bundle_files(folder), read_bundle_config(folder).weights_sha256)
                            for folder in folders})
        hashes = [{name: sha for name, (_, sha) in attempt.items()} for attempt in written]
        assert all(other == hashes[0] for other in hashes), (route, hashes)
        assert all(other == written[0] for other in written), route


def test_bundles_honour_the_umask(tmp_path):
    from brain_ldm_nodes.imaging import write_json

    model = BrainLDM.random(key=jax.random.key(0), vae_config=TINY_VAE, unet_config=TINY_UNET,
                            image_shape=(16, 16, 16))
    for umask, folder_mode, file_mode in ((0o022, 0o755, 0o644), (0o027, 0o750, 0o640)):
        previous = os.umask(umask)
        try:
            out = tmp_path / f"umask-{umask:03o}"
            model.save_pretrained(out / "brain_ldm.1")
            write_json({"a": 1}, out / "derivative" / "sidecar.json")
        finally:
            os.umask(previous)
        for bundle_folder in (out / "brain_ldm.1", out / "brain_ldm.vae"):
            assert bundle_folder.stat().st_mode & 0o777 == folder_mode, (umask, bundle_folder)
            for path in bundle_folder.iterdir():
                assert path.stat().st_mode & 0o777 == file_mode, (umask, path)
        assert (out / "derivative" / "sidecar.json").stat().st_mode & 0o777 == file_mode


@pytest.mark.parametrize("unreadable", ["folders", "weights"])
def test_a_bundle_that_cannot_be_read_is_one_clear_line(tmp_path, unreadable):
    """A bundle its user may not read (e.g. written 0700/0600 by a colleague): one line."""
    model = BrainLDM.random(key=jax.random.key(0), vae_config=TINY_VAE, unet_config=TINY_UNET,
                            image_shape=(16, 16, 16))
    model.save_pretrained(tmp_path / "brain_ldm.1")
    locked = ([tmp_path / "brain_ldm.1", tmp_path / "brain_ldm.vae"] if unreadable == "folders"
              else [tmp_path / "brain_ldm.1" / "unet.safetensors"])
    script = textwrap.dedent("""
        import sys
        from brain_ldm_nodes import BrainLDM
        from brain_ldm_nodes.weights.bundle import BundleError
        try:
            BrainLDM.from_pretrained(sys.argv[1])
        except BundleError as error:
            sys.exit(f"error: {error}")
    """)
    env = {**os.environ, "BRAIN_LDM_NODES_VERIFIED_DIR": "off"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                      env.get("PYTHONPATH")]))
    # root reads everything: drop the capabilities that let it (util-linux setpriv)
    as_user = (["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
               if os.geteuid() == 0 else [])
    for path in locked:
        path.chmod(0o000)
    try:
        done = subprocess.run([*as_user, sys.executable, "-c", script, str(tmp_path / "brain_ldm.1")],
                              env=env, capture_output=True, text=True)
    finally:
        for path in locked:
            path.chmod(0o755 if path.is_dir() else 0o644)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1, done.stderr[-2000:]
    assert lines[0].startswith(f"error: {tmp_path / 'brain_ldm.1'}: cannot read the bundle (Permission denied")
    assert f"chmod -R a+rX {tmp_path / 'brain_ldm.1'}" in lines[0]
