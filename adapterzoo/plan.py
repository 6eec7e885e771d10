"""BatchPlan: which pool and slot every row of a batch uses, built once per forward.

Every adapter type computes its contribution for the whole batch at once by gathering its
tensors by slot (`pool.site(path)[name][slots]`), Punica's BGMV idea in plain PyTorch. A plan
holds one `PoolUse` per pool the batch touches; a forward costs one gather and one batched
computation per (pool, site), never a loop over rows or over distinct adapters.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


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

    def gather(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-row adapter tensors: leading dim n (rows) or 1 (shared), plus constants and the
        pool's variant (a string, under "variant")."""
        pool = self.pool
        if isinstance(self.slots, int):
            s = self.slots
            w = {k: t[s : s + 1] for k, t in tensors.items()}
            w.update({k: t[s : s + 1] for k, t in pool.constants.items()})
        else:
            w = {k: t.index_select(0, self.slots) for k, t in tensors.items()}
            w.update({k: t.index_select(0, self.slots) for k, t in pool.constants.items()})
        w["variant"] = pool.variant
        return w


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
