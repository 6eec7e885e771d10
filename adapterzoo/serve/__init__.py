"""Serving: continuous batching over one base and many adapters, tiers, tenants, HTTP, Ray.

    from adapterzoo.serve import Engine, SamplingParams
    with Engine(zoo) as engine:
        text = engine.generate("hello", adapter="sql", max_tokens=16)

See docs/serving.md. A `ServeConfig` holds the options of `adapterzoo serve`; `server.build_server`
builds engine + tiers + tenants from it, `http.create_app` the OpenAI-compatible app around them,
`ray` the Ray Serve deployment; `http` and `ray` are imported on use (their dependencies are extras).
"""

from .config import ServeConfig
from .engine import (
    AdapterLoadError,
    Completion,
    ContextLengthError,
    Engine,
    EngineClosedError,
    EngineError,
    QueueFullError,
    RequestHandle,
    SamplingParams,
)
from .resolver import HostResolver, Resolver

__all__ = [
    "Engine",
    "SamplingParams",
    "Completion",
    "RequestHandle",
    "Resolver",
    "HostResolver",
    "EngineError",
    "QueueFullError",
    "EngineClosedError",
    "ContextLengthError",
    "AdapterLoadError",
    "ServeConfig",
]
