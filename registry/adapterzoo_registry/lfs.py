"""Git LFS basic transfer, as the Hub speaks it to `huggingface_hub` (read `huggingface_hub/lfs.py`).

1. `preupload` answers `uploadMode: "lfs"` for a file over the threshold.
2. The client POSTs `/{repo}.git/info/lfs/objects/batch` with `{"operation": "upload",
   "objects": [{"oid": <sha256>, "size"}]}` (with its token). We answer, per object, either
   nothing to do (already stored) or an `upload` action (a URL to PUT the bytes to) and a
   `verify` action. The client sends no token with the PUT, so the upload URL carries its own
   authorization: an HMAC over repo, oid, size and expiry, signed with a key made at start-up.
3. The client PUTs the raw bytes. They are streamed to tmp/, hashed as they arrive, then checked
   (size and sha256 must match the oid) and moved into the repo's blobs; server memory stays flat
   whatever the size. At most `max_concurrent_uploads` are received at once; more wait their turn
   (their bytes stay in the socket, not in memory) for up to `queue_wait_s`, then get 503 with
   `Retry-After`, which the client retries. The namespace's quota is checked at batch time and
   again before the object is kept.
4. The client POSTs `verify`, then the commit names the object in an `lfsFile` line.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import re
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request

from .storage import BadRequest, FileEntry, PayloadTooLarge, RegistryError, RepoId, Store

DEFAULT_MAX_OBJECT_BYTES = 64 * 1024**3
DEFAULT_MAX_CONCURRENT_UPLOADS = 4
DEFAULT_QUEUE_WAIT_S = 120.0
UPLOAD_URL_LIFETIME_S = 3600
MAX_BATCH_OBJECTS = 1000
_WRITE_CHUNK_BYTES = 1024 * 1024
_SHA256 = re.compile(r"[0-9a-f]{64}")


class ObjectNotFound(RegistryError):
    status = 404
    error_code = "EntryNotFound"


class UploadsBusy(RegistryError):
    status = 503


class UploadGate:
    """Hands out signed upload URLs and receives the uploads, a bounded number at a time."""

    def __init__(
        self, max_object_bytes: int, max_concurrent_uploads: int, queue_wait_s: float = DEFAULT_QUEUE_WAIT_S
    ) -> None:
        self.max_object_bytes = max_object_bytes
        self.max_concurrent_uploads = max(1, max_concurrent_uploads)
        self.queue_wait_s = queue_wait_s
        self._slots: asyncio.Semaphore | None = None  # made on first use, inside the server's event loop
        self._key = secrets.token_bytes(32)

    # -- batch

    def batch(self, store: Store, repo: RepoId, payload: dict[str, Any], base_url: str) -> dict[str, Any]:
        """The reply to a batch request, as `lfs.post_lfs_batch_info` reads it."""
        if payload.get("operation") != "upload":
            raise BadRequest("Only the LFS 'upload' operation is supported; downloads go through /resolve.")
        transfers = payload.get("transfers", ["basic"])
        if not isinstance(transfers, list) or "basic" not in transfers:
            raise BadRequest("Only the LFS 'basic' transfer is supported.")
        if payload.get("hash_algo", "sha256") != "sha256":
            raise BadRequest("Only sha256 object ids are supported.")
        objects = payload.get("objects")
        if not isinstance(objects, list) or not 0 < len(objects) <= MAX_BATCH_OBJECTS:
            raise BadRequest(f"Expected 'objects': a list of 1 to {MAX_BATCH_OBJECTS} {{'oid', 'size'}}.")
        wanted = [self._object(item) for item in objects]
        missing = {oid: size for oid, size in wanted if store.lfs_object(repo, oid) is None}
        store.check_quota(repo.namespace, sum(missing.values()))
        answers = []
        for oid, size in wanted:
            answer: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if size > self.max_object_bytes:
                answer["error"] = {"code": 413, "message": f"Objects are limited to {self.max_object_bytes} bytes."}
            elif oid in missing:
                repo_url = f"{base_url}/{repo}.git/info/lfs/objects"
                upload_url = self._signed_url(repo_url, repo, oid, size)
                answer["actions"] = {
                    "upload": {"href": upload_url, "expires_in": UPLOAD_URL_LIFETIME_S},
                    "verify": {"href": f"{repo_url}/verify"},
                }
            answers.append(answer)
        return {"transfer": "basic", "objects": answers, "hash_algo": "sha256"}

    @staticmethod
    def _object(item: Any) -> tuple[str, int]:
        oid = item.get("oid") if isinstance(item, dict) else None
        size = item.get("size") if isinstance(item, dict) else None
        if not isinstance(oid, str) or not _SHA256.fullmatch(oid.lower()):
            raise BadRequest("Each LFS object needs 'oid': the 64-hex sha256 of its content.")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise BadRequest(f"LFS object {oid}: 'size' must be a non-negative integer.")
        return oid.lower(), size

    def _signed_url(self, repo_url: str, repo: RepoId, oid: str, size: int) -> str:
        expires = int(time.time()) + UPLOAD_URL_LIFETIME_S
        query = urlencode({"size": size, "expires": expires, "signature": self._signature(repo, oid, size, expires)})
        return f"{repo_url}/{oid}?{query}"

    def _signature(self, repo: RepoId, oid: str, size: int, expires: int) -> str:
        return hmac.new(self._key, f"{repo}\n{oid}\n{size}\n{expires}".encode(), hashlib.sha256).hexdigest()

    # -- upload

    async def receive(self, request: Request, store: Store, repo: RepoId, oid: str) -> None:
        """Check the signed URL, then stream the body to disk, hashing it; keep it only if it matches."""
        size = self._authorized_size(request, repo, oid)
        declared = request.headers.get("content-length")
        if declared is not None and declared.strip() != str(size):
            raise BadRequest(f"This upload URL is for exactly {size} bytes; the request says {declared}.")
        target = store.temp_path(".lfs")
        async with self.slot():
            try:
                entry = await self._stream_to(request, target, oid, size)
                await run_in_threadpool(store.store_lfs_object, repo, target, entry)
            finally:
                target.unlink(missing_ok=True)  # still there only if something failed

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """One of the `max_concurrent_uploads` places for receiving a big body to disk.

        LFS objects and big inline commit bodies share them, so however many uploads one tenant
        opens, tmp/ holds at most that many. A caller waits up to `queue_wait_s` (its bytes stay in
        the socket), then gets 503 with `Retry-After`, which huggingface_hub retries.
        """
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_concurrent_uploads)
        try:
            await asyncio.wait_for(self._slots.acquire(), timeout=self.queue_wait_s)
        except (TimeoutError, asyncio.TimeoutError):
            raise UploadsBusy(
                f"{self.max_concurrent_uploads} uploads are being received already; retry shortly.",
                headers={"Retry-After": "2"},
            ) from None
        try:
            yield
        finally:
            self._slots.release()

    def _authorized_size(self, request: Request, repo: RepoId, oid: str) -> int:
        params = request.query_params
        try:
            size, expires = int(params.get("size", "")), int(params.get("expires", ""))
        except ValueError:
            raise BadRequest("This is not an upload URL handed out by the LFS batch endpoint.") from None
        expected = self._signature(repo, oid, size, expires)
        if not hmac.compare_digest(expected, params.get("signature", "")):
            raise BadRequest("This upload URL was not handed out by this server (or was changed): ask batch again.")
        if expires < time.time():
            raise BadRequest("This upload URL has expired: ask the LFS batch endpoint for a new one.")
        return size

    async def _stream_to(self, request: Request, target: Path, oid: str, size: int) -> FileEntry:
        sha256 = hashlib.sha256()
        git_oid = hashlib.sha1(b"blob %d\x00" % size)
        received = 0
        pending: list[bytes] = []
        pending_bytes = 0

        def write(out: Any, chunks: list[bytes]) -> None:  # hashing and disk writes off the event loop
            for chunk in chunks:
                sha256.update(chunk)
                git_oid.update(chunk)
                out.write(chunk)

        try:
            with open(target, "wb") as out:
                async for chunk in request.stream():
                    received += len(chunk)
                    if received > size:
                        raise PayloadTooLarge(f"The upload is longer than the {size} bytes announced.")
                    pending.append(chunk)
                    pending_bytes += len(chunk)
                    if pending_bytes >= _WRITE_CHUNK_BYTES:
                        await run_in_threadpool(write, out, pending)
                        pending, pending_bytes = [], 0
                await run_in_threadpool(write, out, pending)
                out.flush()
                await run_in_threadpool(os.fsync, out.fileno())
        except ClientDisconnect:
            raise BadRequest("The upload was cut off; nothing was kept. Retry it.") from None
        if received != size:
            raise BadRequest(f"The upload has {received} bytes, not the {size} announced; nothing was kept.")
        if sha256.hexdigest() != oid:
            raise BadRequest(f"The uploaded bytes do not have sha256 {oid}; nothing was kept.")
        return FileEntry(sha256=oid, oid=git_oid.hexdigest(), size=size)
