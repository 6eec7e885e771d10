"""LoRA <-> PEFT's LORA layout (PEFT 0.21).

PEFT saves, per targeted module path `p` (after the `base_model.model.` prefix, which
adapterzoo.formats.peft strips and adds):

    p.lora_A.weight     (r_p, in)  ours: `p.A`, transposed to (in, r) and zero-padded to the largest rank
    p.lora_B.weight     (out, r_p) ours: `p.B`, transposed to (r, out), padded, times the site factor
    p.lora_B.bias       (out,)     lora_bias=True; ours: `p.lora_bias`, times the site factor
    p.base_layer.bias   (out,)     bias="lora_only"/"all": the trained bias of an adapted module
    q.bias              (out,)     bias="all": the trained bias of any other module (linear or norm)
    m.weight, m.bias               modules_to_save: the trained copy of module m; ours: its change from
                                   the base's m (`weight_delta` (in, out), `embedding_delta`, `norm_weight`, `bias`)
    e.token_adapter.trainable_tokens_delta  (k, d)  trainable_token_indices: the new values of those k rows
                                   of embedding e; ours: `token_delta` (vocab, d), zero but at those rows

also for GPT-2's Conv1D layers (PEFT keeps A and B in nn.Linear orientation and flips the
input itself, `fan_in_fan_out=True`). r_p and the scale at `p` come from `r`, `lora_alpha`,
`rank_pattern`, `alpha_pattern` and `use_rslora` exactly as PEFT reads them; the site factor is
(scale at p) / (lora_alpha / r), see lora.py. Trained biases are stored as their difference to
the base's bias (so a row without the adapter sees the base's), and written back as base + delta.
Which modules are sites (`target_modules`, `layers_to_transform`, `layers_pattern`,
`exclude_modules`) is decided by lora.is_lora_site, PEFT's own rule, and the weights must cover
exactly those modules.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from adapterzoo.errors import ShapeMismatchError, UnsupportedFormatError
from adapterzoo.formats._common import transposed
from adapterzoo.formats.peft import check_fields

PEFT_TYPES = ("LORA",)

# PEFT LoraConfig fields read into our config (LoraConfig in lora.py has each under the same name)
CONFIG_FIELDS = (
    "r",
    "lora_alpha",
    "target_modules",
    "use_rslora",
    "lora_dropout",
    "init_lora_weights",
    "rank_pattern",
    "alpha_pattern",
    "layers_to_transform",
    "layers_pattern",
    "exclude_modules",
    "bias",
    "lora_bias",
    "modules_to_save",
    "trainable_token_indices",
)
KNOWN = {
    *CONFIG_FIELDS,
    # change nothing at inference
    "fan_in_fan_out",
    "megatron_core",
    "qalora_group_size",
    "ensure_weight_tying",
    "runtime_config",
    # settings of initialisations (which init_lora_weights governs, below)
    "eva_config",
    "corda_config",
    "loftq_config",
    "lora_ga_config",
}
# Initialisations that leave the base alone; the others (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA) change
# the base weights and MiCA changes the forward, so their saved weights are not a LoRA on our base.
PLAIN_INITS = (True, False, "gaussian", "orthogonal", "eva")
HINTS = {
    "use_dora": "DoRA rescales each output column by a learned magnitude vector, which adapterzoo's lora "
    "type does not compute. Install a plugin whose type reads PEFT LORA adapters with use_dora=True, merge it "
    "into the base with PEFT (model.merge_and_unload()) and load the result as a new base, or retrain with "
    "use_dora=False.",
    "use_qalora": "QA-LoRA pools the input before A; retrain with use_qalora=False.",
    "target_parameters": "LoRA on bare nn.Parameters (e.g. MoE experts) is not supported; target linear modules.",
    "layer_replication": "it duplicates layers of the base, which would change the shared base.",
    "alora_invocation_tokens": "activated LoRA (aLoRA) switches the adapter on per token; not supported.",
}
TOKENS_KEY = re.compile(r"(?P<site>.+)\.token_adapter\.trainable_tokens_delta")
SAVED_KEY = re.compile(r"(?P<site>.+)\.weight")
WRAPPED_BIAS_KEY = re.compile(r"(?P<site>.+)\.(?:modules_to_save|original_module)\.bias")
KEY = re.compile(r"(?P<site>.+?)\.(?:lora_(?P<lora>A|B)\.weight|(?P<lora_bias>lora_B\.bias)|(?:base_layer\.)?bias)")


def from_peft(
    model, peft_config: dict[str, Any], state: dict[str, torch.Tensor]
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from .lora import LoraConfig, token_sites

    what = "PEFT LoRA adapter"
    check_fields(peft_config, what, KNOWN, HINTS)
    init = peft_config.get("init_lora_weights", True)
    if init not in PLAIN_INITS:
        raise UnsupportedFormatError(
            f"{what}: init_lora_weights={init!r} is not supported: that initialisation changes the base weights (or, "
            "for MiCA, the forward pass), so the saved A and B only work on PEFT's modified base. Convert it to a "
            "plain LoRA first (PEFT's path_initial_model_for_weight_conversion when saving), or merge it into the base."
        )
    config = {
        "r": int(peft_config.get("r", 8)),
        "lora_alpha": peft_config.get("lora_alpha", 8),
        "use_rslora": bool(peft_config.get("use_rslora", False)),
        "lora_dropout": float(peft_config.get("lora_dropout") or 0.0),
        "init_lora_weights": init if init in (True, False, "gaussian") else True,
        "bias": peft_config.get("bias") or "none",
        "lora_bias": bool(peft_config.get("lora_bias", False)),
    }
    for key in (
        "target_modules",
        "rank_pattern",
        "alpha_pattern",
        "layers_to_transform",
        "layers_pattern",
        "exclude_modules",
        "modules_to_save",
        "trainable_token_indices",
    ):
        if peft_config.get(key) not in (None, {}, [], ""):
            config[key] = peft_config[key]
    ours = LoraConfig.from_dict(config)  # checked here, so a bad field is named before any tensor is
    modules = dict(model.named_modules())
    _check_tying(model, ours, peft_config, what)
    tokens = token_sites(model, ours)
    flat: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        match = TOKENS_KEY.fullmatch(key)
        if match and match.group("site") in tokens and isinstance(modules[match.group("site")], torch.nn.Embedding):
            site = match.group("site")
            flat.update(_token_deltas(model, modules, tokens, site, tensor, key))
            continue
        match = SAVED_KEY.fullmatch(key)
        if match and ours.is_saved(match.group("site")):
            site = match.group("site")
            name, change = _saved_change(modules[site], tensor, key, what)
            flat[f"{site}.{name}"] = change
            continue
        match = WRAPPED_BIAS_KEY.fullmatch(key)
        if match and ours.bias == "all" and ours.is_saved(match.group("site")):
            # bias="all" also saves the biases inside PEFT's wrapper of a saved module: the copy's (the same
            # tensor as `site.bias`) and the replaced original's, which no forward with the adapter reads
            continue
        match = KEY.fullmatch(key)
        if match is None:
            kind = (
                "LoRA on an embedding layer"
                if "lora_embedding_" in key
                else "not a LoRA A or B weight of a linear layer"
            )
            raise UnsupportedFormatError(
                f"{what}: weight {key!r} is {kind}, which adapterzoo's lora type does not support"
            )
        site = match.group("site")
        if match.group("lora"):
            name = match.group("lora")
            flat[f"{site}.{name}"] = _padded_site(transposed(tensor), name, site, ours, key)
        elif match.group("lora_bias"):
            flat[f"{site}.lora_bias"] = tensor * ours.site_factor(site)
        else:
            base = getattr(modules.get(site), "bias", None)
            if base is None or tuple(base.shape) != tuple(tensor.shape):
                raise ShapeMismatchError(
                    f"{what}: weight {key!r} is a trained bias of shape {tuple(tensor.shape)}, but this base's "
                    f"{site!r} "
                    f"has {'no bias' if base is None else f'a bias of shape {tuple(base.shape)}'}; "
                    "the adapter was made for another base"
                )
            flat[f"{site}.bias"] = tensor.float() - base.detach().float().cpu()
    for site in {k.rsplit(".", 1)[0] for k in flat if k.endswith(".B")}:  # B and B's bias carry the site factor
        factor = ours.site_factor(site)
        if factor != 1.0:
            flat[f"{site}.B"] = flat[f"{site}.B"] * factor
    return ours.to_dict(), flat


def _check_tying(model, config, peft_config: dict[str, Any], what: str) -> None:
    """ensure_weight_tying=True makes PEFT share one trained copy between a tied embedding and head."""
    if not peft_config.get("ensure_weight_tying") or not config.modules_to_save:
        return
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and head.weight is model.get_input_embeddings().weight:
        raise UnsupportedFormatError(
            f"{what}: ensure_weight_tying=True with modules_to_save on a base whose output head shares the input "
            "embedding makes PEFT train one copy for both, which adapterzoo does not reproduce; save the adapter "
            "with ensure_weight_tying=False, or merge it into the base with PEFT (merge_and_unload)"
        )


def _base_weight(module) -> torch.Tensor:
    return module.weight.detach().float().cpu()


def _saved_change(module, tensor: torch.Tensor, key: str, what: str) -> tuple[str, torch.Tensor]:
    """A modules_to_save weight -> (our tensor name, its change from the base's), in our layout."""
    from adapterzoo.sites import Conv1D, is_linear

    base = _base_weight(module)
    if tuple(tensor.shape) != tuple(base.shape):
        raise ShapeMismatchError(
            f"{what}: weight {key!r} has shape {tuple(tensor.shape)}, but this base's module "
            f"has {tuple(base.shape)}; the adapter was made for another base"
        )
    change = tensor.float() - base
    if isinstance(module, torch.nn.Embedding):
        return "embedding_delta", change
    if is_linear(module):
        return "weight_delta", change if (Conv1D and isinstance(module, Conv1D)) else transposed(change)
    return "norm_weight", change


def _token_deltas(
    model, modules, tokens: dict[str, list[int]], site: str, rows: torch.Tensor, key: str
) -> dict[str, torch.Tensor]:
    """PEFT's new rows of embedding `site` -> our `token_delta` there (and at a head tied to it)."""
    ids = tokens[site]
    base = _base_weight(modules[site])
    if tuple(rows.shape) != (len(ids), base.shape[1]):
        raise ShapeMismatchError(
            f"PEFT LoRA adapter: weight {key!r} has shape {tuple(rows.shape)}, but trainable_token_indices lists "
            f"{len(ids)} tokens of width {base.shape[1]} for {site!r}; the config does not match the weights"
        )
    delta = torch.zeros_like(base)
    delta[ids] = rows.float() - base[ids]
    mask = torch.zeros(base.shape[0])
    mask[ids] = 1
    out = {f"{site}.token_delta": delta, f"{site}.token_mask": mask}
    for other, other_ids in tokens.items():  # the tied head, if any: the same rows, as (d, vocab)
        if other != site and other_ids == ids and not isinstance(modules[other], torch.nn.Embedding):
            out[f"{other}.tied_weight_delta"] = delta.T.contiguous()
            out[f"{other}.token_mask"] = mask.clone()
    return out


def _padded_site(t: torch.Tensor, name: str, site: str, config, key: str) -> torch.Tensor:
    """A (in, r_site) or B (r_site, out) zero-padded to the adapter's largest rank."""
    r = config.site_rank(site)
    have = t.shape[1] if name == "A" else t.shape[0]
    if t.dim() != 2 or have != r:
        raise ShapeMismatchError(
            f"PEFT LoRA adapter: weight {key!r} has shape {tuple(t.shape)}, but its config gives {site!r} rank {r} "
            "(r, or the rank_pattern entry that matches it); the config does not match the weights"
        )
    pad = config.max_rank - r
    if pad == 0:
        return t
    return torch.nn.functional.pad(t, (0, pad) if name == "A" else (0, 0, 0, pad))


def to_peft(model, config, state: dict[str, torch.Tensor]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from adapterzoo.sites import Conv1D

    from .lora import targets, token_sites

    modules = dict(model.named_modules())
    sites = {key.rsplit(".", 1)[0] for key in state if key.endswith(".A")}
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
        "rank_pattern": dict(config.rank_pattern),
        "alpha_pattern": dict(config.alpha_pattern),
        "layers_to_transform": config.layers_to_transform,
        "layers_pattern": config.layers_pattern,
        "exclude_modules": config.exclude_modules,
        "bias": config.bias,
        "lora_bias": config.lora_bias,
        "fan_in_fan_out": conv1d,
        "modules_to_save": list(config.modules_to_save) if config.modules_to_save else None,
        "trainable_token_indices": config.trainable_token_indices,
        "use_dora": False,
    }
    tokens = token_sites(model, config)
    out = {}
    for key, tensor in state.items():
        site, name = key.rsplit(".", 1)
        r, factor = config.site_rank(site), config.site_factor(site)
        if name in ("embedding_delta", "norm_weight"):
            out[f"{site}.weight"] = _base_weight(modules[site]) + tensor
        elif name == "weight_delta":
            layout = tensor if isinstance(modules[site], Conv1D) else transposed(tensor)
            out[f"{site}.weight"] = _base_weight(modules[site]) + layout
        elif name == "token_delta":  # PEFT keeps the new values of the listed rows only
            ids = tokens[site]
            out[f"{site}.token_adapter.trainable_tokens_delta"] = _base_weight(modules[site])[ids] + tensor[ids]
        elif name in ("tied_weight_delta", "token_mask"):
            continue  # the tied head follows the embedding's rows in PEFT; the listed tokens are in the config
        elif name == "A":
            out[f"{site}.lora_A.weight"] = transposed(tensor[:, :r])  # PEFT keeps nn.Linear's (out, in)
        elif name == "B":
            out[f"{site}.lora_B.weight"] = transposed(tensor[:r] / factor if factor != 1.0 else tensor[:r])
        elif name == "lora_bias":
            out[f"{site}.lora_B.bias"] = tensor / factor if factor != 1.0 else tensor
        elif name == "bias":
            prefix = f"{site}.base_layer" if f"{site}.A" in state else site  # a replaced module's: `site.bias`
            out[f"{prefix}.bias"] = modules[site].bias.detach().float().cpu() + tensor
        else:  # pragma: no cover - every name lora.py's tensors() gives is mapped above
            raise UnsupportedFormatError(f"LoRA tensor {key!r} has no PEFT name")
    return peft_config, out
