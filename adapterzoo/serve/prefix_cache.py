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

    def store(self, root: Hashable, ids: Sequence[int], kv: torch.Tensor, first: int) -> None:
        """Keep the full blocks of `ids` from token `first` on (a multiple of BLOCK), given `kv`,
        (layers, 2, kv, len(ids) - first, hd): the keys and values of those tokens."""
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
                oldest = next(iter(self.blocks), None)
                if oldest is None or oldest in digests[:j]:  # it would push out its own opening: keep that
                    self._touch(digests[:j])
                    return
                self.bytes -= self.blocks.pop(oldest).numel() * block.element_size()
                self.evictions += 1
            self.blocks[digests[j]] = block
            self.bytes += size
        self._touch(digests)

    def _touch(self, chain: list[bytes]) -> None:
        """Mark a chain's blocks used, its opening last: a block is useless without those before
        it, so the least recently used end of the cache holds chains' tails, which go first."""
        for digest in reversed(chain):
            if digest in self.blocks:
                self.blocks.move_to_end(digest)
