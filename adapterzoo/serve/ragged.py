"""A decode step that also prefills the requests joining it: one forward, the base's weights read once.

Why: on the CPU a decode step of 16 rows and the prefill of one 20-token prompt cost about the
same (SmolLM2-135M, float32: 178 ms and 174 ms at the same load), because each reads every weight
of the base once (about 540 MB). So the engine used to run a prefill as a forward of its own, and
held joiners back a few steps so that several shared it (`Engine.prefill_wait`), while their rows
stood empty: in benchmarks/vs_vllm.py's main shape a decode step had 12.5 of its 16 rows busy on
average. vLLM schedules a joining prompt's tokens into the same forward as the running rows' next
tokens. This module does the same.

How: every token of the step is a row of one token (`Zoo.forward_tokens`): first the running rows'
next tokens, then each joiner's tokens, joiner after joiner, with no padding between them.
Linear layers, norms and every adapter delta work token by token, so they see nothing else.
Attention is the one place where a token needs its request: `JoinStep` takes each layer's new keys
and values (it is the `cache` the layers update) and computes the layer's attention (`attend`) in
two parts: the running rows as a decode step against the running batch's cache, and the joiners,
left-padded to the longest in there only, as a causal prefill against a cache of their own (with
cached prompt blocks or prefix adapters' keys and values already in it). Each token attends to
exactly the keys it would attend to alone, so a request's tokens are those of its solo run, as in
a separate prefill (tests/serve/test_engine_ragged.py).

A soft prompt's virtual tokens are rows of the step too, before its prompt (their input
embeddings are the adapter's vectors); a prefix adapter's keys and values go into the joiner's
cache first, as `Zoo.forward` puts them at a prefill.
"""

from __future__ import annotations

from typing import Any

import torch


class JoinStep:
    """The KV cache and the attention of one step that feeds running rows and joining prompts.

    `running`: the running batch's cache (one column is appended per layer, as a decode step does),
    `step_mask`: its mask including that column; `joining`: a cache for the joiners (empty, or
    holding `past` columns: cached prompt blocks, prefixes), `joining_mask`: (joiners, past + width),
    their mask including the tokens each feeds now, left-padded to the longest (`lengths[i]` tokens
    for joiner i). The step's rows carry no padding: joiner i's tokens follow joiner i - 1's."""

    def __init__(
        self, running: Any, step_mask: torch.Tensor, joining: Any, joining_mask: torch.Tensor, lengths: list[int]
    ):
        self.running, self.joining = running, joining
        self.step_mask, self.joining_mask = step_mask, joining_mask
        self.decode_rows = step_mask.shape[0]
        self.lengths = lengths
        self.joiners, self.width = len(lengths), max(lengths)
        device = joining_mask.device
        # where each joiner token sits in the padded (joiners * width) layout that the joiners'
        # cache and their attention use (left-padded, as a separate prefill would have them)
        self.padded_at = torch.tensor(
            [i * self.width + self.width - n + c for i, n in enumerate(lengths) for c in range(n)],
            dtype=torch.long,
            device=device,
        )
        self.decode_mask = step_mask.bool()[:, None, None, :]  # (rows, 1, 1, keys)
        past = joining_mask.shape[1] - self.width
        query = torch.arange(self.width, device=device)[:, None]
        key = torch.arange(past + self.width, device=device)[None, :]
        mask = joining_mask.bool()[:, None, None, :] & (key <= past + query)  # (joiners, 1, width, keys): causal
        # a padding position attends to itself (its key and value are zeros): no query row is
        # without keys (SDPA would give NaN there); no real token attends to a padding column
        self.join_mask = mask | (key == past + query)
        self.kv: dict[int, tuple[torch.Tensor, ...]] = {}  # layer -> the layer's keys and values for attend

    @property
    def rows(self) -> int:
        """Rows of one token in the step: the running rows, then every joiner's tokens."""
        return self.decode_rows + sum(self.lengths)

    def positions(self) -> torch.Tensor:
        """Each token's position, as its request's solo run has it (counted from the masks)."""
        decode = self.step_mask.long().sum(-1) - 1
        joining = self.joining_mask.long().cumsum(-1)[:, -self.width :] - 1
        return torch.cat([decode, joining.clamp(min=0).flatten().index_select(0, self.padded_at)])

    def last_tokens(self) -> torch.Tensor:
        """The rows whose logits are sampled: every running row, and each joiner's last token."""
        ends = torch.tensor(self.lengths, device=self.step_mask.device).cumsum(0) - 1
        return torch.cat([torch.arange(self.decode_rows, device=ends.device), self.decode_rows + ends])

    # -- the cache protocol the model's attention layers use
    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        d = self.decode_rows
        running = self.running.update(keys[:d], values[:d], layer_idx)
        joining = self.joining.update(self._padded(keys[d:]), self._padded(values[d:]), layer_idx)
        self.kv[layer_idx] = (*running, *joining)
        return keys, values  # unused: `attend` reads what the two caches hold

    def _padded(self, t: torch.Tensor) -> torch.Tensor:
        """(joiner tokens, heads, 1, head_dim) -> (joiners, heads, width, head_dim), zeros at padding."""
        heads, dim = t.shape[1], t.shape[3]
        # index_copy / index_select, not out[padded_at] = ... / t[padded_at]: advanced indexing runs
        # a parallel kernel that wakes the other OpenMP threads for a few KB (three calls a layer)
        out = t.new_zeros(self.joiners * self.width, heads, dim).index_copy_(0, self.padded_at, t[:, :, 0])
        return out.view(self.joiners, self.width, heads, dim).transpose(1, 2)

    # -- the attention (runtime.attention_by)
    def attend(self, module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, **kwargs: Any):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        running_keys, running_values, joining_keys, joining_values = self.kv.pop(module.layer_idx)
        d = self.decode_rows
        decode, _ = sdpa_attention_forward(
            module, query[:d], running_keys, running_values, self.decode_mask, **kwargs
        )  # (rows, 1, heads, head_dim)
        joining, _ = sdpa_attention_forward(
            module, self._padded(query[d:]), joining_keys, joining_values, self.join_mask, **kwargs
        )  # (joiners, width, heads, head_dim)
        joining = joining.reshape(self.joiners * self.width, 1, *joining.shape[2:]).index_select(0, self.padded_at)
        return torch.cat([decode, joining], 0), None
