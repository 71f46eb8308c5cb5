"""Local stand-ins for the Hugging Face and ModelScope hub APIs, on 127.0.0.1 with a free port.

Each records every request (method, path, query, headers, body) and answers the endpoints the
official clients call for create-repo / upload / download with the shapes those clients expect.
Unknown requests get 404 and are recorded, so a test sees exactly what a client asked for.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse


@dataclass
class Request:
    method: str
    path: str
    query: dict
    headers: dict
    body: bytes

    def json(self):
        return json.loads(self.body or b"null")


@dataclass
class FakeHub:
    """A running server; `requests` is everything it received, `repos` what it stores."""

    kind: str
    requests: list[Request] = field(default_factory=list)
    repos: dict = field(default_factory=dict)  # repo_id -> {"private": bool, "files": {path: bytes}}
    datasets: dict = field(default_factory=dict)  # repo_id -> {"files": {path: bytes}} (ModelScope data sets)
    blobs: dict = field(default_factory=dict)  # sha256 -> bytes uploaded through git-LFS (ModelScope)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _handler(hub: FakeHub, routes):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def _serve(self, method: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":  # noqa: SIM102
                body = _read_chunked(self.rfile)
            url = urlparse(self.path)
            headers = {k.lower(): v for k, v in self.headers.items()}
            request = Request(method, unquote(url.path), parse_qs(url.query), headers, body)
            hub.requests.append(request)
            for route_method, prefix, suffix, fn in routes:
                if method == route_method and request.path.startswith(prefix) and request.path.endswith(suffix):
                    status, headers, payload = fn(hub, request)
                    break
            else:
                status, headers, payload = 404, {"Content-Type": "application/json"}, b'{"error": "not found"}'
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if method != "HEAD":
                self.wfile.write(payload)

        def do_GET(self):
            self._serve("GET")

        def do_HEAD(self):
            self._serve("HEAD")

        def do_POST(self):
            self._serve("POST")

        def do_PUT(self):
            self._serve("PUT")

    return Handler


def _read_chunked(stream) -> bytes:
    out = b""
    while True:
        size = int(stream.readline().strip() or b"0", 16)
        if size == 0:
            stream.readline()
            return out
        out += stream.read(size)
        stream.readline()


def _json(payload, status: int = 200, headers: dict | None = None):
    return status, {"Content-Type": "application/json", **(headers or {})}, json.dumps(payload).encode()


# -- Hugging Face ---------------------------------------------------------------------------------
def _hf_create(hub, req):
    data = req.json()
    repo_id = f"{data['organization']}/{data['name']}" if data.get("organization") else data["name"]
    hub.repos.setdefault(repo_id, {"private": data.get("visibility") == "private", "files": {}})
    return _json({"url": f"{hub.url}/{repo_id}", "name": repo_id, "id": "0"})


def _hf_repo(path: str, marker: str) -> str:
    return path.split("/api/models/", 1)[1].split(marker, 1)[0]


def _hf_preupload(hub, req):
    files = req.json()["files"]
    return _json({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})


def _hf_commit(hub, req):
    repo_id = _hf_repo(req.path, "/commit/")
    repo = hub.repos.setdefault(repo_id, {"private": None, "files": {}})
    for line in req.body.decode().splitlines():
        item = json.loads(line)
        if item["key"] == "file":
            repo["files"][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
        elif item["key"] == "header":
            repo["summary"] = item["value"].get("summary")
    return _json({"commitUrl": f"{hub.url}/{repo_id}/commit/abc123", "commitOid": "abc123", "pullRequestUrl": None})


HF_ROUTES = [
    ("POST", "/api/repos/create", "", _hf_create),
    ("POST", "/api/validate-yaml", "", lambda hub, req: _json({})),
    ("POST", "/api/models/", "/preupload/main", _hf_preupload),
    ("POST", "/api/models/", "/commit/main", _hf_commit),
]


def start(kind: str, routes=None) -> FakeHub:
    hub = FakeHub(kind)
    table = routes if routes is not None else {"huggingface": HF_ROUTES, "modelscope": MS_ROUTES}[kind]
    hub.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub, table))
    threading.Thread(target=hub.server.serve_forever, daemon=True).start()
    return hub


# -- ModelScope ------------------------------------------------------------------------------------
MS_ROUTES: list = []


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _ms_ok(data=None):
    return _json({"Code": 200, "Success": True, "Message": "success", "RequestId": "r1", "Data": data or {}})


def _ms_create(hub, req):
    data = req.json()
    repo_id = f"{data['Path']}/{data['Name']}"
    if repo_id in hub.repos:  # as the real hub: creating an existing repository is an error
        return _json({"Code": 10010205, "Success": False, "Message": "repo already exists", "RequestId": "r2"}, 400)
    hub.repos[repo_id] = {"private": data.get("Visibility") == 1, "visibility": data.get("Visibility"), "files": {}}
    return _ms_ok({"Path": data["Path"], "Name": data["Name"]})


def _ms_repo(path: str, marker: str) -> str:
    return path.split("/api/v1/repos/models/", 1)[1].split(marker, 1)[0]


def _ms_lfs_batch(hub, req):
    objects = req.json()["objects"]
    answer = [
        {
            "oid": o["oid"],
            "size": o["size"],
            "actions": {"upload": {"href": f"{hub.url}/lfs-upload/{o['oid']}", "header": {}}},
        }
        for o in objects
    ]
    return _json({"transfer": "basic", "objects": answer})


def _ms_lfs_put(hub, req):
    hub.blobs[req.path.rsplit("/", 1)[1]] = req.body
    return 200, {}, b""


def _ms_commit(hub, req):
    repo = hub.repos[_ms_repo(req.path, "/commit/")]
    data = req.json()
    for action in data["actions"]:
        if action.get("type") == "lfs":
            repo["files"][action["path"]] = hub.blobs[action["sha256"]]
        else:
            repo["files"][action["path"]] = base64.b64decode(action.get("content") or "")
    repo["message"] = data.get("commit_message")
    return _ms_ok({"CommitId": "abc123"})


def _ms_store(hub, path: str) -> tuple[dict, str]:
    kind = path.split("/api/v1/", 1)[1].split("/", 1)[0]
    owner, name = path.split(f"/api/v1/{kind}/", 1)[1].split("/")[:2]
    return (hub.repos if kind == "models" else hub.datasets), f"{owner}/{name}"


def _ms_files(hub, req):
    store, repo_id = _ms_store(hub, req.path)
    if repo_id not in store:
        return _json({"Code": 10010201, "Success": False, "Message": "repo not found"}, 404)
    files = [
        {"Name": path.rsplit("/", 1)[-1], "Path": path, "Type": "blob", "Size": len(data), "Sha256": sha256(data),
         "Revision": "abc123", "IsLFS": path.endswith(".safetensors")}
        for path, data in sorted(store[repo_id]["files"].items())
    ]  # fmt: skip
    return _ms_ok({"Files": files})


def _ms_file(hub, req):
    store, repo_id = _ms_store(hub, req.path)
    path = req.query.get("FilePath", [""])[0]
    data = store.get(repo_id, {}).get("files", {}).get(path)
    if data is None:
        return _json({"Code": 10010202, "Success": False, "Message": "file not found"}, 404)
    return 200, {"Content-Type": "application/octet-stream"}, data


MS_ROUTES[:] = [
    ("GET", "/api/v1/models/", "/repo/files", _ms_files),
    ("GET", "/api/v1/models/", "/repo", _ms_file),
    ("GET", "/api/v1/datasets/", "/repo/tree", _ms_files),
    ("GET", "/api/v1/datasets/", "/repo", _ms_file),
    ("POST", "/api/v1/models", "/models", _ms_create),
    ("POST", "/api/v1/repos/models/", "/info/lfs/objects/batch", _ms_lfs_batch),
    ("PUT", "/lfs-upload/", "", _ms_lfs_put),
    ("POST", "/api/v1/repos/models/", "/commit/master", _ms_commit),
]
