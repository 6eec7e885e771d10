"""The OpenAI-compatible HTTP server (Starlette), in front of one `Engine` and its adapter `Tiers`.

Routes:

- `GET /v1/models`, `GET /v1/models/{id}`: the base and the adapters the caller's tenant may use;
- `POST /v1/completions`, `POST /v1/chat/completions` (chat template from the base's tokenizer),
  with `"stream": true` as server-sent events ending in `data: [DONE]`;
- `POST /tokenize`, `POST /detokenize` (vLLM's): the ids this server would use for a prompt;
- `GET /admin/adapters`, `POST /admin/adapters` (load), `POST /admin/adapters/{id}/unload`,
  `DELETE /admin/adapters/{id}`, and vLLM's `POST /v1/load_lora_adapter`,
  `POST /v1/unload_lora_adapter`: admin keys only;
- `GET /metrics` (Prometheus; admin keys only), `GET /health`.

`model` is an adapter name or the base's name. Errors have OpenAI's JSON shape
`{"error": {"message", "type", "param", "code"}}`: 400 for bad input (malformed JSON, wrong JSON
types, unknown fields, values out of range, prompts over the context length), 401 without a valid
key, 404 for an adapter that does not exist or belongs to another tenant (the same answer for
both), 413 for a body over the size limit, 429 over a tenant's rate or queue share, 500 when an
adapter cannot be loaded or a request fails on its own, 503 while shutting down.

Every request is checked before any work: the body's size while it is read, its JSON depth and
strings, its types (strictly: `"stream": "yes"` is a 400, not true), the model name as a name
(never a path), prompt sizes before tokenizing; tokenizing runs off the event loop. A streaming
request waits for its first token (or its error) before answering, so errors keep their status
code; a client that disconnects cancels its request, which frees its row and cache.

The handlers are module-level functions that read `request.app.state`, which `create_app` fills
from a `server.Server` (engine, adapter tiers, tenants, metrics and its `config.ServeConfig`). Request
bodies and error answers are in `schemas.py`, the checks every route shares in `checks.py`, the
answers of the generation routes (whole or streamed) in `streaming.py`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import threading
import time
import uuid
from contextlib import asynccontextmanager
from functools import partial
from typing import Any
from urllib.parse import quote

from starlette.applications import Starlette
from starlette.datastructures import State
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from ..errors import (
    AdapterExistsError,
    AdapterZooError,
    APIError,
    BatchError,
    InvalidConfigError,
    InvalidNameError,
    UnknownAdapterError,
)
from .checks import (
    adapter_for,
    authenticate,
    check_call_size,
    check_prompt_sizes,
    model_card,
    path_labels,
    rate_limit,
    read_json,
    redact,
    require_admin,
    require_admin_key,
    route_auto,
    token_text,
    tokenizer_of,
)
from .engine import render_chat
from .schemas import (  # noqa: F401 - Message and redact_paths re-exported for users of the HTTP layer
    ChatBody,
    ClientGone,
    CompletionBody,
    DetokenizeBody,
    LoadBody,
    LoraLoadBody,
    LoraUnloadBody,
    Message,
    TokenizeBody,
    api_error,
    redact_paths,
)
from .server import Server, build_server  # noqa: F401 - build_server re-exported: tests and notebooks build here
from .streaming import Reply, stream, wait_or_disconnect

log = logging.getLogger("adapterzoo.serve")

REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
CHAT_MAX_TOKENS = 512  # a chat request's max_tokens when it gives none
#: The model id that routes each request to the adapter that fits its prompt (adapterzoo/routing.py).
AUTO_MODEL = "auto"
#: what X-Adapterzoo-Adapter keeps as is (printable ASCII but '%'); the rest is percent-encoded.
#: Adapter names are plain ASCII, but the base's name is BASE's folder name by default: 模型 (not
#: Latin-1, as headers are) made a 500, a CR LF in --name a dropped connection.
HEADER_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")
#: routes only admins call: their errors may name the server's paths
ADMIN_ROUTES = ("/admin", "/v1/load_lora_adapter", "/v1/unload_lora_adapter")


# ----------------------------------------------------------------------------- the app


def create_app(server: Server, *, admin: bool = True) -> Starlette:
    """The ASGI app around `server`'s parts. `admin=False` (Ray Serve's ingress, where adapters
    live in the replicas) answers 501 on the admin routes."""
    app = Starlette(routes=_routes(), lifespan=_lifespan, exception_handlers={404: _unknown_route, 405: _unknown_route})
    state = app.state
    state.engine, state.adapters, state.tenants = server.engine, server.adapters, server.tenants
    state.metrics, state.config = server.metrics, server.config
    state.admin_routes = admin
    state.created = int(time.time())
    state.path_labels = path_labels(server.adapters)
    # characters are checked before tokenizing: a token is rarely over 32 characters, so a longer
    # prompt could never fit the context anyway
    context = getattr(server.engine, "context_length", None)
    state.max_prompt_chars = server.config.max_prompt_chars or (32 * context if context else 1_000_000)
    return app


def _routes() -> list[Route]:
    return [
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", get_model, methods=["GET"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/detokenize", detokenize, methods=["POST"]),
        Route("/v1/load_lora_adapter", load_lora_adapter, methods=["POST"]),
        Route("/v1/unload_lora_adapter", unload_lora_adapter, methods=["POST"]),
        Route("/admin/adapters", admin_list, methods=["GET"]),
        Route("/admin/adapters", admin_load, methods=["POST"]),
        Route("/admin/adapters/{name}/unload", admin_unload, methods=["POST"]),
        Route("/admin/adapters/{name}", admin_delete, methods=["DELETE"]),
    ]


@asynccontextmanager
async def _lifespan(app: Starlette):
    app.state.engine.start()
    try:
        yield
    finally:  # uvicorn stops accepting and waits for open requests first; then drain what is left
        await asyncio.to_thread(app.state.engine.stop, True, app.state.config.drain_timeout)
        await asyncio.to_thread(app.state.adapters.close)


async def _unknown_route(request: Request, exc: Exception) -> Response:
    status = getattr(exc, "status_code", 404)
    message = "Unknown route" if status == 404 else "Method not allowed"
    return error_response(
        APIError(
            status,
            f"{message}: {request.method} {request.url.path}",
            code="not_found" if status == 404 else "method_not_allowed",
        )
    )


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def timed(route: str):
    """A handler's wrapper: the request id, every error as OpenAI-shaped JSON (server paths
    hidden from tenants), the adapter header, and the request counted under `route`."""
    tenant_facing = not route.startswith(ADMIN_ROUTES)

    def wrap(handler):
        async def endpoint(request: Request) -> Response:
            given = request.headers.get("x-request-id", "")
            request.state.request_id = given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
            try:
                response = await handler(request)
            except ClientGone:  # an aborted upload: nobody to answer, nothing worth a log line
                response = Response(status_code=499)
            except Exception as exc:  # noqa: BLE001 - every error leaves as OpenAI-shaped JSON
                error = api_error(exc)
                if tenant_facing:
                    error.message = redact(request.app.state, error.message)
                response = error_response(error)
            response.headers["X-Request-Id"] = request.state.request_id
            if getattr(request.state, "adapter", None):
                response.headers["X-Adapterzoo-Adapter"] = quote(request.state.adapter, safe=HEADER_SAFE)
            request.app.state.metrics.http(route, response.status_code)
            return response

        return endpoint

    return wrap


# ----------------------------------------------------------------------------- status and models


@timed("/health")
async def health(request: Request) -> Response:
    state = request.app.state
    engine = state.engine
    stuck = engine.stuck() if hasattr(engine, "stuck") else []
    running = engine.running
    healthy = engine.healthy() if hasattr(engine, "healthy") else running
    status = "ok" if healthy else "stopping" if not running else "unhealthy"
    return JSONResponse(
        {
            "status": status,
            "base": state.config.base_name,
            **engine.stats(),
            "stuck": len(stuck),
            "adapters": state.adapters.residency(),
        },
        status_code=200 if healthy else 503,
    )


@timed("/metrics")
async def metrics(request: Request) -> Response:
    require_admin_key(request)  # the labels name every tenant's adapters (also on a Ray ingress)
    data, content_type = request.app.state.metrics.render()
    return Response(data, media_type=content_type)


@timed("/v1/models")
async def list_models(request: Request) -> Response:
    state = request.app.state
    tenant = authenticate(request)
    rate_limit(state, tenant)  # listing rescans the adapters folder (64 ms at 2,000) in the shared thread pool
    data = [model_card(state, state.config.base_name, "adapterzoo")]
    for entry in await asyncio.to_thread(state.adapters.models, tenant.name):
        data.append(model_card(state, entry.name, state.adapters.owner(entry.name) or "public"))
    return JSONResponse({"object": "list", "data": data})


@timed("/v1/models/{model}")
async def get_model(request: Request) -> Response:
    state = request.app.state
    tenant = authenticate(request)
    model = request.path_params["model"]
    if adapter_for(state, model, tenant) is None:
        return JSONResponse(model_card(state, model, "adapterzoo"))
    return JSONResponse(model_card(state, model, state.adapters.owner(model) or "public"))


# ----------------------------------------------------------------------------- generation


@timed("/v1/completions")
async def completions(request: Request) -> Response:
    return await _generate(request, chat=False)


@timed("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    return await _generate(request, chat=True)


async def _generate(request: Request, chat: bool) -> Response:
    state = request.app.state
    tenant = authenticate(request)
    body = await read_json(request, ChatBody if chat else CompletionBody)
    body.unsupported()
    auto = body.model == AUTO_MODEL and body.model != state.config.base_name  # routed below, once the prompt is read
    adapter = None if auto else adapter_for(state, body.model, tenant)
    if chat:
        prompts, param = [[m.for_template() for m in body.messages]], "messages"
        max_tokens = body.max_completion_tokens or body.max_tokens
    else:
        prompts, param = _prompts(body.prompt), "prompt"
        max_tokens = body.max_tokens or state.config.default_max_tokens
    check_prompt_sizes(state, prompts, chat)
    check_call_size(state.engine, len(prompts) * body.n)
    rate_limit(state, tenant, cost=len(prompts) * body.n)
    # routed only once the call is allowed: routing rescans the adapters folder, reads every
    # visible adapter's routing record and runs MiniLM, which a throttled tenant must not buy
    if auto:  # the response's `model` (and X-Adapterzoo-Adapter) names the adapter chosen
        adapter = await asyncio.to_thread(route_auto, state, prompts, chat, tenant)
        body.model = request.state.adapter = adapter or state.config.base_name
    loop = asyncio.get_running_loop()
    try:  # tokenizing (and rendering the chat template) runs off the event loop
        handles = await asyncio.to_thread(
            state.engine.submit_call,
            prompts,
            adapter,
            chat=chat,
            max_tokens=max_tokens,
            chat_max_tokens=CHAT_MAX_TOKENS,
            sampling=body.sampling(),
            n=body.n,
            tenant=tenant.name,
            loop=loop,
            request_id=request.state.request_id,
        )
    except BaseException as exc:
        raise api_error(exc, param) from None
    reply = Reply(
        ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24],
        body.model,
        chat,
        body.n,
        token_text=partial(token_text, state.engine),
    )
    if body.stream:  # `created`: when the first events are in
        return await stream(
            handles,
            reply,
            include_usage=bool((body.stream_options or {}).get("include_usage")),
            param=param,
            redact=partial(redact, state),
        )
    results = await wait_or_disconnect(request, handles)
    if results is None:
        return Response(status_code=499)
    for done in results:
        if done.finish_reason == "error":
            raise api_error(done.error, param)
    reply.created = int(time.time())  # when the results are in
    return JSONResponse(reply.whole(results))


def _prompts(prompt) -> list:
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    if not prompt:
        raise APIError(400, "The prompt is empty.", param="prompt", code="invalid_value")
    return list(prompt)


# ----------------------------------------------------------------------------- vLLM's tokenizer routes


@timed("/tokenize")
async def tokenize(request: Request) -> Response:
    state = request.app.state
    tenant = authenticate(request)
    body = await read_json(request, TokenizeBody)
    adapter_for(state, body.model, tenant)
    rate_limit(state, tenant)  # tokenizing takes a thread of the pool every tenant's completions use
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "Give either prompt or messages.", param="prompt", code="invalid_value")
    chat = body.messages is not None
    prompt = [m.for_template() for m in body.messages] if chat else body.prompt
    check_prompt_sizes(state, [prompt], chat)
    tokenizer = tokenizer_of(state.engine)

    def encode() -> list[int]:
        text = prompt
        if chat:
            text = (
                render_chat(tokenizer, prompt)
                if body.add_generation_prompt
                else tokenizer.apply_chat_template(prompt, tokenize=False)
                if getattr(tokenizer, "chat_template", None)
                else "".join(f"{m['role']}: {m['content']}\n" for m in prompt)
            )
        return tokenizer(text, add_special_tokens=body.add_special_tokens)["input_ids"]

    ids = await asyncio.to_thread(encode)
    return JSONResponse(
        {"count": len(ids), "max_model_len": state.engine.context_length, "tokens": ids, "token_strs": None}
    )


@timed("/detokenize")
async def detokenize(request: Request) -> Response:
    state = request.app.state
    tenant = authenticate(request)
    body = await read_json(request, DetokenizeBody)
    adapter_for(state, body.model, tenant)
    rate_limit(state, tenant)
    tokenizer, engine = tokenizer_of(state.engine), state.engine
    if len(body.tokens) > engine.context_length * 4:
        raise APIError(
            400, f"At most {engine.context_length * 4} tokens per call.", param="tokens", code="invalid_value"
        )
    for t in body.tokens:
        try:
            engine.check_token(t, "tokens")
        except BatchError as exc:
            raise APIError(400, str(exc), param="tokens", code="invalid_value") from None
    text = await asyncio.to_thread(tokenizer.decode, body.tokens)
    return JSONResponse({"prompt": text})


# ----------------------------------------------------------------------------- admin


@timed("/admin/adapters")
async def admin_list(request: Request) -> Response:
    require_admin(request)
    tiers = request.app.state.adapters
    await asyncio.to_thread(tiers.rescan)
    return JSONResponse(
        {"object": "list", "data": [tiers.describe(n) for n in sorted(tiers.catalog)], "residency": tiers.residency()}
    )


@timed("/admin/adapters")
async def admin_load(request: Request) -> Response:
    require_admin(request)
    body = await read_json(request, LoadBody)
    await _admin_add(
        request.app.state, body.name, body.source, owner=body.owner, public=body.public, revision=body.revision
    )
    return JSONResponse(request.app.state.adapters.describe(body.name), status_code=201)


async def _tiers_action(request: Request, action: str, name: str, param: str | None = None) -> bool:
    """`Tiers.unload` or `Tiers.delete` off the event loop: True when done, False when pending
    (the adapter is still in use); an unknown adapter is a 404."""
    try:
        return await asyncio.to_thread(getattr(request.app.state.adapters, action), name)
    except UnknownAdapterError as exc:
        raise APIError(404, str(exc), param=param, code="adapter_not_found") from None


@timed("/admin/adapters/{name}/unload")
async def admin_unload(request: Request) -> Response:
    require_admin(request)
    name = request.path_params["name"]
    done = await _tiers_action(request, "unload", name)
    return JSONResponse({"id": name, "status": "unloaded" if done else "pending"}, status_code=200 if done else 202)


@timed("/admin/adapters/{name}")
async def admin_delete(request: Request) -> Response:
    require_admin(request)
    name = request.path_params["name"]
    done = await _tiers_action(request, "delete", name)
    return JSONResponse(
        {"id": name, "deleted": True, "status": "deleted" if done else "pending"}, status_code=200 if done else 202
    )


@timed("/v1/load_lora_adapter")
async def load_lora_adapter(request: Request) -> Response:
    require_admin(request)
    body = await read_json(request, LoraLoadBody)
    await _admin_add(request.app.state, body.lora_name, body.lora_path)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@timed("/v1/unload_lora_adapter")
async def unload_lora_adapter(request: Request) -> Response:
    require_admin(request)
    body = await read_json(request, LoraUnloadBody)
    await _tiers_action(request, "delete", body.lora_name, param="lora_name")
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


async def _admin_add(state: State, name: str, source: str | None, **options: Any) -> None:
    if name in (state.config.base_name, AUTO_MODEL):  # requests naming these never look up an adapter
        raise APIError(
            400,
            f"The name {name!r} is reserved (the base's name and {AUTO_MODEL!r} are taken before "
            "any adapter lookup, so no request could reach it); choose another name.",
            param="name",
            code="invalid_value",
        )
    if source is not None:
        try:
            source = state.adapters.admin_source(source)
        except InvalidNameError as exc:
            raise APIError(400, str(exc), param="source", code="source_not_allowed") from None
    try:
        await asyncio.to_thread(state.adapters.add, name, source, **options)
    except Exception as exc:  # noqa: BLE001
        if isinstance(exc, UnknownAdapterError):
            raise APIError(404, str(exc), param="source", code="adapter_not_found") from None
        if isinstance(exc, AdapterZooError) and not isinstance(exc, AdapterExistsError):
            raise APIError(400, f"could not load {name!r}: {exc}", param="source", code="adapter_load_failed") from None
        raise api_error(exc) from None


# ----------------------------------------------------------------------------- running it


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_open_mode(open_access: bool, host: str, allow_open: bool) -> str | None:
    """Without a keys file anyone may call every route, admin ones included. Returns the warning
    to print; refuses (InvalidConfigError) a bind beyond loopback unless `--open` says so."""
    if not open_access:
        return None
    if not is_loopback(host) and not allow_open:
        raise InvalidConfigError(
            f"refusing to serve without --keys on {host}: anyone who can reach it could use every adapter and the "
            "admin routes (load, delete). Give --keys keys.yaml, bind 127.0.0.1, or pass --open to accept this."
        )
    return (
        "WARNING: no --keys file: this server is OPEN. Anyone who can reach it may generate with every adapter, "
        "read /metrics and use the admin routes (load, unload, delete adapters)."
    )


def serve(
    app: Starlette, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning", drain_timeout: float = 30.0
) -> None:
    """Run with uvicorn until SIGINT/SIGTERM; running requests are drained before exit.

    On the signal the engine starts draining at once (new requests get 503); past
    `drain_timeout` what is left fails with `EngineClosedError`, which each handler still answers
    (a JSON 503, or an SSE error event and `[DONE]`) within uvicorn's grace period."""
    import signal

    import uvicorn

    engine = app.state.engine

    class DrainingServer(uvicorn.Server):
        draining = False

        def handle_exit(self, sig, frame) -> None:
            if not DrainingServer.draining:
                DrainingServer.draining = True
                threading.Thread(
                    target=engine.stop, args=(True, drain_timeout), name="adapterzoo-drain", daemon=True
                ).start()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=drain_timeout + 5, lifespan="on"
    )
    # uvicorn handles SIGTERM (stop accepting, finish open requests, run the lifespan shutdown that
    # drains the engine) and then raises it again for the previous handler: make that a clean exit.
    stopped = []
    previous = signal.signal(signal.SIGTERM, lambda *_: stopped.append(True))
    try:
        DrainingServer(config).run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    log.info("server stopped%s", " (SIGTERM)" if stopped else "")
