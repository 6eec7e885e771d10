"""Mixed-batch generation with a KV cache: every row its own adapter, one forward per step.

Prompts are left-padded so every row's next token sits in the last column. Soft prompts enter
once, at prefill, and then live in the cache like any other token; so do prefix keys and
values, written into the cache at prefill; delta types act at every step. Finished rows keep stepping
(on a pad token, masked out) until every row is done, so the batch shape never changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from .errors import BatchError

if TYPE_CHECKING:
    from .zoo import Zoo


def encode_left_padded(tokenizer, prompts: Sequence[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    if any(len(x) == 0 for x in ids):
        raise BatchError("every prompt must have at least one token; got an empty prompt")
    width = max(len(x) for x in ids)
    pad = pad_token_id(tokenizer)
    input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, width - len(x) :] = torch.tensor(x)
        mask[i, width - len(x) :] = 1
    return input_ids.to(device), mask.to(device)


# Temperatures below this sample greedily (vLLM's rule): logits / 1e-40 overflow to inf, and
# the softmax of inf is NaN.
SAMPLING_EPS = 1e-5


def pad_token_id(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if tid is not None:
            return tid
    return 0


def sample_next(
    logits: torch.Tensor,
    *,
    do_sample: bool,
    temperature: float,
    top_k: int,
    top_p: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Greedy argmax, or sampling with temperature, top-k and top-p (nucleus) filtering."""
    if not do_sample or temperature < SAMPLING_EPS:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


@torch.inference_mode()
def generate(
    zoo: Zoo,
    prompts: Sequence[str],
    adapters: Sequence[str | None] | None = None,
    *,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop: Sequence[str] | None = None,
    skip_special_tokens: bool = True,
) -> list[str]:
    """Continuations of `prompts` (strings), row i with `adapters[i]`."""
    if zoo.tokenizer is None or not zoo.is_causal_lm:
        raise BatchError("generate needs a causal language model base with a tokenizer")
    if isinstance(prompts, str):
        prompts = [prompts]
    if isinstance(adapters, str):
        raise BatchError(f"adapters={adapters!r}: give a list with one name (or None) per row")
    adapters = list(adapters) if adapters is not None else [None] * len(prompts)
    if len(adapters) != len(prompts):
        raise BatchError(f"{len(prompts)} prompts but {len(adapters)} adapters; give one adapter (or None) per prompt")
    if max_new_tokens < 0:
        raise BatchError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    tok = zoo.tokenizer
    input_ids, mask = encode_left_padded(tok, prompts, zoo.device)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    plan = zoo.plan(adapters, training=False)
    eos = tok.eos_token_id
    pad = pad_token_id(tok)
    batch = len(prompts)
    out_tokens: list[list[int]] = [[] for _ in range(batch)]
    done = torch.zeros(batch, dtype=torch.bool)
    cache = zoo.new_cache()
    step_ids = input_ids
    for _ in range(max_new_tokens):
        out = zoo.forward(step_ids, mask, plan=plan, cache=cache)
        cache, mask = out.cache, out.attention_mask
        nxt = sample_next(
            out.logits[:, -1],
            do_sample=do_sample,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            generator=generator,
        )
        nxt = torch.where(done.to(nxt.device), torch.full_like(nxt, pad), nxt)
        for i, t in enumerate(nxt.tolist()):
            if done[i]:
                continue
            if eos is not None and t == eos:
                done[i] = True
                continue
            out_tokens[i].append(t)
            if stop and _hits_stop(tok, out_tokens[i], stop):
                done[i] = True
        if bool(done.all()):
            break
        step_ids = nxt[:, None]
        mask = torch.cat([mask, (~done).long().to(mask.device)[:, None]], dim=1)
    texts = [tok.decode(t, skip_special_tokens=skip_special_tokens) for t in out_tokens]
    return [_cut_at_stop(t, stop) for t in texts] if stop else texts


def _hits_stop(tok, tokens: list[int], stop: Sequence[str]) -> bool:
    tail = tok.decode(tokens[-16:], skip_special_tokens=True)
    return any(s in tail for s in stop)


def find_stop(text: str, stop: Sequence[str]) -> int:
    """Where `text` is cut: the start of the earliest stop string in it, or -1 when none is
    (zoo.generate and the serving engine both cut here)."""
    return min((text.find(s) for s in stop if s in text), default=-1)


def _cut_at_stop(text: str, stop: Sequence[str]) -> str:
    cut = find_stop(text, stop)
    return text[:cut] if cut >= 0 else text
