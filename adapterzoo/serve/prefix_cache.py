"""Automatic prefix caching: the keys and values of prompt blocks that earlier requests computed,
reused by later requests that start with the same tokens (vLLM's automatic prefix caching).

Why: requests often share a long opening (a system prompt, a document, few-shot examples). A
prefill costs about as much per prompt token as anything the engine does, so a shared opening
computed once is that much less work for every later request: on benchmarks/vs_vllm.py's
512-token shape, whose prompts share a ~500-token opening, see docs/serving.md.

A prompt is cut into blocks of `BLOCK` tokens. A block is known by a digest of its tokens and of
every block before it (so it stands for the whole prefix up to its end, as vLLM's block hashes
do), under a root that says what computed it:

- the tenant: blocks are never shared across tenants. A hit is faster than a miss, so a shared
  cache would let one tenant learn, by timing, what another tenant's prompts start with (vLLM
  offers `cache_salt` for the same reason);
- the adapter, by identity and version: every adapter type that changes keys or values (LoRA on
  q/k/v, BitFit, Houlsby before the next layer, ...) makes different blocks, and a reloaded or
  retrained adapter never meets its old blocks.

Only rows without virtual tokens take part (no soft prompt or prefix adapter: their virtual
tokens shift every position). A request reuses its longest run of cached blocks from the start,
leaving at least one prompt token to compute (the first token is sampled from its logits).
Reused keys and values are the ones a solo run computes, so results are unchanged up to float
rounding (tests/serve/test_prefix_cache.py: greedy tokens equal, logits to 1e-4).

Memory: `max_bytes` in all (each token holds 2 x layers x kv_heads x head_dim floats: 46 KB for
SmolLM2-135M in float32); the least recently used blocks go first. Engine thread only.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Hashable, Sequence

import torch

BLOCK = 16


class PrefixCache:
    """Prompt blocks' keys and values, by chain digest, least recently used first out."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max(0, int(max_bytes))
        self.blocks: OrderedDict[bytes, torch.Tensor] = OrderedDict()  # digest -> (layers, 2, kv, BLOCK, hd)
        self.bytes = 0
        # who stored each block, and how much each owner (tenant) holds: past an equal share of
        # the budget, an owner's new blocks push out its own oldest ones, not another tenant's
        self.owner: dict[bytes, Hashable] = {}
        self.held: dict[Hashable, int] = {}
        self.hit_tokens = 0  # prompt tokens served from the cache, in all
        self.evictions = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    @staticmethod
    def digests(root: Hashable, ids: Sequence[int]) -> list[bytes]:
        """The chain digest of each full block of `ids` under `root`."""
        out: list[bytes] = []
        parent = hashlib.blake2b(repr(root).encode(), digest_size=16).digest()
        for start in range(0, len(ids) - BLOCK + 1, BLOCK):
            block = ",".join(str(int(t)) for t in ids[start : start + BLOCK]).encode()
            parent = hashlib.blake2b(parent + block, digest_size=16).digest()
            out.append(parent)
        return out

    def lookup(self, root: Hashable, ids: Sequence[int]) -> tuple[int, torch.Tensor | None]:
        """(tokens, their keys and values as (layers, 2, kv, tokens, hd)) of the longest cached run
        of blocks that opens `ids`, leaving at least one token to compute; (0, None) on a miss."""
        if not self.enabled:
            return 0, None
        found: list[bytes] = []
        for digest in self.digests(root, ids[: len(ids) - 1]):
            if digest not in self.blocks:
                break
            found.append(digest)
        if not found:
            return 0, None
        self._touch(found)
        tokens = len(found) * BLOCK
        self.hit_tokens += tokens
        return tokens, torch.cat([self.blocks[d] for d in found], dim=3)

    def store(self, root: Hashable, ids: Sequence[int], kv: torch.Tensor, first: int, owner: Hashable = None) -> None:
        """Keep the full blocks of `ids` from token `first` on (a multiple of BLOCK), given `kv`,
        (layers, 2, kv, len(ids) - first, hd): the keys and values of those tokens. `owner` (the
        tenant) is charged for them."""
        if not self.enabled:
            return
        digests = self.digests(root, ids)
        for j in range(first // BLOCK, len(digests)):
            if digests[j] in self.blocks:
                continue
            start = j * BLOCK - first
            block = kv[:, :, :, start : start + BLOCK].clone()
            size = block.numel() * block.element_size()
            while self.bytes + size > self.max_bytes:
                victim = self._victim(owner, size)
                if victim is None or victim in digests[:j]:  # it would push out its own opening: keep that
                    self._touch(digests[:j])
                    return
                self._drop(victim)
            self.blocks[digests[j]] = block
            self.owner[digests[j]] = owner
            self.held[owner] = self.held.get(owner, 0) + size
            self.bytes += size
        self._touch(digests)

    def _victim(self, owner: Hashable, size: int) -> bytes | None:
        """The block to push out for `owner`'s next one: its own least recently used when it holds
        over an equal share of the budget (one tenant's flood of one-off prompts churns only its
        own blocks, tests/serve/test_prefix_cache.py), else the least recently used of all."""
        share = self.max_bytes / max(1, len(self.held | {owner: 0}))
        if self.held.get(owner, 0) + size > share:
            return next((d for d in self.blocks if self.owner[d] == owner), None)
        return next(iter(self.blocks), None)

    def _drop(self, digest: bytes) -> None:
        block = self.blocks.pop(digest)
        owner = self.owner.pop(digest)
        size = block.numel() * block.element_size()
        self.bytes -= size
        self.held[owner] -= size
        if not self.held[owner]:
            del self.held[owner]
        self.evictions += 1

    def _touch(self, chain: list[bytes]) -> None:
        """Mark a chain's blocks used, its opening last: a block is useless without those before
        it, so the least recently used end of the cache holds chains' tails, which go first."""
        for digest in reversed(chain):
            if digest in self.blocks:
                self.blocks.move_to_end(digest)
