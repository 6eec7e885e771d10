"""Push adapters to, and pull them from, the Hugging Face Hub or any registry speaking its API.

Everything goes through `huggingface_hub` (no HTTP of our own), with its progress bars, cache,
retries and `.incomplete` downloads: a download cut off halfway leaves a partial blob the next
download resumes or replaces, never a half-written adapter in a snapshot folder.

- The endpoint is the `endpoint` argument, else `$HF_ENDPOINT` (read at call time), else
  huggingface_hub's default (https://huggingface.co).
- The token is the `token` argument, else what huggingface_hub finds (`$HF_TOKEN`, `hf auth login`).
- Downloads go to the Hugging Face cache (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, read at call time).

A pushed adapter carries a model card (README.md): YAML front matter with `library_name:
adapterzoo`, the tags `adapterzoo`, `adapterzoo-type:<type>` and `base-fingerprint:<id>` (which
`HfApi.list_models(filter=...)` finds), and an `adapterzoo:` block with the type, base fingerprint,
config and metrics; then the same in prose for people. Pulling an adapter made for another base
fails on load with `BaseMismatchError`, as loading it from a folder does.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO
from urllib.parse import urlsplit

import yaml

from .errors import AdapterFileError, HubError
from .formats import ALL_FILES, detect_format, format_named
from .storage import atomic_dir

if TYPE_CHECKING:  # pragma: no cover
    from huggingface_hub import CommitInfo

README = "README.md"
FRONT_MATTER = re.compile(r"\A---\s*\n(.*?)\n---\s*(?:\n|\Z)", re.S)


def resolve_endpoint(endpoint: str | None = None) -> str | None:
    """The argument, else $HF_ENDPOINT, else None (huggingface_hub's default)."""
    value = endpoint or os.environ.get("HF_ENDPOINT") or None
    return value.rstrip("/") if value else None


def default_cache_dir() -> str | None:
    """$HF_HUB_CACHE, else $HF_HOME/hub, read now (huggingface_hub reads them once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return None


def _library() -> dict[str, str]:
    from . import __version__

    return {"library_name": "adapterzoo", "library_version": __version__}


def _where(endpoint: str | None) -> str:
    from huggingface_hub import constants

    return endpoint or constants.ENDPOINT


def hub_error(
    exc: BaseException, action: str, repo_id: str, endpoint: str | None, revision: str | None = None
) -> HubError:
    """A `HubError` saying what failed and what to do, from a huggingface_hub (or httpx) error."""
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = _where(endpoint)
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, RevisionNotFoundError):
        why = f"revision {revision!r} does not exist in {repo_id} at {where}; check the branch name or commit id"
    elif isinstance(exc, RepositoryNotFoundError):
        why = (
            f"repo {repo_id} was not found at {where}, or it is private and the token given cannot read it; "
            "check the id, and pass token=... (or set HF_TOKEN) with read access"
        )
    elif status == 401:
        why = f"{where} refused the token (401 Unauthorized); pass a valid token=... or set HF_TOKEN"
    elif status == 403:
        why = (
            f"the token given may not write to {repo_id} at {where} (403 Forbidden); use a token with write "
            "access to that namespace, or push to your own namespace"
        )
    elif isinstance(exc, HfHubHTTPError):
        why = f"{where} answered {status}: {exc}"
    elif isinstance(exc, LocalEntryNotFoundError):
        why = (
            f"{repo_id} could not be downloaded from {where} and is not fully in the cache ({exc}); "
            "check the connection and try again"
        )
    else:
        why = f"{type(exc).__name__}: {exc}. Nothing broken was kept; try again"
    return HubError(f"could not {action} {repo_id}: {why}")


# ---------------------------------------------------------------------------------- download


def download_adapter(
    repo_id: str,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    endpoint: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """The folder of `repo_id` at `revision`, downloaded into the Hugging Face cache (with progress bars).

    Returns only once every file is complete: `snapshot_download` writes each file to an
    `.incomplete` blob and renames it when it is whole, so an interrupted download leaves nothing a
    later load could mistake for an adapter, and the next call resumes it.
    """
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    endpoint = resolve_endpoint(endpoint)
    # Ask first whether this token may read the repo. snapshot_download alone would answer a 404 or
    # 401 from the cache if an earlier download (perhaps with another tenant's token) put the adapter
    # there; a "no" from the server must stay a no. Only an unreachable server falls back to the cache.
    try:
        HfApi(endpoint=endpoint, token=token, **_library()).model_info(repo_id, revision=revision)
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
        raise hub_error(exc, "download", repo_id, endpoint, revision) from exc
    except HfHubHTTPError as exc:
        if getattr(getattr(exc, "response", None), "status_code", None) in (401, 403):
            raise hub_error(exc, "download", repo_id, endpoint, revision) from exc
    except Exception:  # noqa: BLE001 - unreachable or offline: snapshot_download decides from the cache
        pass
    try:
        path = snapshot_download(
            repo_id, revision=revision, token=token, endpoint=endpoint,
            cache_dir=cache_dir or default_cache_dir(), **_library(),
        )  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - every failure becomes one error that says what to do
        raise hub_error(exc, "download", repo_id, endpoint, revision) from exc
    return Path(path)


def pull_adapter(
    repo_id: str,
    out_dir: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    endpoint: str | None = None,
) -> Path:
    """Download `repo_id` and copy its files to `out_dir` (a plain folder), checking them first.

    The copy is made in a temporary folder beside `out_dir` and renamed into place, so `out_dir`
    is either the whole adapter or untouched.
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise AdapterFileError(f"{out} exists and is not empty; pull into a new folder")
    source = download_adapter(repo_id, revision=revision, token=token, endpoint=endpoint)
    detect_format(source).card_facts(source)  # readable (native: its checksum) before anything lands in out_dir
    with atomic_dir(out, replace=False) as tmp:  # an empty out_dir gives way; one filled meanwhile is kept
        for path in sorted(source.rglob("*")):
            if path.is_file():
                target = tmp / path.relative_to(source)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)  # follows the cache's symlinks
    return out


# ---------------------------------------------------------------------------------- model card


def card_record(folder: Path) -> dict[str, Any]:
    """What the model card says about the adapter saved in `folder` (any format): format, type,
    config, base fingerprint and metrics, from the format's `card_facts`."""
    return detect_format(folder).card_facts(folder)


def render_model_card(repo_id: str, record: dict[str, Any]) -> str:
    """README.md for a pushed adapter: YAML front matter (tags, adapterzoo block), then prose."""
    tags = ["adapterzoo", f"adapterzoo-type:{record['type']}"]
    if record.get("base_fingerprint"):
        tags.append(f"base-fingerprint:{record['base_fingerprint']}")
    tags += format_named(record.get("format", "native")).CARD_TAGS
    front = {
        "library_name": "adapterzoo",
        "tags": tags,
        "adapterzoo": {
            "type": record["type"],
            "format": record.get("format", "native"),
            "base_fingerprint": record.get("base_fingerprint"),
            "config": record["config"],
            "metrics": record.get("metrics") or {},
        },
    }
    name = repo_id.split("/")[-1]
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip(),
        "---",
        "",
        f"# {name}",
        "",
        f"An **{record['type']}** adapter for [adapterzoo](https://pypi.org/project/adapterzoo/) "
        f"({record.get('format', 'native')} format).",
        "",
        "| | |",
        "| --- | --- |",
        f"| type | `{record['type']}` |",
        f"| base fingerprint | `{record.get('base_fingerprint') or 'unknown'}` |",
        "",
        "## Config",
        "",
        "```json",
        json.dumps(record["config"], indent=2, sort_keys=True, default=str),
        "```",
        "",
    ]
    metrics = record.get("metrics") or {}
    if metrics:
        lines += ["## Metrics", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {key} | {value} |" for key, value in metrics.items()] + [""]
    lines += [
        "## Use",
        "",
        "```python",
        "from adapterzoo import Zoo",
        "",
        "zoo = Zoo.from_pretrained(...)  # the base this adapter was made for (see its fingerprint)",
        f'zoo.load_adapter("{name}", "{repo_id}")',
        "```",
        "",
    ]
    return "\n".join(lines)


def parse_model_card(text: str) -> dict[str, Any]:
    """The front matter of a README.md (as a dict), with the `adapterzoo:` block flattened in."""
    match = FRONT_MATTER.match(text)
    if not match:
        return {}
    try:
        meta = yaml.safe_load(match.group(1)) or {}
    except yaml.YAMLError:
        return {}
    if not isinstance(meta, dict):
        return {}
    block = meta.get("adapterzoo") if isinstance(meta.get("adapterzoo"), dict) else {}
    return {**meta, **block}


# ---------------------------------------------------------------------------------- upload


# Sent by `push` to say "I upload big files with basic Git LFS": adapterzoo-registry then answers
# "lfs" in preupload for files over its threshold (and "regular", inline, to clients that don't say so).
LFS_TRANSFER_HEADERS = {"X-Adapterzoo-Transfer": "lfs"}


def _is_hugging_face(endpoint: str | None) -> bool:
    host = (urlsplit(_where(endpoint)).hostname or "").lower()
    return host == "huggingface.co" or host.endswith(".huggingface.co")


def _upload_source(path: Path, files: ExitStack, *, speaks_xet: bool) -> str | BinaryIO:
    """What a CommitOperationAdd uploads from: the path for the Hub, an open binary file elsewhere.

    With `hf_xet` installed, huggingface_hub sends every "lfs" file of a commit through Xet, which
    only huggingface.co speaks, unless one of them is a binary file object: then it falls back to
    HTTP (basic LFS) for that call alone ("Uploading files as a binary IO buffer is not supported by
    Xet Storage. Falling back to HTTP upload."). No global switch is touched, so pushes in other
    threads are unaffected. The client reads such a file in chunks (sha256 by 1 MiB, the PUT
    streamed by httpx), never whole; `files` closes it after the commit.
    """
    if speaks_xet:
        return str(path)
    return files.enter_context(open(path, "rb"))


def adapter_files(folder: Path) -> list[Path]:
    """The adapter's own files in `folder` (by its format), never anything else that lies there.

    A push must not publish what happens to sit beside the adapter (notes, a `.env`, a
    checkpoint), so it sends only these. A file that is a symlink leading out of the folder is
    refused with `AdapterFileError`: following it would upload whatever it points at.
    """
    if not folder.is_dir():
        raise AdapterFileError(f"{folder} is not a folder holding a saved adapter")
    root = folder.resolve()
    present = [folder / name for name in sorted(ALL_FILES) if os.path.lexists(folder / name)]
    for path in present:  # all of them before any is read, even to tell the format
        target = path.resolve()
        if not target.is_relative_to(root):
            raise AdapterFileError(
                f"{path} is a symlink to {target}, outside the adapter folder; push refuses to follow it. "
                "Copy the file into the folder if it belongs to the adapter."
            )
        if not target.is_file():
            raise AdapterFileError(f"{path} is not a regular file")
    names = detect_format(folder).FILES  # the files of its format; a push sends these and the README
    files = [path for path in present if path.name in names]
    if not files:
        raise AdapterFileError(f"{folder} holds no adapter files ({', '.join(sorted(ALL_FILES))})")
    return files


def push_adapter_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | bool | None = None,
    endpoint: str | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
) -> CommitInfo:
    """Push a saved adapter folder (any format) to `repo_id`, with a model card, in one commit.

    The repo is created if needed (`private` applies then; an existing repo keeps its visibility),
    and so is the branch `revision`. Adapter files of another format left from an earlier push
    are deleted in the same commit. The base is not needed: the fingerprint is in the saved files.
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    folder = Path(folder)
    files = adapter_files(folder)  # before reading anything: a link out of the folder is refused first
    record = card_record(folder)  # also checks that the folder holds a readable adapter
    endpoint = resolve_endpoint(endpoint)
    speaks_xet = _is_hugging_face(endpoint)
    api = HfApi(endpoint=endpoint, token=token, headers=None if speaks_xet else LFS_TRANSFER_HEADERS, **_library())
    branch = revision or "main"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if branch != "main":
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        present = set(api.list_repo_files(repo_id, revision=branch))
        sending = {p.relative_to(folder).as_posix() for p in files}
        operations: list = [CommitOperationDelete(path_in_repo=p) for p in sorted(present & ALL_FILES - sending)]
        card = render_model_card(repo_id, record).encode()
        with ExitStack() as opened:
            operations += [
                CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(),
                                   path_or_fileobj=_upload_source(p, opened, speaks_xet=speaks_xet))
                for p in files
            ]  # fmt: skip
            operations.append(CommitOperationAdd(path_in_repo=README, path_or_fileobj=card))
            return api.create_commit(
                repo_id, operations, revision=branch,
                commit_message=commit_message or f"Push {record['type']} adapter with adapterzoo",
            )  # fmt: skip
    except Exception as exc:  # noqa: BLE001
        raise hub_error(exc, "push to", repo_id, endpoint, branch) from exc
