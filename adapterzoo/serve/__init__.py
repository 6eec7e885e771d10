"""Serving: continuous batching over one base and many adapters, tiers, tenants, HTTP, Ray.

    from adapterzoo.serve import Engine, SamplingParams
    with Engine(zoo) as engine:
        text = engine.generate("hello", adapter="sql", max_tokens=16)

See docs/serving.md. `http.create_app` builds the OpenAI-compatible server, `ray` the Ray Serve
deployment; both are imported lazily (their dependencies are optional extras).
"""

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
    "Engine", "SamplingParams", "Completion", "RequestHandle", "Resolver", "HostResolver", "EngineError",
    "QueueFullError", "EngineClosedError", "ContextLengthError", "AdapterLoadError",
]
