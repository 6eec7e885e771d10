"""Where the engine's adapters come from: the `Resolver` protocol, and `HostResolver`, the default.

The engine asks a resolver to bring an adapter into the zoo's host memory (`prepare`), tells it
which adapters running requests hold (`acquire`/`release`: a held adapter must not leave host
memory) and when it copied some into device slots (`placed`). It never asks whether a tenant may
use an adapter: the HTTP layer checks that once, before a request reaches the engine.
`serve/tiers.py` is the resolver with tiers (disk, registry, spill) behind the zoo.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Protocol

from ..errors import UnknownAdapterError

if TYPE_CHECKING:  # pragma: no cover
    from ..zoo import Zoo
    from .engine import Engine


class Resolver(Protocol):
    """What the engine needs from whatever keeps its adapters."""

    def prepare(self, name: str, tenant: str | None = None) -> Future:
        """A future that resolves (to None) once `name` is in the zoo, or fails with why not
        (already failed with `UnknownAdapterError` when `name` is known not to exist)."""

    def acquire(self, name: str) -> None:
        """A request now uses `name` (it must not leave host memory until released)."""

    def release(self, name: str) -> None:
        """A request no longer uses `name`."""

    def resident_limit(self, tenant: str | None) -> int | None:
        """How many distinct adapters a tenant's running requests may hold in device slots."""

    def placed(self, names: Sequence[str], seconds: float) -> None:
        """`names` were copied into device slots, taking `seconds` together."""

    def attach(self, engine: Engine) -> None:
        """The engine that uses this resolver (for work that must run between its steps)."""


class HostResolver:
    """The zoo's host memory alone, no tiers: an adapter is servable while the zoo holds it."""

    def __init__(self, zoo: Zoo):
        self.zoo = zoo

    def prepare(self, name: str, tenant: str | None = None) -> Future:
        f: Future = Future()
        try:
            self.zoo.get_adapter(name)
            f.set_result(None)
        except UnknownAdapterError as exc:
            f.set_exception(exc)
        return f

    def acquire(self, name: str) -> None:
        pass

    def release(self, name: str) -> None:
        pass

    def resident_limit(self, tenant: str | None) -> int | None:
        return None

    def placed(self, names: Sequence[str], seconds: float) -> None:
        pass

    def attach(self, engine: Engine) -> None:
        pass
