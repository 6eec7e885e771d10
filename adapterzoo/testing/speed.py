"""Decode-step cost of an adapter type against the base, for the conformance suite's smoke check
and for plugin authors comparing their type with LoRA (benchmarks/mixed_batch.py is the real one).

    from adapterzoo.testing.speed import decode_costs
    decode_costs({"lora": ("lora", {"r": 8}), "loha": ("loha", {"r": 8})})  # {"lora": 1.1, "loha": 1.2}

The shape is benchmarks/mixed_batch.py's decode step: many rows, one new token each, a KV cache
of some context, many distinct adapters in one batch. Cases run round-robin (a noisy neighbour
slows them all alike) and each is reported as its median over the base's median.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def _crop(cache, length: int) -> None:
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


def decode_costs(
    cases: dict[str, tuple[str, dict]],
    *,
    rows: int = 64,
    distinct: int = 16,
    context: int = 16,
    rounds: int = 7,
    zoo=None,
) -> dict[str, float]:
    """Best decode-step time of each case (label -> (type, config)) over the bare base's, in one zoo
    (default: a small seeded Llama, hidden 128, 2 layers, float32 on the CPU)."""
    from transformers import DynamicCache

    from .models import VOCAB, char_tokenizer, tiny_model

    if zoo is None:
        from adapterzoo import Zoo

        zoo = Zoo(tiny_model("llama", hidden=128), char_tokenizer(), device="cpu", dtype=torch.float32, slots=distinct)
    g = torch.Generator().manual_seed(0)
    ctx = torch.randint(4, VOCAB, (rows, context), generator=g)
    step = torch.randint(4, VOCAB, (rows, 1), generator=g)
    runs: dict[str, Callable[[], object]] = {}
    setups: dict[str, Callable[[], object]] = {}
    for case, (label, (type_name, config)) in enumerate({"base": (None, {}), **cases}.items()):
        names: list = [None] * rows
        if type_name is not None:  # adapter names are plain (labels may hold spaces)
            for i in range(distinct):
                zoo.add_adapter(f"speed-{case}-{i}", type_name, seed=i, trainable=False, **config)
            names = [f"speed-{case}-{i % distinct}" for i in range(rows)]
        with torch.inference_mode():
            plan = zoo.plan(names, training=False)
            cache = DynamicCache(config=zoo.model.config)
            prefill = zoo(ctx, None, plan=plan, cache=cache)
        length = cache.get_seq_length()
        mask = torch.cat([prefill.attention_mask, torch.ones(rows, 1, dtype=torch.long)], 1)
        runs[label] = lambda plan=plan, cache=cache, mask=mask: zoo(step, mask, plan=plan, cache=cache)
        setups[label] = lambda cache=cache, length=length: _crop(cache, length)
    times: dict[str, list[float]] = {label: [] for label in runs}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: a busy neighbour cannot stall an op waiting on its other threads
    try:
        with torch.inference_mode():
            for r in range(rounds + 1):  # the first round warms up
                for label, run in runs.items():
                    setups[label]()
                    start = time.perf_counter()
                    run()
                    if r:
                        times[label].append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    base = min(times["base"])
    return {label: min(ts) / base for label, ts in times.items() if label != "base"}


def decode_cost(type_name: str, config: dict | None = None, **kwargs) -> float:
    """One type's decode-step cost over the base's (see `decode_costs`)."""
    return decode_costs({type_name: (type_name, dict(config or {}))}, **kwargs)[type_name]
