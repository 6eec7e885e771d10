"""What the PEFT and AdapterHub readers and writers share: weights with metadata, the fingerprint,
the search for the adapter type that claims a foreign name, and config-field checks."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from ..adapter import Adapter, adapter_from_state, check_sizes
from ..base import check_fingerprint
from ..errors import AdapterFileError, UnsupportedFormatError
from ..storage import atomic_write, read_safetensors, refuse_pickles, tensors_to_bytes
from .context import FormatContext

# safetensors `__metadata__` keys adapterzoo adds to foreign files (strings only; other tools ignore them)
META_BASE = "adapterzoo.base"
META_TYPE = "adapterzoo.type"
META_METADATA = "adapterzoo.metadata"


def read_weights(
    path: Path, folder: Path, *, pickle_hint: str | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, safetensors metadata) of `path`; a folder with only pickles gets the pickle refusal
    (with `pickle_hint`, the format's own way out, if given)."""
    if not path.exists():
        refuse_pickles(folder, wanted=path.name if pickle_hint else "safetensors", hint=pickle_hint)
        raise AdapterFileError(f"{folder} has no {path.name}; save or download the adapter again")
    state = read_safetensors(path)
    return state, safetensors_metadata(path)


def safetensors_metadata(path: Path) -> dict[str, str]:
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        try:
            header = json.loads(f.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return {}
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return dict(meta) if isinstance(meta, dict) else {}


def stored_base(metadata: dict[str, str]) -> dict[str, Any]:
    """The base fingerprint dict adapterzoo stored in a foreign file's metadata, else {}."""
    raw = metadata.get(META_BASE)
    if not raw:
        return {}
    try:
        saved = json.loads(raw)
    except json.JSONDecodeError:
        return {}
    return saved if isinstance(saved, dict) else {}


def check_base(ctx: FormatContext, metadata: dict[str, str], what: str, *, force: bool) -> None:
    """Check the base fingerprint adapterzoo stored in a foreign file (foreign tools store none)."""
    saved = stored_base(metadata)
    if {"architecture", "shapes", "weights"} <= set(saved):
        check_fingerprint(ctx.fingerprint, saved, what, force=force)


def stored_metadata(metadata: dict[str, str]) -> dict[str, Any]:
    try:
        value = json.loads(metadata.get(META_METADATA, "{}"))
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def converted_adapter(
    ctx: FormatContext,
    name: str,
    atype,
    convert: Callable[[], tuple[dict, dict]],
    *,
    folder: Path,
    what: str,
    metadata: dict[str, str],
    source_format: str,
) -> Adapter:
    """The adapter a type's converter (`from_peft`, `from_adapterhub`) makes of a foreign folder,
    sized and checked as a native one is; a converter's refusal names the folder."""
    try:
        config_values, flat = convert()
    except UnsupportedFormatError as exc:
        raise UnsupportedFormatError(f"{exc} (in {folder})") from exc
    config = atype.Config.from_dict(config_values)
    sizes = check_sizes(atype, config, ctx.pool_limits, ctx.max_size, ctx.model)
    adapter = adapter_from_state(name, atype, config, ctx.model, sizes, flat, what)
    adapter.metadata = {**stored_metadata(metadata), "source_format": source_format}
    return adapter


def write_pair(
    folder: Path,
    config_name: str,
    config: dict[str, Any],
    weights_name: str,
    state: dict[str, torch.Tensor],
    metadata: dict[str, str],
) -> None:
    """Weights first, config last, each atomically (as the native format does)."""
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / weights_name, tensors_to_bytes({k: v.float() for k, v in state.items()}, metadata=metadata))
    atomic_write(folder / config_name, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())


def refuse_head(adapter: Adapter, format_name: str) -> None:
    """Foreign formats have no place for adapterzoo's classification heads (adapterzoo/heads.py)."""
    if adapter.head is not None:
        raise UnsupportedFormatError(
            f"adapter {adapter.name!r} has a classification head, which the {format_name} format cannot hold; "
            "save it with format='native'"
        )


def adapterzoo_metadata(ctx: FormatContext, adapter: Adapter, extra: dict | None = None) -> dict[str, str]:
    return {
        "format": "pt",
        META_BASE: json.dumps(ctx.fingerprint.to_dict()),
        META_TYPE: adapter.type_name,
        META_METADATA: json.dumps({**adapter.metadata, **(extra or {})}, default=str),
    }


def foreign_card_facts(format_name: str, config: dict[str, Any], weights: Path, claimants: list[str]) -> dict[str, Any]:
    """Model card facts of a foreign folder: the type adapterzoo wrote in the weights' metadata, else
    the first installed type that claims the folder (`claimants`); the base and metrics likewise."""
    meta = safetensors_metadata(weights) if weights.exists() else {}
    base = stored_base(meta)
    return {
        "format": format_name,
        "type": meta.get(META_TYPE) or (claimants[0] if claimants else "unknown"),
        "config": config,
        "base_fingerprint": base.get("id"),
        "metrics": stored_metadata(meta).get("metrics") or {},
    }


def types_claiming(attribute: str, value: str) -> list[str]:
    """Names of the installed adapter types whose class lists `value` in `attribute`."""
    from .. import plugins

    return sorted(
        n for n, info in plugins.adapter_types().items() if value in (getattr(info.cls, attribute, None) or ())
    )


def claimed(attribute: str) -> list[str]:
    from .. import plugins

    return sorted({v for info in plugins.adapter_types().values() for v in (getattr(info.cls, attribute, None) or ())})


def is_empty(value: Any) -> bool:
    """A config value that switches nothing on: None, False, "", "none", {}, []."""
    return (
        value is None
        or value is False
        or value == "none"
        or (isinstance(value, (str, list, tuple, dict, set)) and not value)
    )


def check_fields(
    config: dict[str, Any], *, what: str, known: Iterable[str], hints: dict[str, str], way_out: str
) -> None:
    """Refuse every field outside `known` whose value switches something on.

    Foreign formats grow new options every release; an option we do not know changes the math in
    a way we cannot reproduce, so it is an error, never a silent skip.
    """
    known = set(known)
    for key in sorted(config):
        if key in known or is_empty(config[key]):
            continue
        hint = hints.get(key, f"adapterzoo cannot reproduce it exactly. {way_out}")
        raise UnsupportedFormatError(f"{what}: config field {key}={config[key]!r} is not supported: {hint}")


def transposed(t: torch.Tensor) -> torch.Tensor:
    """nn.Linear's (out, in) weights <-> adapterzoo's x @ W layout; other ranks (biases) pass through
    (a wrong rank then fails the shape check)."""
    return t.transpose(0, 1).contiguous() if t.dim() == 2 else t
