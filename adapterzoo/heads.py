"""Classification heads: a small linear head that is part of an adapter.

Houlsby adapters, AdapterBias and BitFit come from classification on encoders (GLUE): the
adapter changes the encoder, and a per-task head maps a pooled sentence vector to class logits.
Here any adapter, of any type, can carry one:

    zoo.add_adapter("topic", "houlsby", bottleneck=16, head={"num_labels": 4, "pooling": "mean"})
    out = zoo(ids, mask, adapters=["topic", "sentiment", None])
    out.class_logits           # (B, max num_labels): row i through its own adapter's head

The head's tensors (`weight` (k, d), `bias` (k,)) live on the adapter beside its type's tensors,
so they are trained with it (`Adapter.parameters()`), counted in `num_parameters`, saved and
loaded with it (native format: `adapterzoo_head.weight` / `adapterzoo_head.bias` in the weights
file, the head config under `"head"` in the JSON), and swapped with it: a row always goes
through the head of the adapter that row uses.

In a mixed batch the heads of the distinct adapters are stacked once per forward (slot 0 = no
head) and gathered by row, so the whole batch is one pooling and one batched product, never a
loop over rows. Rows with fewer labels than the widest head get `-inf` for the classes they do
not have (so softmax, cross entropy and argmax just work); rows whose adapter has no head, or
that use no adapter, get `nan` everywhere.

Pooling over the caller's real tokens (virtual tokens and padding never count): "mean" (the
average, as sentence-transformers does for MiniLM), "cls" (the first real token: BERT's [CLS]),
"last" (the last real token: natural for causal LMs, which see the whole row only there).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .errors import InvalidConfigError, ShapeMismatchError

if TYPE_CHECKING:  # pragma: no cover
    from .adapter import Adapter

PREFIX = "adapterzoo_head."  # flat tensor names in the saved weights file
POOLINGS = ("mean", "cls", "last")


@dataclass
class HeadConfig:
    """What a head is: how many classes, how it pools, and (optionally) the class names."""

    num_labels: int
    pooling: str = "mean"
    labels: list[str] | None = None

    def __post_init__(self) -> None:
        n = self.num_labels
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise InvalidConfigError(f"head num_labels must be an integer >= 2, got {n!r}")
        if self.pooling not in POOLINGS:
            raise InvalidConfigError(f"head pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")
        if self.labels is not None:
            labels = list(self.labels)
            if len(labels) != n or len(set(labels)) != n or not all(isinstance(x, str) for x in labels):
                raise InvalidConfigError(
                    f"head labels must be {n} distinct strings (one per class), got {self.labels!r}"
                )
            self.labels = labels

    @classmethod
    def parse(cls, value: Any) -> HeadConfig:
        """From a HeadConfig, a dict (`{"num_labels": 4, "pooling": "mean"}`) or an int (num_labels)."""
        if isinstance(value, HeadConfig):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return cls(num_labels=value)
        if not isinstance(value, dict):
            raise InvalidConfigError(
                f"head must be a dict such as {{'num_labels': 4, 'pooling': 'mean'}}, got {value!r}"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise InvalidConfigError(
                f"unknown head key(s) {', '.join(map(repr, unknown))}; valid keys: {', '.join(sorted(known))}"
            )
        if "num_labels" not in value:
            raise InvalidConfigError("head needs num_labels, e.g. head={'num_labels': 4}")
        return cls(**value)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Head:
    config: HeadConfig
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # weight (k, d), bias (k,): float32, host

    @property
    def num_labels(self) -> int:
        return self.config.num_labels

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {PREFIX + k: t.detach() for k, t in self.tensors.items()}


def new_head(config: HeadConfig, hidden: int, generator: torch.Generator) -> Head:
    """weight ~ N(0, 0.02) (as transformers initialises classifiers), bias = 0."""
    with torch.inference_mode(False), torch.no_grad():
        weight = torch.empty(config.num_labels, hidden).normal_(0, 0.02, generator=generator)
        bias = torch.zeros(config.num_labels)
    return Head(config, {"weight": weight, "bias": bias})


def pop_head(record: dict[str, Any], state: dict[str, torch.Tensor], hidden: int, what: str) -> Head | None:
    """The head saved in a native record (removing its tensors from `state`), or None."""
    tensors = {k[len(PREFIX) :]: state.pop(k) for k in [k for k in state if k.startswith(PREFIX)]}
    spec = record.get("head")
    if spec is None:
        if tensors:
            raise ShapeMismatchError(
                f"{what} has head tensors ({', '.join(sorted(tensors))}) but no head in its config"
            )
        return None
    config = HeadConfig.parse(spec)
    want = {"weight": (config.num_labels, hidden), "bias": (config.num_labels,)}
    got = {k: tuple(t.shape) for k, t in tensors.items()}
    if got != want:
        raise ShapeMismatchError(
            f"{what} has a {config.num_labels}-label head whose tensors do not fit this base "
            f"(found {got}, expected {want}); it was made for another base or the file was edited"
        )
    with torch.inference_mode(False):
        return Head(config, {k: t.detach().to(torch.float32).clone() for k, t in tensors.items()})


def class_logits(rows: Sequence[Adapter | None], hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
    """(B, max num_labels) float32 logits, row i through `rows[i]`'s head; None if no row has one.

    `hidden` (B, T, d) is the base's last hidden state at the caller's tokens, `mask` (B, T) the
    caller's attention mask.
    """
    slot_of: dict[str, int] = {}
    heads: list[Head] = []
    index, pooling = [], []
    for adapter in rows:
        head = adapter.head if adapter is not None else None
        if head is None:
            index.append(0)
            pooling.append(0)
            continue
        if adapter.name not in slot_of:
            slot_of[adapter.name] = len(heads) + 1
            heads.append(head)
        index.append(slot_of[adapter.name])
        pooling.append(POOLINGS.index(head.config.pooling))
    if not heads:
        return None
    device = hidden.device
    width = max(h.num_labels for h in heads)
    dim = hidden.shape[-1]
    # one small stack of the distinct heads per forward; differentiable, so training reaches them
    weights = [torch.zeros(width, dim, device=device)]
    biases = [torch.full((width,), float("nan"), device=device)]
    for h in heads:
        k = h.num_labels
        weights.append(torch.nn.functional.pad(h.tensors["weight"].to(device, torch.float32), (0, 0, 0, width - k)))
        biases.append(
            torch.nn.functional.pad(h.tensors["bias"].to(device, torch.float32), (0, width - k), value=float("-inf"))
        )
    W, b = torch.stack(weights), torch.stack(biases)  # (H + 1, K, d), (H + 1, K)
    idx = torch.tensor(index, device=device)
    pooled = pool(hidden.float(), mask.to(device), pooling)  # (B, d)
    return torch.einsum("bd,bkd->bk", pooled, W[idx]) + b[idx]  # (B, K)


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: list[int]) -> torch.Tensor:
    """Per row: mean (pooling[i]=0), first real token (1) or last real token (2) of (B, T, d)."""
    B, T, _ = hidden.shape
    m = mask.to(hidden.dtype)
    out = (hidden * m[:, :, None]).sum(1) / m.sum(1).clamp(min=1)[:, None]  # (B, d) mean
    if any(pooling):  # a Python list: no device sync to find out
        how = torch.tensor(pooling, device=hidden.device)
        real = mask > 0
        first = real.int().argmax(1)  # (B,)
        last = T - 1 - real.flip(1).int().argmax(1)
        rows = torch.arange(B, device=hidden.device)
        out = torch.where((how == 1)[:, None], hidden[rows, first], out)
        out = torch.where((how == 2)[:, None], hidden[rows, last], out)
    return out
