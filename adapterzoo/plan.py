"""BatchPlan: which pool and slot every row of a batch uses, built once per forward.

Every adapter type computes its contribution for the whole batch at once by gathering its
tensors by slot (`pool.site(path)[name][slots]`), Punica's BGMV idea in plain PyTorch (see
`SlotWeights`). A plan holds one `PoolUse` per pool the batch touches; a forward costs one
gather and one batched computation per (pool, site), never a loop over rows or over distinct
adapters.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class SlotWeights(dict):
    """One pool's adapter tensors for the rows that use it: what a type's `delta`,
    `virtual_tokens` and `prefix` receive as `w`. Part of the plugin contract (docs/plugins.md).

    `w[name]` is the tensor gathered by slot: leading dim n (one per row) or 1 (every row shares
    one slot, so it broadcasts). Names are the type's `tensors()`, its `derive()` outputs and its
    `constants()` (e.g. LoRA's scale, shape (n,) or (1,)); gathering is lazy, so a name never read
    costs nothing, and `name in w` says whether the pool has it at all. Attributes:

    - `variant`: the pool's `variant(config)` string (also `w["variant"]`, for older types).
    - `site`, `module`: the module path and the base module the rows are at (None for prompt
      types): base-aware math reads the base's weights here (adapterzoo.sites.linear_weight).
    - `shared`: the type's shared tensors (`shared_tensors()`), one for every row, by name.
    - `slots`: each row's slot, a (n,) tensor, or a plain int when all rows share one slot.
    - `lengths`: each row's true number of virtual tokens, (n,) (prompt and prefix kinds; pools
      pad to the bucket, so a prompt encoder that must not see padding reads this).

    `w.matmul(x, name)` computes `x @ W[slot]` for every row of x (n, T, in) with W stored as
    (in, out) per slot, without copying weights where it can: for one token per row (a decode
    step) it runs as a weighted `embedding_bag` over the pool itself, which reads each adapter's
    weights once (Punica's BGMV kernel in stock PyTorch); rows that come in runs of one slot (a
    trainer's or a prefill's batch) are folded into one matrix per run.

    Without autograd, a plan kept across decode steps hands back what it gathered at the first
    step (`PoolUse.gather`): read `w[name]`, never change it in place.
    """

    def __init__(
        self,
        tensors: dict[str, torch.Tensor],
        use: PoolUse,
        site: str | None = None,
        module=None,
    ):
        pool = use.pool
        super().__init__(variant=pool.variant)
        # what `w[name]` gathers from: the site's tensors, then the pool's constants (a constant
        # wins a name clash); looked up by name, never merged: a hook makes one `w` per pool and
        # site at every forward (~420 in a mixed SmolLM2 decode step)
        self._tensors, self._constants = tensors, pool.constants
        self._use = use
        self.slots = use.slots
        self.variant: str = pool.variant
        self.site = site
        self.module = module
        self.shared: dict[str, torch.Tensor] = use.pool.shared  # the type's shared tensors (one for all rows)

    @property
    def lengths(self) -> torch.Tensor | None:
        return self._use.lengths

    def __contains__(self, name: object) -> bool:
        """Whether the pool has a tensor (or constant) `name` here, gathered yet or not: a type
        whose derived tensors depend on the pool's shapes can ask which form it got."""
        return dict.__contains__(self, name) or name in self._constants or name in self._tensors

    def stored(self, name: str) -> torch.Tensor:
        """The pool's whole tensor (or constant) `name`, every slot; KeyError if it has none."""
        t = self._constants.get(name)
        return self._tensors[name] if t is None else t

    def __missing__(self, name: str) -> torch.Tensor:
        t = self.stored(name)
        # index_select, not t[slots]: advanced indexing runs a parallel TensorIterator kernel that
        # wakes the other OpenMP threads even for 16 rows; inside an engine step (2 threads,
        # PASSIVE wait) it took ~100 us a gather against ~20 us for index_select, and a BitFit
        # plan gathers at 271 sites (vs_vllm.py's workload: ~1.9 s of a 21 s run)
        value = t[self.slots : self.slots + 1] if isinstance(self.slots, int) else t.index_select(0, self.slots)
        self[name] = value
        return value

    def matmul(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """Per row i: x[i] @ W[slot_i], with W (slots, in, out) in the pool. Returns (n, T, out)."""
        W = self.stored(name)
        if isinstance(self.slots, int):
            return x @ W[self.slots]
        n, T, fan_in = x.shape
        use = self._use
        if T == 1 and W.is_contiguous():
            index, offsets, weighed = use.bag_index(fan_in, x.device)
            table = W.view(-1, W.shape[-1])  # row (slot * in + k) is W[slot][k, :]
            weights = x.reshape(-1) if weighed is None else x.reshape(-1).index_select(0, weighed)
            out = torch.nn.functional.embedding_bag(
                index, table, offsets, mode="sum", per_sample_weights=weights.to(table.dtype)
            )
            return out[:, None, :]
        if use.run_slots is not None:  # runs of g rows with one slot: (runs, g*T, in) @ (runs, in, out)
            runs = len(use.run_slots)
            out = torch.bmm(x.reshape(runs, -1, fan_in), W.index_select(0, use.run_slots))
            return out.reshape(n, T, -1)
        return torch.bmm(x, self[name])

    def lookup(self, name: str, index: torch.Tensor) -> torch.Tensor:
        """Per row i: W[slot_i][index[i]], with W (slots, rows, d) in the pool and `index` (n, T) row
        numbers (token ids): an embedding lookup in each row's own table, without copying tables
        (a LoRA adapter's replaced `embed_tokens`). Returns (n, T, d)."""
        W = self.stored(name)
        if isinstance(self.slots, int):
            return W[self.slots][index]
        return W[self.slots[:, None], index]


@dataclass
class PoolUse:
    """The rows of a batch that use one pool, and their slots.

    `rows` is None when every row uses this pool (no index_select / index_add needed), and
    `slots` is a plain int when all those rows share one slot (the weights then broadcast).
    `run_slots` is set when the rows come in equal runs of one slot each (the slot of each run).
    """

    pool: object  # SlotPool or LivePool
    rows: torch.Tensor | None
    slots: torch.Tensor | int
    run_slots: torch.Tensor | None = None
    lengths: torch.Tensor | None = None  # (n,) each row's true virtual length (prompt and prefix kinds)
    batch_size: int = 0  # rows of the whole batch (0: unknown, e.g. a use made by hand)
    _bags: dict = field(default_factory=dict, repr=False)
    _kept: dict = field(default_factory=dict, repr=False)
    _every_row: PoolUse | None = field(default=None, repr=False)

    def gather(self, tensors: dict[str, torch.Tensor], site: str | None = None, module=None) -> SlotWeights:
        """The pool's tensors at one site (and its constants) for these rows, gathered lazily.

        Without autograd (serving), what is gathered is kept for the next forward with this use:
        the engine runs every decode step with one plan until its rows change, and a pool's slots
        cannot change under a plan that is still current (`BatchPlan.is_current`). Re-gathering
        at every step was ~540 `index` ops per 16-row mixed decode step (~9 ms of ~300)."""
        if torch.is_grad_enabled() or not getattr(self.pool, "slots_are_stamped", False):
            return SlotWeights(tensors, self, site, module)  # training, or a LivePool: gathers stay in the graph
        # the SlotWeights itself is kept, not only its gathers: building one per pool and site at
        # every step was ~420 objects a 16-row mixed decode step
        kept = self._kept.get(site)
        if kept is None or kept[0] is not tensors or kept[1] != torch.is_inference_mode_enabled():
            weights = SlotWeights(tensors, self, site, module)
            kept = self._kept[site] = (tensors, torch.is_inference_mode_enabled(), weights)
        return kept[2]

    def ran_at(self, site: str | None) -> bool:
        """Whether a forward with this use already gathered at `site` and kept it: the use is being
        run again, as a decode plan kept across steps is (`runtime.apply_delta` widens it then)."""
        return site in self._kept

    def every_row(self) -> PoolUse:
        """This use widened to every row of the batch, slot 0 (all zeros: "no adapter") for the
        rows of other pools: for a type whose delta at slot 0 is exactly zero
        (`zero_slot_is_identity`), computing every row is exact and, in decode, cheaper than
        selecting this pool's rows and adding their delta back (`runtime.apply_delta`)."""
        if self.rows is None:
            return self
        if self._every_row is None:
            slots = torch.zeros(self.batch_size, dtype=torch.long, device=self.rows.device)
            slots[self.rows] = self.slots if isinstance(self.slots, int) else self.slots.to(torch.long)
            self._every_row = PoolUse(pool=self.pool, rows=None, slots=slots, batch_size=self.batch_size)
        return self._every_row

    def bag_index(self, fan_in: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """embedding_bag's indices and offsets for `SlotWeights.matmul`, made once per plan, and
        which of x's values weigh them (None: all, in order).

        A row at slot 0 (all zeros: another pool's row in an `every_row` use) gets an empty bag,
        which sums to exactly zero, so it reads and multiplies nothing: in a 16-row decode step of
        six types, where each pool's delta runs over every row, a pool's bags hold only its own
        ~3 rows' weights instead of 16 rows' (benchmarks/mixed_batch.py)."""
        if fan_in not in self._bags:
            slots = self.slots.to(torch.long)
            live = (slots != 0).nonzero().flatten()
            cols = torch.arange(fan_in, device=device)
            index = (slots[live, None] * fan_in + cols).reshape(-1)
            sizes = torch.zeros(len(slots), dtype=torch.long, device=device)
            sizes[live] = fan_in
            offsets = sizes.cumsum(0) - sizes  # each row's bag starts where the previous one ends
            weighed = None if len(live) == len(slots) else (live[:, None] * fan_in + cols).reshape(-1)
            self._bags[fan_in] = (index, offsets, weighed)
        return self._bags[fan_in]


def place_rows(out: torch.Tensor, use: PoolUse, value: torch.Tensor) -> torch.Tensor:
    """`out` (B, ...) with `value` (n or 1, ...) put in the rows of `use` (every row when
    `use.rows` is None, then without a copy)."""
    if use.rows is None:
        return value.expand(out.shape[0], *value.shape[1:])
    return out.index_copy(0, use.rows, value.expand(len(use.rows), *value.shape[1:]))


def fit_tokens(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """Cut or zero-pad dimension `dim` (the virtual-token one) of `t` to `width`."""
    have = t.shape[dim]
    if have >= width:
        return t.narrow(dim, 0, width)
    pads = [0, 0] * (t.dim() - 1 - dim) + [0, width - have]
    return torch.nn.functional.pad(t, pads)


def virtual_columns(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """(B, width) bool: which of the `width` left-aligned virtual columns each row uses."""
    return torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]


def _equal_runs(slots: list[int]) -> list[int] | None:
    """The slot of each run if `slots` is k > 1 equal-length runs of one slot each, else None."""
    size = next((i for i, s in enumerate(slots) if s != slots[0]), len(slots))
    if size in (1, len(slots)) or len(slots) % size:
        return None
    runs = [slots[i] for i in range(0, len(slots), size)]
    same = all(slots[i] == runs[i // size] for i in range(len(slots)))
    return runs if same else None


@dataclass
class BatchPlan:
    batch_size: int
    deltas: list[PoolUse] = field(default_factory=list)
    prompts: list[PoolUse] = field(default_factory=list)
    prefixes: list[PoolUse] = field(default_factory=list)
    prompt_lengths: torch.Tensor | None = None  # (B,) virtual prompt tokens per row
    prefix_lengths: torch.Tensor | None = None  # (B,) prefix tokens per row
    prompt_width: int = 0  # the most virtual prompt tokens of any row (a plain int: no device sync)
    prefix_width: int = 0
    training: bool = False
    names: list[str | None] = field(default_factory=list)
    adapters: list = field(default_factory=list)  # the Adapter (or None) of each row
    residents: list[tuple] = field(default_factory=list)  # (SlotPool, slot, the slot's stamp, Adapter) it reads

    _deltas_at: dict = field(default_factory=dict, repr=False)
    #: site -> its pools' `kernels.Call`s (None: a pool there has none), checked once for this plan
    #: (runtime._fused_site); only for slot pools, whose slots cannot change under a current plan
    kernel_calls: dict = field(default_factory=dict, repr=False)

    def deltas_at(self, site: str) -> list[tuple[PoolUse, dict[str, torch.Tensor]]]:
        """The delta pools that have tensors at `site`, with those tensors: what a site's hook
        runs. Looked up once per plan for slot pools (a kept plan then skips the pools that do not
        attach there at every step: 4 pools x 271 hooked modules in a mixed SmolLM2 decode step);
        again at every call for live pools, whose tensors are the adapters' own."""
        found = self._deltas_at.get(site)
        if found is None:
            found = [(use, t) for use in self.deltas if (t := use.pool.site(site)) is not None]
            if all(getattr(use.pool, "slots_are_stamped", False) for use, _ in found):
                self._deltas_at[site] = found
        return found

    @property
    def is_empty(self) -> bool:
        return not (self.deltas or self.prompts or self.prefixes)

    def is_current(self) -> bool:
        """Whether every slot this plan reads still holds what was placed there, and each adapter is
        as its slot holds it: a later plan may have evicted one and reused the slot, or the
        adapter was edited in place (a trainer's step, an operator's `copy_`) since it was placed.
        A plan kept across decode steps is checked at every step: int compares, and each
        adapter's version (a sum over its tensors' version counters)."""
        return all(
            pool.stamps[slot] == stamp and pool.is_current(adapter) for pool, slot, stamp, adapter in self.residents
        )


def build_plan(
    assignments: list[tuple[object, int, int] | None], device: torch.device, training: bool = False
) -> BatchPlan:
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
        runs = None if one_slot else _equal_runs(slots)
        facts = pool.atype.facts
        use = PoolUse(
            pool=pool,
            rows=None if every_row else torch.tensor(rows, device=device),
            slots=slots[0] if one_slot else torch.tensor(slots, device=device),
            run_slots=None if runs is None else torch.tensor(runs, device=device),
            lengths=torch.tensor(lengths, device=device) if facts.virtual_tokens else None,
            batch_size=batch,
        )
        if not facts.virtual_tokens:
            plan.deltas.append(use)
            continue
        per_row = torch.zeros(batch, dtype=torch.long)
        per_row[rows] = torch.tensor(lengths)
        if facts.attaches == "embeddings":
            plan.prompts.append(use)
            plan.prompt_lengths = per_row if plan.prompt_lengths is None else plan.prompt_lengths + per_row
        else:
            plan.prefixes.append(use)
            plan.prefix_lengths = per_row if plan.prefix_lengths is None else plan.prefix_lengths + per_row
    for attr in ("prompt", "prefix"):
        lengths = getattr(plan, f"{attr}_lengths")
        if lengths is not None:
            setattr(plan, f"{attr}_width", int(lengths.max()))  # on the host, before the copy
            setattr(plan, f"{attr}_lengths", lengths.to(device))
    return plan
