"""PEFT references for the format tests: adapters made by PEFT itself, outputs computed by PEFT itself."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from adapterzoo.testing.models import output, tiny_model

peft = __import__("pytest").importorskip("peft")
from peft import LoraConfig, PeftModel, PrefixTuningConfig, PromptTuningConfig, TaskType, get_peft_model  # noqa: E402


def task(family: str):
    return TaskType.FEATURE_EXTRACTION if family == "bert" else TaskType.CAUSAL_LM


def peft_config(family: str, kind: str, **overrides):
    """A PEFT config of `kind` for `family` ("lora", "prefix", "prompt"), with non-trivial init."""
    if kind == "lora":
        overrides.setdefault("init_lora_weights", False)  # B random, so the adapter does something
        return LoraConfig(task_type=task(family), **overrides)
    if kind == "prefix":
        return PrefixTuningConfig(task_type=task(family), **overrides)
    if kind == "prompt":
        return PromptTuningConfig(task_type=task(family), **overrides)
    raise ValueError(kind)


def make_peft_adapter(folder: Path, family: str, kind: str, seed: int = 0, **overrides) -> Path:
    """Train nothing: create a PEFT adapter on the tiny base with PEFT, randomise it, save it with PEFT."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(tiny_model(family, 0), peft_config(family, kind, **overrides))
        if kind != "lora":  # PEFT initialises prompts and prefixes small; make them matter
            with torch.no_grad():
                for p in model.prompt_encoder.parameters():
                    p.normal_(0, 0.5)
        else:  # trained biases, modules to save and token rows start as the base's (or zero); make them matter
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if p.requires_grad and ("bias" in name or "lora_" not in name):
                        p.add_(torch.randn(p.shape) * 0.3)
        model.save_pretrained(folder)
    return folder


def peft_output(
    family: str, folder: Path, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """What PeftModel.from_pretrained on a fresh copy of the base gives, aligned with the input tokens."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(tiny_model(family, 0), folder).eval()
        with torch.no_grad():
            out = model(
                input_ids=input_ids,
                attention_mask=attention_mask if attention_mask is not None else torch.ones_like(input_ids),
            )
    result = out.logits if family != "bert" else out.last_hidden_state
    return result[:, -input_ids.shape[1] :]  # prompt tuning returns the virtual positions too


def inputs(batch: int = 2, length: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, 100, (batch, length), generator=torch.Generator().manual_seed(seed))


def assert_rows_match_alone(
    zoo, family: str, rows: list, seqs: list[torch.Tensor], folders: dict, atol: float, base=None
) -> None:
    """One left-padded batch of `seqs`, row i under adapter `rows[i]`: each row's output must equal
    that row run alone, through PEFT itself for the adapters in `folders` (name -> PEFT folder), through
    the zoo for the others, and through `base` (the zoo when None) for a bare-base row."""
    width = max(len(seq) for seq in seqs)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, seq in enumerate(seqs):  # left padding
        ids[i, width - len(seq) :] = seq
        mask[i, width - len(seq) :] = 1
    with torch.no_grad():
        batch = output(zoo(ids, mask, adapters=rows))
    for i, (name, seq) in enumerate(zip(rows, seqs)):
        if name in folders:
            alone = peft_output(family, folders[name], seq[None])
        else:
            with torch.no_grad():
                solo = base if name is None and base is not None else zoo
                alone = output(solo(seq[None], adapters=[name]))
        torch.testing.assert_close(batch[i, width - len(seq) :], alone[0], atol=atol, rtol=0, msg=f"row {i} ({name})")
