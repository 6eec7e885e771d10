"""How a request picks its tokens: `SamplingParams`, the penalties, and each token's logprob.

What the engine applies to one row's scores, apart from the loop that batches rows (engine.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import BatchError
from ..generate import SAMPLING_EPS

MAX_LOGPROBS = 20  # top alternatives per token at most (OpenAI's limit)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. temperature 0 (the default) is greedy; so is any temperature below
    `SAMPLING_EPS` (dividing logits by 1e-40 overflows them to inf)."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()  # also accepts one string, any sequence of strings, or None
    ignore_eos: bool = False  # always generate max_tokens (benchmarks)
    min_tokens: int = 0  # EOS and stop_token_ids cannot end the request before this many tokens
    stop_token_ids: tuple[int, ...] = ()  # generating one of these ends the request (not in the text)
    presence_penalty: float = 0.0  # OpenAI's: minus this for every token already generated
    frequency_penalty: float = 0.0  # OpenAI's: minus this times how often it was generated
    repetition_penalty: float = 1.0  # HF's/vLLM's: over prompt and output, > 1 discourages repeats
    logprobs: int | None = None  # record each chosen token's logprob and this many top alternatives

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 0:
            raise BatchError(f"max_tokens must be a non-negative integer, got {self.max_tokens!r}")
        if not (
            isinstance(self.temperature, (int, float)) and 0 <= self.temperature and math.isfinite(self.temperature)
        ):
            raise BatchError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not (0 < self.top_p <= 1):
            raise BatchError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k < 0:
            raise BatchError(f"top_k must be >= 0, got {self.top_k!r}")
        if not (isinstance(self.min_tokens, int) and 0 <= self.min_tokens <= max(self.max_tokens, 0)):
            raise BatchError(
                f"min_tokens must be an integer in [0, max_tokens={self.max_tokens}], got {self.min_tokens!r}"
            )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and -2 <= value <= 2):
                raise BatchError(f"{name} must be a number in [-2, 2], got {value!r}")
        if not (isinstance(self.repetition_penalty, (int, float)) and 0 < self.repetition_penalty <= 2):
            raise BatchError(f"repetition_penalty must be a number in (0, 2], got {self.repetition_penalty!r}")
        if self.logprobs is not None and not (isinstance(self.logprobs, int) and 0 <= self.logprobs <= MAX_LOGPROBS):
            raise BatchError(f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        stop = () if self.stop is None else (self.stop,) if isinstance(self.stop, str) else self.stop
        object.__setattr__(self, "stop", tuple(s for s in stop if s))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in (self.stop_token_ids or ())))

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    @property
    def penalised(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1)

    @property
    def plain(self) -> bool:
        """Greedy with nothing to adjust or record: the batch's argmax is this row's token."""
        return self.greedy and not self.penalised and not self.min_tokens and self.logprobs is None


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token: its log-probability under the model (raw logits, before temperature
    and penalties, as vLLM reports by default) and the `logprobs` most likely alternatives."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def apply_penalties(
    scores: torch.Tensor, prompt: Sequence[int], output: Sequence[int], p: SamplingParams
) -> torch.Tensor:
    """vLLM's penalties on one row's scores: repetition over prompt and output tokens (a positive
    score divided by it, a negative one multiplied), then frequency and presence over the output."""
    scores = scores.clone()
    if p.repetition_penalty != 1:
        seen = torch.tensor(sorted({*prompt, *output}), dtype=torch.long, device=scores.device)
        picked = scores[seen]
        scores[seen] = torch.where(picked > 0, picked / p.repetition_penalty, picked * p.repetition_penalty)
    if output and (p.frequency_penalty or p.presence_penalty):
        counts = torch.bincount(torch.tensor(output, dtype=torch.long), minlength=scores.shape[-1]).to(scores)
        scores -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(scores)
    return scores


def token_logprob(raw: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """The chosen token's log-probability under the raw scores, and the `top` most likely."""
    logprobs = raw.float().log_softmax(-1)
    alternatives: tuple[tuple[int, float], ...] = ()
    if top:
        values, ids = logprobs.topk(min(top, logprobs.shape[-1]))
        alternatives = tuple(zip(ids.tolist(), values.tolist()))
    return TokenLogprob(token, float(logprobs[token]), alternatives)
