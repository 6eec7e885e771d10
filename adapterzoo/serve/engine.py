"""Continuous batching: requests for any adapters join and leave a running batch at every step.

One scheduler thread owns the base, the slot pools and every KV cache. Each loop iteration:

1. runs the calls other threads queued for it (`call_between_steps`: registering a loaded
   adapter, removing one), so the modules and pools never change under a forward;
2. drops the rows of finished and cancelled requests (`batch_select_indices` on every cache
   layer, then cuts leading columns that no row uses any more);
3. admits waiting requests whose adapter is in host memory, within the batch size, the slots of
   each pool, the tenant's resident-slot limit and a prefill token budget; puts every adapter the
   batch will use into its slot (`zoo.plan` over the union, so none evicts another that is in
   use), prefills the joiners together (left-padded, their own fresh cache: soft-prompt virtual
   tokens enter here and then live in the cache), samples their first token, and merges their
   cache and mask into the running batch (left-padding the shorter side with masked zeros);
4. runs one decode step for the whole batch: one `zoo.forward` with the batch's `BatchPlan`
   (built once per membership), every row feeding its last token.

Each row keeps its own left-padded mask, and `Zoo.forward` takes positions from the mask
(+ prefix length), so a row's positions, keys and values are exactly those of a solo run:
greedy results equal `zoo.generate([prompt], [adapter])`, and seeded sampling uses a per-request
generator the same way `zoo.generate([prompt], seed=s)` does.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import math
import queue
import secrets
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch

from ..errors import AdapterZooError, BatchError, UnknownAdapterError
from ..generate import pad_token_id, sample_next

if TYPE_CHECKING:  # pragma: no cover
    from ..zoo import Zoo

log = logging.getLogger("adapterzoo.serve")


class EngineError(AdapterZooError, RuntimeError):
    """The engine could not take or finish a request."""


class QueueFullError(EngineError):
    """More requests are waiting than the engine's queue limit allows: retry later (HTTP 429)."""


class EngineClosedError(EngineError):
    """The engine is shutting down (or stopped) and takes no new requests (HTTP 503)."""


class ContextLengthError(BatchError):
    """A prompt (with its adapter's virtual tokens) plus max_tokens does not fit the base's context."""


class MaxTokensError(ContextLengthError):
    """max_tokens alone is over the base's context length."""


class AdapterLoadError(EngineError):
    """The adapter a request names could not be loaded (corrupt file, registry down, ...)."""

    @classmethod
    def wrap(cls, name: str | None, exc: BaseException) -> BaseException:
        """What a request for adapter `name` fails with when loading it raised `exc`: an
        `UnknownAdapterError` as it is (404), anything else as an `AdapterLoadError` (500)."""
        if isinstance(exc, UnknownAdapterError):
            return exc
        return cls(f"adapter {name!r} could not be loaded: {exc}")


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. temperature 0 (the default) is greedy."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()  # also accepts one string, any sequence of strings, or None
    ignore_eos: bool = False  # always generate max_tokens (benchmarks)

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 0:
            raise BatchError(f"max_tokens must be a non-negative integer, got {self.max_tokens!r}")
        if not (isinstance(self.temperature, (int, float)) and 0 <= self.temperature and math.isfinite(self.temperature)):
            raise BatchError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not (0 < self.top_p <= 1):
            raise BatchError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k < 0:
            raise BatchError(f"top_k must be >= 0, got {self.top_k!r}")
        stop = () if self.stop is None else (self.stop,) if isinstance(self.stop, str) else self.stop
        object.__setattr__(self, "stop", tuple(s for s in stop if s))

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


@dataclass
class Completion:
    """What a finished request produced."""

    id: str
    adapter: str | None
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length" | "cancelled" | "error"
    prompt_tokens: int
    completion_tokens: int
    ttft: float | None  # seconds from submit to the first token
    latency: float  # seconds from submit to the end
    error: BaseException | None = None
    replica: str | None = None  # which Ray Serve replica produced it (None: this process)


_ids = itertools.count(1)


class RequestHandle:
    """One submitted request: iterate its text deltas, wait for its result, or cancel it.

    Thread-safe. Pass `loop=` to `Engine.submit` to also get an asyncio view (`astream`,
    `aresult`), fed from the engine thread with `call_soon_threadsafe`.
    """

    def __init__(self, request: "Request", loop: asyncio.AbstractEventLoop | None):
        self.request = request
        self.id = request.id
        self._cond = threading.Condition()
        self._events: list[tuple[str, Any]] = []
        self._done: Completion | None = None
        self._loop = loop
        self._aqueue: asyncio.Queue | None = asyncio.Queue() if loop is not None else None
        self.cancelled = False

    # -- called by the engine thread
    def _push(self, kind: str, value: Any) -> None:
        with self._cond:
            self._events.append((kind, value))
            if kind == "done":
                self._done = value
            self._cond.notify_all()
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._aqueue.put_nowait, (kind, value))
            except RuntimeError:  # the loop is closed: nobody listens any more
                pass

    # -- consumers
    def cancel(self) -> None:
        """Stop generating; the engine frees the row and its cache at its next step."""
        self.cancelled = True
        engine = self.request.engine
        if engine is not None:
            engine._wake()

    @property
    def done(self) -> bool:
        return self._done is not None

    def result(self, timeout: float | None = None) -> Completion:
        with self._cond:
            if not self._cond.wait_for(lambda: self._done is not None, timeout):
                raise TimeoutError(f"request {self.id} did not finish within {timeout}s")
            return self._done

    def __iter__(self) -> Iterator[str]:
        """Text deltas as they are produced (blocking)."""
        i = 0
        while True:
            with self._cond:
                self._cond.wait_for(lambda: len(self._events) > i)
                kind, value = self._events[i]
            i += 1
            if kind == "delta":
                yield value
            else:
                return

    async def astream(self):
        """Async iterator of ("delta", text) and finally ("done", Completion)."""
        if self._aqueue is None:
            raise EngineError("submit the request with loop=asyncio.get_running_loop() to stream it asynchronously")
        while True:
            kind, value = await self._aqueue.get()
            yield kind, value
            if kind == "done":
                return

    async def aresult(self) -> Completion:
        async for kind, value in self.astream():
            if kind == "done":
                return value
        raise EngineError("stream ended without a result")  # pragma: no cover


@dataclass(eq=False)
class Request:
    prompt_ids: list[int]
    adapter: str | None
    params: SamplingParams
    tenant: str | None = None
    id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    # set by the engine
    engine: "Engine | None" = None
    submitted: float = 0.0
    first_token_at: float | None = None
    ready: Future | None = None  # resolves when the adapter is in host memory
    virtual: int = 0  # virtual tokens (soft prompt) that enter the cache
    prefix: int = 0  # prefix tokens (positions shift by this much)
    tokens: list[int] = field(default_factory=list)
    sent: int = 0  # characters of text already sent as deltas
    text: str = ""
    generator: torch.Generator | None = None
    handle: RequestHandle | None = None
    acquired: bool = False

    @property
    def cancelled(self) -> bool:
        return self.handle is not None and self.handle.cancelled


class Resolver:
    """Where adapters come from. This one only knows the zoo's host memory; `Router` adds tiers."""

    def __init__(self, zoo: "Zoo"):
        self.zoo = zoo

    def prepare(self, name: str, tenant: str | None = None) -> Future:
        """A future that resolves (to None) once `name` is in the zoo, or fails with why not."""
        f: Future = Future()
        try:
            self.zoo.get_adapter(name)
            f.set_result(None)
        except UnknownAdapterError as exc:
            f.set_exception(exc)
        return f

    def check(self, name: str, tenant: str | None = None) -> None:
        """Raise `UnknownAdapterError` now if `name` cannot be served."""
        self.zoo.get_adapter(name)

    def acquire(self, name: str) -> None:
        """A request now uses `name` (it must not leave host memory until released)."""

    def release(self, name: str) -> None:
        """A request no longer uses `name`."""

    def resident_limit(self, tenant: str | None) -> int | None:
        """How many distinct adapters a tenant's running requests may hold in device slots."""
        return None

    def on_device(self, name: str) -> bool:
        zoo = self.zoo
        adapter = zoo._adapters.get(name)
        pool = zoo.pools.get(adapter.pool_key) if adapter is not None else None
        return pool is not None and pool.is_current(adapter)

    def placed(self, names: Sequence[str], seconds: float) -> None:
        """`names` were copied into device slots, taking `seconds` together."""

    def attach(self, engine: "Engine") -> None:
        """The engine that uses this resolver (for work that must run between its steps)."""


class _NullMetrics:
    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *a, **k: None


class Engine:
    """Continuous batching over one `Zoo`. Start it, submit requests, stop it (draining)."""

    def __init__(
        self,
        zoo: "Zoo",
        *,
        max_batch: int = 32,
        max_queue: int = 256,
        max_prefill_tokens: int = 4096,
        resolver: Resolver | None = None,
        metrics: Any = None,
    ):
        if zoo.tokenizer is None or not zoo.is_causal_lm:
            raise EngineError("the engine needs a causal language model base with a tokenizer")
        self.zoo = zoo
        self.tokenizer = zoo.tokenizer
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.max_prefill_tokens = max_prefill_tokens
        self.resolver = resolver or Resolver(zoo)
        self.resolver.attach(self)
        self.metrics = metrics or _NullMetrics()
        config = zoo.model.config
        self.context_length = int(getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2048)
        self.eos = self.tokenizer.eos_token_id
        self.pad = pad_token_id(self.tokenizer)
        self._cond = threading.Condition()
        self._waiting: collections.deque[Request] = collections.deque()
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closing = False
        self._stopped = False
        self._calls_closed = False  # the loop has left: `call_between_steps` runs calls inline
        # the running batch (engine thread only)
        self._rows: list[Request] = []
        self._cache = None
        self._mask: torch.Tensor | None = None  # (B, L): the mask of what the cache holds
        self._next: torch.Tensor | None = None  # (B,): each row's last sampled token, fed next
        self._plan = None
        self.steps = 0
        self.tokens_generated = 0

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> "Engine":
        if self._thread is None:
            self._calls_closed = False
            # a new thread gets OpenMP's default team size whatever torch.get_num_threads() says there;
            # on a busy CPU that oversubscribes it badly (20x slower measured), so pass ours on
            self._torch_threads = torch.get_num_threads()
            self._thread = threading.Thread(target=self._loop, name="adapterzoo-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, drain: bool = True, timeout: float | None = 30.0) -> None:
        """Stop taking requests; with `drain`, finish the running and waiting ones first (up to
        `timeout` seconds, then cancel what is left)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is None:
            self._cancel_all("engine stopped")
            return
        if drain:
            deadline = None if timeout is None else time.monotonic() + timeout
            with self._cond:
                while self._waiting or self._rows:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        break
                    self._cond.wait(0.05 if left is None else min(0.05, left))
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._thread.join(timeout=30)
        self._thread = None
        self._cancel_all("engine stopped")

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._thread is not None and not self._stopped

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {"waiting": len(self._waiting), "running": len(self._rows), "steps": self.steps,
                    "tokens_generated": self.tokens_generated}

    # ------------------------------------------------------------------ submitting

    def encode(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]

    def submit(
        self,
        prompt: str | Sequence[int],
        adapter: str | None = None,
        params: SamplingParams | None = None,
        *,
        tenant: str | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        request_id: str | None = None,
    ) -> RequestHandle:
        """Queue a request; returns at once. Raises `QueueFullError`, `EngineClosedError`,
        `UnknownAdapterError` or `ContextLengthError` for a request that cannot be taken."""
        params = params or SamplingParams()
        ids = self.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not ids:
            raise BatchError("the prompt must have at least one token; got an empty prompt")
        if adapter is not None:
            self.resolver.check(adapter, tenant)
        req = Request(ids, adapter, params, tenant)
        if request_id:
            req.id = request_id
        req.engine = self
        req.submitted = time.monotonic()
        req.handle = RequestHandle(req, loop)
        if not params.greedy:
            req.generator = torch.Generator().manual_seed(params.seed if params.seed is not None else secrets.randbits(62))
        with self._cond:
            if self._closing:
                raise EngineClosedError("the server is shutting down and takes no new requests")
            if len(self._waiting) >= self.max_queue:
                self.metrics.rejected("queue_full")
                raise QueueFullError(
                    f"too many requests are waiting ({len(self._waiting)}, the limit is {self.max_queue}); retry later"
                )
            if adapter is not None:
                self.resolver.acquire(adapter)
                req.acquired = True
            try:
                self._check_length(req)
                if adapter is not None:
                    req.ready = self.resolver.prepare(adapter, tenant)
            except BaseException:
                self._release(req)
                raise
            if params.max_tokens == 0:
                self._finish(req, "length")
                return req.handle
            self._waiting.append(req)
            self.metrics.queue_depth(len(self._waiting))
            self._cond.notify_all()
        if req.ready is not None:
            req.ready.add_done_callback(lambda _f: self._wake())
        return req.handle

    def submit_request(
        self,
        prompt: str | Sequence[int] | None = None,
        adapter: str | None = None,
        *,
        messages: list[dict[str, str]] | None = None,
        max_tokens: int | None = None,
        chat_max_tokens: int = 512,
        sampling: dict[str, Any] | None = None,
        tenant: str | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> RequestHandle:
        """What the HTTP layer calls: a prompt (text or token ids) or chat `messages` (rendered with
        the base's chat template); `max_tokens=None` means what is left of the context, capped at
        `chat_max_tokens`. Raises like `submit`."""
        if messages is not None:
            prompt = render_chat(self.tokenizer, messages)
        ids = self.encode(prompt) if isinstance(prompt, str) else [int(t) for t in (prompt or [])]
        if not ids:
            raise BatchError("The prompt is empty: give at least one token.")
        if max_tokens is None:
            max_tokens = max(1, min(chat_max_tokens, self.context_length - len(ids)))
        if max_tokens > self.context_length:
            raise MaxTokensError(f"max_tokens is {max_tokens}, over this model's context length of {self.context_length}")
        params = SamplingParams(max_tokens=max_tokens, **(sampling or {}))
        return self.submit(ids, adapter, params, tenant=tenant, loop=loop)

    def generate(self, prompt: str, adapter: str | None = None, timeout: float | None = None, **params: Any) -> str:
        """Submit one request and wait for its text (a convenience for scripts and tests)."""
        return self.submit(prompt, adapter, SamplingParams(**params)).result(timeout).text

    def _check_length(self, req: Request) -> None:
        """Before the adapter is known to be loaded we only know the prompt; the virtual tokens
        are checked again at admission."""
        used = len(req.prompt_ids)
        if used >= self.context_length:
            raise ContextLengthError(
                f"the prompt has {used} tokens, but this model's context length is {self.context_length}; "
                "shorten the prompt"
            )
        if used + req.params.max_tokens > self.context_length:
            raise ContextLengthError(
                f"the prompt has {used} tokens and max_tokens is {req.params.max_tokens}, over this model's "
                f"context length of {self.context_length}; lower max_tokens to at most {self.context_length - used}"
            )

    def call_between_steps(self, fn: Callable[[], Any]) -> Future:
        """Run `fn` on the engine thread between two forwards (inline when the engine is not
        running). Used to register and remove adapters without racing a forward.

        The check and the put are one step under `_cond`, and the loop closes the queue under
        `_cond` before its last drain: a call is either queued before that drain (which runs it)
        or sees the queue closed and runs inline, never left in a queue nobody reads."""
        f: Future = Future()
        with self._cond:
            queued = (self._thread is not None and not self._calls_closed
                      and threading.current_thread() is not self._thread)
            if queued:
                self._calls.put((fn, f))
                self._cond.notify_all()
        if not queued:
            try:
                f.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                f.set_exception(exc)
        return f

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # ------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        torch.set_num_threads(self._torch_threads)
        with torch.inference_mode():
            try:
                while True:
                    self._run_calls()
                    with self._cond:
                        if self._stopped:
                            break
                        if not self._rows and not self._has_admissible():
                            self._cond.wait(0.05)
                            continue
                    try:
                        self._iteration()
                    except Exception as exc:  # noqa: BLE001 - a bug must not kill the server
                        log.exception("engine step failed; failing the running batch")
                        for req in list(self._rows):
                            self._finish(req, "error", exc)
                        self._reset_batch()
            finally:
                with self._cond:  # from here on, call_between_steps runs calls inline ...
                    self._calls_closed = True
                self._run_calls()  # ... and every call queued before is run here

    def _run_calls(self) -> None:
        while True:
            try:
                fn, f = self._calls.get_nowait()
            except queue.Empty:
                return
            if f.set_running_or_notify_cancel():
                try:
                    f.set_result(fn())
                except BaseException as exc:  # noqa: BLE001
                    f.set_exception(exc)

    def _has_admissible(self) -> bool:
        return any(r.cancelled or r.ready is None or r.ready.done() for r in self._waiting)

    def _iteration(self) -> None:
        self._drop_finished()
        joiners = self._admit()
        if joiners:
            self._join(joiners)
        if self._rows:
            self._decode()
        with self._cond:
            self.metrics.queue_depth(len(self._waiting))
            self.metrics.running(len(self._rows))
            self._cond.notify_all()  # wakes stop(drain=True)

    # -- leave
    def _drop_finished(self) -> None:
        keep = [i for i, r in enumerate(self._rows) if not (r.cancelled or r.handle.done)]
        for r in self._rows:
            if r.cancelled and not r.handle.done:
                self._finish(r, "cancelled")
        if len(keep) == len(self._rows):
            return
        if not keep:
            self._reset_batch()
            return
        self._rows = [self._rows[i] for i in keep]
        idx = torch.tensor(keep, device=self._mask.device)
        self._cache.batch_select_indices(idx)
        self._mask = self._mask.index_select(0, idx)
        self._next = self._next.index_select(0, idx)
        self._trim()
        self._plan = None

    def _trim(self) -> None:
        """Cut leading columns that no row attends to any more (they only cost time)."""
        used = self._mask.any(0).nonzero()
        first = int(used[0]) if len(used) else 0
        if first > 0:
            self._mask = self._mask[:, first:]
            for layer in self._cache.layers:
                if getattr(layer, "keys", None) is not None and layer.keys.numel():
                    layer.keys = layer.keys[..., first:, :]
                    layer.values = layer.values[..., first:, :]

    def _reset_batch(self) -> None:
        self._rows, self._cache, self._mask, self._next, self._plan = [], None, None, None, None

    # -- join
    def _admit(self) -> list[Request]:
        """Pick waiting requests that can join now, in arrival order, skipping (not waiting
        behind) those whose adapter is still loading or whose limits are reached."""
        zoo = self.zoo
        with self._cond:
            waiting = list(self._waiting)
        if not waiting:
            return []
        pools: dict[tuple, set[str]] = {}
        tenants: dict[str | None, set[str]] = {}
        for r in self._rows:
            if r.adapter is not None:
                pools.setdefault(zoo._adapters[r.adapter].pool_key, set()).add(r.adapter)
                tenants.setdefault(r.tenant, set()).add(r.adapter)
        joiners: list[Request] = []
        budget = self.max_prefill_tokens
        taken: set[int] = set()
        for req in waiting:
            # requests that need no row leave the queue even when the batch is full, so that
            # they stop counting against max_queue
            if req.cancelled:
                taken.add(id(req))
                self._finish(req, "cancelled")
                continue
            if req.ready is not None and req.ready.done() and req.ready.exception() is not None:
                taken.add(id(req))
                self._finish(req, "error", AdapterLoadError.wrap(req.adapter, req.ready.exception()))
                continue
            if len(self._rows) + len(joiners) >= self.max_batch:
                continue  # the batch is full: only the cancelled and failed (above) can leave
            if req.ready is not None and not req.ready.done():
                continue
            if req.adapter is not None:
                adapter = zoo._adapters.get(req.adapter)
                if adapter is None:  # unloaded between its load and now: fetch it again
                    req.ready = self.resolver.prepare(req.adapter, req.tenant)
                    req.ready.add_done_callback(lambda _f: self._wake())
                    continue
                req.virtual = adapter.length() if adapter.atype.kind == "prompt" else 0
                req.prefix = adapter.length() if adapter.atype.kind == "prefix" else 0
                used = req.virtual + req.prefix + len(req.prompt_ids)
                if used + req.params.max_tokens > self.context_length:
                    taken.add(id(req))
                    self._finish(req, "error", ContextLengthError(
                        f"the prompt has {len(req.prompt_ids)} tokens, adapter {req.adapter!r} adds "
                        f"{req.virtual + req.prefix} virtual tokens and max_tokens is {req.params.max_tokens}: over "
                        f"this model's context length of {self.context_length}"))
                    continue
                in_pool = pools.setdefault(adapter.pool_key, set())
                if req.adapter not in in_pool and len(in_pool) >= zoo.slots:
                    continue  # every slot of its pool is in use by the batch
                mine = tenants.setdefault(req.tenant, set())
                limit = self.resolver.resident_limit(req.tenant)
                if req.adapter not in mine and limit is not None and len(mine) >= limit:
                    continue  # the tenant holds as many slots as it may
            cost = len(req.prompt_ids) + req.virtual
            if joiners and cost > budget:
                continue
            budget -= cost
            if req.adapter is not None:
                in_pool.add(req.adapter)
                mine.add(req.adapter)
            joiners.append(req)
            taken.add(id(req))
        if taken:
            with self._cond:
                self._waiting = collections.deque(r for r in self._waiting if id(r) not in taken)
        return joiners

    def _place(self, joiners: list[Request]) -> None:
        """Every adapter the batch will use into a slot, in one `zoo.plan` call so that all of
        them are pinned together (none evicts another that is in use)."""
        names = sorted({r.adapter for r in [*self._rows, *joiners] if r.adapter is not None})
        if not names:
            return
        new = [n for n in names if not self.resolver.on_device(n)]
        if not new:
            return
        t0 = time.perf_counter()
        self.zoo.plan(names, training=False)
        self.resolver.placed(new, time.perf_counter() - t0)
        self._plan = None

    def _join(self, joiners: list[Request]) -> None:
        from transformers import DynamicCache

        try:
            self._place(joiners)
        except Exception as exc:  # noqa: BLE001
            for r in joiners:
                self._finish(r, "error", exc)
            return
        zoo = self.zoo
        width = max(len(r.prompt_ids) for r in joiners)
        ids = torch.full((len(joiners), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(joiners), width), dtype=torch.long)
        for i, r in enumerate(joiners):
            ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids):] = 1
        try:
            plan = zoo.plan([r.adapter for r in joiners], training=False)
            cache = DynamicCache(config=zoo.model.config)
            out = zoo.forward(ids.to(zoo.device), mask.to(zoo.device), plan=plan, cache=cache)
        except Exception as exc:  # noqa: BLE001
            log.exception("prefill failed")
            for r in joiners:
                self._finish(r, "error", exc)
            return
        self.metrics.prefill(int(mask.sum()))
        nxt = self._sample(joiners, out.logits[:, -1])
        alive = [i for i, r in enumerate(joiners) if self._append(r, nxt[i])]
        if not alive:
            return
        new_cache, new_mask = out.cache, out.attention_mask
        if len(alive) < len(joiners):
            idx = torch.tensor(alive, device=new_mask.device)
            new_cache.batch_select_indices(idx)
            new_mask = new_mask.index_select(0, idx)
        new_next = torch.tensor([nxt[i] for i in alive], dtype=torch.long, device=zoo.device)
        self._merge([joiners[i] for i in alive], new_cache, new_mask, new_next)

    def _merge(self, rows: list[Request], cache, mask: torch.Tensor, nxt: torch.Tensor) -> None:
        """Append rows (with their cache and mask) to the running batch, left-padding the side
        with the shorter history: padded columns are masked zeros, so positions do not move."""
        self._plan = None
        if not self._rows:
            self._rows, self._cache, self._mask, self._next = list(rows), cache, mask, nxt
            self._trim()
            return
        old_len, new_len = self._mask.shape[1], mask.shape[1]
        length = max(old_len, new_len)
        pad = torch.nn.functional.pad
        for mine, theirs in zip(self._cache.layers, cache.layers):
            k_old, v_old, k_new, v_new = mine.keys, mine.values, theirs.keys, theirs.values
            mine.keys = torch.cat([pad(k_old, (0, 0, length - old_len, 0)), pad(k_new, (0, 0, length - new_len, 0))], 0)
            mine.values = torch.cat([pad(v_old, (0, 0, length - old_len, 0)), pad(v_new, (0, 0, length - new_len, 0))], 0)
        self._mask = torch.cat([pad(self._mask, (length - old_len, 0)), pad(mask, (length - new_len, 0))], 0)
        self._next = torch.cat([self._next, nxt], 0)
        self._rows.extend(rows)
        self._trim()

    # -- decode
    def _decode(self) -> None:
        zoo = self.zoo
        if self._plan is None:
            self._plan = zoo.plan([r.adapter for r in self._rows], training=False)
        step_mask = torch.cat([self._mask, torch.ones_like(self._mask[:, :1])], 1)
        out = zoo.forward(self._next[:, None], step_mask, plan=self._plan, cache=self._cache)
        self._cache, self._mask = out.cache, step_mask
        nxt = self._sample(self._rows, out.logits[:, -1])
        self.steps += 1
        self.metrics.decode_step(len(self._rows))
        for r, t in zip(self._rows, nxt):
            self._append(r, t)
        self._next = torch.tensor(nxt, dtype=torch.long, device=zoo.device)

    def _sample(self, rows: list[Request], logits: torch.Tensor) -> list[int]:
        out = logits.argmax(-1).tolist()
        for i, r in enumerate(rows):
            if not r.params.greedy:
                p = r.params
                out[i] = int(sample_next(logits[i : i + 1], do_sample=True, temperature=p.temperature, top_k=p.top_k,
                                         top_p=p.top_p, generator=r.generator)[0])
        return out

    def _append(self, req: Request, token: int) -> bool:
        """Take one sampled token; stream what is safe to send. False when the request is done."""
        if req.first_token_at is None:
            req.first_token_at = time.monotonic()
            self.metrics.first_token(req.first_token_at - req.submitted)
        if req.cancelled:
            self._finish(req, "cancelled")
            return False
        if self.eos is not None and token == self.eos and not req.params.ignore_eos:
            self._finish(req, "stop")
            return False
        req.tokens.append(token)
        self.tokens_generated += 1
        # the whole output, decoded again: exactly what decoding all tokens at once gives (an
        # incremental decode differs for some tokenizers: merged bytes, cleaned-up spaces)
        text = self.tokenizer.decode(req.tokens, skip_special_tokens=True)
        stops = req.params.stop
        if stops:
            cut = min((text.find(s) for s in stops if s in text), default=-1)
            if cut >= 0:
                req.text = text[:cut]
                self._finish(req, "stop")
                return False
        req.text = text
        # admission ensured prefix + virtual + prompt + max_tokens <= context_length, so this
        # also keeps every position within the context
        if len(req.tokens) >= req.params.max_tokens:
            self._finish(req, "length")
            return False
        safe = _safe_end(text, stops)
        if safe > req.sent:
            req.handle._push("delta", text[req.sent:safe])
            req.sent = safe
        return True

    def _finish(self, req: Request, reason: str, error: BaseException | None = None) -> None:
        if req.handle.done:
            return
        now = time.monotonic()
        if req.sent < len(req.text) and reason != "error":
            req.handle._push("delta", req.text[req.sent:])
            req.sent = len(req.text)
        self._release(req)
        done = Completion(
            id=req.id, adapter=req.adapter, text=req.text, token_ids=list(req.tokens), finish_reason=reason,
            prompt_tokens=len(req.prompt_ids), completion_tokens=len(req.tokens),
            ttft=None if req.first_token_at is None else req.first_token_at - req.submitted,
            latency=now - req.submitted, error=error,
        )
        self.metrics.finished(done)
        req.handle._push("done", done)

    def _release(self, req: Request) -> None:
        if req.acquired:
            req.acquired = False
            self.resolver.release(req.adapter)

    def _cancel_all(self, why: str) -> None:
        with self._cond:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for r in [*waiting, *self._rows]:
            self._finish(r, "cancelled")
        self._reset_batch()


def render_chat(tokenizer, messages: list[dict[str, str]]) -> str:
    """The base's chat template; a plain "role: text" transcript if its tokenizer has none."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def _safe_end(text: str, stops: Sequence[str]) -> int:
    """How much of `text` can be sent: not a trailing partial character, nor a tail that might
    be the start of a stop sequence."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, end), 0, -1):
            if text[end - k:end] == s[:k]:
                hold = max(hold, k)
                break
    return end - hold
