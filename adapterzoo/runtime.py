"""How a plan reaches the base: a wrapped forward at each delta site, and an attention wrapper.

The base's modules are never replaced. Each module that some adapter type attaches to gets its
`forward` wrapped once (`DeltaSite`, an instance attribute), the first time an adapter uses that
site; the wrapper reads the active `BatchPlan` (a context variable, so concurrent threads never
see each other's plans) and adds every pool's delta for the rows that use it. Prefix tuning
needs to extend an attention layer's keys and values, which no module's forward can reach.
Without a KV cache (training, a plain forward) the base's attention implementation, wrapped once
(transformers' `AttentionInterface`, see `register_attention`), prepends each row's prefix in
every layer. With a KV cache (generation, serving) the prefix is written into the cache once, at
prefill, as PEFT does, so decode steps copy nothing more than the base.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import nn

from . import kernels
from .plan import BatchPlan, PoolUse, fit_tokens, place_rows, virtual_columns

_ACTIVE: ContextVar[BatchPlan | None] = ContextVar("adapterzoo_plan", default=None)
_SITES: ContextVar[dict[int, str] | None] = ContextVar(
    "adapterzoo_attention_sites", default=None
)  # None: prefixes are in the cache
_ATTENTION: ContextVar[object | None] = ContextVar("adapterzoo_attention", default=None)  # see attention_by
# whether this forward's deltas may run fused (kernels.may_fuse), asked at its first delta site: a
# one-item list that `active` makes per forward (None: not asked yet)
_MAY_FUSE: ContextVar[list[bool | None] | None] = ContextVar("adapterzoo_may_fuse", default=None)
ATTENTION_NAME = "adapterzoo"


@contextmanager
def active(plan: BatchPlan | None, attention_sites: dict[int, str] | None) -> Iterator[None]:
    """Make `plan` the one the hooks see; `attention_sites` None: prefixes are in the KV cache."""
    token = _ACTIVE.set(plan)
    sites_token = _SITES.set(attention_sites)
    fuse_token = _MAY_FUSE.set([None])
    try:
        yield
    finally:
        _ACTIVE.reset(token)
        _SITES.reset(sites_token)
        _MAY_FUSE.reset(fuse_token)


@contextmanager
def attention_by(runner: object) -> Iterator[None]:
    """Let `runner.attend(module, query, key, value, **kwargs)` compute every attention layer's output
    (in place of SDPA over the layer's own keys and values) for forwards in this context: a
    forward whose rows are not sequences, such as the engine's step that feeds running rows
    and joining prompts together (serve/ragged.py), knows better than the model which keys
    each query may see."""
    token = _ATTENTION.set(runner)
    try:
        yield
    finally:
        _ATTENTION.reset(token)


class Runtime:
    """Hooks of one base model."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.modules = dict(model.named_modules())
        self.delta_sites: dict[str, DeltaSite] = {}
        self.attention_sites: dict[int, str] = {}  # id(attention module) -> path
        embeddings = model.get_input_embeddings()
        self.embedding_path = next(p for p, m in model.named_modules() if m is embeddings)
        # The zoo takes the base over (frozen, moved, hooked), attention included: its layers read
        # the implementation by name from the config, so the name is switched here, and the
        # caller's choice is kept so that `detach` can give the model back as it came.
        register_attention()
        self.base_attention: str | None = model.config._attn_implementation
        model.config._attn_implementation = ATTENTION_NAME

    def hook_delta_site(self, path: str) -> None:
        if path not in self.delta_sites:
            module = self.modules[path]
            site = DeltaSite(module, path, module.__dict__.get("forward"))
            module.forward = site
            self.delta_sites[path] = site

    def hook_prefix_site(self, path: str) -> None:
        self.attention_sites[id(self.modules[path])] = path

    def prefix_fits_cache(self) -> bool:
        """Whether prefixes can live in a KV cache: the cache has one mask for every layer, so
        every attention layer must be a prefix site (true of the built-in prefix type)."""
        modules = [self.modules[p] for p in self.attention_sites.values()]
        return (
            bool(modules)
            and all(hasattr(m, "layer_idx") for m in modules)
            and len(modules) == _attention_layer_count(self.model)
        )

    def detach(self) -> None:
        """Give the base back as it came: no hook of this runtime left on it, and its config's
        attention implementation what it was before. The zoo on it must not be used after this."""
        for site in self.delta_sites.values():
            site.remove()
        self.delta_sites.clear()
        self.attention_sites.clear()
        self.model.config._attn_implementation = self.base_attention

    def write_prefixes(self, plan: BatchPlan, cache, like: torch.Tensor) -> None:
        """Put every row's prefix keys/values (zeros where it has none) into an empty cache."""
        for path in sorted(self.attention_sites.values(), key=lambda p: self.modules[p].layer_idx):
            keys, values = prefix_keys_values(plan, path, plan.batch_size, like)
            cache.update(keys, values, self.modules[path].layer_idx)


class DeltaSite:
    """A delta site's forward: the module's own, then every active pool's delta (`apply_delta`).

    Installed as the module's `forward` (an instance attribute, as serve/packed.py's packed linears
    are), not as a forward hook, for speed: PyTorch calls a module that has any hook through a slower
    path (about 10 us more per call), and a Llama base with BitFit, Houlsby, AdapterBias and LoRA
    registered has 271 hooked modules, so a base-only decode step ran 3.4% slower with hooks
    (SmolLM2-135M, 16 rows, 1 thread: 123.8 vs 119.6 ms) and every adapter step paid the same.
    `inner` is the instance forward this one wraps (a packed linear's), None for the class's own;
    `set_instance_forward` replaces it underneath, `remove` puts it back."""

    def __init__(self, module: nn.Module, path: str, inner=None):
        self.module, self.path, self.inner = module, path, inner

    def __call__(self, *args, **kwargs):
        module = self.module
        inner = self.inner
        output = inner(*args, **kwargs) if inner is not None else type(module).forward(module, *args, **kwargs)
        plan = _ACTIVE.get()
        if plan is None or not plan.deltas:
            return output
        pairs = plan.deltas_at(self.path)
        if not pairs:  # no pool of this plan here (a LoRA-only batch at one of BitFit's 271 sites)
            return output
        x = args[0] if args else next(iter(kwargs.values()))
        y = output[0] if isinstance(output, tuple) else output
        shape = y.shape
        if y.dim() != 3:  # e.g. a pooler's (B, d): view as (B, T, d) for the types' math
            x, y = x.reshape(shape[0], -1, x.shape[-1]), y.reshape(shape[0], -1, shape[-1])
        owned = y is output and _owned(y)  # (a statement of its own: as an argument below, y counts twice)
        fused = _fused_site(plan, self.path, pairs, x, y, module, owned)
        if fused is not None:
            y = fused
        else:
            for use, tensors in pairs:
                y = apply_delta(use, tensors, x, y, plan.training, self.path, module)
        if y.shape != shape:
            y = y.reshape(shape)
        return (y, *output[1:]) if isinstance(output, tuple) else y

    def remove(self) -> None:
        """The module's forward as it was before this site was installed."""
        if self.module.__dict__.get("forward") is self:
            if self.inner is None:
                del self.module.forward
            else:
                self.module.forward = self.inner


def instance_forward(module: nn.Module):
    """The instance `forward` a module runs under any `DeltaSite` (None: its class's own)."""
    forward = module.__dict__.get("forward")
    return forward.inner if isinstance(forward, DeltaSite) else forward


def set_instance_forward(module: nn.Module, forward) -> None:
    """Run `forward` (None: the class's own) as the module's forward, under its `DeltaSite` if it has one,
    so that adapters' deltas still follow it (serve/packed.py swaps linear layers' forwards this way)."""
    site = module.__dict__.get("forward")
    if isinstance(site, DeltaSite):
        site.inner = forward
    elif forward is not None:
        module.forward = forward
    elif "forward" in module.__dict__:
        del module.forward


def strip_delta_sites(model: nn.Module) -> None:
    """Take every `DeltaSite` off a model (a copy of a zoo's base that must not answer to its plans)."""
    for module in model.modules():
        site = module.__dict__.get("forward")
        if isinstance(site, DeltaSite):
            site.remove()


def apply_delta(
    use: PoolUse,
    tensors: dict[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    training: bool,
    site: str | None = None,
    module: nn.Module | None = None,
) -> torch.Tensor:
    """y + delta for the rows of `use`; the other rows are left exactly as they are. `site` and
    `module` reach the type as `w.site` / `w.module` (base-aware deltas such as DoRA's)."""
    atype = use.pool.atype
    fuses = _fuses(atype)
    if fuses and kernels.fits(y) and _may_fuse(training):
        # one C++ call for the pool's whole delta here (adapterzoo/kernels) instead of the type's
        # few small eager ops; for the pool's own rows only (no widening: the kernel selects rows
        # itself). None: not fusable here (an extended LoRA, an unknown activation): eager below.
        if fuses == "call":
            call = _kernel_call(use, tensors, x, y, site, module)
            out = kernels.run((call,), x, y) if call is not None else None
        else:
            out = atype.fused_delta(x, y, use.gather(tensors, site, module), use.rows)
        if out is not None:
            return out
    if (
        use.rows is not None
        and y.shape[1] == 1
        and not training
        and use.batch_size == y.shape[0]
        and use.ran_at(site)
        and getattr(atype, "zero_slot_is_identity", False)
    ):
        # A decode step of a plan kept across steps: every row at once, slot 0 (a delta of exactly
        # zero) for the other pools' rows. In a 16-row decode step of six types this replaced 2
        # index_select + 1 index_add per site and pool (~1260 small ops a step). Only from the
        # plan's second forward on: widening gathers every row's tensors and builds bags once, which
        # pays back over later steps only; on a plan's first forward (one that runs once, such as
        # the engine's join steps of a few hundred token rows) the pool's own rows cost less:
        # measured per site and pool (fresh plan, cold caches, 1 thread), every row / own rows
        # 1.04-1.34x at 16-32 rows and 1.19-2.57x at 64-256 rows, while with a kept plan every
        # row is 0.60-0.92x at 16-32 rows. Not in a prefill (T > 1 tokens a row) either: there the
        # selected rows' weights are gathered per row for a bmm, and fewer rows gather less.
        use = use.every_row()
    w = use.gather(tensors, site, module)
    if use.rows is None:
        return y + atype.delta(x, y, w, training).to(y.dtype)
    rows = use.rows
    ys = y.index_select(0, rows)
    d = atype.delta(x.index_select(0, rows), ys, w, training)
    # index_copy of ys + d, not index_add of d: index_add runs as a parallel scatter that wakes every
    # OpenMP thread, ~500 us a call with two threads at the PASSIVE wait policy against ~5 us (a
    # plan's rows are distinct, so the values are the same)
    return y.index_copy(0, rows, ys + d.to(y.dtype))


def _may_fuse(training: bool) -> bool:
    """`kernels.may_fuse`, asked once a forward (inside `active`), else at every call."""
    cell = _MAY_FUSE.get()
    if cell is None:
        return kernels.may_fuse(training)
    if cell[0] is None:
        cell[0] = kernels.may_fuse(training)
    return cell[0]


def _owned(y: torch.Tensor) -> bool:
    """Whether a module's output is its caller's alone to change: no Python reference but the caller's
    two (`output`, `y`) and this call's, and no other tensor on its storage (a view of the input or of
    a tensor the module keeps: in inference mode views are not marked as views). A linear layer's or
    a norm's output is; an identity's, or a kept buffer's, is not.

    Nor may its memory be anyone else's by a way those counts miss (found by an attack review: the
    kernels wrote the rows' deltas into memory the module kept): a storage on borrowed memory
    (from_numpy, frombuffer, from_dlpack, from_file: not resizable, as torch's own allocations are),
    or shared with other processes, or whose storage object someone holds (`y.untyped_storage()`
    gives the same object each time, so the storage's use count does not show it)."""
    uses = _STORAGE_USES
    if uses is None or sys.getrefcount(y) > _FRESH_COUNTS[0]:
        return False
    storage = y.untyped_storage()
    return (
        storage.resizable()
        and not storage.is_shared()
        and sys.getrefcount(storage) <= _FRESH_COUNTS[1]
        and uses(storage._cdata) <= 2
    )


def _fresh_counts() -> tuple[int, int]:
    """The reference counts `_owned` sees for an output that nothing else holds (y's, its storage's),
    measured once in this interpreter the way `DeltaSite` calls it, with the same two locals: they
    differ between Python versions (a 3.10 frame counts one more than 3.11's; 3.14 borrows some
    references without counting them), so no number is written down here."""
    seen = []

    def owned_probe(y: torch.Tensor) -> None:  # (the shape of `_owned`: y, then a storage local)
        held = sys.getrefcount(y)
        storage = y.untyped_storage()
        seen.append((held, sys.getrefcount(storage)))

    output = torch.empty(1)
    y = output
    owned_probe(y)
    return seen[0]


_STORAGE_USES = getattr(torch._C, "_storage_Use_Count", None)  # (private: without it, `_owned` is never true)
_FRESH_COUNTS = _fresh_counts()


def _fused_site(
    plan: BatchPlan, path: str, pairs: list, x: torch.Tensor, y: torch.Tensor, module, owned: bool = False
) -> torch.Tensor | None:
    """Every pool's delta at a site of a decode step in one `kernels.run`, with the kernels' calls
    checked once per plan and site (kept with a plan whose pools are all slot pools); None where a
    pool offers no `fused_call` here (then each pool runs `apply_delta`, as before). `owned`: y is
    the module's fresh output (`_owned`), so the deltas are added into it (`kernels.run`'s `into_y`).

    Why: a kept decode plan calls the same kernels with the same tables at every step, and each
    pool's `apply_delta` and kernel wrapper cost Python checks at each of ~420 pool sites of a mixed
    16-row step (the deltas' C work is a fraction of it)."""
    if not isinstance(x, torch.Tensor) or not kernels.fits(y) or not _may_fuse(plan.training):
        return None
    calls = plan.kernel_calls.get(path, _UNBOUND)
    if calls is _UNBOUND:
        calls = tuple(_kernel_call(use, tensors, x, y, path, module) for use, tensors in pairs)
        calls = None if None in calls else calls
        if all(getattr(use.pool, "slots_are_stamped", False) for use, _ in pairs):
            plan.kernel_calls[path] = calls
    return kernels.run(calls, x, y, into_y=owned) if calls is not None else None


def _kernel_call(use: PoolUse, tensors, x: torch.Tensor, y: torch.Tensor, site: str | None, module):
    """The pool's checked kernel call at `site` (its type's `fused_call`), or None: its type offers none,
    or not for this pool and these x, y."""
    atype = use.pool.atype
    if _fuses(atype) != "call":
        return None
    return atype.fused_call(x, y, use.gather(tensors, site, module), use.rows)


_UNBOUND = object()
_FUSES: dict[type, str | None] = {}


def _fuses(atype) -> str | None:
    """ "call" or "delta": which of `fused_call` / `fused_delta` a type's kernels run through, where the
    class that defines it also defines the `delta` the type runs; None otherwise. A subclass that
    overrides `delta` only (DoRA over LoRA, a test's type) keeps its own math, eagerly."""
    cls = type(atype)
    if cls not in _FUSES:
        _FUSES[cls] = None
        for method in ("fused_call", "fused_delta"):
            owner = next((c for c in cls.__mro__ if method in c.__dict__), None)
            if owner is not None and "delta" in owner.__dict__ and cls.delta is owner.delta:
                _FUSES[cls] = method.removeprefix("fused_")
                break
    return _FUSES[cls]


# ------------------------------------------------------------------------------- attention


def register_attention() -> None:
    """Make `ATTENTION_NAME` (`prefixed_attention`, with SDPA's mask) known to transformers.

    Why process-wide: a transformers model finds its attention function by name, in a table shared
    by every model of the process (`AttentionInterface`); there is no per-model or per-call table.
    Registering is idempotent and changes no model: only a model whose config names
    `ATTENTION_NAME` (a zoo's base) runs it, and it is exactly SDPA when no prefix is active."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    if ALL_ATTENTION_FUNCTIONS.get(ATTENTION_NAME) is not prefixed_attention:
        AttentionInterface.register(ATTENTION_NAME, prefixed_attention)
    if ATTENTION_NAME not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionMaskInterface.register(ATTENTION_NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def prefixed_attention(module, query, key, value, attention_mask, **kwargs):
    """SDPA attention, with each row's prefix keys/values in front when the plan has prefixes.

    Li & Liang (2021), eq. 3: h_i = LM(z_i, h_<i) where h_<i starts with the trainable prefix
    P_theta. Rows with a shorter prefix, or none, mask the unused prefix columns.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    runner = _ATTENTION.get()
    if runner is not None:
        return runner.attend(module, query, key, value, **kwargs)
    plan = _ACTIVE.get()
    if plan is not None and plan.prefixes:
        path = (_SITES.get() or {}).get(id(module))
        if path is not None:
            key, value, attention_mask = _with_prefix(plan, path, module, query, key, value, attention_mask)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _attention_layer_count(model: nn.Module) -> int:
    config = getattr(model.config, "get_text_config", lambda: model.config)()
    return getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 0)


def prefix_keys_values(plan: BatchPlan, path: str, batch: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every row's prefix at one attention layer, (B, kv_heads, width, head_dim), zeros for rows
    without one (their columns are masked)."""
    width = plan.prefix_width
    pk = pv = None
    for use in plan.prefixes:
        tensors = use.pool.site(path)
        if tensors is None:
            continue
        k, v = use.pool.atype.prefix(use.gather(tensors, path))  # (n, kv_heads, P_bucket, head_dim)
        k, v = fit_tokens(k, width, 2).to(like.dtype), fit_tokens(v, width, 2).to(like.dtype)
        if pk is None:
            pk = k.new_zeros(batch, *k.shape[1:])
            pv = v.new_zeros(batch, *v.shape[1:])
        pk, pv = place_rows(pk, use, k), place_rows(pv, use, v)
    return pk, pv


def prefix_columns(plan: BatchPlan) -> torch.Tensor:
    """(B, width) bool: which prefix columns each row uses (left-aligned)."""
    return virtual_columns(plan.prefix_lengths, plan.prefix_width)


def _with_prefix(plan: BatchPlan, path: str, module, query, key, value, mask):
    batch, kv_heads, kv_len, head_dim = key.shape
    q_len = query.shape[2]
    width = plan.prefix_width
    pk, pv = prefix_keys_values(plan, path, batch, key)
    if pk is None:  # no prefix adapter attaches here
        return key, value, mask
    prefix_mask = prefix_columns(plan)[:, None, None, :].expand(batch, 1, q_len, width)
    if mask is None:  # sdpa would have used is_causal; spell the mask out instead
        mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=key.device)
        if getattr(module, "is_causal", True) and q_len > 1:
            mask = torch.tril(mask, diagonal=kv_len - q_len)
        mask = mask[None, None]
    if mask.dtype != torch.bool:  # an additive float mask
        prefix_mask = torch.zeros_like(prefix_mask, dtype=mask.dtype).masked_fill(
            ~prefix_mask, torch.finfo(mask.dtype).min
        )
    mask = torch.cat([prefix_mask, mask.expand(batch, 1, q_len, kv_len)], dim=-1)
    return torch.cat([pk, key], dim=2), torch.cat([pv, value], dim=2), mask
