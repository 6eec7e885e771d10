"""Adapter file formats: adapterzoo's own (native), PEFT's and AdapterHub's (the `adapters` library's).

Each format is one module of the same shape (as PEFT's `tuners/<method>/`):

    NAME                     "native", "peft", "adapterhub": what `save_adapter(..., format=...)` takes
    CONFIG_FILE, WEIGHTS_FILE, FILES   the files it writes or reads (a push sends these)
    DESCRIPTION              its files in words, for errors
    CARD_TAGS                model card tags it adds (PEFT: "peft")
    detect(folder) -> bool   whether `folder` holds this format (from its files alone)
    read(ctx, name, folder, *, ignore_base_mismatch=False) -> Adapter
    write(ctx, adapter, folder, *, metadata=None) -> Path
    card_facts(folder) -> dict   type, config, base fingerprint and metrics, for a model card

`Format` (formats/context.py) spells that shape out as a Protocol. `ctx` is a `FormatContext`
(the base, its fingerprint and limits, and the adapter types), which `Zoo` builds; a format never
sees the zoo itself. `Zoo.load_adapter` asks `detect_format` which format a folder holds and
calls its `read`; `Zoo.save_adapter(..., format=...)` calls the `write` of `format_named(format)`;
adapterzoo/hub.py takes file lists and card facts from here.

What one adapter type's tensors and config are called in a foreign format is the type's own
business, in optional methods on its class:

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

from ..errors import AdapterFileError, UnsupportedFormatError
from ..storage import refuse_pickles
from . import adapterhub, native, peft
from .context import Format, FormatContext

# name -> format module; detection asks them in this order (native's own config file first)
FORMATS: dict[str, Format] = {f.NAME: f for f in (native, peft, adapterhub)}
# the files of every format: what a push replaces, so a repo never mixes two formats
ALL_FILES = frozenset(name for fmt in FORMATS.values() for name in fmt.FILES)

__all__ = ["ALL_FILES", "FORMATS", "Format", "FormatContext", "detect_format", "format_named", "looks_like_adapter"]


def format_named(name: str) -> Format:
    """The format called `name`, or an `UnsupportedFormatError` listing the known ones."""
    try:
        return FORMATS[name]
    except (KeyError, TypeError):
        raise UnsupportedFormatError(
            f"unknown format {name!r}; adapterzoo reads and writes {', '.join(map(repr, FORMATS))} "
            "(e.g. save_adapter(name, path, format='peft'))"
        ) from None


def detect_format(folder: Path) -> Format:
    """The format of the adapter saved in `folder`, from its files; an `AdapterFileError` that names
    every known format's files when none matches (and refuses a folder of pickle weights)."""
    folder = Path(folder)
    for fmt in FORMATS.values():
        if fmt.detect(folder):
            return fmt
    refuse_pickles(folder)
    if not folder.exists():
        raise AdapterFileError(f"{folder} does not exist (and is not a Hub repo id this zoo could pull)")
    known = "; ".join(f"{fmt.NAME}: {fmt.DESCRIPTION}" for fmt in FORMATS.values())
    raise AdapterFileError(f"{folder} holds no adapter adapterzoo can read; it looks for one of these layouts: {known}")


def looks_like_adapter(folder: Path) -> bool:
    """Whether `folder` holds some format's config file: a cheap test (nothing is read) for telling
    adapter folders from other folders; loading then says what is wrong with a broken one."""
    folder = Path(folder)
    return folder.is_dir() and any((folder / fmt.CONFIG_FILE).exists() for fmt in FORMATS.values())
