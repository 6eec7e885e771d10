"""`TrainOptions`: every option of `train()`, its default, and its check.

    zoo.train("a", examples, epochs=3, lr=2e-3)                          # keywords, as always
    zoo.train("a", examples, options=TrainOptions(epochs=3, lr=2e-3))    # the same, as one value

`check()` refuses a bad option before anything changes, naming the option and what to give
instead; `seeds`, `lrs` and `targets` spread the per-run options over the adapters.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import TrainingError

if TYPE_CHECKING:  # pragma: no cover
    from ..adapter import Adapter
    from .report import StepInfo

FALLBACK_LR = 1e-3
SCHEDULES = ("linear", "cosine", "constant")
METRICS = ("auto", "exact_match", "accuracy", "loss")
AUTOCAST = (None, "bfloat16")


@dataclass
class TrainOptions:
    """How `train()` trains; each field is one of its keyword options (see `train` for what they mean)."""

    eval_examples: Any = None
    epochs: int = 1
    max_steps: int | None = None
    lr: float | Mapping[str, float] | None = None
    batch_size: int = 8
    grad_accum: int = 1
    warmup: float = 0.06
    schedule: str = "linear"
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    eval_every: int | None = None
    eval_metric: str = "auto"
    patience: int | None = None
    eval_batch_size: int = 32
    max_new_tokens: int | None = None
    restore_best: bool = True
    checkpoint_dir: str | os.PathLike | None = None
    checkpoint_every: int | None = None
    keep_checkpoints: int = 2
    resume: bool = False
    seed: int | Sequence[int] = 0
    adapter_type: str | None = None
    save_to: str | os.PathLike | Mapping[str, str | os.PathLike] | None = None
    metadata: dict | None = None
    progress: bool = True
    on_step: Callable[[StepInfo], None] | None = None
    # "bfloat16": the training forward and backward under torch.autocast (a float32 base's matmuls
    # in bfloat16, ~10x faster on a CPU with AMX). Not the same loss to the last bit: opt-in.
    autocast: str | None = None

    @classmethod
    def merged(cls, options: TrainOptions | None, keywords: Mapping[str, Any]) -> TrainOptions:
        """`options` (or the defaults) with `keywords` on top; an unknown keyword is a TypeError, as
        for any function."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(keywords) - known)
        if unknown:
            raise TypeError(
                f"train() got an unexpected keyword argument {unknown[0]!r}; "
                f"the options are: {', '.join(sorted(known))}"
            )
        if options is not None and not isinstance(options, cls):
            raise TypeError(f"options must be a TrainOptions, got {type(options).__name__}")
        base = options if options is not None else cls()
        return cls(**{**{f.name: getattr(base, f.name) for f in fields(cls)}, **keywords})

    def check(self) -> None:
        """Raise `TrainingError` naming the first bad option (and what to give instead).

        `train()` calls it, after checking the adapter names; construction does not, so that a
        `TrainOptions` can be built, then changed with `dataclasses.replace`, before it is used."""
        _positive_int("batch_size", self.batch_size)
        _positive_int("grad_accum", self.grad_accum)
        _positive_int("eval_batch_size", self.eval_batch_size)
        _positive_int("max_steps", self.max_steps, allow_none=True)
        _positive_int("eval_every", self.eval_every, allow_none=True)
        _positive_int("checkpoint_every", self.checkpoint_every, allow_none=True)
        _positive_int("keep_checkpoints", self.keep_checkpoints)
        if self.max_steps is None:
            _positive_int("epochs", self.epochs)
        if self.schedule not in SCHEDULES:
            raise TrainingError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.eval_metric not in METRICS:
            raise TrainingError(f"eval_metric must be one of {', '.join(METRICS)}, got {self.eval_metric!r}")
        w = self.warmup
        if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0 or not math.isfinite(w):
            raise TrainingError(f"warmup must be a fraction of the steps (< 1) or a number of steps, got {w!r}")
        if not isinstance(self.weight_decay, (int, float)) or self.weight_decay < 0:
            raise TrainingError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        g = self.max_grad_norm
        if g is not None and (not isinstance(g, (int, float)) or not g > 0):
            raise TrainingError(f"max_grad_norm must be > 0 or None, got {g!r}")
        if self.patience is not None:
            _positive_int("patience", self.patience)
            if self.eval_every is None or self.eval_examples is None:
                raise TrainingError("patience (early stopping) needs eval_examples and eval_every")
        if self.autocast not in AUTOCAST:
            raise TrainingError(f"autocast must be None or 'bfloat16', got {self.autocast!r}")
        if self.resume and self.checkpoint_dir is None:
            raise TrainingError("resume=True needs checkpoint_dir, the folder the interrupted run wrote checkpoints to")

    def total_steps(self, steps_per_epoch: int) -> int:
        """Optimizer steps of an adapter whose data make `steps_per_epoch` steps."""
        return self.max_steps if self.max_steps is not None else self.epochs * steps_per_epoch

    def warmup_steps(self, total: int) -> int:
        """`warmup` as a step count (a fraction of `total` if < 1), always leaving one step to decay."""
        warm = round(self.warmup * total) if self.warmup < 1 else int(self.warmup)
        return min(warm, max(0, total - 1))

    def seeds(self, names: list[str]) -> list[int]:
        """One seed per adapter."""
        seed = self.seed
        seeds = [seed] * len(names) if not isinstance(seed, Sequence) else list(seed)
        if len(seeds) != len(names) or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
            raise TrainingError(f"seed must be a non-negative int or one per adapter, got {seed!r}")
        return seeds

    def lrs(self, adapters: list[Adapter]) -> list[float]:
        """One learning rate per adapter: `lr`, its entry in `lr`, or its type's default."""
        out = []
        for a in adapters:
            value = self.lr.get(a.name) if isinstance(self.lr, Mapping) else self.lr
            value = default_lr(a.atype) if value is None else value
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise TrainingError(f"learning rate for {a.name!r} must be a positive finite number, got {value!r}")
            out.append(float(value))
        return out

    def targets(self, names: list[str], single: bool) -> dict[str, Path]:
        """The folder each adapter is saved to at the end (none without `save_to`)."""
        save_to = self.save_to
        if save_to is None:
            return {}
        if isinstance(save_to, Mapping):
            missing = [n for n in names if n not in save_to]
            if missing:
                raise TrainingError(f"save_to has no folder for {missing}")
            return {n: Path(save_to[n]) for n in names}
        if single:
            return {names[0]: Path(save_to)}
        return {n: Path(save_to) / n for n in names}


def _positive_int(key: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise TrainingError(
            f"{key} must be a positive integer{' or None' if allow_none else ''}, got {value!r}; give {key}=1 or more"
        )


def default_lr(atype) -> float:
    """The adapter type's `default_lr` (measured per type), else 1e-3."""
    lr = getattr(atype, "default_lr", None)
    return float(lr) if lr else FALLBACK_LR
