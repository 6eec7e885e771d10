"""Checks that an adapter type keeps the contract, with errors that name the type and the site.

A type's mistakes would otherwise surface deep in the core as bare errors (an empty
`NotImplementedError`, `KeyError: 'r'`, a shape error in the pool) that name neither the type
nor the site. Two checks catch them early:

- `check_type_class`, when a plugin registers a type: name, config, kind, the kind's hook.
- `check_adapter`, when the first adapter of a pool is added to a zoo: its constants, and the
  type run once on a tiny input (a 2-token forward of the base, captured at each site), with the
  result's shape checked against what the core will do with it.
"""

from __future__ import annotations

import dataclasses
import numbers

import torch
from torch import nn

from .errors import PluginError
from .types import KINDS, AdapterConfig, AdapterType


def check_type_class(cls: type, plugin: str) -> None:
    """What can be checked of a type without a base: raises `PluginError` naming type and plugin."""
    if not (isinstance(cls, type) and issubclass(cls, AdapterType)):
        raise PluginError(f"plugin {plugin!r} registered {cls!r}, which is not an AdapterType subclass")
    for attr in ("name", "Config"):
        if not getattr(cls, attr, None):
            raise PluginError(f"adapter type {cls.__name__} from plugin {plugin!r} has no {attr!r}")
    what = f"adapter type {cls.name!r} ({cls.__module__}.{cls.__qualname__}, plugin {plugin!r})"
    if not (
        isinstance(cls.Config, type) and issubclass(cls.Config, AdapterConfig) and dataclasses.is_dataclass(cls.Config)
    ):
        raise PluginError(f"{what}: Config must be a @dataclass deriving from adapterzoo.AdapterConfig")
    if cls.kind not in KINDS:
        raise PluginError(f"{what}: kind={cls.kind!r} is not a kind; use one of {', '.join(map(repr, KINDS))}")
    facts = KINDS[cls.kind]
    missing = [m for m in ("sites", "tensors", facts.method) if getattr(cls, m) is getattr(AdapterType, m)]
    if facts.virtual_tokens and cls.length is AdapterType.length:
        missing.append("length")
    if missing:
        raise PluginError(
            f"{what}: a {cls.kind!r} type must define {', '.join(m + '()' for m in missing)} (see docs/plugins.md)"
        )


def _is_number(value: object) -> bool:
    if isinstance(value, torch.Tensor):
        return value.numel() == 1
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_constants(atype: AdapterType, config: AdapterConfig) -> None:
    values = atype.constants(config)
    if not isinstance(values, dict):
        raise PluginError(
            f"adapter type {atype.name!r}: constants() must return a dict {{name: number}}, got {type(values).__name__}"
        )
    bad = {k: v for k, v in values.items() if not _is_number(v)}
    if bad:
        raise PluginError(
            f"adapter type {atype.name!r}: constants() must map names to numbers (they are stored "
            f"per slot as floats), got {bad!r}; keep strings in variant(config)"
        )


@torch.no_grad()
def check_adapter(model: nn.Module, adapter, device: torch.device, dtype: torch.dtype) -> None:
    """Run `adapter`'s type once on a tiny input and check every result's shape."""
    from .plan import PoolUse
    from .pool import LivePool

    atype = adapter.atype
    check_constants(atype, adapter.config)
    pool = LivePool(atype, adapter.variant, adapter.bucket, [adapter], model, device, dtype)
    use = PoolUse(
        pool=pool,
        rows=None,
        slots=1,
        lengths=torch.tensor([adapter.length()], device=device) if atype.facts.virtual_tokens else None,
    )
    modules = dict(model.named_modules())
    facts = atype.facts
    with torch.inference_mode(False):  # the adapter's own tensors may be parameters
        if facts.attaches == "module":
            for site, (x, y) in _site_inputs(model, list(adapter.tensors)).items():
                w = use.gather(pool.site(site), site, modules[site])
                out = _called(atype, "delta", site, lambda x=x, y=y, w=w: atype.delta(x, y, w, False))
                if not _adds_to(out, y):
                    raise PluginError(
                        f"adapter type {atype.name!r} at site {site!r}: delta() returned "
                        f"{_shape(out)} for a module output of shape {tuple(y.shape)}; return "
                        "(n or 1, T, out), what is added to the output"
                    )
                if getattr(atype, "zero_slot_is_identity", False):
                    last = (x[:, -1:], y[:, -1:]) if x.shape[1] == y.shape[1] else (x, y)  # an embedding's x: ids
                    _check_zero_slot(atype, site, modules[site], pool, *last)
        elif facts.attaches == "embeddings":
            site = next(iter(adapter.tensors))
            width = model.get_input_embeddings().embedding_dim
            out = _called(
                atype, "virtual_tokens", site, lambda: atype.virtual_tokens(use.gather(pool.site(site), site))
            )
            if (
                not isinstance(out, torch.Tensor)
                or out.dim() != 3
                or out.shape[0] != 1
                or out.shape[2] != width
                or out.shape[1] < adapter.length()
            ):
                raise PluginError(
                    f"adapter type {atype.name!r} at site {site!r}: virtual_tokens() returned "
                    f"{_shape(out)}; expected (n, P, {width}) with P >= length(config) = "
                    f"{adapter.length()} (the base's embedding width)"
                )
        else:
            from .sites import attention_dims

            for site in adapter.tensors:
                kv_heads, head_dim = attention_dims(model, modules[site])
                out = _called(atype, "prefix", site, lambda site=site: atype.prefix(use.gather(pool.site(site), site)))
                ok = (
                    isinstance(out, tuple)
                    and len(out) == 2
                    and all(
                        isinstance(t, torch.Tensor)
                        and t.dim() == 4
                        and t.shape[0] == 1
                        and t.shape[1] == kv_heads
                        and t.shape[3] == head_dim
                        and t.shape[2] >= adapter.length()
                        for t in out
                    )
                )
                if not ok:
                    got = tuple(_shape(t) for t in out) if isinstance(out, tuple) else _shape(out)
                    raise PluginError(
                        f"adapter type {atype.name!r} at site {site!r}: prefix() returned {got}; "
                        f"expected (keys, values), each (n, {kv_heads}, P, {head_dim}) with P >= "
                        f"length(config) = {adapter.length()}"
                    )


def _check_zero_slot(atype: AdapterType, site: str, module: nn.Module, pool, x: torch.Tensor, y: torch.Tensor) -> None:
    """A type that promises `zero_slot_is_identity` runs over every row of a decode step, slot 0
    for the rows of other pools (runtime.apply_delta): its delta there must be exactly zero, or
    it changes those rows (the bare base's, other adapters'). Checked as the core will call it:
    one token, slots as a tensor."""
    from .plan import PoolUse

    use = PoolUse(pool=pool, rows=None, slots=torch.zeros(1, dtype=torch.long, device=x.device), batch_size=1)
    out = _called(atype, "delta", site, lambda: atype.delta(x, y, use.gather(pool.site(site), site, module), False))
    if isinstance(out, torch.Tensor) and torch.count_nonzero(out) == 0:
        return
    largest = f"up to {out.abs().max().item():.3g}" if isinstance(out, torch.Tensor) else _shape(out)
    raise PluginError(
        f"adapter type {atype.name!r} at site {site!r}: it sets zero_slot_is_identity, but delta() at slot 0 "
        f"(every tensor and constant zero: no adapter) returned {largest}, not zeros; in a decode step that "
        "would change the rows of other adapters and of the bare base. Make delta exactly zero there, or "
        "remove zero_slot_is_identity (docs/plugins.md)"
    )


def _adds_to(delta: object, y: torch.Tensor) -> bool:
    """Whether `delta` can be added to `y` without changing y's shape (rows may broadcast)."""
    if not isinstance(delta, torch.Tensor) or delta.dim() != y.dim():
        return False
    try:
        return torch.broadcast_shapes(delta.shape, y.shape) == y.shape
    except RuntimeError:
        return False


def _shape(value: object) -> str:
    return f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else f"a {type(value).__name__}"


def _called(atype: AdapterType, method: str, site: str, call):
    try:
        return call()
    except PluginError:
        raise
    except Exception as exc:
        raise PluginError(
            f"adapter type {atype.name!r} at site {site!r}: {method}() raised {type(exc).__name__}: {exc}"
        ) from exc


def _site_inputs(model: nn.Module, sites: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each site's (input, output) in a 2-token forward of the bare base, as (1, T, d)."""
    modules = dict(model.named_modules())
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def capture(site):
        def hook(module, args, kwargs, output):
            if site in seen:
                return
            x = args[0] if args else next(iter(kwargs.values()))
            y = output[0] if isinstance(output, tuple) else output
            seen[site] = (x.reshape(x.shape[0], -1, x.shape[-1]), y.reshape(y.shape[0], -1, y.shape[-1]))

        return hook

    handles = [modules[s].register_forward_hook(capture(s), with_kwargs=True) for s in sites]
    try:
        device = next(model.parameters()).device
        ids = torch.tensor([[4, 5]], device=device)
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    finally:
        for h in handles:
            h.remove()
    return seen
