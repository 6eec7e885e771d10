"""Slot pools: preallocated per-slot tensors that a whole batch gathers from.

One `SlotPool` per (adapter type, size bucket). At each site it keeps a tensor per adapter
tensor name with a leading slot dimension: `A: (slots + 1, r_bucket, in)`. Slot 0 holds zeros and
means "no adapter". Loading an adapter copies its tensors (zero-padded to the bucket) into a free
slot; evicting it frees the slot. Modules are never re-created and no shape ever changes, so a
hot-swap is a `copy_` between forward passes: the S-LoRA unified memory pool, for every type.

A type with a `derive` hook (LoHa's dense update, DoRA's per-column rescale) gets its derived
tensors computed once per slot write and stored in the pool beside the adapter's own, so a
forward reads them like any other tensor and never recomputes them.

A `LivePool` has the same interface but stacks trainable adapters' own tensors at every forward,
so gradients flow to each adapter's parameters (training many adapters in one mixed batch); it
derives at every forward too, differentiably.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from .adapter import Adapter
from .errors import PluginError, PoolFullError


def _pad_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    dst.zero_()
    dst[tuple(slice(0, n) for n in src.shape)].copy_(src)


def _padded(src: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    pads: list[int] = []
    for have, want in zip(reversed(src.shape), reversed(shape)):
        pads += [0, want - have]
    return torch.nn.functional.pad(src, pads) if any(pads) else src


def pooled_shared(adapter: Adapter, bucket: dict[str, int], device, dtype) -> dict[str, torch.Tensor]:
    """The adapter type's shared tensors zero-padded to the pool's sizes, on the pool's device."""
    return {
        name: _padded(t, adapter.shared_pool_shapes[name]).to(device=device, dtype=dtype)
        for name, t in adapter.shared.items()
    }


def derived_tensors(atype, site: str, module, tensors: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """`atype.derive(...)` for one adapter at one site, its result checked; errors name the type and site."""
    try:
        derived = atype.derive(site, module, tensors, config)
    except PluginError:
        raise
    except Exception as exc:
        raise PluginError(
            f"adapter type {atype.name!r} at site {site!r}: derive() raised {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(derived, dict) or not all(isinstance(v, torch.Tensor) for v in derived.values()):
        raise PluginError(
            f"adapter type {atype.name!r} at site {site!r}: derive() must return a dict of "
            f"tensors, got {type(derived).__name__}"
        )
    clash = set(derived) & set(tensors)
    if clash:
        raise PluginError(
            f"adapter type {atype.name!r} at site {site!r}: derive() returned {sorted(clash)}, "
            "which are names of its own tensors; give derived tensors names of their own"
        )
    return derived


def _pool_shapes_agree(atype, site: str, name: str, have: tuple, want: tuple) -> None:
    if tuple(have) != tuple(want):
        raise PluginError(
            f"adapter type {atype.name!r} at site {site!r}: derive() returned {name!r} of shape {tuple(want)}, "
            f"but other adapters in its pool gave {tuple(have)}; a derived shape may depend only on the "
            "pool's shapes (the bucketed sizes and the site), not on other config values"
        )


class SlotPool:
    """Device-resident slots for adapters of one type and one size bucket, with LRU eviction."""

    # every write or eviction changes the slot's stamp, so what a current plan gathered from a
    # slot is still what the slot holds (PoolUse.gather keeps it across decode steps)
    slots_are_stamped = True

    def __init__(
        self,
        atype,
        variant: str,
        bucket: dict[str, int],
        capacity: int,
        model,
        device: torch.device,
        dtype: torch.dtype,
    ):
        self.atype = atype
        self.variant = variant
        self.bucket = dict(bucket)
        self.capacity = capacity
        self.model = model
        self.device, self.dtype = device, dtype
        self.tensors: dict[str, dict[str, torch.Tensor]] = {}  # site -> name -> (capacity + 1, *shape)
        self.constants: dict[str, torch.Tensor] = {}  # name -> (capacity + 1,)
        self.lru: OrderedDict[str, int] = OrderedDict()  # adapter name -> slot, least recent first
        self.versions: dict[str, int] = {}
        # stamps[slot] changes whenever the slot is written or cleared: a plan that read a stamp
        # can tell whether its slots still hold what it placed there (BatchPlan.is_current)
        self.stamps = [0] * (capacity + 1)
        self._writes = 0
        self._modules = dict(model.named_modules())
        self._derived: set[str] = set()  # names of derived tensors (in self.tensors beside the own ones)
        self.shared: dict[str, torch.Tensor] = {}  # the type's shared tensors, padded to the bucket, on the device

    def __repr__(self) -> str:
        return f"SlotPool({self.atype.name}, {self.bucket}, {len(self.lru)}/{self.capacity} used)"

    # -- what a forward pass reads
    def site(self, site: str) -> dict[str, torch.Tensor] | None:
        return self.tensors.get(site)

    # -- residency
    def slot_of(self, name: str) -> int | None:
        return self.lru.get(name)

    def is_current(self, adapter: Adapter) -> bool:
        return adapter.name in self.lru and self.versions.get(adapter.name) == adapter.version()

    def touch(self, name: str) -> None:
        self.lru.move_to_end(name)

    def place(self, adapter: Adapter, pinned: set[str]) -> tuple[int, str | None]:
        """Put `adapter` in a slot (reusing its own, else a free one, else the LRU one not in
        `pinned`); returns (slot, name of the adapter evicted or None)."""
        evicted = None
        slot = self.lru.get(adapter.name)
        if slot is None:
            used = set(self.lru.values())
            free = [s for s in range(1, self.capacity + 1) if s not in used]
            if free:
                slot = free[0]
            else:
                victim = next((n for n in self.lru if n not in pinned), None)
                if victim is None:
                    raise PoolFullError(
                        f"this batch uses more than {self.capacity} distinct {self.atype.name} adapters of size "
                        f"{self.bucket}, but the pool has {self.capacity} slots; split the batch, or create the "
                        "zoo with more slots (Zoo.from_pretrained(..., slots=N))"
                    )
                # `_write` sets every tensor of the slot: zeroing them first cost a placement ~40%
                # more (BitFit: 271 tensors a slot)
                slot = self.evict(victim, zero=False)
                evicted = victim
        self._write(slot, adapter)
        self.lru[adapter.name] = slot
        self.lru.move_to_end(adapter.name)
        self.versions[adapter.name] = adapter.version()
        return slot, evicted

    def evict(self, name: str, zero: bool = True) -> int:
        """Free `name`'s slot and return it; its tensors are zeroed unless the caller (`place`)
        writes every one of them next. Constants are always zeroed: a new adapter sets only its own."""
        slot = self.lru.pop(name)
        self.versions.pop(name, None)
        self._stamp(slot)
        with torch.no_grad():
            if zero:
                for ts in self.tensors.values():
                    for t in ts.values():
                        t[slot].zero_()
            for t in self.constants.values():
                t[slot] = 0
        return slot

    def _stamp(self, slot: int) -> None:
        self._writes += 1
        self.stamps[slot] = self._writes

    def _write(self, slot: int, adapter: Adapter) -> None:
        self._stamp(slot)
        shapes = adapter.bucket_shapes(self.model)
        if adapter.shared and not self.shared:  # the same for every adapter of the pool (its key says so)
            self.shared = pooled_shared(adapter, self.bucket, self.device, self.dtype)
        # normal tensors even when called under inference_mode, so that later writes always work
        with torch.inference_mode(False), torch.no_grad():
            for site, site_shapes in shapes.items():
                # a site's tensors are the union over the adapters placed here: one LoRA adapter may
                # have only a bias at a site where another has A and B (other slots read zeros)
                pooled = self.tensors.setdefault(site, {})
                for k, s in site_shapes.items():
                    if k not in pooled:
                        pooled[k] = torch.zeros((self.capacity + 1, *s), device=self.device, dtype=self.dtype)
            # tensors of the pool's own sizes go in one `_foreach_copy_` (one C++ call for all of
            # them: BitFit has 271 a slot, and a Python `copy_` each was most of a placement)
            same_dst, same_src = [], []
            for site, ts in self.tensors.items():
                own = adapter.tensors.get(site, {})
                for key, t in ts.items():
                    src = own.get(key)
                    if src is None:
                        t[slot].zero_()
                    elif src.shape == t.shape[1:]:
                        same_dst.append(t[slot])
                        same_src.append(src)
                    else:
                        _pad_into(t[slot], src.to(self.dtype))
            if same_dst:
                torch._foreach_copy_(same_dst, same_src)
            if self.atype.derives:
                self._write_derived(slot, adapter, shapes)
            for key, value in adapter.atype.constants(adapter.config).items():
                if key not in self.constants:
                    self.constants[key] = torch.zeros(self.capacity + 1, device=self.device, dtype=self.dtype)
                self.constants[key][slot] = value

    def _write_derived(self, slot: int, adapter: Adapter, shapes: dict[str, dict[str, tuple[int, ...]]]) -> None:
        """The adapter's derived tensors at each of its sites, from its own tensors padded to the
        pool's shapes in float32 (then stored in the pool's dtype)."""
        for site, site_shapes in shapes.items():
            own = {
                k: _padded(adapter.tensors[site][k].detach().to(self.device, torch.float32), s)
                for k, s in site_shapes.items()
            }
            derived = derived_tensors(self.atype, site, self._modules[site], own, adapter.config)
            for key, value in derived.items():
                table = self.tensors[site].get(key)
                if table is None:
                    table = torch.zeros((self.capacity + 1, *value.shape), device=self.device, dtype=self.dtype)
                    self.tensors[site][key] = table
                    self._derived.add(key)
                _pool_shapes_agree(self.atype, site, key, table.shape[1:], value.shape)
                table[slot].copy_(value)


class LivePool:
    """Trainable adapters' own tensors, stacked per forward: slot i + 1 is `adapters[i]`.

    Stacking is differentiable, so each row's loss reaches exactly its own adapter's tensors.
    """

    slots_are_stamped = False  # the adapters' own tensors change in place between steps

    def __init__(self, atype, variant: str, bucket: dict[str, int], adapters: list[Adapter], model, device, dtype):
        self.atype = atype
        self.variant = variant
        self.bucket = dict(bucket)
        self.adapters = adapters
        self.model = model
        self.device, self.dtype = device, dtype
        self.index = {a.name: i + 1 for i, a in enumerate(adapters)}
        self._sites: dict[str, dict[str, torch.Tensor]] = {}
        self._modules: dict | None = None  # the base's modules by path, for derive (made on first use)
        self._shapes = [a.bucket_shapes(model) for a in adapters]
        self.constants = {
            key: torch.tensor([0.0] + [atype.constants(a.config)[key] for a in adapters], device=device, dtype=dtype)
            for key in atype.constants(adapters[0].config)
        }
        self.shared = pooled_shared(adapters[0], self.bucket, device, dtype) if adapters[0].shared else {}

    def site(self, site: str) -> dict[str, torch.Tensor] | None:
        if site not in self._sites:
            names: dict[str, tuple[int, ...]] = {}
            for shapes in self._shapes:
                names.update(shapes.get(site, {}))
            if not names:
                return None
            stacked = {}
            for key, shape in names.items():
                rows = [torch.zeros(shape, device=self.device, dtype=self.dtype)]
                for adapter in self.adapters:
                    own = adapter.tensors.get(site, {}).get(key)
                    rows.append(
                        _padded(own.to(device=self.device, dtype=self.dtype), shape) if own is not None else rows[0]
                    )
                stacked[key] = torch.stack(rows)
            if self.atype.derives:
                stacked.update(self._derive(site))
            self._sites[site] = stacked
        return self._sites[site]

    def _derive(self, site: str) -> dict[str, torch.Tensor]:
        """Each adapter's derived tensors at `site`, from its own (trainable) tensors, stacked: the
        gradient reaches the tensors they come from. Adapters without the site get zeros."""
        if self._modules is None:
            self._modules = dict(self.model.named_modules())
        module = self._modules[site]
        per_adapter: list[dict[str, torch.Tensor] | None] = []
        for adapter, shapes in zip(self.adapters, self._shapes):
            if site not in shapes:
                per_adapter.append(None)
                continue
            own = {
                k: _padded(adapter.tensors[site][k].to(self.device, torch.float32), s) for k, s in shapes[site].items()
            }
            per_adapter.append(derived_tensors(self.atype, site, module, own, adapter.config))
        first = next(d for d in per_adapter if d is not None)
        stacked = {}
        for key, value in first.items():
            zero = torch.zeros(value.shape, device=self.device, dtype=self.dtype)
            rows = [zero]
            for d in per_adapter:
                if d is not None:
                    _pool_shapes_agree(self.atype, site, key, value.shape, d[key].shape)
                rows.append(d[key].to(self.dtype) if d is not None else zero)
            stacked[key] = torch.stack(rows)
        return stacked
