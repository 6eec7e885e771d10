"""LoRA: Hu et al. (2021), "LoRA: Low-Rank Adaptation of Large Language Models".

Eq. (3): h = W0 x + (alpha / r) * B A x, with A (r x in) and B (out x r); B starts at zero, so a
new adapter leaves the base unchanged. rsLoRA (Kalajdzievski, 2023) scales by alpha / sqrt(r).
Stored here in the `x @ W` layout the batched kernels want: A as (in, r), B as (r, out), so the
delta is (x @ A) @ B * scale (PEFT's files hold the transposes; peft.py maps them).

In a mixed batch each row uses its own A and B by slot, and the whole batch is two batched
matmuls per site (Punica's BGMV). Ranks below the pool's bucket are zero-padded: the padded
columns of A and rows of B contribute exactly zero.

The rest of PEFT's LoraConfig that changes the math, with PEFT's meaning:

- `rank_pattern` / `alpha_pattern`: a rank and alpha per site. The adapter's size is its largest
  rank; a site of smaller rank is zero-padded like any smaller adapter in a pool. The one scale
  per adapter (a constant) is `lora_alpha / r`; a site whose own scale differs holds its B (and
  B's bias) multiplied by (site scale / scale), so the forward is one formula everywhere. peft.py
  divides it back out when writing PEFT's files.
- `layers_to_transform` / `layers_pattern` / `exclude_modules`: which modules are sites, matched
  exactly as PEFT's `check_target_module_exists` does (`lora_sites` below).
- `bias="lora_only"` / `"all"`: the adapter carries its own trained biases of the base's adapted
  (or all) modules, stored as the difference to the base's bias at that site (`bias`), added per
  row like BitFit's; `lora_bias=True`: a bias on B (`lora_bias`), scaled with B.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from adapterzoo import AdapterConfig, AdapterType, require
from adapterzoo.errors import InvalidConfigError
from adapterzoo.sites import Conv1D, is_linear, is_norm, linear_dims, linear_suffixes

from . import peft as _peft

# The layers PEFT targets by default, per model family.
DEFAULT_TARGETS = {
    "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "bert": ["query", "value"],
    "roberta": ["query", "value"], "distilbert": ["q_lin", "v_lin"],
}
BIAS_MODES = ("none", "lora_only", "all")


def _names(value) -> list[str] | str | None:
    """A list of names (sets and tuples from PEFT's JSON become sorted lists), a regex, or None."""
    if isinstance(value, (set, tuple, frozenset)):
        return sorted(value)
    return value


@dataclass
class LoraConfig(AdapterConfig):
    r: int = 8
    lora_alpha: float = 8
    target_modules: list[str] | str | None = None  # names, a regex, "all-linear"; None: per family
    use_rslora: bool = False
    lora_dropout: float = 0.0
    init_lora_weights: bool | str = True  # True: B = 0 (identity); False: random B (tests)
    # PEFT's per-site and selection fields (see the module docstring)
    rank_pattern: dict[str, int] = field(default_factory=dict)  # name or regex -> r at the sites it ends
    alpha_pattern: dict[str, float] = field(default_factory=dict)  # name or regex -> lora_alpha there
    layers_to_transform: list[int] | int | None = None  # only sites in these layers (a list of names only)
    layers_pattern: list[str] | str | None = None  # the module list holding the layers ("layers", "h")
    exclude_modules: list[str] | str | None = None  # names or a regex never adapted
    bias: str = "none"  # "lora_only": the adapted modules' biases are trained too; "all": every bias
    lora_bias: bool = False  # a bias on B

    def validate(self) -> None:
        require(isinstance(self.r, int) and self.r >= 1, f"LoRA r must be a positive integer, got {self.r!r}")
        require(isinstance(self.lora_alpha, (int, float)) and self.lora_alpha > 0,
                f"lora_alpha must be a positive number, got {self.lora_alpha!r}")
        require(0 <= self.lora_dropout < 1, f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        require(self.init_lora_weights in (True, False, "gaussian"),
                f"init_lora_weights must be True, False or 'gaussian', got {self.init_lora_weights!r}")
        self.target_modules = _names(self.target_modules)
        t = self.target_modules
        require(t is None or isinstance(t, str) or (isinstance(t, list) and t and all(isinstance(x, str) for x in t)),
                f"target_modules must be a list of module names, a regex string or 'all-linear', got {t!r}")
        self.rank_pattern = dict(self.rank_pattern or {})
        self.alpha_pattern = dict(self.alpha_pattern or {})
        require(all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 1
                    for k, v in self.rank_pattern.items()),
                f"rank_pattern must map module names (or regexes) to positive integer ranks, got {self.rank_pattern!r}")
        require(all(isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
                    for k, v in self.alpha_pattern.items()),
                f"alpha_pattern must map module names (or regexes) to positive numbers, got {self.alpha_pattern!r}")
        for pattern in [*self.rank_pattern, *self.alpha_pattern]:
            _check_regex(pattern, "a rank_pattern / alpha_pattern key")
        layers = self.layers_to_transform
        if isinstance(layers, tuple):
            self.layers_to_transform = layers = list(layers)
        require(layers is None or (isinstance(layers, int) and not isinstance(layers, bool) and layers >= 0)
                or (isinstance(layers, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                     for i in layers)),
                f"layers_to_transform must be a layer index or a list of them, got {layers!r}")
        require(not (layers not in (None, []) and isinstance(t, str)),
                "layers_to_transform works only with target_modules given as a list of names (as in PEFT); for a "
                "regex, name the layers in the regex itself, e.g. r'.*\\.layers\\.(0|1)\\.self_attn\\.q_proj'")
        self.layers_pattern = _names(self.layers_pattern)
        pattern = self.layers_pattern
        require(pattern is None or isinstance(pattern, str) or (isinstance(pattern, list) and all(isinstance(p, str) for p in pattern)),
                f"layers_pattern must be a name or a list of names (e.g. 'layers'), got {pattern!r}")
        require(not pattern or layers not in (None, []),
                "layers_pattern needs layers_to_transform (as in PEFT): say which layers of that module list to adapt")
        self.exclude_modules = _names(self.exclude_modules)
        ex = self.exclude_modules
        require(ex is None or isinstance(ex, str) or (isinstance(ex, list) and all(isinstance(x, str) for x in ex)),
                f"exclude_modules must be a list of module names or a regex string, got {ex!r}")
        if isinstance(t, str) and t != "all-linear":
            _check_regex(t, "target_modules")
        if isinstance(ex, str):
            _check_regex(ex, "exclude_modules")
        require(self.bias in BIAS_MODES, f"bias must be one of {', '.join(BIAS_MODES)}, got {self.bias!r}")
        require(isinstance(self.lora_bias, bool), f"lora_bias must be true or false, got {self.lora_bias!r}")

    @property
    def scale(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    @property
    def max_rank(self) -> int:
        return max([self.r, *self.rank_pattern.values()])

    def site_rank(self, site: str) -> int:
        return self.rank_pattern.get(pattern_key(self.rank_pattern, site), self.r)

    def site_alpha(self, site: str) -> float:
        return self.alpha_pattern.get(pattern_key(self.alpha_pattern, site), self.lora_alpha)

    def site_scale(self, site: str) -> float:
        r = self.site_rank(site)
        return self.site_alpha(site) / (math.sqrt(r) if self.use_rslora else r)

    def site_factor(self, site: str) -> float:
        """What this site's B is multiplied by in storage: its own scale over the adapter's."""
        return 1.0 if not (self.rank_pattern or self.alpha_pattern) else self.site_scale(site) / self.scale

    @property
    def has_bias(self) -> bool:
        return self.bias != "none" or self.lora_bias


def _check_regex(pattern: str, what: str) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise InvalidConfigError(f"{what} {pattern!r} is not a valid regular expression: {exc}") from exc


def pattern_key(patterns: dict[str, object], site: str) -> str:
    """PEFT's `get_pattern_key`: the first pattern that matches the end of the site's path."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", site):
            return key
    return site


def targets(model: nn.Module, config: LoraConfig) -> list[str] | str:
    if config.target_modules is not None:
        return config.target_modules
    family = getattr(model.config, "model_type", "")
    if family not in DEFAULT_TARGETS:
        raise ValueError(f"no default LoRA target_modules for {family!r}; pass target_modules=[...]")
    return DEFAULT_TARGETS[family]


def _in_layers(config: LoraConfig, path: str) -> bool:
    """PEFT's layer filter: the first numbered path segment (after `layers_pattern`, if given)."""
    match = None
    if not config.layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", path)
    else:
        for pattern in [config.layers_pattern] if isinstance(config.layers_pattern, str) else config.layers_pattern:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", path)
            if match is not None:
                break
    if match is None:
        return False
    index = int(match.group("idx"))
    layers = config.layers_to_transform
    return index == layers if isinstance(layers, int) else index in layers


def is_lora_site(model: nn.Module, config: LoraConfig, path: str, module: nn.Module) -> bool:
    """Whether PEFT's `check_target_module_exists` (PEFT 0.21) puts a LoRA at `path`, for linear layers."""
    if not path or not is_linear(module):
        return False
    excluded = config.exclude_modules
    if isinstance(excluded, str):
        if re.fullmatch(excluded, path):
            return False
    elif excluded and (path in excluded or any(path.endswith(f".{e}") for e in excluded)):
        return False
    target = targets(model, config)
    if target == "all-linear":  # PEFT expands it to the full paths of every linear layer but the output head
        return module is not model.get_output_embeddings()
    if isinstance(target, str):
        return re.fullmatch(target, path) is not None
    if path in target:  # an exact path skips the layer filter, as in PEFT
        return True
    if not any(path.endswith(f".{t}") for t in target):
        return False
    layers = config.layers_to_transform
    return layers is None or layers == [] or _in_layers(config, path)


def lora_sites(model: nn.Module, config: LoraConfig) -> list[str]:
    found = [path for path, module in model.named_modules() if is_lora_site(model, config, path, module)]
    if not found:
        raise InvalidConfigError(
            f"target_modules={targets(model, config)!r} (with layers_to_transform={config.layers_to_transform!r}, "
            f"exclude_modules={config.exclude_modules!r}) matches no linear layer of this {type(model).__name__}; "
            f"its linear layers end in: {', '.join(sorted(linear_suffixes(model)))}"
        )
    return found


def bias_sites(model: nn.Module, config: LoraConfig, lora: list[str]) -> list[str]:
    """Modules whose bias the adapter trains: the LoRA sites' (`lora_only`) or every bias of the base
    (`all`: PEFT trains every parameter with "bias" in its name)."""
    modules = dict(model.named_modules())
    if config.bias == "none":
        return []
    if config.bias == "lora_only":
        return [p for p in lora if getattr(modules[p], "bias", None) is not None]
    found = []
    for name, _ in model.named_parameters():
        if "bias" not in name:
            continue
        path, _, attr = name.rpartition(".")
        module = modules[path]
        if attr != "bias" or not (is_linear(module) or is_norm(module)):
            raise InvalidConfigError(
                f"bias='all' trains the parameter {name!r}, which is not the bias of a linear or norm layer, so "
                "adapterzoo cannot add its change to the layer's output; use bias='lora_only' or 'none'"
            )
        found.append(path)
    return found


class Lora(AdapterType):
    name = "lora"
    Config = LoraConfig
    kind = "delta"
    default_lr = 2e-3  # zoo.train's default (measured on SmolLM2, see README "Specialists")

    def sites(self, model, config):
        lora = lora_sites(model, config)
        biased = set(bias_sites(model, config, lora)) | set(lora)
        return [p for p, _ in model.named_modules() if p in biased]  # model order

    def tensors(self, model, site, module, config):
        shapes = {}
        if is_lora_site(model, config, site, module):
            fan_in, fan_out = linear_dims(module)
            shapes = {"A": (fan_in, "r"), "B": ("r", fan_out)}
            if config.lora_bias:
                shapes["lora_bias"] = (fan_out,)
        if config.bias == "all" or (config.bias == "lora_only" and shapes):
            if getattr(module, "bias", None) is not None:
                shapes["bias"] = tuple(module.bias.shape)
        return shapes

    def sizes(self, config):
        return {"r": config.max_rank}

    def variant(self, config):
        # adapters with biases share pools of their own, so plain LoRA pools keep their two matmuls
        return "bias" if config.has_bias else ""

    def constants(self, config):
        return {"scale": config.scale, "dropout": config.lora_dropout}

    def init(self, name, tensor, config, generator, module):
        if name == "A":
            if config.init_lora_weights == "gaussian":
                tensor.normal_(0, 1 / config.r, generator=generator)
            else:  # PEFT's default: kaiming-uniform A, as nn.Linear initialises weights (fan_in = in)
                bound = 1 / math.sqrt(tensor.shape[0])
                tensor.uniform_(-bound, bound, generator=generator)
        elif name == "B" and config.init_lora_weights is False:  # random B too (tests): nn.Linear's init, fan_in = r
            bound = 1 / math.sqrt(tensor.shape[0])
            tensor.uniform_(-bound, bound, generator=generator)
        else:  # B, and biases: zero, so a new adapter is the identity
            tensor.zero_()

    def init_from_base(self, model, config, tensors, generator):
        """A site of smaller rank (rank_pattern) keeps only its first r columns of A and rows of B."""
        if not config.rank_pattern:
            return
        for site, ts in tensors.items():
            if "A" in ts:
                r = config.site_rank(site)
                ts["A"][:, r:] = 0
                ts["B"][r:, :] = 0

    def delta(self, x, y, w, training):
        scale = w["scale"][:, None, None]  # (n or 1, 1, 1)
        if training:
            keep = 1 - w["dropout"][:, None, None]
            x = x * (torch.rand_like(x) < keep) / keep
        if w["variant"] == "":
            h = w.matmul(x, "A")  # (n, T, r): x @ A[slot] per row
            return w.matmul(h, "B") * scale  # (n, T, out)
        # adapters with biases: a site may hold A and B, a bias, or both (the pool has what its adapters use)
        out = 0
        try:
            h = w.matmul(w.matmul(x, "A"), "B")  # raises KeyError at once where no adapter has A
        except KeyError:
            h = None
        if h is not None:
            try:
                h = h + w["lora_bias"][:, None, :]
            except KeyError:
                pass
            out = h * scale
        try:
            out = out + w["bias"][:, None, :]  # (n, 1, out): the same shift for every token of a row
        except KeyError:
            pass
        if isinstance(out, int):  # neither (cannot happen for a site some adapter uses): no change
            return torch.zeros_like(y[:1])
        return out

    # PEFT's file format (adapterzoo.formats); the key and config mapping is in peft.py beside this file
    peft_types = _peft.PEFT_TYPES

    def from_peft(self, model, peft_config, state):
        return _peft.from_peft(model, peft_config, state)

    def to_peft(self, model, config, state):
        return _peft.to_peft(model, config, state)

    def merge(self, module, tensors, config, sign=1.0):
        with torch.no_grad():
            if "A" in tensors:
                delta_w = sign * config.scale * tensors["A"] @ tensors["B"]  # (in, out)
                if isinstance(module, Conv1D):  # Conv1D keeps its weight as (in, out)
                    module.weight += delta_w.to(module.weight)
                else:
                    module.weight += delta_w.T.to(module.weight)
            shift = 0
            if "lora_bias" in tensors:
                shift = sign * config.scale * tensors["lora_bias"]
            if "bias" in tensors:
                shift = shift + sign * tensors["bias"]
            if isinstance(shift, torch.Tensor):
                if getattr(module, "bias", None) is None:  # lora_bias on a bias-free layer (Llama)
                    module.bias = nn.Parameter(torch.zeros(shift.shape, dtype=module.weight.dtype,
                                                           device=module.weight.device), requires_grad=False)
                module.bias += shift.to(module.bias)
