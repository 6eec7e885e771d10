"""The wire format of the OpenAI-compatible API: request bodies, their checks, and error answers.

Every request is checked before any work: the body's size while it is read (`read_body`), its
JSON depth and strings (`parse_json`), its types strictly (`"stream": "yes"` is a 400, not true)
and its fields (`validate`: an unknown field is a 400, a typo is never ignored). Errors from the
engine and the tiers become OpenAI-shaped answers in `api_error`; messages for tenants lose the
server's paths in `redact_paths`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.requests import ClientDisconnect, Request

from ..errors import (
    AdapterExistsError,
    AdapterZooError,
    APIError,
    BatchError,
    ClientGone,
    InvalidConfigError,
    InvalidNameError,
    UnknownAdapterError,
)
from .engine import (
    MAX_LOGPROBS,
    AdapterLoadError,
    ContextLengthError,
    EngineClosedError,
    MaxTokensError,
    QueueFullError,
    RequestFailedError,
)

log = logging.getLogger("adapterzoo.serve")

MAX_JSON_DEPTH = 32  # deeper JSON is refused before validation (no recursion blow-ups)
MAX_CHOICES = 16  # n at most
MAX_STOP_CHARS = 256  # characters per stop sequence at most


# ----------------------------------------------------------------------------- errors


def not_found(model: str) -> APIError:
    return APIError(
        404,
        f"The model `{model}` does not exist or you do not have access to it.",
        param="model",
        code="model_not_found",
    )


def api_error(exc: BaseException, param: str | None = None) -> APIError:
    """The HTTP answer for an exception from the engine or the tiers."""
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
            raise APIError(
                400,
                "`logit_bias` is not supported by this server (leave it at its default)",
                param="logit_bias",
                code="unsupported_parameter",
            )
        if self.stream_options is not None and not self.stream:
            raise APIError(
                400,
                "stream_options can only be given when stream is true",
                param="stream_options",
                code="invalid_value",
            )
        if self.stream_options is not None and set(self.stream_options) - {"include_usage"}:
            raise APIError(
                400, "stream_options supports only include_usage", param="stream_options", code="invalid_value"
            )
        if self.stream_options is not None and not isinstance(self.stream_options.get("include_usage", False), bool):
            raise APIError(
                400, "stream_options.include_usage must be true or false", param="stream_options", code="invalid_value"
            )
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise APIError(
                400,
                f"min_tokens ({self.min_tokens}) is over max_tokens ({self.max_tokens})",
                param="min_tokens",
                code="invalid_value",
            )

    def sampling(self) -> dict[str, Any]:
        """The engine's `SamplingParams` fields of this request."""
        return {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "seed": self.seed,
            "stop": self.stop,  # a string, a list or None: SamplingParams takes each
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "repetition_penalty": self.repetition_penalty,
            "min_tokens": self.min_tokens,
            "ignore_eos": self.ignore_eos,
            "stop_token_ids": tuple(self.stop_token_ids or ()),
            "logprobs": self.logprobs_asked(),
        }

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
        for field, ok in (
            ("echo", not self.echo),
            ("best_of", self.best_of in (None, 1, self.n)),
            ("suffix", not self.suffix),
        ):
            if not ok:
                raise APIError(
                    400, f"`{field}` is not supported by this server", param=field, code="unsupported_parameter"
                )

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
        for field, ok in (
            ("response_format", fmt == "text"),
            ("tools", not self.tools),
            ("tool_choice", self.tool_choice in (None, "none")),
        ):
            if not ok:
                raise APIError(
                    400, f"`{field}` is not supported by this server", param=field, code="unsupported_parameter"
                )
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
        raise APIError(
            400,
            "The request holds a string with a lone UTF-16 surrogate (such as \\ud800), which is not "
            "valid Unicode; send well-formed text.",
            code="invalid_json",
        ) from None


def parse_json(raw: bytes) -> Any:
    try:
        data = json.loads(raw)
    except RecursionError:
        raise APIError(
            400, f"The JSON body is nested deeper than {MAX_JSON_DEPTH} levels.", code="invalid_json"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(
            400,
            f"We could not parse the JSON body of your request ({exc}). The request body must be valid JSON.",
            code="invalid_json",
        ) from None
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
            raise APIError(
                400, f"Unrecognized request argument supplied: {param}", param=param, code="unknown_parameter"
            ) from None
        if err.get("type") == "missing":
            raise APIError(
                400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter"
            ) from None
        raise APIError(
            400, f"Invalid value for '{param}': {err.get('msg')}", param=param, code="invalid_value"
        ) from None


def parse_body(raw: bytes, model: type[BaseModel]) -> BaseModel:
    return validate(parse_json(raw), model)


async def read_body(request: Request, model: type[BaseModel], *, max_bytes: int, timeout: float) -> BaseModel:
    """The body, read up to `max_bytes` (413 beyond: the declared length is checked before
    reading) within `timeout` seconds (408 after), parsed and validated off the event loop when it is big."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)
    chunks, size = [], 0
    try:  # the whole body within the timeout: a client dribbling bytes cannot hold a connection for ever
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_bytes:
                    raise _too_large(max_bytes)
                chunks.append(chunk)
    except ClientDisconnect:
        raise ClientGone() from None
    except TimeoutError:
        raise APIError(
            408,
            f"The request body did not arrive within {timeout:g} seconds; send it at once.",
            code="request_timeout",
            headers={"Connection": "close"},
        ) from None
    raw = b"".join(chunks)
    data = await asyncio.to_thread(parse_json, raw) if len(raw) > 64 * 1024 else parse_json(raw)
    return validate(data, model)


def _too_large(max_bytes: int) -> APIError:
    return APIError(
        413,
        f"The request body is over this server's limit of {max_bytes} bytes; send a shorter prompt "
        "(or ask the operator for a higher --max-body-bytes).",
        code="request_too_large",
    )
