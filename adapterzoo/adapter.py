"""One adapter: its type, its validated config, and its tensors at each site.

The tensors here are the adapter's own copy, in their true shapes, in float32 on the host. They
are what gets trained, saved and pushed; the slot pools on the device hold padded copies that
are refreshed whenever these change (see `Adapter.version`).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import InvalidConfigError, InvalidNameError, PluginError, PoolLimitError, ShapeMismatchError
from .types import AdapterConfig, AdapterType, Shape, call_sizes

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_name(name: object) -> str:
    """Adapter names become file names, Hub repo names and API model ids: keep them plain."""
    if not isinstance(name, str) or not name:
        raise InvalidNameError(f"adapter name must be a non-empty string, got {name!r}")
    if "/" in name or "\\" in name or ".." in name or not NAME_RE.fullmatch(name):
        raise InvalidNameError(
            f"invalid adapter name {name!r}: use 1-128 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit, with no '/', '\\' or '..' (e.g. 'sql-lora')"
        )
    return name


def bucket(n: int) -> int:
    """Pool bucket of a size: the next power of two, so ranks 5..8 share the rank-8 pool."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


@dataclass
class Adapter:
    name: str
    atype: AdapterType
    config: AdapterConfig
    tensors: dict[str, dict[str, torch.Tensor]]  # site -> tensor name -> true-shape float32 tensor
    sizes: dict[str, int]  # the type's named sizes, true values
    metadata: dict[str, Any] = field(default_factory=dict)
    _edits: int = 0
    head: Any = None  # an optional classification head (adapterzoo.heads.Head), trained and saved with it
    _bucket_shapes: dict | None = field(default=None, repr=False)
    _shape_digest: str | None = field(default=None, repr=False)
    shared: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # the type's shared tensors (frozen)
    shared_seed: int = 0
    shared_pool_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict, repr=False)  # at bucketed sizes

    @property
    def type_name(self) -> str:
        return self.atype.name

    @property
    def bucket(self) -> dict[str, int]:
        return {k: bucket(v) for k, v in self.sizes.items()}

    def bucket_shapes(self, model: nn.Module) -> dict[str, dict[str, tuple[int, ...]]]:
        """site -> tensor name -> shape in its pool (sizes rounded up to the bucket). Config and
        sizes never change, so this is worked out once, not at every slot write or training step."""
        if self._bucket_shapes is None:
            self._bucket_shapes = expected_shapes(self.atype, model, self.config, self.bucket)
        return self._bucket_shapes

    @property
    def variant(self) -> str:
        return self.atype.variant(self.config)

    @property
    def pool_key(self) -> tuple:
        """(type, variant, bucketed sizes, digest of every tensor's pool shape at every site).

        Adapters share a pool only when all of it agrees: a literal dimension that depends on the
        config (not only the named sizes) changes the digest, so such adapters get pools of their own
        instead of failing at their first forward. Known once the shapes are (at creation)."""
        if self._shape_digest is None:
            if self._bucket_shapes is None:
                raise PluginError(
                    f"adapter {self.name!r} was built without its base, so its pool shapes are unknown; "
                    "create adapters with adapterzoo.adapter.new_adapter / adapter_from_state (or Zoo methods)"
                )
            signature = repr(sorted((site, sorted(shapes.items())) for site, shapes in self._bucket_shapes.items()))
            if self.shared:  # adapters share a pool only if they share these too
                signature += repr((self.shared_seed, sorted((k, tuple(t.shape)) for k, t in self.shared.items())))
            self._shape_digest = hashlib.sha1(signature.encode()).hexdigest()[:12]
        return (self.atype.name, self.variant, tuple(sorted(self.bucket.items())), self._shape_digest)

    @property
    def trainable(self) -> bool:
        return any(t.requires_grad for site in self.tensors.values() for t in site.values())

    def parameters(self) -> list[torch.Tensor]:
        head = list(self.head.tensors.values()) if self.head is not None else []
        return [t for site in self.tensors.values() for t in site.values()] + head

    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.parameters())

    def version(self) -> int:
        """Changes whenever a tensor is changed in place (optimizer steps, copy_), or edited."""
        return self._edits + sum(t._version for t in self.parameters())

    def mark_edited(self) -> None:
        self._edits += 1

    def set_trainable(self, trainable: bool) -> None:
        for site in [*self.tensors.values(), *([self.head.tensors] if self.head is not None else [])]:
            for key, t in list(site.items()):
                if trainable and not isinstance(t, nn.Parameter):
                    site[key] = nn.Parameter(t.detach(), requires_grad=True)
                elif not trainable:
                    site[key] = t.detach().requires_grad_(False)
        self.mark_edited()

    def length(self) -> int:
        """Virtual tokens this adapter adds (prompt and prefix kinds), else 0."""
        return self.atype.length(self.config) if self.atype.facts.virtual_tokens else 0

    def prompt_length(self) -> int:
        """Virtual tokens this adapter puts before the input embeddings (prompt kinds), else 0."""
        return self.length() if self.atype.facts.attaches == "embeddings" else 0

    def prefix_length(self) -> int:
        """Prefix keys/values this adapter puts before each attention layer's (prefix kinds), else 0."""
        return self.length() if self.atype.facts.attaches == "attention" else 0

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat `{site}.{tensor}` names, as saved to safetensors."""
        return {f"{site}.{key}": t.detach() for site, ts in self.tensors.items() for key, t in ts.items()}


def resolve_shape(shape: Shape, sizes: dict[str, int], where: str = "") -> tuple[int, ...]:
    """A `tensors()` shape with its named sizes filled in; a name missing from `sizes()`, or an
    entry that is neither a name nor a positive int, is the type's mistake and is named as such."""
    out = []
    for d in shape:
        if isinstance(d, str):
            if d not in sizes:
                raise PluginError(
                    f"{where}: shape {shape!r} names the size {d!r}, which sizes() does not return (it returns "
                    f"{sorted(sizes) or 'none'}); add {d!r} to the type's sizes(config)"
                )
            out.append(sizes[d])
        elif isinstance(d, int) and not isinstance(d, bool) and d >= 1:
            out.append(d)
        else:
            raise PluginError(f"{where}: shape {shape!r} has {d!r}; each entry must be a positive int or a size name")
    return tuple(out)


def expected_shapes(
    atype: AdapterType, model: nn.Module, config: AdapterConfig, sizes: dict[str, int]
) -> dict[str, dict[str, tuple[int, ...]]]:
    """site -> tensor name -> shape, for an adapter of `config` with the given (true or bucket) sizes."""
    modules = dict(model.named_modules())
    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    for site in atype.sites(model, config):
        if site not in modules:
            near = [p for p in modules if p.endswith(site.rsplit(".", 1)[-1])][:3]
            raise PluginError(
                f"adapter type {atype.name!r}: sites() returned {site!r}, which is not a module of this "
                f"{type(model).__name__}"
                + (f" (similar: {', '.join(near)})" if near else "")
                + "; return paths from model.named_modules() (adapterzoo.sites helps)"
            )
        spec = atype.tensors(model, site, modules[site], config)
        if not isinstance(spec, dict):
            raise PluginError(
                f"adapter type {atype.name!r} at site {site!r}: tensors() must return a dict "
                f"{{name: shape}}, got {type(spec).__name__}"
            )
        where = f"adapter type {atype.name!r} at site {site!r}"
        shapes[site] = {k: resolve_shape(s, sizes, f"{where}, tensor {k!r}") for k, s in spec.items()}
    return shapes


# (type name, seed, true shapes) -> the shared tensors: made once per process, whatever the number of adapters
_SHARED: dict[tuple, dict[str, torch.Tensor]] = {}


def attach_shared(adapter: Adapter, model: nn.Module) -> None:
    """Give `adapter` its type's shared tensors (made once per type, seed and shapes)."""
    atype, config = adapter.atype, adapter.config
    adapter.shared, adapter.shared_seed = shared_tensors(atype, model, config, adapter.sizes)
    spec = atype.shared_tensors(model, config) if adapter.shared else {}
    adapter.shared_pool_shapes = {k: resolve_shape(s, adapter.bucket) for k, s in spec.items()}


def shared_tensors(
    atype: AdapterType, model: nn.Module, config: AdapterConfig, sizes: dict[str, int]
) -> tuple[dict[str, torch.Tensor], int]:
    """The type's shared tensors for this config (true sizes, float32, CPU, frozen) and their seed."""
    spec = atype.shared_tensors(model, config)
    if not spec:
        return {}, 0
    seed = int(atype.shared_seed(config))
    shapes = {k: resolve_shape(s, sizes, f"adapter type {atype.name!r}, shared tensor {k!r}") for k, s in spec.items()}
    key = (atype.name, seed, tuple(shapes.items()))
    if key not in _SHARED:
        generator = torch.Generator().manual_seed(seed)
        made = {}
        with torch.inference_mode(False), torch.no_grad():
            for name, shape in shapes.items():
                t = torch.empty(shape, dtype=torch.float32)
                atype.init_shared(name, t, config, generator)
                made[name] = t
        _SHARED[key] = made
    return _SHARED[key], seed


def check_sizes(
    atype: AdapterType,
    config: AdapterConfig,
    limits: dict[str, int],
    default_limit: int,
    model: nn.Module | None = None,
) -> dict[str, int]:
    sizes = call_sizes(atype, config, model)
    if not isinstance(sizes, dict):
        raise PluginError(f"adapter type {atype.name!r}: sizes() must return a dict {{name: int}}, got {sizes!r}")
    for key, value in sizes.items():
        if not isinstance(value, int) or value < 1:
            raise InvalidConfigError(f"{atype.name} size {key}={value!r} must be a positive integer")
        limit = limits.get(key, default_limit)
        if value > limit:
            raise PoolLimitError(
                f"{atype.name} adapter has {key}={value}, over this zoo's pool limit of {limit} for {key!r}; "
                f"use a smaller {key}, or create the zoo with pool_limits={{{key!r}: {bucket(value)}}}"
            )
    return sizes


def new_adapter(
    name: str, atype: AdapterType, config: AdapterConfig, model: nn.Module, sizes: dict[str, int], seed: int
) -> Adapter:
    """A freshly initialised adapter (true shapes, float32, CPU)."""
    generator = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    with torch.inference_mode(False), torch.no_grad():  # trainable later, even if made in inference mode
        for site, shapes in expected_shapes(atype, model, config, sizes).items():
            tensors[site] = {}
            for key, shape in shapes.items():
                t = torch.empty(shape, dtype=torch.float32)
                atype.init(key, t, config, generator, modules[site])
                tensors[site][key] = t
        atype.init_from_base(model, config, tensors, generator)  # optional second pass (AdapterType)
    adapter = Adapter(name, atype, config, tensors, sizes)
    attach_shared(adapter, model)
    adapter.bucket_shapes(model)  # known from now on: the pool key is made of them
    return adapter


def adapter_from_state(
    name: str,
    atype: AdapterType,
    config: AdapterConfig,
    model: nn.Module,
    sizes: dict[str, int],
    state: dict[str, torch.Tensor],
    what: str,
) -> Adapter:
    """An adapter from flat `{site}.{tensor}` tensors, checking every name and shape first."""
    expected = expected_shapes(atype, model, config, sizes)
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    missing, wrong = [], []
    for site, shapes in expected.items():
        tensors[site] = {}
        for key, shape in shapes.items():
            flat = f"{site}.{key}"
            t = state.get(flat)
            if t is None:
                missing.append(flat)
            elif tuple(t.shape) != shape:
                wrong.append(f"{flat}: {tuple(t.shape)} (expected {shape})")
            else:
                with torch.inference_mode(False):
                    tensors[site][key] = t.detach().to(torch.float32).clone()
    wanted = {f"{s}.{k}" for s, ks in expected.items() for k in ks}
    extra = sorted(set(state) - wanted)
    if missing or wrong or extra:
        parts = []
        if wrong:
            parts.append("wrong shape: " + "; ".join(wrong[:5]) + (" ..." if len(wrong) > 5 else ""))
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if extra:
            parts.append(f"{len(extra)} unexpected (e.g. {extra[0]})")
        raise ShapeMismatchError(
            f"{what} does not fit a {atype.name} adapter with this config on this base: {', '.join(parts)}. "
            "Check that the config matches the weights and that it was made for this base."
        )
    adapter = Adapter(name, atype, config, tensors, sizes)
    attach_shared(adapter, model)
    adapter.bucket_shapes(model)
    return adapter
