"""The main job (`adapterzoo demo`): every adapter type in one mixed batch on one frozen base.

It attaches one adapter of each installed type, nudged off the identity with seeded noise (a
stand-in for training, so every row visibly differs from the base), runs one mixed forward and
one mixed `generate`, and checks each row against the same row run alone.
"""

from __future__ import annotations

import time

import torch
from rich.console import Console
from rich.table import Table

from . import plugins
from .base import base_state_checksum
from .zoo import Zoo

PROMPTS = [
    "The capital of France is", "def fibonacci(n):", "Water boils at", "My favourite colour is",
    "The three primary colours are", "Once upon a time", "1, 2, 3, 4,", "The opposite of hot is",
]


def _nudge(zoo: Zoo, name: str, seed: int, scale: float) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in zoo.get_adapter(name).parameters():
            t.add_(torch.randn(t.shape, generator=g) * scale * (t.abs().mean() + 1e-2))


def run_demo(base: str = "smollm2", max_new_tokens: int = 16) -> int:
    console = Console()
    t0 = time.perf_counter()
    zoo = Zoo.from_pretrained(base)
    console.print(f"base {base!r} loaded in {time.perf_counter() - t0:.1f}s on {zoo.device} ({zoo.dtype}); "
                  f"fingerprint {zoo.fingerprint.id}")
    checksum = base_state_checksum(zoo.model)
    names: list[str | None] = []
    for i, type_name in enumerate(sorted(plugins.adapter_types())):
        extra = {"num_virtual_tokens": 8} if zoo.adapter_type(type_name).facts.virtual_tokens else {}
        zoo.add_adapter(f"demo-{type_name}", type_name, seed=i, trainable=False, **extra)
        _nudge(zoo, f"demo-{type_name}", seed=i, scale=0.5)
        names.append(f"demo-{type_name}")
    names.append(None)
    prompts = (PROMPTS * 2)[: len(names)]

    tok = zoo.tokenizer
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.inference_mode():
        mixed = zoo(enc["input_ids"], enc["attention_mask"], names).logits
        bare = zoo(enc["input_ids"], enc["attention_mask"], [None] * len(names)).logits
    table = Table("row", "adapter", "type", "max |logit - base|", "next token")
    for i, name in enumerate(names):
        last = int(enc["attention_mask"][i].nonzero().max())
        diff = (mixed[i, last] - bare[i, last]).abs().max().item()
        kind = zoo.adapters[name].type if name else "(base)"
        table.add_row(str(i), name or "-", kind, f"{diff:.3f}", repr(tok.decode(mixed[i, last].argmax())))
    console.print("one mixed forward, every row with its own adapter:")
    console.print(table)

    t1 = time.perf_counter()
    texts = zoo.generate(prompts, names, max_new_tokens=max_new_tokens)
    elapsed = time.perf_counter() - t1
    ok = True
    table = Table("row", "adapter", "prompt", "continuation", "= alone?")
    for i, (name, prompt, text) in enumerate(zip(names, prompts, texts)):
        alone = zoo.generate([prompt], [name], max_new_tokens=max_new_tokens)[0]
        same = alone == text
        ok &= same
        table.add_row(str(i), name or "-", prompt, repr(text), "yes" if same else f"NO: {alone!r}")
    console.print(f"one mixed generate ({len(names)} rows x {max_new_tokens} tokens in {elapsed:.1f}s, greedy, KV cache):")
    console.print(table)
    unchanged = base_state_checksum(zoo.model) == checksum
    console.print(f"base unchanged: {unchanged}; every row equals its solo run: {ok}")
    return 0 if ok and unchanged else 1
