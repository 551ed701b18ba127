"""A Hugging Face Hub-compatible HTTP server for tests, on 127.0.0.1 (standard library only).

The tests cannot reach huggingface.co, yet publishing and pulling adapters must run the real
``huggingface_hub`` client code. This server speaks the Hub's own HTTP API, the subset that
``create_repo``, ``upload_folder`` / ``create_commit`` (preupload, LFS batch + PUT + verify,
NDJSON commit), ``create_branch``, ``list_repo_refs``, ``list_repo_commits``, ``model_info``,
``list_repo_tree``, ``hf_hub_download`` and ``snapshot_download`` use, with the response
shapes and headers (``X-Repo-Commit``, ``ETag``, ``X-Linked-Etag``, ``X-Linked-Size``,
``X-Error-Code``) that the client reads. Commits have real 40-hex ids; branches move; large
and binary files go through LFS as on the Hub.

Point a client at it with ``HfApi(endpoint=hub.endpoint)`` (or ``endpoint=`` on the download
functions), or run a subprocess with ``env=hub.env()`` (``HF_ENDPOINT`` is read when
huggingface_hub is imported). Xet must be off (``HF_HUB_DISABLE_XET=1``; in-process:
``huggingface_hub.constants.HF_HUB_DISABLE_XET = True``): this server speaks classic LFS.

Failures come from the state, as on the Hub: an unknown repo answers 404 with
``X-Error-Code: RepoNotFound``, an unknown branch or commit ``RevisionNotFound``, a missing
file ``EntryNotFound``; ``stop()`` makes the Hub unreachable (connection refused, open
keep-alive connections cut) and ``start()`` brings it back on the same port.

Usage::

    with HubServer() as hub:
        api = HfApi(endpoint=hub.endpoint, token=hub.token)
        api.create_repo("me/adapter")
        ...
        sha = hub.commit("me/seeded", {"adapter_config.json": b"{}"})  # seed without a client
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re
import secrets
import socket
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import PurePosixPath
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

DEFAULT_TOKEN = "hf_loramux_test_token"
DEFAULT_USER = "loramux-tester"
GITATTRIBUTES = (
    b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
    b"*.bin filter=lfs diff=lfs merge=lfs -text\n"
    b"*.gguf filter=lfs diff=lfs merge=lfs -text\n"
    b"*.pt filter=lfs diff=lfs merge=lfs -text\n"
)
# Uploaded through LFS whatever their content, as the Hub's default .gitattributes says.
LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".ckpt", ".h5", ".onnx", ".npz")
LFS_MIN_SIZE = 10 * 1024 * 1024  # larger files go to LFS whatever they are
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
SHA1_RE = re.compile(r"^[0-9a-f]{40}$")
BAD_BRANCH_RE = re.compile(r"(^refs/|\.\.|^/|/$|[\s~^:?*\[\\])")


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob, as the Hub reports for regular files."""
    return hashlib.sha1(b"blob %d\x00" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return (
        f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()
    )


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass(frozen=True)
class HubFile:
    path: str
    size: int
    blob_id: str  # git sha1 of the content, or of the LFS pointer
    lfs_sha256: str | None = None  # set for LFS files; their bytes live in the LFS store
    content: bytes = b""  # regular files only

    @property
    def pointer_size(self) -> int:
        assert self.lfs_sha256 is not None
        return len(lfs_pointer(self.lfs_sha256, self.size))

    @property
    def etag(self) -> str:
        """What the client caches the file under: sha256 for LFS files, else the git blob id."""
        return self.lfs_sha256 or self.blob_id


@dataclass(frozen=True)
class HubCommit:
    sha: str
    parent: str | None
    title: str
    message: str
    date: str
    files: Mapping[str, HubFile]


@dataclass
class HubRepo:
    repo_id: str
    private: bool
    created_at: str
    object_id: str = field(default_factory=lambda: secrets.token_hex(12))
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, HubCommit] = field(default_factory=dict)
    lfs_oids: set[str] = field(default_factory=set)  # LFS objects uploaded for this repo

    def resolve(self, revision: str) -> HubCommit | None:
        """A branch name or a full commit id; None when the repo has no such revision."""
        if revision in self.branches:
            return self.commits[self.branches[revision]]
        if SHA1_RE.match(revision):
            return self.commits.get(revision)
        return None


class HubError(Exception):
    """An error answer, in the Hub's shape: status, X-Error-Code, JSON {"error": ...}."""

    def __init__(
        self, status: int, message: str, code: str | None = None, commit: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.commit = commit


class HubServer:
    """The Hub on 127.0.0.1, a random port; a context manager that starts and stops it.

    `token`: writes (and reads of private repos) need ``Authorization: Bearer <token>``;
    None makes the server accept anyone. Thread-safe; many clients may talk to it at once.
    """

    def __init__(
        self, *, token: str | None = DEFAULT_TOKEN, user: str = DEFAULT_USER, port: int = 0
    ) -> None:
        self.token = token
        self.user = user
        self._port = port
        self._lock = threading.RLock()
        self._repos: dict[str, HubRepo] = {}
        self._lfs: dict[str, bytes] = {}
        self._log: list[tuple[str, str]] = []
        self._counter = 0
        # What model_info reports as the commit instead of the real one: a misbehaving Hub
        # (or a proxy in between) for tests of what a client does with its answer.
        self.reported_sha: str | None = None
        # False: model_info lists files without their sizes, as some Hub mirrors and proxies
        # do (no `size`, no `lfs` block, even when asked for blobs).
        self.lists_sizes = True
        self._secret = secrets.token_hex(8)  # signs LFS upload URLs
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> HubServer:
        """Listen (again) on the same port; repos survive a stop/start."""
        if self._httpd is not None:
            return self
        self._httpd = _HTTPServer(("127.0.0.1", self._port), _Handler, self)
        self._port = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name=f"hub-server-{self._port}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Become unreachable: stop listening and cut open keep-alive connections."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        httpd.close_connections()
        if self._thread is not None:
            self._thread.join(timeout=10)

    @property
    def running(self) -> bool:
        return self._httpd is not None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._port

    @property
    def endpoint(self) -> str:
        """The value for HF_ENDPOINT / HfApi(endpoint=...)."""
        return f"http://127.0.0.1:{self._port}"

    @property
    def url(self) -> str:
        """Same as `endpoint` (the Hub's base URL)."""
        return self.endpoint

    def repo_url(self, repo_id: str) -> str:
        return f"{self.endpoint}/{repo_id}"

    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """Environment for a subprocess whose huggingface_hub should talk to this server."""
        import os

        env = dict(os.environ if base is None else base)
        env.update(
            HF_ENDPOINT=self.endpoint,
            HF_HUB_DISABLE_XET="1",
            HF_HUB_DISABLE_TELEMETRY="1",
            HF_HUB_DISABLE_PROGRESS_BARS="1",
        )
        if self.token:
            env["HF_TOKEN"] = self.token
        return env

    # -- direct access for tests (no HTTP) ------------------------------------------------------

    @property
    def requests(self) -> list[tuple[str, str]]:
        """(method, path with query) of every request served so far."""
        with self._lock:
            return list(self._log)

    def repo(self, repo_id: str) -> HubRepo:
        with self._lock:
            if repo_id not in self._repos:
                raise KeyError(repo_id)
            return self._repos[repo_id]

    def has_repo(self, repo_id: str) -> bool:
        with self._lock:
            return repo_id in self._repos

    def head(self, repo_id: str, branch: str = "main") -> str:
        with self._lock:
            return self.repo(repo_id).branches[branch]

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """Path -> content of every file at a revision (LFS files resolved)."""
        with self._lock:
            commit = self.repo(repo_id).resolve(revision)
            if commit is None:
                raise KeyError(revision)
            return {path: self._content(f) for path, f in commit.files.items()}

    def create_repo(self, repo_id: str, *, private: bool = False) -> str:
        """Make a repo with the Hub's initial commit (.gitattributes); returns that commit."""
        with self._lock:
            return self._create_repo(repo_id, private)

    def commit(
        self,
        repo_id: str,
        files: Mapping[str, bytes],
        *,
        branch: str = "main",
        message: str = "seed",
        private: bool = False,
    ) -> str:
        """Commit files straight into a repo (made if missing); returns the commit id."""
        with self._lock:
            if repo_id not in self._repos:
                self._create_repo(repo_id, private)
            repo = self._repos[repo_id]
            changes: dict[str, HubFile | None] = {}
            for path, data in files.items():
                if _goes_to_lfs(path, len(data), data[:512]):
                    oid = hashlib.sha256(data).hexdigest()
                    self._lfs[oid] = data
                    repo.lfs_oids.add(oid)
                    changes[path] = _lfs_file(path, oid, len(data))
                else:
                    changes[path] = HubFile(path, len(data), git_blob_sha1(data), content=data)
            return self._new_commit(repo, branch, message, "", changes).sha

    def create_branch(self, repo_id: str, branch: str, revision: str = "main") -> None:
        with self._lock:
            repo = self.repo(repo_id)
            commit = repo.resolve(revision)
            if commit is None:
                raise KeyError(revision)
            repo.branches[branch] = commit.sha

    def delete_repo(self, repo_id: str) -> None:
        with self._lock:
            self._repos.pop(repo_id, None)

    # -- state changes shared by HTTP and direct access ------------------------------------------

    def _create_repo(self, repo_id: str, private: bool) -> str:
        repo = HubRepo(repo_id=repo_id, private=private, created_at=_now())
        self._repos[repo_id] = repo
        attributes = HubFile(
            ".gitattributes",
            len(GITATTRIBUTES),
            git_blob_sha1(GITATTRIBUTES),
            content=GITATTRIBUTES,
        )
        return self._new_commit(
            repo, "main", "initial commit", "", {".gitattributes": attributes}, new_branch=True
        ).sha

    def _new_commit(
        self,
        repo: HubRepo,
        branch: str,
        title: str,
        message: str,
        changes: Mapping[str, HubFile | None],
        *,
        new_branch: bool = False,
    ) -> HubCommit:
        parent = None if new_branch else repo.branches[branch]
        files = dict(repo.commits[parent].files) if parent else {}
        for path, change in changes.items():
            if change is None:
                files.pop(path, None)
            else:
                files[path] = change
        self._counter += 1
        tree = "\n".join(f"{p} {f.blob_id}" for p, f in sorted(files.items()))
        seed = f"tree {tree}\nparent {parent}\n{title}\n{message}\n{_now()}\n{self._counter}"
        commit = HubCommit(
            sha=hashlib.sha1(seed.encode()).hexdigest(),
            parent=parent,
            title=title,
            message=message,
            date=_now(),
            files=files,
        )
        repo.commits[commit.sha] = commit
        repo.branches[branch] = commit.sha
        return commit

    def _content(self, f: HubFile) -> bytes:
        return self._lfs[f.lfs_sha256] if f.lfs_sha256 else f.content

    def _record(self, method: str, path: str) -> None:
        with self._lock:
            self._log.append((method, path))


def _goes_to_lfs(path: str, size: int, sample: bytes) -> bool:
    """The Hub's rule of thumb: known binary types, large files, and content with NUL bytes."""
    return path.endswith(LFS_SUFFIXES) or size >= LFS_MIN_SIZE or b"\x00" in sample


def _lfs_file(path: str, oid: str, size: int) -> HubFile:
    return HubFile(path, size, git_blob_sha1(lfs_pointer(oid, size)), lfs_sha256=oid)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type, hub: HubServer) -> None:
        self.hub = hub
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, handler)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._connections_lock:
                self._connections.discard(request)

    def close_connections(self) -> None:
        with self._connections_lock:
            for connection in list(self._connections):
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects
    server: _HTTPServer
    body: bytes = b""
    query: dict[str, list[str]]

    # -- plumbing --------------------------------------------------------------------------------

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    @property
    def hub(self) -> HubServer:
        return self.server.hub

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline().strip():  # trailers
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _json_body(self) -> Any:
        try:
            return json.loads(self.body or b"{}")
        except json.JSONDecodeError as exc:
            raise HubError(400, f"invalid JSON body: {exc}") from exc

    def _send(
        self,
        status: int,
        body: bytes = b"",
        *,
        content_type: str = "application/json",
        headers: Mapping[str, str] | None = None,
        length: int | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _send_json(
        self, value: Any, status: int = 200, content_type: str = "application/json"
    ) -> None:
        self._send(status, json.dumps(value).encode(), content_type=content_type)

    def _send_error(self, error: HubError) -> None:
        # Header values go out as latin-1: escape the rest (a revision like "Ā" broke the reply).
        first_line = error.message.splitlines()[0][:200]
        headers = {"X-Error-Message": first_line.encode("ascii", "backslashreplace").decode()}
        if error.code:
            headers["X-Error-Code"] = error.code
        if error.commit:
            headers["X-Repo-Commit"] = error.commit
        self._send(error.status, json.dumps({"error": error.message}).encode(), headers=headers)

    def _dispatch(self, method: str) -> None:
        self.hub._record(method, self.path)
        self.body = self._read_body() if method in ("POST", "PUT", "DELETE") else b""
        split = urlsplit(self.path)
        self.query = parse_qs(split.query)
        segments = [unquote(s) for s in split.path.strip("/").split("/")] if split.path else []
        try:
            self._route(method, segments)
        except HubError as error:
            self._send_error(error)
        except Exception as exc:  # a bug here must show as an error, not a hang
            self._send_error(HubError(500, f"test hub server error: {exc!r}"))

    # -- auth ------------------------------------------------------------------------------------

    def _authenticated(self) -> bool:
        if self.hub.token is None:
            return True
        return self.headers.get("Authorization", "") == f"Bearer {self.hub.token}"

    def _require_auth(self) -> None:
        if not self._authenticated():
            raise HubError(401, "Invalid credentials in Authorization header")

    def _repo(self, repo_id: str) -> HubRepo:
        repo = self.hub._repos.get(repo_id)
        if repo is None or (repo.private and not self._authenticated()):
            raise HubError(404, f"Repository Not Found for {repo_id}", "RepoNotFound")
        return repo

    def _commit(self, repo: HubRepo, revision: str) -> HubCommit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    # -- routes ----------------------------------------------------------------------------------

    def _route(self, method: str, s: list[str]) -> None:
        hub = self.hub
        with hub._lock:
            if s[:2] == ["api", "whoami-v2"] and method == "GET":
                return self._whoami()
            if s[:2] == ["api", "agent-harnesses"] and method == "GET":
                return self._send_json({"standardEnvVars": [], "harnesses": {}})
            if s[:2] == ["api", "validate-yaml"] and method == "POST":
                return self._validate_yaml()
            if s[:3] == ["api", "repos", "create"] and method == "POST":
                return self._create_repo()
            if s[:3] == ["api", "repos", "delete"] and method == "DELETE":
                return self._delete_repo()
            if len(s) >= 4 and s[:2] == ["api", "models"]:
                return self._model_api(method, f"{s[2]}/{s[3]}", s[4:])
            if len(s) >= 2 and s[0] == "api" and s[1] in ("datasets", "spaces"):
                raise HubError(404, "this test Hub only hosts model repos", "RepoNotFound")
            if (
                len(s) == 6
                and s[1].endswith(".git")
                and s[2:] == ["info", "lfs", "objects", "batch"]
            ):
                return self._lfs_batch(f"{s[0]}/{s[1][: -len('.git')]}")
            if len(s) == 4 and s[0] == "lfs-upload" and method == "PUT":
                return self._lfs_put(f"{s[1]}/{s[2]}", s[3])
            if len(s) == 4 and s[0] == "lfs-verify" and method == "POST":
                return self._lfs_verify(f"{s[1]}/{s[2]}", s[3])
            if len(s) >= 5 and s[2] == "resolve" and method in ("GET", "HEAD"):
                return self._resolve(f"{s[0]}/{s[1]}", s[3], "/".join(s[4:]))
        raise HubError(404, f"no route for {method} {self.path}")

    def _model_api(self, method: str, repo_id: str, rest: list[str]) -> None:
        if not rest and method == "GET":
            return self._model_info(repo_id, "main")
        head = rest[0] if rest else ""
        if head == "revision" and len(rest) == 2 and method == "GET":
            return self._model_info(repo_id, rest[1])
        if head == "tree" and len(rest) >= 2 and method == "GET":
            return self._tree(repo_id, rest[1], "/".join(rest[2:]))
        if head == "refs" and method == "GET":
            return self._refs(repo_id)
        if head == "commits" and len(rest) == 2 and method == "GET":
            return self._commits(repo_id, rest[1])
        if head == "preupload" and len(rest) == 2 and method == "POST":
            return self._preupload(repo_id, rest[1])
        if head == "commit" and len(rest) == 2 and method == "POST":
            return self._commit_api(repo_id, rest[1])
        if head == "branch" and len(rest) == 2 and method in ("POST", "DELETE"):
            return self._branch(method, repo_id, rest[1])
        raise HubError(404, f"no route for {method} {self.path}")

    def _whoami(self) -> None:
        if self.hub.token is not None and not self._authenticated():
            raise HubError(401, "Invalid credentials in Authorization header")
        self._send_json(
            {
                "type": "user",
                "id": "0" * 24,
                "name": self.hub.user,
                "fullname": "LoRAMux Tester",
                "email": None,
                "emailVerified": False,
                "isPro": False,
                "orgs": [],
                "auth": {
                    "type": "access_token",
                    "accessToken": {"displayName": "test", "role": "write"},
                },
            }
        )

    def _validate_yaml(self) -> None:
        body = self._json_body()
        metadata, error = _front_matter(str(body.get("content", "")))
        if error:
            return self._send_json({"errors": [{"message": error}], "warnings": []}, 400)
        if metadata is None:
            warning = {"message": "empty or missing yaml metadata in repo card"}
            return self._send_json({"errors": [], "warnings": [warning]})
        errors = []
        for key in ("tags", "base_model", "datasets", "language"):
            value = metadata.get(key)
            if value is not None and not (
                isinstance(value, str)
                or (isinstance(value, list) and all(isinstance(v, str) for v in value))
            ):
                errors.append({"message": f'"{key}" must be a string or a list of strings'})
        for key in ("library_name", "pipeline_tag", "license"):
            if metadata.get(key) is not None and not isinstance(metadata[key], str):
                errors.append({"message": f'"{key}" must be a string'})
        self._send_json({"errors": errors, "warnings": []}, 400 if errors else 200)

    def _create_repo(self) -> None:
        self._require_auth()
        body = self._json_body()
        if body.get("type") not in (None, "model"):
            raise HubError(400, "this test Hub only hosts model repos")
        name, organization = body.get("name"), body.get("organization") or self.hub.user
        if not isinstance(name, str) or not re.fullmatch(r"[\w.\-]{1,96}", name):
            raise HubError(400, f"invalid repo name {name!r}")
        repo_id = f"{organization}/{name}"
        url = self.hub.repo_url(repo_id)
        if repo_id in self.hub._repos:
            return self._send_json(
                {"error": "You already created this model repo", "url": url}, 409
            )
        self.hub._create_repo(repo_id, body.get("visibility") == "private")
        self._send_json({"url": url, "name": repo_id, "id": self.hub._repos[repo_id].object_id})

    def _delete_repo(self) -> None:
        self._require_auth()
        body = self._json_body()
        repo_id = f"{body.get('organization') or self.hub.user}/{body.get('name')}"
        self._repo(repo_id)
        del self.hub._repos[repo_id]
        self._send_json({})

    def _model_info(self, repo_id: str, revision: str) -> None:
        repo = self._repo(repo_id)
        commit = self._commit(repo, revision)
        blobs = self.query.get("blobs", ["false"])[0].lower() in ("1", "true")
        siblings = []
        for path, f in sorted(commit.files.items()):
            sibling: dict[str, Any] = {"rfilename": path}
            if blobs and self.hub.lists_sizes:
                sibling.update(size=f.size, blobId=f.blob_id)
                if f.lfs_sha256:
                    sibling["lfs"] = {
                        "size": f.size,
                        "sha256": f.lfs_sha256,
                        "pointerSize": f.pointer_size,
                    }
            siblings.append(sibling)
        card = None
        if "README.md" in commit.files:
            card, _ = _front_matter(self.hub._content(commit.files["README.md"]).decode("utf-8"))
        tags = card.get("tags", []) if card else []
        self._send_json(
            {
                "_id": repo.object_id,
                "id": repo_id,
                "modelId": repo_id,
                "author": repo_id.split("/")[0],
                "sha": commit.sha if self.hub.reported_sha is None else self.hub.reported_sha,
                "lastModified": commit.date,
                "createdAt": repo.created_at,
                "private": repo.private,
                "gated": False,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "library_name": card.get("library_name") if card else None,
                "pipeline_tag": card.get("pipeline_tag") if card else None,
                "tags": [tags] if isinstance(tags, str) else tags,
                "cardData": card,
                "siblings": siblings,
                "spaces": [],
                "usedStorage": sum(f.size for f in commit.files.values()),
            }
        )

    def _tree(self, repo_id: str, revision: str, folder: str) -> None:
        repo = self._repo(repo_id)
        commit = self._commit(repo, revision)
        recursive = self.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        prefix = f"{folder.strip('/')}/" if folder.strip("/") else ""
        entries: list[dict[str, Any]] = []
        folders: set[str] = set()
        for path, f in sorted(commit.files.items()):
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix) :]
            parents = list(PurePosixPath(rest).parents)[:-1]  # the folders between, deepest first
            for parent in reversed(parents):
                sub = prefix + parent.as_posix()
                if sub not in folders and (recursive or "/" not in parent.as_posix()):
                    folders.add(sub)
                    oid = hashlib.sha1(f"tree {commit.sha} {sub}".encode()).hexdigest()
                    entries.append({"type": "directory", "oid": oid, "size": 0, "path": sub})
            if "/" in rest and not recursive:
                continue
            entry: dict[str, Any] = {"type": "file", "oid": f.blob_id, "size": f.size, "path": path}
            if f.lfs_sha256:
                entry["lfs"] = {"oid": f.lfs_sha256, "size": f.size, "pointerSize": f.pointer_size}
            entries.append(entry)
        if prefix and not entries:
            raise HubError(
                404, f"{folder} does not exist at {revision}", "EntryNotFound", commit.sha
            )
        self._send_json(entries)

    def _refs(self, repo_id: str) -> None:
        repo = self._repo(repo_id)
        branches = [
            {"name": name, "ref": f"refs/heads/{name}", "targetCommit": sha}
            for name, sha in sorted(repo.branches.items())
        ]
        self._send_json({"branches": branches, "converts": [], "tags": [], "pullRequests": []})

    def _commits(self, repo_id: str, revision: str) -> None:
        repo = self._repo(repo_id)
        commit: HubCommit | None = self._commit(repo, revision)
        history = []
        while commit is not None:
            history.append(
                {
                    "id": commit.sha,
                    "title": commit.title,
                    "message": commit.message,
                    "authors": [{"user": self.hub.user}],
                    "date": commit.date,
                }
            )
            commit = repo.commits[commit.parent] if commit.parent else None
        self._send_json(history)

    def _branch(self, method: str, repo_id: str, branch: str) -> None:
        self._require_auth()
        repo = self._repo(repo_id)
        if method == "DELETE":
            if branch not in repo.branches:
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            if branch == "main":
                raise HubError(403, "cannot delete the default branch")
            del repo.branches[branch]
            return self._send_json({})
        if BAD_BRANCH_RE.search(branch) or not branch:
            raise HubError(400, f"Invalid reference for a branch: {branch}")
        if branch in repo.branches:
            raise HubError(409, "Reference already exists")
        start = self._json_body().get("startingPoint") or "main"
        repo.branches[branch] = self._commit(repo, start).sha
        self._send_json({})

    def _writable_branch(self, repo: HubRepo, revision: str) -> str:
        if self.query.get("create_pr"):
            raise HubError(400, "this test Hub does not support pull requests")
        if revision not in repo.branches:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return revision

    def _preupload(self, repo_id: str, revision: str) -> None:
        self._require_auth()
        repo = self._repo(repo_id)
        head = repo.commits[repo.branches[self._writable_branch(repo, revision)]]
        answers = []
        for item in self._json_body().get("files", []):
            path, size = item["path"], int(item["size"])
            sample = base64.b64decode(item.get("sample", ""))
            existing = head.files.get(path)
            answers.append(
                {
                    "path": path,
                    "uploadMode": "lfs" if _goes_to_lfs(path, size, sample) else "regular",
                    "shouldIgnore": False,
                    "oid": existing.etag if existing else None,
                }
            )
        self._send_json({"files": answers, "commitOid": head.sha})

    def _lfs_batch(self, repo_id: str) -> None:
        self._require_auth()
        repo = self._repo(repo_id)
        body = self._json_body()
        if body.get("operation") != "upload":
            raise HubError(400, "this test Hub only supports LFS uploads")
        objects = []
        for obj in body.get("objects", []):
            oid, size = obj.get("oid"), obj.get("size")
            if not isinstance(oid, str) or not SHA256_RE.match(oid) or not isinstance(size, int):
                objects.append(
                    {"oid": str(oid), "size": -1, "error": {"code": 422, "message": "bad object"}}
                )
                continue
            answer: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if oid in self.hub._lfs and len(self.hub._lfs[oid]) == size:
                repo.lfs_oids.add(oid)  # already stored: no upload action, as on the Hub
            else:
                signed = f"{self.hub.endpoint}/lfs-upload/{repo_id}/{oid}?sig={self.hub._secret}"
                answer["actions"] = {
                    "upload": {"href": signed},
                    "verify": {"href": f"{self.hub.endpoint}/lfs-verify/{repo_id}/{oid}"},
                }
            objects.append(answer)
        self._send_json(
            {"transfer": "basic", "objects": objects}, content_type="application/vnd.git-lfs+json"
        )

    def _lfs_put(self, repo_id: str, oid: str) -> None:
        # The URL is pre-signed (as S3's): it carries its own credential, no token.
        repo = self.hub._repos.get(repo_id)
        if repo is None or self.query.get("sig") != [self.hub._secret]:
            raise HubError(403, "bad or missing upload signature")
        if hashlib.sha256(self.body).hexdigest() != oid:
            raise HubError(400, "uploaded content does not match its sha256 oid")
        self.hub._lfs[oid] = self.body
        repo.lfs_oids.add(oid)
        self._send(200, b"", headers={"ETag": f'"{oid}"'})

    def _lfs_verify(self, repo_id: str, oid: str) -> None:
        self._require_auth()
        repo = self._repo(repo_id)
        size = self._json_body().get("size")
        if oid not in repo.lfs_oids or len(self.hub._lfs.get(oid, b"")) != size:
            raise HubError(404, f"LFS object {oid} not found")
        self._send_json({})

    def _commit_api(self, repo_id: str, revision: str) -> None:
        self._require_auth()
        repo = self._repo(repo_id)
        branch = self._writable_branch(repo, revision)
        lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "the commit payload must start with a header line")
        header = lines[0]["value"]
        parent = header.get("parentCommit")
        if parent and parent != repo.branches[branch]:
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        head = repo.commits[repo.branches[branch]]
        changes: dict[str, HubFile | None] = {}
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value", {})
            path = value.get("path", "")
            if key == "file":
                data = base64.b64decode(value["content"])
                changes[path] = HubFile(path, len(data), git_blob_sha1(data), content=data)
            elif key == "lfsFile":
                oid = value["oid"]
                if oid not in repo.lfs_oids:
                    raise HubError(400, f"LFS object {oid} for {path} was never uploaded")
                changes[path] = _lfs_file(path, oid, len(self.hub._lfs[oid]))
            elif key == "deletedFile":
                if path not in head.files:
                    raise HubError(404, f"{path} does not exist", "EntryNotFound", head.sha)
                changes[path] = None
            elif key == "deletedFolder":
                prefix = path.rstrip("/") + "/"
                for existing in head.files:
                    if existing.startswith(prefix):
                        changes[existing] = None
            else:
                raise HubError(400, f"unknown commit operation {key!r}")
        commit = self.hub._new_commit(
            repo,
            branch,
            str(header.get("summary") or "update"),
            header.get("description", ""),
            changes,
        )
        self._send_json(
            {
                "success": True,
                "commitOid": commit.sha,
                "commitUrl": f"{self.hub.repo_url(repo_id)}/commit/{commit.sha}",
                "hookOutput": "",
            }
        )

    def _resolve(self, repo_id: str, revision: str, path: str) -> None:
        repo = self._repo(repo_id)
        commit = self._commit(repo, revision)
        f = commit.files.get(path)
        if f is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", commit.sha)
        headers = {
            "X-Repo-Commit": commit.sha,
            "ETag": f'"{f.blob_id}"',
            "Accept-Ranges": "bytes",
            "Content-Disposition": f'inline; filename="{PurePosixPath(path).name}"',
        }
        if f.lfs_sha256:
            headers["X-Linked-Etag"] = f'"{f.lfs_sha256}"'
            headers["X-Linked-Size"] = str(f.size)
        data = self.hub._content(f)
        status = 200
        byte_range = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if byte_range and self.command == "GET":
            start = int(byte_range[1])
            end = int(byte_range[2]) if byte_range[2] else len(data) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data, status = data[start : end + 1], 206
        self._send(status, data, content_type="application/octet-stream", headers=headers)


def _front_matter(text: str) -> tuple[dict[str, Any] | None, str | None]:
    """(metadata, error) of a model card's YAML block; (None, None) when it has none."""
    import yaml

    if not text.startswith("---"):
        return None, None
    end = text.find("\n---", 3)
    if end == -1:
        return None, "the YAML block is not closed by a '---' line"
    try:
        metadata = yaml.safe_load(text[3:end])
    except yaml.YAMLError as exc:
        return None, f"invalid YAML: {exc}"
    if metadata is None:
        return None, None
    if not isinstance(metadata, dict):
        return None, "the YAML block must be a mapping"
    return metadata, None


@contextlib.contextmanager
def local_hub(token: str | None = None) -> Iterator[HubServer]:
    """A running HubServer for huggingface_hub clients in this process (Xet transfers off:
    this Hub speaks the plain HTTP protocol)."""
    import huggingface_hub.constants

    huggingface_hub.constants.HF_HUB_DISABLE_XET = True
    with HubServer(token=token) as server:
        yield server
