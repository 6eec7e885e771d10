"""What training tells its caller: a `TrainReport` (one `AdapterReport` per adapter), a
`StepInfo` after every step, and a progress bar on stderr."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any


@dataclass
class AdapterReport:
    """How training went for one adapter."""

    name: str
    type: str
    steps: int = 0
    examples: int = 0  # training examples seen (with repeats over epochs)
    tokens: int = 0  # real (non-padding) tokens seen
    seconds: float = 0.0  # wall time of the steps it took part in
    lr: float = 0.0
    metric: str | None = None  # "exact_match", "accuracy" or "loss"
    best_eval: float | None = None
    best_step: int | None = None
    final_train_loss: float | None = None
    final_eval_loss: float | None = None
    stopped_early: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)  # {"step", "train_loss"} and eval rows

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class TrainReport:
    """What `zoo.train` returns: one `AdapterReport` per adapter, and the run's totals."""

    adapters: dict[str, AdapterReport]
    steps: int
    seconds: float
    resumed_from: int | None = None
    saved: dict[str, str] = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.adapters.values())

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def __getitem__(self, name: str) -> AdapterReport:
        return self.adapters[name]

    def table(self):
        from rich.table import Table

        table = Table(
            "adapter",
            "type",
            "steps",
            "tokens",
            "tok/s",
            "train loss",
            "eval loss",
            "best eval",
            "stopped",
            title=f"{self.steps} steps in {self.seconds:.1f}s, {self.tokens_per_s:,.0f} tokens/s",
        )
        for r in self.adapters.values():
            best = "-" if r.best_eval is None else f"{r.metric} {r.best_eval:.4g} @ {r.best_step}"
            table.add_row(
                r.name,
                r.type,
                str(r.steps),
                f"{r.tokens:,}",
                f"{r.tokens_per_s:,.0f}",
                _fmt(r.final_train_loss),
                _fmt(r.final_eval_loss),
                best,
                "early" if r.stopped_early else "",
            )
        return table

    def __str__(self) -> str:
        from rich.console import Console

        with open(os.devnull, "w") as sink:
            console = Console(width=120, record=True, file=sink)
            console.print(self.table())
            return console.export_text()


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


@dataclass
class StepInfo:
    """What `on_step` callbacks get after every optimizer step."""

    step: int  # steps done in this run (1 after the first)
    losses: dict[str, float]  # train loss of this step, per adapter that took part
    lrs: dict[str, float]
    evals: dict[str, dict[str, float]]  # per adapter, when this step evaluated


class ProgressBar:
    """A rich progress bar with the loss and tokens/s; silent when disabled."""

    def __init__(self, enabled: bool, total: int, completed: int):
        self.enabled = enabled
        self.total, self.completed = total, completed
        self.progress = None

    def __enter__(self):
        if self.enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.progress = Progress(
                TextColumn("training"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
            )
            self.progress.__enter__()
            self.task = self.progress.add_task("train", total=self.total, completed=self.completed, info="")
        return self

    def update(self, step: int, loss: float, tok_s: float, active: int) -> None:
        if self.progress is not None:
            info = f"loss {loss:.4f}  {tok_s:,.0f} tok/s" + (f"  {active} adapters" if active > 1 else "")
            self.progress.update(self.task, completed=step, info=info)

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.__exit__(*exc)
        return False
