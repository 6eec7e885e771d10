"""LoRA <-> PEFT's LORA layout (PEFT 0.21).

PEFT saves, per targeted module path `p` (after the `base_model.model.` prefix, which
adapterzoo.formats.peft strips and adds):

    p.lora_A.weight   (r, in)     ours: `p.A`, transposed to (in, r)
    p.lora_B.weight   (out, r)    ours: `p.B`, transposed to (r, out)

also for GPT-2's Conv1D layers (PEFT keeps A and B in nn.Linear orientation and flips the
input itself, `fan_in_fan_out=True`). The scale is lora_alpha / r, or lora_alpha / sqrt(r) with
`use_rslora`, exactly as ours. `target_modules` (a list of names, a regex, or "all-linear") is
matched the way PEFT matches it (adapterzoo.sites.find_linear), and the weights must cover
exactly the modules it selects.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from adapterzoo.errors import UnsupportedFormatError
from adapterzoo.formats._common import transposed
from adapterzoo.formats.peft import check_fields

PEFT_TYPES = ("LORA",)

KNOWN = {
    "r", "lora_alpha", "target_modules", "use_rslora", "lora_dropout", "init_lora_weights",
    # change nothing at inference
    "fan_in_fan_out", "megatron_core", "qalora_group_size", "ensure_weight_tying", "runtime_config",
    # settings of initialisations (which init_lora_weights governs, below)
    "eva_config", "corda_config", "loftq_config", "lora_ga_config",
}
# Initialisations that leave the base alone; the others (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA) change
# the base weights and MiCA changes the forward, so their saved weights are not a LoRA on our base.
PLAIN_INITS = (True, False, "gaussian", "orthogonal", "eva")
HINTS = {
    "use_dora": "DoRA rescales each output column by a learned magnitude vector, which adapterzoo's lora "
    "type does not compute. Merge it into the base with PEFT (model.merge_and_unload()) and load the result "
    "as a new base, or retrain with use_dora=False.",
    "rank_pattern": "per-module ranks are not representable in one adapterzoo lora config; retrain with one r, "
    "or split the adapter into one PEFT adapter per rank.",
    "alpha_pattern": "per-module alphas are not representable in one adapterzoo lora config; retrain with one "
    "lora_alpha, or fold each module's alpha/r into its B matrix and save with a single lora_alpha.",
    "layers_to_transform": "restricting LoRA to some layers is not supported; give target_modules as a regex "
    r"that names those layers instead (e.g. 'model\.layers\.(0|1)\.self_attn\.(q|v)_proj').",
    "layers_pattern": "used only with layers_to_transform, which is not supported; give target_modules as a regex.",
    "exclude_modules": "give target_modules as a regex that leaves those modules out instead.",
    "bias": "PEFT trained the biases of the base (bias='all' or 'lora_only'), which would change the shared base; "
    "retrain with bias='none', or use adapterzoo's bitfit type for bias tuning.",
    "lora_bias": "a bias on LoRA's B matrix is not supported; retrain with lora_bias=False.",
    "use_qalora": "QA-LoRA pools the input before A; retrain with use_qalora=False.",
    "target_parameters": "LoRA on bare nn.Parameters (e.g. MoE experts) is not supported; target linear modules.",
    "trainable_token_indices": "it trains rows of the embedding matrix, which would change the shared base.",
    "layer_replication": "it duplicates layers of the base, which would change the shared base.",
    "alora_invocation_tokens": "activated LoRA (aLoRA) switches the adapter on per token; not supported.",
}


def from_peft(model, peft_config: dict[str, Any], state: dict[str, torch.Tensor]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    what = "PEFT LoRA adapter"
    check_fields(peft_config, what, KNOWN, HINTS)
    init = peft_config.get("init_lora_weights", True)
    if init not in PLAIN_INITS:
        raise UnsupportedFormatError(
            f"{what}: init_lora_weights={init!r} is not supported: that initialisation changes the base weights (or, "
            "for MiCA, the forward pass), so the saved A and B only work on PEFT's modified base. Convert it to a "
            "plain LoRA first (PEFT's path_initial_model_for_weight_conversion when saving), or merge it into the base."
        )
    flat: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        match = re.fullmatch(r"(.+)\.lora_(A|B)\.weight", key)
        if match is None:
            kind = "LoRA on an embedding layer" if "lora_embedding_" in key else "not a LoRA A or B weight of a linear layer"
            raise UnsupportedFormatError(f"{what}: weight {key!r} is {kind}, which adapterzoo's lora type does not support")
        flat[f"{match.group(1)}.{match.group(2)}"] = transposed(tensor)  # ours is the x @ W layout
    target = peft_config.get("target_modules")
    if isinstance(target, (set, tuple)):
        target = sorted(target)
    config = {
        "r": int(peft_config.get("r", 8)),
        "lora_alpha": peft_config.get("lora_alpha", 8),
        "target_modules": target,
        "use_rslora": bool(peft_config.get("use_rslora", False)),
        "lora_dropout": float(peft_config.get("lora_dropout") or 0.0),
        "init_lora_weights": init if init in (True, False, "gaussian") else True,
    }
    return config, flat


def to_peft(model, config, state: dict[str, torch.Tensor]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from adapterzoo.sites import Conv1D

    from .lora import targets

    modules = dict(model.named_modules())
    sites = {key.rsplit(".", 1)[0] for key in state}
    conv1d = bool(Conv1D) and any(isinstance(modules[s], Conv1D) for s in sites)
    target = targets(model, config)
    peft_config = {
        "peft_type": "LORA",
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "target_modules": target if isinstance(target, str) else list(target),
        "use_rslora": config.use_rslora,
        "lora_dropout": config.lora_dropout,
        "init_lora_weights": config.init_lora_weights,
        "bias": "none",
        "fan_in_fan_out": conv1d,
        "modules_to_save": None,
        "use_dora": False,
    }
    out = {}
    for key, tensor in state.items():
        site, name = key.rsplit(".", 1)
        out[f"{site}.lora_{name}.weight"] = transposed(tensor)  # PEFT keeps nn.Linear's (out, in)
    return peft_config, out
