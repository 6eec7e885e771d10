"""adapterzoo's own folder layout: every type, every config field, a classification head, the base.

    adapterzoo_config.json        type, config, base fingerprint, metadata, the head's config (if
                                  any), and the sha256 and size of the weights file (so a truncated
                                  or mismatched pair is caught)
    adapterzoo_model.safetensors  `{site}.{tensor}` -> tensor (and `head.*`), true shapes, float32

Each file is written to a temporary name in the same folder and then renamed over the old one,
weights first and config last, so a crash never leaves a half-written file; a crash between the
two renames leaves a pair whose checksum disagrees, which loading reports.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from ..adapter import Adapter, adapter_from_state, check_sizes
from ..base import check_fingerprint
from ..errors import AdapterFileError
from ..heads import pop_head
from ..sites import hidden_size
from ..storage import atomic_write, parse_safetensors, read_json, refuse_pickles, tensors_to_bytes
from .context import FormatContext

NAME = "native"
CONFIG_FILE = "adapterzoo_config.json"
WEIGHTS_FILE = "adapterzoo_model.safetensors"
FILES = (CONFIG_FILE, WEIGHTS_FILE)  # every file this format writes; a push sends these
DESCRIPTION = f"{CONFIG_FILE} + {WEIGHTS_FILE}"  # how an error names the layout it looked for
CARD_TAGS: tuple[str, ...] = ()  # model card tags beyond adapterzoo's own (the type, the base)
FORMAT_VERSION = 1


def detect(folder: Path) -> bool:
    return (folder / CONFIG_FILE).exists()


def read(ctx: FormatContext, name: str, folder: Path, *, ignore_base_mismatch: bool = False) -> Adapter:
    """The adapter saved in `folder`, sized and checked for `ctx`'s base; nothing is changed."""
    what = f"adapter at {folder}"
    record, state = read_files(folder)
    atype = ctx.adapter_type(record["adapter_type"])
    config = atype.Config.from_dict(record["config"])
    check_fingerprint(ctx.fingerprint, record.get("base"), what, force=ignore_base_mismatch)
    sizes = check_sizes(atype, config, ctx.pool_limits, ctx.max_size, ctx.model)
    head = pop_head(record, state, hidden_size(ctx.model), what)
    adapter = adapter_from_state(name, atype, config, ctx.model, sizes, state, what)
    adapter.metadata = dict(record.get("metadata", {}))
    adapter.head = head
    return adapter


def write(ctx: FormatContext, adapter: Adapter, folder: Path, *, metadata: dict | None = None) -> Path:
    """Save `adapter` (and its head) to `folder`; `metadata` joins the adapter's own."""
    record = {
        "adapter_type": adapter.type_name,
        "config": adapter.config.to_dict(),
        "base": ctx.fingerprint.to_dict(),
        "metadata": {**adapter.metadata, **(metadata or {})},
        "name": adapter.name,
    }
    state = adapter.state_dict()
    if adapter.head is not None:
        record["head"] = adapter.head.config.to_dict()
        state.update(adapter.head.state_dict())
    write_files(folder, record, state)
    return folder


def card_facts(folder: Path) -> dict[str, Any]:
    """What a model card says about the adapter in `folder`: type, config, base, metrics. Reading
    checks the weights against the config's checksum, so a broken folder is never published."""
    record, _ = read_files(folder)
    base = record.get("base") or {}
    return {
        "format": NAME,
        "type": record["adapter_type"],
        "config": record["config"],
        "base_fingerprint": base.get("id"),
        "metrics": (record.get("metadata") or {}).get("metrics") or {},
    }


def write_files(folder: Path, record: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
    """Write weights then config; `record` is the JSON config without the weights checksum."""
    folder.mkdir(parents=True, exist_ok=True)
    data = tensors_to_bytes(state, metadata={"format": "adapterzoo", "adapter_type": record["adapter_type"]})
    record = dict(
        record,
        format_version=FORMAT_VERSION,
        weights={"file": WEIGHTS_FILE, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)},
    )
    atomic_write(folder / WEIGHTS_FILE, data)
    atomic_write(folder / CONFIG_FILE, json.dumps(record, indent=2, sort_keys=True).encode())


def read_files(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(the config record, the tensors) of `folder`, after checking the weights' size and checksum."""
    record = read_json(folder / CONFIG_FILE)
    for key in ("adapter_type", "config"):
        if key not in record:
            raise AdapterFileError(f"{folder / CONFIG_FILE} has no {key!r}: it is not an adapterzoo adapter config")
    weights = folder / WEIGHTS_FILE
    if not weights.exists():
        refuse_pickles(folder)
        raise AdapterFileError(f"{folder} has {CONFIG_FILE} but no {WEIGHTS_FILE}; save or download it again")
    expected = record.get("weights", {})
    data = weights.read_bytes()
    if expected.get("bytes") not in (None, len(data)):
        raise AdapterFileError(
            f"{weights} has {len(data)} bytes but its config says {expected['bytes']}: the file is truncated "
            "or belongs to another save; save or download it again"
        )
    if expected.get("sha256") not in (None, hashlib.sha256(data).hexdigest()):
        raise AdapterFileError(
            f"{weights} does not match the checksum in its config: it is corrupt; save or download it again"
        )
    return record, parse_safetensors(data, weights)
