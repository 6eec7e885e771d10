"""Scoring adapters on held-out examples, in mixed batches.

The metric: greedy exact match for prompt/answer examples (`zoo.generate`, stopping at the
answer's newline; see `adapterzoo.tasks.normalize`), accuracy for classifiers, and the eval loss
(always). `evaluate` scores adapters on examples, `score_task` on a task's examples (the bare
base too), and `evaluate_and_track` is what a training run does at each evaluation (best state,
early stopping).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from ..errors import TrainingError
from .data import as_list, collate, tokenize
from .job import Job, find_adapters, job_losses

if TYPE_CHECKING:  # pragma: no cover
    from ..zoo import Zoo

T = TypeVar("T")


def choose_metric(jobs: list[Job], eval_metric: str) -> str:
    """The metric `eval_metric` ("auto": exact_match or accuracy, or loss for a mix) means for `jobs`."""
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


def default_max_new_tokens(jobs: list[Job]) -> int:
    """Room for the longest answer among the jobs' eval examples (its tokens and eos), plus 2."""
    return (
        max(
            (len(it.labels) - it.labels.count(-100) for j in jobs for it in j.eval_items if it.labels is not None),
            default=0,
        )
        + 2
    )


def evaluate(
    zoo: Zoo,
    names: Sequence[str],
    examples: Sequence[Sequence[Any]],
    *,
    batch_size: int = 32,
    max_new_tokens: int | None = None,
    metric: str = "auto",
) -> dict[str, dict[str, float]]:
    """Score adapters on held-out examples in mixed batches: {name: {"exact_match"|"accuracy", "eval_loss"}}."""
    adapters = find_adapters(zoo, list(names), None)
    jobs = []
    for name, adapter, exs in zip(names, adapters, examples):
        items = tokenize(zoo, adapter, as_list(exs, f"examples for {name!r}"), f"examples for {name!r}")
        jobs.append(Job.for_eval(name, adapter, items))
    if max_new_tokens is None:
        max_new_tokens = default_max_new_tokens(jobs)
    return evaluate_jobs(zoo, jobs, choose_metric(jobs, metric), batch_size, max_new_tokens)


def score_task(
    zoo: Zoo,
    adapters: Sequence[str | None],
    task: Any,
    examples: Sequence[Any],
    *,
    batch_size: int = 32,
    max_new_tokens: int | None = None,
) -> dict[str | None, float]:
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
                    chunk = rows[start : start + batch_size]
                    enc = zoo.tokenizer(
                        [ex.text for _, ex in chunk],
                        return_tensors="pt",
                        padding=True,
                        add_special_tokens=not zoo.is_causal_lm,
                    )
                    out = zoo.forward(enc["input_ids"], enc["attention_mask"], [n for n, _ in chunk])
                    outputs += out.class_logits.argmax(-1).tolist()
        else:
            if max_new_tokens is None:
                longest = max(len(zoo.tokenizer(ex.answer, add_special_tokens=False)["input_ids"]) for ex in examples)
                max_new_tokens = longest + 2
            for start in range(0, len(rows), batch_size):
                chunk = rows[start : start + batch_size]
                outputs += zoo.generate(
                    [ex.prompt for _, ex in chunk], [n for n, _ in chunk], max_new_tokens=max_new_tokens, stop=["\n"]
                )
        for k, name in enumerate(group):
            mine = outputs[k * len(examples) : (k + 1) * len(examples)]
            scores[name] = float(task.score(mine, examples))
    return scores


def _groups(zoo: Zoo, items: list[T]) -> list[list[T]]:
    """Jobs (or adapter names) in groups small enough that every batch fits the slot pools."""
    size = max(1, zoo.slots)
    return [items[i : i + size] for i in range(0, len(items), size)]


@torch.no_grad()
def evaluate_jobs(
    zoo: Zoo, jobs: list[Job], metric: str, batch_size: int, max_new_tokens: int
) -> dict[str, dict[str, float]]:
    """{name: {"eval_loss", and `metric` unless it is "loss"}} of each job on its eval items."""
    results: dict[str, dict[str, float]] = {}
    for group in _groups(zoo, jobs):
        names = [j.name for j in group]
        rows = [(k, item) for k, j in enumerate(group) for item in j.eval_items]
        loss_sum = torch.zeros(len(group))
        loss_n = torch.zeros(len(group))
        hits = torch.zeros(len(group))
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            ids, mask, labels, classes, job_of_row, row_adapters = collate(zoo, chunk, names)
            out = zoo.forward(ids, mask, row_adapters)
            per_job, counts = job_losses(zoo, out, labels, classes, job_of_row, len(group))
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
                    texts = zoo.generate(
                        [item.prompt for _, item in lm],
                        [names[k] for k, _ in lm],
                        max_new_tokens=max_new_tokens,
                        stop=stop,
                    )
                    for (k, item), text in zip(lm, texts):
                        hits[k] += float(_same_answer(text, item.answer))
        for k, j in enumerate(group):
            entry = {"eval_loss": float(loss_sum[k] / loss_n[k].clamp(min=1))}
            if metric in ("exact_match", "accuracy"):
                entry[metric] = float(hits[k]) / len(j.eval_items)
            results[j.name] = entry
    return results


def _same_answer(prediction: str, answer: str) -> bool:
    from ..tasks import normalize

    return normalize(prediction) == normalize(answer)


def evaluate_and_track(
    zoo: Zoo, jobs: list[Job], metric: str, patience: int | None, batch_size: int, max_new_tokens: int
) -> dict[str, dict[str, float]]:
    """Evaluate `jobs`, keep each one's best state, and stop one after `patience` evaluations without
    improvement."""
    results = evaluate_jobs(zoo, jobs, metric, batch_size, max_new_tokens)
    for j in jobs:
        entry = results[j.name]
        score = entry["eval_loss"] if metric == "loss" else entry[metric]
        j.report.final_eval_loss = entry["eval_loss"]
        j.report.history.append({"step": j.step, **entry})
        best = j.report.best_eval
        better = best is None or (score < best if metric == "loss" else score > best)
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
