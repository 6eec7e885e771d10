"""A decode step that also prefills the requests joining it: one forward, the base's weights read once.

Why: on the CPU a decode step of 16 rows and the prefill of one 20-token prompt cost about the
same (SmolLM2-135M, float32: 178 ms and 174 ms at the same load), because each reads every weight
of the base once (about 540 MB). So the engine used to run a prefill as a forward of its own, and
held joiners back a few steps so that several shared it (`Engine.prefill_wait`), while their rows
stood empty: in benchmarks/vs_vllm.py's main shape a decode step had 12.5 of its 16 rows busy on
average. vLLM schedules a joining prompt's tokens into the same forward as the running rows' next
tokens. This module does the same.

How: every token of the step is a row of one token (`Zoo.forward_tokens`): first the running rows'
next tokens, then each joiner's prompt, left-padded to the longest, joiner after joiner. Linear
layers, norms and every adapter delta work token by token, so they see nothing else. Attention is
the one place where a token needs its request: `JoinStep` takes each layer's new keys and values
(it is the `cache` the layers update) and computes the layer's attention (`attend`) in two parts:
the running rows as a decode step against the running batch's cache, and the joiners as a causal
prefill against a cache of their own (with cached prompt blocks already in it, see
prefix_cache.py). Each token attends to exactly the keys it would attend to alone, so a request's
tokens are those of its solo run, as in a separate prefill (tests/serve/test_engine_ragged.py).

Joiners whose adapter adds virtual tokens (soft prompts) or prefix keys and values still prefill
apart (`Engine._join`): their virtual tokens enter at the input embedding and the cache's start.
"""

from __future__ import annotations

from typing import Any

import torch


class JoinStep:
    """The KV cache and the attention of one step that feeds running rows and joining prompts.

    `running`: the running batch's cache (one column is appended per layer, as a decode step does),
    `step_mask`: its mask including that column; `joining`: a cache for the joiners (empty, or
    holding their cached openings), `joining_mask`: (joiners, past + width), their mask including
    the `width` tokens each feeds now."""

    def __init__(self, running: Any, step_mask: torch.Tensor, joining: Any, joining_mask: torch.Tensor, width: int):
        self.running, self.joining = running, joining
        self.step_mask, self.joining_mask = step_mask, joining_mask
        self.decode_rows = step_mask.shape[0]
        self.joiners, self.width = joining_mask.shape[0], width
        self.decode_mask = step_mask.bool()[:, None, None, :]  # (rows, 1, 1, keys)
        past = joining_mask.shape[1] - width
        device = joining_mask.device
        query = torch.arange(width, device=device)[:, None]
        key = torch.arange(past + width, device=device)[None, :]
        mask = joining_mask.bool()[:, None, None, :] & (key <= past + query)  # (joiners, 1, width, keys): causal
        # a padding position attends to itself: no query row is without keys (SDPA would give NaN,
        # and NaN keys in masked columns would still reach real tokens through 0 * NaN); no real
        # token ever attends to a padding column, so what real tokens compute is unchanged
        self.join_mask = mask | (key == past + query)
        self.kv: dict[int, tuple[torch.Tensor, ...]] = {}  # layer -> the layer's keys and values for attend

    @property
    def rows(self) -> int:
        """Rows of one token in the step: the running rows, then every joiner's `width` tokens."""
        return self.decode_rows + self.joiners * self.width

    def positions(self) -> torch.Tensor:
        """Each token's position, as its request's solo run has it (counted from the masks)."""
        decode = self.step_mask.long().sum(-1) - 1
        joining = self.joining_mask.long().cumsum(-1)[:, -self.width :] - 1
        return torch.cat([decode, joining.clamp(min=0).flatten()])

    def last_tokens(self) -> torch.Tensor:
        """The rows whose logits are sampled: every running row, and each joiner's last token."""
        device = self.decode_mask.device
        joiners = self.decode_rows + torch.arange(self.joiners, device=device) * self.width + self.width - 1
        return torch.cat([torch.arange(self.decode_rows, device=device), joiners])

    # -- the cache protocol the model's attention layers use
    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        d = self.decode_rows
        running = self.running.update(keys[:d], values[:d], layer_idx)
        joining = self.joining.update(self._by_joiner(keys[d:]), self._by_joiner(values[d:]), layer_idx)
        self.kv[layer_idx] = (*running, *joining)
        return keys, values  # unused: `attend` reads what the two caches hold

    def _by_joiner(self, t: torch.Tensor) -> torch.Tensor:
        """(joiners * width, heads, 1, head_dim) -> (joiners, heads, width, head_dim)."""
        return t.reshape(self.joiners, self.width, t.shape[1], t.shape[3]).transpose(1, 2)

    # -- the attention (runtime.attention_by)
    def attend(self, module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, **kwargs: Any):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        running_keys, running_values, joining_keys, joining_values = self.kv.pop(module.layer_idx)
        d = self.decode_rows
        decode, _ = sdpa_attention_forward(
            module, query[:d], running_keys, running_values, self.decode_mask, **kwargs
        )  # (rows, 1, heads, head_dim)
        joining, _ = sdpa_attention_forward(
            module, self._by_joiner(query[d:]), joining_keys, joining_values, self.join_mask, **kwargs
        )  # (joiners, width, heads, head_dim)
        return torch.cat([decode, joining.reshape(-1, 1, *joining.shape[2:])], 0), None
