"""The catalog: which adapters a server can serve, who owns each, and who may see it.

An `Entry` per adapter says where it is stored below host memory (a folder on disk, or a repo on a
registry), its owner and whether it is public. The catalog finds entries in the adapters folder
(and its spill folder), keeps the names an admin deleted (tombstones, so a rescan or a restart
does not serve them again), and answers the tenant questions: may this tenant use or list it.

This is all the Ray ingress needs: it holds no base and no adapters, so a `Catalog` alone. A
server with a zoo wraps one in `Tiers` (serve/tiers.py), which moves adapters between tiers.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from dataclasses import dataclass
from pathlib import Path

from ..adapter import check_name
from ..errors import InvalidNameError
from ..formats import looks_like_adapter
from .tenants import Tenants

log = logging.getLogger("adapterzoo.serve")

REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
TOMBSTONES = ".deleted.json"  # in the adapters folder: names deleted by an admin, never served again


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


def is_adapter_folder(path: Path) -> bool:
    """A saved adapter in any registered format (adapterzoo.formats)."""
    return looks_like_adapter(path)


def is_name(name: object) -> bool:
    """A plain adapter name (no '/', '\\' or '..'): checked before any lookup, so a name is never
    resolved as a path."""
    try:
        check_name(name)
    except InvalidNameError:
        return False
    return True


class Catalog(MutableMapping[str, Entry]):
    """Name -> `Entry`, with the adapters folder, tombstones and tenant visibility.

    `lock` guards the entries and tombstones; `Tiers` takes the same lock for its own state, so
    a decision that reads both (is it in use? is the entry still the one decided on?) is one step.
    """

    def __init__(
        self,
        *,
        adapters_dir: str | Path | None = None,
        spill_dir: str | Path | None = None,
        registry_namespace: str | None = None,
        registry_repos: dict[str, str] | None = None,
        tenants: Tenants | None = None,
        names: Iterable[str] = (),
        held: Callable[[str], bool] | None = None,
    ):
        self.adapters_dir = Path(adapters_dir) if adapters_dir else None
        self.spill_dir = Path(spill_dir) if spill_dir else (self.adapters_dir / ".spill" if self.adapters_dir else None)
        self.registry_namespace = registry_namespace
        self.tenants = tenants or Tenants.open()
        # `held(name)`: is it in memory, in use or loading (Tiers says)? Only an entry nobody holds
        # is forgotten when its folder vanishes; a catalog alone (held None) forgets none
        self.held = held
        self.lock = threading.RLock()  # never held over file I/O but the small tombstone file
        self._entries: dict[str, Entry] = {name: Entry(name) for name in names}
        for name, repo in (registry_repos or {}).items():
            self._entries[name] = Entry(name, repo=repo)
        self.tombstones: set[str] = self._read_tombstones()
        self.rescan()

    # -- the mapping
    def __getitem__(self, name: str) -> Entry:
        return self._entries[name]

    def __setitem__(self, name: str, entry: Entry) -> None:
        self._entries[name] = entry

    def __delitem__(self, name: str) -> None:
        del self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    # -- finding adapters
    def rescan(self) -> list[str]:
        """Add the adapter folders under `adapters_dir` that the catalog does not know yet."""
        found: list[str] = []
        # the adapters folder, then the spill folder (adapters that were only ever in memory,
        # saved when they left it: still servable after a restart)
        folders = [d for d in (self.adapters_dir, self.spill_dir) if d is not None and d.is_dir()]
        with self.lock:
            for folder in folders:
                for path in sorted(folder.iterdir()):
                    name = path.name
                    hidden_or_gone = name.startswith(".") or name in self.tombstones
                    if hidden_or_gone or not is_name(name) or not is_adapter_folder(path):
                        continue
                    entry = self._entries.get(name)
                    if entry is None:
                        self._entries[name] = Entry(name, path=path)
                        found.append(name)
                    elif entry.path is None:
                        entry.path = path
        return found

    def entry(self, name: str) -> Entry | None:
        """The entry for `name`, found now if need be (a folder added since the last scan, or a
        repo in the registry namespace); None if it cannot be served."""
        if not is_name(name):  # before any lookup: "acme-x/../globex-y" is never a path
            return None
        with self.lock:
            if name in self.tombstones:
                return None
            entry = self._entries.get(name)
            if (
                entry is not None
                and entry.path is not None
                and not entry.repo
                and not entry.pending
                and self.held is not None
                and not self.held(name)
                and not entry.path.exists()
            ):
                del self._entries[name]  # its folder was removed: no longer served (nor listed)
                entry = None
            if entry is None and self.adapters_dir is not None and is_adapter_folder(self.adapters_dir / name):
                entry = self._entries[name] = Entry(name, path=self.adapters_dir / name)
            if entry is None and self.registry_namespace:
                entry = Entry(name, repo=f"{self.registry_namespace}/{name}")  # known once it loads
            return entry

    # -- tombstones: an admin delete sticks across rescans and restarts
    def bury(self, name: str) -> None:
        """Never serve `name` again (until `unbury`), even if its folder is found."""
        with self.lock:
            self.tombstones.add(name)
            self._write_tombstones()

    def unbury(self, name: str) -> None:
        with self.lock:
            if name in self.tombstones:
                self.tombstones.discard(name)
                self._write_tombstones()

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

    # -- tenants
    def owner(self, name: str) -> str | None:
        """The tenant that owns `name`: as added (`add(owner=...)`), else by the keys file's patterns."""
        entry = self._entries.get(name)
        return (entry.owner if entry is not None else None) or self.tenants.owner_of(name)

    def visible(self, name: str, tenant: str | None) -> bool:
        """May `tenant` use `name`? The HTTP layer asks once per request; the engine never does."""
        entry = self.entry(name)
        if entry is None or entry.pending == "delete":
            return False
        t = self.tenants.get(tenant) if tenant is not None else self.tenants.authenticate(None)
        return self.tenants.can_use(t, name, owner=entry.owner, public=entry.public)

    def models(self, tenant: str | None) -> list[Entry]:
        """The adapters `tenant` may list and use."""
        self.rescan()
        with self.lock:
            names = sorted(self._entries)
        return [self._entries[n] for n in names if self.visible(n, tenant)]

    # -- what a server asks of whatever holds its adapters (a catalog alone holds none)
    def residency(self) -> dict[str, int]:
        """Adapters per tier: none here (the Ray ingress); `Tiers.residency` counts them."""
        return {}

    def close(self) -> None:
        """Nothing to stop (`Tiers.close` stops its loader threads)."""
