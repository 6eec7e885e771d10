"""The parts of one server: engine + adapter tiers + tenants + metrics around a `Zoo`, and its `ServeConfig`.

`server_from_config` loads the base and builds them; the single-process server and every Ray
replica build theirs this way. `http.create_app(server)` puts them behind the OpenAI-compatible
routes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .catalog import Catalog
from .config import DTYPES, ServeConfig
from .engine import Engine
from .metrics import ServeMetrics
from .tenants import Tenants
from .tiers import Tiers


@dataclass
class Server:
    """What the routes work with. The engine is a `ray.RemoteEngine` on a Ray ingress."""

    engine: Engine | Any
    #: where the adapters are: `Tiers` around the zoo, or a `Catalog` alone on a Ray ingress (whose
    #: replicas hold the tiers). Both answer what the routes ask: visible, models, owner, rescan,
    #: residency, close; the admin routes need `Tiers`.
    adapters: Tiers | Catalog
    tenants: Tenants
    metrics: ServeMetrics
    config: ServeConfig

    @property
    def base_name(self) -> str:
        return self.config.base_name

    @property
    def default_max_tokens(self) -> int:
        return self.config.default_max_tokens

    @property
    def drain_timeout(self) -> float:
        return self.config.drain_timeout


def build_server(zoo, config: ServeConfig | None = None, *, tenants: Tenants | None = None, **options: Any) -> Server:
    """Engine + tiers + tenants + metrics around a loaded `Zoo`.

    Give a `config`, or its fields as keywords (`base_name` names the base; `base` may be left
    out, the zoo is loaded already). `tenants` defaults to the config's keys file (none: open).

    Fair shares by default when there is more than one tenant: a tenant may fill at most half the
    queue, and at most all but an eighth of the batch's rows (those stay free, so another tenant's
    request joins at the next step, not after a flood)."""
    if config is None:
        config = ServeConfig(**{"base": options.get("base_name") or "base", **options})
    elif options:
        raise TypeError(f"give a config or its fields as keywords, not both (got {', '.join(options)})")
    if tenants is None:
        tenants = Tenants.from_keys_file(config.keys_file)
    max_queue_per_tenant, max_rows_per_tenant = config.max_queue_per_tenant, config.max_rows_per_tenant
    if len(tenants.tenants) > 1:
        if max_queue_per_tenant is None:
            max_queue_per_tenant = max(1, config.max_queue // 2)
        if max_rows_per_tenant is None:
            max_rows_per_tenant = max(1, config.max_batch - max(1, config.max_batch // 8))
    metrics = ServeMetrics()
    tiers = Tiers(
        zoo,
        adapters_dir=config.adapters_dir,
        registry_endpoint=config.registry_endpoint,
        registry_token=config.registry_token,
        registry_namespace=config.registry_namespace,
        max_host=config.max_host,
        tenants=tenants,
        metrics=metrics,
    )
    engine = Engine(
        zoo,
        max_batch=config.max_batch,
        max_queue=config.max_queue,
        resolver=tiers,
        metrics=metrics,
        max_queue_per_tenant=max_queue_per_tenant,
        max_rows_per_tenant=max_rows_per_tenant,
        stuck_after=config.stuck_after,
        prefix_cache_bytes=config.prefix_cache_mb * 2**20,
    )
    return Server(engine, tiers, tenants, metrics, config)


def load_zoo(config: ServeConfig):
    """The config's base, loaded into a `Zoo` with its slots, device and dtype."""
    import torch

    from ..zoo import Zoo

    kwargs: dict[str, Any] = {"slots": config.slots, "device": config.device}
    if config.dtype:
        kwargs["dtype"] = getattr(torch, DTYPES[config.dtype])
    return Zoo.from_pretrained(config.base, **kwargs)


def server_from_config(config: ServeConfig) -> Server:
    """Load the base and build its `Server` (the single-process server and every Ray replica)."""
    return build_server(load_zoo(config), config)
