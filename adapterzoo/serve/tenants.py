"""Tenants: API keys, which adapters each tenant owns, which are public, and per-tenant limits.

The keys file is YAML or JSON (a `.json` suffix is parsed as JSON, anything else as YAML):

```yaml
tenants:
  acme:
    keys: [sk-acme-1, sk-acme-2]     # API keys (Authorization: Bearer ...) of this tenant
    adapters: ["acme-*"]             # names (or shell-style globs) of the adapters it owns
    max_resident: 4                  # device slots its running requests may hold at once
    rps: 10                          # requests per second (token bucket) ...
    burst: 20                        # ... with this many at once (default: max(1, rps))
  ops:
    keys: [sk-ops]
    admin: true                      # may use the /admin routes and every adapter
public: ["shared-*"]                 # adapters every tenant sees and uses
keys: {sk-legacy: acme}              # optional: more keys, mapped to a tenant name
```

A tenant sees and uses its own adapters, the public ones and the base; any other adapter answers
404, exactly as one that does not exist. Without a keys file the server is open: no key needed,
every adapter public.
"""

from __future__ import annotations

import fnmatch
import json
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InvalidConfigError

TENANT_KEYS = {"keys", "adapters", "max_resident", "rps", "burst", "admin"}


@dataclass
class Tenant:
    name: str
    adapters: list[str] = field(default_factory=list)  # names or globs it owns
    max_resident: int | None = None
    rps: float | None = None
    burst: float | None = None
    admin: bool = False

    def owns(self, adapter: str) -> bool:
        return any(name_matches(adapter, p) for p in self.adapters)


def name_matches(name: str, pattern: str) -> bool:
    """A shell-style glob over adapter names that never crosses a path separator or a '..':
    `acme-*` matches `acme-sql`, never `acme-x/../globex-y`."""
    if "/" in name or "\\" in name or ".." in name:
        return False
    return fnmatch.fnmatchcase(name, pattern)


class RateLimiter:
    """Token buckets, one per tenant: `rps` tokens a second, holding at most `burst`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}  # tenant -> (tokens, last time)

    def allow(self, tenant: Tenant, now: float | None = None, cost: int = 1) -> bool:
        """Take `cost` tokens (one per prompt and choice of a request) if the bucket has them."""
        if not tenant.rps:
            return True
        now = time.monotonic() if now is None else now
        burst = tenant.burst or max(1.0, tenant.rps)
        with self._lock:
            tokens, last = self._buckets.get(tenant.name, (burst, now))
            tokens = min(burst, tokens + (now - last) * tenant.rps)
            if tokens < cost:
                self._buckets[tenant.name] = (tokens, now)
                return False
            self._buckets[tenant.name] = (tokens - cost, now)
            return True


class Tenants:
    """API key -> tenant; ownership and visibility of adapters; limits."""

    def __init__(
        self,
        tenants: Iterable[Tenant] = (),
        keys: dict[str, str] | None = None,
        public: Iterable[str] = (),
        open_access: bool = False,
    ):
        self.tenants = {t.name: t for t in tenants}
        self.keys: dict[str, Tenant] = {}
        for key, name in (keys or {}).items():
            if name not in self.tenants:
                raise InvalidConfigError(f"key maps to tenant {name!r}, which the keys file does not define")
            self.keys[key] = self.tenants[name]
        self.public = list(public)
        self.open_access = open_access
        self.limiter = RateLimiter()

    @classmethod
    def open(cls) -> Tenants:
        """No keys file: everyone is the tenant "default", every adapter is public."""
        return cls([Tenant("default")], public=["*"], open_access=True)

    @classmethod
    def from_keys_file(cls, path: str | Path | None) -> Tenants:
        """The tenants of a keys file; open access (`open()`) when there is none."""
        return cls.load(path) if path else cls.open()

    @classmethod
    def load(cls, path: str | Path) -> Tenants:
        path = Path(path)
        text = path.read_text()
        try:
            if path.suffix == ".json":
                data = json.loads(text)
            else:
                import yaml

                data = yaml.safe_load(text)
        except Exception as exc:  # noqa: BLE001 - any parse error is a config error
            raise InvalidConfigError(
                f"{path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}"
            ) from exc
        return cls.from_dict(data or {}, where=str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "keys file") -> Tenants:
        if not isinstance(data, dict):
            raise InvalidConfigError(f"{where} must hold a mapping with 'tenants' (and optionally 'public', 'keys')")
        unknown = set(data) - {"tenants", "public", "keys"}
        if unknown:
            raise InvalidConfigError(f"{where}: unknown top-level key(s) {sorted(unknown)}; use tenants, public, keys")
        tenants, keys = [], dict(data.get("keys") or {})
        for name, spec in (data.get("tenants") or {}).items():
            spec = spec or {}
            bad = set(spec) - TENANT_KEYS
            if bad:
                raise InvalidConfigError(
                    f"{where}: tenant {name!r} has unknown key(s) {sorted(bad)}; use {sorted(TENANT_KEYS)}"
                )
            for key in spec.get("keys") or []:
                if key in keys and keys[key] != name:
                    raise InvalidConfigError(
                        f"{where}: an API key is given to two tenants ({keys[key]!r} and {name!r})"
                    )
                keys[key] = name
            tenants.append(
                Tenant(
                    name=str(name),
                    adapters=list(spec.get("adapters") or []),
                    max_resident=_opt_int(spec.get("max_resident"), f"{name}.max_resident", where),
                    rps=_opt_float(spec.get("rps"), f"{name}.rps", where),
                    burst=_opt_float(spec.get("burst"), f"{name}.burst", where),
                    admin=bool(spec.get("admin", False)),
                )
            )
        return cls(tenants, keys, data.get("public") or [])

    # -- who
    def authenticate(self, key: str | None) -> Tenant | None:
        if self.open_access:
            return self.tenants["default"]
        return self.keys.get(key) if key else None

    def get(self, name: str | None) -> Tenant | None:
        return self.tenants.get(name) if name else None

    # -- what
    def owner_of(self, adapter: str) -> str | None:
        for t in self.tenants.values():
            if t.adapters and t.owns(adapter):
                return t.name
        return None

    def is_public(self, adapter: str) -> bool:
        return any(name_matches(adapter, p) for p in self.public)

    def can_use(self, tenant: Tenant | None, adapter: str, owner: str | None = None, public: bool = False) -> bool:
        if tenant is None:
            return False
        if tenant.admin or self.open_access or public or self.is_public(adapter):
            return True
        owner = owner or self.owner_of(adapter)
        return owner == tenant.name

    def resident_limit(self, tenant_name: str | None) -> int | None:
        t = self.get(tenant_name)
        return t.max_resident if t else None

    def allow_request(self, tenant: Tenant, cost: int = 1) -> bool:
        return self.limiter.allow(tenant, cost=cost)


def _opt_int(value: Any, what: str, where: str) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidConfigError(f"{where}: {what} must be a positive integer, got {value!r}")
    return value


def _opt_float(value: Any, what: str, where: str) -> float | None:
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise InvalidConfigError(f"{where}: {what} must be a positive number, got {value!r}")
    return float(value)
