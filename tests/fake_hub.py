"""A tiny stand-in for the Hugging Face Hub on 127.0.0.1: just what `huggingface_hub` and `datasets` need to create a
repo and commit files to it (and read them back while doing so).

Repos live in memory. Uploads are answered with the "regular" upload mode (contents arrive base64 in the commit's
NDJSON body), except Parquet files: `datasets` deletes its shard files right after the preupload step, expecting
them uploaded by then, so those take the LFS "basic" transfer (batch request, one PUT, then an `lfsFile` commit
entry). Set `HF_HUB_DISABLE_XET=1` on clients: Xet storage is not offered. Every request is recorded (method,
path, Authorization header), so a test can check what was sent and with which token. Point a client at it with
`HF_ENDPOINT=<url>`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import threading
from dataclasses import dataclass, field

import yaml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

LFS_SUFFIXES = (".parquet",)
KINDS = {"models": "model", "datasets": "dataset", "spaces": "space"}


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[dict] = field(default_factory=list)

    @property
    def sha(self) -> str:
        return hashlib.sha1(f"{self.repo_id}:{len(self.commits)}".encode()).hexdigest()


@dataclass
class Received:
    method: str
    path: str
    authorization: str | None


class FakeHub:
    def __init__(self):
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests: list[Received] = []
        self.lfs_objects: dict[str, bytes] = {}  # sha256 -> content, uploaded before the commit that names it
        self.url = ""

    def repo(self, repo_type: str, repo_id: str) -> Repo:
        return self.repos[(repo_type, repo_id)]

    def add_file(self, repo_type: str, repo_id: str, path: str, data: bytes) -> None:
        """Seed a repo with a file, as if someone had pushed it (one commit)."""
        repo = self.repos.setdefault((repo_type, repo_id), Repo(repo_type, repo_id, private=False))
        repo.files[path] = data
        repo.commits.append({"summary": f"add {path}", "files": [path]})

    # -- the app ---------------------------------------------------------------------------------------------

    def app(self) -> Starlette:
        api = "/api/{kind}/{owner}/{name}"
        routes = [
            Route("/api/repos/create", self.create_repo, methods=["POST"]),
            Route("/api/validate-yaml", self.validate_yaml, methods=["POST"]),
            Route(api, self.repo_info, methods=["GET"]),
            Route(api + "/revision/{rev}", self.repo_info, methods=["GET"]),
            Route(api + "/preupload/{rev}", self.preupload, methods=["POST"]),
            Route(api + "/commit/{rev}", self.commit, methods=["POST"]),
            Route(api + "/tree/{rev}", self.tree, methods=["GET"]),
            Route(api + "/tree/{rev}/{path:path}", self.tree, methods=["GET"]),
            Route(api + "/paths-info/{rev}", self.paths_info, methods=["POST"]),
            Route("/{kind}/{owner}/{name}.git/info/lfs/objects/batch", self.lfs_batch, methods=["POST"]),
            Route("/{owner}/{name}.git/info/lfs/objects/batch", self.lfs_batch, methods=["POST"]),
            Route("/lfs-upload/{oid}", self.lfs_put, methods=["PUT"]),
            Route("/{kind}/{owner}/{name}/resolve/{rev}/{path:path}", self.resolve, methods=["GET", "HEAD"]),
            Route("/{owner}/{name}/resolve/{rev}/{path:path}", self.resolve, methods=["GET", "HEAD"]),
        ]
        app = Starlette(routes=routes)
        app.add_middleware(_Recorder, hub=self)
        return app

    def _find(self, request: Request) -> Repo | None:
        kind = KINDS.get(request.path_params.get("kind", "models"))
        repo_id = f"{request.path_params['owner']}/{request.path_params['name']}"
        return self.repos.get((kind, repo_id))

    @staticmethod
    def _missing_repo() -> Response:
        return JSONResponse({"error": "Repository not found"}, status_code=404,
                            headers={"X-Error-Code": "RepoNotFound"})

    async def create_repo(self, request: Request) -> Response:
        body = await request.json()
        repo_type = body.get("type") or "model"
        repo_id = f"{body['organization']}/{body['name']}" if body.get("organization") else body["name"]
        url = f"{self.url}/{'' if repo_type == 'model' else repo_type + 's/'}{repo_id}"
        if (repo_type, repo_id) in self.repos:
            return JSONResponse({"error": "You already created this repo", "url": url}, status_code=409)
        self.repos[(repo_type, repo_id)] = Repo(repo_type, repo_id, private=body.get("visibility") == "private"
                                                or bool(body.get("private")))
        return JSONResponse({"url": url, "name": repo_id})

    async def validate_yaml(self, request: Request) -> Response:
        """The README's YAML header must parse (the real Hub also checks known keys; we only check the syntax)."""
        content = (await request.json()).get("content", "")
        header = content.split("---")[1] if content.startswith("---") and content.count("---") >= 2 else ""
        try:
            yaml.safe_load(header)
        except yaml.YAMLError as error:
            return JSONResponse({"errors": [{"message": str(error)}]}, status_code=400)
        return JSONResponse({"errors": [], "warnings": []})

    async def repo_info(self, request: Request) -> Response:
        repo = self._find(request)
        if repo is None:
            return self._missing_repo()
        return JSONResponse({"id": repo.repo_id, "_id": repo.repo_id, "sha": repo.sha, "private": repo.private,
                             "siblings": [{"rfilename": path} for path in sorted(repo.files)], "tags": []})

    async def preupload(self, request: Request) -> Response:
        if self._find(request) is None:
            return self._missing_repo()
        body = await request.json()
        return JSONResponse({"files": [{"path": f["path"], "shouldIgnore": False,
                                        "uploadMode": "lfs" if f["path"].endswith(LFS_SUFFIXES) else "regular"}
                                       for f in body.get("files", [])]})

    async def lfs_batch(self, request: Request) -> Response:
        if self._find(request) is None:
            return self._missing_repo()
        objects = (await request.json())["objects"]
        return JSONResponse({"transfer": "basic", "objects": [
            {"oid": o["oid"], "size": o["size"], "actions": {"upload": {"href": f"{self.url}/lfs-upload/{o['oid']}"}}}
            for o in objects]}, headers={"Content-Type": "application/vnd.git-lfs+json"})

    async def lfs_put(self, request: Request) -> Response:
        data = await request.body()
        oid = request.path_params["oid"]
        if hashlib.sha256(data).hexdigest() != oid:
            return JSONResponse({"error": "sha256 mismatch"}, status_code=400)
        self.lfs_objects[oid] = data
        return Response(b"")

    async def commit(self, request: Request) -> Response:
        repo = self._find(request)
        if repo is None:
            return self._missing_repo()
        header, changed = {}, []
        for line in (await request.body()).splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            value = item["value"]
            if item["key"] == "header":
                header = value
            elif item["key"] == "file":
                repo.files[value["path"]] = base64.b64decode(value["content"])
                changed.append(value["path"])
            elif item["key"] == "lfsFile":
                if value["oid"] not in self.lfs_objects:
                    return JSONResponse({"error": f"LFS object of {value['path']} was never uploaded"}, status_code=400)
                repo.files[value["path"]] = self.lfs_objects[value["oid"]]
                changed.append(value["path"])
            elif item["key"] == "deletedFile":
                repo.files.pop(value["path"], None)
            else:
                return JSONResponse({"error": f"fake hub: unsupported commit item {item['key']!r}"}, status_code=400)
        repo.commits.append({"summary": header.get("summary", ""), "files": changed})
        prefix = "" if repo.repo_type == "model" else f"{repo.repo_type}s/"
        return JSONResponse({"commitUrl": f"{self.url}/{prefix}{repo.repo_id}/commit/{repo.sha}",
                             "commitOid": repo.sha, "success": True})

    def _entry(self, repo: Repo, path: str) -> dict:
        data = repo.files[path]
        return {"type": "file", "path": path, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}

    async def tree(self, request: Request) -> Response:
        repo = self._find(request)
        if repo is None:
            return self._missing_repo()
        folder = request.path_params.get("path", "").strip("/")
        recursive = request.query_params.get("recursive", "").lower() in ("1", "true")
        entries, folders = [], set()
        for path in sorted(repo.files):
            if folder and not path.startswith(folder + "/"):
                continue
            rest = path[len(folder) + 1:] if folder else path
            if "/" in rest and not recursive:
                folders.add((folder + "/" if folder else "") + rest.split("/")[0])
            else:
                entries.append(self._entry(repo, path))
        if folder and not entries and not folders:
            return _missing_entry()
        return JSONResponse([{"type": "directory", "path": f, "oid": "0" * 40, "size": 0} for f in sorted(folders)]
                            + entries)

    async def paths_info(self, request: Request) -> Response:
        repo = self._find(request)
        if repo is None:
            return self._missing_repo()
        form = await request.form()
        paths = form.getlist("paths")
        found = [self._entry(repo, p) for p in paths if p in repo.files]
        found += [{"type": "directory", "path": p, "oid": "0" * 40, "size": 0} for p in paths
                  if p not in repo.files and any(f.startswith(p.rstrip("/") + "/") for f in repo.files)]
        return JSONResponse(found)

    async def resolve(self, request: Request) -> Response:
        repo = self._find(request)
        if repo is None:
            return self._missing_repo()
        path = request.path_params["path"]
        if path not in repo.files:
            return _missing_entry()
        data = repo.files[path]
        headers = {"X-Repo-Commit": repo.sha, "ETag": f'"{hashlib.sha1(data).hexdigest()}"',
                   "Content-Length": str(len(data))}
        return Response(b"" if request.method == "HEAD" else data, headers=headers)

    # -- running it ------------------------------------------------------------------------------------------

    def start(self) -> str:
        """Serve from a background thread; returns the base URL (listening before this returns)."""
        import uvicorn

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        self._sock = sock
        self._server = uvicorn.Server(uvicorn.Config(self.app(), log_config=None, access_log=False,
                                                     log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True)
        self._thread.start()
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        return self.url

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)
        self._sock.close()


def _missing_entry() -> Response:
    return JSONResponse({"error": "Entry not found"}, status_code=404, headers={"X-Error-Code": "EntryNotFound"})


class _Recorder:
    """ASGI middleware: records every HTTP request before the app answers it."""

    def __init__(self, app, hub: FakeHub):
        self.app, self.hub = app, hub

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
            self.hub.requests.append(Received(scope["method"], scope["path"], headers.get("authorization")))
        await self.app(scope, receive, send)
