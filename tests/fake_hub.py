"""A minimal Hugging Face Hub on loopback, for testing downloads without the network.

Serves model repos built from local folders, each at one fixed commit with branch ``main``,
through exactly the endpoints huggingface_hub 2.4's ``snapshot_download`` and
``hf_hub_download`` call (point ``HF_ENDPOINT`` at :attr:`FakeHub.url`):

* ``GET /api/models/{repo}`` and ``GET /api/models/{repo}/revision/{rev}`` — repo info
  (``HfApi.repo_info``: ``sha`` is the commit a revision resolves to);
* ``GET /api/models/{repo}/tree/{rev}[/{path}]`` — the file listing (``HfApi.list_repo_tree``),
  one page, no ``Link`` header;
* ``HEAD`` / ``GET /{repo}/resolve/{rev}/{filename}`` — a file, with ``X-Repo-Commit``,
  ``ETag`` and ``Content-Length``; ``*.safetensors`` are served as LFS files are (``lfs`` in
  the listing, ``X-Linked-Etag`` = sha256, ``X-Linked-Size``), the others as plain git blobs
  (etag = git blob sha1). No ``X-Xet-*`` headers nor ``xetHash``: clients use plain HTTP.

Errors carry the Hub's ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``,
``EntryNotFound``), which huggingface_hub maps to its exception types. Every request is
logged (:attr:`FakeHub.requests`); a request the fake does not implement is answered 404
and logged as unhandled, so tests can assert nothing unexpected was asked.

Bounded: the server shuts itself down after ``lifetime_s`` even if a test forgets to, and a
connection idle for ``idle_timeout_s`` is dropped. Only namespaced repo ids (``org/name``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import threading
from collections.abc import Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

_REPO = r"(?P<repo>[^/]+/[^/]+)"
_API = re.compile(
    rf"^/api/models/{_REPO}(?:/(?P<kind>revision|tree)/(?P<rev>[^/]+)(?P<rest>/.*)?)?$"
)
_RESOLVE = re.compile(rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


@dataclasses.dataclass(frozen=True)
class HubFile:
    """One file of a fake repo: its bytes and the identifiers the Hub reports for it."""

    path: str
    data: bytes

    @property
    def is_lfs(self) -> bool:
        return self.path.endswith(".safetensors")

    @property
    def git_sha1(self) -> str:
        """The git blob id (what the Hub's ``oid`` and plain files' ``ETag`` are)."""
        return hashlib.sha1(b"blob %d\0" % len(self.data) + self.data).hexdigest()

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def etag(self) -> str:
        return self.sha256 if self.is_lfs else self.git_sha1

    def tree_entry(self) -> dict:
        entry = {"type": "file", "path": self.path, "size": len(self.data), "oid": self.git_sha1}
        if self.is_lfs:
            entry["lfs"] = {"oid": self.sha256, "size": len(self.data), "pointerSize": 134}
        return entry


@dataclasses.dataclass(frozen=True)
class HubRepo:
    repo_id: str
    commit: str
    files: Mapping[str, HubFile]
    branch: str = "main"

    def resolves(self, revision: str) -> bool:
        return revision in (self.branch, self.commit)


@dataclasses.dataclass(frozen=True)
class LoggedRequest:
    method: str
    path: str
    status: int
    handled: bool


def fake_commit(repo_id: str) -> str:
    """A fixed 40-hex commit for ``repo_id`` (the same in every run)."""
    return hashlib.sha1(f"fake-hub:{repo_id}".encode()).hexdigest()


class FakeHub:
    """The server. ``add_repo`` before or while serving; ``start``/``stop`` or ``with``."""

    def __init__(self, *, lifetime_s: float = 120.0, idle_timeout_s: float = 10.0) -> None:
        self._repos: dict[str, HubRepo] = {}
        self._log: list[LoggedRequest] = []
        self._lock = threading.Lock()
        self._stop_lock = threading.Lock()
        self._lifetime_s = lifetime_s
        self._idle_timeout_s = idle_timeout_s
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._deadline: threading.Timer | None = None

    # -- content ---------------------------------------------------------------------------
    def add_repo(self, repo_id: str, folder: Path, *, commit: str | None = None) -> str:
        """Serve the files of ``folder`` (read now) as ``repo_id``; returns its commit."""
        commit = commit or fake_commit(repo_id)
        if not _COMMIT.match(commit) or repo_id.count("/") != 1:
            raise ValueError(f"{repo_id!r} at {commit!r}: need 'org/name' and a 40-hex commit")
        paths = [path for path in sorted(Path(folder).rglob("*")) if path.is_file()]
        names = [path.relative_to(folder).as_posix() for path in paths]
        files = {name: HubFile(name, path.read_bytes()) for name, path in zip(names, paths)}
        with self._lock:
            self._repos[repo_id] = HubRepo(repo_id, commit, files)
        return commit

    # -- lifecycle -------------------------------------------------------------------------
    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the fake hub is not running")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def port(self) -> int:
        return self._server.server_address[1] if self._server else 0

    def start(self) -> FakeHub:
        owner, idle_timeout_s = self, self._idle_timeout_s

        class Handler(_Handler):
            timeout = idle_timeout_s  # socket timeout per connection (idle keep-alive)

            def hub(self) -> FakeHub:  # noqa: D102
                return owner

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        server.block_on_close = False
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-hub", daemon=True)
        self._thread.start()
        self._deadline = threading.Timer(self._lifetime_s, self.stop)
        self._deadline.daemon = True
        self._deadline.start()
        return self

    def stop(self) -> None:
        """Stop serving, close the listening socket, then clear :attr:`running` (idempotent)."""
        with self._stop_lock:
            server = self._server
            if server is None:
                return
            if self._deadline is not None and self._deadline is not threading.current_thread():
                self._deadline.cancel()
            server.shutdown()
            server.server_close()
            if self._thread is not None:
                self._thread.join(timeout=5)
            self._server = None

    @property
    def running(self) -> bool:
        return self._server is not None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- request log -----------------------------------------------------------------------
    @property
    def requests(self) -> list[LoggedRequest]:
        with self._lock:
            return list(self._log)

    def unhandled(self) -> list[LoggedRequest]:
        return [request for request in self.requests if not request.handled]

    def downloads(self, repo_id: str) -> list[str]:
        """Files of ``repo_id`` sent in full (successful ``GET .../resolve/...``), in order."""
        files = []
        for request in self.requests:
            match = _RESOLVE.match(request.path)
            if (request.method == "GET" and match and match["repo"] == repo_id
                    and request.status == 200):
                files.append(match["file"])
        return files

    def _record(self, request: LoggedRequest) -> None:
        with self._lock:
            self._log.append(request)

    def _repo(self, repo_id: str) -> HubRepo | None:
        with self._lock:
            return self._repos.get(repo_id)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the Hub; every response has a Content-Length

    def hub(self) -> FakeHub:  # replaced by FakeHub.start
        raise NotImplementedError

    def log_message(self, format, *args):  # noqa: A002 - quiet: the hub keeps its own log
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server API
        self._dispatch(body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch(body=False)

    def _dispatch(self, *, body: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        if match := _RESOLVE.match(path):
            status = self._resolve(match["repo"], match["rev"], match["file"], body=body)
            handled = True
        elif body and (match := _API.match(path)):
            status = self._api(match["repo"], match["kind"], match["rev"], match["rest"])
            handled = True
        else:
            status = self._send(HTTPStatus.NOT_FOUND,
                                {"error": f"fake hub: {self.command} {path} not implemented"})
            handled = False
        self.hub()._record(LoggedRequest(self.command, path, status, handled))

    def _find(self, repo_id: str, revision: str, *, body: bool = True) -> HubRepo | int:
        repo = self.hub()._repo(repo_id)
        if repo is None:
            return self._send(HTTPStatus.NOT_FOUND, {"error": "Repository not found"}, body=body,
                              headers={"X-Error-Code": "RepoNotFound"})
        if not repo.resolves(revision):
            return self._send(HTTPStatus.NOT_FOUND, {"error": f"Invalid rev id: {revision}"},
                              body=body,
                              headers={"X-Error-Code": "RevisionNotFound"})
        return repo

    def _api(self, repo_id: str, kind: str | None, revision: str | None, rest: str | None) -> int:
        repo = self._find(repo_id, revision or "main")
        if isinstance(repo, int):
            return repo
        if kind == "tree":
            prefix = (rest or "/").strip("/")
            entries = [file.tree_entry() for path, file in repo.files.items()
                       if not prefix or path.startswith(prefix + "/")]
            return self._send(HTTPStatus.OK, entries)
        return self._send(HTTPStatus.OK, {
            "_id": repo.commit[:24], "id": repo.repo_id, "modelId": repo.repo_id,
            "sha": repo.commit,
            "private": False, "gated": False, "disabled": False, "tags": [],
            "siblings": [{"rfilename": path} for path in repo.files],
        })

    def _resolve(self, repo_id: str, revision: str, filename: str, *, body: bool) -> int:
        repo = self._find(repo_id, revision, body=body)
        if isinstance(repo, int):
            return repo
        file = repo.files.get(filename)
        if file is None:
            return self._send(HTTPStatus.NOT_FOUND, {"error": "Entry not found"}, body=body,
                              headers={"X-Error-Code": "EntryNotFound",
                                       "X-Repo-Commit": repo.commit})
        headers = {"X-Repo-Commit": repo.commit, "ETag": f'"{file.etag}"', "Accept-Ranges": "none",
                   "Content-Type": "application/octet-stream"}
        if file.is_lfs:
            headers |= {"X-Linked-Etag": f'"{file.sha256}"', "X-Linked-Size": str(len(file.data))}
        return self._send(HTTPStatus.OK, file.data, body=body, headers=headers)

    def _send(self, status: HTTPStatus, payload, *, body: bool = True,
              headers: Mapping[str, str] | None = None) -> int:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        for name, value in {"Content-Type": "application/json", **(headers or {})}.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)
        return int(status)
