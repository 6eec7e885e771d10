"""BatchPlan: which pool and slot every row of a batch uses, built once per forward.

Every adapter type computes its contribution for the whole batch at once by gathering its
tensors by slot (`pool.site(path)[name][slots]`), Punica's BGMV idea in plain PyTorch (see
`SlotWeights`). A plan
holds one `PoolUse` per pool the batch touches; a forward costs one gather and one batched
computation per (pool, site), never a loop over rows or over distinct adapters.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class SlotWeights(dict):
    """One pool's adapter tensors for the rows that use it, as a type's `delta` sees them.

    `w[name]` is the tensor gathered by slot: leading dim n (one per row) or 1 (every row shares
    one slot, so it broadcasts). Constants (e.g. LoRA's scale) come the same way, and
    `w["variant"]` is the pool's variant string. `w.matmul(x, name)` computes `x @ W[slot]` for
    every row of x (n, T, in) with W stored as (in, out) per slot; for one token per row (a
    decode step) it runs as a weighted `embedding_bag` over the pool itself, which reads each
    adapter's weights once and copies nothing: Punica's BGMV kernel in stock PyTorch.
    """

    def __init__(self, tensors: dict[str, torch.Tensor], constants: dict[str, torch.Tensor], slots: torch.Tensor | int, variant: str):
        super().__init__(variant=variant)
        self._pool = {**tensors, **constants}
        self.slots = slots

    def __missing__(self, name: str) -> torch.Tensor:
        t = self._pool[name]
        if isinstance(self.slots, int):
            value = t[self.slots : self.slots + 1]
        else:
            value = t[self.slots]
        self[name] = value
        return value

    def matmul(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """Per row i: x[i] @ W[slot_i], with W (slots, in, out) in the pool. Returns (n, T, out)."""
        W = self._pool[name]
        if isinstance(self.slots, int):
            return x @ W[self.slots]
        n, T, fan_in = x.shape
        if T == 1 and W.is_contiguous():
            table = W.view(-1, W.shape[-1])  # row (slot * in + k) is W[slot][k, :]
            index = (self.slots[:, None] * fan_in + torch.arange(fan_in, device=x.device)).reshape(-1)
            offsets = torch.arange(0, n * fan_in, fan_in, device=x.device)
            out = torch.nn.functional.embedding_bag(index, table, offsets, mode="sum",
                                                    per_sample_weights=x.reshape(-1).to(table.dtype))
            return out[:, None, :]
        return torch.bmm(x, self[name])


@dataclass
class PoolUse:
    """The rows of a batch that use one pool, and their slots.

    `rows` is None when every row uses this pool (no index_select / index_add needed), and
    `slots` is a plain int when all those rows share one slot (the weights then broadcast).
    """

    pool: object  # SlotPool or LivePool
    rows: torch.Tensor | None
    slots: torch.Tensor | int
    lengths: torch.Tensor | None = None  # virtual tokens per row (prompt / prefix kinds)

    def gather(self, tensors: dict[str, torch.Tensor]) -> SlotWeights:
        """The pool's tensors at one site (and its constants) for these rows, gathered lazily."""
        return SlotWeights(tensors, self.pool.constants, self.slots, self.pool.variant)


@dataclass
class BatchPlan:
    batch_size: int
    deltas: list[PoolUse] = field(default_factory=list)
    prompts: list[PoolUse] = field(default_factory=list)
    prefixes: list[PoolUse] = field(default_factory=list)
    prompt_lengths: torch.Tensor | None = None  # (B,) virtual prompt tokens per row
    prefix_lengths: torch.Tensor | None = None  # (B,) prefix tokens per row
    training: bool = False
    names: list[str | None] = field(default_factory=list)

    @property
    def prompt_width(self) -> int:
        return int(self.prompt_lengths.max()) if self.prompt_lengths is not None else 0

    @property
    def prefix_width(self) -> int:
        return int(self.prefix_lengths.max()) if self.prefix_lengths is not None else 0

    @property
    def is_empty(self) -> bool:
        return not (self.deltas or self.prompts or self.prefixes)


def build_plan(assignments: list[tuple[object, int, int] | None], device: torch.device, training: bool = False) -> BatchPlan:
    """`assignments[row]` is (pool, slot, virtual length) or None for "no adapter"."""
    batch = len(assignments)
    plan = BatchPlan(batch_size=batch, training=training)
    groups: dict[int, tuple[object, list[int], list[int], list[int]]] = {}
    for row, a in enumerate(assignments):
        if a is None:
            continue
        pool, slot, length = a
        g = groups.setdefault(id(pool), (pool, [], [], []))
        g[1].append(row)
        g[2].append(slot)
        g[3].append(length)
    for pool, rows, slots, lengths in groups.values():
        every_row = len(rows) == batch
        one_slot = len(set(slots)) == 1
        use = PoolUse(
            pool=pool,
            rows=None if every_row else torch.tensor(rows, device=device),
            slots=slots[0] if one_slot else torch.tensor(slots, device=device),
        )
        kind = pool.atype.kind
        if kind == "delta":
            plan.deltas.append(use)
            continue
        per_row = torch.zeros(batch, dtype=torch.long)
        per_row[rows] = torch.tensor(lengths)
        use.lengths = torch.tensor(lengths, device=device)
        if kind == "prompt":
            plan.prompts.append(use)
            plan.prompt_lengths = per_row if plan.prompt_lengths is None else plan.prompt_lengths + per_row
        else:
            plan.prefixes.append(use)
            plan.prefix_lengths = per_row if plan.prefix_lengths is None else plan.prefix_lengths + per_row
    for attr in ("prompt_lengths", "prefix_lengths"):
        if getattr(plan, attr) is not None:
            setattr(plan, attr, getattr(plan, attr).to(device))
    return plan
