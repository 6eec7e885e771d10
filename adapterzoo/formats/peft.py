"""PEFT's folder layout (`PeftModel.save_pretrained` / `from_pretrained`, checked against PEFT 0.21).

    adapter_config.json          PEFT's config: `peft_type` ("LORA", "PREFIX_TUNING", ...) and its fields
    adapter_model.safetensors    tensors; LoRA keys start with `base_model.model.` followed by the
                                 module path, prompt-learning methods save one `prompt_embeddings`

The generic part lives here: the files, the key prefix, the base fingerprint, which adapter type
claims a `peft_type`, and errors. What each type's tensors and config fields are called is in the
type's `from_peft` / `to_peft` (see plugins/adapterzoo_lora/peft.py). PEFT stores no base
fingerprint; adapterzoo adds one to the safetensors metadata of the files it writes (PEFT ignores
it), so an adapterzoo-written PEFT folder still refuses the wrong base when loaded back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .. import plugins
from ..adapter import Adapter
from ..errors import UnsupportedFormatError
from ..storage import read_json
from . import _common
from .context import FormatContext

NAME = "peft"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
FILES = (CONFIG_FILE, WEIGHTS_FILE)  # every file this format writes; a push sends these
DESCRIPTION = f"{CONFIG_FILE} (with peft_type) + {WEIGHTS_FILE}"  # how an error names the layout
CARD_TAGS = ("peft",)  # model card tags beyond adapterzoo's own: the Hub lists the repo as a PEFT adapter
KEY_PREFIX = "base_model.model."
# PEFT's prompt-learning methods save their tensors without the module-path prefix
PROMPT_LEARNING = {"PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "MULTITASK_PROMPT_TUNING", "CPT", "CARTRIDGE"}
# Fields every PEFT config has that change nothing in the math
COMMON_FIELDS = {
    "peft_type",
    "task_type",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "peft_version",
    "auto_mapping",
}
COMMON_HINTS = {
    "modules_to_save": "PEFT saves full trained copies of these modules, which would replace layers of the base "
    "that every other adapter shares. Merge the adapter into the base with PEFT "
    "(model.merge_and_unload()) and load the result as a new base, or retrain without modules_to_save.",
}


def detect(folder: Path) -> bool:
    config = folder / CONFIG_FILE
    return config.exists() and "peft_type" in read_json(config)


def type_for(ctx: FormatContext, peft_type: Any, what: str, peft_config: dict[str, Any] | None = None):
    """The type that reads this PEFT folder. Several may claim one `peft_type` (DoRA is a LORA with
    `use_dora=True`): a type's optional `peft_when` ({field: value}, adapterzoo.types.PeftMapping)
    narrows its claim to folders whose config has those values, and wins over types without one."""
    names = _common.types_claiming("peft_types", peft_type) if isinstance(peft_type, str) else []
    if peft_config is not None and len(names) > 1:
        types = plugins.adapter_types()
        when = {n: getattr(types[n].cls, "peft_when", None) or {} for n in names}
        matching = [n for n in names if all(peft_config.get(k) == v for k, v in when[n].items())]
        names = [n for n in matching if when[n]] or matching
    if not names:
        readable = ", ".join(_common.claimed("peft_types")) or "none"
        raise UnsupportedFormatError(
            f"{what} is a PEFT {peft_type} adapter, which adapterzoo cannot load: the installed adapter types "
            f"read PEFT {readable}. Install a plugin whose type maps {peft_type} (see docs/formats.md), or "
            "merge the adapter into the base with PEFT (merge_and_unload) and load that as the base."
        )
    return ctx.adapter_type(names[0])


def read(ctx: FormatContext, name: str, folder: Path, *, ignore_base_mismatch: bool = False) -> Adapter:
    """An `Adapter` for `ctx`'s base from a PEFT folder, by the type that claims its `peft_type`."""
    what = f"PEFT adapter at {folder}"
    peft_config = read_json(folder / CONFIG_FILE)
    atype = type_for(ctx, peft_config.get("peft_type"), what, peft_config)
    state, metadata = _common.read_weights(folder / WEIGHTS_FILE, folder)
    _common.check_base(ctx, metadata, what, force=ignore_base_mismatch)
    state = {k[len(KEY_PREFIX) :] if k.startswith(KEY_PREFIX) else k: v for k, v in state.items()}
    return _common.converted_adapter(
        ctx,
        name,
        atype,
        lambda: atype.from_peft(ctx.model, dict(peft_config), state),
        folder=folder,
        what=what,
        metadata=metadata,
        source_format=NAME,
    )


def write(ctx: FormatContext, adapter: Adapter, folder: Path, *, metadata: dict | None = None) -> Path:
    """Write `adapter` in PEFT's layout (`metadata` joins the adapter's own, in the weights' metadata)."""
    _common.refuse_head(adapter, NAME)
    atype = adapter.atype
    if getattr(atype, "to_peft", None) is None:
        raise UnsupportedFormatError(
            f"adapter {adapter.name!r} is of type {atype.name!r}, which has no PEFT mapping (its class defines no "
            "to_peft); save it with format='native', or give the type to_peft/from_peft (see docs/formats.md)"
        )
    peft_config, state = atype.to_peft(ctx.model, adapter.config, adapter.state_dict())
    peft_config = {
        "base_model_name_or_path": base_model_name(ctx),
        "task_type": "CAUSAL_LM" if ctx.is_causal_lm else "FEATURE_EXTRACTION",
        "inference_mode": True,
        "revision": None,
        **peft_config,
    }
    if peft_config["peft_type"] not in PROMPT_LEARNING:
        state = {KEY_PREFIX + k: v for k, v in state.items()}
    _common.write_pair(
        folder, CONFIG_FILE, peft_config, WEIGHTS_FILE, state, _common.adapterzoo_metadata(ctx, adapter, metadata)
    )
    return folder


def card_facts(folder: Path) -> dict[str, Any]:
    """What a model card says about the PEFT adapter in `folder`: type, config, base, metrics."""
    config = read_json(folder / CONFIG_FILE)
    claimants = _common.types_claiming("peft_types", config.get("peft_type"))
    return _common.foreign_card_facts(NAME, config, folder / WEIGHTS_FILE, claimants)


def base_model_name(ctx: FormatContext) -> str:
    """What `base_model_name_or_path` honestly is: the base's Hub id when it came from the Hub, else a
    sentence saying there is none and how to load the adapter.

    PEFT's `AutoPeftModelForCausalLM` loads the base from this field. `null` (a base built in memory)
    made it report a misleading connection error, and a local folder's path works on this machine
    only (and would leak the path into a pushed repo). The sentence is not a valid repo id, so
    transformers refuses it at once, quoting it, and never goes to the network.
    """
    name = str(getattr(ctx.model.config, "_name_or_path", None) or "")
    if name and not Path(name).expanduser().exists():
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(name)
            return name
        except HFValidationError:
            pass
    return (
        f"(no Hub id: adapterzoo saved this adapter from a {type(ctx.model).__name__} base built in memory or "
        f"read from a local folder, fingerprint {ctx.fingerprint.id}; load that base yourself and use "
        "PeftModel.from_pretrained(base, this_folder))"
    )


def check_fields(peft_config: dict[str, Any], what: str, known: set[str], hints: dict[str, str]) -> None:
    """For a type's `from_peft`: refuse every field that is switched on and not in `known`."""
    _common.check_fields(
        peft_config,
        what=what,
        known=known | COMMON_FIELDS,
        hints={**COMMON_HINTS, **hints},
        way_out="Retrain without it, or merge the adapter into the base with PEFT (merge_and_unload) "
        "and load that as the base.",
    )


def single_submodule(peft_config: dict[str, Any], what: str) -> None:
    n = peft_config.get("num_transformer_submodules") or 1
    if n != 1:
        raise UnsupportedFormatError(
            f"{what}: num_transformer_submodules={n} (an encoder-decoder base); adapterzoo's bases are decoder-only "
            "or encoder-only, so this adapter cannot be loaded"
        )


def prompt_embeddings(
    peft_config: dict[str, Any], state: dict[str, torch.Tensor], what: str, known: set[str]
) -> tuple[torch.Tensor, int]:
    """The one tensor PEFT's prompt-learning methods save (`prompt_embeddings`, (P, ...)) and P,
    after checking the config fields: what prefix tuning and prompt tuning read alike."""
    check_fields(peft_config, what, known, {})
    single_submodule(peft_config, what)
    if set(state) != {"prompt_embeddings"}:
        raise UnsupportedFormatError(f"{what}: expected one tensor 'prompt_embeddings', found {sorted(state)}")
    emb = state["prompt_embeddings"]
    return emb, int(peft_config.get("num_virtual_tokens") or emb.shape[0])
