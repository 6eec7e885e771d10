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
- `modules_to_save`: whole trained copies of some modules (an `lm_head`, `embed_tokens`, a norm),
  stored as their difference to the base's module: `weight_delta` (in, out) of a linear layer
  (one more batched matmul per row), `embedding_delta` (vocab, d) of an embedding (each row looks
  its tokens up in its own table), `norm_weight` of a norm (times the normalised input), and
  `bias`. A replaced lm_head or embed_tokens costs vocab x hidden floats per adapter, on the host
  and in every pool slot; `AdapterInfo.parameters` counts them.
- `trainable_token_indices`: new values for some rows of an embedding, held the same way as a
  replaced embedding (`token_delta`, (vocab, d), zero but at those rows; written back to PEFT as
  the rows only), with `token_mask` (vocab,), 1 at the listed tokens, which the forward applies
  detached, so training changes those rows only. On a base whose output head shares the input
  embedding's weight (GPT-2), PEFT's head uses the new rows too: ours holds them again at the head
  (`tied_weight_delta`, masked the same way; trained here, the two copies are trained apart).

A row without the adapter (or with another one) reads zeros from the pool at every one of these
tensors, so it sees the base's module unchanged, in the same batch.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from adapterzoo import AdapterConfig, AdapterType, kernels, require
from adapterzoo.errors import InvalidConfigError
from adapterzoo.sites import Conv1D, is_linear, is_norm, linear_dims, linear_suffixes

from . import peft as _peft

# The layers PEFT targets by default, per model family.
DEFAULT_TARGETS = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
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
    modules_to_save: list[str] | None = None  # modules replaced by trained copies (names the path ends with)
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None  # embedding rows replaced

    def validate(self) -> None:
        require(isinstance(self.r, int) and self.r >= 1, f"LoRA r must be a positive integer, got {self.r!r}")
        require(
            isinstance(self.lora_alpha, (int, float)) and self.lora_alpha > 0,
            f"lora_alpha must be a positive number, got {self.lora_alpha!r}",
        )
        require(0 <= self.lora_dropout < 1, f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        require(
            self.init_lora_weights in (True, False, "gaussian"),
            f"init_lora_weights must be True, False or 'gaussian', got {self.init_lora_weights!r}",
        )
        self.target_modules = _names(self.target_modules)
        t = self.target_modules
        require(
            t is None or isinstance(t, str) or (isinstance(t, list) and t and all(isinstance(x, str) for x in t)),
            f"target_modules must be a list of module names, a regex string or 'all-linear', got {t!r}",
        )
        self.rank_pattern = dict(self.rank_pattern or {})
        self.alpha_pattern = dict(self.alpha_pattern or {})
        require(
            all(
                isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 1
                for k, v in self.rank_pattern.items()
            ),
            f"rank_pattern must map module names (or regexes) to positive integer ranks, got {self.rank_pattern!r}",
        )
        require(
            all(
                isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
                for k, v in self.alpha_pattern.items()
            ),
            f"alpha_pattern must map module names (or regexes) to positive numbers, got {self.alpha_pattern!r}",
        )
        for pattern in [*self.rank_pattern, *self.alpha_pattern]:
            _check_regex(pattern, "a rank_pattern / alpha_pattern key")
        layers = self.layers_to_transform
        if isinstance(layers, tuple):
            self.layers_to_transform = layers = list(layers)
        require(
            layers is None
            or (isinstance(layers, int) and not isinstance(layers, bool) and layers >= 0)
            or (
                isinstance(layers, list)
                and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers)
            ),
            f"layers_to_transform must be a layer index or a list of them, got {layers!r}",
        )
        require(
            not (layers not in (None, []) and isinstance(t, str)),
            "layers_to_transform works only with target_modules given as a list of names (as in PEFT); for a "
            "regex, name the layers in the regex itself, e.g. r'.*\\.layers\\.(0|1)\\.self_attn\\.q_proj'",
        )
        self.layers_pattern = _names(self.layers_pattern)
        pattern = self.layers_pattern
        require(
            pattern is None
            or isinstance(pattern, str)
            or (isinstance(pattern, list) and all(isinstance(p, str) for p in pattern)),
            f"layers_pattern must be a name or a list of names (e.g. 'layers'), got {pattern!r}",
        )
        require(
            not pattern or layers not in (None, []),
            "layers_pattern needs layers_to_transform (as in PEFT): say which layers of that module list to adapt",
        )
        self.exclude_modules = _names(self.exclude_modules)
        ex = self.exclude_modules
        require(
            ex is None or isinstance(ex, str) or (isinstance(ex, list) and all(isinstance(x, str) for x in ex)),
            f"exclude_modules must be a list of module names or a regex string, got {ex!r}",
        )
        if isinstance(t, str) and t != "all-linear":
            _check_regex(t, "target_modules")
        if isinstance(ex, str):
            _check_regex(ex, "exclude_modules")
        require(self.bias in BIAS_MODES, f"bias must be one of {', '.join(BIAS_MODES)}, got {self.bias!r}")
        require(isinstance(self.lora_bias, bool), f"lora_bias must be true or false, got {self.lora_bias!r}")
        self.modules_to_save = _names(self.modules_to_save) or None
        saved = self.modules_to_save
        require(
            saved is None or (isinstance(saved, list) and all(isinstance(m, str) and m for m in saved)),
            f"modules_to_save must be a list of module names, got {saved!r}",
        )
        for name in saved or ():  # PEFT puts each name into a regex (LoRA never targets a saved module)
            _check_regex(rf"(^|.*\.){name}($|\..*)", f"modules_to_save name {name!r}, in PEFT's pattern")
        tokens = self.trainable_token_indices
        if isinstance(tokens, (list, tuple)):
            self.trainable_token_indices = tokens = list(tokens) or None
        elif isinstance(tokens, dict):
            self.trainable_token_indices = tokens = {
                k: list(v) if isinstance(v, (list, tuple)) else v for k, v in tokens.items()
            } or None
        lists = [] if tokens is None else [tokens] if isinstance(tokens, list) else list(tokens.values())
        keys = tokens if isinstance(tokens, dict) else []
        require(
            tokens is None
            or (
                isinstance(tokens, (list, dict))
                and all(isinstance(k, str) for k in keys)
                and all(isinstance(v, list) and v and all(_is_index(i) for i in v) for v in lists)
            ),
            "trainable_token_indices must be a list of token ids, or a dict of embedding layer name -> list of "
            f"token ids, got {tokens!r}",
        )
        require(all(len(set(v)) == len(v) for v in lists), f"trainable_token_indices lists a token twice: {tokens!r}")
        if isinstance(tokens, dict) and saved:
            both = [name for name in tokens if name in saved]
            if both:
                raise InvalidConfigError(
                    f"{both[0]!r} is in both modules_to_save and trainable_token_indices (PEFT refuses this too): "
                    "replace the whole layer, or only some of its rows, not both"
                )

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
    def extended(self) -> bool:
        """Whether any site holds more than A and B (biases, replaced modules, replaced rows)."""
        return self.bias != "none" or self.lora_bias or bool(self.modules_to_save) or bool(self.trainable_token_indices)

    def is_saved(self, path: str) -> bool:
        """PEFT's modules_to_save rule: the module path ends with a listed name (plain `endswith`)."""
        return bool(path) and any(path.endswith(name) for name in self.modules_to_save or ())

    def in_saved(self, path: str) -> bool:
        """PEFT never puts a LoRA on a module to save or inside one."""
        return any(re.match(rf"(^|.*\.){name}($|\..*)", path) for name in self.modules_to_save or ())


def _is_index(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


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
    if config.in_saved(path):
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
        if config.is_saved(path):  # a replaced module's bias is part of its replacement
            continue
        module = modules[path]
        if attr != "bias" or not (is_linear(module) or is_norm(module)):
            raise InvalidConfigError(
                f"bias='all' trains the parameter {name!r}, which is not the bias of a linear or norm layer, so "
                "adapterzoo cannot add its change to the layer's output; use bias='lora_only' or 'none'"
            )
        found.append(path)
    return found


def saved_sites(model: nn.Module, config: LoraConfig) -> list[str]:
    """The modules `modules_to_save` replaces (PEFT ignores names that match nothing, and so do we)."""
    found = [p for p, _ in model.named_modules() if config.is_saved(p)]
    for p in found:
        inner = [q for q in found if q.startswith(p + ".")]
        if inner:
            raise InvalidConfigError(
                f"modules_to_save={config.modules_to_save!r} selects both {p!r} and {inner[0]!r}, which is inside it; "
                "name only the outer module (its copy includes the inner one)"
            )
    return found


def token_sites(model: nn.Module, config: LoraConfig) -> dict[str, list[int]]:
    """Embedding path -> token ids whose rows `trainable_token_indices` replaces, as PEFT resolves it
    (a list: the input embedding; a dict: the modules whose path ends with each key). On a base whose
    output head shares the input embedding's weight, the head gets the same rows (PEFT ties them)."""
    tokens = config.trainable_token_indices
    if not tokens:
        return {}
    embedding = model.get_input_embeddings()
    modules = dict(model.named_modules())
    by_name = {next(p for p, m in modules.items() if m is embedding): tokens} if isinstance(tokens, list) else tokens
    found: dict[str, list[int]] = {}
    for name, ids in by_name.items():
        paths = [p for p in modules if p and p.endswith(name)]
        if not paths:
            raise InvalidConfigError(
                f"trainable_token_indices names {name!r}, which is no module of this "
                f"{type(model).__name__}; name its input embedding layer"
            )
        for p in paths:
            if not isinstance(modules[p], nn.Embedding):
                raise InvalidConfigError(
                    f"trainable_token_indices names {p!r}, a {type(modules[p]).__name__}; adapterzoo replaces rows of "
                    "embedding layers only (an output head tied to the input embedding follows it by itself)"
                )
            vocab = modules[p].num_embeddings
            if max(ids) >= vocab:
                raise InvalidConfigError(
                    f"trainable_token_indices for {p!r} has token {max(ids)}, but its vocabulary has {vocab} tokens"
                )
            found[p] = sorted(ids)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embedding_path = next(p for p, m in modules.items() if m is embedding)
    if head is not None and embedding_path in found and head.weight is embedding.weight:
        found[next(p for p, m in modules.items() if m is head)] = found[embedding_path]
    return found


def normalized(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A norm's output with weight 1 and bias 0, computed as the module computes it: a replaced
    norm's output is the base's plus this times the weight's change (plus the bias's)."""
    if isinstance(module, nn.LayerNorm):
        return F.layer_norm(x, module.normalized_shape, None, None, module.eps)
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if type(module).__name__.endswith("RMSNorm") and isinstance(eps, float):  # Llama's: in float32, then cast
        h = x.float()
        return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    raise InvalidConfigError(
        f"modules_to_save: adapterzoo cannot replace a {type(module).__name__} (it replaces "
        "linear layers, embeddings, LayerNorm and RMSNorm); leave it out of modules_to_save"
    )


def saved_shapes(module: nn.Module, site: str) -> dict[str, tuple]:
    """What a replaced module holds: its weight's and bias's changes from the base's."""
    if isinstance(module, nn.Embedding):
        shapes = {"embedding_delta": tuple(module.weight.shape)}
    elif is_linear(module):
        shapes = {"weight_delta": linear_dims(module)}
    elif isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm"):
        normalized(module, torch.zeros(1, 1, module.weight.shape[-1]))  # refuses a norm it cannot compute
        shapes = {"norm_weight": tuple(module.weight.shape)}
    else:
        raise InvalidConfigError(
            f"modules_to_save selects {site!r}, a {type(module).__name__}: adapterzoo replaces linear layers, "
            "embeddings and norms (LayerNorm, RMSNorm) per row; leave it out of modules_to_save"
        )
    if getattr(module, "bias", None) is not None:
        shapes["bias"] = tuple(module.bias.shape)
    return shapes


def _replace_weight(module: nn.Module, change: torch.Tensor) -> None:
    """module.weight + change, on a weight of its own (a tied head and embedding are untied first,
    as PEFT's copy of the module is)."""
    module.weight = nn.Parameter(module.weight.detach() + change.to(module.weight), requires_grad=False)


class Lora(AdapterType):
    name = "lora"
    Config = LoraConfig
    kind = "delta"
    # slot 0 (A, B, every extended tensor and scale all zero) adds exactly nothing: the core may run
    # this delta over a whole batch, slot 0 for other pools' rows (runtime.apply_delta)
    zero_slot_is_identity = True
    default_lr = 2e-3  # zoo.train's default (measured on SmolLM2, see README "Specialists")

    @classmethod
    def conformance_configs(cls):
        """Each code path once, on every tiny base (names that match nothing on a family are ignored,
        as PEFT ignores them): plain pools; per-site rank and scale; trained biases; replaced
        modules (a linear head, norms, an embedding); replaced token rows (tied to GPT-2's head)."""
        return [
            {},
            {
                "r": 4,
                "rank_pattern": {"v_proj|c_attn|value": 2},
                "alpha_pattern": {"q_proj|query": 16},
                "layers_to_transform": [1],
                "target_modules": ["q_proj", "v_proj", "c_attn", "query", "value"],
            },
            {"bias": "all", "lora_bias": True},
            {"modules_to_save": ["lm_head", "norm", "ln_f", "LayerNorm", "word_embeddings"]},
            {"trainable_token_indices": [4, 5, 6, 7, 50]},
        ]

    def sites(self, model, config):
        saved = saved_sites(model, config)
        lora = lora_sites(model, config)
        every = set(bias_sites(model, config, lora)) | set(lora) | set(saved) | set(token_sites(model, config))
        return [p for p, _ in model.named_modules() if p in every]  # model order

    def tensors(self, model, site, module, config):
        if config.is_saved(site):
            return saved_shapes(module, site)
        if config.trainable_token_indices:
            tokens = token_sites(model, config)
            if site in tokens:
                vocab = module.weight.shape[0] if isinstance(module, nn.Embedding) else linear_dims(module)[1]
                if isinstance(module, nn.Embedding):
                    return {"token_delta": tuple(module.weight.shape), "token_mask": (vocab,)}
                return {"tied_weight_delta": linear_dims(module), "token_mask": (vocab,)}
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
        # adapters with more than A and B get pools of their own, so plain LoRA pools keep their two matmuls
        return "extended" if config.extended else ""

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
        """A site of smaller rank (rank_pattern) keeps only its first r columns of A and rows of B; the
        listed tokens of trainable_token_indices are marked in their site's mask."""
        for site, ids in token_sites(model, config).items():
            tensors[site]["token_mask"][ids] = 1
        if not config.rank_pattern:
            return
        for site, ts in tensors.items():
            if "A" in ts:
                r = config.site_rank(site)
                ts["A"][:, r:] = 0
                ts["B"][r:, :] = 0

    def delta(self, x, y, w, training):
        scale = w["scale"][:, None, None]  # (n or 1, 1, 1)
        if w["variant"] == "":
            h = w.matmul(self._dropped(x, w, training), "A")  # (n, T, r): x @ A[slot] per row
            return w.matmul(h, "B") * scale  # (n, T, out)
        # extended adapters: a site holds what its pool's adapters have there (A and B, a bias, a replacement)
        module = w.module
        if isinstance(module, nn.Embedding):  # x holds token ids: each row looks them up in its own table
            ids = x.reshape(y.shape[0], y.shape[1])
            try:
                return w.lookup("embedding_delta", ids)
            except KeyError:  # replaced rows: the mask (never trained) keeps training to the listed tokens
                return w.lookup("token_delta", ids) * w.lookup("token_mask", ids).detach()[..., None]
        out = 0
        if module is not None and (isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")):
            try:
                out = normalized(module, x) * w["norm_weight"][:, None, :]
            except KeyError:  # only a trained bias here
                pass
        try:
            out = out + w.matmul(x, "weight_delta")  # (n, T, out): x @ (W' - W); PEFT's copy has no dropout
        except KeyError:
            pass
        try:  # a head tied to an embedding with replaced rows: only the listed tokens' logits change
            out = out + w.matmul(x, "tied_weight_delta") * w["token_mask"].detach()[:, None, :]
        except KeyError:
            pass
        try:
            h = w.matmul(w.matmul(self._dropped(x, w, training), "A"), "B")  # KeyError at once where no A
        except KeyError:
            h = None
        if h is not None:
            try:
                h = h + w["lora_bias"][:, None, :]
            except KeyError:
                pass
            out = out + h * scale
        try:
            out = out + w["bias"][:, None, :]  # (n, 1, out): the same shift for every token of a row
        except KeyError:
            pass
        if isinstance(out, int):  # nothing here (cannot happen for a site some adapter uses): no change
            return torch.zeros_like(y[:1])
        return out

    def fused_call(self, x, y, w, rows):
        # a decode step's y + delta in one kernel (runtime, adapterzoo/kernels): plain A and B only; an
        # extended pool (biases, replaced modules) runs `delta`
        if w.variant != "":
            return None
        return kernels.lora_call(x, y, w.stored("A"), w.stored("B"), w.stored("scale"), rows, w.slots)

    @staticmethod
    def _dropped(x: torch.Tensor, w, training: bool) -> torch.Tensor:
        """LoRA's dropout, on the input of A only (as PEFT's lora_dropout). On the CPU, when no row
        has any dropout, no mask is drawn (PEFT's `lora_dropout=0` is an `nn.Identity`): a mask of
        ones cost about 2% of a library training step. On an accelerator the mask is drawn anyway:
        asking whether the rates are all zero would wait for the device at every site."""
        rates = w["dropout"]
        if not training or (rates.device.type == "cpu" and not bool(rates.any())):
            return x
        keep = 1 - rates[:, None, None]
        return x * (torch.rand_like(x) < keep) / keep

    # PEFT's file format (adapterzoo.formats); the key and config mapping is in peft.py beside this file
    peft_types = _peft.PEFT_TYPES

    def from_peft(self, model, peft_config, state):
        return _peft.from_peft(model, peft_config, state)

    def to_peft(self, model, config, state):
        return _peft.to_peft(model, config, state)

    def merge(self, module, tensors, config, sign=1.0):
        with torch.no_grad():
            if "tied_weight_delta" in tensors:
                return  # the head shares the embedding's weight, where its rows are merged (embedding_delta)
            if "token_delta" in tensors:  # in place: a head tied to this embedding follows it, as in PEFT
                module.weight += sign * tensors["token_delta"].to(module.weight)
            if "embedding_delta" in tensors:
                _replace_weight(module, sign * tensors["embedding_delta"])
            if "weight_delta" in tensors:
                delta_w = sign * tensors["weight_delta"]
                _replace_weight(module, delta_w if isinstance(module, Conv1D) else delta_w.T)
            if "norm_weight" in tensors:
                _replace_weight(module, sign * tensors["norm_weight"])
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
                    module.bias = nn.Parameter(
                        torch.zeros(shift.shape, dtype=module.weight.dtype, device=module.weight.device),
                        requires_grad=False,
                    )
                module.bias += shift.to(module.bias)
