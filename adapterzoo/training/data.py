"""Examples to token ids, and token ids to batches.

An example is an `adapterzoo.tasks.Example` (or anything with `.prompt` and `.answer`), a
`{"prompt", "answer"}` dict or a (prompt, answer) pair; for an adapter with a classification head,
a `LabeledExample`, `{"text", "label"}` or (text, label). `tokenize` turns them into `Item`s
(prompt + answer + eos, labels -100 on the prompt), refusing a bad one by its index; `collate`
right-pads a mixed batch of items.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..errors import TrainingError
from ..generate import pad_token_id

if TYPE_CHECKING:  # pragma: no cover
    from ..adapter import Adapter
    from ..zoo import Zoo


@dataclass
class Item:
    """One tokenized example."""

    ids: list[int]
    labels: list[int] | None = None  # per token, -100 where no loss (causal LM)
    label: int | None = None  # class index (classifiers)
    prompt: str | None = None
    answer: str | None = None


def per_adapter(examples: Any, names: list[str], single: bool, what: str) -> list[Any]:
    """Each adapter's examples: `examples` itself for one adapter; for several, one list per name
    (in order) or a dict name -> list."""
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


def as_list(examples: Any, what: str) -> list:
    """`examples` as a non-empty list (a string, a dict or an empty list is refused)."""
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


def tokenize(zoo: Zoo, adapter: Adapter, examples: list, what: str) -> list[Item]:
    """`examples` of `adapter` as `Item`s; `what` names them in errors ("examples for 'a'")."""
    tok = zoo.tokenizer
    if tok is None:
        raise TrainingError("this zoo's base has no tokenizer; create the Zoo with one to train from text")
    classify = adapter.head is not None
    if not classify and not zoo.is_causal_lm:
        raise TrainingError(
            f"adapter {adapter.name!r} has no classification head, and this base is an encoder (no language-model "
            "head to train text answers with); add one: zoo.add_adapter(name, type, head={'num_labels': k})"
        )
    limit = max_positions(zoo)
    virtual = adapter.length()
    items = []
    for i, ex in enumerate(examples):
        try:
            a, b = _fields(ex, classify)
        except ValueError as exc:
            raise TrainingError(f"{what}[{i}] is malformed: {exc}") from None
        where = f"{what}[{i}]"
        item = _labeled_item(zoo, adapter, a, b, where) if classify else _answer_item(zoo, a, b, where)
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


def _labeled_item(zoo: Zoo, adapter: Adapter, text: Any, label: Any, where: str) -> Item:
    """A (text, label) example of a classifier; `label` is a class index or one of the head's label names."""
    head = adapter.head
    if not isinstance(text, str) or not text:
        raise TrainingError(f"{where} has text {text!r}; it must be a non-empty string")
    index = label
    if isinstance(index, str) and head.config.labels and index in head.config.labels:
        index = head.config.labels.index(index)
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < head.num_labels:
        names = f" ({', '.join(head.config.labels)})" if head.config.labels else ""
        raise TrainingError(
            f"{where} has label {label!r}, outside the {head.num_labels} classes of {adapter.name!r}'s head"
            f"{names}: labels are 0..{head.num_labels - 1}"
        )
    ids = zoo.tokenizer(text, add_special_tokens=not zoo.is_causal_lm)["input_ids"]
    return Item(ids=ids, label=index, prompt=text)


def _answer_item(zoo: Zoo, prompt: Any, answer: Any, where: str) -> Item:
    """A (prompt, answer) example: prompt + answer + eos, with the loss on the answer only."""
    if not isinstance(prompt, str) or not isinstance(answer, str):
        raise TrainingError(
            f"{where} must hold two strings (prompt, answer), got {type(prompt).__name__}, {type(answer).__name__}"
        )
    if not prompt or not answer:
        raise TrainingError(f"{where} has an empty {'prompt' if not prompt else 'answer'}; both must be non-empty")
    tok = zoo.tokenizer
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    a_ids = tok(answer, add_special_tokens=False)["input_ids"]
    eos = tok.eos_token_id
    if eos is not None and (not a_ids or a_ids[-1] != eos):
        a_ids = a_ids + [eos]  # so that generation learns to stop
    return Item(ids=p_ids + a_ids, labels=[-100] * len(p_ids) + a_ids, prompt=prompt, answer=answer)


def max_positions(zoo: Zoo) -> int | None:
    """The longest sequence the base takes (None: no limit in its config)."""
    config = zoo.model.config
    for key in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def collate(zoo: Zoo, rows: list[tuple[int, Item]], names: list[str], *, pad_left: bool = False):
    """Padded input ids, mask, token labels, class labels, job index per row, adapter per row.

    `rows` are (job index, item); `names[k]` is job k's adapter. Rows are right-padded, or with
    `pad_left` left-padded: then every row's answer ends in the last column, so the answer
    positions of the whole batch are its last few columns (`answer_columns`)."""
    width = max(len(item.ids) for _, item in rows)
    n = len(rows)
    ids = torch.full((n, width), pad_token_id(zoo.tokenizer), dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), -100, dtype=torch.long)
    classes = torch.full((n,), -100, dtype=torch.long)
    for r, (_, item) in enumerate(rows):
        L = len(item.ids)
        cols = slice(width - L, width) if pad_left else slice(0, L)
        ids[r, cols] = torch.tensor(item.ids)
        mask[r, cols] = 1
        if item.labels is not None:
            labels[r, cols] = torch.tensor(item.labels)
        if item.label is not None:
            classes[r] = item.label
    job_of_row = torch.tensor([j for j, _ in rows])
    adapters = [names[j] for j, _ in rows]
    return ids, mask, labels, classes, job_of_row, adapters


def answer_columns(labels: torch.Tensor) -> int:
    """How many last columns of a batch predict a labelled token: the first labelled column's
    predecessor onwards (0 when nothing is labelled). `zoo.forward(..., logits_to_keep=k)` then
    projects only those columns onto the vocabulary."""
    labelled = (labels != -100).any(0).nonzero()
    if labelled.numel() == 0:
        return 0
    return labels.shape[1] - int(labelled[0, 0]) + 1


def loss_terms(item: Item) -> int:
    """The loss terms one item adds to its job's mean: its labelled tokens (bar the first column,
    which nothing predicts), or one class label."""
    if item.label is not None:
        return 1
    return sum(1 for t in (item.labels or [])[1:] if t != -100)


def length_groups(lengths: Sequence[int], overhead: int) -> list[list[int]]:
    """Rows (by index) split into forwards of similar length, shortest first.

    Rows sorted by length are cut where the padding a cut saves outweighs one more forward, which
    costs about `overhead` tokens' time: the split minimizes sum(rows x longest row) + overhead
    per forward over all cuts of the sorted rows (dynamic programming, O(n^2) for n rows)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    n = len(order)
    best = [0.0] + [float("inf")] * n  # best[e]: cheapest split of the first e sorted rows
    cut = [0] * (n + 1)
    for end in range(1, n + 1):
        widest = lengths[order[end - 1]]
        for start in range(end):
            cost = best[start] + (end - start) * widest + overhead
            if cost < best[end]:
                best[end], cut[end] = cost, start
    groups = []
    end = n
    while end > 0:
        groups.append(order[cut[end] : end])
        end = cut[end]
    return groups[::-1]
