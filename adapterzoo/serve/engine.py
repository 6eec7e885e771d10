"""Continuous batching: requests for any adapters join and leave a running batch at every step.

One scheduler thread owns the base, the slot pools and every KV cache. Each loop iteration:

1. runs the calls other threads queued for it (`call_between_steps`: registering a loaded
   adapter, removing one), so the modules and pools never change under a forward;
2. drops the rows of finished and cancelled requests (`batch_select_indices` on every cache
   layer, then cuts leading columns that no row uses any more);
3. admits waiting requests whose adapter is in host memory, within the batch size, the slots of
   each pool, the tenant's resident-slot limit and a prefill token budget; puts every adapter the
   batch will use into its slot (`zoo.plan` over the union, so none evicts another that is in
   use);
4. runs one decode step for the whole batch, every row feeding its last token: one `zoo.forward`
   with the batch's `BatchPlan` (built once per membership). When requests join and rows are
   running, the joiners' prompts are computed inside that same forward (`zoo.forward_tokens`,
   serve/ragged.py: every token a row of one), so the base's weights are read once for both;
   otherwise (an empty batch, a base that cannot) they are prefilled together first (left-padded,
   their own fresh cache). Either way soft-prompt virtual tokens and prefixes enter the joiner's
   cache there and then live in it, its first token is sampled, and its cache and mask are merged
   into the running batch (left-padding the shorter side with masked zeros).

Each row keeps its own left-padded mask, and `Zoo.forward` takes positions from the mask
(+ prefix length), so a row's positions, keys and values are exactly those of a solo run:
greedy results equal `zoo.generate([prompt], [adapter])`, and seeded sampling uses a per-request
generator the same way `zoo.generate([prompt], seed=s)` does.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import logging
import os
import queue
import secrets
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import torch

from ..errors import (  # noqa: F401  (their home is errors.py; importable from here as before)
    AdapterLoadError,
    AdapterZooError,
    BatchError,
    ContextLengthError,
    EngineClosedError,
    EngineError,
    MaxTokensError,
    QueueFullError,
    RequestFailedError,
    UnknownAdapterError,
)
from ..generate import find_stop, pad_token_id, sample_next
from ..runtime import prefix_columns
from . import packed as packed_linear
from .batch import Completion, Request, Room, RunningBatch  # noqa: F401 - Completion, Request: also from here
from .cpu import ThreadGovernor
from .prefix_cache import BLOCK, PrefixCache
from .ragged import JoinStep
from .resolver import HostResolver, Resolver
from .sampling import (  # noqa: F401 - the HTTP layer, Ray and users import these from here too
    MAX_LOGPROBS,
    SamplingParams,
    TokenLogprob,
    apply_penalties,
    token_logprob,
)

if TYPE_CHECKING:  # pragma: no cover
    from ..zoo import Zoo

log = logging.getLogger("adapterzoo.serve")

#: A leader is prefilled ahead of the rows that share its opening only when they would skip this
#: many prompt tokens in all (`Engine._leaders_first`)
LEADER_SAVES = 4 * BLOCK


class RequestHandle:
    """One submitted request: iterate its text deltas, wait for its result, or cancel it.

    Thread-safe. Pass `loop=` to `Engine.submit` to also get an asyncio view (`astream`,
    `aresult`), fed from the engine thread with `call_soon_threadsafe`.
    """

    def __init__(self, request: Request, loop: asyncio.AbstractEventLoop | None):
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
                self._cond.wait_for(lambda i=i: len(self._events) > i)
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


@dataclasses.dataclass
class Prompts:
    """Joiners' prompts as one left-padded batch (`Engine._prompts`): `ids` (joiners, max(lengths))
    to compute, `mask` (joiners, past + width), `cache` holding the cached openings (or prefixes) in
    `past` columns; per joiner its prefix-cache root, how many prompt tokens it computes, and its
    cache hit."""

    ids: torch.Tensor
    mask: torch.Tensor
    cache: Any
    roots: list
    computed: list[int]
    hits: list
    lengths: list[int]  # tokens each row feeds (virtual ones included, inside a step)
    embeds: tuple[torch.Tensor, torch.Tensor] | None  # (rows, vectors): virtual tokens' inputs


class _Apart(Exception):
    """This step's joiners must prefill apart (a plan `Zoo.forward_tokens` cannot run)."""


class NullMetrics:
    """Metrics that record nothing (an engine or tiers built without `ServeMetrics`)."""

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *a, **k: None


class Engine:
    """Continuous batching over one `Zoo`. Start it, submit requests, stop it (draining)."""

    def __init__(
        self,
        zoo: Zoo,
        *,
        max_batch: int = 32,
        max_queue: int = 256,
        max_prefill_tokens: int = 4096,
        resolver: Resolver | None = None,
        metrics: Any = None,
        max_queue_per_tenant: int | None = None,
        max_rows_per_tenant: int | None = None,
        stuck_after: float = 60.0,
        prefill_group: int | None = None,
        prefill_wait: int = 6,
        prefix_cache_bytes: int = 0,
        join_in_step: bool | None = None,
    ):
        if zoo.tokenizer is None or not zoo.is_causal_lm:
            raise EngineError("the engine needs a causal language model base with a tokenizer")
        self.zoo = zoo
        self.tokenizer = zoo.tokenizer
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.max_prefill_tokens = max_prefill_tokens
        # fairness: a tenant's share of the queue, and of the batch's rows (None: no cap). Rows
        # beyond a tenant's share stay free for others, so their requests join at the next step.
        self.max_queue_per_tenant = max_queue_per_tenant
        self.max_rows_per_tenant = max_rows_per_tenant
        self.stuck_after = stuck_after
        # Joiners are prefilled in groups: a prefill reads every weight of the base once, as a
        # decode step does, whether it holds one prompt or several. While rows decode, up to
        # `prefill_wait` steps pass until `prefill_group` requests (max_batch // 4; or as many as
        # wait) can join together. Measured with benchmarks/vs_vllm.py (batch 16, 64 requests):
        # 39 prefills -> 14, see docs/serving.md "On the CPU". A lone waiting request never waits.
        self.prefill_group = max(1, max_batch // 4) if prefill_group is None else max(1, prefill_group)
        self.prefill_wait = prefill_wait
        # Joiners prefill inside the running rows' decode step (serve/ragged.py), in one forward that
        # reads the weights once, where the base allows it (None: Zoo.runs_token_rows). Then they
        # are never held back: joining costs no forward of its own. False: always prefill apart.
        if join_in_step is None:  # ADAPTERZOO_JOIN_IN_STEP=0 turns it off (an A/B, or a suspected bug)
            join_in_step = os.environ.get("ADAPTERZOO_JOIN_IN_STEP", "1").strip().lower() not in ("0", "false", "off")
            join_in_step = join_in_step and zoo.runs_token_rows()
        self.join_in_step = bool(join_in_step)
        self.joined_in_step = 0  # requests that joined inside a decode step
        # prompt blocks earlier requests computed, reused by later ones that open with the same
        # tokens, per tenant and adapter (serve/prefix_cache.py); 0 bytes: off
        self.prefix_cache = PrefixCache(prefix_cache_bytes)
        # each adapter object gets a serial of its own: a reloaded adapter (a new object, maybe at the
        # same version) never meets the blocks of the one it replaced
        self._adapters_seen: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # id -> adapter
        self._adapter_serials: dict[int, int] = {}  # id(adapter) -> serial
        self._serials = itertools.count()
        self._held_steps = 0  # decode steps the current joiners have been held back
        self.resolver: Resolver = resolver or HostResolver(zoo)
        self.resolver.attach(self)
        self.metrics = metrics or NullMetrics()
        config = zoo.model.config
        self.context_length = int(
            getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2048
        )
        self.eos = self.tokenizer.eos_token_id
        self.pad = pad_token_id(self.tokenizer)
        self.vocab_size = int(zoo.model.get_input_embeddings().num_embeddings)
        self._cond = threading.Condition()
        self._stop_lock = threading.Lock()
        self._waiting: collections.deque[Request] = collections.deque()
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closing = False
        self._stopped = False
        self._calls_closed = False  # the loop has left: `call_between_steps` runs calls inline
        self._batch = RunningBatch()  # the rows decoding together (serve/batch.py)
        # every request taken from the queue and not yet finished (joining or running): whatever
        # goes wrong, each of them is ended (finished, failed or cancelled) and releases its adapter
        self._taken: set[Request] = set()
        self._turn: list[str | None] = []  # tenants in admission order: the one served last goes last
        self._reported_stuck: set[str] = set()
        self.steps = 0
        self.tokens_generated = 0

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Engine:
        if self._thread is None:
            self._calls_closed = False
            # a new thread gets OpenMP's default team size whatever torch.get_num_threads() says there;
            # on a busy CPU that oversubscribes it badly (20x slower measured), so pass ours on
            self._torch_threads = torch.get_num_threads()
            # then fewer while neighbours take cores (serve/cpu.py: why, and the ADAPTERZOO_THREADS knobs)
            self.threads = ThreadGovernor(max_threads=self._torch_threads)
            if packed_linear.enabled() and self.zoo.device.type == "cpu":
                packed_linear.pack_linears(self.zoo.model)  # serve/packed.py: ~20% off a decode step
            self._thread = threading.Thread(target=self._loop, name="adapterzoo-engine", daemon=True)
            self._thread.start()
            threading.Thread(
                target=self._watchdog, args=(self._thread,), name="adapterzoo-watchdog", daemon=True
            ).start()
        return self

    def stop(self, drain: bool = True, timeout: float | None = 30.0) -> None:
        """Stop taking requests; with `drain`, finish the running and waiting ones first (up to
        `timeout` seconds, then fail what is left with `EngineClosedError`). Safe to call twice
        (the signal handler starts a drain; the app's shutdown calls it again)."""
        with self._stop_lock:
            self._stop(drain, timeout)

    def _stop(self, drain: bool, timeout: float | None) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is None:
            self._cancel_all("engine stopped")
            return
        if drain:
            deadline = None if timeout is None else time.monotonic() + timeout
            with self._cond:
                # taken: out of the queue, not yet a row (being prefilled); a drain waits for them too
                while self._waiting or self._taken or self._batch.rows:
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

    def _cancel_all(self, why: str) -> None:
        """End every request still here: past a drain, each fails with `EngineClosedError`, so
        a client gets a 503 (or an SSE error event), never a cut connection."""
        with self._cond:
            waiting, self._waiting = list(self._waiting), collections.deque()
        error = EngineClosedError(f"the server shut down before this request finished ({why}); retry it")
        for r in [*waiting, *self._batch.rows, *list(self._taken)]:
            self._finish(r, "error", error)
        self._batch.reset()

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._thread is not None and not self._stopped

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {
                "waiting": len(self._waiting),
                "running": len(self._batch.rows),
                "steps": self.steps,
                "tokens_generated": self.tokens_generated,
                "cached_prompt_tokens": self.prefix_cache.hit_tokens,
                "joined_in_step": self.joined_in_step,
            }

    # ------------------------------------------------------------------ the watchdog

    def stuck(self) -> list[str]:
        """Ids of requests taken from the queue that made no progress (no token) for
        `stuck_after` seconds: a forward that hangs, an adapter that blocks. `/health` turns
        unhealthy while there are any."""
        now = time.monotonic()
        with self._cond:
            taken = [*self._taken, *list(self._batch.rows)]  # joining, and running (a snapshot of the rows)
        return sorted({r.id for r in taken if not r.handle.done and now - r.progressed > self.stuck_after})

    def healthy(self) -> bool:
        """Running, its thread alive, and no stuck request."""
        alive = self._thread is not None and self._thread.is_alive()
        return self.running and alive and not self.stuck()

    def _watchdog(self, thread: threading.Thread) -> None:
        """Log each stuck request once, and keep the stuck-requests gauge current."""
        period = max(0.05, min(5.0, self.stuck_after / 4))
        while thread.is_alive() and not self._stopped:
            stuck = self.stuck()
            self.metrics.stuck(len(stuck))
            for rid in set(stuck) - self._reported_stuck:
                log.error(
                    "request %s made no progress for over %.0fs: the engine step may be hung", rid, self.stuck_after
                )
            self._reported_stuck = set(stuck)
            with self._cond:  # stop() notifies: the watchdog leaves with the engine, not a period later
                if not self._stopped:
                    self._cond.wait(period)

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
        return self.submit_many(
            [prompt], adapter, [params or SamplingParams()], tenant=tenant, loop=loop, request_ids=[request_id]
        )[0]

    def submit_many(
        self,
        prompts: Sequence[str | Sequence[int]],
        adapter: str | None,
        params: Sequence[SamplingParams],
        *,
        tenant: str | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        request_ids: Sequence[str | None] | None = None,
    ) -> list[RequestHandle]:
        """Queue several requests (the prompts and choices of one API call) all or none: a batch
        the queue cannot hold is refused whole, so no half of it sits in the queue."""
        ids = list(request_ids or [None] * len(prompts))
        reqs = [
            self._new_request(prompt, adapter, p, tenant, loop, rid)
            for prompt, p, rid in zip(prompts, params, ids, strict=True)
        ]
        with self._cond:
            self._check_queue_room(len(reqs), tenant)
            try:
                for req in reqs:
                    if adapter is not None:
                        self.resolver.acquire(adapter)
                        req.acquired = True
                        req.ready = self.resolver.prepare(adapter, tenant)
                        _raise_if_unknown(req.ready)  # known not to exist: refused now (404), not queued
            except BaseException:
                for req in reqs:
                    self._release(req)
                raise
            for req in reqs:
                if req.params.max_tokens == 0:
                    self._finish(req, "length")
                else:
                    self._waiting.append(req)
            self.metrics.queue_depth(len(self._waiting))
            self._cond.notify_all()
        for req in reqs:
            if req.ready is not None:
                req.ready.add_done_callback(lambda _f: self._wake())
        return [r.handle for r in reqs]

    def _new_request(
        self,
        prompt: str | Sequence[int],
        adapter: str | None,
        p: SamplingParams,
        tenant: str | None,
        loop: asyncio.AbstractEventLoop | None,
        request_id: str | None,
    ) -> Request:
        """A checked request (its tokens in the vocabulary, prompt + max_tokens within the context),
        not yet queued."""
        ids = self.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        self.check_ids(ids)
        for t in p.stop_token_ids:
            self.check_token(t, "stop_token_ids")
        req = Request(ids, adapter, p, tenant)
        if request_id:
            req.id = request_id
        req.engine = self
        req.submitted = time.monotonic()
        req.handle = RequestHandle(req, loop)
        if not p.greedy:
            req.generator = torch.Generator().manual_seed(p.seed if p.seed is not None else secrets.randbits(62))
        if p.logprobs is not None:
            req.logprobs = []
        self._check_length(req)
        return req

    def _check_queue_room(self, adding: int, tenant: str | None) -> None:
        """Raise unless the queue (and `tenant`'s share of it) can take `adding` more; under `_cond`."""
        if self._closing:
            raise EngineClosedError("the server is shutting down and takes no new requests")
        # cancelled requests still in the queue (until the next step) take no room
        live = [r for r in self._waiting if not r.cancelled]
        if len(live) + adding > self.max_queue:
            self.metrics.rejected("queue_full")
            raise QueueFullError(
                f"too many requests are waiting ({len(live)}, the limit is {self.max_queue}; this "
                f"call adds {adding}); retry later"
            )
        share = self.max_queue_per_tenant
        mine = sum(1 for r in live if r.tenant == tenant)
        if share is not None and mine + adding > share:
            self.metrics.rejected("tenant_queue_full")
            raise QueueFullError(
                f"your requests already fill your share of the queue ({mine} waiting, a tenant "
                f"may have {share}; this call adds {adding}); retry later"
            )

    def check_token(self, token: int, what: str = "prompt") -> None:
        if not (isinstance(token, int) and not isinstance(token, bool) and 0 <= token < self.vocab_size):
            raise BatchError(
                f"{what} has token id {token!r}, outside this model's vocabulary [0, {self.vocab_size}); "
                "use ids from /tokenize"
            )

    def check_ids(self, ids: Sequence[int]) -> None:
        """Token ids must be in the vocabulary (an id past it would fail every row prefilled with it)."""
        if not ids:
            raise BatchError("the prompt must have at least one token; got an empty prompt")
        low, high = min(ids), max(ids)
        if low < 0 or high >= self.vocab_size:
            self.check_token(low if low < 0 else high)

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
        return self.submit_call(
            [messages if messages is not None else prompt],
            adapter,
            chat=messages is not None,
            max_tokens=max_tokens,
            chat_max_tokens=chat_max_tokens,
            sampling=sampling,
            tenant=tenant,
            loop=loop,
        )[0]

    def prompt_ids(
        self, prompt: str | Sequence[int] | None = None, messages: list[dict[str, str]] | None = None
    ) -> list[int]:
        """A prompt's token ids: text is tokenized, chat `messages` rendered with the template first."""
        if messages is not None:
            prompt = render_chat(self.tokenizer, messages)
        ids = self.encode(prompt) if isinstance(prompt, str) else [int(t) for t in (prompt or [])]
        if not ids:
            raise BatchError("The prompt is empty: give at least one token.")
        return ids

    def submit_call(
        self,
        prompts: Sequence[Any],
        adapter: str | None = None,
        *,
        chat: bool = False,
        max_tokens: int | None = None,
        chat_max_tokens: int = 512,
        sampling: dict[str, Any] | None = None,
        n: int = 1,
        tenant: str | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        request_id: str | None = None,
    ) -> list[RequestHandle]:
        """One API call: every prompt (text, token ids, or chat messages when `chat`) times `n`
        choices, queued all or none. Choice j of a seeded call samples with `seed + j`, so each
        equals a solo run with that seed. Tokenizes: call it off the event loop."""
        items, params = [], []
        for prompt in prompts:
            ids = self.prompt_ids(messages=prompt) if chat else self.prompt_ids(prompt)
            limit = max_tokens
            if limit is None:
                limit = max(1, min(chat_max_tokens, self.context_length - len(ids)))
            if limit > self.context_length:
                raise MaxTokensError(
                    f"max_tokens is {limit}, over this model's context length of {self.context_length}"
                )
            for j in range(n):
                options = dict(sampling or {})
                if j and options.get("seed") is not None:
                    options["seed"] = (options["seed"] + j) % 2**63
                items.append(ids)
                params.append(SamplingParams(max_tokens=limit, **options))
        ids = (
            [None] * len(items)
            if not request_id
            else [request_id if len(items) == 1 else f"{request_id}-{i}" for i in range(len(items))]
        )
        return self.submit_many(items, adapter, params, tenant=tenant, loop=loop, request_ids=ids)

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
            queued = (
                self._thread is not None and not self._calls_closed and threading.current_thread() is not self._thread
            )
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
        self.threads.start()
        with torch.inference_mode():
            try:
                while True:
                    self._run_calls()
                    with self._cond:
                        if self._stopped:
                            break
                        if not self._batch.rows and not self._has_admissible():
                            self._cond.wait(0.05)
                            continue
                    try:
                        self.threads.tick()
                        self._iteration()
                    except Exception as exc:  # noqa: BLE001 - a bug must not kill the server
                        # per-request failures are handled inside the step; reaching here is a bug
                        # in the engine itself: every request it had taken ends (none hangs for ever)
                        log.exception("engine step failed; failing the requests it held")
                        error = RequestFailedError(
                            f"the server failed while running this request ({type(exc).__name__}); retry it"
                        )
                        for req in [*self._batch.rows, *list(self._taken)]:
                            self._finish(req, "error", error)
                        self._batch.reset()
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
        in_step = self._join(joiners) if joiners else []
        if in_step:
            self._decode_and_join(in_step)
        elif self._batch.rows:
            self._decode()
        with self._cond:
            self.metrics.queue_depth(len(self._waiting))
            self.metrics.running(len(self._batch.rows))
            self._cond.notify_all()  # wakes stop(drain=True)

    # -- leave
    def _drop_finished(self) -> None:
        for r in self._batch.rows:
            if r.cancelled and not r.handle.done:
                self._finish(r, "cancelled")
        self._batch.keep([i for i, r in enumerate(self._batch.rows) if not r.handle.done])

    # -- join
    def _in_turn(self, waiting: list[Request]) -> list[Request]:
        """The waiting requests round-robin across tenants (each tenant's in arrival order),
        starting with the tenant served longest ago: one tenant's flood cannot push another
        tenant's request back."""
        by_tenant: dict[str | None, collections.deque[Request]] = {}
        for r in waiting:
            by_tenant.setdefault(r.tenant, collections.deque()).append(r)
        for t in by_tenant:
            if t not in self._turn:
                self._turn.insert(0, t)  # a tenant new to the queue goes first
        order = [t for t in self._turn if t in by_tenant]
        out: list[Request] = []
        while by_tenant:
            for t in order:
                q = by_tenant.get(t)
                if q:
                    out.append(q.popleft())
                    if not q:
                        del by_tenant[t]
        return out

    def _served(self, tenant: str | None) -> None:
        if tenant in self._turn:
            self._turn.remove(tenant)
        self._turn.append(tenant)

    def _admit(self) -> list[Request]:
        """Pick waiting requests that can join now, round-robin across tenants, skipping (not
        waiting behind) those whose adapter is still loading or whose limits are reached."""
        with self._cond:
            waiting = list(self._waiting)
        if not waiting:
            return []
        room = Room(
            self._batch.rows,
            lambda name: self.zoo.get_adapter(name).pool_key,
            max_rows=self.max_batch,
            max_rows_per_tenant=self.max_rows_per_tenant,
            slots=self.zoo.slots,
            budget=self.max_prefill_tokens,
        )
        joiners: list[Request] = []
        left: set[int] = set()  # ids of the requests that leave the queue: joiners, and those ended in it
        # requests that could share the joiners' prefill: the joiners, and those in host memory
        # turned away only for want of a free row (they join as rows end). Not those of a tenant
        # at its row share, nor those over the prefill budget or without a slot: holding joiners
        # for them let a tenant flooding at its share hold every other tenant's first token back
        # `prefill_wait` steps (tests/serve/test_attacks_round4.py: 9 steps against 3 alone)
        ready = 0
        for req in self._in_turn(waiting):
            # requests that need no row leave the queue even when the batch is full, so that
            # they stop counting against max_queue
            if self._ended_in_queue(req):
                left.add(id(req))
                continue
            loaded = req.ready is None or req.ready.done()
            if room.row_for(req.tenant) and self._may_join(req, room):
                room.take(req, len(req.prompt_ids) + req.virtual)
                joiners.append(req)
                ready += 1
            elif req.handle.done:  # its adapter's virtual tokens overflow the context: failed in `_may_join`
                left.add(id(req))
            elif loaded and room.waits_for_rows(req.tenant):
                ready += 1
        if joiners and self._hold(joiners, ready):
            joiners = []
        for req in joiners:
            self._served(req.tenant)
            left.add(id(req))
        if left:
            now = time.monotonic()
            with self._cond:
                self._waiting = collections.deque(r for r in self._waiting if id(r) not in left)
                for r in joiners:
                    r.progressed = now
                    self._taken.add(r)
        return joiners

    def _hold(self, joiners: list[Request], ready: int) -> bool:
        """Whether the joiners wait (one more decode step) for others to join in the same prefill:
        only while rows decode meanwhile, fewer than `prefill_group` could join (counting every
        ready request that waits), and for at most `prefill_wait` steps."""
        if self.join_in_step and (self.zoo.runtime.prefix_fits_cache() or all(not r.prefix for r in joiners)):
            # they join inside the next decode step, at no forward of their own: soft-prompt and
            # prefix joiners too (they were held up to `prefill_wait` steps for nothing)
            return False
        want = min(self.prefill_group, ready)
        if not self._batch.rows or len(joiners) >= want or self._held_steps >= self.prefill_wait:
            self._held_steps = 0
            return False
        self._held_steps += 1
        return True

    def _ended_in_queue(self, req: Request) -> bool:
        """Cancelled, or its adapter failed to load: ended here, with no row."""
        if req.cancelled:
            self._finish(req, "cancelled")
            return True
        if req.ready is not None and req.ready.done() and req.ready.exception() is not None:
            self._finish(req, "error", AdapterLoadError.wrap(req.adapter, req.ready.exception()))
            return True
        return False

    def _may_join(self, req: Request, room: Room) -> bool:
        """Its adapter is in host memory, it fits the context with the adapter's virtual tokens (else
        it fails now), a slot is free for it, and its prompt fits this step's prefill budget."""
        if req.ready is not None and not req.ready.done():
            return False
        if req.adapter is not None:
            if self.zoo.find_adapter(req.adapter) is None:  # unloaded between its load and now: fetch it again
                req.ready = self.resolver.prepare(req.adapter, req.tenant)
                req.ready.add_done_callback(lambda _f: self._wake())
                return False
            req.virtual, req.prefix = self.zoo.token_lengths(req.adapter)
            if req.virtual + req.prefix + len(req.prompt_ids) + req.params.max_tokens > self.context_length:
                self._finish(
                    req,
                    "error",
                    ContextLengthError(
                        f"the prompt has {len(req.prompt_ids)} tokens, adapter {req.adapter!r} adds "
                        f"{req.virtual + req.prefix} virtual tokens and max_tokens is {req.params.max_tokens}: over "
                        f"this model's context length of {self.context_length}"
                    ),
                )
                return False
            if not room.slot_for(req.adapter, req.tenant, self.resolver.resident_limit(req.tenant)):
                return False
        return room.prefill_for(len(req.prompt_ids) + req.virtual)

    def _place(self, joiners: list[Request]) -> None:
        """Every adapter the batch will use into a slot, in one `zoo.plan` call so that all of
        them are pinned together (none evicts another that is in use)."""
        names = sorted({r.adapter for r in [*self._batch.rows, *joiners] if r.adapter is not None})
        if not names:
            return
        new = [n for n in names if self.zoo.where(n) != "device"]
        if not new:
            return
        t0 = time.perf_counter()
        self.zoo.plan(names, training=False)
        self.resolver.placed(new, time.perf_counter() - t0)
        self._batch.plan = None

    def _join(self, joiners: list[Request]) -> list[Request]:
        """Place the joiners' adapters; prefill apart those that cannot join inside the decode
        step, and return the others, for `_decode_and_join`.

        Inside the step (serve/ragged.py) when rows are running and the base allows it
        (`join_in_step`): a prefill of its own reads every weight of the base once more. Apart:
        the leaders of a shared opening (`_leaders_first`: the others find its blocks cached in
        the step after), and every joiner when no row is running."""
        try:
            self._place(joiners)
        except Exception as exc:  # noqa: BLE001 - isolated below
            self._isolate_join_failure(joiners, exc, self._join_apart)
            return []
        if not (self.join_in_step and self._batch.rows):
            self._join_apart(joiners)
            return []
        leaders = self._leaders_first([r for r in joiners if not r.virtual and not r.prefix])
        leaders = {id(r) for r in leaders[0]} if len(leaders) > 1 else set()
        self._join_apart([r for r in joiners if id(r) in leaders])
        return [r for r in joiners if id(r) not in leaders]

    def _join_apart(self, joiners: list[Request]) -> None:
        """Place the joiners' adapters, prefill them and merge them into the batch. If that raises
        (an adapter that throws, a slot it cannot get), each joiner is tried alone: only the ones
        that fail alone fail.

        Soft-prompt joiners are prefilled apart from the others: a prefill pads every row to the
        widest, and their virtual tokens would otherwise be paid as padding by every other row
        (a 16-token soft prompt made a mixed prefill 2-3x a base one)."""
        if not joiners:
            return
        try:
            self._place(joiners)
        except Exception as exc:  # noqa: BLE001 - isolated below
            self._isolate_join_failure(joiners, exc, self._join_apart)
            return
        for group in ([r for r in joiners if not r.virtual], [r for r in joiners if r.virtual]):
            for part in self._leaders_first(group):
                self._prefill_and_merge(part)

    def _leaders_first(self, group: list[Request]) -> list[list[Request]]:
        """The group as prefills to run in turn: when some of its rows open with the same blocks,
        not cached yet, one of them (a leader) is prefilled first, so that the others find its
        blocks cached. Without this, the 512-token shape of benchmarks/vs_vllm.py computed the
        ~500-token opening its prompts share once per row of the first prefill (8 times). Only
        when the others would skip at least LEADER_SAVES tokens in all: the leader's prefill is
        one more forward, which reads every weight of the base once (as ~30 prompt tokens cost)."""
        if not group:
            return []
        if not self.prefix_cache.enabled or len(group) < 2:
            return [group]
        by_opening: dict[bytes, list[tuple[Request, list[bytes]]]] = {}
        for r in group:
            root = self._prefix_root(r)
            if root is None or len(r.prompt_ids) <= BLOCK:
                continue
            digests = self.prefix_cache.digests(root, r.prompt_ids[: len(r.prompt_ids) - 1])
            if digests and digests[0] not in self.prefix_cache.blocks:
                by_opening.setdefault(digests[0], []).append((r, digests))
        leaders: dict[int, Request] = {}
        for rows in by_opening.values():
            leader, mine = rows[0]
            saved = sum(BLOCK * _shared(mine, theirs) for _, theirs in rows[1:])
            if saved >= LEADER_SAVES:
                leaders[id(leader)] = leader
        if not leaders:
            return [group]
        return [list(leaders.values()), [r for r in group if id(r) not in leaders]]

    def _isolate_join_failure(self, joiners: list[Request], exc: Exception, retry: Callable) -> None:
        if len(joiners) > 1:
            for r in joiners:
                retry([r])
            return
        req = joiners[0]
        log.warning("request %s (adapter %r) failed at prefill: %s", req.id, req.adapter, exc)
        self._finish(req, "error", _request_error(req, exc, "prefill"))

    def _prefill_and_merge(self, joiners: list[Request]) -> None:
        try:
            out = self._prefill(joiners)
        except Exception as exc:  # noqa: BLE001 - isolated: only the joiners that fail alone fail
            self._isolate_join_failure(joiners, exc, self._prefill_and_merge)
            return
        self._joined(joiners, out.cache, out.attention_mask, out.logits[:, -1])

    def _joined(self, joiners: list[Request], cache, mask: torch.Tensor, logits: torch.Tensor) -> None:
        """After the joiners' prompts ran: sample each one's first token, and merge the rows that
        go on (with their cache and mask) into the running batch."""
        self.metrics.prefill(sum(len(r.prompt_ids) for r in joiners))
        nxt = self._choose(joiners, logits)
        alive = [i for i, r in enumerate(joiners) if nxt[i] is not None and self._take(r, nxt[i])]
        if not alive:
            return
        if len(alive) < len(joiners):
            idx = torch.tensor(alive, device=mask.device)
            cache.batch_select_indices(idx)
            mask = mask.index_select(0, idx)
        new_next = torch.tensor([nxt[i] for i in alive], dtype=torch.long, device=self.zoo.device)
        self._merge([joiners[i] for i in alive], cache, mask, new_next)

    def _prefill(self, joiners: list[Request]):
        """One forward over the joiners' prompts (`_prompts`), with the logits of each last token."""
        zoo = self.zoo
        prompts = self._prompts(joiners)
        plan = zoo.plan([r.adapter for r in joiners], training=False)
        # only the last position's logits are sampled: skip the vocabulary projection of the others
        out = zoo.forward(prompts.ids.to(zoo.device), prompts.mask, plan=plan, cache=prompts.cache, logits_to_keep=1)
        self._store_blocks(joiners, prompts, out.cache)
        return out

    def _prompts(self, joiners: list[Request], inside: bool = False) -> Prompts:
        """The joiners' prompts as one left-padded batch. Each row's cached opening (`prefix_cache`)
        goes into a fresh KV cache first, right-aligned in `past` columns, and only the rest of its
        prompt is to be computed; its positions count on from the cached tokens (the mask says
        which columns are its own), so what it computes is what it would compute alone.

        `inside` (a decode step the joiners join, serve/ragged.py): the tokens `Zoo.forward`
        would add are laid out here instead, as a solo run has them: a soft prompt's virtual
        tokens before the row's prompt (`Prompts.embeds` holds their vectors), a prefix adapter's
        keys and values in the cache's first columns, masked per row."""
        zoo = self.zoo
        roots = [self._prefix_root(r) for r in joiners]
        if not inside and any(r.virtual or r.prefix for r in joiners):  # their virtual tokens go first: no hits
            hits = [(0, None)] * len(joiners)
        else:  # inside a step every joiner is a row of its own: only those with virtual tokens miss the cache
            # (a tenant's soft-prompt joiner used to cost every other tenant's joiner its cached opening)
            hits = [
                self.prefix_cache.lookup(root, r.prompt_ids) if root else (0, None) for r, root in zip(joiners, roots)
            ]
        for r, (tokens, _) in zip(joiners, hits):
            r.cached = tokens
        past = max(tokens for tokens, _ in hits)
        rests = [r.prompt_ids[tokens:] for r, (tokens, _) in zip(joiners, hits)]
        virtual = [r.virtual if inside else 0 for r in joiners]
        lengths = [v + len(rest) for v, rest in zip(virtual, rests)]
        width = max(lengths)
        ids = torch.full((len(joiners), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(joiners), past + width), dtype=torch.long)
        for i, (rest, n, (tokens, _)) in enumerate(zip(rests, lengths, hits)):
            ids[i, width - len(rest) :] = torch.tensor(rest)
            mask[i, past + width - n :] = 1
            mask[i, past - tokens : past] = 1
        cache = zoo.new_cache()
        mask = mask.to(zoo.device)
        embeds = None
        if inside and any(r.virtual or r.prefix for r in joiners):
            # the caller holds zoo.exclusive(): no other thread's plan may move a slot between this
            # plan and the reads of its vectors and prefixes below (they would be another adapter's)
            plan = zoo.plan([r.adapter for r in joiners], training=False)
            if any(virtual):
                vectors, _ = zoo.virtual_tokens(plan)
                starts = [sum(lengths[:i]) for i in range(len(joiners))]
                embeds = (
                    torch.tensor([starts[i] + c for i, v in enumerate(virtual) for c in range(v)], dtype=torch.long),
                    torch.cat([vectors[i, :v] for i, v in enumerate(virtual)]),
                )  # rows counted from the first joiner token
            if any(r.prefix for r in joiners):
                if not zoo.runtime.prefix_fits_cache():
                    raise _Apart  # prefixes that live beside the cache: `Zoo.forward` puts them in every layer
                zoo.runtime.write_prefixes(plan, cache, vectors_like(zoo))  # the first columns; cached openings after
                mask = torch.cat([prefix_columns(plan).to(mask.dtype), mask], 1)
        if past:
            _fill(cache, hits, past)
        computed = [len(rest) for rest in rests]
        return Prompts(ids, mask, cache, roots, computed, hits, lengths, embeds)

    def _store_blocks(self, joiners: list[Request], prompts: Prompts, cache) -> None:
        """Offer each joiner's newly computed full prompt blocks to the prefix cache. Caching is only
        a saving: if it raises (out of memory copying the blocks), the request goes on uncached; it
        used to fail every request of the step (inside a decode step: the whole batch)."""
        for i, (r, root, computed, (tokens, _)) in enumerate(
            zip(joiners, prompts.roots, prompts.computed, prompts.hits)
        ):
            if root is not None and len(r.prompt_ids) - tokens >= BLOCK:  # at least one new full block
                try:
                    kv = torch.stack(
                        [torch.stack((la.keys[i, :, -computed:], la.values[i, :, -computed:])) for la in cache.layers]
                    )
                    self.prefix_cache.store(root, r.prompt_ids, kv, tokens, owner=r.tenant)
                except Exception as exc:  # noqa: BLE001 - not cached, nothing else
                    log.warning("request %s's prompt blocks were not cached (%s)", r.id, type(exc).__name__)

    def _prefix_root(self, req: Request) -> tuple | None:
        """What a row's cached blocks are filed under (tenant, adapter by identity and version), or
        None when it takes no part: caching off, or virtual tokens that shift its positions."""
        if not self.prefix_cache.enabled or req.virtual or req.prefix:
            return None
        if req.adapter is None:
            return (req.tenant, None)
        adapter = self.zoo.find_adapter(req.adapter)
        if adapter is None:
            return None
        key = id(adapter)
        if self._adapters_seen.get(key) is not adapter:  # new, or an id() reused once an adapter was gone
            if len(self._adapter_serials) > 2 * len(self._adapters_seen) + 64:
                self._adapter_serials = {k: v for k, v in self._adapter_serials.items() if k in self._adapters_seen}
            self._adapters_seen[key] = adapter
            self._adapter_serials[key] = next(self._serials)
        return (req.tenant, req.adapter, self._adapter_serials[key], adapter.version())

    def _merge(self, rows: list[Request], cache, mask: torch.Tensor, nxt: torch.Tensor) -> None:
        with self._cond:
            for r in rows:
                self._taken.discard(r)  # from here on they are rows: the batch keeps them
        self._batch.merge(rows, cache, mask, nxt)

    # -- decode
    def _decode(self) -> None:
        zoo, batch = self.zoo, self._batch
        step_mask = batch.step_mask()
        try:
            if batch.plan is None:
                batch.plan = zoo.plan([r.adapter for r in batch.rows], training=False)
            out = zoo.forward(batch.next[:, None], step_mask, plan=batch.plan, cache=batch.cache)
        except Exception as exc:  # noqa: BLE001 - find whose adapter raised; fail only those rows
            self._isolate_decode_failure(exc)
            return
        batch.cache = out.cache
        batch.plan = out.plan  # planned again if an adapter changed under the old one (BatchPlan.is_current)
        self._decoded(step_mask, out.logits[:, -1])

    def _decoded(self, step_mask: torch.Tensor, logits: torch.Tensor) -> None:
        """After a decode forward: each running row takes its next token."""
        batch = self._batch
        batch.mask = step_mask
        nxt = self._choose(batch.rows, logits)
        self.steps += 1
        self.metrics.decode_step(len(batch.rows))
        for r, t in zip(batch.rows, nxt):
            if t is not None:
                self._take(r, t)
        # a failed row feeds a pad token until the next step drops it
        batch.next = torch.tensor([self.pad if t is None else t for t in nxt], dtype=torch.long, device=self.zoo.device)

    def _decode_and_join(self, joiners: list[Request]) -> None:
        """One forward for the running rows' next tokens and the joiners' prompts (serve/ragged.py):
        every token a row of one, so the base's weights are read once for both. If it raises, the
        running rows' cache is cut back and both run apart, where failures are isolated per adapter."""
        zoo, batch = self.zoo, self._batch
        step_mask = batch.step_mask()
        try:
            self._check_lengths_unchanged(joiners)  # not under the zoo's lock: it may end requests
            # one hold of the zoo from the joiners' plan to the forward: a training thread's plan in
            # between took a soft prompt's slot, and the joiner ran with another tenant's vectors
            # (tests/serve/test_attacks_round6.py). Nothing in it may wait for another lock (the
            # resolver's threads take theirs, then the zoo's)
            with zoo.exclusive():
                prompts = self._prompts(joiners, inside=True)
                step = JoinStep(batch.cache, step_mask, prompts.cache, prompts.mask, prompts.lengths)
                names = [r.adapter for r in batch.rows] + [
                    r.adapter for r, n in zip(joiners, prompts.lengths) for _ in range(n)
                ]
                plan = zoo.plan(names, training=False)
                if not zoo.runs_token_rows(plan):  # a prefix adapter whose prefixes are not in the cache
                    raise _Apart
                tokens = torch.cat([batch.next, prompts.ids.flatten().to(zoo.device)[step.padded_at]])
                embeds = None
                if prompts.embeds is not None:
                    rows_of, vectors = prompts.embeds
                    embeds = (rows_of + len(batch.rows), vectors)
                out = zoo.forward_tokens(tokens, step.positions(), plan, step, step, step.last_tokens(), embeds)
        except Exception as exc:  # noqa: BLE001 - run apart, where each failure is isolated
            if not isinstance(exc, _Apart):
                log.info("a decode step with joiners failed (%s); running them apart", type(exc).__name__)
            batch.undo_step()
            self._join_apart([r for r in joiners if not r.handle.done])  # not those ended meanwhile
            self._decode()
            return
        self._store_blocks(joiners, prompts, prompts.cache)
        self.joined_in_step += len(joiners)
        rows = len(batch.rows)
        self._decoded(step_mask, out.logits[:rows])
        self._joined(joiners, prompts.cache, prompts.mask, out.logits[rows:])

    def _check_lengths_unchanged(self, joiners: list[Request]) -> None:
        """Raise `_Apart` if a joiner's adapter was replaced since its admission by one with another
        number of virtual or prefix tokens (its step's rows were laid out for the old one): apart,
        `Zoo.forward` adds what the adapter has now. Its lengths are counted again first, and if they
        no longer fit the context with its prompt and max_tokens, it fails (as at admission)."""
        stale = False
        for r in joiners:
            if r.adapter is not None:
                now = self.zoo.token_lengths(r.adapter)
                if now != (r.virtual, r.prefix):
                    r.virtual, r.prefix = now
                    stale = True
                    if sum(now) + len(r.prompt_ids) + r.params.max_tokens > self.context_length:
                        self._finish(
                            r,
                            "error",
                            ContextLengthError(
                                f"adapter {r.adapter!r} was replaced while this request waited; with its "
                                f"{sum(now)} virtual tokens, the prompt's {len(r.prompt_ids)} and max_tokens "
                                f"{r.params.max_tokens} it is over this model's context length of "
                                f"{self.context_length}; lower max_tokens or shorten the prompt"
                            ),
                        )
        if stale:
            raise _Apart

    def _isolate_decode_failure(self, exc: Exception) -> None:
        """A decode forward raised. No token was taken, so the step can be run again exactly:
        restore the cache to its width before the step, then run each adapter's rows alone on a
        copy of their cache; the rows whose adapter raises alone fail, the others go on at the
        next step. If none raises alone, the failure belongs to no adapter and every row fails."""
        import copy

        batch = self._batch
        batch.undo_step()
        groups: dict[str | None, list[int]] = {}
        for i, r in enumerate(batch.rows):
            groups.setdefault(r.adapter, []).append(i)
        step_mask = batch.step_mask()
        culprits = 0
        for adapter, rows in groups.items():
            idx = torch.tensor(rows, device=batch.mask.device)
            cache = copy.deepcopy(batch.cache)
            cache.batch_select_indices(idx)
            try:
                self.zoo.forward(
                    batch.next.index_select(0, idx)[:, None],
                    step_mask.index_select(0, idx),
                    adapters=[adapter] * len(rows),
                    cache=cache,
                )
            except Exception as alone:  # noqa: BLE001
                culprits += 1
                log.warning("adapter %r failed in a decode step: %s", adapter, alone)
                for i in rows:
                    self._finish(batch.rows[i], "error", _request_error(batch.rows[i], alone, "decoding"))
        if not culprits:
            log.exception("a decode step failed, and no adapter fails alone", exc_info=exc)
            for r in batch.rows:
                self._finish(r, "error", _request_error(r, exc, "decoding"))

    def _choose(self, rows: list[Request], logits: torch.Tensor) -> list[int | None]:
        """One token per row; None for a row that failed (NaN or inf logits, sampling raised),
        which is finished with its error here: it never takes the other rows down."""
        # one pass gives both: a row's max is NaN if any score is NaN (max propagates it), +inf if
        # any is +inf, -inf if all are; -inf scores alone (masked tokens) are fine
        best, greedy_ids = logits.max(-1)
        finite = torch.isfinite(best).tolist()
        greedy = greedy_ids.tolist()
        out: list[int | None] = []
        for i, r in enumerate(rows):
            try:
                if not finite[i]:
                    raise RequestFailedError(
                        f"the model produced NaN or infinite scores for this request"
                        f"{f' with adapter {r.adapter!r}' if r.adapter else ''}; the adapter's weights may be "
                        "corrupt (check them for NaN/inf), or the request's values out of range"
                    )
                out.append(greedy[i] if r.params.plain else self._choose_one(r, logits[i]))
            except Exception as exc:  # noqa: BLE001 - this row alone fails
                self._finish(
                    r,
                    "error",
                    exc
                    if isinstance(exc, RequestFailedError)
                    else RequestFailedError(f"sampling failed for this request: {type(exc).__name__}: {exc}"),
                )
                out.append(None)
        return out

    def _choose_one(self, req: Request, raw: torch.Tensor) -> int:
        """A row's token: penalties (vLLM's order: repetition, then frequency and presence), EOS
        and stop ids held back before min_tokens, then greedy or seeded sampling (the same
        `sample_next` call `zoo.generate` makes, so a plain seeded row equals a solo run)."""
        p = req.params
        scores = raw.float()
        if p.penalised:
            scores = apply_penalties(scores, req.prompt_ids, req.tokens, p)
        if len(req.tokens) < p.min_tokens:
            banned = [t for t in (self.eos, *p.stop_token_ids) if t is not None]
            if banned:
                scores = scores.clone()
                scores[banned] = float("-inf")
        if p.greedy:
            token = int(scores.argmax())
        else:
            token = int(
                sample_next(
                    scores[None],
                    do_sample=True,
                    temperature=p.temperature,
                    top_k=p.top_k,
                    top_p=p.top_p,
                    generator=req.generator,
                )[0]
            )
        if req.logprobs is not None:
            req.logprobs.append(token_logprob(raw, token, p.logprobs or 0))
        return token

    def _take(self, req: Request, token: int) -> bool:
        """`_append`, with any error it raises (decoding text) failing this request alone."""
        try:
            return self._append(req, token)
        except Exception as exc:  # noqa: BLE001
            self._finish(req, "error", RequestFailedError(f"could not decode this request's output: {exc}"))
            return False

    def _append(self, req: Request, token: int) -> bool:
        """Take one sampled token; stream what is safe to send. False when the request is done."""
        now = time.monotonic()
        req.progressed = now
        if req.first_token_at is None:
            req.first_token_at = now
            self.metrics.first_token(req.first_token_at - req.submitted)
        if req.cancelled:
            self._finish(req, "cancelled")
            return False
        past_min = len(req.tokens) >= req.params.min_tokens
        if self.eos is not None and token == self.eos and not req.params.ignore_eos and past_min:
            self._finish(req, "stop")
            return False
        if token in req.params.stop_token_ids and past_min:  # not part of the output (nor its logprobs)
            self._finish(req, "stop")
            return False
        req.tokens.append(token)
        self.tokens_generated += 1
        # the whole output, decoded again: exactly what decoding all tokens at once gives (an
        # incremental decode differs for some tokenizers: merged bytes, cleaned-up spaces)
        text = self.tokenizer.decode(req.tokens, skip_special_tokens=True)
        stops = req.params.stop
        if stops and len(req.tokens) >= req.params.min_tokens:
            cut = find_stop(text, stops)
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
            req.handle._push("delta", text[req.sent : safe])
            req.sent = safe
        return True

    def _finish(self, req: Request, reason: str, error: BaseException | None = None) -> None:
        """End a request: exactly once, releasing its adapter first (whatever fails after)."""
        if req.handle.done:
            return
        with self._cond:
            self._taken.discard(req)
        self._release(req)
        now = time.monotonic()
        if req.sent < len(req.text) and reason != "error":
            req.handle._push("delta", req.text[req.sent :])
            req.sent = len(req.text)
        logprobs = None
        if req.logprobs is not None:
            # the EOS or stop id that ended the request was scored but is not in token_ids
            logprobs = list(req.logprobs[: len(req.tokens)])
        done = Completion(
            id=req.id,
            adapter=req.adapter,
            text=req.text,
            token_ids=list(req.tokens),
            finish_reason=reason,
            prompt_tokens=len(req.prompt_ids),
            completion_tokens=len(req.tokens),
            ttft=None if req.first_token_at is None else req.first_token_at - req.submitted,
            latency=now - req.submitted,
            error=error,
            logprobs=logprobs,
            cached_tokens=req.cached,
        )
        try:
            self.metrics.finished(done)
        finally:
            req.handle._push("done", done)

    def _release(self, req: Request) -> None:
        if req.acquired:
            req.acquired = False
            self.resolver.release(req.adapter)


def _shared(a: list[bytes], b: list[bytes]) -> int:
    """How many leading blocks two chains of block digests share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def vectors_like(zoo: Zoo) -> torch.Tensor:
    """An empty tensor of the zoo's dtype and device (what `Runtime.write_prefixes` casts to)."""
    return torch.empty(0, dtype=zoo.dtype, device=zoo.device)


def _fill(cache: Any, hits: list[tuple[int, torch.Tensor | None]], past: int) -> None:
    """Put each row's cached keys and values into an empty KV cache, right-aligned in `past`
    columns (zeros, masked, before a shorter opening and for rows with none)."""
    like = next(kv for tokens, kv in hits if tokens)
    layers, _, heads, _, dim = like.shape
    keys = like.new_zeros(layers, 2, len(hits), heads, past, dim)
    for i, (tokens, kv) in enumerate(hits):
        if tokens:
            keys[:, :, i, :, past - tokens :] = kv
    for layer in range(layers):
        cache.update(keys[layer, 0], keys[layer, 1], layer)


def _raise_if_unknown(ready: Future) -> None:
    """A resolver that already knows an adapter does not exist answers with a failed future."""
    if ready.done() and isinstance(ready.exception(), UnknownAdapterError):
        raise ready.exception()


def _request_error(req: Request, exc: BaseException, stage: str) -> RequestFailedError:
    """What a request fails with when its own forward raised (named errors keep their words)."""
    what = f"adapter {req.adapter!r}" if req.adapter else "the base"
    detail = str(exc) if isinstance(exc, AdapterZooError) else f"{type(exc).__name__}: {exc}"
    return RequestFailedError(f"{what} failed during {stage} of this request: {detail}")


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
            if text[end - k : end] == s[:k]:
                hold = max(hold, k)
                break
    return end - hold
