"""The router: where each adapter is, and bringing it up the tiers without pausing decoding.

Tiers, fastest first:

- device: a slot in one of the zoo's `SlotPool`s (what a forward reads);
- host: an `Adapter` record in the zoo (float32 tensors in memory);
- disk: a saved adapter folder (the `--adapters` directory, one sub-folder per adapter, or a spill
  folder for adapters that were only ever in memory);
- registry: a Hub-compatible registry (adapterzoo_registry, or the Hub itself), pulled with
  `adapterzoo.hub` into the adapters directory on a miss.

A request names an adapter; `prepare` finds it in the highest tier that has it. A host miss starts
a background load (a loader thread reads and checks the files, or pulls them from the registry);
the engine keeps decoding the running batch meanwhile, and the request joins once its adapter is
in host memory. The loaded record is added to the zoo between two forwards
(`Engine.call_between_steps`), and the copy into a device slot is made by the engine thread when
the request joins (`zoo.plan`, between two forwards). Least recently used adapters move down: the
slot pools evict by LRU (device -> host), and past `max_host` adapters in memory the router drops
the least recently used idle ones from the zoo (host -> disk; saved first if they were never on
disk). An adapter in use by a queued or running request never leaves host memory.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ..adapter import check_name
from ..errors import AdapterZooError, HubError, InvalidNameError, UnknownAdapterError
from ..formats import looks_like_adapter
from .engine import Resolver
from .tenants import Tenants

if TYPE_CHECKING:  # pragma: no cover
    from ..zoo import Zoo
    from .engine import Engine

log = logging.getLogger("adapterzoo.serve")


@dataclass
class Entry:
    """One adapter the server can serve, wherever it is now."""

    name: str
    path: Path | None = None  # a saved adapter folder (disk tier)
    repo: str | None = None  # registry repo id (registry tier)
    revision: str | None = None
    owner: str | None = None  # tenant name; None: decided by the keys file's patterns
    public: bool = False
    pending: str | None = None  # "unload" or "delete", waiting for the last request to finish

    @property
    def source(self) -> str:
        return str(self.path) if self.path is not None else (self.repo or "memory")

    @property
    def tier(self) -> str:
        """The tier it is stored in below host memory."""
        return "disk" if self.path is not None else "registry"


def _is_adapter_folder(path: Path) -> bool:
    return looks_like_adapter(path)


def _is_name(name: object) -> bool:
    """A plain adapter name (no '/', '\\' or '..'): checked before any lookup, so a name is never
    resolved as a path."""
    try:
        check_name(name)
    except InvalidNameError:
        return False
    return True


REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
TOMBSTONES = ".deleted.json"  # in the adapters folder: names deleted by an admin, never served again


class Router(Resolver):
    """Tiers device -> host -> disk -> registry, background loading, and per-tenant limits."""

    def __init__(
        self,
        zoo: "Zoo",
        *,
        adapters_dir: str | Path | None = None,
        registry_endpoint: str | None = None,
        registry_token: str | None = None,
        registry_namespace: str | None = None,
        registry_repos: dict[str, str] | None = None,
        max_host: int | None = None,
        spill_dir: str | Path | None = None,
        tenants: Tenants | None = None,
        metrics: Any = None,
        loaders: int = 2,
    ):
        super().__init__(zoo)
        self.adapters_dir = Path(adapters_dir) if adapters_dir else None
        self.registry_endpoint = registry_endpoint
        self.registry_token = registry_token
        self.registry_namespace = registry_namespace
        self.max_host = max_host
        self.spill_dir = Path(spill_dir) if spill_dir else (self.adapters_dir / ".spill" if self.adapters_dir else None)
        self.tenants = tenants or Tenants.open()
        from .engine import _NullMetrics

        self.metrics = metrics or _NullMetrics()
        self.engine: "Engine | None" = None
        self._lock = threading.RLock()  # the catalog, refs and LRU; never held over file I/O
        self._spill_lock = threading.Lock()  # one spill save at a time (two drops of one adapter)
        self.catalog: dict[str, Entry] = {}
        self._refs: collections.Counter[str] = collections.Counter()
        self._loading: dict[str, Future] = {}
        self._host_lru: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.tombstones: set[str] = self._read_tombstones()
        self._pool = ThreadPoolExecutor(max_workers=loaders, thread_name_prefix="adapterzoo-loader")
        for name in (zoo.adapter_names() if zoo is not None else ()):  # zoo None: a catalog only (Ray ingress)
            self.catalog[name] = Entry(name)
            self._host_lru[name] = None
        for name, repo in (registry_repos or {}).items():
            self.catalog[name] = Entry(name, repo=repo)
        self.rescan()
        self._evict_overflow()
        if hasattr(self.metrics, "track_residency"):
            self.metrics.track_residency(self.residency)

    def attach(self, engine: "Engine") -> None:
        self.engine = engine

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    # ------------------------------------------------------------------ catalog

    def rescan(self) -> list[str]:
        """Add the adapter folders under `adapters_dir` that the catalog does not know yet."""
        found: list[str] = []
        # the adapters folder, then the spill folder (adapters that were only ever in memory,
        # saved when they left it: still servable after a restart)
        folders = [d for d in (self.adapters_dir, self.spill_dir) if d is not None and d.is_dir()]
        with self._lock:
            for folder in folders:
                for path in sorted(folder.iterdir()):
                    name = path.name
                    hidden_or_gone = name.startswith(".") or name in self.tombstones
                    if hidden_or_gone or not _is_name(name) or not _is_adapter_folder(path):
                        continue
                    entry = self.catalog.get(name)
                    if entry is None:
                        self.catalog[name] = Entry(name, path=path)
                        found.append(name)
                    elif entry.path is None:
                        entry.path = path
        return found

    # -- tombstones: an admin delete sticks across rescans and restarts
    def _read_tombstones(self) -> set[str]:
        if self.adapters_dir is None or not (self.adapters_dir / TOMBSTONES).is_file():
            return set()
        try:
            names = json.loads((self.adapters_dir / TOMBSTONES).read_text())
            return {n for n in names if isinstance(n, str)}
        except (OSError, ValueError) as exc:
            log.warning("ignoring the unreadable tombstone file in the adapters folder: %s", exc)
            return set()

    def _write_tombstones(self) -> None:
        """Written to a temporary file, then renamed over the old one: never half-written."""
        if self.adapters_dir is None:
            return
        self.adapters_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.adapters_dir / f"{TOMBSTONES}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(sorted(self.tombstones)))
        os.replace(tmp, self.adapters_dir / TOMBSTONES)

    def _entry(self, name: str) -> Entry | None:
        if not _is_name(name):  # before any lookup: "acme-x/../globex-y" is never a path
            return None
        with self._lock:
            if name in self.tombstones:
                return None
            entry = self.catalog.get(name)
            if (entry is not None and entry.path is not None and not entry.repo and not entry.pending
                    and self.zoo is not None and self.zoo.find_adapter(name) is None and name not in self._refs
                    and name not in self._loading and not entry.path.exists()):
                del self.catalog[name]  # its folder was removed: no longer served (nor listed)
                entry = None
            if entry is None and self.adapters_dir is not None and _is_adapter_folder(self.adapters_dir / name):
                entry = self.catalog[name] = Entry(name, path=self.adapters_dir / name)
            if entry is None and self.registry_namespace:
                try:
                    check_name(name)
                except InvalidNameError:
                    return None
                entry = Entry(name, repo=f"{self.registry_namespace}/{name}")  # known once it loads
            return entry

    def owner(self, name: str) -> str | None:
        """The tenant that owns `name`: as added (`add(owner=...)`), else by the keys file's patterns."""
        entry = self.catalog.get(name)
        return (entry.owner if entry is not None else None) or self.tenants.owner_of(name)

    def visible(self, name: str, tenant: str | None) -> bool:
        entry = self._entry(name)
        if entry is None or entry.pending == "delete":
            return False
        t = self.tenants.get(tenant) if tenant is not None else self.tenants.authenticate(None)
        return self.tenants.can_use(t, name, owner=entry.owner, public=entry.public)

    def models(self, tenant: str | None) -> list[Entry]:
        """The adapters `tenant` may list and use."""
        self.rescan()
        with self._lock:
            names = sorted(self.catalog)
        return [self.catalog[n] for n in names if self.visible(n, tenant)]

    def on_device(self, name: str) -> bool:
        return self.zoo is not None and super().on_device(name)

    def tier(self, name: str) -> str | None:
        if self.zoo is None:
            return None
        if self.on_device(name):
            return "device"
        if self.zoo.find_adapter(name) is not None:
            return "host"
        entry = self.catalog.get(name)
        return entry.tier if entry is not None else None

    def residency(self) -> dict[str, int]:
        if self.zoo is None:
            return {}
        with self._lock:
            device = sum(len(p.lru) for p in self.zoo.pools.values())
            host = len(self.zoo.adapter_names())
            disk = sum(1 for n, e in self.catalog.items() if e.path is not None and self.zoo.find_adapter(n) is None)
        return {"device": device, "host": host, "disk": disk}

    # ------------------------------------------------------------------ the Resolver protocol

    def check(self, name: str, tenant: str | None = None) -> None:
        if not self.visible(name, tenant):
            raise UnknownAdapterError(f"The model {name!r} does not exist or you do not have access to it.")

    def acquire(self, name: str) -> None:
        with self._lock:
            self._refs[name] += 1

    def release(self, name: str) -> None:
        with self._lock:
            self._refs[name] -= 1
            if self._refs[name] <= 0:
                del self._refs[name]
            if name in self._host_lru:
                self._host_lru.move_to_end(name)
            entry = self.catalog.get(name)
            pending = entry.pending if entry is not None and name not in self._refs else None
        if pending:
            self._pool.submit(self._drop, name, pending == "delete")
        elif self.max_host is not None and len(self.zoo.adapter_names()) > self.max_host:
            self._pool.submit(self._evict_overflow)  # adapters held over the limit by requests

    def in_use(self, name: str) -> int:
        with self._lock:
            return self._refs.get(name, 0)

    def resident_limit(self, tenant: str | None) -> int | None:
        return self.tenants.resident_limit(tenant)

    def placed(self, names: Sequence[str], seconds: float) -> None:
        for _ in names:
            self.metrics.swap("host", seconds / len(names))

    def prepare(self, name: str, tenant: str | None = None) -> Future:
        with self._lock:
            if self.zoo.find_adapter(name) is not None:
                self._host_lru[name] = None
                self._host_lru.move_to_end(name)
                self.metrics.lookup(name, "device" if self.on_device(name) else "host")
                done: Future = Future()
                done.set_result(None)
                return done
            entry = self._entry(name)
            if entry is None:
                failed: Future = Future()
                failed.set_exception(UnknownAdapterError(f"The model {name!r} does not exist or you do not have access to it."))
                return failed
            self.metrics.lookup(name, entry.tier)
            future = self._loading.get(name)
            if future is None:
                future = self._loading[name] = Future()
                self._pool.submit(self._load, entry, future)
            return future

    # ------------------------------------------------------------------ loading and eviction

    def load(self, name: str, timeout: float | None = None) -> None:
        """Bring `name` into host memory now (blocking)."""
        self.prepare(name).result(timeout)

    def _load(self, entry: Entry, future: Future) -> None:
        name = entry.name
        t0 = time.perf_counter()
        tier = entry.tier
        try:
            if entry.path is None:
                entry.path = self._pull(entry)
            adapter = self.zoo.read_adapter(name, entry.path)
            self._evict_overflow(room=1)  # make room first: host memory stays within max_host
            self._between_steps(lambda: self.zoo.find_adapter(name) or self.zoo.add_loaded_adapter(adapter))
            with self._lock:
                self.catalog.setdefault(name, entry)
                self._host_lru[name] = None
            self.metrics.swap(tier, time.perf_counter() - t0)
            future.set_result(None)
        except BaseException as exc:  # noqa: BLE001 - the request that asked gets it
            log.warning("loading adapter %r from %s failed: %s", name, entry.source, exc)
            self.metrics.load_failed(name)
            future.set_exception(exc)
        finally:
            with self._lock:
                self._loading.pop(name, None)

    def _pull(self, entry: Entry) -> Path:
        """Registry -> disk: into the adapters folder when there is one, else the HF cache."""
        from .. import hub

        try:
            if self.adapters_dir is not None:
                target = self.adapters_dir / entry.name
                if not _is_adapter_folder(target):
                    hub.pull_adapter(entry.repo, target, revision=entry.revision, token=self.registry_token,
                                     endpoint=self.registry_endpoint)
                return target
            return hub.download_adapter(entry.repo, revision=entry.revision, token=self.registry_token,
                                        endpoint=self.registry_endpoint)
        except HubError as exc:
            from huggingface_hub.errors import RepositoryNotFoundError

            if isinstance(exc.__cause__, RepositoryNotFoundError):
                with self._lock:
                    if self.catalog.get(entry.name) is entry and entry.repo == f"{self.registry_namespace}/{entry.name}":
                        del self.catalog[entry.name]
                raise UnknownAdapterError(
                    f"The model {entry.name!r} does not exist or you do not have access to it.") from exc
            raise

    def _between_steps(self, fn):
        if self.engine is not None:
            return self.engine.call_between_steps(fn).result()
        with self.zoo._lock:
            return fn()

    def _evict_overflow(self, room: int = 0) -> None:
        """Host -> disk for the least recently used idle adapters beyond `max_host` (- `room`)."""
        if self.max_host is None or self.zoo is None:
            return
        with self._lock:
            excess = len(self.zoo.adapter_names()) + room - self.max_host
            idle = [n for n in self._host_lru
                    if self.zoo.find_adapter(n) is not None and n not in self._refs and n not in self._loading]
            victims = idle[:max(0, excess)]
        for name in victims:
            try:
                if self._drop(name, delete=False) == "removed":  # another thread may have evicted it first
                    self.metrics.evicted()
            except AdapterZooError as exc:  # pragma: no cover - logged, the adapter just stays
                log.warning("could not move adapter %r to disk: %s", name, exc)

    def _ensure_on_disk(self, name: str, entry: Entry) -> None:
        """Save `name` to the spill folder unless `entry` already has an adapter folder. Called
        without `_lock` held: a save writes and fsyncs files, and the engine thread takes `_lock`
        whenever a request ends (`release`), so holding it here would stall decoding."""
        with self._spill_lock:  # a second drop of the same adapter waits, then finds it saved
            if entry.path is not None and _is_adapter_folder(entry.path):
                return
            if self.spill_dir is None:
                raise AdapterZooError(f"adapter {name!r} exists only in memory and the server has no spill folder")
            target = self.spill_dir / name
            self.zoo.save_adapter(name, target)
            with self._lock:
                entry.path = target

    def _drop(self, name: str, delete: bool) -> bool | str:
        """Remove `name` from host memory (and device slots), if no request uses it; with
        `delete`, also from the catalog. Returns False when it is in use (left pending), else
        "removed" if this call took it out of host memory, True if it was not there.

        Decided under `_lock`; the save to disk (unloading an adapter that has no folder) runs
        outside it; the removal re-checks under `_lock` that no request took the adapter and that
        the catalog entry is still the one decided on."""
        with self._lock:
            entry = self.catalog.get(name)
            if name in self._refs:
                if entry is not None:
                    entry.pending = "delete" if delete or entry.pending == "delete" else "unload"
                return False
            save = not delete and self.zoo.find_adapter(name) is not None
            if save:
                entry = self.catalog.setdefault(name, Entry(name))
        if save:
            self._ensure_on_disk(name, entry)

        def remove() -> bool:
            with self._lock:
                if name in self._refs:  # a request took it meanwhile: keep it
                    return False
                if entry is not None and self.catalog.get(name) is not entry:
                    return False  # deleted (and maybe added again) meanwhile: not the adapter decided on
                removed = self.zoo.find_adapter(name) is not None
                if removed:
                    self.zoo.remove_adapter(name)
                self._host_lru.pop(name, None)
                e = self.catalog.get(name)
                if e is not None:
                    e.pending = None
                    if delete:
                        del self.catalog[name]
                return removed

        return "removed" if self._between_steps(remove) else True

    # ------------------------------------------------------------------ admin

    def add(self, name: str, source: str | Path | None = None, *, owner: str | None = None, public: bool = False,
            revision: str | None = None, load: bool = True, timeout: float | None = 120) -> Entry:
        """Make `name` servable: from a folder or a registry repo id (or already in the zoo). An
        explicit add lifts an earlier delete's tombstone."""
        check_name(name)
        with self._lock:
            if name in self.tombstones:
                self.tombstones.discard(name)
                self._write_tombstones()
            old = self.catalog.get(name)
            if old is not None and old.pending != "delete" and (source is None or str(source) == old.source):
                old.owner, old.public = owner or old.owner, public or old.public
                entry = old
            else:
                if self.zoo.find_adapter(name) is not None or name in self._refs:
                    from ..errors import AdapterExistsError

                    raise AdapterExistsError(f"an adapter named {name!r} is already served; unload or delete it first")
                entry = Entry(name, owner=owner, public=public, revision=revision)
                if source is not None and Path(source).exists():
                    entry.path = Path(source)
                elif source is not None:
                    entry.repo = str(source)
                elif self.adapters_dir is not None and _is_adapter_folder(self.adapters_dir / name):
                    entry.path = self.adapters_dir / name
                else:
                    raise UnknownAdapterError(f"no source given for {name!r} and it is not under the adapters folder")
                self.catalog[name] = entry
        if load:
            try:
                self.prepare(name).result(timeout)
            except BaseException:
                with self._lock:
                    if self.catalog.get(name) is entry and self.zoo.find_adapter(name) is None:
                        del self.catalog[name]
                raise
        return entry

    def unload(self, name: str) -> bool:
        """Host and device -> disk (it stays servable). False: in use, done when released."""
        if self._entry(name) is None or name not in self.catalog:
            raise UnknownAdapterError(f"no adapter named {name!r} is served")
        return bool(self._drop(name, delete=False))

    def delete(self, name: str) -> bool:
        """Stop serving `name` for good (its files stay): a tombstone in the adapters folder keeps
        a rescan or a restart from finding its folder again; `add` lifts it. False: in use, done
        when released (it is refused to new requests at once)."""
        if self._entry(name) is None or name not in self.catalog:
            raise UnknownAdapterError(f"no adapter named {name!r} is served")
        with self._lock:
            self.tombstones.add(name)
            self._write_tombstones()
        return bool(self._drop(name, delete=True))

    def admin_source(self, source: str) -> str | Path:
        """Where an admin may load an adapter from: a folder inside the adapters folder (absolute,
        or relative to it), or a repo id on the configured registry. Anything else (another server
        path, the public Hub when no registry is configured) is refused."""
        if self.adapters_dir is not None:
            root = self.adapters_dir.resolve()
            candidate = (root / source).resolve()  # an absolute source stays itself
            if candidate.is_relative_to(root) and candidate != root and candidate.is_dir():
                return candidate
        if self.registry_endpoint and REPO_ID.fullmatch(source) and ".." not in source:
            return source
        where = ["a folder inside the adapters folder"] if self.adapters_dir is not None else []
        if self.registry_endpoint:
            where.append("a repo id (namespace/name) on the configured registry")
        allowed = " or ".join(where) or "nothing (this server has no adapters folder and no registry)"
        raise InvalidNameError(f"source {source!r} is not allowed: use {allowed}; start the server with --adapters "
                               "or --registry to allow more")

    def describe(self, name: str) -> dict[str, Any]:
        entry = self.catalog[name]
        return {"id": name, "tier": self.tier(name), "source": entry.source, "owner": self.owner(name),
                "public": entry.public or self.tenants.is_public(name), "in_use": self.in_use(name),
                "pending": entry.pending, "type": getattr(self.zoo.find_adapter(name), "type_name", None)}
