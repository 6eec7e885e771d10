"""Model repositories kept in plain files, with atomic, crash-safe commits.

Layout under the registry root::

    models/<namespace>/<name>/repo.json             visibility and creation time
    models/<namespace>/<name>/blobs/<sha256>        file contents, content-addressed
    models/<namespace>/<name>/commits/<id>.json     parent, message, author, date, {path: blob}
    models/<namespace>/<name>/refs/heads/<branch>   the commit id the branch points to
    locks/<namespace>/<name>.lock                   flock(2) target serializing writes to one repo
    tmp/                                            every temporary file (emptied on start)
    trash/                                          deleted repos being removed (emptied on start)

Why it is crash safe: every file is first written under ``tmp/``, fsync'd, then
``os.replace``d into place, and a commit is published in dependency order (blobs,
then the commit record, then the branch ref). A process killed at any point leaves
either the old ref or the new one, and the old ref only names files that are
fully on disk. Leftovers of an interrupted commit are unreferenced files: they are
never served by a branch and are harmless.
"""

from __future__ import annotations

import binascii
import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import threading
import time
import unicodedata
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Generic, TypeVar

DEFAULT_BRANCH = "main"

_K = TypeVar("_K")
_V = TypeVar("_V")

# --------------------------------------------------------------------------- errors


class RegistryError(Exception):
    """An error the HTTP layer turns into a JSON reply with this status.

    `error_code` goes into the `X-Error-Code` header: `huggingface_hub` maps
    `RepoNotFound`, `RevisionNotFound` and `EntryNotFound` to its own exceptions.
    """

    status: int = 500
    error_code: str | None = None

    def __init__(
        self, message: str, *, headers: Mapping[str, str] | None = None, body: Mapping[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.headers = dict(headers or {})
        self.body = dict(body or {})  # extra fields for the JSON reply, next to "error"


class BadRequest(RegistryError):
    status = 400


class RepoNotFound(RegistryError):
    status = 404
    error_code = "RepoNotFound"


class RevisionNotFound(RegistryError):
    status = 404
    error_code = "RevisionNotFound"


class EntryNotFound(RegistryError):
    status = 404
    error_code = "EntryNotFound"


class RepoExists(RegistryError):
    status = 409


class RefExists(RegistryError):
    status = 409


class ParentCommitMismatch(RegistryError):
    status = 412


class PayloadTooLarge(RegistryError):
    status = 413


class InsufficientStorage(RegistryError):
    """507: the disk is full or the namespace's quota is spent; nothing was written."""

    status = 507
    error_code = "InsufficientStorage"


DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def disk_full(error: OSError) -> InsufficientStorage:
    return InsufficientStorage(
        "The registry's disk is full: nothing was written. Ask the operator to free space, then retry."
    )


# --------------------------------------------------------------------------- names


_REPO_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?")
_REF_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
FULL_COMMIT_ID = re.compile(r"[0-9a-fA-F]{40}")
SHORT_COMMIT_ID = re.compile(r"[0-9a-fA-F]{7,39}")
_HEX_ONLY = re.compile(r"[0-9a-fA-F]+")
MAX_REF_NAME = 255
# First path segments that routes use; a namespace with one of these names would be shadowed.
RESERVED_NAMESPACES = frozenset({"api", "datasets", "spaces", "kernels", "models", "buckets"})
# Names Windows refuses for files, with or without an extension: a repo cloned there would break.
RESERVED_DEVICE_NAMES = frozenset(
    {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"}
    | {f"{port}{digit}" for port in ("COM", "LPT") for digit in [*"0123456789", "\u00b9", "\u00b2", "\u00b3"]}
)
# Characters that reorder or hide text: a name holding one can display as another name.
_BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def name_problems(name: str) -> list[str]:
    """What makes `name` (a repo id part, ref or path segment) unsafe to show or store; empty if nothing."""
    problems = []
    if any(unicodedata.category(char) in ("Cc", "Zl", "Zp") for char in name):
        problems.append("control characters (newlines, tabs, NUL...) are not allowed")
    if any(char in _BIDI_CONTROLS for char in name):
        problems.append("right-to-left and other bidirectional override characters are not allowed")
    elif any(unicodedata.category(char) == "Cf" for char in name):
        # Zero-width spaces and joiners, soft hyphens, BOMs: "README\u200b.md" displays as README.md.
        problems.append(
            "invisible formatting characters (zero-width space or joiner, soft hyphen, BOM...) are not allowed"
        )
    for segment in name.split("/"):
        if segment.split(".")[0].rstrip(" ").upper() in RESERVED_DEVICE_NAMES:
            problems.append(f"{segment!r} is a reserved device name on Windows (CON, PRN, AUX, NUL, COM1, LPT1...)")
    return problems


@dataclass(frozen=True, order=True)
class RepoId:
    """A validated `namespace/name`; both parts are safe as directory names."""

    namespace: str
    name: str

    @classmethod
    def parse(cls, namespace: Any, name: Any) -> RepoId:
        """Validate both parts, raising `BadRequest` (400) on anything unsafe."""
        for part in (namespace, name):
            if not isinstance(part, str) or not _REPO_NAME.fullmatch(part) or ".." in part or "--" in part:
                raise BadRequest(
                    f"Invalid repo id {namespace!r}/{name!r}: expected 'namespace/name' made of letters, digits,"
                    " '-', '_' and '.', starting and ending with a letter or digit, at most 96 characters each."
                )
            if name_problems(part):
                raise BadRequest(f"Invalid repo id {namespace}/{name}: {'; '.join(name_problems(part))}.")
        if namespace in RESERVED_NAMESPACES:
            raise BadRequest(f"Invalid repo id {namespace}/{name}: namespace '{namespace}' is reserved.")
        return cls(namespace, name)

    @classmethod
    def from_string(cls, repo_id: str) -> RepoId:
        namespace, _, name = repo_id.partition("/")
        return cls.parse(namespace, name)

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


def ref_name_problems(name: Any) -> list[str]:
    """Why `name` cannot be a branch or tag name; empty if it can.

    Names become files under refs/, so each '/'-separated part is a plain file name. Names made
    only of hex digits are refused: they could be mistaken for a commit id, and a pinned
    `revision=<commit id>` must never be redirected by a branch or a tag.
    """
    if not isinstance(name, str) or not name:
        return ["expected a non-empty string"]
    problems = name_problems(name)
    if len(name) > MAX_REF_NAME:
        problems.append(f"longer than {MAX_REF_NAME} characters")
    segments = name.split("/")
    if not all(_REF_SEGMENT.fullmatch(segment) for segment in segments) or ".." in name:
        problems.append(
            "use letters, digits, '-', '_' and '.' in '/'-separated parts, each starting with a letter or digit,"
            " and no '..'"
        )
    if any(segment.endswith(".lock") for segment in segments):
        problems.append("no part may end with '.lock'")
    if _HEX_ONLY.fullmatch(name):
        problems.append("a name made only of hex digits could be taken for a commit id; add a letter outside a-f")
    if segments[0] in ("refs", "HEAD"):
        # `refs/tags/v2` as a branch would be listed as refs/heads/refs/tags/v2 and read like a tag.
        problems.append(
            "a name may not start with 'refs/' nor be 'HEAD': give the short name ('v2', not 'refs/tags/v2')"
        )
    return problems


def validate_ref_name(name: Any, kind: str = "branch") -> str:
    problems = ref_name_problems(name)
    if problems:
        raise BadRequest(f"Invalid {kind} name {name!r}: {'; '.join(problems)}.")
    return name


def validate_branch_name(branch: Any) -> str:
    return validate_ref_name(branch, "branch")


def validate_repo_path(path: Any, *, folder: bool = False) -> str:
    """Return `path` if it is a safe relative path inside a repo, else raise `BadRequest`.

    Rejects what could escape the repo or alias another file: absolute paths,
    backslashes, `.` / `..` / empty segments, NUL bytes and the `.git` folder.
    """
    if not isinstance(path, str) or not path:
        raise BadRequest("Invalid path in repo: expected a non-empty string.")
    candidate = path[:-1] if folder and path.endswith("/") else path
    problems = []
    if candidate.startswith("/") or re.match(r"^[A-Za-z]:", candidate):
        problems.append("absolute paths are not allowed")
    if "\\" in candidate:
        problems.append("backslashes are not allowed")
    if "\x00" in candidate:
        problems.append("NUL bytes are not allowed")
    if len(candidate.encode()) > 1024:
        problems.append("longer than 1024 bytes")
    segments = candidate.split("/")
    if any(segment in ("", ".", "..") for segment in segments):
        problems.append("empty, '.' and '..' segments are not allowed")
    if ".git" in segments:
        problems.append("the .git folder is reserved")
    problems += name_problems(candidate)
    if problems:
        raise BadRequest(f"Invalid path in repo {path!r}: {'; '.join(problems)}.")
    return candidate


# --------------------------------------------------------------------------- records


def utc_now_iso() -> str:
    """Timestamps in the `2024-01-31T12:00:00.000Z` form `huggingface_hub` parses."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass(frozen=True)
class FileEntry:
    """One file of a commit: where its bytes are (`sha256`) and its git blob id (`oid`)."""

    sha256: str
    oid: str
    size: int

    def to_json(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "oid": self.oid, "size": self.size}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FileEntry:
        return cls(sha256=data["sha256"], oid=data["oid"], size=int(data["size"]))


@dataclass(frozen=True)
class Commit:
    """An immutable revision: the full file list, not a diff, so reads never walk history."""

    id: str
    parent: str | None
    summary: str
    description: str
    author: str
    date: str
    files: Mapping[str, FileEntry]

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "parent": self.parent,
            "summary": self.summary,
            "description": self.description,
            "author": self.author,
            "date": self.date,
            "files": {path: entry.to_json() for path, entry in sorted(self.files.items())},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Commit:
        return cls(
            id=data["id"],
            parent=data["parent"],
            summary=data["summary"],
            description=data.get("description", ""),
            author=data.get("author", ""),
            date=data["date"],
            files={path: FileEntry.from_json(entry) for path, entry in data["files"].items()},
        )

    @classmethod
    def new(
        cls, *, parent: str | None, summary: str, description: str, author: str, files: Mapping[str, FileEntry]
    ) -> Commit:
        """Build a commit whose id is a 40-hex digest of its content and creation instant."""
        draft = cls(
            id="",
            parent=parent,
            summary=summary,
            description=description,
            author=author,
            date=utc_now_iso(),
            files=dict(files),
        )
        material = json.dumps({**draft.to_json(), "nonce": time.time_ns()}, sort_keys=True).encode()
        return dataclasses.replace(draft, id=hashlib.sha1(material).hexdigest())


@dataclass(frozen=True)
class RepoMeta:
    private: bool
    created_at: str

    def to_json(self) -> dict[str, Any]:
        return {"private": self.private, "created_at": self.created_at}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RepoMeta:
        return cls(private=bool(data["private"]), created_at=data["created_at"])


# --------------------------------------------------------------------------- commit bodies


@dataclass(frozen=True)
class AddFile:
    path: str
    entry: FileEntry
    staged_blob: Path | None  # None: the blob is already in the repo (an LFS object)


@dataclass(frozen=True)
class DeleteFile:
    path: str


@dataclass(frozen=True)
class DeleteFolder:
    path: str


Operation = AddFile | DeleteFile | DeleteFolder


@dataclass
class CommitRequest:
    """A parsed and fully validated commit body whose new files wait in a staging folder."""

    summary: str
    description: str
    parent_commit: str | None
    operations: list[Operation] = field(default_factory=list)


LfsLookup = Callable[[str, Any], FileEntry]
# Every listing of commits, and the web page, holds messages in memory: keep them message-sized.
MAX_COMMIT_SUMMARY_CHARS = 4_000
MAX_COMMIT_DESCRIPTION_CHARS = 64 * 1024
# Each operation is a staged file and an entry held in memory until the commit lands: 40,000 empty
# files took 17 s of a decoding slot, and the body limit allowed millions.
MAX_COMMIT_OPERATIONS = 25_000


def parse_commit_body(
    body_path: Path, staging_dir: Path, *, max_inline_bytes: int, lfs_lookup: LfsLookup
) -> CommitRequest:
    """Parse the NDJSON body `huggingface_hub` sends to `/commit` (see `_commit_api._prepare_commit_payload`).

    The first line is `{"key": "header", "value": {"summary", "description", "parentCommit"?}}`,
    then one line per operation: `file` (base64 `content`), `lfsFile` (an object uploaded before
    through the LFS batch API, named by its sha256), `deletedFile`, `deletedFolder`.
    File contents are decoded into `staging_dir` so nothing touches the repo until the
    whole body is known to be valid. A line is read with a length cap, so a file sent
    inline past `max_inline_bytes` is refused without being held in memory whole.
    """
    max_line = (max_inline_bytes + 2) // 3 * 4 + 64 * 1024  # base64 of the largest inline file, plus JSON
    with open(body_path, "rb") as body:
        number, item = 0, None
        request: CommitRequest | None = None
        while True:
            raw = body.readline(max_line + 1)
            if not raw:
                break
            number += 1
            if len(raw) > max_line:
                raise PayloadTooLarge(
                    f"Commit line {number} is larger than an inline file may be ({max_inline_bytes} bytes)."
                    " Files this big go through Git LFS: push with `adapterzoo push`, or run huggingface_hub with"
                    " HF_HUB_DISABLE_XET=1 and HfApi(headers={'X-Adapterzoo-Transfer': 'lfs'})."
                )
            if not raw.strip():
                continue
            # Decode, then drop the bytes before parsing: a line may be a file of hundreds of MiB
            # (plain clients send big files inline), and each copy held at once is that much memory.
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise BadRequest(f"Malformed commit: line {number} is not valid UTF-8 JSON.") from None
            raw = b""
            item = _parse_ndjson_line(number, text)
            text = ""
            if request is None:
                request = _parse_header(item)
            elif len(request.operations) >= MAX_COMMIT_OPERATIONS:
                raise BadRequest(
                    f"A commit holds at most {MAX_COMMIT_OPERATIONS} operations (files added or deleted): split"
                    " this one into several commits."
                )
            else:
                request.operations.append(_parse_operation(item, number, staging_dir, lfs_lookup))
    if request is None:
        raise BadRequest("Malformed commit: the body is empty, expected a 'header' line first.")
    return request


def _parse_ndjson_line(number: int, raw: str) -> dict[str, Any]:
    try:
        item = json.loads(raw)
    except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError, nesting too deep
        raise BadRequest(f"Malformed commit: line {number} is not valid JSON (or is nested too deeply).") from None
    if not isinstance(item, dict) or not isinstance(item.get("key"), str) or not isinstance(item.get("value"), dict):
        raise BadRequest(
            f"Malformed commit: line {number} must be an object with a string 'key' and an object 'value'."
        )
    return item


def _parse_header(item: dict[str, Any]) -> CommitRequest:
    if item["key"] != "header":
        raise BadRequest(f"Malformed commit: the first line must be the 'header', got {item['key']!r}.")
    value = item["value"]
    summary, description, parent = value.get("summary"), value.get("description") or "", value.get("parentCommit")
    if not isinstance(summary, str) or not summary.strip():
        raise BadRequest("Malformed commit: the header needs a non-empty 'summary'.")
    if not isinstance(description, str):
        raise BadRequest("Malformed commit: the header 'description' must be a string.")
    for field_name, text, limit in (
        ("summary", summary, MAX_COMMIT_SUMMARY_CHARS),
        ("description", description, MAX_COMMIT_DESCRIPTION_CHARS),
    ):
        if len(text) > limit:
            raise BadRequest(
                f"Commit {field_name} has {len(text)} characters; at most {limit} are allowed: shorten it"
                " (a long text belongs in a file of the repo)."
            )
    if parent is not None and (not isinstance(parent, str) or not re.fullmatch(r"[0-9a-fA-F]{5,40}", parent)):
        raise BadRequest("Malformed commit: 'parentCommit' must be a hexadecimal commit id.")
    return CommitRequest(summary=summary, description=description, parent_commit=parent.lower() if parent else None)


def _parse_operation(item: dict[str, Any], number: int, staging_dir: Path, lfs_lookup: LfsLookup) -> Operation:
    key, value = item["key"], item["value"]
    if key == "file":
        return _stage_file(value, number, staging_dir)
    if key == "lfsFile":
        path = validate_repo_path(value.get("path"))
        if value.get("algo", "sha256") != "sha256" or not isinstance(value.get("oid"), str):
            raise BadRequest(f"Malformed commit: line {number} ({path}) needs 'algo': 'sha256' and a string 'oid'.")
        size = value.get("size")
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
            raise BadRequest(f"Malformed commit: line {number} ({path}) has a 'size' that is not an integer.")
        return AddFile(path=path, entry=lfs_lookup(value["oid"].lower(), size), staged_blob=None)
    if key == "deletedFile":
        return DeleteFile(validate_repo_path(value.get("path")))
    if key == "deletedFolder":
        return DeleteFolder(validate_repo_path(value.get("path"), folder=True))
    if key == "header":
        raise BadRequest(f"Malformed commit: line {number} is a second 'header'.")
    raise BadRequest(f"Malformed commit: line {number} has unknown key {key!r}.")


def _stage_file(value: dict[str, Any], number: int, staging_dir: Path) -> AddFile:
    path = validate_repo_path(value.get("path"))
    if value.get("encoding", "base64") != "base64":
        raise BadRequest(f"Malformed commit: line {number} ({path}) must use encoding 'base64'.")
    content = value.get("content")
    if not isinstance(content, str):
        raise BadRequest(f"Malformed commit: line {number} ({path}) has no string 'content'.")
    staged_blob = staging_dir / f"{number}.blob"
    try:
        entry = _decode_base64_to_file(content, staged_blob)
    except (binascii.Error, ValueError):  # UnicodeEncodeError is a ValueError too
        raise BadRequest(f"Malformed commit: line {number} ({path}) has invalid base64 content.") from None
    return AddFile(path=path, entry=entry, staged_blob=staged_blob)


BASE64_SLICE_CHARS = 4 * 1024 * 1024  # a multiple of 4: every slice but the last decodes on its own


def _decode_base64_to_file(content: str, target: Path) -> FileEntry:
    """Decode strict base64 `content` into `target` a slice at a time, hashing as it goes.

    Decoding it whole would hold an ASCII copy of `content` and the decoded bytes besides
    `content` itself: for a file sent inline near the body limit, another ~2 x its size.
    """
    if len(content) % 4:
        raise binascii.Error("base64 length is not a multiple of 4")
    padding = len(content) - len(content.rstrip("="))
    size = len(content) // 4 * 3 - padding
    sha256, sha1 = hashlib.sha256(), hashlib.sha1(b"blob %d\x00" % size)
    written = 0
    with open(target, "wb") as out:
        for start in range(0, len(content), BASE64_SLICE_CHARS):
            data = binascii.a2b_base64(content[start : start + BASE64_SLICE_CHARS].encode("ascii"), strict_mode=True)
            sha256.update(data)
            sha1.update(data)
            out.write(data)
            written += len(data)
        out.flush()
        os.fsync(out.fileno())
    if written != size:  # padding inside the text, which strict mode accepts at a slice's end
        raise binascii.Error("base64 padding in the middle of the content")
    return FileEntry(sha256=sha256.hexdigest(), oid=sha1.hexdigest(), size=size)


def git_blob_oid(data: bytes) -> str:
    """The id git gives this content (`git hash-object`); the client compares it to skip unchanged files."""
    digest = hashlib.sha1(b"blob %d\x00" % len(data))
    digest.update(data)
    return digest.hexdigest()


def apply_operations(files: Mapping[str, FileEntry], operations: list[Operation]) -> dict[str, FileEntry]:
    """The file list after `operations`, in order; deleting a missing file is a 404 like on the Hub."""
    result = dict(files)
    for operation in operations:
        if isinstance(operation, AddFile):
            result[operation.path] = operation.entry
        elif isinstance(operation, DeleteFile):
            if result.pop(operation.path, None) is None:
                raise EntryNotFound(f"A file with this name doesn't exist: {operation.path}")
        else:
            prefix = operation.path + "/"
            for path in [path for path in result if path.startswith(prefix)]:
                del result[path]
    _reject_file_folder_clashes(result)
    return result


def _reject_file_folder_clashes(files: Mapping[str, FileEntry]) -> None:
    """A path cannot be both a file and a folder (`a` and `a/b`): git trees cannot hold that."""
    folders = {path.rsplit("/", depth)[0] for path in files for depth in range(1, path.count("/") + 1)}
    clashes = sorted(folders & set(files))
    if clashes:
        raise BadRequest(f"Invalid commit: {clashes[0]!r} would be both a file and a folder.")
    # "café" composed and decomposed look the same everywhere and are one file on macOS.
    by_normal_form: dict[str, str] = {}
    for path in sorted(files):
        other = by_normal_form.setdefault(unicodedata.normalize("NFC", path), path)
        if other != path:
            raise BadRequest(
                f"Invalid commit: {path!r} and {other!r} differ only in Unicode normalization (NFC/NFD), so they"
                " look identical and are one file on some systems. Keep one of them."
            )


# --------------------------------------------------------------------------- the store


@dataclass(frozen=True)
class RepoSummary:
    """What listing needs about a repo without touching the disk: kept in memory by the store."""

    repo: RepoId
    meta: RepoMeta
    head: str  # the commit id `main` points to
    last_modified: str  # the date of that commit


class Store:
    """All repositories under one root directory.

    Writes to one repo are serialized with an exclusive `flock` on its lock file,
    which also works across worker processes and is released by the kernel if
    the server dies. Reads take no lock: they only follow refs, which are
    replaced atomically, to immutable commit records and blobs.

    `namespace_quota_bytes` caps the bytes of blobs under each namespace (None: no cap).
    `max_concurrent_commits` bounds how many commit bodies are decoded at once, since each
    may hold an inline file in memory.
    """

    def __init__(
        self, root: Path | str, *, namespace_quota_bytes: int | None = None, max_concurrent_commits: int = 4
    ) -> None:
        self.root = Path(root).resolve()
        self._models = self.root / "models"
        self._locks = self.root / "locks"
        self._tmp = self.root / "tmp"
        self._trash = self.root / "trash"
        for folder in (self._models, self._locks, self._tmp, self._trash):
            folder.mkdir(parents=True, exist_ok=True)
        self.namespace_quota_bytes = namespace_quota_bytes
        self._commit_cache: BoundedCache[tuple[str, str], Commit] = BoundedCache(100_000)
        self._decoding = threading.BoundedSemaphore(max(1, max_concurrent_commits))
        # Bodies carrying big inline files (clients that did not declare LFS) take this one too, so
        # at most one of them is decoded at a time: memory ~ a few small bodies + one body at the limit.
        self._decoding_big = threading.BoundedSemaphore(1)
        self._index: dict[RepoId, RepoSummary] | None = None
        self._index_order: list[RepoSummary] | None = None
        self._index_lock = threading.Lock()
        self.recover()

    # -- start-up

    def recover(self) -> None:
        """Remove what an interrupted process left in tmp/ and trash/; committed data is never there."""
        for folder in (self._tmp, self._trash):
            for leftover in folder.iterdir():
                if leftover.is_dir() and not leftover.is_symlink():
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    leftover.unlink(missing_ok=True)

    # -- temporary files

    def temp_path(self, suffix: str = "") -> Path:
        """A fresh path under tmp/, on the same filesystem as the repos so `os.replace` is atomic."""
        return self._tmp / f"{uuid.uuid4().hex}{suffix}"

    # -- repositories

    def repo_meta(self, repo: RepoId) -> RepoMeta | None:
        try:
            return RepoMeta.from_json(json.loads((self._repo_dir(repo) / "repo.json").read_bytes()))
        except FileNotFoundError:
            return None

    def iter_repos(self) -> Iterator[RepoId]:
        """Every repo, sorted by id; half-created repos are never visible (see `create_repo`)."""
        for summary in self.summaries():
            yield summary.repo

    def summaries(self) -> list[RepoSummary]:
        """Every repo with its visibility and `main` head, sorted by id, from memory.

        Read from disk once, then kept current by this store's own writes, so a listing page
        costs a walk over memory, not a read per repo. One server process per root (see docs).
        """
        with self._index_lock:
            if self._index is None:
                self._index = {}
                for meta_file in self._models.glob("*/*/repo.json"):
                    repo = RepoId(meta_file.parent.parent.name, meta_file.parent.name)
                    summary = self._read_summary(repo)
                    if summary is not None:
                        self._index[repo] = summary
            if self._index_order is None:
                self._index_order = sorted(self._index.values(), key=lambda summary: summary.repo)
            return self._index_order

    def _read_summary(self, repo: RepoId) -> RepoSummary | None:
        meta, head = self.repo_meta(repo), self._read_ref_or_none(repo, "heads", DEFAULT_BRANCH)
        if meta is None or head is None:
            return None
        try:
            return RepoSummary(repo, meta, head, self.read_commit(repo, head).date)
        except (OSError, ValueError, KeyError):  # deleted meanwhile, or a damaged record: not listed
            return None

    def _refresh_summary(self, repo: RepoId) -> None:
        """Called after every write that may change what `summaries` shows for `repo`."""
        summary = self._read_summary(repo)
        with self._index_lock:
            if self._index is None:
                return
            if summary is None:
                self._index.pop(repo, None)
            else:
                self._index[repo] = summary
            self._index_order = None

    def create_repo(self, repo: RepoId, *, private: bool, author: str) -> Commit:
        """Create a repo whose `main` holds an empty initial commit, like the Hub does.

        The repo is assembled under tmp/ and renamed into place in one step, so it
        either fully exists or does not.
        """
        with self._repo_lock(repo):
            if self.repo_meta(repo) is not None:
                raise RepoExists(f"You already created this model repo: {repo}")
            building = self.temp_path(".repo")
            try:
                for sub in ("blobs", "commits", "refs/heads", "refs/tags"):
                    (building / sub).mkdir(parents=True)
                initial = Commit.new(parent=None, summary="initial commit", description="", author=author, files={})
                _write_file(building / "repo.json", _to_json_bytes(RepoMeta(private, utc_now_iso()).to_json()))
                _write_file(building / "commits" / f"{initial.id}.json", _to_json_bytes(initial.to_json()))
                _write_file(building / "refs" / "heads" / DEFAULT_BRANCH, initial.id.encode())
                final = self._repo_dir(repo)
                final.parent.mkdir(parents=True, exist_ok=True)
                if final.exists():  # debris of a repo whose creation or deletion was interrupted
                    os.replace(final, self._trash / uuid.uuid4().hex)
                os.replace(building, final)
                _fsync_dir(final.parent)
            finally:
                shutil.rmtree(building, ignore_errors=True)  # gone already unless something failed
        self._refresh_summary(repo)
        return initial

    def delete_repo(self, repo: RepoId) -> None:
        """Move the repo to trash/ atomically, then remove it; a crash in between is cleaned on start."""
        with self._repo_lock(repo):
            self._require_repo(repo)
            doomed = self._trash / uuid.uuid4().hex
            os.replace(self._repo_dir(repo), doomed)
            _fsync_dir(self._repo_dir(repo).parent)
            shutil.rmtree(doomed, ignore_errors=True)
        self._refresh_summary(repo)

    def set_private(self, repo: RepoId, private: bool) -> None:
        with self._repo_lock(repo):
            meta = self._require_repo(repo)
            new_meta = RepoMeta(private=private, created_at=meta.created_at)
            self._replace_file(self._repo_dir(repo) / "repo.json", _to_json_bytes(new_meta.to_json()))
        self._refresh_summary(repo)

    # -- revisions

    def resolve(self, repo: RepoId, revision: str) -> Commit:
        """Turn a revision into a commit, or raise `RevisionNotFound`.

        Order: a full 40-hex id is a commit and nothing else (so a pinned revision can never
        be redirected); then a branch, then a tag (`refs/heads/x` and `refs/tags/x` name one
        kind only); then a unique commit id prefix of 7 or more hex digits.
        """
        if not isinstance(revision, str) or not revision:
            raise BadRequest("A revision must be a non-empty string (a branch, a tag or a commit id).")
        if FULL_COMMIT_ID.fullmatch(revision):
            return self._commit_or_not_found(repo, revision.lower(), revision)
        if revision.startswith("refs/heads/") or revision.startswith("refs/tags/"):
            kind, _, name = revision[len("refs/") :].partition("/")
            commit_id = self._read_ref_or_none(repo, kind, name)
        else:
            commit_id = self._read_ref_or_none(repo, "heads", revision)
            commit_id = commit_id or self._read_ref_or_none(repo, "tags", revision)
        if commit_id is None and SHORT_COMMIT_ID.fullmatch(revision):
            commit_id = self._commit_id_by_prefix(repo, revision.lower())
        if commit_id is None:
            raise RevisionNotFound(f"Invalid rev id: {revision}")
        return self._commit_or_not_found(repo, commit_id, revision)

    def _commit_or_not_found(self, repo: RepoId, commit_id: str, revision: str) -> Commit:
        try:
            return self.read_commit(repo, commit_id)
        except (FileNotFoundError, NotADirectoryError):
            raise RevisionNotFound(f"Invalid rev id: {revision}") from None

    def _commit_id_by_prefix(self, repo: RepoId, prefix: str) -> str | None:
        try:
            names = [entry.name for entry in os.scandir(self._repo_dir(repo) / "commits")]
        except FileNotFoundError:
            return None
        found = [name[:-5] for name in names if name.startswith(prefix) and name.endswith(".json")]
        if len(found) > 1:
            raise BadRequest(f"Short commit id {prefix} is ambiguous ({len(found)} commits): give more digits.")
        return found[0] if found else None

    def read_commit(self, repo: RepoId, commit_id: str) -> Commit:
        """Commits are immutable, so they are cached in memory once read."""
        return self._commit_cache.get_or_compute(
            (str(repo), commit_id),
            lambda: Commit.from_json(json.loads((self._repo_dir(repo) / "commits" / f"{commit_id}.json").read_bytes())),
        )

    def history(self, repo: RepoId, commit: Commit) -> Iterator[Commit]:
        """`commit` and its ancestors, newest first."""
        current: Commit | None = commit
        while current is not None:
            yield current
            current = self.read_commit(repo, current.parent) if current.parent else None

    def branches(self, repo: RepoId) -> dict[str, str]:
        return self._refs(repo, "heads")

    def tags(self, repo: RepoId) -> dict[str, str]:
        return self._refs(repo, "tags")

    def _refs(self, repo: RepoId, kind: str) -> dict[str, str]:
        folder = self._repo_dir(repo) / "refs" / kind
        if not folder.is_dir():
            return {}
        return {
            ref.relative_to(folder).as_posix(): ref.read_text().strip()
            for ref in sorted(folder.rglob("*"))
            if ref.is_file()
        }

    def create_branch(self, repo: RepoId, branch: str, start: Commit) -> None:
        self._create_ref(repo, "heads", validate_ref_name(branch, "branch"), start)

    def delete_branch(self, repo: RepoId, branch: str) -> None:
        if branch == DEFAULT_BRANCH:
            raise BadRequest(f"The default branch '{DEFAULT_BRANCH}' cannot be deleted.")
        self._delete_ref(repo, "heads", branch)

    def create_tag(self, repo: RepoId, tag: str, target: Commit) -> None:
        self._create_ref(repo, "tags", validate_ref_name(tag, "tag"), target)

    def delete_tag(self, repo: RepoId, tag: str) -> None:
        self._delete_ref(repo, "tags", tag)

    def _create_ref(self, repo: RepoId, kind: str, name: str, target: Commit) -> None:
        """refs/<kind>/<name> -> target. `a` and `a/b` cannot both exist (a file cannot be a folder)."""
        with self._repo_lock(repo):
            self._require_repo(repo)
            ref = f"refs/{kind}/{name}"
            if self._read_ref_or_none(repo, kind, name) is not None:
                raise RefExists(f"Reference already exists: {ref}")
            # Branches resolve before tags: a branch named like a tag would redirect every download
            # pinned to that tag, and a tag named like a branch could never be reached.
            other_kind = "tags" if kind == "heads" else "heads"
            if self._read_ref_or_none(repo, other_kind, name) is not None:
                other = "tag" if other_kind == "tags" else "branch"
                raise RefExists(
                    f"Cannot create {ref}: a {other} named {name!r} exists, and a branch and a tag of one name would"
                    " make that revision ambiguous. Pick another name."
                )
            path = self._repo_dir(repo) / "refs" / kind / name
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                if path.is_dir():
                    raise IsADirectoryError(path)
                self._replace_file(path, target.id.encode())
            except (NotADirectoryError, FileExistsError, IsADirectoryError):
                raise RefExists(
                    f"Cannot create {ref}: it clashes with an existing name that is a prefix of it, or has it as"
                    " a prefix ('a' and 'a/b' cannot both exist). Pick another name."
                ) from None

    def _delete_ref(self, repo: RepoId, kind: str, name: str) -> None:
        with self._repo_lock(repo):
            self._require_repo(repo)
            if self._read_ref_or_none(repo, kind, name) is None:
                raise RevisionNotFound(f"Invalid rev id: {name}")
            top = self._repo_dir(repo) / "refs" / kind
            path = top / name
            path.unlink()
            _fsync_dir(path.parent)
            for parent in path.parents:  # folders left empty by `a/b` go too, so `a` can be made again
                if parent == top or not parent.is_relative_to(top):
                    break
                try:
                    parent.rmdir()
                except OSError:
                    break

    def blob_path(self, repo: RepoId, entry: FileEntry) -> Path:
        return self._repo_dir(repo) / "blobs" / entry.sha256

    # -- LFS objects and quota

    def lfs_object(self, repo: RepoId, sha256: str) -> FileEntry | None:
        """The stored object with this sha256 in `repo`, or None; its git oid is recorded at upload."""
        if not re.fullmatch(r"[0-9a-f]{64}", sha256):
            return None
        blob = self._repo_dir(repo) / "blobs" / sha256
        try:
            size = blob.stat().st_size
        except FileNotFoundError:
            return None
        record = self._repo_dir(repo) / "lfs" / f"{sha256}.json"
        try:
            return FileEntry.from_json(json.loads(record.read_bytes()))
        except FileNotFoundError:  # a blob that came inline: work its oid out once and remember it
            with open(blob, "rb") as stream:
                oid = git_blob_oid_of_stream(stream, size)
            entry = FileEntry(sha256=sha256, oid=oid, size=size)
            self._record_lfs_object(repo, entry)
            return entry

    def store_lfs_object(self, repo: RepoId, received: Path, entry: FileEntry) -> None:
        """Publish a verified upload as the blob `entry.sha256` of `repo` (the file at `received` moves)."""
        with self._repo_lock(repo):
            self._require_repo(repo)
            self.check_quota(repo.namespace, entry.size)
            blobs = self._repo_dir(repo) / "blobs"
            os.replace(received, blobs / entry.sha256)
            _fsync_dir(blobs)
            self._record_lfs_object(repo, entry)

    def _record_lfs_object(self, repo: RepoId, entry: FileEntry) -> None:
        folder = self._repo_dir(repo) / "lfs"
        folder.mkdir(exist_ok=True)
        self._replace_file(folder / f"{entry.sha256}.json", _to_json_bytes(entry.to_json()))

    def namespace_usage(self, namespace: str) -> int:
        """Bytes of every blob and commit record in every repo of `namespace` (shared blobs counted once per repo).

        Commit records count too: they hold the messages, and uncounted they let a tenant fill the disk
        past any quota with commits of long descriptions.
        """
        total = 0
        for folder in self._models.glob(f"{glob_escape(namespace)}/*/*"):
            if folder.name not in ("blobs", "commits"):
                continue
            with os.scandir(folder) as entries:
                total += sum(entry.stat().st_size for entry in entries if entry.is_file())
        return total

    def check_quota(self, namespace: str, extra_bytes: int) -> None:
        if self.namespace_quota_bytes is None or extra_bytes <= 0:
            return
        used = self.namespace_usage(namespace)
        if used + extra_bytes > self.namespace_quota_bytes:
            raise InsufficientStorage(
                f"Namespace '{namespace}' would pass its storage quota of {self.namespace_quota_bytes} bytes"
                f" ({used} used, {extra_bytes} more asked): delete repos or files there, or ask the operator"
                " for a larger --namespace-quota-bytes."
            )

    # -- commits

    def commit(
        self,
        repo: RepoId,
        branch: str,
        body_path: Path,
        *,
        author: str,
        max_inline_bytes: int = 512 * 1024 * 1024,
        big_body_bytes: int | None = None,
    ) -> Commit:
        """Apply the NDJSON commit in `body_path` on top of `branch` and move the branch to it.

        The body is decoded and staged before taking the repo lock (it may be large), at most
        `max_concurrent_commits` at once, and bodies over `big_body_bytes` one at a time;
        conflicts are checked under the lock. Publication
        order is blobs, commit record, branch ref, each written atomically, so a crash at any
        moment leaves the branch on a complete revision.
        """
        staging = self.temp_path(".staging")
        staging.mkdir()
        try:
            big = big_body_bytes is not None and body_path.stat().st_size > big_body_bytes
            with self._decoding_big if big else nullcontext(), self._decoding:
                request = parse_commit_body(
                    body_path, staging, max_inline_bytes=max_inline_bytes,
                    lfs_lookup=lambda sha256, size: self._uploaded_object(repo, sha256, size),
                )  # fmt: skip
            with self._repo_lock(repo):
                self._require_repo(repo)
                head = self._read_ref_or_none(repo, "heads", branch)
                if head is None:
                    raise RevisionNotFound(f"Invalid rev id: {branch}")
                if request.parent_commit is not None and not head.startswith(request.parent_commit):
                    raise ParentCommitMismatch(
                        f"A commit has happened since: parent commit {request.parent_commit} is not the head"
                        f" of '{branch}' ({head}). Fetch the new head and retry."
                    )
                files = apply_operations(self.read_commit(repo, head).files, request.operations)
                commit = Commit.new(
                    parent=head, summary=request.summary, description=request.description, author=author, files=files
                )
                record_bytes = _to_json_bytes(commit.to_json())
                self.check_quota(repo.namespace, self._new_blob_bytes(repo, request.operations) + len(record_bytes))
                self._publish_blobs(repo, request.operations)
                record = self._repo_dir(repo) / "commits" / f"{commit.id}.json"
                self._replace_file(record, record_bytes)
                self._replace_file(self._repo_dir(repo) / "refs" / "heads" / branch, commit.id.encode())
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if branch == DEFAULT_BRANCH:
            self._refresh_summary(repo)
        return commit

    def _uploaded_object(self, repo: RepoId, sha256: str, size: int | None) -> FileEntry:
        entry = self.lfs_object(repo, sha256)
        if entry is None:
            raise BadRequest(
                f"LFS object {sha256} was never uploaded to {repo}: upload it through"
                f" /{repo}.git/info/lfs/objects/batch first (huggingface_hub does this itself)."
            )
        if size is not None and size != entry.size:
            raise BadRequest(f"LFS object {sha256} has {entry.size} bytes, not {size}.")
        return entry

    def _new_blob_bytes(self, repo: RepoId, operations: list[Operation]) -> int:
        blobs = self._repo_dir(repo) / "blobs"
        fresh = {
            op.entry.sha256: op.entry.size
            for op in operations
            if isinstance(op, AddFile) and op.staged_blob is not None and not (blobs / op.entry.sha256).exists()
        }
        return sum(fresh.values())

    def _publish_blobs(self, repo: RepoId, operations: list[Operation]) -> None:
        blobs = self._repo_dir(repo) / "blobs"
        for operation in operations:
            if isinstance(operation, AddFile) and operation.staged_blob is not None:
                target = blobs / operation.entry.sha256
                if not target.exists():  # same name means same bytes: keep the one already published
                    os.replace(operation.staged_blob, target)
        _fsync_dir(blobs)

    # -- internals

    def _repo_dir(self, repo: RepoId) -> Path:
        return self._models / repo.namespace / repo.name

    def _require_repo(self, repo: RepoId) -> RepoMeta:
        meta = self.repo_meta(repo)
        if meta is None:
            raise RepoNotFound(f"Repository not found: {repo}")
        return meta

    def _read_ref_or_none(self, repo: RepoId, kind: str, name: str) -> str | None:
        """The commit id refs/<kind>/<name> holds; None for a missing ref or a name that could not be one."""
        if kind not in ("heads", "tags") or ref_name_problems(name) and name != DEFAULT_BRANCH:
            return None
        try:
            return (self._repo_dir(repo) / "refs" / kind / name).read_text().strip() or None
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None

    def _replace_file(self, path: Path, data: bytes) -> None:
        """Write `data` under tmp/, fsync it, then atomically replace `path` and fsync its folder."""
        temp = self.temp_path(".part")
        try:
            _write_file(temp, data)
            os.replace(temp, path)
        finally:
            temp.unlink(missing_ok=True)  # only there if something failed
        _fsync_dir(path.parent)

    @contextmanager
    def _repo_lock(self, repo: RepoId) -> Iterator[None]:
        lock_file = self._locks / repo.namespace / f"{repo.name}.lock"
        lock_file.parent.mkdir(parents=True, exist_ok=True)
        with open(lock_file, "a+b") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def git_blob_oid_of_stream(stream: Any, size: int, chunk_size: int = 1024 * 1024) -> str:
    """`git_blob_oid` of `size` bytes read from `stream` a chunk at a time (memory stays flat)."""
    digest = hashlib.sha1(b"blob %d\x00" % size)
    while chunk := stream.read(chunk_size):
        digest.update(chunk)
    return digest.hexdigest()


class BoundedCache(Generic[_K, _V]):
    """A thread-safe memo for values that never change once computed (immutable commits and what derives from them).

    It is emptied outright when it grows past `max_entries`, which bounds memory without any
    per-entry bookkeeping. `compute` runs outside the lock, so two threads missing the same key
    may both compute it; that is harmless because the value for a key is always the same.
    """

    def __init__(self, max_entries: int = 10_000) -> None:
        self._max_entries = max_entries
        self._entries: dict[_K, _V] = {}
        self._lock = threading.Lock()

    def get_or_compute(self, key: _K, compute: Callable[[], _V]) -> _V:
        with self._lock:
            if key in self._entries:
                return self._entries[key]
        value = compute()
        with self._lock:
            if len(self._entries) > self._max_entries:
                self._entries.clear()
            self._entries[key] = value
        return value

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


def _to_json_bytes(data: Any) -> bytes:
    return json.dumps(data, indent=1, sort_keys=True).encode()


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())


def _fsync_dir(folder: Path) -> None:
    """Make renames inside `folder` durable: without this a power cut can undo an `os.replace`."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
