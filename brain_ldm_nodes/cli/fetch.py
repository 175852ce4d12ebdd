"""``brain-ldm-fetch``: put a Hub model and its base bundle into the Hugging Face cache.

On clusters the login node has the network and the compute nodes do not: run this on the
login node, then run ``brain-ldm-bids`` on the compute nodes with ``HF_HUB_OFFLINE=1`` and
the same cache. Downloads go through :func:`brain_ldm_nodes.weights.bundle.resolve_bundle`
(``huggingface_hub.snapshot_download``), so the cache is the ordinary Hugging Face one.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import shlex
import sys
from pathlib import Path

from .._version import __version__
from .parser import _OneLineErrorParser

PROG = "brain-ldm-fetch"
ACCEPTED = ("accepted: the Hub repo id of a brain_ldm.1 bundle such as org/brain-ldm, "
            "or a bundle folder")

DESCRIPTION = """\
Download a Brain LDM model from the Hugging Face Hub into the local Hugging Face cache: the
brain_ldm.1 bundle MODEL and the brain_ldm.vae bundle its config.json names as its base.
Both weights files are checked against the sha256 in their config.json. The output says
which cache folder and commits a machine without network needs, as a line to copy.

Run it where the Hub is reachable (on a cluster: the login node), then on the compute nodes:
  export HF_HUB_OFFLINE=1 HF_HUB_CACHE=<the printed folder>
  brain-ldm-bids BIDS_DIR OUTPUT_DIR participant --model MODEL --revision <printed commit>

A bundle folder as MODEL is only verified (its base is downloaded if the config names it by
Hub repo id and it is not beside the folder). A brain_ldm.vae repo is fetched alone.
"""

EPILOG = """\
examples:
  brain-ldm-fetch org/brain-ldm
  brain-ldm-fetch org/brain-ldm --revision v1.0 --cache-dir /shared/hf/hub
  brain-ldm-fetch /models/brain_ldm.1

environment:
  HF_HOME, HF_HUB_CACHE  the cache to fill (default ~/.cache/huggingface/hub); --cache-dir wins
  HF_TOKEN               for private or gated repos
  HF_ENDPOINT            another Hub (a mirror)
  HF_HUB_OFFLINE         must be unset or 0: this command exists to download

exit status: 0 fetched and verified; 1 cannot download, not a bundle, or a checksum differs;
2 bad command line.
"""

_COMMIT = re.compile(r"^[0-9a-f]{40}$")


class FetchError(Exception):
    """A one-line reason the fetch failed, naming the repo, folder or file."""


@dataclasses.dataclass(frozen=True)
class Fetched:
    """One bundle now on this machine."""

    role: str  # "model" or "base"
    name: str  # the Hub repo id, or the absolute folder
    folder: Path
    weights_file: str
    commit: str | None  # the Hub commit of its snapshot; None for a bundle folder
    verified: bool

    @property
    def cache(self) -> Path | None:
        """The hub cache holding it: ``<cache>/models--org--name/snapshots/<commit>``."""
        return self.folder.parents[2] if self.commit else None


def get_parser() -> argparse.ArgumentParser:
    """The ``brain-ldm-fetch`` parser; building it runs nothing."""
    parser = _OneLineErrorParser(
        prog=PROG, description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", metavar="MODEL",
                        help="Hub repo id of a brain_ldm.1 bundle (org/name), or a bundle folder")
    parser.add_argument("--revision", metavar="REV",
                        help="branch, tag or commit of MODEL on the Hub (default: main); the base "
                             "bundle's revision is the one MODEL's config.json pins")
    parser.add_argument("--cache-dir", type=Path, metavar="DIR",
                        help="Hugging Face hub cache to download into (default: $HF_HUB_CACHE, "
                             "else $HF_HOME/hub, else ~/.cache/huggingface/hub)")
    parser.add_argument("--no-verify", action="store_true",
                        help="do not check the weights files' sha256 against config.json")
    parser.add_argument("-v", "--verbose", action="store_true", help="show tracebacks on errors")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The HTTP client's connection/timeout errors (huggingface_hub ≥ 1 uses httpx2 or httpx)."""
    for module in ("httpx2", "httpx"):
        try:
            return (__import__(module).TransportError,)
        except (ImportError, AttributeError):
            continue
    import requests

    return (requests.exceptions.ConnectionError, requests.exceptions.Timeout)


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _check_reachable(repo_id: str, revision: str | None) -> None:
    """Ask the Hub for ``repo_id`` at ``revision`` so that failures are reported as what they are.

    Without this, ``snapshot_download`` falls back to an older cached snapshot when the Hub
    cannot be reached, and a fetch would pass without fetching.
    """
    from huggingface_hub import HfApi, constants
    from huggingface_hub import errors as hub_errors

    where = f"{repo_id}" + (f"@{revision}" if revision else "")
    try:
        HfApi().repo_info(repo_id, revision=revision)
    except hub_errors.HFValidationError:
        raise FetchError(
            f"{repo_id}: no such folder and not a valid Hub repo id ({ACCEPTED})"
        ) from None
    except hub_errors.RepositoryNotFoundError:
        raise FetchError(
            f"{repo_id}: no such model repo on {constants.ENDPOINT} (or it is private or gated and "
            f"no valid token is set: HF_TOKEN or `hf auth login`; {ACCEPTED})"
        ) from None
    except hub_errors.RevisionNotFoundError:
        raise FetchError(
            f"{where}: revision {revision!r} not found on {constants.ENDPOINT} "
            "(accepted: a branch, tag or commit of that repo)"
        ) from None
    except hub_errors.HfHubHTTPError as error:
        raise FetchError(f"{where}: {constants.ENDPOINT} answered {_first_line(error)}") from None
    except _transport_errors() as error:
        raise FetchError(
            f"{where}: cannot reach {constants.ENDPOINT} "
            f"({type(error).__name__}: {_first_line(error)}); "
            "run brain-ldm-fetch on a machine with network access, such as a login node"
        ) from None


def _hub_commit(folder: Path) -> str | None:
    """The commit of a Hugging Face cache snapshot folder, None for any other folder."""
    folder = Path(folder)
    if folder.parent.name == "snapshots" and _COMMIT.match(folder.name):
        return folder.name
    return None


def _verify(role: str, name: str, folder: Path, config, *, verify: bool) -> Fetched:
    from ..weights.bundle import sha256_of

    commit = _hub_commit(folder)
    label = f"{name}@{commit}" if commit else name
    weights = Path(folder) / config.weights_file
    if not weights.is_file():
        raise FetchError(f"{label}: weights file {config.weights_file} is missing from {folder}")
    if verify:
        digest = sha256_of(weights)
        if digest != config.weights_sha256:
            raise FetchError(
                f"{label}: {config.weights_file} has sha256 {digest} but its config.json says "
                f"{config.weights_sha256 or '(none)'}: the download is corrupt or the bundle's "
                f"files do not match ({weights}); do not use it"
            )
    return Fetched(role, name, Path(folder), config.weights_file, commit, verify)


def fetch(model: str, *, revision: str | None = None, cache_dir: Path | None = None,
          verify: bool = True) -> list[Fetched]:
    """Download (Hub) or find (folder) ``model`` and its base; verify both.

    Returns the model bundle first, then its base (a ``brain_ldm.vae`` MODEL: that one only).

    Raises:
        FetchError: one line naming the repo, folder or file and what went wrong; also when
            ``HF_HUB_OFFLINE`` is set and something would need downloading.
    """
    from huggingface_hub import constants

    from ..weights import bundle

    offline = constants.is_offline_mode()
    hub = {"cache_dir": cache_dir, "local_files_only": offline}
    local = Path(model).expanduser()
    try:
        if local.is_dir():
            folder, name = bundle.resolve_bundle(local.resolve()), str(local.resolve())
        elif model.startswith((".", "/", "~")) or model.count("/") > 1:
            raise FetchError(f"{model}: no such folder ({ACCEPTED})")
        else:
            if offline:
                raise FetchError(
                    f"{model}: cannot download it: HF_HUB_OFFLINE is set (downloads are off); run "
                    "brain-ldm-fetch on a machine with network access (a login node) with "
                    "HF_HUB_OFFLINE unset"
                )
            _check_reachable(model, revision)
            folder, name = bundle.resolve_bundle(model, revision=revision, **hub), model
        config = bundle.read_bundle_config(folder)
        role = "base" if isinstance(config, bundle.VAEBundleConfig) else "model"
        fetched = [_verify(role, name, folder, config, verify=verify)]
        if isinstance(config, bundle.ModelBundleConfig):
            base = config.base
            beside = base.path is not None and (Path(folder) / base.path).resolve().is_dir()
            if not beside and base.repo_id is not None and not offline:
                _check_reachable(base.repo_id, base.revision)
            vae_folder = bundle.resolve_base(folder, base, **hub)
            vae_config = bundle.read_bundle_config(vae_folder)
            if not isinstance(vae_config, bundle.VAEBundleConfig):
                raise FetchError(f"{vae_folder}: the base of {name} must be a {bundle.VAE_BUNDLE} "
                                 f"bundle, found {vae_config.bundle_type}")
            vae_name = str(vae_folder) if beside or base.repo_id is None else base.repo_id
            fetched.append(_verify("base", vae_name, vae_folder, vae_config, verify=verify))
    except bundle.BundleError as error:
        raise FetchError(_first_line(error)) from error
    return fetched


def report(fetched: list[Fetched]) -> str:
    """What a compute node needs: bundles and commits, the cache, the line to copy."""
    lines = []
    for item in fetched:
        where = f"commit {item.commit}" if item.commit else "bundle folder"
        check = "sha256 ok" if item.verified else "sha256 not checked (--no-verify)"
        lines.append(f"{item.role:<5}  {item.name}  {where}  {item.weights_file} {check}")
    caches = sorted({str(item.cache.absolute()) for item in fetched if item.cache})
    first = fetched[0]
    if not caches:
        lines.append("nothing needed downloading: both bundles are folders on this machine")
        target = ["--model", str(first.folder)]
        env = ""
    else:
        for cache in caches:
            lines.append(f"HF_HUB_CACHE={cache}")
        env = f"export HF_HUB_OFFLINE=1 HF_HUB_CACHE={shlex.quote(caches[0])}; "
        target = (["--model", first.name, "--revision", first.commit] if first.commit
                  else ["--model", str(first.folder)])
    if len(fetched) == 1:  # a brain_ldm.vae bundle on its own: not something to run
        lines.append("this is a base (brain_ldm.vae) bundle; "
                     "fetch the brain_ldm.1 model that names it too")
        if env:
            lines += ["on machines without network access:", f"  {env.rstrip('; ')}"]
    else:
        command = shlex.join(["brain-ldm-bids", "BIDS_DIR", "OUTPUT_DIR", "participant", *target])
        lines += ["on machines without network access (same cache folder, shared or copied):",
                  f"  {env}{command}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    if not sys.stderr.isatty():  # batch logs: no progress bars
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    try:
        fetched = fetch(args.model, revision=args.revision, cache_dir=args.cache_dir,
                        verify=not args.no_verify)
    except (FetchError, OSError) as error:
        if args.verbose:
            raise
        if isinstance(error, OSError) and error.filename:
            message = f"{error.filename}: {error.strerror}"
        else:
            message = _first_line(error)
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 1
    if args.revision and not fetched[0].commit:
        print(f"{PROG}: note: --revision is ignored for a bundle folder", file=sys.stderr)
    print(report(fetched))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
