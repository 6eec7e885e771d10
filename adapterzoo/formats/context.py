"""What a format may know about the zoo it reads for or writes from: the base and its limits.

A format is handed this, never the `Zoo`: it needs the base (to size and check tensors, to
name the model in a foreign config), the base's fingerprint (to refuse an adapter made for
another base), the pool limits (to refuse one too big to serve) and the way to get an adapter
type by name. Nothing else of the zoo (its adapters, pools, lock) is a format's business, and
`adapterzoo.formats` imports nothing from `adapterzoo.zoo`, so the two cannot form a cycle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from torch import nn

if TYPE_CHECKING:  # pragma: no cover
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
