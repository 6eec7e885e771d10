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
single-adapter deployment; `peft_types` with `from_peft` / `to_peft`, and `adapterhub_architectures`
with `from_adapterhub` / `to_adapterhub`, map to and from PEFT's and AdapterHub's file formats
(adapterzoo.formats and docs/formats.md; a type without them gets a clear error for those formats).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from .errors import InvalidConfigError

Shape = tuple[int | str, ...]
Kind = Literal["delta", "prompt", "prefix"]


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
    def from_dict(cls, values: dict[str, Any]) -> "AdapterConfig":
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

    # 1. where
    def sites(self, model: nn.Module, config: AdapterConfig) -> list[str]:
        raise NotImplementedError

    # 2. what
    def tensors(self, model: nn.Module, site: str, module: nn.Module, config: AdapterConfig) -> dict[str, Shape]:
        raise NotImplementedError

    def sizes(self, config: AdapterConfig) -> dict[str, int]:
        """Named sizes used in `tensors` shapes (e.g. {"r": 8}); pools bucket them."""
        return {}

    def variant(self, config: AdapterConfig) -> str:
        """Config choices that change the math itself (e.g. an activation function) rather than
        per-adapter numbers. Adapters of different variants get different pools, and `delta` etc.
        find the pool's variant in `w["variant"]`."""
        return ""

    def constants(self, config: AdapterConfig) -> dict[str, float]:
        """Per-adapter scalars the math needs (e.g. LoRA's alpha/r); stored per slot, never trained."""
        return {}

    def init(self, name: str, tensor: torch.Tensor, config: AdapterConfig, generator: torch.Generator, module: nn.Module) -> None:
        """Fill `tensor` (true shape, float32, on the CPU) in place; `module` is the site. Default: zeros."""
        tensor.zero_()

    def init_from_base(self, model: nn.Module, config: AdapterConfig, tensors: dict[str, dict[str, torch.Tensor]],
                       generator: torch.Generator) -> None:
        """Optional second init pass, with the whole base at hand, after `init` filled every tensor
        (`tensors`: site -> name -> tensor, true shapes, float32, CPU). Default: nothing. Prefix
        tuning uses it to start from the keys and values of real tokens."""

    # 3. how
    def delta(self, x: torch.Tensor, y: torch.Tensor, w: dict[str, torch.Tensor], training: bool) -> torch.Tensor:
        raise NotImplementedError

    def virtual_tokens(self, w: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def prefix(self, w: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def length(self, config: AdapterConfig) -> int:
        """Number of virtual tokens (prompt and prefix kinds)."""
        raise NotImplementedError

    # optional
    def merge(self, module: nn.Module, tensors: dict[str, torch.Tensor], config: AdapterConfig, sign: float = 1.0) -> None:
        """Fold the adapter into `module`'s weights in place (sign=-1 undoes it)."""
        raise NotImplementedError(f"adapter type {self.name!r} cannot be merged into the base")

    @property
    def mergeable(self) -> bool:
        return type(self).merge is not AdapterType.merge
