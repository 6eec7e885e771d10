"""What an adapter type is: a validated `Config` dataclass and an `AdapterType` class.

The core never names a type. It asks each type four questions and does the rest (hooks into the
base, slot pools, batch plans, saving, training, serving):

1. `sites(model, config)`: where does an adapter of this type attach? (module paths)
2. `tensors(model, site, module, config)`: which per-adapter tensors live at one site, and of what
   shape? A dimension may be the *name* of a size from `sizes(config)` (e.g. LoRA's `"r"`): pools
   are shared by adapters whose sizes round up to the same bucket, and smaller adapters are padded
   with zeros, which every type's math must treat as "nothing" (exact, not approximate).
3. `init(name, tensor, config, generator, module)`: fill a fresh tensor, near identity, so that a
   new adapter leaves the base's output unchanged where the method allows it.
4. How it changes the computation, by `kind`:
   - "delta": `delta(x, y, w, training)` returns what to add to a module's output `y`, given its
     input `x` and the adapter tensors `w` gathered per row (leading dim n, or 1 = same for all).
   - "prompt": `virtual_tokens(w)` returns embeddings (n, P, d) put before the input embeddings.
   - "prefix": `prefix(w)` returns keys and values (n, kv_heads, P, head_dim) put before an
     attention layer's keys and values.
   Prompt and prefix types also say `length(config)`, the number of virtual tokens.

Optional: `merge(module, tensors, config)` folds an adapter into a module's weights (in place) for
single-adapter deployment; the foreign-format mappings (`PeftMapping`, `AdapterHubMapping`, below)
map to and from PEFT's and AdapterHub's file formats (adapterzoo.formats and docs/formats.md; a
type without them gets a clear error for those formats); `derive(site, module, tensors, config)`
turns an adapter's stored tensors into what its math reads, once per slot placement (every step
while training); `sizes(config, model)` may read the base; `conformance_configs()` lists the
configs the conformance suite runs. What `delta` and friends receive is a `SlotWeights`
(adapterzoo.plan): the gathered tensors by name, plus `.variant`, `.site`, `.module` (the base
module, for base-aware math such as DoRA's), `.slots` and `.lengths` (each row's true virtual length).

What differs between the three kinds (which hook computes, where it attaches, whether a fresh
adapter is the identity) is spelt out once, in `KINDS`, and read through `AdapterType.facts`, so
the core never compares kind strings.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, runtime_checkable

import torch
from torch import nn

from .errors import InvalidConfigError

if TYPE_CHECKING:  # pragma: no cover
    from .plan import SlotWeights

Shape = tuple[int | str, ...]
Kind = Literal["delta", "prompt", "prefix"]


@dataclass(frozen=True)
class KindFacts:
    """What one kind of adapter type means to the core, in one place.

    `method`: the hook that computes the adapter's effect (a type of this kind must define it).
    `attaches`: where its sites are: "module" (a forward hook adds a delta to the module's output),
    "embeddings" (virtual tokens before the input), "attention" (keys/values before each layer's).
    `virtual_tokens`: whether it adds virtual tokens (then the type gives `length(config)`).
    `identity_when_new`: whether a fresh adapter must leave the base's outputs unchanged.
    """

    kind: str
    method: str
    attaches: str
    virtual_tokens: bool
    identity_when_new: bool


KINDS: dict[str, KindFacts] = {
    "delta": KindFacts("delta", "delta", "module", virtual_tokens=False, identity_when_new=True),
    "prompt": KindFacts("prompt", "virtual_tokens", "embeddings", virtual_tokens=True, identity_when_new=False),
    "prefix": KindFacts("prefix", "prefix", "attention", virtual_tokens=True, identity_when_new=False),
}


@runtime_checkable
class PeftMapping(Protocol):
    """A type that reads and writes PEFT folders (adapterzoo.formats.peft) declares:

    `peft_types`: the PEFT `peft_type`s it reads ("LORA", "LOHA", ...).
    `peft_when` (optional): config fields that must hold for the claim, e.g. DoRA's
    `{"use_dora": True}`. Among the types claiming a `peft_type`, one whose `peft_when` matches the
    folder's config wins; a type with a `peft_when` that does not match does not claim it.
    `from_peft(model, peft_config, state)` -> (our config dict, our flat `{site}.{tensor}` state).
    `to_peft(model, config, state)` -> (PEFT config dict, PEFT state without `base_model.model.`).
    """

    peft_types: tuple[str, ...]

    def from_peft(
        self, model: nn.Module, peft_config: dict[str, Any], state: dict[str, torch.Tensor]
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]: ...

    def to_peft(
        self, model: nn.Module, config: AdapterConfig, state: dict[str, torch.Tensor]
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]: ...


@runtime_checkable
class AdapterHubMapping(Protocol):
    """A type that reads and writes AdapterHub (`adapters` library) folders declares:

    `adapterhub_architectures`: the AdapterHub `architecture`s it reads ("bottleneck", ...).
    `from_adapterhub(model, config, state)` -> (our config dict, our flat state).
    `to_adapterhub(model, config, state, name)` -> (AdapterHub config dict, its state); `name` is the
    adapter's name, which AdapterHub writes into every key.
    """

    adapterhub_architectures: tuple[str, ...]

    def from_adapterhub(
        self, model: nn.Module, config: dict[str, Any], state: dict[str, torch.Tensor]
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]: ...

    def to_adapterhub(
        self, model: nn.Module, config: AdapterConfig, state: dict[str, torch.Tensor], name: str
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]: ...


@dataclass
class AdapterConfig:
    """Base of every type's config. Subclasses are dataclasses and check values in `validate`.

    `from_dict` refuses unknown keys instead of ignoring them: a typo such as `rank=8` for `r=8`
    must not silently train an adapter with the default.
    """

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise `InvalidConfigError` for values out of range; subclasses override."""

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> AdapterConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InvalidConfigError(
                f"unknown config key(s) {', '.join(map(repr, unknown))} for {cls.__qualname__}; "
                f"valid keys: {', '.join(sorted(known))}"
            )
        try:
            return cls(**values)
        except TypeError as exc:  # e.g. a value of the wrong type reaching a comparison
            raise InvalidConfigError(f"invalid config for {cls.__qualname__}: {exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def require(condition: bool, message: str) -> None:
    """Config validation helper: raise `InvalidConfigError(message)` unless `condition`."""
    if not condition:
        raise InvalidConfigError(message)


class AdapterType:
    """Base class of adapter types. See the module docstring for the contract."""

    name: ClassVar[str]
    Config: ClassVar[type[AdapterConfig]]
    kind: ClassVar[Kind] = "delta"
    default_lr: ClassVar[float] = 1e-3  # AdamW learning rate `zoo.train` uses unless told otherwise

    @property
    def facts(self) -> KindFacts:
        """This type's kind, spelt out (`KINDS`); the core reads these instead of comparing strings."""
        return KINDS[self.kind]

    @classmethod
    def conformance_configs(cls) -> list[dict[str, Any]]:
        """The configs the conformance suite runs this type with (adapterzoo.testing.conformance).
        Default: the default config only. List one per code path (variants, options) worth checking."""
        return [{}]

    # 1. where
    def sites(self, model: nn.Module, config: AdapterConfig) -> list[str]:
        raise NotImplementedError

    # 2. what
    def tensors(self, model: nn.Module, site: str, module: nn.Module, config: AdapterConfig) -> dict[str, Shape]:
        raise NotImplementedError

    def sizes(self, config: AdapterConfig, model: nn.Module | None = None) -> dict[str, int]:
        """Named sizes used in `tensors` shapes (e.g. {"r": 8}); pools bucket them. A type may
        declare it as `sizes(self, config)` or `sizes(self, config, model)` (to default a size to
        the base's width, say); the core passes the base when the method takes it."""
        return {}

    def variant(self, config: AdapterConfig) -> str:
        """Config choices that change the math itself (e.g. an activation function) rather than
        per-adapter numbers. Adapters of different variants get different pools, and `delta` etc.
        find the pool's variant in `w.variant` (`w["variant"]` also works, for older types)."""
        return ""

    def constants(self, config: AdapterConfig) -> dict[str, float]:
        """Per-adapter scalars the math needs (e.g. LoRA's alpha/r); stored per slot, never trained."""
        return {}

    def init(
        self, name: str, tensor: torch.Tensor, config: AdapterConfig, generator: torch.Generator, module: nn.Module
    ) -> None:
        """Fill `tensor` (true shape, float32, on the CPU) in place; `module` is the site. Default: zeros."""
        tensor.zero_()

    def init_from_base(
        self,
        model: nn.Module,
        config: AdapterConfig,
        tensors: dict[str, dict[str, torch.Tensor]],
        generator: torch.Generator,
    ) -> None:
        """Optional second init pass, with the whole base at hand, after `init` filled every tensor
        (`tensors`: site -> name -> tensor, true shapes, float32, CPU). Default: nothing. Prefix
        tuning uses it to start from the keys and values of real tokens."""

    # 3. how (`w` is an adapterzoo.plan.SlotWeights: tensors by name, leading dim n rows or 1)
    def delta(self, x: torch.Tensor, y: torch.Tensor, w: SlotWeights, training: bool) -> torch.Tensor:
        raise NotImplementedError

    def virtual_tokens(self, w: SlotWeights) -> torch.Tensor:
        raise NotImplementedError

    def prefix(self, w: SlotWeights) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    # optional: derived weights
    def derive(
        self, site: str, module: nn.Module, tensors: dict[str, torch.Tensor], config: AdapterConfig
    ) -> dict[str, torch.Tensor]:
        """What the math reads, computed from one adapter's tensors at one site (pool shapes, no
        slot dim, on the device, float32), e.g. LoHa's dense (in, out) update or DoRA's per-column
        rescale, which reads the base `module`. Called once when the adapter is placed in a slot
        (or edited), and stored in the pool beside its tensors under the returned names; while
        training it runs at every step, differentiably. Default: nothing derived."""
        return {}

    @property
    def derives(self) -> bool:
        return type(self).derive is not AdapterType.derive

    # optional: type-wide tensors
    def shared_tensors(self, model: nn.Module, config: AdapterConfig) -> dict[str, Shape]:
        """Frozen tensors shared by every adapter of this type with the same `shared_seed(config)`
        and shapes (e.g. VeRA's random projections): {name: shape}, shapes as in `tensors()`.
        They are made once per (type, seed, shapes) by `init_shared`, never trained, never saved
        with an adapter (its config's seed remakes them), and reach the math as `w.shared[name]`
        (one tensor for all rows, padded to the pool's sizes). Default: none."""
        return {}

    def shared_seed(self, config: AdapterConfig) -> int:
        """The seed `init_shared`'s generator starts from (e.g. VeRA's projection_prng_key)."""
        return 0

    def init_shared(self, name: str, tensor: torch.Tensor, config: AdapterConfig, generator: torch.Generator) -> None:
        """Fill a shared tensor (true sizes, float32, CPU) in place; called in `shared_tensors()`
        order with one generator seeded by `shared_seed(config)`. Default: zeros."""
        tensor.zero_()

    def length(self, config: AdapterConfig) -> int:
        """Number of virtual tokens (prompt and prefix kinds)."""
        raise NotImplementedError

    # optional
    def merge(
        self, module: nn.Module, tensors: dict[str, torch.Tensor], config: AdapterConfig, sign: float = 1.0
    ) -> None:
        """Fold the adapter into `module`'s weights in place (sign=-1 undoes it)."""
        raise NotImplementedError(f"adapter type {self.name!r} cannot be merged into the base")

    @property
    def mergeable(self) -> bool:
        return type(self).merge is not AdapterType.merge


def call_sizes(atype: AdapterType, config: AdapterConfig, model: nn.Module | None) -> dict[str, int]:
    """`atype.sizes(config)` or `atype.sizes(config, model)`, whichever the type declares."""
    params = inspect.signature(atype.sizes).parameters
    if len(params) >= 2 and model is not None:
        return atype.sizes(config, model)
    return atype.sizes(config)
