"""Tiers: where each adapter is, and bringing it up the tiers without pausing decoding.

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
slot pools evict by LRU (device -> host), and past `max_host` adapters in memory `Tiers` drops
the least recently used idle ones from the zoo (host -> disk; saved first if they were never on
disk). An adapter in use by a queued or running request never leaves host memory.

`Tiers` is the engine's `Resolver` (serve/resolver.py); which adapters exist, who owns them and
who may see them is its `Catalog` (serve/catalog.py). It asks the zoo only through the zoo's
residency API (`where`, `find_adapter`, `adapter_names`, `slots_in_use`, `exclusive`).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..adapter import check_name
from ..errors import AdapterExistsError, AdapterZooError, HubError, InvalidNameError, UnknownAdapterError
from .catalog import REPO_ID, Catalog, Entry, is_adapter_folder
from .engine import NullMetrics
from .tenants import Tenants

if TYPE_CHECKING:  # pragma: no cover
    from ..zoo import Zoo
    from .engine import Engine

log = logging.getLogger("adapterzoo.serve")


def _unknown(name: str) -> UnknownAdapterError:
    return UnknownAdapterError(f"The model {name!r} does not exist or you do not have access to it.")


class Tiers:
    """Tiers device -> host -> disk -> registry, background loading, and per-tenant limits."""

    def __init__(
        self,
        zoo: Zoo,
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
        self.zoo = zoo
        self.registry_endpoint = registry_endpoint
        self.registry_token = registry_token
        self.max_host = max_host
        self.metrics = metrics or NullMetrics()
        # the engine's `call_between_steps` once one uses these tiers (`attach`): the zoo changes
        # only between two of its forwards; without one, under `zoo.exclusive()`
        self._between: Callable[[Callable[[], Any]], Future] | None = None
        self._refs: collections.Counter[str] = collections.Counter()
        self._loading: dict[str, Future] = {}
        self._host_lru: collections.OrderedDict[str, None] = collections.OrderedDict.fromkeys(zoo.adapter_names())
        self.catalog = Catalog(
            adapters_dir=adapters_dir,
            spill_dir=spill_dir,
            registry_namespace=registry_namespace,
            registry_repos=registry_repos,
            tenants=tenants,
            names=zoo.adapter_names(),
            held=self._held,
        )
        self.adapters_dir, self.spill_dir = self.catalog.adapters_dir, self.catalog.spill_dir
        self.registry_namespace, self.tenants = registry_namespace, self.catalog.tenants
        # one lock for the catalog, refs and LRU (the catalog's): never held over file I/O
        self._lock = self.catalog.lock
        self._spill_lock = threading.Lock()  # one spill save at a time (two drops of one adapter)
        self._pool = ThreadPoolExecutor(max_workers=loaders, thread_name_prefix="adapterzoo-loader")
        self._evict_overflow()
        if hasattr(self.metrics, "track_residency"):
            self.metrics.track_residency(self.residency)

    def attach(self, engine: Engine) -> None:
        """What the engine calls: from then on, adding and removing adapters run between its steps."""
        self._between = engine.call_between_steps

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    # ------------------------------------------------------------------ the catalog's answers

    def rescan(self) -> list[str]:
        return self.catalog.rescan()

    def owner(self, name: str) -> str | None:
        return self.catalog.owner(name)

    def visible(self, name: str, tenant: str | None) -> bool:
        return self.catalog.visible(name, tenant)

    def models(self, tenant: str | None) -> list[Entry]:
        return self.catalog.models(tenant)

    def _held(self, name: str) -> bool:
        """In host memory, in use or loading: its entry stays even if its folder vanished."""
        with self._lock:
            return self.zoo.find_adapter(name) is not None or name in self._refs or name in self._loading

    # ------------------------------------------------------------------ where each adapter is

    def tier(self, name: str) -> str | None:
        """ "device", "host", "disk" or "registry" (None: not served)."""
        where = self.zoo.where(name)
        if where is not None:
            return where
        entry = self.catalog.get(name)
        return entry.tier if entry is not None else None

    def residency(self) -> dict[str, int]:
        """How many adapters each tier holds (a disk adapter also in memory counts as host)."""
        with self._lock:
            device = self.zoo.slots_in_use()
            host = len(self.zoo.adapter_names())
            disk = sum(1 for n, e in self.catalog.items() if e.path is not None and self.zoo.find_adapter(n) is None)
        return {"device": device, "host": host, "disk": disk}

    # ------------------------------------------------------------------ the Resolver protocol

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
                self.metrics.lookup(name, self.zoo.where(name))
                done: Future = Future()
                done.set_result(None)
                return done
            entry = self.catalog.entry(name)
            if entry is None:
                failed: Future = Future()
                failed.set_exception(_unknown(name))
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
                if not is_adapter_folder(target):
                    hub.pull_adapter(
                        entry.repo,
                        target,
                        revision=entry.revision,
                        token=self.registry_token,
                        endpoint=self.registry_endpoint,
                    )
                return target
            return hub.download_adapter(
                entry.repo, revision=entry.revision, token=self.registry_token, endpoint=self.registry_endpoint
            )
        except HubError as exc:
            from huggingface_hub.errors import RepositoryNotFoundError

            if isinstance(exc.__cause__, RepositoryNotFoundError):
                with self._lock:
                    if (
                        self.catalog.get(entry.name) is entry
                        and entry.repo == f"{self.registry_namespace}/{entry.name}"
                    ):
                        del self.catalog[entry.name]
                raise _unknown(entry.name) from exc
            raise

    def _between_steps(self, fn):
        if self._between is not None:
            return self._between(fn).result()
        with self.zoo.exclusive():
            return fn()

    def _evict_overflow(self, room: int = 0) -> None:
        """Host -> disk for the least recently used idle adapters beyond `max_host` (- `room`)."""
        if self.max_host is None:
            return
        with self._lock:
            excess = len(self.zoo.adapter_names()) + room - self.max_host
            idle = [
                n
                for n in self._host_lru
                if self.zoo.find_adapter(n) is not None and n not in self._refs and n not in self._loading
            ]
            victims = idle[: max(0, excess)]
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
            if entry.path is not None and is_adapter_folder(entry.path):
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

    def add(
        self,
        name: str,
        source: str | Path | None = None,
        *,
        owner: str | None = None,
        public: bool = False,
        revision: str | None = None,
        load: bool = True,
        timeout: float | None = 120,
    ) -> Entry:
        """Make `name` servable: from a folder or a registry repo id (or already in the zoo). An
        explicit add lifts an earlier delete's tombstone."""
        check_name(name)
        with self._lock:
            self.catalog.unbury(name)
            old = self.catalog.get(name)
            if old is not None and old.pending != "delete" and (source is None or str(source) == old.source):
                old.owner, old.public = owner or old.owner, public or old.public
                entry = old
            else:
                if self.zoo.find_adapter(name) is not None or name in self._refs:
                    raise AdapterExistsError(f"an adapter named {name!r} is already served; unload or delete it first")
                entry = Entry(name, owner=owner, public=public, revision=revision)
                if source is not None and Path(source).exists():
                    entry.path = Path(source)
                elif source is not None:
                    entry.repo = str(source)
                elif self.adapters_dir is not None and is_adapter_folder(self.adapters_dir / name):
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
        if self.catalog.entry(name) is None or name not in self.catalog:
            raise UnknownAdapterError(f"no adapter named {name!r} is served")
        return bool(self._drop(name, delete=False))

    def delete(self, name: str) -> bool:
        """Stop serving `name` for good (its files stay): a tombstone in the adapters folder keeps
        a rescan or a restart from finding its folder again; `add` lifts it. False: in use, done
        when released (it is refused to new requests at once)."""
        if self.catalog.entry(name) is None or name not in self.catalog:
            raise UnknownAdapterError(f"no adapter named {name!r} is served")
        self.catalog.bury(name)
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
        raise InvalidNameError(
            f"source {source!r} is not allowed: use {allowed}; start the server with --adapters "
            "or --registry to allow more"
        )

    def describe(self, name: str) -> dict[str, Any]:
        entry = self.catalog[name]
        return {
            "id": name,
            "tier": self.tier(name),
            "source": entry.source,
            "owner": self.owner(name),
            "public": entry.public or self.tenants.is_public(name),
            "in_use": self.in_use(name),
            "pending": entry.pending,
            "type": getattr(self.zoo.find_adapter(name), "type_name", None),
        }
