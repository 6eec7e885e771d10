"""The ASGI app: the part of the Hugging Face Hub HTTP API that `huggingface_hub` 2.x uses.

Paths, methods, headers and reply fields follow what the client reads in
`hf_api.py`, `_commit_api.py`, `lfs.py`, `file_download.py` and `utils/_http.py`
(version 2.4), so `HfApi(endpoint=...)`, `hf_hub_download` and `snapshot_download`
work against this server unchanged. Only model repos exist.

Files travel inline in the commit body (`/preupload` answers `uploadMode: "regular"`), except
that a client which declares it speaks basic Git LFS (header `X-Adapterzoo-Transfer: lfs`) sends
files over `lfs_threshold_bytes` through the Git LFS basic transfer (`uploadMode: "lfs"`),
streamed to disk and hashed as they arrive (see `lfs.py`). Undeclared clients never get "lfs":
with `hf_xet` installed, huggingface_hub sends every "lfs" file through Xet, which this server
does not speak, and nothing in its requests says whether Xet is on. Every request first passes
`guard.RequestGuard` (Host allow-list, no cross-origin writes, JSON-only writes).
"""

from __future__ import annotations

import hashlib
import json
import logging
import mimetypes
import re
from collections.abc import Iterable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from . import lfs, page
from .auth import Principal, TokenTable, Unauthorized
from .cards import CardError, CardReader, parse_front_matter
from .guard import LOOPBACK_HOSTS, RequestGuard
from .storage import (
    DEFAULT_BRANCH,
    DISK_FULL_ERRNOS,
    FULL_COMMIT_ID,
    BadRequest,
    Commit,
    EntryNotFound,
    FileEntry,
    PayloadTooLarge,
    RegistryError,
    RepoExists,
    RepoId,
    RepoMeta,
    RepoNotFound,
    RepoSummary,
    Store,
    disk_full,
    validate_ref_name,
    validate_repo_path,
)

DEFAULT_MAX_UPLOAD_BYTES = 512 * 1024 * 1024
DEFAULT_PAGE_SIZE = 1000
DEFAULT_LFS_THRESHOLD_BYTES = 10 * 1024 * 1024  # what the Hub uses: bigger files go through LFS
MAX_JSON_BODY_BYTES = 16 * 1024 * 1024
# A client sends this header (value "lfs") to say it uploads "lfs" files with basic Git LFS, not Xet:
# `adapterzoo push`, or `HfApi(headers={TRANSFER_HEADER: "lfs"})` with HF_HUB_DISABLE_XET=1.
TRANSFER_HEADER = "X-Adapterzoo-Transfer"
# What a 413 for a file too big to travel inline tells the user to do instead.
USE_LFS_HINT = (
    "Files this big go through Git LFS: push with `adapterzoo push`, or run huggingface_hub with"
    f" HF_HUB_DISABLE_XET=1 and HfApi(headers={{'{TRANSFER_HEADER}': 'lfs'}})."
)
# A body this small is read and dropped after an early refusal, so the connection stays usable;
# a bigger one is never read (the reply says `Connection: close`).
DISCARDABLE_BODY_BYTES = 64 * 1024
# Commit bodies up to this size (a README edit, a config) are received without waiting for an upload slot.
SMALL_COMMIT_BODY_BYTES = 1024 * 1024

logger = logging.getLogger("adapterzoo_registry")


class NotImplementedRoute(RegistryError):
    status = 501
    error_code = "NotImplemented"


def create_app(
    root: Path | str,
    *,
    tokens_file: Path | str | None = None,
    open_access: bool = False,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    page_size: int = DEFAULT_PAGE_SIZE,
    allowed_hosts: Iterable[str] | None = LOOPBACK_HOSTS,
    lfs_threshold_bytes: int | None = DEFAULT_LFS_THRESHOLD_BYTES,
    max_lfs_object_bytes: int = lfs.DEFAULT_MAX_OBJECT_BYTES,
    namespace_quota_bytes: int | None = None,
    max_concurrent_uploads: int = lfs.DEFAULT_MAX_CONCURRENT_UPLOADS,
    upload_queue_seconds: float = lfs.DEFAULT_QUEUE_WAIT_S,
) -> Starlette:
    """Build the registry app serving the repos under `root`.

    Give `tokens_file`, or `open_access=True` for a registry anyone may write to (local
    experiments only). `allowed_hosts` are the names the `Host` header may carry ("*": any).
    Files over `lfs_threshold_bytes` are uploaded through Git LFS (None: every file inline).
    Opening the store also removes temporary files a killed server left behind.
    """
    if tokens_file is None and not open_access:
        raise ValueError("Give a tokens file, or open_access=True for a registry anyone may write to.")
    if tokens_file is not None and open_access:
        raise ValueError("Give a tokens file or open_access=True, not both.")
    tokens = TokenTable.load(tokens_file) if tokens_file is not None else TokenTable.open_access()
    store = Store(root, namespace_quota_bytes=namespace_quota_bytes)
    app = Starlette(
        routes=_routes(),
        middleware=[Middleware(RequestGuard, allowed_hosts=allowed_hosts)],
        exception_handlers={
            RegistryError: _registry_error_response,
            HTTPException: _http_error_response,
            OSError: _os_error_response,
        },
    )
    app.state.registry = Registry(
        store=store, tokens=tokens, max_upload_bytes=max_upload_bytes, page_size=max(1, page_size),
        cards=CardReader(store), lfs_threshold_bytes=lfs_threshold_bytes,
        uploads=lfs.UploadGate(max_lfs_object_bytes, max_concurrent_uploads, upload_queue_seconds),
    )  # fmt: skip
    return app


def _routes() -> list[Route]:
    repo = "/api/models/{namespace}/{name}"
    git = "/{namespace}/{name}.git/info/lfs/objects"
    return [
        Route("/", page.index, methods=["GET", "POST"]),
        Route("/api/whoami-v2", whoami),
        Route("/api/validate-yaml", validate_yaml, methods=["POST"]),
        Route("/api/repos/create", create_repo, methods=["POST"]),
        Route("/api/repos/delete", delete_repo, methods=["DELETE"]),
        Route("/api/models", list_models),
        Route(repo, model_info),
        Route(repo + "/revision/{revision:path}", model_info),
        Route(repo + "/tree/{rest:path}", list_tree),
        Route(repo + "/paths-info/{revision:path}", paths_info, methods=["POST"]),
        Route(repo + "/preupload/{revision:path}", preupload, methods=["POST"]),
        Route(repo + "/commit/{revision:path}", commit, methods=["POST"]),
        Route(repo + "/refs", list_refs),
        Route(repo + "/commits/{revision:path}", list_commits),
        Route(repo + "/branch/{branch:path}", create_branch, methods=["POST"]),
        Route(repo + "/branch/{branch:path}", delete_branch, methods=["DELETE"]),
        Route(repo + "/tag/{revision:path}", create_tag, methods=["POST"]),
        Route(repo + "/tag/{tag:path}", delete_tag, methods=["DELETE"]),
        Route(repo + "/settings", update_settings, methods=["PUT"]),
        Route(repo + "/auth-check", auth_check),
        Route(repo + "/auth-check/write", auth_check),
        Route(repo + "/xet-write-token/{rest:path}", xet_not_supported),
        Route(repo + "/xet-read-token/{rest:path}", xet_not_supported),
        Route(git + "/batch", lfs_batch, methods=["POST"]),
        Route(git + "/verify", lfs_verify, methods=["POST"]),
        Route(git + "/{oid}", lfs_upload, methods=["PUT"]),
        Route("/api/{kind}/{rest:path}", unknown_api_route, methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]),
        Route("/api/{rest:path}", unknown_api_route, methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]),
        Route("/{namespace}/{name}", page.repo_page, methods=["GET", "POST"]),
        Route("/{namespace}/{name}/resolve/{rest:path}", resolve_file, methods=["GET", "HEAD"]),
        Route("/{kind}/{namespace}/{name}/resolve/{rest:path}", unknown_api_route, methods=["GET", "HEAD"]),
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
    lfs_threshold_bytes: int | None
    uploads: lfs.UploadGate

    @property
    def max_inline_bytes(self) -> int:
        """The largest file a commit body may carry inline: what fits the body limit in base64.

        Clients that did not declare LFS send every file inline, so this is the body limit, not the
        LFS threshold; memory stays bounded because the store decodes big bodies one at a time.
        """
        return max(1, (self.max_upload_bytes - 64 * 1024) // 4 * 3)

    def upload_mode(self, request: Request, size: int) -> str:
        """What preupload answers: "lfs" only for a file over the threshold from a client declaring LFS."""
        declared = request.headers.get(TRANSFER_HEADER, "").strip().lower() == "lfs"
        over = self.lfs_threshold_bytes is not None and size > self.lfs_threshold_bytes
        return "lfs" if declared and over else "regular"

    def principal(self, request: Request) -> Principal:
        return self.tokens.authenticate(request.headers.get("authorization"))

    def can_see(self, principal: Principal, summary: RepoSummary) -> bool:
        return not summary.meta.private or principal.can_read(summary.repo.namespace)

    def readable_repo(self, principal: Principal, repo: RepoId) -> RepoMeta:
        """The repo's metadata, or 404 RepoNotFound if it is missing *or* private to this caller.

        Both cases answer the same so that a private repo's existence never leaks.
        """
        meta = self.store.repo_meta(repo)
        if meta is None or (meta.private and not principal.can_read(repo.namespace)):
            raise RepoNotFound(f"Repository not found: {repo}")
        return meta

    def writable_repo(self, principal: Principal, repo: RepoId) -> RepoMeta:
        """As `readable_repo`, then 401/403 unless the caller may write; called before any body is read."""
        meta = self.readable_repo(principal, repo)
        principal.require_write(repo.namespace)
        return meta


def _registry(request: Request) -> Registry:
    return request.app.state.registry


def _repo(request: Request) -> RepoId:
    return RepoId.parse(request.path_params["namespace"], request.path_params["name"])


def _base_url(request: Request) -> str:
    return str(request.base_url).rstrip("/")


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
        threshold = registry.lfs_threshold_bytes
        data["siblings"] = [_sibling_json(path, entry, threshold) for path, entry in sorted(commit.files.items())]
    if card_data:
        data["cardData"] = dict(card.metadata)
    return data


def _file_json(path: str, entry: FileEntry, lfs_threshold: int | None = None) -> dict[str, Any]:
    """A tree entry as `huggingface_hub.hf_api.RepoFile(**data)` reads it; `oid` is the git blob id.

    A file over the LFS threshold also says `lfs` (its sha256), as on the Hub: `CommitOperationCopy`
    then copies it by reference (an `lfsFile` line) instead of downloading and re-sending it inline.
    """
    data: dict[str, Any] = {"type": "file", "oid": entry.oid, "size": entry.size, "path": path}
    if lfs_threshold is not None and entry.size > lfs_threshold:
        data["lfs"] = {"oid": entry.sha256, "size": entry.size, "pointerSize": 134}
    return data


def _sibling_json(path: str, entry: FileEntry, lfs_threshold: int | None) -> dict[str, Any]:
    """A file as `ModelInfo.siblings` reads it (its `lfs` block says `sha256`, where the tree says `oid`)."""
    data: dict[str, Any] = {"rfilename": path, "size": entry.size, "blobId": entry.oid}
    if lfs_threshold is not None and entry.size > lfs_threshold:
        data["lfs"] = {"sha256": entry.sha256, "size": entry.size, "pointerSize": 134}
    return data


def _folder_json(folder: str, files: Mapping[str, FileEntry]) -> dict[str, Any]:
    prefix = folder + "/"
    listing = "".join(f"{path} {entry.oid}\n" for path, entry in sorted(files.items()) if path.startswith(prefix))
    return {"type": "directory", "oid": hashlib.sha1(listing.encode()).hexdigest(), "size": 0, "path": folder}


def tree_entries(
    files: Mapping[str, FileEntry], folder: str, *, recursive: bool, lfs_threshold: int | None = None
) -> list[dict[str, Any]]:
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
    listing += [_file_json(path, entry, lfs_threshold) for path, entry in listed_files.items()]
    return sorted(listing, key=lambda item: item["path"])


def _entry_not_found(path: str, commit: Commit | None = None) -> EntryNotFound:
    """404 EntryNotFound; with the commit id so the client can cache that the file is absent there."""
    headers = {"X-Repo-Commit": commit.id} if commit is not None else None
    return EntryNotFound(f"Entry not found: {path}", headers=headers)


def _paginated(request: Request, items: list[Any], page_size: int) -> JSONResponse:
    """One page of `items`, with a GitHub-style `Link: <...>; rel="next"` header as `utils/_pagination.py` follows."""
    start = _count_param(request, "cursor", 0)
    headers = {}
    if start + page_size < len(items):
        next_url = request.url.include_query_params(cursor=start + page_size)
        headers["Link"] = f'<{next_url}>; rel="next"'
    return JSONResponse(items[start : start + page_size], headers=headers)


# Cursors and limits are plain decimal numbers of at most this many digits: enough for any list,
# small enough that no int conversion or `islice` bound can fail on them (those were 500s).
_COUNT = re.compile(r"[0-9]{1,15}")


def _count_param(request: Request, name: str, default: int, *, minimum: int = 0) -> int:
    """The query parameter `name` as a whole number >= `minimum`, `default` if absent, else 400 naming it."""
    text = request.query_params.get(name)
    if text is None or text == "":
        return default
    if not _COUNT.fullmatch(text) or int(text) < minimum:
        raise BadRequest(f"Invalid '{name}' query parameter {text[:40]!r}: expected a whole number >= {minimum}.")
    return int(text)


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
    """POST /api/validate-yaml: `create_commit` asks this before committing a README.md.

    Only for callers with a token (anonymous callers have nothing to commit), and parsed off
    the event loop by the hardened card parser, so no request can stall the others.
    """
    registry = _registry(request)
    principal = registry.principal(request)
    if not principal.authenticated:
        raise Unauthorized("Authentication required to validate YAML: send a token (Authorization: Bearer ...).")
    payload = await _json_body(request)
    content = _optional(payload, "content", str)
    if content is None:
        raise BadRequest("Expected a string 'content'.")
    try:
        await run_in_threadpool(parse_front_matter, content)
    except CardError as error:
        return JSONResponse({"error": str(error), "errors": [{"message": str(error)}]}, status_code=400)
    return JSONResponse({"errors": [], "warnings": []})


# --------------------------------------------------------------------------- repo lifecycle


async def _repo_request(request: Request, doing: str):
    """What create and delete both read first: the registry, the caller (who must be
    authenticated, checked before the body is read), the JSON body, and the namespace
    (the body's organization, else the user)."""
    registry = _registry(request)
    principal = registry.principal(request)
    if not principal.authenticated:
        raise Unauthorized(f"Authentication required to {doing} a repo.")
    payload = await _json_body(request)
    _require_model_type(payload.get("type"))
    organization = _optional(payload, "organization", str) or (None if principal.unrestricted else principal.user)
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
    principal, repo = registry.principal(request), _repo(request)
    await run_in_threadpool(registry.writable_repo, principal, repo)
    payload = await _json_body(request)
    gated = payload.get("gated")
    if gated is not None and gated is not False:  # not `in (None, False)`: 0 == False in Python
        raise BadRequest(f"'gated' must be false (a JSON boolean), not {gated!r:.40}: gated repos are not supported.")
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
    return _optional(payload, "private", bool)


def _optional(payload: Mapping[str, Any], key: str, kind: type) -> Any:
    """payload[key] if it has type `kind` (a bool is no int here), None if absent, else 400 naming the key."""
    value = payload.get(key)
    if value is None:
        return None
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        expected = _TYPE_NAMES.get(kind, kind.__name__)
        raise BadRequest(f"'{key}' must be a {expected}, not {type(value).__name__}: {value!r:.80}.")
    return value


_TYPE_NAMES = {bool: "JSON boolean (true or false, without quotes)", str: "string", int: "integer", list: "list"}


# --------------------------------------------------------------------------- reading

# Query parameters `HfApi.list_models` may send that this registry honours. Any other filter is
# refused by name: ignoring it would silently return repos that do not match.
LIST_MODELS_PARAMS = frozenset(
    {"search", "author", "filter", "sort", "direction", "limit", "full", "cardData", "config", "expand", "expand[]",
     "cursor", "pipeline_tag", "gated"}
)  # fmt: skip


async def list_models(request: Request) -> JSONResponse:
    """GET /api/models?search=&author=&filter=...: the repos this caller can see, one page at a time.

    Repos come from the store's in-memory index, so a page costs a walk over memory and the
    JSON of the repos on it, not a read of every repo.
    """
    registry, params = _registry(request), request.query_params
    unsupported = sorted(set(params.keys()) - LIST_MODELS_PARAMS)
    if unsupported:
        raise BadRequest(
            f"list_models filter {unsupported[0]!r} is not supported by this registry; supported: search, author,"
            " filter (tags), pipeline_tag, gated, sort (lastModified, createdAt), limit, full, cardData, expand."
        )
    principal = registry.principal(request)
    start = _count_param(request, "cursor", 0)
    page_size = min(registry.page_size, _count_param(request, "limit", registry.page_size, minimum=1))

    def listing() -> tuple[list[dict[str, Any]], bool]:
        window = list(islice(_matching_repos(registry, principal, params), start, start + page_size + 1))
        expand = set(params.getlist("expand")) | set(params.getlist("expand[]"))
        full = _truthy(params.get("full"))
        models = []
        for summary in window[:page_size]:
            try:
                head = registry.store.read_commit(summary.repo, summary.head)
            except (OSError, ValueError):  # deleted while we were listing
                continue
            models.append(
                _model_json(
                    registry, summary.repo, summary.meta, head,
                    siblings=full or "siblings" in expand,
                    card_data=full or _truthy(params.get("cardData")) or "cardData" in expand,
                )
            )  # fmt: skip
        return models, len(window) > page_size

    models, more = await run_in_threadpool(listing)
    headers = {}
    if more:
        headers["Link"] = f'<{request.url.include_query_params(cursor=start + page_size)}>; rel="next"'
    return JSONResponse(models, headers=headers)


def _matching_repos(registry: Registry, principal: Principal, params: Any) -> Iterable[RepoSummary]:
    """The repos visible to `principal` that pass every filter, in the order asked for."""
    search = (params.get("search") or "").lower()
    author = params.get("author")
    wanted_tags = set(params.getlist("filter"))
    pipeline_tag = params.get("pipeline_tag")
    gated = params.get("gated")
    if gated is not None and gated.lower() not in ("true", "false"):
        raise BadRequest("'gated' must be true or false.")
    if gated is not None and gated.lower() == "true":
        return []  # nothing here is gated
    summaries: Iterable[RepoSummary] = registry.store.summaries()
    sort = params.get("sort")
    if sort in ("lastModified", "createdAt"):
        key = (lambda s: s.last_modified) if sort == "lastModified" else (lambda s: s.meta.created_at)
        summaries = sorted(summaries, key=key, reverse=params.get("direction", "-1") != "1")
    elif sort not in (None, "", "id", "downloads", "likes", "trendingScore"):
        raise BadRequest(f"Unsupported sort {sort!r}: use lastModified or createdAt.")

    def wanted(summary: RepoSummary) -> bool:
        if author and summary.repo.namespace != author:
            return False
        if search and search not in str(summary.repo).lower():
            return False
        if not registry.can_see(principal, summary):
            return False
        if wanted_tags or pipeline_tag:
            card = registry.cards.card(summary.repo, registry.store.read_commit(summary.repo, summary.head))
            if not wanted_tags <= set(card.tags) or (pipeline_tag and card.pipeline_tag != pipeline_tag):
                return False
        return True

    return (summary for summary in summaries if wanted(summary))


async def model_info(request: Request) -> JSONResponse:
    """GET /api/models/{repo}[/revision/{rev}]."""
    registry = _registry(request)
    principal, repo = registry.principal(request), _repo(request)

    def describe() -> dict[str, Any]:
        meta = registry.readable_repo(principal, repo)
        commit = registry.store.resolve(repo, request.path_params.get("revision", DEFAULT_BRANCH))
        return _model_json(registry, repo, meta, commit, siblings=True, card_data=True)

    return JSONResponse(await run_in_threadpool(describe))


def auth_check(request: Request) -> JSONResponse:
    """GET /api/models/{repo}/auth-check[/write]: 200 if the caller may read (or write) the repo."""
    registry = _registry(request)
    principal, repo = registry.principal(request), _repo(request)
    if request.url.path.endswith("/write"):
        registry.writable_repo(principal, repo)
    else:
        registry.readable_repo(principal, repo)
    return JSONResponse({})


def _revision_and_path(request: Request, marker: str) -> tuple[str, str]:
    """Split `.../{repo}/<marker>/<revision>/<path>` as the client sent it, before percent-decoding.

    The client sends the revision with '/' encoded (`feature%2Fx`) and the path with plain '/';
    the decoded URL would mix them up, so this reads the raw path. The revision starts right after
    the repo's own `/{repo}/<marker>`, not after the first `/<marker>/`: a repo may be named
    `resolve` or `tree` (`/alice/resolve/resolve/main/f.txt`).
    """
    raw = request.scope.get("raw_path") or quote(request.scope["path"]).encode()
    segments = raw.decode("latin-1").split("/")
    prefix = f"/{_repo(request)}/{marker}"
    after, decoded = None, ""
    for count in range(1, len(segments)):  # decoded a segment at a time: linear in the URL's length
        decoded = (decoded + "/" if count > 1 else "") + unquote(segments[count - 1])
        if decoded.endswith(prefix):
            after = "/".join(segments[count:])
            break
    if after is None:
        raise BadRequest("Malformed URL.")
    revision, _, path = after.partition("/")
    try:
        return unquote(revision, errors="strict"), unquote(path, errors="strict")
    except UnicodeDecodeError:
        raise BadRequest("The URL is not valid UTF-8.") from None


async def list_tree(request: Request) -> JSONResponse:
    """GET /api/models/{repo}/tree/{rev}[/{path}]?recursive=true, paginated."""
    registry = _registry(request)
    principal, repo = registry.principal(request), _repo(request)
    revision, folder = _revision_and_path(request, "tree")
    folder = folder.strip("/")
    if folder:
        validate_repo_path(folder)
    recursive = _truthy(request.query_params.get("recursive"))

    def listing() -> list[dict[str, Any]]:
        registry.readable_repo(principal, repo)
        files = registry.store.resolve(repo, revision).files
        return tree_entries(files, folder, recursive=recursive, lfs_threshold=registry.lfs_threshold_bytes)

    page_size = min(registry.page_size, 50) if _truthy(request.query_params.get("expand")) else registry.page_size
    return _paginated(request, await run_in_threadpool(listing), page_size)


# More paths than the client ever sends at once (it asks 500 at a time when copying files).
MAX_PATHS_INFO_PATHS = 10_000


async def paths_info(request: Request) -> JSONResponse:
    """POST /api/models/{repo}/paths-info/{rev} with a form body `paths=a&paths=b`; missing paths are omitted.

    Anyone may ask this of a public repo, so its cost is bounded: who may read is checked before
    the body is read, the form is parsed off the event loop, at most MAX_PATHS_INFO_PATHS paths are
    looked up, and each one is a set lookup (not a scan over the repo's files).
    """
    registry = _registry(request)
    principal, repo = registry.principal(request), _repo(request)
    await run_in_threadpool(registry.readable_repo, principal, repo)
    raw = await _bounded_body(request, MAX_JSON_BODY_BYTES)

    def describe() -> list[dict[str, Any]]:
        paths = [path.strip("/") for path in parse_qs(raw.decode(errors="replace")).get("paths", [])]
        if len(paths) > MAX_PATHS_INFO_PATHS:
            raise BadRequest(
                f"paths-info takes at most {MAX_PATHS_INFO_PATHS} paths at once, not {len(paths)}: ask in batches."
            )
        registry.readable_repo(principal, repo)
        files = registry.store.resolve(repo, request.path_params["revision"]).files
        folders = {path.rsplit("/", depth)[0] for path in files for depth in range(1, path.count("/") + 1)}
        found = []
        for path in paths:
            if path in files:
                found.append(_file_json(path, files[path], registry.lfs_threshold_bytes))
            elif path in folders:
                found.append(_folder_json(path, files))
        return found

    return JSONResponse(await run_in_threadpool(describe))


def list_refs(request: Request) -> JSONResponse:
    """GET /api/models/{repo}/refs: branches and tags (no converts or pull requests)."""
    registry = _registry(request)
    principal, repo = registry.principal(request), _repo(request)
    registry.readable_repo(principal, repo)

    def refs(kind: str, names: Mapping[str, str]) -> list[dict[str, str]]:
        return [{"name": name, "ref": f"refs/{kind}/{name}", "targetCommit": target} for name, target in names.items()]

    return JSONResponse(
        {
            "branches": refs("heads", registry.store.branches(repo)),
            "tags": refs("tags", registry.store.tags(repo)),
            "converts": [],
            "pullRequests": [],
        }
    )


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


# Types a browser would run or render if it opened the file: served as plain bytes instead.
_ACTIVE_CONTENT = ("text/html", "application/xhtml+xml", "image/svg+xml", "text/xml", "application/xml",
                   "text/javascript", "application/javascript", "application/x-javascript")  # fmt: skip


def resolve_file(request: Request) -> Response:
    """HEAD/GET /{repo}/resolve/{rev}/{path}: a file's bytes, with the headers `hf_hub_download` needs.

    A branch or tag redirects (307) to the same file at its current commit, so the metadata
    from HEAD and the bytes from GET always describe the same version even if a commit lands
    in between. At a commit id the reply carries `X-Repo-Commit`, a quoted `ETag` (the git blob
    id, the client's cache key), `Content-Length` and honours `Range`, which the client uses to
    resume. Every download is an attachment that browsers must not sniff or render.
    """
    registry = _registry(request)
    principal, repo = registry.principal(request), _repo(request)
    registry.readable_repo(principal, repo)
    revision, path = _revision_and_path(request, "resolve")
    commit = registry.store.resolve(repo, revision)
    if revision != commit.id:
        location = f"{request.scope.get('root_path', '')}/{repo}/resolve/{commit.id}/{quote(path)}"
        return Response(status_code=307, headers={"Location": location, "X-Repo-Commit": commit.id})
    entry = commit.files.get(path)
    if entry is None:
        raise _entry_not_found(path, commit)
    media_type = mimetypes.guess_type(path)[0] or "application/octet-stream"
    if media_type in _ACTIVE_CONTENT:
        media_type = "application/octet-stream"
    filename = path.rsplit("/", 1)[-1]
    return FileResponse(
        registry.store.blob_path(repo, entry),
        media_type=media_type,
        headers={
            "ETag": f'"{entry.oid}"',
            "X-Repo-Commit": commit.id,
            "Content-Disposition": f"attachment; filename*=UTF-8''{quote(filename, safe='')}",
            "Content-Security-Policy": "default-src 'none'; sandbox",
        },
    )


# --------------------------------------------------------------------------- writing


async def create_branch(request: Request) -> JSONResponse:
    """POST /api/models/{repo}/branch/{branch} with optional {"startingPoint": rev}."""
    registry = _registry(request)
    principal, repo = registry.principal(request), _repo(request)
    await run_in_threadpool(registry.writable_repo, principal, repo)
    branch = validate_ref_name(request.path_params["branch"], "branch")
    payload = await _json_body(request)
    starting_point = _optional(payload, "startingPoint", str) or DEFAULT_BRANCH

    def create() -> None:
        registry.writable_repo(principal, repo)
        registry.store.create_branch(repo, branch, registry.store.resolve(repo, starting_point))

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


async def create_tag(request: Request) -> JSONResponse:
    """POST /api/models/{repo}/tag/{revision} with {"tag": name, "message"?}: tag that revision."""
    registry = _registry(request)
    principal, repo = registry.principal(request), _repo(request)
    await run_in_threadpool(registry.writable_repo, principal, repo)
    payload = await _json_body(request)
    tag = validate_ref_name(payload.get("tag"), "tag")
    _optional(payload, "message", str)

    def create() -> None:
        registry.writable_repo(principal, repo)
        registry.store.create_tag(repo, tag, registry.store.resolve(repo, request.path_params["revision"]))

    await run_in_threadpool(create)
    return JSONResponse({})


async def delete_tag(request: Request) -> JSONResponse:
    registry = _registry(request)
    principal, repo = registry.principal(request), _repo(request)

    def delete() -> None:
        registry.writable_repo(principal, repo)
        registry.store.delete_tag(repo, request.path_params["tag"])

    await run_in_threadpool(delete)
    return JSONResponse({})


async def preupload(request: Request) -> JSONResponse:
    """POST /api/models/{repo}/preupload/{rev}: inline ("regular"), or LFS for big files of declared clients.

    Only a client sending `X-Adapterzoo-Transfer: lfs` gets "lfs" (see the module docstring): a
    plain huggingface_hub with hf_xet installed would send an "lfs" file through Xet and fail.

    `oid` is the git blob id of the file currently at that path, which lets the
    client drop unchanged files from the commit.
    """
    registry = _registry(request)
    principal, repo = registry.principal(request), _repo(request)
    await run_in_threadpool(registry.writable_repo, principal, repo)
    payload = await _json_body(request)
    if _truthy(request.query_params.get("create_pr")):
        raise BadRequest("Pull requests are not supported by this registry.")
    files = payload.get("files")
    if not isinstance(files, list) or not all(isinstance(item, dict) for item in files):
        raise BadRequest("Expected {'files': [{'path', 'size', 'sample'}, ...]}.")
    paths = [validate_repo_path(item.get("path")) for item in files]
    sizes = [_optional(item, "size", int) or 0 for item in files]

    def plan() -> dict[str, Any]:
        registry.writable_repo(principal, repo)
        current = registry.store.resolve(repo, request.path_params["revision"])
        modes = [
            {
                "path": path,
                "uploadMode": registry.upload_mode(request, size),
                "shouldIgnore": False,
                "oid": current.files[path].oid if path in current.files else None,
            }
            for path, size in zip(paths, sizes)
        ]
        return {"files": modes, "commitOid": current.id}

    return JSONResponse(await run_in_threadpool(plan))


async def commit(request: Request) -> JSONResponse:
    """POST /api/models/{repo}/commit/{branch}: an NDJSON body of header, file and deletion lines.

    Who may write is checked before a byte of the body is read. The body is then streamed
    to a temporary file (never held in memory whole) and refused with 413 once it passes
    `--max-upload-bytes`, with a reply naming the way out (LFS). Bodies carrying more than the
    LFS threshold are decoded one at a time (the store's bound), smaller ones a few at once.
    """
    registry = _registry(request)
    principal, repo = registry.principal(request), _repo(request)
    branch = request.path_params["revision"]
    if _truthy(request.query_params.get("create_pr")):
        raise BadRequest("Pull requests are not supported by this registry.")
    if FULL_COMMIT_ID.fullmatch(branch):
        raise BadRequest("Commits go to a branch, not to a commit id.")
    await run_in_threadpool(registry.writable_repo, principal, repo)
    # A big (or unsized) body takes one of the upload slots while it is received, as LFS objects do:
    # otherwise one tenant's many slow uploads could fill tmp/, outside any quota, under everyone.
    declared = request.headers.get("content-length", "")
    big = not declared.isascii() or not declared.isdigit() or int(declared) > SMALL_COMMIT_BODY_BYTES
    try:
        async with registry.uploads.slot() if big else nullcontext():
            body_path = await _receive_body(
                request, registry.store.temp_path(".ndjson"), registry.max_upload_bytes, hint=USE_LFS_HINT
            )
    except ClientDisconnect:  # the uploader went away mid-body; nothing was committed
        return Response(status_code=400)
    try:
        new_commit = await run_in_threadpool(
            registry.store.commit, repo, branch, body_path, author=principal.user or "anonymous",
            max_inline_bytes=registry.max_inline_bytes, big_body_bytes=registry.lfs_threshold_bytes,
        )  # fmt: skip
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


# --------------------------------------------------------------------------- Git LFS


async def lfs_batch(request: Request) -> JSONResponse:
    """POST /{repo}.git/info/lfs/objects/batch: where to upload each object (see lfs.py)."""
    registry = _registry(request)
    principal, repo = registry.principal(request), _repo(request)
    await run_in_threadpool(registry.writable_repo, principal, repo)
    payload = await _json_body(request)
    reply = await run_in_threadpool(
        registry.uploads.batch, registry.store, repo, payload, _base_url(request) + request.scope.get("root_path", "")
    )
    return JSONResponse(reply, media_type="application/vnd.git-lfs+json")


async def lfs_upload(request: Request) -> JSONResponse:
    """PUT /{repo}.git/info/lfs/objects/{oid}?...: the bytes, authorized by the signed URL batch gave."""
    registry = _registry(request)
    repo = _repo(request)
    await registry.uploads.receive(request, registry.store, repo, request.path_params["oid"])
    return JSONResponse({})


async def lfs_verify(request: Request) -> JSONResponse:
    """POST /{repo}.git/info/lfs/objects/verify {"oid", "size"}: 200 once the object is stored whole."""
    registry = _registry(request)
    principal, repo = registry.principal(request), _repo(request)
    await run_in_threadpool(registry.writable_repo, principal, repo)
    payload = await _json_body(request)
    oid, size = _optional(payload, "oid", str), _optional(payload, "size", int)
    entry = await run_in_threadpool(registry.store.lfs_object, repo, (oid or "").lower())
    if entry is None or (size is not None and entry.size != size):
        raise lfs.ObjectNotFound(f"LFS object {oid} ({size} bytes) is not stored in {repo}: upload it again.")
    return JSONResponse({})


def xet_not_supported(request: Request) -> JSONResponse:
    # The client shows only "501 ... xet-write-token", so the operator's log says what to do too.
    # Only a client that declared LFS (X-Adapterzoo-Transfer: lfs) gets "lfs" from preupload, so
    # one reaching here declared it but runs with Xet on.
    logger.warning(
        "A client tried to upload through Xet (%s) after declaring %s: lfs; this registry speaks Git LFS:"
        " the client needs HF_HUB_DISABLE_XET=1, or must drop the header.", request.url.path, TRANSFER_HEADER,
    )  # fmt: skip
    raise NotImplementedRoute(
        f"This registry stores large files with Git LFS, not Xet. The client sent '{TRANSFER_HEADER}: lfs' but"
        " uploads through Xet: set HF_HUB_DISABLE_XET=1 where huggingface_hub runs (or uninstall hf_xet) and"
        " retry, or drop the header to upload inline."
    )


# --------------------------------------------------------------------------- bodies


async def _json_body(request: Request) -> dict[str, Any]:
    raw = await _bounded_body(request, MAX_JSON_BODY_BYTES)
    if not raw.strip():
        return {}
    try:
        payload = json.loads(raw)
    except (ValueError, RecursionError):
        raise BadRequest("The request body is not valid JSON (or is nested too deeply).") from None
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


async def _receive_body(request: Request, target: Path, limit: int, *, hint: str = "") -> Path:
    """Stream the request body into `target`, refusing it (413, then `hint`) past `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"Upload of {declared} bytes exceeds the limit of {limit} bytes. {hint}".rstrip())
    received = 0
    try:
        with open(target, "wb") as out:
            async for chunk in request.stream():
                received += len(chunk)
                if received > limit:
                    raise PayloadTooLarge(f"Upload exceeds the limit of {limit} bytes. {hint}".rstrip())
                out.write(chunk)
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    return target


async def _discard_small_body(request: Request) -> None:
    """After an early refusal, read and drop a body of at most DISCARDABLE_BODY_BYTES.

    Then the connection can carry the next request. A bigger body is never read: the reply
    goes out at once and the guard marks it `Connection: close`.
    """
    declared = request.headers.get("content-length", "")
    if not declared.isdigit() or int(declared) > DISCARDABLE_BODY_BYTES:
        return
    try:
        async for _ in request.stream():
            pass
    except (RuntimeError, ClientDisconnect):  # already read, or the client left
        return


# --------------------------------------------------------------------------- errors


def unknown_api_route(request: Request) -> JSONResponse:
    """Dataset, Space and other repo types (404), and endpoints this registry does not implement (501)."""
    kind = request.path_params.get("kind")
    if kind in ("datasets", "spaces", "kernels", "buckets"):
        raise RepoNotFound(f"Only model repositories are supported by this registry, not {kind}.")
    raise NotImplementedRoute(
        f"{request.method} {request.url.path} is a Hub API this registry does not implement"
        " (see docs/registry.md for what it does)."
    )


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
    """`text` as a header value: ASCII, one line, no control characters.

    Messages echo what the caller sent (a revision, a path); a NUL there made the HTTP layer drop
    the connection instead of answering.
    """
    printable = "".join(char if " " <= char < "\x7f" else " " for char in text.encode("ascii", "replace").decode())
    return " ".join(printable.split())[:1000]


async def _registry_error_response(request: Request, error: Exception) -> Response:
    assert isinstance(error, RegistryError)
    await _discard_small_body(request)
    return _error_json(error.status, error.message, error.error_code, error.headers, error.body)


async def _http_error_response(request: Request, error: Exception) -> Response:
    assert isinstance(error, HTTPException)
    await _discard_small_body(request)
    return _error_json(error.status_code, str(error.detail), headers=error.headers)


async def _os_error_response(request: Request, error: Exception) -> Response:
    """A full disk is 507 (whatever was being written is already removed); other OS errors are 500s."""
    assert isinstance(error, OSError)
    if error.errno in DISK_FULL_ERRNOS:
        full = disk_full(error)
        return _error_json(full.status, full.message, full.error_code)
    logger.error("Unhandled OS error on %s %s", request.method, request.url.path, exc_info=error)
    return _error_json(500, "Internal server error.")
