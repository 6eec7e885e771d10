"""A `Job`: one adapter in a training run (or an evaluation), with its data, its order over the
data, its optimizer, its best and last good state, and its report; and `job_losses`, each job's
own loss in a mixed batch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..errors import TrainingError, UnknownAdapterError
from .data import Item
from .report import AdapterReport

if TYPE_CHECKING:  # pragma: no cover
    from ..adapter import Adapter
    from ..zoo import Zoo


@dataclass
class Job:
    """One adapter being trained."""

    name: str
    adapter: Adapter
    items: list[Item]
    eval_items: list[Item]
    seed: int
    lr: float
    total_steps: int
    warmup_steps: int
    steps_per_epoch: int
    schedule: str
    optimizer: torch.optim.Optimizer
    report: AdapterReport
    params: list[torch.Tensor]
    step: int = 0
    active: bool = True
    bad_evals: int = 0
    best_state: list[torch.Tensor] | None = None
    last_good: list[torch.Tensor] | None = None
    # (epoch, batch_size, chunks)
    _epoch_chunks: tuple[int, int, list[list[int]]] | None = field(default=None, repr=False)

    @classmethod
    def for_eval(cls, name: str, adapter: Adapter, eval_items: list[Item]) -> Job:
        """A job that is only evaluated (never trained)."""
        return cls(
            name=name,
            adapter=adapter,
            items=[],
            eval_items=eval_items,
            seed=0,
            lr=0.0,
            total_steps=0,
            warmup_steps=0,
            steps_per_epoch=1,
            schedule="constant",
            optimizer=None,
            report=AdapterReport(name, adapter.type_name),
            params=[],
        )

    @property
    def classifier(self) -> bool:
        return self.adapter.head is not None

    def micro_batches(self, batch_size: int, grad_accum: int) -> list[list[int]]:
        """Indices of this job's micro-batches at its current step (deterministic in the step).

        The epoch's permutation depends only on (seed, epoch), so it is drawn once per epoch and
        kept: the same order as drawing it again at every step, from any step a run resumes at."""
        epoch, within = divmod(self.step, self.steps_per_epoch)
        if self._epoch_chunks is None or self._epoch_chunks[:2] != (epoch, batch_size):
            n = len(self.items)
            order = torch.randperm(n, generator=torch.Generator().manual_seed(_mix(self.seed, epoch))).tolist()
            self._epoch_chunks = (epoch, batch_size, [order[i : i + batch_size] for i in range(0, n, batch_size)])
        return self._epoch_chunks[2][within * grad_accum : (within + 1) * grad_accum]


def _mix(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + 17) % (2**63)


def finite(params: Sequence[torch.Tensor]) -> bool:
    """Whether every element of `params` is finite (one device sync)."""
    if not params:
        return True
    return bool(torch.stack([torch.isfinite(p).all() for p in params]).all())


def find_adapters(zoo: Zoo, names: list[str], adapter_type: str | None) -> list[Adapter]:
    """The zoo's adapters `names`, each of `adapter_type` when one is given."""
    adapters = []
    for name in names:
        if not isinstance(name, str):
            raise TrainingError(f"adapter names must be strings, got {name!r}")
        try:
            adapter = zoo.get_adapter(name)
        except UnknownAdapterError as exc:
            raise UnknownAdapterError(f"cannot train {name!r}: {exc}") from None
        if adapter_type is not None and adapter.type_name != adapter_type:
            raise TrainingError(
                f"adapter {name!r} is a {adapter.type_name} adapter, not {adapter_type}; train it as a "
                f"{adapter.type_name}, or add a new {adapter_type} adapter under another name"
            )
        adapters.append(adapter)
    return adapters


def job_losses(zoo: Zoo, out, labels, classes, job_of_row, n_jobs: int):
    """Per-job mean loss (n_jobs,) and the number of loss terms per job (tokens or rows)."""
    sums, counts = job_loss_sums(zoo, out, labels, classes, job_of_row, n_jobs)
    return sums / counts.clamp(min=1), counts


def job_loss_sums(zoo: Zoo, out, labels, classes, job_of_row, n_jobs: int):
    """Per-job sum of token (or class) losses (n_jobs,) and the number of loss terms per job.

    `out.logits` may cover only the last columns of the batch (`logits_to_keep`); it must cover
    every column that predicts a labelled token (`data.answer_columns`)."""
    device = zoo.device
    sums = torch.zeros(n_jobs, device=device, dtype=torch.float32)
    counts = torch.zeros(n_jobs, device=device, dtype=torch.float32)
    job_of_row = job_of_row.to(device)
    labels = labels.to(device)
    classes = classes.to(device)
    if out.logits is not None and bool((labels != -100).any()):
        first = labels.shape[1] - out.logits.shape[1]  # the column the first logit sits at
        target = labels[:, first + 1 :]  # the token each logit but the last predicts
        if bool((labels[:, 1 : first + 1] != -100).any()):
            raise TrainingError(
                f"the logits start at column {first}, after a labelled token; keep at least "
                f"answer_columns(labels) = {labels.shape[1] - first} columns"
            )
        sel = target != -100  # (R, K-1)
        logits = out.logits[:, :-1][sel].float()  # (N, V): only the answer positions
        tok_loss = torch.nn.functional.cross_entropy(logits, target[sel], reduction="none")  # (N,)
        row = torch.arange(labels.shape[0], device=device)[:, None].expand_as(sel)[sel]
        sums = sums.index_add(0, job_of_row[row], tok_loss)
        counts = counts.index_add(0, job_of_row[row], torch.ones_like(tok_loss))
    has_class = classes != -100
    if bool(has_class.any()):
        rows = has_class.nonzero().squeeze(1)
        logits = out.class_logits.index_select(0, rows)
        row_loss = torch.nn.functional.cross_entropy(logits, classes[rows], reduction="none")
        sums = sums.index_add(0, job_of_row[rows], row_loss)
        counts = counts.index_add(0, job_of_row[rows], torch.ones_like(row_loss))
    return sums, counts
