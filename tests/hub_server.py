"""A small in-memory Hugging Face Hub that the real, unmodified ``huggingface_hub`` client can talk to on loopback.

It speaks the slice of the Hub's HTTP API that creating a repo, uploading a folder, reading repo info, listing
files and downloading them use (research/hf_mechanics.md §3.2), with git-like commit history per repo:

    POST /api/repos/create                        create a repo (409 if it exists; ``exist_ok`` relies on it)
    POST /api/repos/delete                        delete a repo
    POST /api/validate-yaml                       accepts everything (no server-side metadata validation)
    GET  /api/{models|datasets}/{repo}[/revision/{rev}]     repo info with ``siblings`` and ``cardData``
    GET  /api/{models|datasets}/{repo}/tree/{rev}[/{path}]  file listing (``recursive=true`` supported)
    POST /api/{models|datasets}/{repo}/preupload/{rev}      every file is ``regular``: no LFS, no xet
    POST /api/{models|datasets}/{repo}/commit/{rev}         NDJSON: ``header``, ``file``, ``deletedFile``,
                                                            ``deletedFolder``; ``lfsFile`` is refused
    GET|HEAD /[datasets/]{repo}/resolve/{rev}/{path}         file bytes with ``X-Repo-Commit``, ``ETag`` (git blob
                                                            sha1) and single ``Range`` support

Errors carry the Hub's ``X-Error-Code`` header (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``), so the
client raises its usual exceptions. Tokens are recorded but never checked; private repos are readable by anyone.
Only namespaced repo ids (``org/name``) are served; ``create_repo("name")`` puts it under ``fake-user``.

Standard library only (PyYAML, a dependency of huggingface_hub, is used to parse model-card metadata if present).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import itertools
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

DEFAULT_USER = "fake-user"
REPO_TYPES = {"models": "model", "datasets": "dataset"}
URL_PREFIX = {"model": "", "dataset": "datasets/"}
INITIAL_GITATTRIBUTES = (
    b"*.bin filter=lfs diff=lfs merge=lfs -text\n*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
)

_COMMIT_COUNTER = itertools.count()  # global, so commit ids stay unique across `reset()`


def git_blob_oid(data: bytes) -> str:
    """The git blob sha1 of ``data``: what the Hub reports as a regular file's ``oid`` and ``ETag``."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubError(Exception):
    """An error answer: HTTP status, the Hub's ``X-Error-Code`` (or None) and a message."""

    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass(frozen=True)
class Commit:
    oid: str
    parent: str | None
    message: str
    files: dict[str, bytes]  # the whole tree at this commit: path in repo -> content
    date: str


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    commits: list[Commit] = field(default_factory=list)
    branches: dict[str, str] = field(default_factory=dict)  # branch name -> commit oid

    def resolve(self, revision: str) -> Commit:
        oid = self.branches.get(revision, revision)
        for commit in self.commits:
            if commit.oid == oid:
                return commit
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")


@dataclass(frozen=True)
class Request:
    """One request as the server saw it (for assertions in tests)."""

    method: str
    path: str
    authorization: str | None


class FakeHub:
    """The Hub's state plus the HTTP server in front of it. ``FakeHub().start()`` binds ``127.0.0.1`` on a free port.

    Thread-safe: every read and write of the repos happens under one lock.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._repos: dict[tuple[str, str], Repo] = {}
        self.requests: list[Request] = []
        self.unhandled: list[str] = []  # "METHOD /path" of requests no route matched: a client the fake can't serve
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------------------
    def start(self) -> FakeHub:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        server.daemon_threads = True
        server.hub = self  # type: ignore[attr-defined]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the fake Hub is not running: call start() first")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # -- helpers for tests -------------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget every repo and request."""
        with self._lock:
            self._repos.clear()
            self.requests.clear()
            self.unhandled.clear()

    def repo_exists(self, repo_id: str, repo_type: str = "model") -> bool:
        with self._lock:
            return (repo_type, repo_id) in self._repos

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """The tree of ``repo_id`` at ``revision`` (a branch or a commit oid): path in repo -> bytes."""
        with self._lock:
            return dict(self._repo(repo_type, repo_id).resolve(revision).files)

    def commits(self, repo_id: str, repo_type: str = "model") -> list[Commit]:
        """The commit history of ``repo_id``, oldest first (the first is the repo's initial commit)."""
        with self._lock:
            return list(self._repo(repo_type, repo_id).commits)

    def seed(self, repo_id: str, files: dict[str, bytes], message: str = "seed", repo_type: str = "model") -> str:
        """Create ``repo_id`` if needed and commit ``files`` to ``main`` directly; returns the commit oid."""
        with self._lock:
            if (repo_type, repo_id) not in self._repos:
                self.create_repo(repo_type, repo_id, private=False)
            return self.commit(repo_type, repo_id, "main", message, add=files, delete=[])

    # -- the Hub's operations ----------------------------------------------------------------------------------------
    def create_repo(self, repo_type: str, repo_id: str, private: bool) -> Repo:
        with self._lock:
            if (repo_type, repo_id) in self._repos:
                raise HubError(409, f"You already created this {repo_type} repo: {repo_id}")
            repo = Repo(repo_type, repo_id, private)
            self._repos[(repo_type, repo_id)] = repo
            self._append_commit(repo, "main", "initial commit", {".gitattributes": INITIAL_GITATTRIBUTES})
            return repo

    def delete_repo(self, repo_type: str, repo_id: str) -> None:
        with self._lock:
            self._repo(repo_type, repo_id)
            del self._repos[(repo_type, repo_id)]

    def commit(self, repo_type: str, repo_id: str, branch: str, message: str, add: dict[str, bytes],
               delete: list[str], parent_commit: str | None = None) -> str:
        with self._lock:
            repo = self._repo(repo_type, repo_id)
            if branch not in repo.branches:
                raise HubError(400, f"Can only commit to a branch; {branch!r} is not one of {sorted(repo.branches)}")
            head = repo.resolve(branch)
            if parent_commit is not None and parent_commit != head.oid:
                raise HubError(412, f"A commit has happened since {parent_commit}. Please refresh and try again.")
            tree = dict(head.files)
            for path in delete:
                folder = path.rstrip("/") + "/"
                for existing in [p for p in tree if p == path or p.startswith(folder)]:
                    del tree[existing]
            tree.update(add)
            return self._append_commit(repo, branch, message, tree).oid

    def _append_commit(self, repo: Repo, branch: str, message: str, tree: dict[str, bytes]) -> Commit:
        parent = repo.branches.get(branch)
        listing = sorted((path, git_blob_oid(data)) for path, data in tree.items())
        seed = json.dumps([parent, listing, message, next(_COMMIT_COUNTER)]).encode()
        now = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        commit = Commit(hashlib.sha1(seed).hexdigest(), parent, message, tree, now)
        repo.commits.append(commit)
        repo.branches[branch] = commit.oid
        return commit

    def _repo(self, repo_type: str, repo_id: str) -> Repo:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None:
            raise HubError(404, f"Repository not found: {repo_type} {repo_id}", "RepoNotFound")
        return repo

    # -- JSON views --------------------------------------------------------------------------------------------------
    def repo_info(self, repo_type: str, repo_id: str, revision: str) -> dict:
        with self._lock:
            repo = self._repo(repo_type, repo_id)
            commit = repo.resolve(revision)
            card = _card_data(commit.files.get("README.md"))
            return {
                "_id": hashlib.sha1(f"{repo_type}/{repo_id}".encode()).hexdigest()[:24],
                "id": repo_id,
                "modelId": repo_id,
                "author": repo_id.split("/")[0],
                "sha": commit.oid,
                "lastModified": commit.date,
                "createdAt": repo.commits[0].date,
                "private": repo.private,
                "disabled": False,
                "gated": False,
                "tags": list(card.get("tags") or []) if isinstance(card, dict) else [],
                "library_name": card.get("library_name") if isinstance(card, dict) else None,
                "pipeline_tag": card.get("pipeline_tag") if isinstance(card, dict) else None,
                "cardData": card or None,
                "siblings": [
                    {"rfilename": path, "size": len(data), "blobId": git_blob_oid(data)}
                    for path, data in sorted(commit.files.items())
                ],
            }

    def tree(self, repo_type: str, repo_id: str, revision: str, path: str, recursive: bool) -> list[dict]:
        with self._lock:
            files = self._repo(repo_type, repo_id).resolve(revision).files
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        if prefix and not any(p.startswith(prefix) for p in files):
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
        entries: dict[str, dict] = {}
        for file_path, data in sorted(files.items()):
            if not file_path.startswith(prefix):
                continue
            parts = file_path[len(prefix):].split("/")
            for depth in range(1, len(parts)):  # the folders on the way down
                folder = prefix + "/".join(parts[:depth])
                entries.setdefault(folder, {"type": "directory", "oid": hashlib.sha1(folder.encode()).hexdigest(),
                                            "size": 0, "path": folder})
                if not recursive:
                    break
            if recursive or len(parts) == 1:
                entries[file_path] = {"type": "file", "oid": git_blob_oid(data), "size": len(data), "path": file_path}
        return list(entries.values())

    def preupload(self, repo_type: str, repo_id: str, revision: str, files: list[dict]) -> dict:
        with self._lock:
            repo = self._repo(repo_type, repo_id)
            head = repo.resolve(revision)
        answers = []
        for f in files:
            existing = head.files.get(f["path"])
            answers.append({"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                            "oid": git_blob_oid(existing) if existing is not None else None})
        return {"files": answers, "commitOid": head.oid}


def _card_data(readme: bytes | None) -> dict:
    if not readme:
        return {}
    match = re.match(rb"^---\s*\n(.*?)\n---\s*(\n|$)", readme, re.S)
    if not match:
        return {}
    try:
        import yaml

        data = yaml.safe_load(match.group(1).decode("utf-8"))
    except Exception:  # a broken card must not break repo info, as on the Hub
        return {}
    return data if isinstance(data, dict) else {}


def _parse_commit_payload(body: bytes) -> tuple[str, str | None, dict[str, bytes], list[str]]:
    """NDJSON commit payload -> (summary, parentCommit, files to add, paths to delete)."""
    summary, parent, add, delete = "", None, {}, []
    for line in body.decode("utf-8").splitlines():
        if not line.strip():
            continue
        op = json.loads(line)
        key, value = op.get("key"), op.get("value", {})
        if key == "header":
            summary, parent = value.get("summary", ""), value.get("parentCommit")
        elif key == "file":
            if value.get("encoding", "base64") != "base64":
                raise HubError(400, f"unsupported encoding {value.get('encoding')!r}")
            add[_check_path(value["path"])] = base64.b64decode(value["content"])
        elif key in ("deletedFile", "deletedFolder"):
            delete.append(_check_path(value["path"]))
        elif key == "lfsFile":
            raise HubError(400, "the fake Hub does not support LFS uploads (preupload answers 'regular' for all files)")
        else:
            raise HubError(400, f"the fake Hub does not support commit operation {key!r}")
    return summary, parent, add, delete


def _check_path(path: str) -> str:
    if not path or path.startswith("/") or any(part in ("", ".", "..") for part in path.rstrip("/").split("/")):
        raise HubError(400, f"Invalid path in repo: {path!r}")
    return path


_API = re.compile(r"^/api/(models|datasets)/([^/]+/[^/]+)(?:/(revision|tree|preupload|commit)/([^/]+)(/.*)?)?$")
_RESOLVE = re.compile(r"^/(datasets/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the real Hub; every answer carries a Content-Length
    server_version = "FakeHub/1.0"

    @property
    def hub(self) -> FakeHub:
        return self.server.hub  # type: ignore[attr-defined]

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - silence the default stderr access log
        pass

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

    # -- plumbing ----------------------------------------------------------------------------------------------------
    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        body = self._read_body()
        with self.hub._lock:
            self.hub.requests.append(Request(method, url.path, self.headers.get("Authorization")))
        try:
            self._route(method, url.path, parse_qs(url.query), body)
        except HubError as err:
            self._send_error(err)
        except (KeyError, ValueError, TypeError) as err:  # malformed request body
            self._send_error(HubError(400, f"Bad request: {type(err).__name__}: {err}"))

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None,
              content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, payload, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), headers)

    def _send_error(self, err: HubError) -> None:
        headers = {"X-Error-Message": err.message.encode("ascii", "replace").decode()}
        if err.code:
            headers["X-Error-Code"] = err.code
        self._send_json({"error": err.message}, err.status, headers)

    # -- routes ------------------------------------------------------------------------------------------------------
    def _route(self, method: str, path: str, query: dict[str, list[str]], body: bytes) -> None:
        if method == "POST" and path == "/api/repos/create":
            return self._create_repo(json.loads(body or b"{}"))
        if method in ("POST", "DELETE") and path == "/api/repos/delete":
            payload = json.loads(body or b"{}")
            self.hub.delete_repo(payload.get("type") or "model", _repo_id(payload))
            return self._send_json({})
        if method == "POST" and path == "/api/validate-yaml":
            return self._send_json({"errors": [], "warnings": []})
        if match := _API.match(path):
            return self._api(method, match, query, body)
        if (match := _RESOLVE.match(path)) and method in ("GET", "HEAD"):
            repo_type = "dataset" if match.group(1) else "model"
            return self._resolve(repo_type, match.group(2), unquote(match.group(3)), unquote(match.group(4)))
        self.hub.unhandled.append(f"{method} {path}")
        raise HubError(404, f"the fake Hub has no route for {method} {path}")

    def _create_repo(self, payload: dict) -> None:
        repo_type = payload.get("type") or "model"
        if repo_type not in URL_PREFIX:
            raise HubError(400, f"the fake Hub only serves model and dataset repos, not {repo_type!r}")
        repo_id = _repo_id(payload)
        url = f"{self.hub.url}/{URL_PREFIX[repo_type]}{repo_id}"
        private = bool(payload.get("private")) or payload.get("visibility") == "private"
        try:
            self.hub.create_repo(repo_type, repo_id, private)
        except HubError as err:
            return self._send_json({"error": err.message, "url": url}, err.status)
        self._send_json({"url": url, "name": repo_id, "id": repo_id})

    def _api(self, method: str, match: re.Match, query: dict[str, list[str]], body: bytes) -> None:
        repo_type, repo_id = REPO_TYPES[match.group(1)], match.group(2)
        action, revision, rest = match.group(3), unquote(match.group(4) or "main"), unquote(match.group(5) or "")
        if action is None or (action == "revision" and not rest):
            if method != "GET":
                raise HubError(405, f"{method} not allowed on repo info")
            return self._send_json(self.hub.repo_info(repo_type, repo_id, revision))
        if action == "tree" and method == "GET":
            recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
            return self._send_json(self.hub.tree(repo_type, repo_id, revision, rest, recursive))
        if action == "preupload" and method == "POST":
            return self._send_json(self.hub.preupload(repo_type, repo_id, revision, json.loads(body)["files"]))
        if action == "commit" and method == "POST":
            return self._commit(repo_type, repo_id, revision, query, body)
        self.hub.unhandled.append(f"{method} {match.group(0)}")
        raise HubError(404, f"the fake Hub has no route for {method} {match.group(0)}")

    def _commit(self, repo_type: str, repo_id: str, branch: str, query: dict[str, list[str]], body: bytes) -> None:
        if query.get("create_pr", ["0"])[0] not in ("0", "false", ""):
            raise HubError(400, "the fake Hub does not support pull requests (create_pr)")
        summary, parent, add, delete = _parse_commit_payload(body)
        oid = self.hub.commit(repo_type, repo_id, branch, summary, add, delete, parent_commit=parent)
        commit_url = f"{self.hub.url}/{URL_PREFIX[repo_type]}{repo_id}/commit/{oid}"
        self._send_json({"success": True, "commitUrl": commit_url, "commitOid": oid, "pullRequestUrl": None})

    def _resolve(self, repo_type: str, repo_id: str, revision: str, path: str) -> None:
        with self.hub._lock:
            commit = self.hub._repo(repo_type, repo_id).resolve(revision)
        data = commit.files.get(path)
        if data is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
        headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{git_blob_oid(data)}"', "Accept-Ranges": "bytes"}
        status, byte_range = 200, _parse_range(self.headers.get("Range"), len(data))
        if byte_range is not None:
            start, end = byte_range
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            status, data = 206, data[start:end + 1]
        self._send(status, data, headers, "application/octet-stream")


def _repo_id(payload: dict) -> str:
    name, organization = payload.get("name"), payload.get("organization")
    if not name:
        raise HubError(400, "missing repo name")
    if "/" in name:
        return name
    return f"{organization or DEFAULT_USER}/{name}"


def _parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    match = re.fullmatch(r"bytes=(\d*)-(\d*)", header or "")
    if not match or not any(match.groups()):
        return None
    first, last = match.groups()
    if not first:  # suffix range: the last N bytes
        return max(0, size - int(last)), size - 1
    start, end = int(first), min(int(last) if last else size - 1, size - 1)
    if start >= size or start > end:
        raise HubError(416, f"Range {header!r} not satisfiable for {size} bytes")
    return start, end
