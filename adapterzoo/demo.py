"""The main job (`adapterzoo demo`): trained specialists on one frozen base, in one mixed batch.

`run_demo` loads the small LoRA specialists shipped in `adapterzoo/specialists/` (made by
`adapterzoo library build`, see that folder's README), gives each a held-out input of its task with
an instruction worded differently from training, and runs one mixed `generate`: every specialist's
row next to the bare base on the same input, plus rows routed with `adapters="auto"` (one task
prompt, one chat prompt that should fall back to the base). It then checks that each row equals
its solo run and that the base is unchanged.

`run_types_demo` (`adapterzoo demo --all-types`) is the earlier main job: one adapter of every
installed type, nudged off the identity with seeded noise, in one mixed forward and generate.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from . import plugins
from .base import base_state_checksum
from .zoo import Zoo

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Water boils at",
    "My favourite colour is",
    "The three primary colours are",
    "Once upon a time",
    "1, 2, 3, 4,",
    "The opposite of hot is",
]


def _nudge(zoo: Zoo, name: str, seed: int, scale: float) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in zoo.get_adapter(name).parameters():
            t.add_(torch.randn(t.shape, generator=g) * scale * (t.abs().mean() + 1e-2))


def run_types_demo(base: str = "smollm2", max_new_tokens: int = 16) -> int:
    console = Console()
    t0 = time.perf_counter()
    zoo = Zoo.from_pretrained(base)
    console.print(
        f"base {base!r} loaded in {time.perf_counter() - t0:.1f}s on {zoo.device} ({zoo.dtype}); "
        f"fingerprint {zoo.fingerprint.id}"
    )
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
    console.print(
        f"one mixed generate ({len(names)} rows x {max_new_tokens} tokens in {elapsed:.1f}s, greedy, KV cache):"
    )
    console.print(table)
    unchanged = base_state_checksum(zoo.model) == checksum
    console.print(f"base unchanged: {unchanged}; every row equals its solo run: {ok}")
    return 0 if ok and unchanged else 1


SPECIALISTS = Path(__file__).parent / "specialists"
#: Chat prompts no specialist fits (and not among routing.BACKGROUND_PROMPTS): "auto" should pick the base.
CHAT_PROMPTS = ["Can you suggest a name for my new cat?", "How do I get to the train station?"]
#: Held-out inputs per specialist (the base gets the same ones).
PER_TASK = 2


def run_demo(base: str = "smollm2", max_new_tokens: int = 16, specialists: str | Path | None = None) -> int:
    """Specialists solving their tasks next to the base failing them, "auto" rows, the checks."""
    from .formats.native import CONFIG_FILE
    from .library import finished
    from .tasks import get_task, instructed_examples, normalize

    console = Console()
    folder = Path(specialists) if specialists is not None else SPECIALISTS
    saved = sorted(p.parent for p in folder.glob(f"*/{CONFIG_FILE}") if finished(p.parent) is not None)
    if not saved:
        console.print(f"no specialists in {folder}; build some with `adapterzoo library build --out {folder}`")
        return 1
    t0 = time.perf_counter()
    zoo = Zoo.from_pretrained(base, device="cpu", slots=max(16, len(saved)))
    for path in saved:
        zoo.load_adapter(path.name, path)
    console.print(
        f"base {base!r} and {len(saved)} specialists loaded in {time.perf_counter() - t0:.1f}s; "
        f"fingerprint {zoo.fingerprint.id}"
    )
    checksum = base_state_checksum(zoo.model)

    # Held-out inputs, with instructions worded differently from training (tasks.HELD_OUT phrasings).
    tasks = {path.name: get_task(zoo.find_adapter(path.name).metadata.get("task", path.name)) for path in saved}
    names = list(tasks)
    tests = {n: instructed_examples(t, PER_TASK + 1, "test", seed=7, held_out=True) for n, t in tasks.items()}
    solved = [(n, ex) for n in names for ex in tests[n][:PER_TASK]]
    routed = [(n, tests[n][PER_TASK]) for n in names]
    prompts = [ex.prompt for _, ex in solved] * 2 + [ex.prompt for _, ex in routed] + CHAT_PROMPTS
    adapters: list[str | None] = (
        [n for n, _ in solved] + [None] * len(solved) + ["auto"] * (len(routed) + len(CHAT_PROMPTS))
    )
    first_auto = 2 * len(solved)
    decisions = zoo.route(prompts[first_auto:])

    t1 = time.perf_counter()
    texts = zoo.generate(prompts, adapters, max_new_tokens=max_new_tokens, stop=["\n"])
    elapsed = time.perf_counter() - t1
    console.print(
        f"one mixed generate: {len(prompts)} rows ({len(names)} specialists x {PER_TASK} held-out inputs, "
        f"the bare base on the same inputs, {len(routed) + len(CHAT_PROMPTS)} rows with adapters='auto') "
        f"in {elapsed:.1f}s, greedy, KV cache"
    )

    right = [normalize(texts[i]) == ex.expected for i, (_, ex) in enumerate(solved)]
    base_right = [normalize(texts[len(solved) + i]) == ex.expected for i, (_, ex) in enumerate(solved)]
    table = Table(
        "specialist",
        "first held-out prompt",
        "specialist answer",
        "base answer",
        f"right of {PER_TASK}: specialist / base",
    )
    for k, name in enumerate(names):
        i = k * PER_TASK
        expected = solved[i][1].expected
        table.add_row(
            name,
            solved[i][1].prompt,
            _mark(normalize(texts[i]), expected),
            _mark(normalize(texts[len(solved) + i]), expected),
            f"{sum(right[i : i + PER_TASK])} / {sum(base_right[i : i + PER_TASK])}",
        )
    console.print(table)
    console.print(f"specialists right on {sum(right)}/{len(right)} rows; the base on {sum(base_right)}/{len(right)}")

    table = Table("prompt", "should go to", "adapters='auto' chose", "score", "answer")
    named_right = 0
    for k, decision in enumerate(decisions):
        row = first_auto + k
        target = routed[k][0] if k < len(routed) else None
        named_right += decision.adapter == target
        if k < len(routed):
            answer = _mark(normalize(texts[row]), routed[k][1].expected)
        else:
            answer = texts[row].strip()[:40]
        table.add_row(
            prompts[row], target or "(the base)", decision.adapter or "(the base)", f"{decision.score:.2f}", answer
        )
    console.print(table)
    console.print(f"adapters='auto' chose the right one for {named_right}/{len(decisions)} prompts")

    ok = True
    for i, (prompt, adapter) in enumerate(zip(prompts, adapters)):
        alone = zoo.generate([prompt], [adapter], max_new_tokens=max_new_tokens, stop=["\n"])[0]
        if alone != texts[i]:
            ok = False
            console.print(f"row {i} ({adapter or 'base'}) differs from its solo run: {texts[i]!r} vs {alone!r}")
    unchanged = base_state_checksum(zoo.model) == checksum
    console.print(
        f"every row equals its solo run: {ok}; base unchanged: {unchanged}; total {time.perf_counter() - t0:.1f}s"
    )
    return 0 if ok and unchanged else 1


def _mark(answer: str, expected: str) -> str:
    return f"[green]{answer} ✓[/green]" if answer == expected else f"[red]{answer or '(nothing)'} ✗[/red]"
