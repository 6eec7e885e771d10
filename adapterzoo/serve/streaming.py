"""How a generation call answers: one JSON object, or server-sent events ending in `data: [DONE]`.

A streaming call waits for the first event of each choice before it answers, so an error before
any token keeps its status code; an error after that is an SSE error event, then `[DONE]`. A
client that goes away cancels every request of its call, which frees their rows and caches.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import StreamingResponse

from .engine import Completion
from .schemas import api_error


def finish_reason(done: Completion) -> str:
    return "length" if done.finish_reason == "length" else "stop"


def usage(results: list[Completion], n: int = 1) -> dict:
    p = sum(d.prompt_tokens for d in results[::n])  # the n choices of a prompt share it
    c = sum(d.completion_tokens for d in results)
    cached = sum(d.cached_tokens for d in results[::n])
    # prompt tokens served from the prefix cache, where OpenAI (and vLLM) report them
    return {
        "prompt_tokens": p,
        "completion_tokens": c,
        "total_tokens": p + c,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def event(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj)}\n\n"


@dataclass
class Reply:
    """The answer of one call: its id, its `model`, chat or text, n choices per prompt, and how
    a token id reads (for logprobs)."""

    rid: str
    model: str
    chat: bool
    n: int
    token_text: Callable[[int], str]
    created: int = field(default_factory=lambda: int(time.time()))

    def whole(self, results: list[Completion]) -> dict[str, Any]:
        """The `chat.completion` or `text_completion` object of a finished call."""
        if self.chat:
            choices = [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": d.text},
                    "logprobs": self.logprobs(d),
                    "finish_reason": finish_reason(d),
                }
                for i, d in enumerate(results)
            ]
        else:
            choices = [
                {"index": i, "text": d.text, "logprobs": self.logprobs(d), "finish_reason": finish_reason(d)}
                for i, d in enumerate(results)
            ]
        return {
            "id": self.rid,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": results[0].replica,
            "choices": choices,
            "usage": usage(results, self.n),
        }

    def chunk(
        self, i: int, text: str | None, reason: str | None = None, role: bool = False, logprobs: Any = None
    ) -> str:
        """One SSE event of choice `i`: a text delta, or (with `reason`) its last chunk."""
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
        else:
            choice = {"index": i, "text": text or "", "logprobs": logprobs, "finish_reason": reason}
        return event({**self._head(), "choices": [choice]})

    def usage_chunk(self, finished: list[Completion]) -> str:
        return event({**self._head(), "choices": [], "usage": usage(finished, self.n)})

    def _head(self) -> dict[str, Any]:
        return {
            "id": self.rid,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
        }

    def logprobs(self, done: Completion) -> dict[str, Any] | None:
        if done.logprobs is None:
            return None
        return self._chat_logprobs(done) if self.chat else self._text_logprobs(done)

    def _text_logprobs(self, done: Completion) -> dict[str, Any]:
        """The legacy completions shape: parallel lists of tokens, logprobs, top alternatives, offsets."""
        tokens = [self.token_text(lp.token) for lp in done.logprobs]
        offsets, at = [], 0
        for t in tokens:
            offsets.append(at)
            at += len(t)
        return {
            "tokens": tokens,
            "token_logprobs": [lp.logprob for lp in done.logprobs],
            "top_logprobs": [{self.token_text(t): v for t, v in lp.top} for lp in done.logprobs],
            "text_offset": offsets,
        }

    def _chat_logprobs(self, done: Completion) -> dict[str, Any]:
        """The chat shape: one entry per token, with its bytes and its top alternatives."""

        def entry(token: int, logprob: float) -> dict[str, Any]:
            text = self.token_text(token)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8", "replace"))}

        return {
            "content": [
                {**entry(lp.token, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                for lp in done.logprobs
            ],
            "refusal": None,
        }


async def wait_or_disconnect(request: Request, handles) -> list[Completion] | None:
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


async def stream(
    handles, reply: Reply, *, include_usage: bool, param: str, redact: Callable[[str], str]
) -> StreamingResponse:
    """Server-sent events for `handles` (one per prompt and choice), once each choice has begun."""
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

    try:
        pending = await _first_events(queue, len(handles), param)
    except BaseException:  # an error before any token (raised: it keeps its status code), or a cancel
        cancel_all()
        raise
    reply.created = int(time.time())

    async def events():
        finished: list[Completion] = []
        try:
            if reply.chat:
                for i in range(len(handles)):
                    yield reply.chunk(i, "", role=True)
            while len(finished) < len(handles):
                i, kind, value = pending.pop(0) if pending else await queue.get()
                if kind == "delta":
                    yield reply.chunk(i, value)
                    continue
                finished.append(value)
                if value.finish_reason == "error":  # e.g. past the drain timeout: say so, then end
                    err = api_error(value.error, param)
                    err.message = redact(err.message)
                    yield event(err.body())
                else:  # a choice's logprobs come whole with its last chunk: text deltas hold back partial
                    # characters and stop prefixes, so they do not map onto tokens
                    yield reply.chunk(
                        i, None if reply.chat else "", finish_reason(value), logprobs=reply.logprobs(value)
                    )
            if include_usage:
                yield reply.usage_chunk(finished)
            yield "data: [DONE]\n\n"
        finally:  # also on disconnect (the task is cancelled): free the rows and caches now
            cancel_all()

    return StreamingResponse(
        events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


async def _first_events(queue: asyncio.Queue, choices: int, param: str) -> list[tuple[int, str, Any]]:
    """The events up to the first of each choice; an error among them is raised."""
    first: list[tuple[int, str, Any]] = []
    started: set[int] = set()
    while len(started) < choices:
        i, kind, value = await queue.get()
        first.append((i, kind, value))
        started.add(i)
        if kind == "done" and value.finish_reason == "error":
            raise api_error(value.error, param)
    return first
