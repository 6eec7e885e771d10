"""Find where adapters attach, by module type and name pattern, across base families.

Adapter types call these helpers from their `sites()` so that one plugin works on Llama-family
(`q_proj`, `o_proj`, `down_proj`), GPT-2 (`c_attn`, `c_proj`, Conv1D layers) and BERT-family
(`query`, `attention.output.dense`, `output.dense`) bases alike.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

from .errors import InvalidConfigError

try:  # GPT-2's "Conv1D" is a linear layer with its weight transposed
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()  # type: ignore[assignment]

LINEAR_TYPES = (nn.Linear, Conv1D)

# Module paths by role. Each pattern is matched with re.search against the full module path.
ROLE_PATTERNS: dict[str, str] = {
    # the attention block's output projection, before the residual add
    "attention_output": (
        r"(self_attn\.o_proj|self_attn\.out_proj|attn\.c_proj|attn\.out_proj|attention\.output\.dense"
        r"|self_attention\.dense|attn\.o_proj)$"
    ),
    # the feed-forward block's output projection, before the residual add
    "ffn_output": (
        r"(mlp\.down_proj|mlp\.c_proj|mlp\.fc2|mlp\.dense_4h_to_h|layers?\.\d+\.output\.dense"
        r"|feed_forward\.w2)$"
    ),
    # the attention modules themselves (prefix tuning extends their keys and values)
    "attention": r"(self_attn|\.attn|attention\.self|self_attention)$",
}


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or a GPT-2 Conv1D."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if Conv1D and isinstance(module, Conv1D):
        in_features, out_features = module.weight.shape
        return in_features, out_features
    raise TypeError(f"{type(module).__name__} is not a linear layer")


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight of an nn.Linear or a GPT-2 Conv1D in the `x @ W` layout, (in, out), as a view:
    what a base-aware adapter type (DoRA's column norms) reads from `w.module`."""
    if isinstance(module, nn.Linear):
        return module.weight.T
    if Conv1D and isinstance(module, Conv1D):
        return module.weight
    raise TypeError(f"{type(module).__name__} is not a linear layer")


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, LINEAR_TYPES) if Conv1D else isinstance(module, nn.Linear)


def is_norm(module: nn.Module) -> bool:
    """LayerNorm, RMSNorm and their per-model variants (LlamaRMSNorm, ...)."""
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith(("LayerNorm", "RMSNorm", "Norm"))


def output_head_names(model: nn.Module) -> set[str]:
    """Paths of the output head (lm_head), which adapters leave alone unless asked."""
    heads: set[str] = set()
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    for name, module in model.named_modules():
        if head is not None and module is head:
            heads.add(name)
    return heads


def find_linear(model: nn.Module, target_modules: str | Iterable[str]) -> list[str]:
    """Linear layers chosen the way PEFT chooses `target_modules`.

    A list matches a module whose path equals an entry or ends with `.entry`; a string is a regex
    that must match the whole path; `"all-linear"` is every linear layer but the output head.
    """
    heads = output_head_names(model)
    found = []
    for path, module in model.named_modules():
        if not path or not is_linear(module):
            continue
        if target_modules == "all-linear":
            ok = path not in heads
        elif isinstance(target_modules, str):
            ok = re.fullmatch(target_modules, path) is not None
        else:
            ok = any(path == t or path.endswith("." + t) for t in target_modules)
        if ok:
            found.append(path)
    if not found:
        raise InvalidConfigError(
            f"target_modules={target_modules!r} matches no linear layer of this {type(model).__name__}; "
            f"its linear layers end in: {', '.join(sorted(linear_suffixes(model)))}"
        )
    return found


def linear_suffixes(model: nn.Module) -> set[str]:
    return {path.rsplit(".", 1)[-1] for path, m in model.named_modules() if path and is_linear(m)}


def find_role(model: nn.Module, role: str) -> list[str]:
    """Module paths that play `role` (see ROLE_PATTERNS), in model order."""
    pattern = re.compile(ROLE_PATTERNS[role])
    found = [path for path, _ in model.named_modules() if path and pattern.search(path)]
    if role == "attention":  # keep only modules that compute attention, not their containers
        modules = dict(model.named_modules())
        found = [p for p in found if any(is_linear(c) for c in modules[p].children())]
    if not found:
        raise InvalidConfigError(
            f"no module of this {type(model).__name__} plays the role {role!r}; "
            "this base family is not supported yet (extend adapterzoo.sites.ROLE_PATTERNS)"
        )
    return found


def find_norms(model: nn.Module) -> list[str]:
    return [path for path, m in model.named_modules() if path and is_norm(m)]


def attention_dims(model: nn.Module, module: nn.Module) -> tuple[int, int]:
    """(key/value heads, head dim) of an attention module, for prefix keys and values."""
    config = model.config
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    head_dim = getattr(module, "head_dim", None) or getattr(module, "attention_head_size", None) or hidden // heads
    return kv_heads, head_dim


def hidden_size(model: nn.Module) -> int:
    return model.get_input_embeddings().embedding_dim
