"""What the engine keeps per request and per batch, apart from the loop that runs them (engine.py).

- `Request`: one request's state from submit to its end (tokens, text sent, its adapter's hold);
  `Completion`: what it produced.
- `RunningBatch`: the rows decoding together and what they share: one KV cache, one left-padded
  mask, the tokens fed next, and the batch plan (built once per membership). Rows leave
  (`keep`) and join (`merge`) between steps; columns no row attends to any more are cut.
- `Room`: what the running batch leaves for joiners at one step (rows, slots per pool, a
  tenant's resident slots, the prefill token budget): the admission bookkeeping.
"""

from __future__ import annotations

import collections
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .sampling import SamplingParams, TokenLogprob

if TYPE_CHECKING:  # pragma: no cover
    from .engine import Engine, RequestHandle


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
    logprobs: list[TokenLogprob] | None = None  # one per token in token_ids (when asked for)
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache


@dataclass(eq=False)
class Request:
    """One request from submit to its end: what it asked, and how far it got."""

    prompt_ids: list[int]
    adapter: str | None
    params: SamplingParams
    tenant: str | None = None
    id: str = field(default_factory=lambda: f"req-{uuid.uuid4().hex[:16]}")  # unique across engines and replicas
    # set by the engine
    engine: Engine | None = None
    submitted: float = 0.0
    first_token_at: float | None = None
    ready: Future | None = None  # resolves when the adapter is in host memory
    virtual: int = 0  # virtual tokens (soft prompt) that enter the cache
    prefix: int = 0  # prefix tokens (positions shift by this much)
    cached: int = 0  # prompt tokens the prefix cache gave it (serve/prefix_cache.py)
    tokens: list[int] = field(default_factory=list)
    sent: int = 0  # characters of text already sent as deltas
    text: str = ""
    generator: torch.Generator | None = None
    handle: RequestHandle | None = None
    acquired: bool = False
    progressed: float = 0.0  # when it last made progress (joined, or got a token): the watchdog reads it
    logprobs: list[TokenLogprob] | None = None

    @property
    def cancelled(self) -> bool:
        return self.handle is not None and self.handle.cancelled


class RunningBatch:
    """The rows decoding together, their shared KV cache and mask (engine thread only; other
    threads only read `rows`, for stats and the watchdog).

    Each row keeps its own left-padded mask, so its positions, keys and values are exactly those
    of a solo run: merging pads the shorter side with masked zeros, and cutting columns no row
    uses moves nothing."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.rows: list[Request] = []
        self.cache: Any = None
        self.mask: torch.Tensor | None = None  # (B, L): the mask of what the cache holds
        self.next: torch.Tensor | None = None  # (B,): each row's last sampled token, fed next
        self.plan: Any = None  # the BatchPlan for `rows`; None: build it again (membership changed)

    def keep(self, indices: list[int]) -> None:
        """Only the rows at `indices` stay (their cache, mask and next token with them)."""
        if len(indices) == len(self.rows):
            return
        if not indices:
            self.reset()
            return
        self.rows = [self.rows[i] for i in indices]
        idx = torch.tensor(indices, device=self.mask.device)
        self.cache.batch_select_indices(idx)
        self.mask = self.mask.index_select(0, idx)
        self.next = self.next.index_select(0, idx)
        self.trim()
        self.plan = None

    def merge(self, rows: list[Request], cache: Any, mask: torch.Tensor, nxt: torch.Tensor) -> None:
        """Append rows (with their cache and mask) to the batch, left-padding the side with the
        shorter history: padded columns are masked zeros, so positions do not move."""
        self.plan = None
        if not self.rows:
            self.rows, self.cache, self.mask, self.next = list(rows), cache, mask, nxt
            self.trim()
            return
        old_len, new_len = self.mask.shape[1], mask.shape[1]
        length = max(old_len, new_len)
        pad = torch.nn.functional.pad
        for mine, theirs in zip(self.cache.layers, cache.layers):
            k_old, v_old, k_new, v_new = mine.keys, mine.values, theirs.keys, theirs.values
            mine.keys = torch.cat([pad(k_old, (0, 0, length - old_len, 0)), pad(k_new, (0, 0, length - new_len, 0))], 0)
            mine.values = torch.cat(
                [pad(v_old, (0, 0, length - old_len, 0)), pad(v_new, (0, 0, length - new_len, 0))], 0
            )
        self.mask = torch.cat([pad(self.mask, (length - old_len, 0)), pad(mask, (length - new_len, 0))], 0)
        self.next = torch.cat([self.next, nxt], 0)
        self.rows.extend(rows)
        self.trim()

    def trim(self) -> None:
        """Cut leading columns that no row attends to any more (they only cost time)."""
        used = self.mask.any(0).nonzero()
        first = int(used[0]) if len(used) else 0
        if first > 0:
            self.mask = self.mask[:, first:]
            for layer in self.cache.layers:
                if getattr(layer, "keys", None) is not None and layer.keys.numel():
                    layer.keys = layer.keys[..., first:, :]
                    layer.values = layer.values[..., first:, :]

    def step_mask(self) -> torch.Tensor:
        """The mask of a decode step: what the cache holds, plus the token fed now."""
        return torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], 1)

    def undo_step(self) -> None:
        """A decode forward raised: cut the column the layers it reached wrote, so the step can
        run again exactly (no token was taken)."""
        width = self.mask.shape[1]
        for layer in self.cache.layers:
            if getattr(layer, "keys", None) is not None and layer.keys.numel() and layer.keys.shape[-2] > width:
                layer.keys = layer.keys[..., :width, :]
                layer.values = layer.values[..., :width, :]
        self.plan = None


class Room:
    """What the running batch leaves for joiners at one step. `fits` asks, `take` books.

    Limits: `max_rows` rows in all and `max_rows_per_tenant` per tenant (None: no cap), the
    `slots` of each slot pool, a tenant's resident-slot limit (distinct adapters its rows hold),
    and `budget` prompt tokens prefilled together (the first joiner always fits it)."""

    def __init__(
        self, rows: list[Request], pool_of, *, max_rows: int, max_rows_per_tenant: int | None, slots: int, budget: int
    ):
        self.pool_of = pool_of  # adapter name -> its slot pool's key
        self.max_rows, self.max_rows_per_tenant, self.slots, self.budget = max_rows, max_rows_per_tenant, slots, budget
        self.used = len(rows)
        self.joined = 0
        self.per_tenant: collections.Counter[str | None] = collections.Counter(r.tenant for r in rows)
        self.by_pool: dict[tuple, set[str]] = {}
        self.resident: dict[str | None, set[str]] = {}
        for r in rows:
            if r.adapter is not None:
                self.by_pool.setdefault(pool_of(r.adapter), set()).add(r.adapter)
                self.resident.setdefault(r.tenant, set()).add(r.adapter)

    def row_for(self, tenant: str | None) -> bool:
        """A free row, within the tenant's share (the rest of the batch stays free for others)."""
        if self.used >= self.max_rows:
            return False
        return self.max_rows_per_tenant is None or self.per_tenant[tenant] < self.max_rows_per_tenant

    def waits_for_rows(self, tenant: str | None) -> bool:
        """Turned away only because the batch has no free row (within its tenant's share it has
        one): it joins as rows end, so joiners may be held for it (`Engine._hold`)."""
        within_share = self.max_rows_per_tenant is None or self.per_tenant[tenant] < self.max_rows_per_tenant
        return self.used >= self.max_rows and within_share

    def slot_for(self, adapter: str, tenant: str | None, limit: int | None) -> bool:
        """Its adapter already has a slot in the batch, or its pool and its tenant have one free."""
        in_pool = self.by_pool.get(self.pool_of(adapter), set())
        if adapter not in in_pool and len(in_pool) >= self.slots:
            return False  # every slot of its pool is in use by the batch
        mine = self.resident.get(tenant, set())
        return adapter in mine or limit is None or len(mine) < limit

    def prefill_for(self, cost: int) -> bool:
        return not self.joined or cost <= self.budget

    def take(self, req: Request, cost: int) -> None:
        self.budget -= cost
        if req.adapter is not None:
            self.by_pool.setdefault(self.pool_of(req.adapter), set()).add(req.adapter)
            self.resident.setdefault(req.tenant, set()).add(req.adapter)
        self.used += 1
        self.joined += 1
        self.per_tenant[req.tenant] += 1
