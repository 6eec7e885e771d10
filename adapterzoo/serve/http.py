"""The OpenAI-compatible HTTP server (Starlette), in front of one `Engine` and its `Router`.

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
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import re
import threading
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from ..adapter import check_name
from ..errors import AdapterExistsError, AdapterZooError, BatchError, InvalidConfigError, InvalidNameError, UnknownAdapterError
from .engine import (
    MAX_LOGPROBS,
    AdapterLoadError,
    Completion,
    ContextLengthError,
    Engine,
    EngineClosedError,
    MaxTokensError,
    QueueFullError,
    RequestFailedError,
    render_chat,  # noqa: F401 - re-exported for users of the HTTP layer
)
from .metrics import ServeMetrics
from .router import Router
from .tenants import Tenant, Tenants

log = logging.getLogger("adapterzoo.serve")

MAX_BODY_BYTES = 4 * 2**20  # default request body limit (--max-body-bytes)
MAX_JSON_DEPTH = 32  # deeper JSON is refused before validation (no recursion blow-ups)
MAX_CHOICES = 16  # n at most
BODY_TIMEOUT = 30.0  # seconds for a whole request body to arrive (then 408)
MAX_STOP_CHARS = 256  # characters per stop sequence at most
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


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


class ClientGone(Exception):
    """The client went away while sending its body: nothing to answer, nothing to log."""


#: The model id that routes each request to the adapter that fits its prompt (adapterzoo/routing.py).
AUTO_MODEL = "auto"


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
        return APIError(503, str(exc), type="server_error", code="shutting_down", headers={"Retry-After": "5"})
    if isinstance(exc, AdapterLoadError):
        return APIError(500, str(exc), type="server_error", param="model", code="adapter_load_failed")
    if isinstance(exc, RequestFailedError):
        return APIError(500, str(exc), type="server_error", code="request_failed")
    if isinstance(exc, AdapterExistsError):
        return APIError(409, str(exc), code="adapter_exists")
    if isinstance(exc, (BatchError, InvalidConfigError, InvalidNameError)):
        return APIError(400, str(exc), param=param, code="invalid_value")
    if isinstance(exc, AdapterZooError):
        return APIError(500, str(exc), type="server_error")
    log.exception("unexpected error", exc_info=exc)
    return APIError(500, f"internal error: {type(exc).__name__}", type="server_error")


_ABSOLUTE_PATH = re.compile(r"(?<![\w:/.>])(?:[A-Za-z]:)?(?:[/\\][^\s/\\'\"`:,()<>]+){2,}[/\\]?")


def redact_paths(message: str, roots: dict[str, str]) -> str:
    """A message for a tenant: known server folders replaced by their role (`<adapters>`), any
    other absolute path by `<path>`. Tenants never learn where the server keeps its files."""
    for path, label in sorted(roots.items(), key=lambda kv: -len(kv[0])):
        if path and len(path) > 1:
            message = message.replace(path, label)
    return _ABSOLUTE_PATH.sub("<path>", message)


# ----------------------------------------------------------------------------- request bodies


class _Strict(BaseModel):
    # strict: JSON types are taken as they are ("stream": "yes" and "max_tokens": true are 400s);
    # unknown fields are an error (a typo must not be ignored)
    model_config = ConfigDict(extra="forbid", strict=True)


class _Body(_Strict):
    """Fields shared by both endpoints. Fields OpenAI defines that this server does not implement
    are accepted only at their do-nothing values."""

    model: str = Field(max_length=256)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0)  # an extension (vLLM's), pass it with extra_body
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM's extensions (pass them with extra_body)
    repetition_penalty: float = Field(default=1.0, gt=0, le=2)
    min_tokens: int = Field(default=0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = Field(default=None, max_length=64)

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        items = [v] if isinstance(v, str) else (v or [])
        if len(items) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(len(s) > MAX_STOP_CHARS for s in items):
            # the engine holds back any output tail that may start a stop sequence, scanning up to
            # the stop's length for every row and token: a long stop slows every tenant's step
            raise ValueError(f"each stop sequence may have at most {MAX_STOP_CHARS} characters")
        return v

    def unsupported(self) -> None:
        if self.logit_bias:
            raise APIError(400, "`logit_bias` is not supported by this server (leave it at its default)",
                           param="logit_bias", code="unsupported_parameter")
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options can only be given when stream is true", param="stream_options",
                           code="invalid_value")
        if self.stream_options is not None and set(self.stream_options) - {"include_usage"}:
            raise APIError(400, "stream_options supports only include_usage", param="stream_options", code="invalid_value")
        if self.stream_options is not None and not isinstance(self.stream_options.get("include_usage", False), bool):
            raise APIError(400, "stream_options.include_usage must be true or false", param="stream_options",
                           code="invalid_value")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise APIError(400, f"min_tokens ({self.min_tokens}) is over max_tokens ({self.max_tokens})",
                           param="min_tokens", code="invalid_value")

    def logprobs_asked(self) -> int | None:  # pragma: no cover - each endpoint says
        return None


class CompletionBody(_Body):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = None
    suffix: str | None = None

    def unsupported(self) -> None:
        super().unsupported()
        for field, ok in (("echo", not self.echo), ("best_of", self.best_of in (None, 1, self.n)),
                          ("suffix", not self.suffix)):
            if not ok:
                raise APIError(400, f"`{field}` is not supported by this server", param=field, code="unsupported_parameter")

    def logprobs_asked(self) -> int | None:
        return self.logprobs


class _Part(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[_Part] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""

    def for_template(self) -> dict[str, str]:
        # OpenAI's "developer" role is its newer name for "system"; chat templates know "system"
        return {"role": "system" if self.role == "developer" else self.role, "content": self.text()}


class ChatBody(_Body):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None

    def unsupported(self) -> None:
        super().unsupported()
        fmt = (self.response_format or {}).get("type", "text")
        for field, ok in (("response_format", fmt == "text"), ("tools", not self.tools),
                          ("tool_choice", self.tool_choice in (None, "none"))):
            if not ok:
                raise APIError(400, f"`{field}` is not supported by this server", param=field, code="unsupported_parameter")
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs set to true", param="top_logprobs", code="invalid_value")

    def logprobs_asked(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class TokenizeBody(_Strict):
    model: str = Field(max_length=256)
    prompt: str | None = None
    messages: list[Message] | None = None
    add_special_tokens: bool = False  # this server's completions add none
    add_generation_prompt: bool = True


class DetokenizeBody(_Strict):
    model: str = Field(max_length=256)
    tokens: list[int]


class LoadBody(_Strict):
    name: str
    source: str | None = None  # a folder inside the adapters folder, or a repo id on the configured registry
    owner: str | None = None
    public: bool = False
    revision: str | None = None


class LoraLoadBody(_Strict):  # vLLM's /v1/load_lora_adapter
    lora_name: str
    lora_path: str
    load_inplace: bool = False


class LoraUnloadBody(_Strict):  # vLLM's /v1/unload_lora_adapter
    lora_name: str
    lora_int_id: int | None = None


def check_json(value: Any) -> None:
    """Refuse JSON nested deeper than `MAX_JSON_DEPTH` and strings with lone surrogates
    ("\\ud800" is valid JSON but no tokenizer can encode it). Iterative: no recursion to blow."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise APIError(400, f"The JSON body is nested deeper than {MAX_JSON_DEPTH} levels.", code="invalid_json")
        if isinstance(item, str):
            _check_text(item)
        elif isinstance(item, dict):
            for k, v in item.items():
                _check_text(k)
                stack.append((v, depth + 1))
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)


def _check_text(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, "The request holds a string with a lone UTF-16 surrogate (such as \\ud800), which is not "
                            "valid Unicode; send well-formed text.", code="invalid_json") from None


def parse_json(raw: bytes) -> Any:
    try:
        data = json.loads(raw)
    except RecursionError:
        raise APIError(400, f"The JSON body is nested deeper than {MAX_JSON_DEPTH} levels.", code="invalid_json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"We could not parse the JSON body of your request ({exc}). The request body must be "
                            "valid JSON.", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
    check_json(data)
    return data


def validate(data: dict, model: type[BaseModel]) -> BaseModel:
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


def parse_body(raw: bytes, model: type[BaseModel]) -> BaseModel:
    return validate(parse_json(raw), model)


# ----------------------------------------------------------------------------- the app


class Server:
    """State behind the routes: engine, router, tenants, metrics, the base's name, limits."""

    def __init__(self, engine: Engine, router: Router, tenants: Tenants, metrics: ServeMetrics, base_name: str, *,
                 default_max_tokens: int = 16, chat_max_tokens: int = 512, drain_timeout: float = 30.0,
                 max_body_bytes: int = MAX_BODY_BYTES, max_prompt_chars: int | None = None,
                 body_timeout: float = BODY_TIMEOUT):
        self.engine, self.router, self.tenants, self.metrics = engine, router, tenants, metrics
        self.base_name = base_name
        self.default_max_tokens = default_max_tokens
        self.chat_max_tokens = chat_max_tokens
        self.drain_timeout = drain_timeout
        self.max_body_bytes = max_body_bytes
        self.body_timeout = body_timeout
        # characters are checked before tokenizing: a token is rarely over 32 characters, so a
        # longer prompt could never fit the context anyway
        context = getattr(engine, "context_length", None)
        self.max_prompt_chars = max_prompt_chars or (32 * context if context else 1_000_000)
        self.created = int(time.time())
        self.admin_routes = True
        self.path_labels = self._path_labels()

    def _path_labels(self) -> dict[str, str]:
        labels: dict[str, str] = {}
        for folder, label in ((self.router.adapters_dir, "<adapters>"), (self.router.spill_dir, "<adapters>/.spill")):
            if folder is not None:
                labels[str(folder)] = label
                labels[str(Path(folder).resolve())] = label
        try:
            from huggingface_hub import constants

            labels[str(constants.HF_HUB_CACHE)] = "<cache>"
        except Exception:  # noqa: BLE001 - no cache path to hide
            pass
        return labels

    def redact(self, message: str) -> str:
        return redact_paths(message, self.path_labels)

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
        return self.admin_key(request)

    def admin_key(self, request: Request) -> Tenant:
        """The caller, if its key is an admin's (or the server is open); else 401/403."""
        tenant = self.tenant(request)
        if not (tenant.admin or self.tenants.open_access):
            raise APIError(403, "This key may not use the admin routes.", type="permission_error", code="forbidden")
        return tenant

    def adapter_for(self, model: str, tenant: Tenant) -> str | None:
        """The adapter a request's `model` names (None: the base). The name is checked as a name
        before any lookup: '/', '\\\\' and '..' are refused, never resolved as a path."""
        if model == self.base_name:
            return None
        try:
            check_name(model)
        except InvalidNameError as exc:
            raise APIError(400, str(exc), param="model", code="invalid_value") from None
        if not self.router.visible(model, tenant.name):
            raise not_found(model)
        return model

    def route_auto(self, prompts: list, chat: bool, tenant: Tenant) -> str | None:
        """model="auto": the adapter, of those `tenant` may use, that fits the prompt (None: the
        base). Adapters still on disk count too: their routing examples are read from their
        config (adapterzoo/routing.py), and the chosen one loads as if it had been named."""
        from ..routing import METADATA_KEY, read_routing_record, route

        if len(prompts) != 1:
            raise APIError(400, "model 'auto' routes one prompt per request; send the prompts in separate requests, "
                                "or name the model", param="prompt", code="invalid_value")
        if chat:
            said = [m.get("content") for m in prompts[0] if m.get("role") == "user"]
            text = said[-1] if said else ""
        else:
            text = prompts[0]
        if not isinstance(text, str) or not text.strip():
            raise APIError(400, "model 'auto' needs a text prompt to route (token ids or an empty prompt cannot be "
                                "routed); name the model instead", param="prompt", code="invalid_value")
        zoo = getattr(self.router, "zoo", None)
        if zoo is None:
            raise APIError(501, "model 'auto' is not available on this deployment; name the model", type="server_error",
                           code="not_implemented")
        records = {}
        for entry in self.router.models(tenant.name):
            loaded = zoo.find_adapter(entry.name)
            record = (loaded.metadata.get(METADATA_KEY) if loaded is not None
                      else read_routing_record(entry.path) if entry.path is not None else None)
            if isinstance(record, dict):
                records[entry.name] = record
        return route(zoo, [text], records=records)[0].adapter if records else None

    def rate_limit(self, tenant: Tenant, cost: int = 1) -> None:
        """Each prompt and choice of a request counts: one request with 256 prompts costs 256."""
        if self.tenants.allow_request(tenant, cost):
            return
        self.metrics.rejected("rate_limit")
        burst = tenant.burst or max(1.0, tenant.rps or 1)
        if cost > burst:
            raise APIError(429, f"This request has {cost} prompts and choices, over tenant {tenant.name!r}'s burst of "
                                f"{burst:g}; send at most {int(burst)} per request.", type="requests",
                           code="rate_limit_exceeded", headers={"Retry-After": "1"})
        raise APIError(429, f"Rate limit reached for tenant {tenant.name!r} ({tenant.rps:g} prompts per second); "
                            "retry after a moment.", type="requests", code="rate_limit_exceeded",
                       headers={"Retry-After": "1"})

    async def read_json(self, request: Request, model: type[BaseModel]) -> BaseModel:
        """The body, read up to `max_body_bytes` (413 beyond: the declared length is checked
        before reading), parsed and validated off the event loop when it is big."""
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise self._too_large()
        chunks, size = [], 0
        try:  # the whole body within body_timeout: a client dribbling bytes cannot hold a connection for ever
            async with asyncio.timeout(self.body_timeout):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > self.max_body_bytes:
                        raise self._too_large()
                    chunks.append(chunk)
        except ClientDisconnect:
            raise ClientGone() from None
        except TimeoutError:
            raise APIError(408, f"The request body did not arrive within {self.body_timeout:g} seconds; send it at "
                                "once.",
                           code="request_timeout", headers={"Connection": "close"}) from None
        raw = b"".join(chunks)
        if len(raw) > 64 * 1024:
            data = await asyncio.to_thread(parse_json, raw)
        else:
            data = parse_json(raw)
        return validate(data, model)

    def _too_large(self) -> APIError:
        return APIError(413, f"The request body is over this server's limit of {self.max_body_bytes} bytes; send a "
                             "shorter prompt (or ask the operator for a higher --max-body-bytes).",
                        code="request_too_large")

    def check_call_size(self, rows: int) -> None:
        """A call of more prompts x choices than the queue (or a tenant's share of it) can ever
        hold is a 400 before tokenizing: the engine would build every request, then refuse them all."""
        limits = [getattr(self.engine, "max_queue", None), getattr(self.engine, "max_queue_per_tenant", None)]
        most = min((m for m in limits if m), default=None)
        if most is not None and rows > most:
            raise APIError(400, f"This call asks for {rows} completions (prompts x n); this server queues at most "
                                f"{most} per call. Send fewer prompts or a smaller n per request.", param="n",
                           code="invalid_value")

    def check_prompt_sizes(self, prompts: list, chat: bool) -> None:
        """Prompt sizes, before tokenizing: characters for text, ids for token lists."""
        context = getattr(self.engine, "context_length", None)
        for prompt in prompts:
            if chat:
                # the role counts too: every message renders at least its role, so 20,000 empty
                # messages are 80,000 characters, not 0 that slip past the cap into the template
                size = sum(len(m["role"]) + len(m["content"]) for m in prompt)
            elif isinstance(prompt, str):
                size = len(prompt)
            else:
                if context and len(prompt) >= context:
                    raise APIError(400, f"The prompt has {len(prompt)} tokens, but this model's context length is "
                                        f"{context}; shorten the prompt.", param="prompt", code="context_length_exceeded")
                continue
            if size > self.max_prompt_chars:
                raise APIError(400, f"The prompt has {size} characters; this server takes at most "
                                    f"{self.max_prompt_chars} before tokenizing (more could not fit the context). "
                                    "Shorten the prompt.", param="messages" if chat else "prompt",
                               code="context_length_exceeded")

    def sampling(self, body: _Body) -> dict[str, Any]:
        return {"temperature": body.temperature, "top_p": body.top_p, "top_k": body.top_k, "seed": body.seed,
                "stop": body.stop,  # a string, a list or None: SamplingParams takes each
                "presence_penalty": body.presence_penalty, "frequency_penalty": body.frequency_penalty,
                "repetition_penalty": body.repetition_penalty, "min_tokens": body.min_tokens,
                "ignore_eos": body.ignore_eos, "stop_token_ids": tuple(body.stop_token_ids or ()),
                "logprobs": body.logprobs_asked()}

    def model_card(self, name: str, owner: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": self.created, "owned_by": owner}

    @property
    def tokenizer(self):
        """The base's tokenizer (501 where this process has none: a Ray Serve ingress)."""
        tokenizer = getattr(self.engine, "tokenizer", None)
        if tokenizer is None:
            raise APIError(501, "This route needs the base's tokenizer, which the Ray Serve ingress does not load.",
                           type="server_error", code="not_implemented")
        return tokenizer

    def token_text(self, token: int) -> str:
        return self.tokenizer.decode([token])


def create_app(server: Server, *, admin: bool = True) -> Starlette:
    """The ASGI app. `admin=False` (Ray Serve's ingress, where adapters live in the replicas)
    answers 501 on the admin routes."""
    s = server

    def timed(route: str):
        tenant_facing = not route.startswith("/admin") and route not in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter")

        def wrap(fn):
            async def endpoint(request: Request) -> Response:
                given = request.headers.get("x-request-id", "")
                request.state.request_id = given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
                try:
                    response = await fn(request)
                except ClientGone:  # an aborted upload: nobody to answer, nothing worth a log line
                    response = Response(status_code=499)
                except Exception as exc:  # noqa: BLE001 - every error leaves as OpenAI-shaped JSON
                    error = api_error(exc)
                    if tenant_facing:
                        error.message = s.redact(error.message)
                    response = error.response()
                response.headers["X-Request-Id"] = request.state.request_id
                if getattr(request.state, "adapter", None):
                    response.headers["X-Adapterzoo-Adapter"] = request.state.adapter
                s.metrics.http(route, response.status_code)
                return response

            return endpoint

        return wrap

    @timed("/health")
    async def health(request: Request) -> Response:
        stuck = s.engine.stuck() if hasattr(s.engine, "stuck") else []
        running = s.engine.running
        healthy = s.engine.healthy() if hasattr(s.engine, "healthy") else running
        status = "ok" if healthy else "stopping" if not running else "unhealthy"
        return JSONResponse({"status": status, "base": s.base_name, **s.engine.stats(), "stuck": len(stuck),
                             "adapters": s.router.residency()}, status_code=200 if healthy else 503)

    @timed("/metrics")
    async def metrics(request: Request) -> Response:
        s.admin_key(request)  # the labels name every tenant's adapters (also on a Ray ingress)
        data, content_type = s.metrics.render()
        return Response(data, media_type=content_type)

    @timed("/v1/models")
    async def list_models(request: Request) -> Response:
        tenant = s.tenant(request)
        data = [s.model_card(s.base_name, "adapterzoo")]
        for entry in await asyncio.to_thread(s.router.models, tenant.name):
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
        body = await s.read_json(request, ChatBody if chat else CompletionBody)
        body.unsupported()
        auto = body.model == AUTO_MODEL and body.model != s.base_name  # routed below, once the prompt is read
        adapter = None if auto else s.adapter_for(body.model, tenant)
        if chat:
            prompts = [[m.for_template() for m in body.messages]]
            max_tokens = body.max_completion_tokens or body.max_tokens
            param = "messages"
        else:
            prompts = _prompts(body.prompt)
            max_tokens = body.max_tokens or s.default_max_tokens
            param = "prompt"
        s.check_prompt_sizes(prompts, chat)
        if auto:  # the response's `model` (and X-Adapterzoo-Adapter) names the adapter chosen
            adapter = await asyncio.to_thread(s.route_auto, prompts, chat, tenant)
            body.model = request.state.adapter = adapter or s.base_name
        s.check_call_size(len(prompts) * body.n)
        s.rate_limit(tenant, cost=len(prompts) * body.n)
        loop = asyncio.get_running_loop()
        try:  # tokenizing (and rendering the chat template) runs off the event loop
            handles = await asyncio.to_thread(
                s.engine.submit_call, prompts, adapter, chat=chat, max_tokens=max_tokens,
                chat_max_tokens=s.chat_max_tokens, sampling=s.sampling(body), n=body.n, tenant=tenant.name, loop=loop,
                request_id=request.state.request_id)
        except BaseException as exc:
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
        usage = _usage(results, body.n)
        created = int(time.time())
        if chat:
            return JSONResponse({
                "id": rid, "object": "chat.completion", "created": created, "model": body.model,
                "system_fingerprint": results[0].replica,
                "choices": [{"index": i, "message": {"role": "assistant", "content": d.text},
                             "logprobs": _chat_logprobs(s, d), "finish_reason": _reason(d)}
                            for i, d in enumerate(results)],
                "usage": usage,
            })
        return JSONResponse({
            "id": rid, "object": "text_completion", "created": created, "model": body.model,
            "system_fingerprint": results[0].replica,
            "choices": [{"index": i, "text": d.text, "logprobs": _completion_logprobs(s, d), "finish_reason": _reason(d)}
                        for i, d in enumerate(results)],
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

        def chunk(i: int, text: str | None, reason: str | None, role: bool = False, logprobs: Any = None) -> str:
            if chat:
                delta: dict[str, Any] = {}
                if role:
                    delta["role"] = "assistant"
                if text is not None:
                    delta["content"] = text
                choice = {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
                obj = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": body.model, "choices": [choice]}
            else:
                choice = {"index": i, "text": text or "", "logprobs": logprobs, "finish_reason": reason}
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
                        if value.finish_reason == "error":  # e.g. past the drain timeout: say so, then end
                            err = api_error(value.error, param)
                            err.message = s.redact(err.message)
                            yield f"data: {json.dumps(err.body())}\n\n"
                        else:
                            # a choice's logprobs come whole with its last chunk: text deltas hold back
                            # partial characters and stop prefixes, so they do not map onto tokens
                            logprobs = (_chat_logprobs if chat else _completion_logprobs)(s, value)
                            yield chunk(i, None if chat else "", _reason(value), logprobs=logprobs)
                if include_usage:
                    usage = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                             "created": created, "model": body.model, "choices": [], "usage": _usage(finished, body.n)}
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

    # -- vLLM's tokenizer routes
    @timed("/tokenize")
    async def tokenize(request: Request) -> Response:
        tenant = s.tenant(request)
        body = await s.read_json(request, TokenizeBody)
        s.adapter_for(body.model, tenant)
        s.rate_limit(tenant)  # tokenizing takes a thread of the pool every tenant's completions use
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "Give either prompt or messages.", param="prompt", code="invalid_value")
        chat = body.messages is not None
        prompt = [m.for_template() for m in body.messages] if chat else body.prompt
        s.check_prompt_sizes([prompt], chat)
        tokenizer = s.tokenizer

        def encode() -> list[int]:
            text = prompt
            if chat:
                text = (render_chat(tokenizer, prompt) if body.add_generation_prompt else
                        tokenizer.apply_chat_template(prompt, tokenize=False) if getattr(tokenizer, "chat_template", None)
                        else "".join(f"{m['role']}: {m['content']}\n" for m in prompt))
            return tokenizer(text, add_special_tokens=body.add_special_tokens)["input_ids"]

        ids = await asyncio.to_thread(encode)
        return JSONResponse({"count": len(ids), "max_model_len": s.engine.context_length, "tokens": ids,
                             "token_strs": None})

    @timed("/detokenize")
    async def detokenize(request: Request) -> Response:
        tenant = s.tenant(request)
        body = await s.read_json(request, DetokenizeBody)
        s.adapter_for(body.model, tenant)
        s.rate_limit(tenant)
        tokenizer = s.tokenizer
        if len(body.tokens) > s.engine.context_length * 4:
            raise APIError(400, f"At most {s.engine.context_length * 4} tokens per call.", param="tokens",
                           code="invalid_value")
        for t in body.tokens:
            try:
                s.engine.check_token(t, "tokens")
            except BatchError as exc:
                raise APIError(400, str(exc), param="tokens", code="invalid_value") from None
        text = await asyncio.to_thread(tokenizer.decode, body.tokens)
        return JSONResponse({"prompt": text})

    # -- admin
    @timed("/admin/adapters")
    async def admin_list(request: Request) -> Response:
        s.admin(request)
        await asyncio.to_thread(s.router.rescan)
        return JSONResponse({"object": "list", "data": [s.router.describe(n) for n in sorted(s.router.catalog)],
                             "residency": s.router.residency()})

    async def _admin_add(name: str, source: str | None, **options: Any) -> None:
        if name in (s.base_name, AUTO_MODEL):  # requests naming these never look up an adapter
            raise APIError(400, f"The name {name!r} is reserved (the base's name and {AUTO_MODEL!r} are taken before "
                                "any adapter lookup, so no request could reach it); choose another name.",
                           param="name", code="invalid_value")
        if source is not None:
            try:
                source = s.router.admin_source(source)
            except InvalidNameError as exc:
                raise APIError(400, str(exc), param="source", code="source_not_allowed") from None
        try:
            await asyncio.to_thread(s.router.add, name, source, **options)
        except Exception as exc:  # noqa: BLE001
            if isinstance(exc, UnknownAdapterError):
                raise APIError(404, str(exc), param="source", code="adapter_not_found") from None
            if isinstance(exc, AdapterZooError) and not isinstance(exc, AdapterExistsError):
                raise APIError(400, f"could not load {name!r}: {exc}", param="source", code="adapter_load_failed") from None
            raise api_error(exc) from None

    @timed("/admin/adapters")
    async def admin_load(request: Request) -> Response:
        s.admin(request)
        body = await s.read_json(request, LoadBody)
        await _admin_add(body.name, body.source, owner=body.owner, public=body.public, revision=body.revision)
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

    @timed("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request) -> Response:
        s.admin(request)
        body = await s.read_json(request, LoraLoadBody)
        await _admin_add(body.lora_name, body.lora_path)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @timed("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request) -> Response:
        s.admin(request)
        body = await s.read_json(request, LoraUnloadBody)
        try:
            await asyncio.to_thread(s.router.delete, body.lora_name)
        except UnknownAdapterError as exc:
            raise APIError(404, str(exc), param="lora_name", code="adapter_not_found") from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

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
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/detokenize", detokenize, methods=["POST"]),
        Route("/v1/load_lora_adapter", load_lora_adapter, methods=["POST"]),
        Route("/v1/unload_lora_adapter", unload_lora_adapter, methods=["POST"]),
        Route("/admin/adapters", admin_list, methods=["GET"]),
        Route("/admin/adapters", admin_load, methods=["POST"]),
        Route("/admin/adapters/{name}/unload", admin_unload, methods=["POST"]),
        Route("/admin/adapters/{name}", admin_delete, methods=["DELETE"]),
    ]
    s.admin_routes = admin
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={404: not_found_route, 405: not_found_route})
    app.state.server = s
    return app


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
        # the gather ends with its children's CancelledError: retrieve it, or asyncio logs a
        # traceback for every client that disconnects
        results.add_done_callback(lambda f: f.cancelled() or f.exception())
        return None
    return results.result()


def _prompts(prompt) -> list:
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    if not prompt:
        raise APIError(400, "The prompt is empty.", param="prompt", code="invalid_value")
    return list(prompt)


def _reason(done: Completion) -> str:
    return "length" if done.finish_reason == "length" else "stop"


def _usage(results: list[Completion], n: int = 1) -> dict[str, int]:
    p = sum(d.prompt_tokens for d in results[::n])  # the n choices of a prompt share it
    c = sum(d.completion_tokens for d in results)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _completion_logprobs(s: Server, done: Completion) -> dict[str, Any] | None:
    """The legacy completions shape: parallel lists of tokens, logprobs, top alternatives, offsets."""
    if done.logprobs is None:
        return None
    tokens = [s.token_text(lp.token) for lp in done.logprobs]
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in done.logprobs],
            "top_logprobs": [{s.token_text(t): v for t, v in lp.top} for lp in done.logprobs],
            "text_offset": offsets}


def _chat_logprobs(s: Server, done: Completion) -> dict[str, Any] | None:
    """The chat shape: one entry per token, with its bytes and its top alternatives."""
    if done.logprobs is None:
        return None

    def entry(token: int, logprob: float) -> dict[str, Any]:
        text = s.token_text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8", "replace"))}

    return {"content": [{**entry(lp.token, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                        for lp in done.logprobs], "refusal": None}


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
    max_body_bytes: int = MAX_BODY_BYTES,
    max_prompt_chars: int | None = None,
    max_queue_per_tenant: int | None = None,
    max_rows_per_tenant: int | None = None,
    stuck_after: float = 60.0,
    body_timeout: float = BODY_TIMEOUT,
) -> Server:
    """Engine + router + tenants + metrics around a loaded `Zoo`.

    Fair shares by default when the keys file has more than one tenant: a tenant may fill at most
    half the queue, and at most all but an eighth of the batch's rows (those stay free, so another
    tenant's request joins at the next step, not after a flood)."""
    if tenants is None:
        tenants = Tenants.from_keys_file(keys_file)
    shared = len(tenants.tenants) > 1
    if max_queue_per_tenant is None and shared:
        max_queue_per_tenant = max(1, max_queue // 2)
    if max_rows_per_tenant is None and shared:
        max_rows_per_tenant = max(1, max_batch - max(1, max_batch // 8))
    metrics = ServeMetrics()
    router = Router(zoo, adapters_dir=adapters_dir, registry_endpoint=registry_endpoint, registry_token=registry_token,
                    registry_namespace=registry_namespace, max_host=max_host, tenants=tenants, metrics=metrics)
    engine = Engine(zoo, max_batch=max_batch, max_queue=max_queue, resolver=router, metrics=metrics,
                    max_queue_per_tenant=max_queue_per_tenant, max_rows_per_tenant=max_rows_per_tenant,
                    stuck_after=stuck_after)
    return Server(engine, router, tenants, metrics, base_name, default_max_tokens=default_max_tokens,
                  drain_timeout=drain_timeout, max_body_bytes=max_body_bytes, max_prompt_chars=max_prompt_chars,
                  body_timeout=body_timeout)


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
            "admin routes (load, delete). Give --keys keys.yaml, bind 127.0.0.1, or pass --open to accept this.")
    return ("WARNING: no --keys file: this server is OPEN. Anyone who can reach it may generate with every adapter, "
            "read /metrics and use the admin routes (load, unload, delete adapters).")


def serve(app: Starlette, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning",
          drain_timeout: float = 30.0) -> None:
    """Run with uvicorn until SIGINT/SIGTERM; running requests are drained before exit.

    On the signal the engine starts draining at once (new requests get 503); past
    `drain_timeout` what is left fails with `EngineClosedError`, which each handler still answers
    (a JSON 503, or an SSE error event and `[DONE]`) within uvicorn's grace period."""
    import signal

    import uvicorn

    engine = app.state.server.engine

    class DrainingServer(uvicorn.Server):
        draining = False

        def handle_exit(self, sig, frame) -> None:
            if not DrainingServer.draining:
                DrainingServer.draining = True
                threading.Thread(target=engine.stop, args=(True, drain_timeout), name="adapterzoo-drain",
                                 daemon=True).start()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=drain_timeout + 5,
                            lifespan="on")
    # uvicorn handles SIGTERM (stop accepting, finish open requests, run the lifespan shutdown that
    # drains the engine) and then raises it again for the previous handler: make that a clean exit.
    stopped = []
    previous = signal.signal(signal.SIGTERM, lambda *_: stopped.append(True))
    try:
        DrainingServer(config).run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    log.info("server stopped%s", " (SIGTERM)" if stopped else "")
