"""Houlsby adapters <-> AdapterHub's bottleneck adapters (the `adapters` library, checked against 1.3.0).

AdapterHub's `double_seq_bn` (Houlsby) config, with `mh_adapter` (after the attention output
projection) and `output_adapter` (after the feed-forward output), computes at each place

    h + up(f(down(h))) * scaling        then the block's own residual add (and LayerNorm)

with `down` = `adapter_down.0` (Linear hidden -> hidden // reduction_factor), f = `non_linearity`
and `up` = `adapter_up` (nn.Linear weights, (out, in): ours are their transposes): our
h + U f(D h + b_d) + b_u exactly when scaling is 1, there is no
gating, no adapter LayerNorm, and the adapter reads the sublayer output (`original_ln_before`
False, `residual_before_ln` True, `original_ln_after` True). Weight names, per layer i:

    BERT family:   {...}.layer.{i}.attention.output.adapters.{name}.adapter_down.0.weight / .bias
                   {...}.layer.{i}.output.adapters.{name}.adapter_up.weight / .bias
    Llama, GPT-2:  {...}.{i}.attention_adapters.adapters.{name}.adapter_down.0.weight ...
                   {...}.{i}.output_adapters.adapters.{name}.adapter_up.bias ...

Reading goes by layer index and place, so a prefix such as `bert.` (a `BertAdapterModel`) does not
matter. Every other option changes the math and is refused with its name.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch

from adapterzoo.errors import UnsupportedFormatError
from adapterzoo.formats._common import transposed
from adapterzoo.formats.adapterhub import check_fields
from adapterzoo.sites import hidden_size

ARCHITECTURES = ("bottleneck",)
# AdapterHub activation names (transformers' ACT2FN) that are exactly one of ours
ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "swish": "swish", "silu": "silu", "tanh": "tanh"}
PLACES = {"attention": "mh_adapter", "ffn": "output_adapter"}
REQUIRED = {  # field: (value that matches our math, why another value does not)
    "original_ln_before": (
        False,
        "True (as in AdapterHub's seq_bn / Pfeiffer config) feeds the adapter the "
        "layer-normed sum of residual and sublayer output, but adapterzoo's houlsby adapter reads the "
        "sublayer output itself",
    ),
    "original_ln_after": (True, "False drops the block's own residual add and LayerNorm after the adapter"),
    "residual_before_ln": (True, "anything but True takes the adapter's residual from another point than its input"),
    "is_parallel": (False, "parallel adapters (He et al.) read the sublayer input, not its output"),
    "ln_before": (False, "an adapter LayerNorm before the bottleneck is not part of adapterzoo's houlsby adapter"),
    "ln_after": (False, "an adapter LayerNorm after the bottleneck is not part of adapterzoo's houlsby adapter"),
    "use_gating": (False, "gated adapters (UniPELT) are not supported"),
    "phm_layer": (False, "Compacter's PHM layers are not supported"),
    "cross_adapter": (False, "cross-attention adapters need an encoder-decoder base"),
    "inv_adapter": (None, "invertible adapters (on the embeddings) are not supported"),
}
KNOWN = {
    "architecture",
    "mh_adapter",
    "output_adapter",
    "reduction_factor",
    "non_linearity",
    "scaling",
    "leave_out",
    "dropout",
    "init_weights",
    "init_weights_seed",
    "stochastic_depth",
    "adapter_residual_before_ln",
    "inv_adapter_reduction_factor",
    "factorized_phm_W",
    "shared_W_phm",
    "shared_phm_rule",
    "factorized_phm_rule",
    "phm_c_init",
    "phm_init_range",
    "learn_phm",
    "hypercomplex_nonlinearity",
    "phm_rank",
    "phm_bias",
    "phm_dim",
    *REQUIRED,
}
KEY = re.compile(r"(?:.*?\.)?(\d+)\.(.+)\.adapters\.([^.]+)\.(adapter_down\.0|adapter_up)\.(weight|bias)")
OURS = {
    ("adapter_down.0", "weight"): "down",
    ("adapter_down.0", "bias"): "down_bias",
    ("adapter_up", "weight"): "up",
    ("adapter_up", "bias"): "up_bias",
}


def _place(module: str) -> str | None:
    if module in ("attention.output", "attention_adapters"):
        return "attention"
    if module in ("output", "output_adapters"):
        return "ffn"
    return None


def _sites_by_place(model, locations: list[str]) -> dict[str, list[str]]:
    from adapterzoo.sites import find_role

    from .houlsby import ROLES

    return {loc: find_role(model, ROLES[loc]) for loc in locations}


def from_adapterhub(atype, model, ah: dict[str, Any], state: dict[str, torch.Tensor]):
    what = "AdapterHub bottleneck adapter"
    config = ah.get("config") or {}
    check_fields(config, what, KNOWN, {})
    for key, (wanted, why) in REQUIRED.items():
        if key in config and config[key] != wanted:
            raise UnsupportedFormatError(f"{what}: {key}={config[key]!r} is not supported: {why}")
    if config.get("scaling", 1.0) != 1.0:
        raise UnsupportedFormatError(
            f"{what}: scaling={config['scaling']!r} is not supported: adapterzoo's houlsby adapter adds U f(D h) "
            "unscaled; fold a constant scale into adapter_up's weight and bias and save with scaling=1.0"
        )
    if config.get("leave_out"):
        raise UnsupportedFormatError(
            f"{what}: leave_out={config['leave_out']!r} is not supported: adapterzoo's houlsby adapter sits in every "
            "layer; retrain without leave_out"
        )
    act = str(config.get("non_linearity", "swish")).lower()
    if act not in ACTIVATIONS:
        raise UnsupportedFormatError(
            f"{what}: non_linearity={act!r} is not supported; adapterzoo's houlsby adapter offers {sorted(ACTIVATIONS)}"
        )
    locations = [loc for loc, flag in PLACES.items() if config.get(flag)]
    if not locations:
        raise UnsupportedFormatError(
            f"{what}: neither mh_adapter nor output_adapter is set, so it adapts nothing we know"
        )
    hidden = hidden_size(model)
    if ah.get("hidden_size") not in (None, hidden):
        raise UnsupportedFormatError(f"{what}: made for hidden_size={ah['hidden_size']}, this base has {hidden}")
    rf = config.get("reduction_factor", 16)
    if not isinstance(rf, (int, float)) or isinstance(rf, bool) or rf <= 0:
        raise UnsupportedFormatError(
            f"{what}: reduction_factor={rf!r} is not supported: per-layer reduction factors give per-layer bottleneck "
            "sizes, which one adapterzoo houlsby config cannot express; retrain with one reduction_factor"
        )
    bottleneck = max(1, int(hidden // rf))
    sites = _sites_by_place(model, locations)
    flat: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        match = KEY.fullmatch(key)
        place = _place(match.group(2)) if match else None
        if match is None or place is None:
            raise UnsupportedFormatError(f"{what}: weight {key!r} is not a bottleneck adapter weight adapterzoo knows")
        if ah.get("name") and match.group(3) != ah["name"]:
            raise UnsupportedFormatError(
                f"{what}: weight {key!r} belongs to adapter {match.group(3)!r}, not {ah['name']!r}"
            )
        layer = int(match.group(1))
        if place not in sites or layer >= len(sites[place]):
            raise UnsupportedFormatError(
                f"{what}: weight {key!r} is for a layer or place this base and config do not have"
            )
        flat[f"{sites[place][layer]}.{OURS[match.group(4), match.group(5)]}"] = transposed(tensor)
    ours = {"bottleneck": bottleneck, "activation": ACTIVATIONS[act], "locations": locations}
    return ours, flat


def reduction_factor(hidden: int, bottleneck: int) -> float:
    """A reduction factor for which AdapterHub's int(hidden // rf) gives back `bottleneck`."""
    rf = hidden / bottleneck
    for _ in range(64):
        if int(hidden // rf) == bottleneck:
            return rf
        rf = math.nextafter(rf, 0.0)
    raise UnsupportedFormatError(
        f"no AdapterHub reduction_factor gives a bottleneck of {bottleneck} for hidden size {hidden}"
    )


def to_adapterhub(atype, model, config, state: dict[str, torch.Tensor], name: str):
    hidden = hidden_size(model)
    if config.activation not in ACTIVATIONS.values():
        raise UnsupportedFormatError(f"activation {config.activation!r} has no AdapterHub name")
    ah_config = {  # no "architecture": the adapters library leaves it out for bottleneck adapters
        "mh_adapter": "attention" in config.locations,
        "output_adapter": "ffn" in config.locations,
        "reduction_factor": reduction_factor(hidden, config.bottleneck),
        "non_linearity": config.activation,
        **{key: wanted for key, (wanted, _) in REQUIRED.items()},
        "adapter_residual_before_ln": False,
        "scaling": 1.0,
        "leave_out": [],
        "dropout": 0.0,
        "init_weights": "bert",
        "init_weights_seed": None,
        "inv_adapter_reduction_factor": None,
        "stochastic_depth": 0.0,
    }
    sites = _sites_by_place(model, config.locations)
    back = {v: k for k, v in OURS.items()}
    out: dict[str, torch.Tensor] = {}
    for place, paths in sites.items():
        for path in paths:
            if path.endswith(".dense"):  # BERT family: the BertSelfOutput / BertOutput module holds the adapters
                module = path[: -len(".dense")]
            else:  # Llama, GPT-2, ...: the decoder layer holds attention_adapters / output_adapters
                module = re.match(r"(.*?\.\d+)\.", path).group(1) + (
                    ".attention_adapters" if place == "attention" else ".output_adapters"
                )
            for ours, (part, kind) in back.items():
                out[f"{module}.adapters.{name}.{part}.{kind}"] = transposed(state[f"{path}.{ours}"])
    return ah_config, out
