"""What the routes check before any work: the caller's key, the model it names (or, for
`model="auto"`, the adapter that fits the prompt), its rate, the call's size and its prompts'
sizes. Each reads the app's state (`http.create_app`) and raises `APIError` with the answer; none
changes anything but the rate limiter's tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel
from starlette.datastructures import State
from starlette.requests import Request

from ..adapter import check_name
from ..errors import APIError, InvalidNameError
from .schemas import not_found, read_body, redact_paths
from .tenants import Tenant


def path_labels(adapters) -> dict[str, str]:
    """The server's folders, and the role a tenant reads in an error message instead of each."""
    labels: dict[str, str] = {}
    for folder, label in ((adapters.adapters_dir, "<adapters>"), (adapters.spill_dir, "<adapters>/.spill")):
        if folder is not None:
            labels[str(folder)] = label
            labels[str(Path(folder).resolve())] = label
    try:
        from huggingface_hub import constants

        labels[str(constants.HF_HUB_CACHE)] = "<cache>"
    except Exception:  # noqa: BLE001 - no cache path to hide
        pass
    return labels


def redact(state: State, message: str) -> str:
    return redact_paths(message, state.path_labels)


def authenticate(request: Request) -> Tenant:
    header = request.headers.get("authorization", "")
    key = header[7:].strip() if header.lower().startswith("bearer ") else None
    tenant = request.app.state.tenants.authenticate(key)
    if tenant is None:
        if not key:
            raise APIError(
                401,
                "You didn't provide an API key. You need to provide your API key in an Authorization "
                "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                code="invalid_api_key",
            )
        raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")
    return tenant


def require_admin(request: Request) -> Tenant:
    """The caller of an admin route: an admin's key, on a server that has the admin routes."""
    if not request.app.state.admin_routes:
        raise APIError(
            501,
            "The admin routes are not available on a Ray Serve deployment; restart the deployment "
            "with a changed adapters folder instead.",
            type="server_error",
            code="not_implemented",
        )
    return require_admin_key(request)


def require_admin_key(request: Request) -> Tenant:
    """The caller, if its key is an admin's (or the server is open); else 401/403."""
    tenant = authenticate(request)
    if not (tenant.admin or request.app.state.tenants.open_access):
        raise APIError(403, "This key may not use the admin routes.", type="permission_error", code="forbidden")
    return tenant


def adapter_for(state: State, model: str, tenant: Tenant) -> str | None:
    """The adapter a request's `model` names (None: the base). The name is checked as a name
    before any lookup: '/', '\\\\' and '..' are refused, never resolved as a path."""
    if model == state.config.base_name:
        return None
    try:
        check_name(model)
    except InvalidNameError as exc:
        raise APIError(400, str(exc), param="model", code="invalid_value") from None
    if not state.adapters.visible(model, tenant.name):
        raise not_found(model)
    return model


def rate_limit(state: State, tenant: Tenant, cost: int = 1) -> None:
    """Each prompt and choice of a request counts: one request with 256 prompts costs 256."""
    if state.tenants.allow_request(tenant, cost):
        return
    state.metrics.rejected("rate_limit")
    burst = tenant.burst or max(1.0, tenant.rps or 1)
    if cost > burst:
        raise APIError(
            429,
            f"This request has {cost} prompts and choices, over tenant {tenant.name!r}'s burst of "
            f"{burst:g}; send at most {int(burst)} per request.",
            type="requests",
            code="rate_limit_exceeded",
            headers={"Retry-After": "1"},
        )
    raise APIError(
        429,
        f"Rate limit reached for tenant {tenant.name!r} ({tenant.rps:g} prompts per second); retry after a moment.",
        type="requests",
        code="rate_limit_exceeded",
        headers={"Retry-After": "1"},
    )


async def read_json(request: Request, model: type[BaseModel]) -> Any:
    config = request.app.state.config
    return await read_body(request, model, max_bytes=config.max_body_bytes, timeout=config.body_timeout)


def check_call_size(engine, rows: int) -> None:
    """A call of more prompts x choices than the queue (or a tenant's share of it) can ever
    hold is a 400 before tokenizing: the engine would build every request, then refuse them all."""
    limits = [getattr(engine, "max_queue", None), getattr(engine, "max_queue_per_tenant", None)]
    most = min((m for m in limits if m), default=None)
    if most is not None and rows > most:
        raise APIError(
            400,
            f"This call asks for {rows} completions (prompts x n); this server queues at most "
            f"{most} per call. Send fewer prompts or a smaller n per request.",
            param="n",
            code="invalid_value",
        )


def check_prompt_sizes(state: State, prompts: list, chat: bool) -> None:
    """Prompt sizes, before tokenizing: characters for text, ids for token lists."""
    context = getattr(state.engine, "context_length", None)
    for prompt in prompts:
        if chat:
            # the role counts too: every message renders at least its role, so 20,000 empty
            # messages are 80,000 characters, not 0 that slip past the cap into the template
            size = sum(len(m["role"]) + len(m["content"]) for m in prompt)
        elif isinstance(prompt, str):
            size = len(prompt)
        else:
            if context and len(prompt) >= context:
                raise APIError(
                    400,
                    f"The prompt has {len(prompt)} tokens, but this model's context length is "
                    f"{context}; shorten the prompt.",
                    param="prompt",
                    code="context_length_exceeded",
                )
            continue
        if size > state.max_prompt_chars:
            raise APIError(
                400,
                f"The prompt has {size} characters; this server takes at most "
                f"{state.max_prompt_chars} before tokenizing (more could not fit the context). "
                "Shorten the prompt.",
                param="messages" if chat else "prompt",
                code="context_length_exceeded",
            )


def tokenizer_of(engine):
    """The base's tokenizer (501 where this process has none: a Ray Serve ingress)."""
    tokenizer = getattr(engine, "tokenizer", None)
    if tokenizer is None:
        raise APIError(
            501,
            "This route needs the base's tokenizer, which the Ray Serve ingress does not load.",
            type="server_error",
            code="not_implemented",
        )
    return tokenizer


def token_text(engine, token: int) -> str:
    return tokenizer_of(engine).decode([token])


def model_card(state: State, name: str, owner: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": state.created, "owned_by": owner}


def route_auto(state: State, prompts: list, chat: bool, tenant: Tenant) -> str | None:
    """model="auto": the adapter, of those `tenant` may use, that fits the prompt (None: the
    base). Adapters still on disk count too: their routing examples are read from their
    config (adapterzoo/routing.py), and the chosen one loads as if it had been named."""
    from ..routing import METADATA_KEY, read_routing_record, route

    if len(prompts) != 1:
        raise APIError(
            400,
            "model 'auto' routes one prompt per request; send the prompts in separate requests, or name the model",
            param="prompt",
            code="invalid_value",
        )
    if chat:
        said = [m.get("content") for m in prompts[0] if m.get("role") == "user"]
        text = said[-1] if said else ""
    else:
        text = prompts[0]
    if not isinstance(text, str) or not text.strip():
        raise APIError(
            400,
            "model 'auto' needs a text prompt to route (token ids or an empty prompt cannot be "
            "routed); name the model instead",
            param="prompt",
            code="invalid_value",
        )
    zoo = getattr(state.adapters, "zoo", None)
    if zoo is None:
        raise APIError(
            501,
            "model 'auto' is not available on this deployment; name the model",
            type="server_error",
            code="not_implemented",
        )
    # the tenant's own adapters first: on an exact tie the router keeps the first listed, so a
    # public adapter that copies a tenant's routing examples cannot take its traffic by sorting earlier
    entries = sorted(state.adapters.models(tenant.name), key=lambda e: state.adapters.owner(e.name) != tenant.name)
    records = {}
    for entry in entries:
        loaded = zoo.find_adapter(entry.name)
        record = (
            loaded.metadata.get(METADATA_KEY)
            if loaded is not None
            else read_routing_record(entry.path)
            if entry.path is not None
            else None
        )
        if isinstance(record, dict):
            records[entry.name] = record
    return route(zoo, [text], records=records)[0].adapter if records else None
