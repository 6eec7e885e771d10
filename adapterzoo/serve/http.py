"""The OpenAI-compatible HTTP server (Starlette), in front of one `Engine` and its `Router`.

Routes:

- `GET /v1/models`, `GET /v1/models/{id}`: the base and the adapters the caller's tenant may use;
- `POST /v1/completions`, `POST /v1/chat/completions` (chat template from the base's tokenizer),
  with `"stream": true` as server-sent events ending in `data: [DONE]`;
- `GET /admin/adapters`, `POST /admin/adapters` (load), `POST /admin/adapters/{id}/unload`,
  `DELETE /admin/adapters/{id}`: admin keys only;
- `GET /metrics` (Prometheus), `GET /health`.

`model` is an adapter name or the base's name. Errors have OpenAI's JSON shape
`{"error": {"message", "type", "param", "code"}}`: 400 for bad input (malformed JSON, unknown
fields, values out of range, prompts over the context length), 401 without a valid key, 404 for an
adapter that does not exist or belongs to another tenant (the same answer for both), 429 over a
tenant's rate or the queue limit, 500 when an adapter cannot be loaded, 503 while shutting down.
A streaming request waits for its first token (or its error) before answering, so errors keep
their status code; a client that disconnects cancels its request, which frees its row and cache.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..errors import AdapterExistsError, AdapterZooError, BatchError, InvalidConfigError, InvalidNameError, UnknownAdapterError
from .engine import (
    AdapterLoadError,
    Completion,
    ContextLengthError,
    Engine,
    EngineClosedError,
    MaxTokensError,
    QueueFullError,
    render_chat,  # noqa: F401 - re-exported for users of the HTTP layer
)
from .metrics import ServeMetrics
from .router import Router
from .tenants import Tenant, Tenants

log = logging.getLogger("adapterzoo.serve")


# ----------------------------------------------------------------------------- errors


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def not_found(model: str) -> APIError:
    return APIError(404, f"The model `{model}` does not exist or you do not have access to it.", param="model",
                    code="model_not_found")


def api_error(exc: BaseException, param: str | None = None) -> APIError:
    """The HTTP answer for an exception from the engine or the router."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, UnknownAdapterError):
        return APIError(404, str(exc), param="model", code="model_not_found")
    if isinstance(exc, MaxTokensError):
        return APIError(400, str(exc), param="max_tokens", code="invalid_value")
    if isinstance(exc, ContextLengthError):
        return APIError(400, str(exc), param=param, code="context_length_exceeded")
    if isinstance(exc, QueueFullError):
        return APIError(429, str(exc), type="server_overloaded", code="queue_full", headers={"Retry-After": "1"})
    if isinstance(exc, EngineClosedError):
        return APIError(503, str(exc), type="server_error", code="shutting_down")
    if isinstance(exc, AdapterLoadError):
        return APIError(500, str(exc), type="server_error", param="model", code="adapter_load_failed")
    if isinstance(exc, AdapterExistsError):
        return APIError(409, str(exc), code="adapter_exists")
    if isinstance(exc, (BatchError, InvalidConfigError, InvalidNameError)):
        return APIError(400, str(exc), param=param)
    if isinstance(exc, AdapterZooError):
        return APIError(500, str(exc), type="server_error")
    log.exception("unexpected error", exc_info=exc)
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")


# ----------------------------------------------------------------------------- request bodies


class _Body(BaseModel):
    """Fields shared by both endpoints. Unknown fields are an error (a typo must not be ignored);
    fields OpenAI defines that this server does not implement are accepted only at their
    do-nothing values."""

    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0)  # an extension (vLLM's), pass it with extra_body
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        items = [v] if isinstance(v, str) else (v or [])
        if len(items) > 4:
            raise ValueError("at most 4 stop sequences")
        return v

    def unsupported(self) -> None:
        for field, ok in (("n", self.n == 1), ("presence_penalty", self.presence_penalty == 0),
                          ("frequency_penalty", self.frequency_penalty == 0), ("logit_bias", not self.logit_bias)):
            if not ok:
                raise APIError(400, f"`{field}` is not supported by this server (leave it at its default)", param=field,
                               code="unsupported_parameter")
        if self.stream_options is not None and set(self.stream_options) - {"include_usage"}:
            raise APIError(400, "stream_options supports only include_usage", param="stream_options")


class CompletionBody(_Body):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    def unsupported(self) -> None:
        super().unsupported()
        for field, ok in (("echo", not self.echo), ("logprobs", not self.logprobs), ("best_of", self.best_of in (None, 1)),
                          ("suffix", not self.suffix)):
            if not ok:
                raise APIError(400, f"`{field}` is not supported by this server", param=field, code="unsupported_parameter")


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[_Part] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatBody(_Body):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None

    def unsupported(self) -> None:
        super().unsupported()
        fmt = (self.response_format or {}).get("type", "text")
        for field, ok in (("logprobs", not self.logprobs), ("top_logprobs", not self.top_logprobs),
                          ("response_format", fmt == "text"), ("tools", not self.tools),
                          ("tool_choice", self.tool_choice in (None, "none"))):
            if not ok:
                raise APIError(400, f"`{field}` is not supported by this server", param=field, code="unsupported_parameter")


def parse_body(raw: bytes, model: type[BaseModel]) -> BaseModel:
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"We could not parse the JSON body of your request ({exc}). The request body must be "
                            "valid JSON.", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err.get("loc", ())) or None
        if err.get("type") == "extra_forbidden":
            raise APIError(400, f"Unrecognized request argument supplied: {param}", param=param,
                           code="unknown_parameter") from None
        if err.get("type") == "missing":
            raise APIError(400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter") from None
        raise APIError(400, f"Invalid value for '{param}': {err.get('msg')}", param=param,
                       code="invalid_value") from None


# ----------------------------------------------------------------------------- the app


class Server:
    """State behind the routes: engine, router, tenants, metrics, the base's name."""

    def __init__(self, engine: Engine, router: Router, tenants: Tenants, metrics: ServeMetrics, base_name: str, *,
                 default_max_tokens: int = 16, chat_max_tokens: int = 512, drain_timeout: float = 30.0):
        self.engine, self.router, self.tenants, self.metrics = engine, router, tenants, metrics
        self.base_name = base_name
        self.default_max_tokens = default_max_tokens
        self.chat_max_tokens = chat_max_tokens
        self.drain_timeout = drain_timeout
        self.created = int(time.time())
        self.admin_routes = True

    # -- helpers
    def tenant(self, request: Request) -> Tenant:
        header = request.headers.get("authorization", "")
        key = header[7:].strip() if header.lower().startswith("bearer ") else None
        tenant = self.tenants.authenticate(key)
        if tenant is None:
            if not key:
                raise APIError(401, "You didn't provide an API key. You need to provide your API key in an Authorization "
                                    "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).", code="invalid_api_key")
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")
        return tenant

    def admin(self, request: Request) -> Tenant:
        if not self.admin_routes:
            raise APIError(501, "The admin routes are not available on a Ray Serve deployment; restart the deployment "
                                "with a changed adapters folder instead.", type="server_error", code="not_implemented")
        tenant = self.tenant(request)
        if not (tenant.admin or self.tenants.open_access):
            raise APIError(403, "This key may not use the admin routes.", type="permission_error", code="forbidden")
        return tenant

    def adapter_for(self, model: str, tenant: Tenant) -> str | None:
        if model == self.base_name:
            return None
        if not self.router.visible(model, tenant.name):
            raise not_found(model)
        return model

    def rate_limit(self, tenant: Tenant) -> None:
        if not self.tenants.allow_request(tenant):
            self.metrics.rejected("rate_limit")
            raise APIError(429, f"Rate limit reached for tenant {tenant.name!r} ({tenant.rps:g} requests per second); "
                                "retry after a moment.", type="requests", code="rate_limit_exceeded",
                           headers={"Retry-After": "1"})

    def sampling(self, body: _Body) -> dict[str, Any]:
        return {"temperature": body.temperature, "top_p": body.top_p, "top_k": body.top_k, "seed": body.seed,
                "stop": body.stop}  # a string, a list or None: SamplingParams takes each

    def model_card(self, name: str, owner: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": self.created, "owned_by": owner}


def create_app(server: Server, *, admin: bool = True) -> Starlette:
    """The ASGI app. `admin=False` (Ray Serve's ingress, where adapters live in the replicas)
    answers 501 on the admin routes."""
    s = server

    def timed(route: str):
        def wrap(fn):
            async def endpoint(request: Request) -> Response:
                try:
                    response = await fn(request)
                except APIError as exc:
                    response = exc.response()
                except Exception as exc:  # noqa: BLE001 - every error leaves as OpenAI-shaped JSON
                    response = api_error(exc).response()
                s.metrics.http(route, response.status_code)
                return response

            return endpoint

        return wrap

    @timed("/health")
    async def health(request: Request) -> Response:
        ok = s.engine.running
        return JSONResponse({"status": "ok" if ok else "stopping", "base": s.base_name, **s.engine.stats(),
                             "adapters": s.router.residency()}, status_code=200 if ok else 503)

    async def metrics(request: Request) -> Response:
        data, content_type = s.metrics.render()
        return Response(data, media_type=content_type)

    @timed("/v1/models")
    async def list_models(request: Request) -> Response:
        tenant = s.tenant(request)
        data = [s.model_card(s.base_name, "adapterzoo")]
        for entry in s.router.models(tenant.name):
            data.append(s.model_card(entry.name, s.router.owner(entry.name) or "public"))
        return JSONResponse({"object": "list", "data": data})

    @timed("/v1/models/{model}")
    async def get_model(request: Request) -> Response:
        tenant = s.tenant(request)
        model = request.path_params["model"]
        if s.adapter_for(model, tenant) is None:
            return JSONResponse(s.model_card(model, "adapterzoo"))
        return JSONResponse(s.model_card(model, s.router.owner(model) or "public"))

    async def _generate(request: Request, chat: bool) -> Response:
        tenant = s.tenant(request)
        body = parse_body(await request.body(), ChatBody if chat else CompletionBody)
        body.unsupported()
        adapter = s.adapter_for(body.model, tenant)
        s.rate_limit(tenant)
        if chat:
            items = [{"messages": [{"role": m.role, "content": m.text()} for m in body.messages]}]
            max_tokens = body.max_completion_tokens or body.max_tokens
            param = "messages"
        else:
            items = [{"prompt": p} for p in _prompts(body.prompt)]
            max_tokens = body.max_tokens or s.default_max_tokens
            param = "prompt"
        loop = asyncio.get_running_loop()
        handles = []
        try:
            for item in items:
                handles.append(s.engine.submit_request(
                    **item, adapter=adapter, max_tokens=max_tokens, chat_max_tokens=s.chat_max_tokens,
                    sampling=s.sampling(body), tenant=tenant.name, loop=loop))
        except BaseException as exc:
            for h in handles:
                h.cancel()
            raise api_error(exc, param) from None
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        if body.stream:
            return await _stream(request, handles, rid, body, chat, param)
        results = await _wait_or_disconnect(request, handles)
        if results is None:
            return Response(status_code=499)
        for done in results:
            if done.finish_reason == "error":
                raise api_error(done.error, param)
        usage = _usage(results)
        created = int(time.time())
        if chat:
            done = results[0]
            return JSONResponse({
                "id": rid, "object": "chat.completion", "created": created, "model": body.model,
                "system_fingerprint": done.replica,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": done.text},
                             "logprobs": None, "finish_reason": _reason(done)}],
                "usage": usage,
            })
        return JSONResponse({
            "id": rid, "object": "text_completion", "created": created, "model": body.model,
            "system_fingerprint": results[0].replica,
            "choices": [{"index": i, "text": d.text, "logprobs": None, "finish_reason": _reason(d)} for i, d in enumerate(results)],
            "usage": usage,
        })

    async def _stream(request: Request, handles, rid: str, body: _Body, chat: bool, param: str) -> Response:
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i, handle):
            async for kind, value in handle.astream():
                await queue.put((i, kind, value))

        tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]

        def cancel_all():
            for h in handles:
                h.cancel()
            for t in tasks:
                t.cancel()

        # wait for the first event of each choice: an error before any token keeps its status code
        first: list[tuple[int, str, Any]] = []
        started: set[int] = set()
        try:
            while len(started) < len(handles):
                i, kind, value = await queue.get()
                first.append((i, kind, value))
                started.add(i)
                if kind == "done" and value.finish_reason == "error":
                    cancel_all()
                    raise api_error(value.error, param)
        except asyncio.CancelledError:
            cancel_all()
            raise
        created = int(time.time())
        include_usage = bool((body.stream_options or {}).get("include_usage"))

        def chunk(i: int, text: str | None, reason: str | None, role: bool = False) -> str:
            if chat:
                delta: dict[str, Any] = {}
                if role:
                    delta["role"] = "assistant"
                if text is not None:
                    delta["content"] = text
                choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": reason}
                obj = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": body.model, "choices": [choice]}
            else:
                choice = {"index": i, "text": text or "", "logprobs": None, "finish_reason": reason}
                obj = {"id": rid, "object": "text_completion", "created": created, "model": body.model, "choices": [choice]}
            return f"data: {json.dumps(obj)}\n\n"

        async def events():
            finished: list[Completion] = []
            try:
                if chat:
                    for i in range(len(handles)):
                        yield chunk(i, "", None, role=True)
                pending = list(first)
                while len(finished) < len(handles):
                    i, kind, value = pending.pop(0) if pending else await queue.get()
                    if kind == "delta":
                        yield chunk(i, value, None)
                    else:
                        finished.append(value)
                        if value.finish_reason == "error":
                            err = api_error(value.error, param)
                            yield f"data: {json.dumps(err.body())}\n\n"
                        else:
                            yield chunk(i, None if chat else "", _reason(value))
                if include_usage:
                    usage = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                             "created": created, "model": body.model, "choices": [], "usage": _usage(finished)}
                    yield f"data: {json.dumps(usage)}\n\n"
                yield "data: [DONE]\n\n"
            finally:  # also on disconnect (the task is cancelled): free the rows and caches now
                cancel_all()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @timed("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _generate(request, chat=False)

    @timed("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _generate(request, chat=True)

    # -- admin
    @timed("/admin/adapters")
    async def admin_list(request: Request) -> Response:
        s.admin(request)
        s.router.rescan()
        return JSONResponse({"object": "list", "data": [s.router.describe(n) for n in sorted(s.router.catalog)],
                             "residency": s.router.residency()})

    @timed("/admin/adapters")
    async def admin_load(request: Request) -> Response:
        s.admin(request)
        body = parse_body(await request.body(), LoadBody)
        try:
            await asyncio.to_thread(s.router.add, body.name, body.source, owner=body.owner, public=body.public,
                                    revision=body.revision)
        except Exception as exc:  # noqa: BLE001
            if isinstance(exc, (UnknownAdapterError,)):
                raise APIError(404, str(exc), param="source", code="adapter_not_found") from None
            if isinstance(exc, AdapterZooError) and not isinstance(exc, AdapterExistsError):
                raise APIError(400, f"could not load {body.name!r}: {exc}", param="source", code="adapter_load_failed") from None
            raise api_error(exc) from None
        return JSONResponse(s.router.describe(body.name), status_code=201)

    @timed("/admin/adapters/{name}/unload")
    async def admin_unload(request: Request) -> Response:
        s.admin(request)
        name = request.path_params["name"]
        try:
            done = await asyncio.to_thread(s.router.unload, name)
        except UnknownAdapterError as exc:
            raise APIError(404, str(exc), code="adapter_not_found") from None
        return JSONResponse({"id": name, "status": "unloaded" if done else "pending"}, status_code=200 if done else 202)

    @timed("/admin/adapters/{name}")
    async def admin_delete(request: Request) -> Response:
        s.admin(request)
        name = request.path_params["name"]
        try:
            done = await asyncio.to_thread(s.router.delete, name)
        except UnknownAdapterError as exc:
            raise APIError(404, str(exc), code="adapter_not_found") from None
        return JSONResponse({"id": name, "deleted": True, "status": "deleted" if done else "pending"},
                            status_code=200 if done else 202)

    @asynccontextmanager
    async def lifespan(app):
        s.engine.start()
        try:
            yield
        finally:  # uvicorn stops accepting and waits for open requests first; then drain what is left
            await asyncio.to_thread(s.engine.stop, True, s.drain_timeout)
            await asyncio.to_thread(s.router.close)

    async def not_found_route(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 404)
        message = "Unknown route" if status == 404 else "Method not allowed"
        return APIError(status, f"{message}: {request.method} {request.url.path}", code="not_found" if status == 404 else
                        "method_not_allowed").response()

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", get_model, methods=["GET"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/admin/adapters", admin_list, methods=["GET"]),
        Route("/admin/adapters", admin_load, methods=["POST"]),
        Route("/admin/adapters/{name}/unload", admin_unload, methods=["POST"]),
        Route("/admin/adapters/{name}", admin_delete, methods=["DELETE"]),
    ]
    s.admin_routes = admin
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={404: not_found_route, 405: not_found_route})
    app.state.server = s
    return app


class LoadBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    source: str | None = None  # a folder on the server, or a registry repo id (ns/name)
    owner: str | None = None
    public: bool = False
    revision: str | None = None


async def _wait_or_disconnect(request: Request, handles) -> list[Completion] | None:
    """All results, or None (and every request cancelled) if the client went away first."""
    results = asyncio.ensure_future(asyncio.gather(*(h.aresult() for h in handles)))

    async def disconnected():
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait([results, watch], return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not results.done():
            for h in handles:
                h.cancel()
        watch.cancel()
    if not results.done():
        results.cancel()
        return None
    return results.result()


def _prompts(prompt) -> list:
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    if not prompt:
        raise APIError(400, "The prompt is empty.", param="prompt")
    return list(prompt)


def _reason(done: Completion) -> str:
    return "length" if done.finish_reason == "length" else "stop"


def _usage(results: list[Completion]) -> dict[str, int]:
    p = sum(d.prompt_tokens for d in results)
    c = sum(d.completion_tokens for d in results)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


# ----------------------------------------------------------------------------- building a server


def build_server(
    zoo,
    *,
    base_name: str,
    adapters_dir=None,
    keys_file=None,
    tenants: Tenants | None = None,
    max_batch: int = 32,
    max_queue: int = 256,
    max_host: int | None = None,
    registry_endpoint: str | None = None,
    registry_token: str | None = None,
    registry_namespace: str | None = None,
    default_max_tokens: int = 16,
    drain_timeout: float = 30.0,
) -> Server:
    """Engine + router + tenants + metrics around a loaded `Zoo`."""
    if tenants is None:
        tenants = Tenants.from_keys_file(keys_file)
    metrics = ServeMetrics()
    router = Router(zoo, adapters_dir=adapters_dir, registry_endpoint=registry_endpoint, registry_token=registry_token,
                    registry_namespace=registry_namespace, max_host=max_host, tenants=tenants, metrics=metrics)
    engine = Engine(zoo, max_batch=max_batch, max_queue=max_queue, resolver=router, metrics=metrics)
    return Server(engine, router, tenants, metrics, base_name, default_max_tokens=default_max_tokens,
                  drain_timeout=drain_timeout)


def serve(app: Starlette, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning",
          drain_timeout: float = 30.0) -> None:
    """Run with uvicorn until SIGINT/SIGTERM; running requests are drained before exit."""
    import signal

    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=drain_timeout,
                            lifespan="on")
    # uvicorn handles SIGTERM (stop accepting, finish open requests, run the lifespan shutdown that
    # drains the engine) and then raises it again for the previous handler: make that a clean exit.
    stopped = []
    previous = signal.signal(signal.SIGTERM, lambda *_: stopped.append(True))
    try:
        uvicorn.Server(config).run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    log.info("server stopped%s", " (SIGTERM)" if stopped else "")
