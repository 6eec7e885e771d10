"""Ray Serve: N replicas, each holding the base, its slot pools and its own engine.

    adapterzoo serve BASE --ray --replicas N --adapters DIR [--keys KEYS] --host 127.0.0.1 --port 8000

Two deployments:

- `Ingress` (one replica, the HTTP entry): the same OpenAI-compatible app as the single-process
  server (auth, tenants, validation, errors, SSE), with a `RemoteEngine` in place of the engine:
  each request goes to `ZooReplica.generate` through a handle with
  `multiplexed_model_id=<adapter>`, so Serve's model multiplexing sends it to a replica that has
  that adapter warm when there is one (best effort: Serve may pick another, which then loads it).
- `ZooReplica` (N replicas): the base, its `Tiers` (device pools, host, disk, registry) and an
  `Engine` that mixes every adapter of every request in one continuous batch. `@serve.batch` is
  not used: it splits batches per multiplexed model id, and the whole point is to mix them.

Both are given the command's `ServeConfig` as it is (Ray pickles it), so the ingress has the same
limits as `adapterzoo serve` and every replica builds the same server (`server_from_config`).

`get_adapter` is the `@serve.multiplexed` loader: it brings the adapter into the replica's host
memory (in a thread, so the engine keeps decoding) and returns a lease; when Serve evicts the
lease from its per-replica LRU, the adapter goes down to disk. Serve may call the lease's
`__del__` twice (explicitly, then at garbage collection): releasing is idempotent.

Ray opens ports on every address unless told otherwise. `run_ray` binds the node to 127.0.0.1
when the HTTP host is a loopback address; tests also run it inside a loopback-only network
namespace (`unshare -n`), with `RAY_AUTH_MODE=token`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from typing import Any

from ..errors import BatchError, UnknownAdapterError
from .config import ServeConfig
from .engine import (
    AdapterLoadError,
    Completion,
    ContextLengthError,
    EngineClosedError,
    EngineError,
    MaxTokensError,
    QueueFullError,
    RequestFailedError,
    TokenLogprob,
)

log = logging.getLogger("adapterzoo.serve")

BASE_ID = "__base__"  # the multiplexed model id of requests for the bare base
ERRORS = {
    cls.__name__: cls
    for cls in (
        UnknownAdapterError,
        ContextLengthError,
        MaxTokensError,
        QueueFullError,
        EngineClosedError,
        AdapterLoadError,
        RequestFailedError,
        BatchError,
        EngineError,
    )
}


def _error(exc: BaseException) -> dict[str, str]:
    name = type(exc).__name__
    return {"type": name if name in ERRORS else "EngineError", "message": str(exc)}


FIELDS = (
    "id",
    "adapter",
    "text",
    "token_ids",
    "finish_reason",
    "prompt_tokens",
    "completion_tokens",
    "ttft",
    "latency",
    "cached_tokens",
)


def _done(value: Completion, replica: str) -> dict[str, Any]:
    d = {k: getattr(value, k) for k in FIELDS}
    d.update(kind="done", replica=replica, error=_error(value.error) if value.error is not None else None)
    if value.logprobs is not None:  # plain tuples cross the process boundary
        d["logprobs"] = [(lp.token, lp.logprob, [list(t) for t in lp.top]) for lp in value.logprobs]
    return d


def _failed(exc: BaseException, replica: str | None = None) -> dict[str, Any]:
    return {
        "kind": "done",
        "id": "",
        "adapter": None,
        "text": "",
        "token_ids": [],
        "finish_reason": "error",
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "ttft": None,
        "latency": 0.0,
        "cached_tokens": 0,
        "replica": replica,
        "error": _error(exc),
    }


def _completion(item: dict[str, Any]) -> Completion:
    err = item.get("error")
    error = ERRORS.get(err["type"], EngineError)(err["message"]) if err else None
    fields = {k: item[k] for k in FIELDS}
    logprobs = None
    if item.get("logprobs") is not None:
        logprobs = [TokenLogprob(t, lp, tuple((a, b) for a, b in top)) for t, lp, top in item["logprobs"]]
    return Completion(**fields, error=error, replica=item.get("replica"), logprobs=logprobs)


class _Lease:
    """What `@serve.multiplexed` caches per adapter; dropping it moves the adapter to disk."""

    def __init__(self, tiers, name: str):
        self.tiers, self.name, self.released = tiers, name, False

    def __del__(self):  # Serve calls it on eviction, and Python again at collection
        if not self.released:
            self.released = True
            try:
                self.tiers.unload(self.name)
            except Exception:  # noqa: BLE001 - already gone, or shutting down
                pass


class ZooReplica:
    """One replica: base + pools + tiers + engine. Wrapped by `serve.deployment` in `build_app`."""

    def __init__(self, config: ServeConfig):
        import torch

        from .server import server_from_config

        if config.threads:
            torch.set_num_threads(config.threads)
        self.server = server_from_config(config)
        self.server.engine.start()
        try:
            from ray import serve

            self.replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 - outside Serve (tests)
            self.replica = f"{socket.gethostname()}-{os.getpid()}"

    async def get_adapter(self, model_id: str) -> _Lease:
        await asyncio.to_thread(self.server.adapters.load, model_id, 600)
        return _Lease(self.server.adapters, model_id)

    async def generate(self, payload: dict[str, Any]):
        """Stream of dicts: {"kind": "delta", "text"} ..., then {"kind": "done", ...}."""
        from ray import serve

        model_id = serve.get_multiplexed_model_id() or BASE_ID
        adapter = None if model_id == BASE_ID else model_id
        if adapter is not None:
            try:
                await self.get_adapter(adapter)
            except Exception as exc:  # noqa: BLE001 - the caller gets it as its answer
                yield _failed(AdapterLoadError.wrap(adapter, exc), self.replica)
                return
        try:
            handle = self.server.engine.submit_request(**payload, adapter=adapter, loop=asyncio.get_running_loop())
        except Exception as exc:  # noqa: BLE001
            yield _failed(exc, self.replica)
            return
        try:
            async for kind, value in handle.astream():
                if kind == "delta":
                    yield {"kind": "delta", "text": value}
                else:
                    yield _done(value, self.replica)
        finally:  # the caller went away (Serve cancels this generator): free the row now
            handle.cancel()

    def stats(self) -> dict[str, Any]:
        return {"replica": self.replica, **self.server.engine.stats(), "adapters": self.server.adapters.residency()}

    def __del__(self):
        try:
            self.server.engine.stop(drain=True, timeout=self.server.drain_timeout)
            self.server.adapters.close()
        except Exception:  # noqa: BLE001
            pass


# ----------------------------------------------------------------------------- the ingress side


class RemoteHandle:
    """A request running on some replica; the same async interface as `RequestHandle`."""

    def __init__(self, response):
        self.response = response
        self.finished = False

    def cancel(self) -> None:
        if not self.finished:
            self.finished = True
            try:
                self.response.cancel()
            except Exception:  # noqa: BLE001
                pass

    async def astream(self):
        try:
            async for item in self.response:
                if item["kind"] == "delta":
                    yield "delta", item["text"]
                else:
                    self.finished = True
                    yield "done", _completion(item)
                    return
        except asyncio.CancelledError:
            self.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - a replica died, Serve refused ...
            self.finished = True
            yield "done", _completion(_failed(EngineError(f"the replica failed: {type(exc).__name__}: {exc}")))

    async def aresult(self) -> Completion:
        async for kind, value in self.astream():
            if kind == "done":
                return value
        raise EngineError("stream ended without a result")


class RemoteEngine:
    """Stands in for `Engine` in the ingress: submits to replicas through a Serve handle."""

    running = True

    def __init__(self, handle):
        self.handle = handle

    def start(self) -> None:
        pass

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        pass

    def stats(self) -> dict[str, Any]:
        return {"deployment": "ray"}

    def submit_request(
        self,
        prompt=None,
        adapter=None,
        *,
        messages=None,
        max_tokens=None,
        chat_max_tokens=512,
        sampling=None,
        tenant=None,
        loop=None,
    ) -> RemoteHandle:
        payload = {
            "prompt": prompt,
            "messages": messages,
            "max_tokens": max_tokens,
            "chat_max_tokens": chat_max_tokens,
            "sampling": sampling,
            "tenant": tenant,
        }
        response = self.handle.options(multiplexed_model_id=adapter or BASE_ID, stream=True).generate.remote(payload)
        return RemoteHandle(response)

    def submit_call(
        self,
        prompts,
        adapter=None,
        *,
        chat=False,
        max_tokens=None,
        chat_max_tokens=512,
        sampling=None,
        n=1,
        tenant=None,
        loop=None,
        request_id=None,
    ) -> list[RemoteHandle]:
        """`Engine.submit_call` over the replicas: one remote request per prompt and choice."""
        handles = []
        for prompt in prompts:
            for j in range(n):
                options = dict(sampling or {})
                if j and options.get("seed") is not None:
                    options["seed"] = (options["seed"] + j) % 2**63
                handles.append(
                    self.submit_request(
                        **({"messages": prompt} if chat else {"prompt": prompt}),
                        adapter=adapter,
                        max_tokens=max_tokens,
                        chat_max_tokens=chat_max_tokens,
                        sampling=options,
                        tenant=tenant,
                    )
                )
        return handles


class Ingress:
    """The HTTP entry. Wrapped by `serve.deployment(serve.ingress()(...))` in `build_app`."""

    def __init__(self, replicas, config: ServeConfig):
        from .catalog import Catalog
        from .metrics import ServeMetrics
        from .server import Server
        from .tenants import Tenants

        tenants = Tenants.from_keys_file(config.keys_file)
        catalog = Catalog(
            adapters_dir=config.adapters_dir, registry_namespace=config.registry_namespace, tenants=tenants
        )  # no base here: the replicas hold the tiers
        self.server = Server(RemoteEngine(replicas), catalog, tenants, ServeMetrics(), config)

    def __serve_build_asgi_app__(self):
        from .http import create_app

        return create_app(self.server, admin=False)


def build_app(config: ServeConfig):
    """The Serve application: Ingress -> ZooReplica x `config.replicas`. Both get `config` as it is
    (Ray pickles it), so every replica builds the same server as `adapterzoo serve` would."""
    import torch
    from ray import serve

    device = config.device
    gpus = 1 if torch.cuda.is_available() and (device in (None, "cuda") or str(device).startswith("cuda")) else 0
    replica_cls = type("ZooReplica", (ZooReplica,), {})
    multiplexed = serve.multiplexed(max_num_models_per_replica=config.models_per_replica)
    replica_cls.get_adapter = multiplexed(ZooReplica.get_adapter)
    replica = serve.deployment(
        replica_cls,
        name="ZooReplica",
        num_replicas=config.replicas,
        max_ongoing_requests=config.max_queue + config.max_batch,
        ray_actor_options={"num_cpus": 0, "num_gpus": gpus},
    )
    ingress = serve.deployment(
        serve.ingress()(type("Ingress", (Ingress,), {})),
        name="Ingress",
        num_replicas=1,
        max_ongoing_requests=4 * (config.max_queue + config.max_batch),
        ray_actor_options={"num_cpus": 0},
    )
    return ingress.bind(replica.bind(config), config)


def run_ray(config: ServeConfig) -> None:
    """Start a local Ray (or join RAY_ADDRESS), deploy, serve until SIGINT/SIGTERM, shut down."""
    import ray
    from ray import serve

    host, port, replicas = config.host, config.port, config.replicas
    loopback = host in ("127.0.0.1", "localhost", "::1")
    init: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING}
    if loopback and not os.environ.get("RAY_ADDRESS"):
        init["_node_ip_address"] = "127.0.0.1"
    ray.init(**init)
    stopping: list[int] = []

    def on_signal(signum, _frame):
        stopping.append(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        serve.start(http_options={"host": host, "port": port}, proxy_location="HeadOnly")
        serve.run(build_app(config), name="adapterzoo", route_prefix="/")
        print(f"serving {config.base_name!r} on Ray Serve ({replicas} replicas) at http://{host}:{port}/v1", flush=True)
        while not stopping:
            time.sleep(0.2)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
