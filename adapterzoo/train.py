"""Training: one adapter, or many at once in one mixed batch.

    report = zoo.train("caesar", examples, epochs=3, lr=2e-3, eval_examples=held_out, patience=2)
    report = zoo.train(["a", "b", "c"], [examples_a, examples_b, examples_c], max_steps=200)

What one step does, for each adapter being trained (its own seed, its own data, its own AdamW,
its own learning-rate schedule, its own gradient clipping):

1. its next micro-batch(es), in the order training it alone would use: every epoch is a
   permutation drawn from a generator seeded by (seed, epoch), cut into `batch_size` chunks, and
   `grad_accum` consecutive chunks make one optimizer step;
2. the micro-batches of every adapter are concatenated into one mixed batch (right-padded) and
   run through `zoo.forward`, where each row goes through its own adapter (trainable adapters run
   from their own tensors, so each row's loss reaches only its own adapter);
3. the loss is the sum over adapters of each adapter's own mean loss (next-token cross entropy on
   the answer tokens for causal LMs, with label -100 on the prompt and padding; cross entropy of
   its head's class logits for classifiers), so every adapter gets exactly the gradient it gets
   when trained alone (up to float noise from padding and batching);
4. each adapter clips its own gradient norm and takes its own AdamW step; adapters whose data run
   out (or that stop early) drop out of later steps.

Evaluation (every `eval_every` steps and at the end) runs on held-out examples in mixed batches:
greedy exact match for prompt/answer examples (`zoo.generate`, stopping at the answer's newline),
accuracy for classifiers, and the eval loss. Early stopping with `patience` per adapter; the best
state is restored at the end (`restore_best`).

Checkpoints (`checkpoint_dir`) hold the adapters' tensors, the optimizers' state, the step, the
data position (which is a function of the step), best scores, history and the torch RNG state,
written (each file synced to disk) to a temporary folder and renamed, so `resume=True` continues
bit for bit as if the run had never stopped. A resumed run must have the same adapters, examples
(checked by their sha256), batch_size and grad_accum; the other options (lr, weight_decay,
schedule, ...) are the resuming call's. A nan/inf loss or gradient, or nan/inf parameters after an
update, stops training, puts the adapters back to their last good state and raises
`TrainingDivergedError` naming the step; the last checkpoint on disk is a good one. `save_to`
writes the final adapters only at the very end (to a temporary folder, then renamed), and only
finite ones, so nothing half-trained or diverged ever sits under the final name.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence, TypeVar

import torch

from .errors import TrainingDivergedError, TrainingError, UnknownAdapterError
from .storage import atomic_dir, atomic_write, read_json, read_safetensors, tensors_to_bytes

if TYPE_CHECKING:  # pragma: no cover
    from .adapter import Adapter
    from .zoo import Zoo

FALLBACK_LR = 1e-3
SCHEDULES = ("linear", "cosine", "constant")
METRICS = ("auto", "exact_match", "accuracy", "loss")
CHECKPOINT_VERSION = 1
T = TypeVar("T")


# ----------------------------------------------------------------------------- reports


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

        table = Table("adapter", "type", "steps", "tokens", "tok/s", "train loss", "eval loss", "best eval", "stopped",
                      title=f"{self.steps} steps in {self.seconds:.1f}s, {self.tokens_per_s:,.0f} tokens/s")
        for r in self.adapters.values():
            best = "-" if r.best_eval is None else f"{r.metric} {r.best_eval:.4g} @ {r.best_step}"
            table.add_row(r.name, r.type, str(r.steps), f"{r.tokens:,}", f"{r.tokens_per_s:,.0f}", _fmt(r.final_train_loss),
                          _fmt(r.final_eval_loss), best, "early" if r.stopped_early else "")
        return table

    def __str__(self) -> str:
        from rich.console import Console

        console = Console(width=120, record=True, file=open(os.devnull, "w"))
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


# ----------------------------------------------------------------------------- data


@dataclass
class _Item:
    ids: list[int]
    labels: list[int] | None = None  # per token, -100 where no loss (causal LM)
    label: int | None = None  # class index (classifiers)
    prompt: str | None = None
    answer: str | None = None


@dataclass
class _Job:
    """One adapter being trained."""

    name: str
    adapter: "Adapter"
    items: list[_Item]
    eval_items: list[_Item]
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
    _epoch_chunks: tuple[int, int, list[list[int]]] | None = field(default=None, repr=False)  # (epoch, batch_size, chunks)

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
            self._epoch_chunks = (epoch, batch_size, [order[i:i + batch_size] for i in range(0, n, batch_size)])
        return self._epoch_chunks[2][within * grad_accum:(within + 1) * grad_accum]


def _finite(params: Sequence[torch.Tensor]) -> bool:
    """Whether every element of `params` is finite (one device sync)."""
    if not params:
        return True
    return bool(torch.stack([torch.isfinite(p).all() for p in params]).all())


def _default_max_new_tokens(jobs: list[_Job]) -> int:
    """Room for the longest answer among the jobs' eval examples (its tokens and eos), plus 2."""
    return max((len(it.labels) - it.labels.count(-100) for j in jobs for it in j.eval_items
                if it.labels is not None), default=0) + 2


def _examples_sha256(items: list[_Item]) -> str:
    """What the examples are, as trained on (token ids, token labels, class labels), in order."""
    data = json.dumps([[it.ids, it.labels, it.label] for it in items], separators=(",", ":"))
    return hashlib.sha256(data.encode()).hexdigest()


def _mix(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + 17) % (2**63)


def _as_list(examples: Any, what: str) -> list:
    if isinstance(examples, (str, bytes)) or not isinstance(examples, Sequence) and not hasattr(examples, "__iter__"):
        raise TrainingError(f"{what} must be a list of examples, got {type(examples).__name__}")
    if isinstance(examples, Mapping):
        raise TrainingError(f"{what} must be a list of examples, got a dict")
    examples = list(examples)
    if not examples:
        raise TrainingError(f"{what} is empty: give at least one example")
    return examples


def _fields(ex: Any, classify: bool) -> tuple[Any, Any]:
    """(prompt, answer) or (text, label) from an Example, a LabeledExample, a dict or a pair."""
    if isinstance(ex, Mapping):
        keys = ("text", "label") if classify else ("prompt", "answer")
        if all(k in ex for k in keys):
            return ex[keys[0]], ex[keys[1]]
        raise ValueError(f"a dict example needs keys {keys[0]!r} and {keys[1]!r}, got {sorted(ex)}")
    if classify and hasattr(ex, "text") and hasattr(ex, "label"):
        return ex.text, ex.label
    if not classify and hasattr(ex, "prompt") and hasattr(ex, "answer"):
        return ex.prompt, ex.answer
    if isinstance(ex, (tuple, list)) and len(ex) == 2:
        return ex[0], ex[1]
    want = "(text, label) pairs or LabeledExample" if classify else "(prompt, answer) pairs or Example"
    raise ValueError(f"expected {want}, got {type(ex).__name__} {ex!r:.60}")


def _tokenize(zoo: "Zoo", adapter: "Adapter", examples: list, what: str) -> list[_Item]:
    tok = zoo.tokenizer
    if tok is None:
        raise TrainingError("this zoo's base has no tokenizer; create the Zoo with one to train from text")
    head = adapter.head
    classify = head is not None
    if not classify and not zoo.is_causal_lm:
        raise TrainingError(
            f"adapter {adapter.name!r} has no classification head, and this base is an encoder (no language-model "
            "head to train text answers with); add one: zoo.add_adapter(name, type, head={'num_labels': k})"
        )
    limit = _max_positions(zoo)
    virtual = adapter.length()
    eos = tok.eos_token_id
    items = []
    for i, ex in enumerate(examples):
        try:
            a, b = _fields(ex, classify)
        except ValueError as exc:
            raise TrainingError(f"{what}[{i}] is malformed: {exc}") from None
        if classify:
            if not isinstance(a, str) or not a:
                raise TrainingError(f"{what}[{i}] has text {a!r}; it must be a non-empty string")
            label = b
            if isinstance(label, str) and head.config.labels and label in head.config.labels:
                label = head.config.labels.index(label)
            if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < head.num_labels:
                names = f" ({', '.join(head.config.labels)})" if head.config.labels else ""
                raise TrainingError(
                    f"{what}[{i}] has label {b!r}, outside the {head.num_labels} classes of {adapter.name!r}'s head"
                    f"{names}: labels are 0..{head.num_labels - 1}"
                )
            ids = tok(a, add_special_tokens=not zoo.is_causal_lm)["input_ids"]
            item = _Item(ids=ids, label=label, prompt=a)
        else:
            if not isinstance(a, str) or not isinstance(b, str):
                raise TrainingError(f"{what}[{i}] must hold two strings (prompt, answer), got {type(a).__name__}, "
                                    f"{type(b).__name__}")
            if not a or not b:
                raise TrainingError(f"{what}[{i}] has an empty {'prompt' if not a else 'answer'}; both must be non-empty")
            p_ids = tok(a, add_special_tokens=False)["input_ids"]
            a_ids = tok(b, add_special_tokens=False)["input_ids"]
            if eos is not None and (not a_ids or a_ids[-1] != eos):
                a_ids = a_ids + [eos]  # so that generation learns to stop
            item = _Item(ids=p_ids + a_ids, labels=[-100] * len(p_ids) + a_ids, prompt=a, answer=b)
        if not item.ids:
            raise TrainingError(f"{what}[{i}] tokenizes to nothing")
        if limit is not None and len(item.ids) + virtual > limit:
            extra = f" (+ {virtual} virtual tokens of the adapter)" if virtual else ""
            raise TrainingError(
                f"{what}[{i}] has {len(item.ids)} tokens{extra}, more than the {limit} positions this base allows; "
                "shorten it"
            )
        items.append(item)
    return items


def _max_positions(zoo: "Zoo") -> int | None:
    config = zoo.model.config
    for key in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _pad_id(zoo: "Zoo") -> int:
    tok = zoo.tokenizer
    for tid in (tok.pad_token_id, tok.eos_token_id, 0):
        if tid is not None:
            return tid
    return 0


def _collate(zoo: "Zoo", rows: list[tuple[int, _Item]], names: list[str]):
    """Right-padded input ids, mask, token labels, class labels, job index per row."""
    width = max(len(item.ids) for _, item in rows)
    n = len(rows)
    ids = torch.full((n, width), _pad_id(zoo), dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), -100, dtype=torch.long)
    classes = torch.full((n,), -100, dtype=torch.long)
    for r, (_, item) in enumerate(rows):
        L = len(item.ids)
        ids[r, :L] = torch.tensor(item.ids)
        mask[r, :L] = 1
        if item.labels is not None:
            labels[r, :L] = torch.tensor(item.labels)
        if item.label is not None:
            classes[r] = item.label
    job_of_row = torch.tensor([j for j, _ in rows])
    adapters = [names[j] for j, _ in rows]
    return ids, mask, labels, classes, job_of_row, adapters


def _job_losses(zoo: "Zoo", out, labels, classes, job_of_row, n_jobs: int):
    """Per-job mean loss (n_jobs,) and the number of loss terms per job (tokens or rows)."""
    device = zoo.device
    sums = torch.zeros(n_jobs, device=device, dtype=torch.float32)
    counts = torch.zeros(n_jobs, device=device, dtype=torch.float32)
    job_of_row = job_of_row.to(device)
    labels = labels.to(device)
    classes = classes.to(device)
    if out.logits is not None and bool((labels != -100).any()):
        target = labels[:, 1:]
        sel = target != -100  # (R, T-1)
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
    return sums / counts.clamp(min=1), counts


# ----------------------------------------------------------------------------- schedule


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base lr at (0-based) optimizer step `step`: linear warmup, then decay."""
    if warmup > 0 and step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def default_lr(atype) -> float:
    """The adapter type's `default_lr` (measured per type), else 1e-3."""
    lr = getattr(atype, "default_lr", None)
    return float(lr) if lr else FALLBACK_LR


# ----------------------------------------------------------------------------- the trainer


def train(
    zoo: "Zoo",
    names: str | Sequence[str],
    examples: Any,
    *,
    eval_examples: Any = None,
    epochs: int = 1,
    max_steps: int | None = None,
    lr: float | Mapping[str, float] | None = None,
    batch_size: int = 8,
    grad_accum: int = 1,
    warmup: float = 0.06,
    schedule: str = "linear",
    weight_decay: float = 0.0,
    max_grad_norm: float | None = 1.0,
    eval_every: int | None = None,
    eval_metric: str = "auto",
    patience: int | None = None,
    eval_batch_size: int = 32,
    max_new_tokens: int | None = None,
    restore_best: bool = True,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    keep_checkpoints: int = 2,
    resume: bool = False,
    seed: int | Sequence[int] = 0,
    adapter_type: str | None = None,
    save_to: str | os.PathLike | Mapping[str, str | os.PathLike] | None = None,
    metadata: dict | None = None,
    progress: bool = True,
    on_step: Callable[[StepInfo], None] | None = None,
) -> TrainReport:
    """Train adapter `names` (one name, or a list trained together in mixed batches).

    examples: for one adapter, a list of examples; for several, a list of lists (one per name,
        in order) or a dict name -> list. An example is an `adapterzoo.tasks.Example` (or any
        object with `.prompt` and `.answer`), a `{"prompt", "answer"}` dict or a (prompt, answer)
        pair; for an adapter with a classification head, a `LabeledExample`, `{"text", "label"}`
        or (text, label) (label: class index, or a name from the head's `labels`).
    eval_examples: held-out examples, the same shape; evaluated every `eval_every` steps (if
        given) and at the end. `eval_metric`: "auto" (exact_match for answers, accuracy for
        classifiers), or "loss". `patience`: stop an adapter after that many evaluations
        without improvement (needs `eval_every`); `restore_best` puts its best state back.
    epochs / max_steps: passes over each adapter's data, or a fixed number of optimizer steps
        (which then wraps around epochs). One step = `grad_accum` micro-batches of `batch_size`.
    lr: one value, a dict name -> lr, or None for each type's default (`AdapterType.default_lr`).
        AdamW (`weight_decay`), linear warmup over `warmup` (a fraction of the steps if < 1,
        else a step count), then `schedule` ("linear", "cosine" or "constant") decay.
        `max_grad_norm` clips each adapter's gradient on its own (None: no clipping).
    seed: data order (one int for all, or one per adapter): an adapter trained with others
        sees exactly the batches it sees when trained alone with the same seed.
    checkpoint_dir / checkpoint_every / resume: see the module docstring.
    adapter_type: if given, every adapter must be of this type (else `TrainingError`).
    save_to: a folder (one adapter), or a dict name -> folder, or a folder holding one
        sub-folder per adapter (several); written only when training has finished.
    progress: a progress bar with the loss and tokens/s (False for quiet).
    """
    single = isinstance(names, str)
    name_list = [names] if single else list(names)
    _check_options(name_list, epochs=epochs, max_steps=max_steps, batch_size=batch_size, grad_accum=grad_accum,
                   warmup=warmup, schedule=schedule, weight_decay=weight_decay, max_grad_norm=max_grad_norm,
                   eval_every=eval_every, eval_metric=eval_metric, patience=patience, eval_batch_size=eval_batch_size,
                   checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints, resume=resume,
                   checkpoint_dir=checkpoint_dir, eval_examples=eval_examples)
    adapters = _check_adapters(zoo, name_list, adapter_type)
    per_train = _per_adapter(examples, name_list, single, "examples")
    per_eval = _per_adapter(eval_examples, name_list, single, "eval_examples") if eval_examples is not None else None
    seeds = _per_seed(seed, name_list)
    lrs = _per_lr(lr, adapters)
    targets = _targets(save_to, name_list, single)

    jobs: list[_Job] = []
    for i, (name, adapter) in enumerate(zip(name_list, adapters)):
        what = f"examples for {name!r}" if not single else "examples"
        items = _tokenize(zoo, adapter, _as_list(per_train[i], what), what)
        eval_items: list[_Item] = []
        if per_eval is not None:
            ewhat = f"eval_examples for {name!r}" if not single else "eval_examples"
            eval_items = _tokenize(zoo, adapter, _as_list(per_eval[i], ewhat), ewhat)
        micro = math.ceil(len(items) / batch_size)
        spe = math.ceil(micro / grad_accum)
        total = max_steps if max_steps is not None else epochs * spe
        warm = int(round(warmup * total)) if warmup < 1 else int(warmup)
        jobs.append(_Job(name=name, adapter=adapter, items=items, eval_items=eval_items, seed=seeds[i], lr=lrs[i],
                         total_steps=total, warmup_steps=min(warm, max(0, total - 1)), steps_per_epoch=spe,
                         schedule=schedule, optimizer=None, report=AdapterReport(name, adapter.type_name, lr=lrs[i]), params=[]))
    metric = _metric(jobs, eval_metric)
    if max_new_tokens is None:
        max_new_tokens = _default_max_new_tokens(jobs)
    # everything checked: from here on the adapters change
    for job in jobs:
        if any(not t.requires_grad for t in job.adapter.parameters()):
            job.adapter.set_trainable(True)
        job.params = job.adapter.parameters()
        job.optimizer = torch.optim.AdamW(job.params, lr=job.lr, weight_decay=weight_decay)
        job.report.metric = metric if job.eval_items else None
        job.last_good = [p.detach().clone() for p in job.params]

    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    signature = _signature(jobs, batch_size=batch_size, grad_accum=grad_accum)
    resumed_from = None
    if resume and ckpt is not None:
        resumed_from = _load_checkpoint(ckpt, jobs, signature)
    if checkpoint_every is None and ckpt is not None:
        checkpoint_every = eval_every or max(1, max(j.total_steps for j in jobs) // 10)

    start = time.perf_counter()
    run_tokens, run_seconds = 0, 0.0
    bar = _Progress(progress, max(j.total_steps for j in jobs), min(j.step for j in jobs))
    with bar:
        while True:
            active = [j for j in jobs if j.active and j.step < j.total_steps]
            if not active:
                break
            t0 = time.perf_counter()
            tokens_before = sum(j.report.tokens for j in active)
            try:
                losses = _train_step(zoo, active, batch_size, grad_accum, max_grad_norm)
            except _Diverged as bad:
                _diverged(bad, ckpt)
            elapsed = time.perf_counter() - t0
            run_seconds += elapsed
            run_tokens += sum(j.report.tokens for j in active) - tokens_before
            lrs_now = {}
            for j in active:
                j.report.seconds += elapsed
                lrs_now[j.name] = j.optimizer.param_groups[0]["lr"]
            step = max(j.step for j in active)
            evals: dict[str, dict[str, float]] = {}
            if eval_every and step % eval_every == 0 and any(j.eval_items for j in active):
                evals = _evaluate_and_track(zoo, [j for j in active if j.eval_items], metric, patience,
                                            eval_batch_size, max_new_tokens)
            if ckpt is not None and step % checkpoint_every == 0:
                _save_checkpoint(ckpt, jobs, signature, keep_checkpoints)
            bar.update(step, sum(losses.values()) / len(losses), run_tokens / max(run_seconds, 1e-9), len(active))
            if on_step is not None:
                on_step(StepInfo(step=step, losses=losses, lrs=lrs_now, evals=evals))

    # final evaluation (unless the last step just did one), best state, saving
    final_step = max(j.step for j in jobs)
    need = [j for j in jobs if j.eval_items and not (j.report.history and j.report.history[-1].get("step") == j.step
                                                         and "eval_loss" in j.report.history[-1])]
    if need:
        _evaluate_and_track(zoo, need, metric, None, eval_batch_size, max_new_tokens)
    if restore_best:
        for j in jobs:
            if j.best_state is not None and j.report.best_step != j.step:
                with torch.no_grad():
                    for p, b in zip(j.params, j.best_state):
                        p.copy_(b)
                j.adapter.mark_edited()
    report = TrainReport({j.name: j.report for j in jobs}, steps=final_step, seconds=time.perf_counter() - start,
                         resumed_from=resumed_from)
    for j in jobs:
        j.report.steps = j.step
    if targets:
        bad = [j for j in jobs if not _finite(j.params)]  # e.g. an on_step callback wrote nan/inf
        if bad:
            # last_good is the state before each one's last update; checkpoints never hold nan/inf
            _diverged(_Diverged(bad, "parameters", failed=bad[0].step, restored=max(bad[0].step - 1, 0)), ckpt)
        for j in jobs:
            meta = {"training": {"steps": j.step, "examples": len(j.items), "lr": j.lr, "metric": j.report.metric,
                                 "best_eval": j.report.best_eval, "best_step": j.report.best_step,
                                 "final_train_loss": j.report.final_train_loss}, **(metadata or {})}
            report.saved[j.name] = str(save_final(zoo, j.name, targets[j.name], meta))
    return report


class _Diverged(Exception):
    """`what` ("loss", "gradient", "parameters") of `jobs` became nan/inf at step `failed` (1-based);
    their `last_good` state is the one after step `restored`; `stale`: the step whose checkpoint
    holds the state that diverged, if one may."""

    def __init__(self, jobs: list[_Job], what: str, *, failed: int, restored: int, stale: int | None = None):
        super().__init__(what)
        self.jobs, self.what = jobs, what
        self.failed, self.restored, self.stale = failed, restored, stale


def _diverged_before_update(jobs: list[_Job], what: str) -> _Diverged:
    """The state after `step` updates gave a nan/inf loss or gradient in the next step: `last_good`
    is the state before the last update, and a checkpoint of step `step` holds the bad state."""
    step = jobs[0].step
    return _Diverged(jobs, what, failed=step + 1, restored=max(step - 1, 0), stale=step)


def _bucket(adapter: "Adapter") -> int:
    """Rows that share a forward: a soft prompt widens every row of its batch by its length (the
    batch's prompt width), so prompt adapters of each length get their own forward and the others
    are not padded for them. Prefixes only add attention columns, which cost little."""
    return adapter.prompt_length()


def _train_step(zoo: "Zoo", active: list[_Job], batch_size: int, grad_accum: int,
                max_grad_norm: float | None) -> dict[str, float]:
    """One optimizer step of every active job, in mixed batches. Returns each job's train loss.

    Each micro-batch of the step is one mixed forward and backward per bucket (see `_bucket`);
    every job's loss lives in exactly one of them, so the gradients are the same either way.
    """
    plans = {id(j): j.micro_batches(batch_size, grad_accum) for j in active}
    n_micro = max(len(p) for p in plans.values())
    buckets: dict[int, list[_Job]] = {}
    for j in active:
        buckets.setdefault(_bucket(j.adapter), []).append(j)
    for j in active:
        j.optimizer.zero_grad(set_to_none=True)
    loss_sum = {j.name: 0.0 for j in active}
    for m in range(n_micro):
        for group in buckets.values():
            parts = {id(j): len(plans[id(j)]) for j in group if m < len(plans[id(j)])}
            present = [j for j in group if id(j) in parts]
            if not present:
                continue
            names = [j.name for j in present]
            rows = [(k, j.items[i]) for k, j in enumerate(present) for i in plans[id(j)][m]]
            ids, mask, labels, classes, job_of_row, row_adapters = _collate(zoo, rows, names)
            with torch.enable_grad():
                out = zoo.forward(ids, mask, row_adapters)
                per_job, counts = _job_losses(zoo, out, labels, classes, job_of_row, len(present))
                values = per_job.detach().cpu()
                bad = [j for k, j in enumerate(present) if not math.isfinite(float(values[k]))]
                if bad:
                    raise _diverged_before_update(bad, "loss")
                weights = torch.tensor([1.0 / parts[id(j)] for j in present], device=per_job.device)
                (per_job * weights).sum().backward()
            tokens = mask.sum(1)
            for k, j in enumerate(present):
                loss_sum[j.name] += float(values[k]) / parts[id(j)]
                sel = job_of_row == k
                j.report.tokens += int(tokens[sel].sum())
                j.report.examples += int(sel.sum())
    for j in active:
        if max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(j.params, max_grad_norm)
        else:
            grads = [p.grad.detach().norm() for p in j.params if p.grad is not None]
            norm = torch.stack(grads).norm() if grads else torch.tensor(0.0)
        if not math.isfinite(float(norm)):
            raise _diverged_before_update([j], "gradient")
    bad = []
    for j in active:
        for snap, p in zip(j.last_good, j.params):  # the state that just gave a finite loss
            snap.copy_(p.detach())
        factor = lr_factor(j.step, j.total_steps, j.warmup_steps, j.schedule)
        for group in j.optimizer.param_groups:
            group["lr"] = j.lr * factor
        j.optimizer.step()
        j.adapter.mark_edited()
        if not _finite(j.params):  # an update that overflowed: never keep (or save) it
            bad.append(j)
            continue
        j.step += 1
        j.report.final_train_loss = loss_sum[j.name]
        j.report.history.append({"step": j.step, "train_loss": loss_sum[j.name], "lr": j.lr * factor})
    if bad:  # the state before the update gave a finite loss; it was never checkpointed with a later step
        step = bad[0].step
        raise _Diverged(bad, "parameters", failed=step + 1, restored=step)
    return loss_sum


def _diverged(bad: _Diverged, ckpt: Path | None):
    """Put the diverged adapters back to their last state with a finite loss, drop a checkpoint
    that holds the state that diverged, and raise `TrainingDivergedError`."""
    for j in bad.jobs:  # go back to the last state that gave a finite loss
        with torch.no_grad():
            for p, snap in zip(j.params, j.last_good):
                p.copy_(snap)
        for p in j.params:
            p.grad = None
        j.adapter.mark_edited()
    kept = None
    if ckpt is not None:
        latest = latest_checkpoint(ckpt)
        if latest is not None and bad.stale is not None and latest.name == f"step-{bad.stale:08d}":
            shutil.rmtree(latest, ignore_errors=True)  # it holds the state that diverged
            older = sorted(p for p in ckpt.glob("step-*") if (p / "trainer.json").exists())
            if older:
                atomic_write(ckpt / "LATEST", older[-1].name.encode())
            else:
                (ckpt / "LATEST").unlink(missing_ok=True)
        kept = latest_checkpoint(ckpt)
    names = ", ".join(repr(j.name) for j in bad.jobs)
    lrs = ", ".join(f"{j.lr:g}" for j in bad.jobs)
    where = (f"the last good checkpoint is {kept} (resume=True with a lower learning rate continues from it)"
             if kept else "there is no checkpoint to resume from")
    raise TrainingDivergedError(
        f"the {bad.what} of {names} became nan/inf at step {bad.failed} (learning rate {lrs}); training stopped and "
        f"{'they were' if len(bad.jobs) > 1 else 'it was'} restored to the last state with a finite loss (after "
        f"step {bad.restored}). Nothing was saved under the final name; {where}. Try a lower learning rate "
        "(e.g. 10x lower), more warmup, or max_grad_norm=1.0."
    )


# ----------------------------------------------------------------------------- evaluation


def _metric(jobs: list[_Job], eval_metric: str) -> str:
    if eval_metric != "auto":
        if eval_metric == "exact_match" and any(j.classifier for j in jobs):
            raise TrainingError("eval_metric='exact_match' is for prompt/answer adapters; classifiers use 'accuracy'")
        if eval_metric == "accuracy" and any(not j.classifier for j in jobs):
            raise TrainingError("eval_metric='accuracy' is for adapters with a classification head; use 'exact_match'")
        return eval_metric
    kinds = {j.classifier for j in jobs}
    if len(kinds) > 1:
        return "loss"
    return "accuracy" if kinds == {True} else "exact_match"


def evaluate(zoo: "Zoo", names: Sequence[str], examples: Sequence[Sequence[Any]], *, batch_size: int = 32,
             max_new_tokens: int | None = None, metric: str = "auto") -> dict[str, dict[str, float]]:
    """Score adapters on held-out examples in mixed batches: {name: {"exact_match"|"accuracy", "eval_loss"}}."""
    adapters = _check_adapters(zoo, list(names), None)
    jobs = []
    for name, adapter, exs in zip(names, adapters, examples):
        items = _tokenize(zoo, adapter, _as_list(exs, f"examples for {name!r}"), f"examples for {name!r}")
        jobs.append(_Job(name=name, adapter=adapter, items=[], eval_items=items, seed=0, lr=0.0, total_steps=0,
                         warmup_steps=0, steps_per_epoch=1, schedule="constant", optimizer=None, report=AdapterReport(name, adapter.type_name),
                         params=[]))
    if max_new_tokens is None:
        max_new_tokens = _default_max_new_tokens(jobs)
    return _evaluate(zoo, jobs, _metric(jobs, metric), batch_size, max_new_tokens)


def score_task(zoo: "Zoo", adapters: Sequence[str | None], task: Any, examples: Sequence[Any], *,
               batch_size: int = 32, max_new_tokens: int | None = None) -> dict[str | None, float]:
    """Score each of `adapters` (None: the bare base) on `examples` of `task`, in mixed batches.

    A generative task (`adapterzoo.tasks.Task`) is scored by exact match of greedy generations
    (`task.score`); a classification task by the accuracy of each adapter's head. Every
    (adapter, example) pair is one row, and rows of different adapters share batches: a routing
    matrix of 8 adapters x 1 task is one mixed generate per batch.
    """
    adapters = list(adapters)
    examples = list(examples)
    if not examples:
        raise TrainingError("no examples to score")
    classify = hasattr(task, "labels") and hasattr(task, "label_of")
    for name in adapters:
        if name is None:
            if classify:
                raise TrainingError("the bare base has no classification head; score an adapter that has one")
            continue
        adapter = zoo.get_adapter(name)
        if classify and (adapter.head is None or adapter.head.num_labels != len(task.labels)):
            raise TrainingError(f"adapter {name!r} needs a {len(task.labels)}-label head to score {task.name!r}")
    scores: dict[str | None, float] = {}
    for group in _groups(zoo, adapters):
        rows = [(name, ex) for name in group for ex in examples]
        outputs: list[Any] = []
        if classify:
            with torch.no_grad():
                for start in range(0, len(rows), batch_size):
                    chunk = rows[start:start + batch_size]
                    enc = zoo.tokenizer([ex.text for _, ex in chunk], return_tensors="pt", padding=True,
                                        add_special_tokens=not zoo.is_causal_lm)
                    out = zoo.forward(enc["input_ids"], enc["attention_mask"], [n for n, _ in chunk])
                    outputs += out.class_logits.argmax(-1).tolist()
        else:
            if max_new_tokens is None:
                longest = max(len(zoo.tokenizer(ex.answer, add_special_tokens=False)["input_ids"]) for ex in examples)
                max_new_tokens = longest + 2
            for start in range(0, len(rows), batch_size):
                chunk = rows[start:start + batch_size]
                outputs += zoo.generate([ex.prompt for _, ex in chunk], [n for n, _ in chunk],
                                        max_new_tokens=max_new_tokens, stop=["\n"])
        for k, name in enumerate(group):
            mine = outputs[k * len(examples):(k + 1) * len(examples)]
            scores[name] = float(task.score(mine, examples))
    return scores


def _groups(zoo: "Zoo", items: list[T]) -> list[list[T]]:
    """Jobs (or adapter names) in groups small enough that every batch fits the slot pools."""
    size = max(1, zoo.slots)
    return [items[i:i + size] for i in range(0, len(items), size)]


@torch.no_grad()
def _evaluate(zoo: "Zoo", jobs: list[_Job], metric: str, batch_size: int, max_new_tokens: int) -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, float]] = {}
    for group in _groups(zoo, jobs):
        names = [j.name for j in group]
        rows = [(k, item) for k, j in enumerate(group) for item in j.eval_items]
        loss_sum = torch.zeros(len(group))
        loss_n = torch.zeros(len(group))
        hits = torch.zeros(len(group))
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            ids, mask, labels, classes, job_of_row, row_adapters = _collate(zoo, chunk, names)
            out = zoo.forward(ids, mask, row_adapters)
            per_job, counts = _job_losses(zoo, out, labels, classes, job_of_row, len(group))
            loss_sum += (per_job * counts).cpu()
            loss_n += counts.cpu()
            if metric == "accuracy":
                has = classes != -100
                if bool(has.any()):
                    pred = out.class_logits.cpu()[has].argmax(-1)
                    ok = (pred == classes[has]).float()
                    hits.index_add_(0, job_of_row[has], ok)
            if metric == "exact_match":
                lm = [(k, item) for k, item in chunk if item.answer is not None]
                if lm:
                    stop = ["\n"] if all(item.answer.endswith("\n") for _, item in lm) else None
                    texts = zoo.generate([item.prompt for _, item in lm], [names[k] for k, _ in lm],
                                         max_new_tokens=max_new_tokens, stop=stop)
                    for (k, item), text in zip(lm, texts):
                        hits[k] += float(_same_answer(text, item.answer))
        for k, j in enumerate(group):
            entry = {"eval_loss": float(loss_sum[k] / loss_n[k].clamp(min=1))}
            if metric in ("exact_match", "accuracy"):
                entry[metric] = float(hits[k]) / len(j.eval_items)
            results[j.name] = entry
    return results


def _same_answer(prediction: str, answer: str) -> bool:
    from .tasks import normalize

    return normalize(prediction) == normalize(answer)


def _evaluate_and_track(zoo: "Zoo", jobs: list[_Job], metric: str, patience: int | None, batch_size: int,
                        max_new_tokens: int) -> dict[str, dict[str, float]]:
    results = _evaluate(zoo, jobs, metric, batch_size, max_new_tokens)
    for j in jobs:
        entry = results[j.name]
        score = entry["eval_loss"] if metric == "loss" else entry[metric]
        j.report.final_eval_loss = entry["eval_loss"]
        j.report.history.append({"step": j.step, **entry})
        better = j.report.best_eval is None or (score < j.report.best_eval if metric == "loss" else score > j.report.best_eval)
        if better:
            j.report.best_eval, j.report.best_step = score, j.step
            j.best_state = [p.detach().clone() for p in j.params]
            j.bad_evals = 0
        else:
            j.bad_evals += 1
            if patience is not None and j.bad_evals >= patience and j.step < j.total_steps:
                j.active = False
                j.report.stopped_early = True
    return results


# ----------------------------------------------------------------------------- checks


def _check_options(names: list[str], **o: Any) -> None:
    def positive_int(key: str, value: Any, allow_none: bool = False) -> None:
        if value is None and allow_none:
            return
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise TrainingError(f"{key} must be a positive integer, got {value!r}")

    if not names:
        raise TrainingError("no adapters to train: give a name or a non-empty list of names")
    if len(set(names)) != len(names):
        raise TrainingError(f"an adapter is named twice in {names!r}; train each adapter once per run")
    positive_int("batch_size", o["batch_size"])
    positive_int("grad_accum", o["grad_accum"])
    positive_int("eval_batch_size", o["eval_batch_size"])
    positive_int("max_steps", o["max_steps"], allow_none=True)
    positive_int("eval_every", o["eval_every"], allow_none=True)
    positive_int("checkpoint_every", o["checkpoint_every"], allow_none=True)
    positive_int("keep_checkpoints", o["keep_checkpoints"])
    if o["max_steps"] is None:
        positive_int("epochs", o["epochs"])
    if o["schedule"] not in SCHEDULES:
        raise TrainingError(f"schedule must be one of {', '.join(SCHEDULES)}, got {o['schedule']!r}")
    if o["eval_metric"] not in METRICS:
        raise TrainingError(f"eval_metric must be one of {', '.join(METRICS)}, got {o['eval_metric']!r}")
    w = o["warmup"]
    if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0 or not math.isfinite(w):
        raise TrainingError(f"warmup must be a fraction of the steps (< 1) or a number of steps, got {w!r}")
    if not isinstance(o["weight_decay"], (int, float)) or o["weight_decay"] < 0:
        raise TrainingError(f"weight_decay must be >= 0, got {o['weight_decay']!r}")
    g = o["max_grad_norm"]
    if g is not None and (not isinstance(g, (int, float)) or not g > 0):
        raise TrainingError(f"max_grad_norm must be > 0 or None, got {g!r}")
    if o["patience"] is not None:
        positive_int("patience", o["patience"])
        if o["eval_every"] is None or o["eval_examples"] is None:
            raise TrainingError("patience (early stopping) needs eval_examples and eval_every")
    if o["resume"] and o["checkpoint_dir"] is None:
        raise TrainingError("resume=True needs checkpoint_dir, the folder the interrupted run wrote checkpoints to")


def _check_adapters(zoo: "Zoo", names: list[str], adapter_type: str | None) -> list["Adapter"]:
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


def _per_adapter(examples: Any, names: list[str], single: bool, what: str) -> list[Any]:
    if single:
        return [examples]
    if isinstance(examples, Mapping):
        missing = [n for n in names if n not in examples]
        extra = sorted(set(examples) - set(names))
        if missing or extra:
            raise TrainingError(f"{what} must have one entry per adapter: missing {missing}, unexpected {extra}")
        return [examples[n] for n in names]
    if isinstance(examples, (str, bytes)) or not isinstance(examples, Sequence):
        raise TrainingError(f"{what} for several adapters must be a list of lists (one per adapter) or a dict")
    if len(examples) != len(names):
        raise TrainingError(f"{what} has {len(examples)} entries for {len(names)} adapters; give one list per adapter")
    return list(examples)


def _per_seed(seed: Any, names: list[str]) -> list[int]:
    seeds = [seed] * len(names) if not isinstance(seed, Sequence) else list(seed)
    if len(seeds) != len(names) or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
        raise TrainingError(f"seed must be a non-negative int or one per adapter, got {seed!r}")
    return seeds


def _per_lr(lr: Any, adapters: list["Adapter"]) -> list[float]:
    out = []
    for a in adapters:
        value = lr.get(a.name) if isinstance(lr, Mapping) else lr
        value = default_lr(a.atype) if value is None else value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise TrainingError(f"learning rate for {a.name!r} must be a positive finite number, got {value!r}")
        out.append(float(value))
    return out


def _targets(save_to: Any, names: list[str], single: bool) -> dict[str, Path]:
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


def save_final(zoo: "Zoo", name: str, target: Path, metadata: dict) -> Path:
    """Save to a temporary folder beside `target`, then rename it into place (replacing an old one)."""
    target = Path(target)
    with atomic_dir(target, replace=True) as tmp:
        zoo.save_adapter(name, tmp, metadata=metadata)
    return target


# ----------------------------------------------------------------------------- checkpoints


def _signature(jobs: list[_Job], **options: Any) -> dict[str, Any]:
    """What a resumed run must share with the run that wrote the checkpoint."""
    return {
        "adapters": [{"name": j.name, "type": j.adapter.type_name, "config": j.adapter.config.to_dict(),
                      "examples": len(j.items), "examples_sha256": _examples_sha256(j.items), "seed": j.seed,
                      "parameters": [list(p.shape) for p in j.adapter.parameters()]} for j in jobs],
        **{k: v for k, v in options.items()},
    }


def _save_checkpoint(folder: Path, jobs: list[_Job], signature: dict, keep: int) -> Path:
    step = max(j.step for j in jobs)
    if not all(_finite(j.params) for j in jobs):  # never write a bad state
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {"rng.torch": torch.get_rng_state()}
    meta_jobs = []
    for k, j in enumerate(jobs):
        for i, p in enumerate(j.params):
            tensors[f"param.{k}.{i}"] = p.detach().cpu().contiguous()
            if j.best_state is not None:
                tensors[f"best.{k}.{i}"] = j.best_state[i].cpu().contiguous()
        opt = j.optimizer.state_dict()
        for i, state in opt["state"].items():
            for key, value in state.items():
                if torch.is_tensor(value):
                    tensors[f"opt.{k}.{i}.{key}"] = value.detach().cpu().contiguous().clone()
        r = j.report
        meta_jobs.append({
            "name": j.name, "step": j.step, "active": j.active, "bad_evals": j.bad_evals,
            "param_groups": opt["param_groups"],
            "non_tensor_state": {str(i): {key: v for key, v in s.items() if not torch.is_tensor(v)}
                                 for i, s in opt["state"].items()},
            "report": {"examples": r.examples, "tokens": r.tokens, "seconds": r.seconds, "best_eval": r.best_eval,
                       "best_step": r.best_step, "final_train_loss": r.final_train_loss,
                       "final_eval_loss": r.final_eval_loss, "stopped_early": r.stopped_early, "history": r.history},
        })
    record = {"version": CHECKPOINT_VERSION, "step": step, "signature": signature, "jobs": meta_jobs}
    name = f"step-{step:08d}"
    with atomic_dir(folder / name, replace=True) as tmp:  # each file synced before the rename and LATEST
        atomic_write(tmp / "state.safetensors", tensors_to_bytes(tensors))
        atomic_write(tmp / "trainer.json", json.dumps(record, indent=1, sort_keys=True).encode())
    atomic_write(folder / "LATEST", name.encode())
    for old in sorted(folder.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return folder / name


def latest_checkpoint(folder: str | os.PathLike) -> Path | None:
    folder = Path(folder)
    pointer = folder / "LATEST"
    if not pointer.exists():
        return None
    path = folder / pointer.read_text().strip()
    return path if (path / "trainer.json").exists() else None


def _signature_diffs(saved: Any, current: dict) -> list[str]:
    """What differs between two signatures: top-level options by name, adapters' fields as
    "<field> of '<name>'" (so different examples of the same count are named as such)."""
    saved = saved if isinstance(saved, dict) else {}
    diffs = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if a == b:
            continue
        if key == "adapters" and isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and all(
                isinstance(x, dict) and isinstance(y, dict) and x.get("name") == y.get("name") for x, y in zip(a, b)):
            diffs += [f"{field_name} of {y['name']!r}" for x, y in zip(a, b)
                      for field_name in sorted(set(x) | set(y)) if x.get(field_name) != y.get(field_name)]
        else:
            diffs.append(key)
    return diffs


def _load_checkpoint(folder: Path, jobs: list[_Job], signature: dict) -> int | None:
    path = latest_checkpoint(folder)
    if path is None:
        return None  # nothing to resume: start from the beginning
    record = read_json(path / "trainer.json")
    saved = json.loads(json.dumps(record.get("signature")))
    current = json.loads(json.dumps(signature))
    if saved != current:
        diffs = _signature_diffs(saved, current)
        raise TrainingError(
            f"the checkpoint in {path} was written by a different training run (it differs in: {', '.join(diffs)}); "
            "resume with the same adapters, data and options, or use another checkpoint_dir"
        )
    tensors = read_safetensors(path / "state.safetensors")
    with torch.no_grad():
        for k, (j, meta) in enumerate(zip(jobs, record["jobs"])):
            for i, p in enumerate(j.params):
                p.copy_(tensors[f"param.{k}.{i}"])
            j.adapter.mark_edited()
            if f"best.{k}.0" in tensors:
                j.best_state = [tensors[f"best.{k}.{i}"].clone() for i in range(len(j.params))]
            state: dict[int, dict[str, Any]] = {}
            for i_str, rest in meta["non_tensor_state"].items():
                state[int(i_str)] = dict(rest)
            prefix = f"opt.{k}."
            for key, value in tensors.items():
                if key.startswith(prefix):
                    i_str, field_name = key[len(prefix):].split(".", 1)
                    state.setdefault(int(i_str), {})[field_name] = value
            # the state (moments, step counts) is the checkpoint's; the options (lr, weight_decay, betas,
            # ...) are this call's, as the optimizer was just made with them: a checkpoint's would override them
            j.optimizer.load_state_dict({"state": state, "param_groups": j.optimizer.state_dict()["param_groups"]})
            j.step, j.active, j.bad_evals = meta["step"], meta["active"], meta["bad_evals"]
            r = meta["report"]
            for key in ("examples", "tokens", "seconds", "best_eval", "best_step", "final_train_loss",
                        "final_eval_loss", "stopped_early", "history"):
                setattr(j.report, key, r[key])
            j.last_good = [p.detach().clone() for p in j.params]
    torch.set_rng_state(tensors["rng.torch"])
    return int(record["step"])


# ----------------------------------------------------------------------------- progress


class _Progress:
    """A rich progress bar with the loss and tokens/s; silent when disabled."""

    def __init__(self, enabled: bool, total: int, completed: int):
        self.enabled = enabled
        self.total, self.completed = total, completed
        self.progress = None

    def __enter__(self):
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("training"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                                     TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True))
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
