"""Foreign adapter formats: PEFT's and AdapterHub's (the `adapters` library's) folder layouts.

`Zoo.load_adapter` detects the format of a folder (`adapterzoo.storage.detect_format`) and calls
`read_foreign` for anything that is not adapterzoo's native layout; `Zoo.save_adapter(...,
format=...)` calls `write_foreign`. This package holds the generic part (config files, key
prefixes, the base fingerprint, errors); what one adapter type's tensors and config are called
in a foreign format is the type's own business, in optional methods on its class:

    class Lora(AdapterType):
        peft_types = ("LORA",)                                 # PEFT `peft_type`s it reads
        def from_peft(self, model, peft_config, state): ...   # -> (our config dict, flat state)
        def to_peft(self, model, config, state): ...          # -> (PEFT config dict, PEFT state)

        adapterhub_architectures = ("bottleneck",)            # AdapterHub `architecture`s it reads
        def from_adapterhub(self, model, config, state): ...
        def to_adapterhub(self, model, config, state, name): ...  # name: the adapter's, in every key

See docs/formats.md for the exact contract and plugins/adapterzoo_lora/peft.py for an example.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UnsupportedFormatError

if TYPE_CHECKING:  # pragma: no cover
    from ..adapter import Adapter
    from ..zoo import Zoo

FORMATS = ("native", "peft", "adapterhub")


def read_foreign(zoo: "Zoo", name: str, folder: Path, fmt: str, *, ignore_base_mismatch: bool = False) -> "Adapter":
    """An `Adapter` for `zoo`'s base from a PEFT or AdapterHub folder; the zoo is not changed."""
    folder = Path(folder)
    if fmt == "peft":
        from . import peft

        return peft.read(zoo, name, folder, ignore_base_mismatch=ignore_base_mismatch)
    if fmt == "adapterhub":
        from . import adapterhub

        return adapterhub.read(zoo, name, folder, ignore_base_mismatch=ignore_base_mismatch)
    raise UnsupportedFormatError(f"unknown adapter format {fmt!r}; adapterzoo reads {', '.join(FORMATS)}")


def write_foreign(zoo: "Zoo", adapter: "Adapter", folder: Path, fmt: str, *, metadata: dict | None = None) -> Path:
    """Write `adapter` to `folder` in PEFT's or AdapterHub's layout (`metadata` joins the adapter's own)."""
    folder = Path(folder)
    if fmt == "peft":
        from . import peft

        return peft.write(zoo, adapter, folder, metadata=metadata)
    if fmt == "adapterhub":
        from . import adapterhub

        return adapterhub.write(zoo, adapter, folder, metadata=metadata)
    raise UnsupportedFormatError(
        f"unknown format {fmt!r} for save_adapter; use one of {', '.join(map(repr, FORMATS))}"
    )
