"""What a format is given (`FormatContext`: the base and its limits) and what it provides (`Format`).

A format is handed this, never the `Zoo`: it needs the base (to size and check tensors, to
name the model in a foreign config), the base's fingerprint (to refuse an adapter made for
another base), the pool limits (to refuse one too big to serve) and the way to get an adapter
type by name. Nothing else of the zoo (its adapters, pools, lock) is a format's business, and
`adapterzoo.formats` imports nothing from `adapterzoo.zoo`, so the two cannot form a cycle.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from ..adapter import Adapter
    from ..base import Fingerprint
    from ..types import AdapterType


@dataclass(frozen=True)
class FormatContext:
    """The base an adapter is read for (or written from), and the zoo's limits on adapters."""

    model: nn.Module  # the frozen base
    fingerprint: Fingerprint
    adapter_type: Callable[[str], AdapterType]  # a type's name -> the (shared) type object
    is_causal_lm: bool = True
    pool_limits: dict[str, int] = field(default_factory=dict)  # as Zoo(pool_limits=...)
    max_size: int = 256  # as Zoo(max_size=...)


class Format(Protocol):
    """The shape every format module has (formats/native.py, peft.py, adapterhub.py)."""

    NAME: str  # what save_adapter(..., format=...) takes
    CONFIG_FILE: str
    WEIGHTS_FILE: str
    FILES: tuple[str, ...]  # every file of the format: a push sends those present, and replaces the others'
    DESCRIPTION: str  # its files in words, for errors
    CARD_TAGS: tuple[str, ...]  # model card tags it adds to adapterzoo's own

    def detect(self, folder: Path) -> bool: ...

    def read(self, ctx: FormatContext, name: str, folder: Path, *, ignore_base_mismatch: bool = False) -> Adapter: ...

    def write(self, ctx: FormatContext, adapter: Adapter, folder: Path, *, metadata: dict | None = None) -> Path: ...

    def card_facts(self, folder: Path) -> dict[str, Any]: ...
