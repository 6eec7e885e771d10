"""The ASGI app: the part of the Hugging Face Hub HTTP API that `huggingface_hub` 2.x uses.

Paths, methods, headers and reply fields follow what the client reads in
`hf_api.py`, `_commit_api.py`, `_upload_pipeline.py`, `file_download.py` and
`utils/_http.py` (version 2.4), so `HfApi(endpoint=...)`, `hf_hub_download` and
`snapshot_download` work against this server unchanged. Only model repos exist.

Every file is uploaded inline in the commit body: `/preupload` answers
`uploadMode: "regular"` for all files, so the client never needs LFS or Xet.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mimetypes
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote

import yaml
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from .auth import Principal, TokenTable, Unauthorized
from .storage import (
    DEFAULT_BRANCH,
    FULL_COMMIT_ID,
    BadRequest,
    BoundedCache,
    Commit,
    EntryNotFound,
    FileEntry,
    PayloadTooLarge,
    RegistryError,
    RepoExists,
    RepoId,
    RepoMeta,
    RepoNotFound,
    Store,
    validate_branch_name,
    validate_repo_path,
)

DEFAULT_MAX_UPLOAD_BYTES = 512 * 1024 * 1024
DEFAULT_PAGE_SIZE = 1000
MAX_JSON_BODY_BYTES = 16 * 1024 * 1024
MAX_README_BYTES = 1024 * 1024

logger = logging.getLogger("adapterzoo_registry")


def create_app(
    root: Path | str,
    *,
    tokens_file: Path | str | None = None,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    page_size: int = DEFAULT_PAGE_SIZE,
) -> Starlette:
    """Build the registry app serving the repos under `root`.

    Without `tokens_file` the registry is open: anyone may create, write and delete.
    Opening the store also removes temporary files a killed server left behind.
    """
    tokens = TokenTable.load(tokens_file) if tokens_file is not None else TokenTable.open_access()
    store = Store(root)
    app = Starlette(
        routes=_routes(),
        exception_handlers={
            RegistryError: _registry_error_response,
            HTTPException: _http_error_response,
            Exception: _internal_error_response,
        },
    )
    app.state.registry = Registry(
        store=store, tokens=tokens, max_upload_bytes=max_upload_bytes, page_size=max(1, page_size),
        cards=CardReader(store),
    )
    return app


def _routes() -> list[Route]:
    repo = "/api/models/{namespace}/{name}"
    return [
        Route("/api/whoami-v2", whoami),
        Route("/api/validate-yaml", validate_yaml, methods=["POST"]),
        Route("/api/repos/create", create_repo, methods=["POST"]),
        Route("/api/repos/delete", delete_repo, methods=["DELETE"]),
        Route("/api/models", list_models),
        Route(repo, model_info),
        Route(repo + "/revision/{revision:path}", model_info),
        Route(repo + "/tree/{revision}", list_tree),
        Route(repo + "/tree/{revision}/{path:path}", list_tree),
        Route(repo + "/paths-info/{revision:path}", paths_info, methods=["POST"]),
        Route(repo + "/preupload/{revision:path}", preupload, methods=["POST"]),
        Route(repo + "/commit/{revision:path}", commit, methods=["POST"]),
        Route(repo + "/refs", list_refs),
        Route(repo + "/commits/{revision:path}", list_commits),
        Route(repo + "/branch/{branch}", create_branch, methods=["POST"]),
        Route(repo + "/branch/{branch}", delete_branch, methods=["DELETE"]),
        Route(repo + "/settings", update_settings, methods=["PUT"]),
        Route(repo + "/auth-check", auth_check),
        Route(repo + "/auth-check/write", auth_check),
        Route("/api/{kind}/{rest:path}", unknown_api_route, methods=["GET", "HEAD", "POST", "PUT", "DELETE"]),
        Route("/{namespace}/{name}/resolve/{revision}/{path:path}", resolve_file, methods=["GET", "HEAD"]),
        Route("/{kind}/{namespace}/{name}/resolve/{revision}/{path:path}", unknown_api_route, methods=["GET", "HEAD"]),
    ]


# --------------------------------------------------------------------------- shared state


@dataclass
class Registry:
    """What every route needs, and the visibility rules that every route applies the same way."""

    store: Store
    tokens: TokenTable
    max_upload_bytes: int
    page_size: int
    cards: CardReader

    def principal(self, request: Request) -> Principal:
        return self.tokens.authenticate(request.headers.get("authorization"))

    def readable_repo(self, principal: Principal, repo: RepoId) -> RepoMeta:
        """The repo's metadata, or 404 RepoNotFound if it is missing *or* private to this caller.

        Both cases answer the same so that a private repo's existence never leaks.
        """
        meta = self.store.repo_meta(repo)
        if meta is None or (meta.private and not principal.can_read(repo.namespace)):
            raise RepoNotFound(f"Repository not found: {repo}")
        return meta

    def writable_repo(self, principal: Principal, repo: RepoId) -> RepoMeta:
        meta = self.readable_repo(principal, repo)
        principal.require_write(repo.namespace)
        return meta


def _registry(request: Request) -> Registry:
    return request.app.state.registry


def _repo(request: Request) -> RepoId:
    return RepoId.parse(request.path_params["namespace"], request.path_params["name"])


def _base_url(request: Request) -> str:
    return str(request.base_url).rstrip("/")


# --------------------------------------------------------------------------- model cards


_FRONT_MATTER = re.compile(r"\A\s*---[ \t]*\r?\n(.*?)^---[ \t]*\r?$", re.DOTALL | re.MULTILINE)


def parse_front_matter(readme: str) -> dict[str, Any]:
    """The YAML metadata block at the top of a README.md; `ValueError` if it is not a YAML mapping."""
    match = _FRONT_MATTER.match(readme)
    if match is None:
        return {}
    try:
        metadata = yaml.safe_load(match.group(1))
    except yaml.YAMLError as error:
        raise ValueError(f"Invalid YAML in README.md metadata: {error}") from None
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise ValueError("README.md metadata must be a YAML mapping (key: value).")
    return json.loads(json.dumps(metadata, default=str))  # dates and such become JSON-safe strings


@dataclass(frozen=True)
class ModelCard:
    """What search needs from a README: its metadata and the tags derived from it."""

    metadata: Mapping[str, Any] = field(default_factory=dict)

    @property
    def tags(self) -> list[str]:
        """`tags:` from the front matter, then `library_name`, without duplicates."""
        declared = self.metadata.get("tags")
        if isinstance(declared, (str, int, float)):
            declared = [declared]
        tags = [str(tag) for tag in declared or [] if isinstance(tag, (str, int, float)) and not isinstance(tag, bool)]
        if self.library_name:
            tags.append(self.library_name)
        return list(dict.fromkeys(tags))

    @property
    def library_name(self) -> str | None:
        value = self.metadata.get("library_name")
        return value if isinstance(value, str) else None

    @property
    def pipeline_tag(self) -> str | None:
        value = self.metadata.get("pipeline_tag")
        return value if isinstance(value, str) else None


class CardReader:
    """Reads README.md front matter per commit; commits are immutable, so results are cached."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._cache: BoundedCache[tuple[str, str], ModelCard] = BoundedCache()

    def card(self, repo: RepoId, commit: Commit) -> ModelCard:
        return self._cache.get_or_compute((str(repo), commit.id), lambda: self._read(repo, commit))

    def _read(self, repo: RepoId, commit: Commit) -> ModelCard:
        entry = commit.files.get("README.md")
        if entry is None:
            return ModelCard()
        with open(self._store.blob_path(repo, entry), "rb") as blob:
            text = blob.read(MAX_README_BYTES).decode("utf-8", errors="replace")
        try:
            return ModelCard(parse_front_matter(text))
        except ValueError:
            return ModelCard()  # a broken card makes a repo unsearchable by tags, not unreadable


# --------------------------------------------------------------------------- JSON shapes


def _model_json(
    registry: Registry, repo: RepoId, meta: RepoMeta, commit: Commit, *, siblings: bool, card_data: bool
) -> dict[str, Any]:
    """A model as `huggingface_hub.hf_api.ModelInfo(**data)` reads it."""
    card = registry.cards.card(repo, commit)
    data: dict[str, Any] = {
        "_id": str(repo),
        "id": str(repo),
        "modelId": str(repo),
        "author": repo.namespace,
        "sha": commit.id,
        "lastModified": commit.date,
        "createdAt": meta.created_at,
        "private": meta.private,
        "disabled": False,
        "gated": False,
        "downloads": 0,
        "likes": 0,
        "tags": card.tags,
        "library_name": card.library_name,
        "pipeline_tag": card.pipeline_tag,
        "usedStorage": sum(entry.size for entry in commit.files.values()),
    }
    if siblings:
        data["siblings"] = [
            {"rfilename": path, "size": entry.size, "blobId": entry.oid} for path, entry in sorted(commit.files.items())
        ]
    if card_data:
        data["cardData"] = dict(card.metadata)
    return data


def _file_json(path: str, entry: FileEntry) -> dict[str, Any]:
    """A tree entry as `huggingface_hub.hf_api.RepoFile(**data)` reads it; `oid` is the git blob id."""
    return {"type": "file", "oid": entry.oid, "size": entry.size, "path": path}


def _folder_json(folder: str, files: Mapping[str, FileEntry]) -> dict[str, Any]:
    prefix = folder + "/"
    listing = "".join(f"{path} {entry.oid}\n" for path, entry in sorted(files.items()) if path.startswith(prefix))
    return {"type": "directory", "oid": hashlib.sha1(listing.encode()).hexdigest(), "size": 0, "path": folder}


def tree_entries(files: Mapping[str, FileEntry], folder: str, *, recursive: bool) -> list[dict[str, Any]]:
    """Files and folders under `folder` (all levels if `recursive`), sorted by path."""
    prefix = folder + "/" if folder else ""
    below = {path: entry for path, entry in files.items() if path.startswith(prefix)}
    if folder and not below:
        raise _entry_not_found(folder)
    listed_files: dict[str, FileEntry] = {}
    listed_folders: set[str] = set()
    for path, entry in below.items():
        parts = path[len(prefix) :].split("/")
        if recursive or len(parts) == 1:
            listed_files[path] = entry
        depth_limit = len(parts) if recursive else min(len(parts), 2)
        listed_folders.update(prefix + "/".join(parts[:depth]) for depth in range(1, depth_limit))
    listing = [_folder_json(name, files) for name in listed_folders]
    listing += [_file_json(path, entry) for path, entry in listed_files.items()]
    return sorted(listing, key=lambda item: item["path"])


def _entry_not_found(path: str, commit: Commit | None = None) -> EntryNotFound:
    """404 EntryNotFound; with the commit id so the client can cache that the file is absent there."""
    headers = {"X-Repo-Commit": commit.id} if commit is not None else None
    return EntryNotFound(f"Entry not found: {path}", headers=headers)


def _paginated(request: Request, items: list[Any], page_size: int) -> JSONResponse:
    """One page of `items`, with a GitHub-style `Link: <...>; rel="next"` header as `utils/_pagination.py` follows."""
    try:
        start = int(request.query_params.get("cursor", "0"))
    except ValueError:
        raise BadRequest("Invalid 'cursor' query parameter.") from None
    start = max(start, 0)
    headers = {}
    if start + page_size < len(items):
        next_url = request.url.include_query_params(cursor=start + page_size)
        headers["Link"] = f'<{next_url}>; rel="next"'
    return JSONResponse(items[start : start + page_size], headers=headers)


def _truthy(value: str | None) -> bool:
    return value is not None and value.lower() in ("1", "true", "yes", "on")


# --------------------------------------------------------------------------- account


def whoami(request: Request) -> JSONResponse:
    """GET /api/whoami-v2: the token's user, with its namespaces listed as orgs."""
    principal = _registry(request).principal(request)
    if not principal.authenticated:
        raise Unauthorized("Authentication required: send a token (Authorization: Bearer <token>).")
    can_write = principal.unrestricted or "write" in principal.namespaces.values()
    return JSONResponse(
        {
            "type": "user",
            "id": principal.user,
            "name": principal.user,
            "fullname": principal.user,
            "isPro": False,
            "orgs": [
                {"type": "org", "name": namespace, "roleInOrg": level}
                for namespace, level in sorted(principal.namespaces.items())
                if namespace != principal.user
            ],
            "auth": {
                "type": "access_token",
                "accessToken": {"displayName": "adapterzoo-registry", "role": "write" if can_write else "read"},
            },
        }
    )


async def validate_yaml(request: Request) -> JSONResponse:
    """POST /api/validate-yaml: `create_commit` asks this before committing a README.md."""
    payload = await _json_body(request)
    content = payload.get("content")
    if not isinstance(content, str):
        raise BadRequest("Expected a string 'content'.")
    try:
        parse_front_matter(content)
    except ValueError as error:
        return JSONResponse({"error": str(error), "errors": [{"message": str(error)}]}, status_code=400)
    return JSONResponse({"errors": [], "warnings": []})


# --------------------------------------------------------------------------- repo lifecycle


async def _repo_request(request: Request, doing: str):
    """What create and delete both read first: the registry, the caller (who must be
    authenticated), the JSON body, and the namespace (the body's organization, else the user)."""
    registry = _registry(request)
    payload = await _json_body(request)
    principal = registry.principal(request)
    _require_model_type(payload.get("type"))
    if not principal.authenticated:
        raise Unauthorized(f"Authentication required to {doing} a repo.")
    organization = payload.get("organization") or (None if principal.unrestricted else principal.user)
    return registry, principal, payload, organization


async def create_repo(request: Request) -> JSONResponse:
    """POST /api/repos/create: 409 if it exists, which `create_repo(exist_ok=True)` treats as success."""
    registry, principal, payload, organization = await _repo_request(request, "create")
    if organization is None:
        raise BadRequest("Give the repo id as 'namespace/name': this open registry has no user to default to.")
    repo = RepoId.parse(organization, payload.get("name"))
    principal.require_write(repo.namespace)
    private = _requested_privacy(payload)
    url = f"{_base_url(request)}/{repo}"
    try:
        await run_in_threadpool(registry.store.create_repo, repo, private=bool(private), author=principal.user or "")
    except RepoExists as error:
        error.body["url"] = url  # the client reads it even from the 409 when exist_ok=True
        raise
    return JSONResponse({"url": url, "name": str(repo), "id": str(repo)})


async def delete_repo(request: Request) -> JSONResponse:
    """DELETE /api/repos/delete with {"name", "organization", "type"}."""
    registry, principal, payload, organization = await _repo_request(request, "delete")
    repo = RepoId.parse(organization, payload.get("name"))

    def delete() -> None:
        registry.writable_repo(principal, repo)
        registry.store.delete_repo(repo)

    await run_in_threadpool(delete)
    return JSONResponse({})


async def update_settings(request: Request) -> JSONResponse:
    """PUT /api/models/{repo}/settings: only visibility is supported (no gating)."""
    registry = _registry(request)
    payload = await _json_body(request)
    principal, repo = registry.principal(request), _repo(request)
    if payload.get("gated") not in (None, False):
        raise BadRequest("Gated repos are not supported by this registry.")
    private = _requested_privacy(payload)

    def update() -> None:
        registry.writable_repo(principal, repo)
        if private is not None:
            registry.store.set_private(repo, private)

    await run_in_threadpool(update)
    return JSONResponse({})


def _require_model_type(repo_type: Any) -> None:
    if repo_type not in (None, "model"):
        raise BadRequest(f"Only model repositories are supported by this registry, not {repo_type!r}.")


def _requested_privacy(payload: Mapping[str, Any]) -> bool | None:
    visibility = payload.get("visibility")
    if visibility is not None:
        if visibility not in ("public", "private"):
            raise BadRequest("'visibility' must be 'public' or 'private'.")
        return visibility == "private"
    private = payload.get("private")
    return bool(private) if private is not None else None


# --------------------------------------------------------------------------- reading


def list_models(request: Request) -> JSONResponse:
    """GET /api/models?search=&author=&filter=...: the repos this caller can see, filtered by tags."""
    registry, params = _registry(request), request.query_params
    principal = registry.principal(request)
    search = (params.get("search") or "").lower()
    author = params.get("author")
    wanted_tags = set(params.getlist("filter"))
    expand = set(params.getlist("expand")) | set(params.getlist("expand[]"))
    full = _truthy(params.get("full"))
    models = []
    for repo in registry.store.iter_repos():
        if (author and repo.namespace != author) or search not in str(repo).lower():
            continue
        try:
            meta = registry.readable_repo(principal, repo)
        except RepoNotFound:  # missing, or private to this caller: left out like on every other route
            continue
        try:
            head = registry.store.resolve(repo, DEFAULT_BRANCH)
        except RegistryError:  # deleted while we were listing
            continue
        model = _model_json(
            registry, repo, meta, head,
            siblings=full or "siblings" in expand,
            card_data=full or _truthy(params.get("cardData")) or "cardData" in expand,
        )
        if wanted_tags <= set(model["tags"]):
            models.append(model)
    _sort_models(models, params.get("sort"))
    limit = params.get("limit", "")
    page_size = min(registry.page_size, int(limit)) if limit.isdigit() and int(limit) > 0 else registry.page_size
    return _paginated(request, models, page_size)


def _sort_models(models: list[dict[str, Any]], sort: str | None) -> None:
    """Newest first for date sorts like the Hub; counters are always 0 here, so other sorts keep id order."""
    if sort in ("lastModified", "createdAt"):
        models.sort(key=lambda model: model[sort], reverse=True)


def model_info(request: Request) -> JSONResponse:
    """GET /api/models/{repo}[/revision/{rev}]."""
    registry = _registry(request)
    principal, repo = registry.principal(request), _repo(request)
    meta = registry.readable_repo(principal, repo)
    commit = registry.store.resolve(repo, request.path_params.get("revision", DEFAULT_BRANCH))
    return JSONResponse(_model_json(registry, repo, meta, commit, siblings=True, card_data=True))


def auth_check(request: Request) -> JSONResponse:
    """GET /api/models/{repo}/auth-check[/write]: 200 if the caller may read (or write) the repo."""
    registry = _registry(request)
    principal, repo = registry.principal(request), _repo(request)
    if request.url.path.endswith("/write"):
        registry.writable_repo(principal, repo)
    else:
        registry.readable_repo(principal, repo)
    return JSONResponse({})


def list_tree(request: Request) -> JSONResponse:
    """GET /api/models/{repo}/tree/{rev}[/{path}]?recursive=true, paginated."""
    registry = _registry(request)
    principal, repo = registry.principal(request), _repo(request)
    registry.readable_repo(principal, repo)
    commit = registry.store.resolve(repo, request.path_params["revision"])
    folder = request.path_params.get("path", "").strip("/")
    if folder:
        validate_repo_path(folder)
    recursive = _truthy(request.query_params.get("recursive"))
    page_size = min(registry.page_size, 50) if _truthy(request.query_params.get("expand")) else registry.page_size
    return _paginated(request, tree_entries(commit.files, folder, recursive=recursive), page_size)


async def paths_info(request: Request) -> JSONResponse:
    """POST /api/models/{repo}/paths-info/{rev} with a form body `paths=a&paths=b`; missing paths are omitted."""
    registry = _registry(request)
    principal, repo = registry.principal(request), _repo(request)
    form = parse_qs((await _bounded_body(request, MAX_JSON_BODY_BYTES)).decode(errors="replace"))
    paths = [path.strip("/") for path in form.get("paths", [])]

    def describe() -> list[dict[str, Any]]:
        registry.readable_repo(principal, repo)
        files = registry.store.resolve(repo, request.path_params["revision"]).files
        found = []
        for path in paths:
            if path in files:
                found.append(_file_json(path, files[path]))
            elif any(name.startswith(path + "/") for name in files):
                found.append(_folder_json(path, files))
        return found

    return JSONResponse(await run_in_threadpool(describe))


def list_refs(request: Request) -> JSONResponse:
    """GET /api/models/{repo}/refs: branches only (no tags, converts or pull requests)."""
    registry = _registry(request)
    principal, repo = registry.principal(request), _repo(request)
    registry.readable_repo(principal, repo)
    branches = [
        {"name": name, "ref": f"refs/heads/{name}", "targetCommit": commit_id}
        for name, commit_id in registry.store.branches(repo).items()
    ]
    return JSONResponse({"branches": branches, "converts": [], "tags": [], "pullRequests": []})


def list_commits(request: Request) -> JSONResponse:
    """GET /api/models/{repo}/commits/{rev}: history, newest first, paginated."""
    registry = _registry(request)
    principal, repo = registry.principal(request), _repo(request)
    registry.readable_repo(principal, repo)
    head = registry.store.resolve(repo, request.path_params["revision"])
    history = [
        {
            "id": commit.id,
            "title": commit.summary,
            "message": commit.description,
            "authors": [{"user": commit.author}],
            "date": commit.date,
        }
        for commit in registry.store.history(repo, head)
    ]
    return _paginated(request, history, registry.page_size)


def resolve_file(request: Request) -> Response:
    """HEAD/GET /{repo}/resolve/{rev}/{path}: a file's bytes, with the headers `hf_hub_download` needs.

    A branch name redirects (307) to the same file at the branch's current commit,
    so the metadata from HEAD and the bytes from GET always describe the same
    version even if a commit lands in between. At a commit id the reply carries
    `X-Repo-Commit`, a quoted `ETag` (the git blob id, the client's cache key),
    `Content-Length` and honours `Range`, which the client uses to resume.
    """
    registry = _registry(request)
    principal, repo = registry.principal(request), _repo(request)
    registry.readable_repo(principal, repo)
    revision, path = request.path_params["revision"], request.path_params["path"]
    commit = registry.store.resolve(repo, revision)
    if revision != commit.id:
        location = f"{request.scope.get('root_path', '')}/{repo}/resolve/{commit.id}/{quote(path)}"
        return Response(status_code=307, headers={"Location": location, "X-Repo-Commit": commit.id})
    entry = commit.files.get(path)
    if entry is None:
        raise _entry_not_found(path, commit)
    return FileResponse(
        registry.store.blob_path(repo, entry),
        media_type=mimetypes.guess_type(path)[0] or "application/octet-stream",
        headers={"ETag": f'"{entry.oid}"', "X-Repo-Commit": commit.id},
    )


# --------------------------------------------------------------------------- writing


async def create_branch(request: Request) -> JSONResponse:
    """POST /api/models/{repo}/branch/{branch} with optional {"startingPoint": rev}."""
    registry = _registry(request)
    payload = await _json_body(request)
    principal, repo = registry.principal(request), _repo(request)
    branch = validate_branch_name(request.path_params["branch"])

    def create() -> None:
        registry.writable_repo(principal, repo)
        start = registry.store.resolve(repo, payload.get("startingPoint") or DEFAULT_BRANCH)
        registry.store.create_branch(repo, branch, start)

    await run_in_threadpool(create)
    return JSONResponse({})


async def delete_branch(request: Request) -> JSONResponse:
    registry = _registry(request)
    principal, repo = registry.principal(request), _repo(request)

    def delete() -> None:
        registry.writable_repo(principal, repo)
        registry.store.delete_branch(repo, request.path_params["branch"])

    await run_in_threadpool(delete)
    return JSONResponse({})


async def preupload(request: Request) -> JSONResponse:
    """POST /api/models/{repo}/preupload/{rev}: every file goes inline ("regular"), none is ignored.

    `oid` is the git blob id of the file currently at that path, which lets the
    client drop unchanged files from the commit.
    """
    registry = _registry(request)
    payload = await _json_body(request)
    principal, repo = registry.principal(request), _repo(request)
    if _truthy(request.query_params.get("create_pr")):
        raise BadRequest("Pull requests are not supported by this registry.")
    files = payload.get("files")
    if not isinstance(files, list) or not all(isinstance(item, dict) for item in files):
        raise BadRequest("Expected {'files': [{'path', 'size', 'sample'}, ...]}.")
    paths = [item.get("path") for item in files]
    for path in paths:
        validate_repo_path(path)

    def plan() -> dict[str, Any]:
        registry.writable_repo(principal, repo)
        current = registry.store.resolve(repo, request.path_params["revision"])
        modes = [
            {
                "path": path,
                "uploadMode": "regular",
                "shouldIgnore": False,
                "oid": current.files[path].oid if path in current.files else None,
            }
            for path in paths
        ]
        return {"files": modes, "commitOid": current.id}

    return JSONResponse(await run_in_threadpool(plan))


async def commit(request: Request) -> JSONResponse:
    """POST /api/models/{repo}/commit/{branch}: an NDJSON body of header, file and deletion lines.

    The body is streamed to a temporary file (never held in memory whole) and
    refused with 413 once it passes `--max-upload-bytes`.
    """
    registry = _registry(request)
    try:
        principal, repo = registry.principal(request), _repo(request)
        branch = request.path_params["revision"]
        if _truthy(request.query_params.get("create_pr")):
            raise BadRequest("Pull requests are not supported by this registry.")
        if FULL_COMMIT_ID.fullmatch(branch.lower()):
            raise BadRequest("Commits go to a branch, not to a commit id.")
        await run_in_threadpool(registry.writable_repo, principal, repo)
        body_path = await _receive_body(request, registry.store.temp_path(".ndjson"), registry.max_upload_bytes)
    except RegistryError:
        await _discard_body(request, 4 * registry.max_upload_bytes)
        raise
    except ClientDisconnect:  # the uploader went away mid-body; nothing was committed
        return Response(status_code=400)
    try:
        new_commit = await run_in_threadpool(
            registry.store.commit, repo, branch, body_path, author=principal.user or "anonymous"
        )
    finally:
        body_path.unlink(missing_ok=True)
    return JSONResponse(
        {
            "success": True,
            "commitOid": new_commit.id,
            "commitUrl": f"{_base_url(request)}/{repo}/commit/{new_commit.id}",
            "hookOutput": "",
            "pullRequestUrl": None,
        }
    )


# --------------------------------------------------------------------------- bodies


async def _json_body(request: Request) -> dict[str, Any]:
    raw = await _bounded_body(request, MAX_JSON_BODY_BYTES)
    if not raw.strip():
        return {}
    try:
        payload = json.loads(raw)
    except ValueError:
        raise BadRequest("The request body is not valid JSON.") from None
    if not isinstance(payload, dict):
        raise BadRequest("The request body must be a JSON object.")
    return payload


async def _bounded_body(request: Request, limit: int) -> bytes:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"Request body larger than {limit} bytes.")
        chunks.append(chunk)
    return b"".join(chunks)


async def _receive_body(request: Request, target: Path, limit: int) -> Path:
    """Stream the request body into `target`, refusing it (413) past `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"Upload of {declared} bytes exceeds the limit of {limit} bytes.")
    received = 0
    try:
        with open(target, "wb") as out:
            async for chunk in request.stream():
                received += len(chunk)
                if received > limit:
                    raise PayloadTooLarge(f"Upload exceeds the limit of {limit} bytes.")
                out.write(chunk)
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    return target


async def _discard_body(request: Request, limit: int) -> None:
    """Read and drop what is left of the body, so the client gets to read our error reply.

    Replying while the client is still sending makes most clients fail with a
    broken connection instead of showing the error; beyond `limit` we give up.
    """
    discarded = 0
    try:
        async for chunk in request.stream():
            discarded += len(chunk)
            if discarded > limit:
                return
    except (RuntimeError, ClientDisconnect):  # already fully read, or the client left
        return


# --------------------------------------------------------------------------- errors


def unknown_api_route(request: Request) -> JSONResponse:
    """Dataset, Space and other repo types, and endpoints this registry does not implement."""
    kind = request.path_params.get("kind")
    if kind in ("datasets", "spaces", "kernels"):
        raise RepoNotFound(f"Only model repositories are supported by this registry, not {kind}.")
    return _error_json(404, f"No such endpoint in this registry: {request.method} {request.url.path}")


def _error_json(
    status: int,
    message: str,
    error_code: str | None = None,
    headers: Mapping[str, str] | None = None,
    body: Mapping[str, Any] | None = None,
) -> JSONResponse:
    """JSON `{"error": ...}` plus the `X-Error-Code` / `X-Error-Message` headers the client inspects."""
    reply_headers = {"X-Error-Message": _header_safe(message), **(headers or {})}
    if error_code:
        reply_headers["X-Error-Code"] = error_code
    return JSONResponse({"error": message, **(body or {})}, status_code=status, headers=reply_headers)


def _header_safe(text: str) -> str:
    return " ".join(text.encode("ascii", "replace").decode().split())[:1000]


async def _registry_error_response(request: Request, error: Exception) -> Response:
    assert isinstance(error, RegistryError)
    return _error_json(error.status, error.message, error.error_code, error.headers, error.body)


async def _http_error_response(request: Request, error: Exception) -> Response:
    assert isinstance(error, HTTPException)
    return _error_json(error.status_code, str(error.detail), headers=error.headers)


async def _internal_error_response(request: Request, error: Exception) -> Response:
    logger.exception("Unhandled error on %s %s", request.method, request.url.path)
    return _error_json(500, "Internal server error.")

