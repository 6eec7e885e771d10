"""AdapterHub's folder layout (the `adapters` library's `save_adapter` / `load_adapter`, 1.3.0).

    adapter_config.json     {"config": {...the method's config...}, "hidden_size", "model_class",
                             "model_name", "model_type", "name", "version": "adapters.X"}
    adapter.safetensors     tensors named after the model's modules and the adapter's name
                            (`save_adapter(..., use_safetensors=True)`); `pytorch_adapter.bin` is a
                            pickle and is refused
    head_config.json        optional: a prediction head. `"config": null` is the base's own
    model_head.safetensors  output layer saved alongside (ignored when it equals the base's);
                            any other head is refused

`config.architecture` names the method (absent for bottleneck adapters). Which adapter type reads
which architecture, and the key mapping, is the type's business (`adapterhub_architectures`,
`from_adapterhub`, `to_adapterhub`; see plugins/adapterzoo_houlsby/adapterhub.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..adapter import Adapter
from ..errors import AdapterFileError, BaseMismatchError, UnsupportedFormatError
from ..storage import read_json, read_safetensors
from . import _common
from .context import FormatContext

NAME = "adapterhub"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter.safetensors"
PICKLE_FILE = "pytorch_adapter.bin"
HEAD_CONFIG_FILE = "head_config.json"
HEAD_WEIGHTS_FILE = "model_head.safetensors"
# every file of this format (the head files are optional, and only read); a push sends those present
FILES = (CONFIG_FILE, WEIGHTS_FILE, HEAD_CONFIG_FILE, HEAD_WEIGHTS_FILE)
DESCRIPTION = f"{CONFIG_FILE} (with config and model_class) + {WEIGHTS_FILE}"  # how an error names the layout
CARD_TAGS: tuple[str, ...] = ()  # model card tags beyond adapterzoo's own
VERSION = "adapters.1.3.0"
# the way out when a folder holds only pickles (`pytorch_adapter.bin`): adapterzoo never unpickles
PICKLE_HINT = (
    "Save the adapter again with the adapters library's model.save_adapter(path, name, use_safetensors=True), "
    "where you trust the file."
)


def detect(folder: Path) -> bool:
    config = folder / CONFIG_FILE
    if not config.exists():
        return False
    ah = read_json(config)
    return "config" in ah and "model_class" in ah or "hidden_size" in ah


def architecture(ah: dict[str, Any]) -> str:
    config = ah.get("config")
    if not isinstance(config, dict):
        raise AdapterFileError("AdapterHub adapter_config.json has no 'config' object")
    return config.get("architecture") or "bottleneck"


def check_fields(config: dict[str, Any], what: str, known: set[str], hints: dict[str, str]) -> None:
    """For a type's `from_adapterhub`: refuse every field that is switched on and not in `known`."""
    _common.check_fields(
        config, what=what, known=known, hints=hints, way_out="Retrain with the adapters library without it."
    )


def read(ctx: FormatContext, name: str, folder: Path, *, ignore_base_mismatch: bool = False) -> Adapter:
    """An `Adapter` for `ctx`'s base from an AdapterHub folder, by the type that claims its architecture."""
    what = f"AdapterHub adapter at {folder}"
    ah = read_json(folder / CONFIG_FILE)
    arch = architecture(ah)
    names = _common.types_claiming("adapterhub_architectures", arch)
    if not names:
        readable = ", ".join(_common.claimed("adapterhub_architectures")) or "none"
        raise UnsupportedFormatError(
            f"{what} is an AdapterHub {arch!r} adapter, which adapterzoo cannot load: the installed adapter types "
            f"read AdapterHub {readable} adapters. Install a plugin whose type maps {arch!r} (see docs/formats.md)."
        )
    atype = ctx.adapter_type(names[0])
    state, metadata = _common.read_weights(folder / WEIGHTS_FILE, folder, pickle_hint=PICKLE_HINT)
    _common.check_base(ctx, metadata, what, force=ignore_base_mismatch)
    family = getattr(ctx.model.config, "model_type", None)
    if not ignore_base_mismatch and ah.get("model_type") not in (None, family):
        raise BaseMismatchError(
            f"{what} was made for a {ah['model_type']} model, this base is {family}. Load it on a {ah['model_type']} "
            "base, or pass ignore_base_mismatch=True if you know the layouts agree."
        )
    _check_head(ctx, folder, what)
    return _common.converted_adapter(
        ctx,
        name,
        atype,
        lambda: atype.from_adapterhub(ctx.model, dict(ah), state),
        folder=folder,
        what=what,
        metadata=metadata,
        source_format=NAME,
    )


def _check_head(ctx: FormatContext, folder: Path, what: str) -> None:
    """The base's own output layer saved alongside is fine; a trained prediction head is not."""
    if not (folder / HEAD_CONFIG_FILE).exists():
        return
    head = read_json(folder / HEAD_CONFIG_FILE)
    if head.get("config") is not None:
        raise UnsupportedFormatError(
            f"{what} comes with a prediction head ({HEAD_CONFIG_FILE}: {head['config'].get('head_type', '?')}); "
            "adapterzoo serves the base's own outputs and cannot add a head. Load the adapter without its head "
            f"(delete {HEAD_CONFIG_FILE} and the head weights) if you only want the adapter."
        )
    weights = folder / HEAD_WEIGHTS_FILE
    if not weights.exists():
        return  # only a pickle copy of the static head, or none: nothing we would load anyway
    params = ctx.model.state_dict()  # with tied weights (GPT-2's lm_head is its input embedding)
    for key, tensor in read_safetensors(weights).items():
        mine = params.get(key)
        if (
            mine is None
            or mine.shape != tensor.shape
            or not torch.allclose(mine.detach().float().cpu(), tensor.float(), atol=1e-6)
        ):
            raise UnsupportedFormatError(
                f"{what}: its head weights ({HEAD_WEIGHTS_FILE}: {key}) differ from this base's, so the head was "
                "trained; adapterzoo cannot change the shared base's output layer"
            )


def write(ctx: FormatContext, adapter: Adapter, folder: Path, *, metadata: dict | None = None) -> Path:
    """Write `adapter` in AdapterHub's layout (`metadata` joins the adapter's own, in the weights' metadata)."""
    _common.refuse_head(adapter, NAME)
    atype = adapter.atype
    if getattr(atype, "to_adapterhub", None) is None:
        raise UnsupportedFormatError(
            f"adapter {adapter.name!r} is of type {atype.name!r}, which has no AdapterHub mapping (its class defines "
            "no to_adapterhub); save it with format='native' or 'peft'"
        )
    config, state = atype.to_adapterhub(ctx.model, adapter.config, adapter.state_dict(), adapter.name)
    ah = {
        "config": config,
        "hidden_size": ctx.model.get_input_embeddings().embedding_dim,
        "model_class": type(ctx.model).__name__,
        "model_name": getattr(ctx.model.config, "_name_or_path", None) or None,
        "model_type": getattr(ctx.model.config, "model_type", None),
        "name": adapter.name,
        "version": VERSION,
    }
    metadata = _common.adapterzoo_metadata(ctx, adapter, metadata)
    _common.write_pair(folder, CONFIG_FILE, ah, WEIGHTS_FILE, state, metadata)
    return folder


def card_facts(folder: Path) -> dict[str, Any]:
    """What a model card says about the AdapterHub adapter in `folder`: type, config, base, metrics."""
    config = read_json(folder / CONFIG_FILE)
    claimants = _common.types_claiming("adapterhub_architectures", architecture(config))
    return _common.foreign_card_facts(NAME, config, folder / WEIGHTS_FILE, claimants)
