"""One library-build training step, before and after: where the time of `zoo.train` goes.

The library build (`adapterzoo library build`) trains groups of 8 LoRA specialists in one mixed
batch, 8 rows each. This times that step four ways, interleaved round by round (medians):

- "one forward": the 64 rows right-padded in one forward, logits at every position (the old path);
- "answer logits": left-padded so that the answers share the last columns, and only those columns
  projected onto the vocabulary (`logits_to_keep`);
- "length groups": the rows split into forwards of similar length (`data.length_groups`);
- "both": the default;
- "both + bf16": and `autocast="bfloat16"` (opt-in: not the same loss to the last bit).

    python benchmarks/train_step.py [--rounds 5] [--threads 1] [--steps 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from adapterzoo import Zoo
from adapterzoo.tasks import instructed_examples
from adapterzoo.training import loop

TASKS = "reverse,upper,double,rotate-left,rotate-right,pair-swap,digits-reverse,digits-sort".split(",")
CONFIG = dict(
    r=4,
    lora_alpha=8,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
    layers_to_transform=list(range(20, 30)),
)
WAYS = {  # (LOGITS_AT_ANSWERS_ONLY, FORWARD_OVERHEAD_TOKENS)
    "one forward": (False, 10**9),
    "answer logits": (True, 10**9),
    "length groups": (False, loop.FORWARD_OVERHEAD_TOKENS),
    "both": (True, loop.FORWARD_OVERHEAD_TOKENS),
    "both + bf16": (True, loop.FORWARD_OVERHEAD_TOKENS),
    "answer logits + bf16": (True, 10**9),
}


def step_seconds(zoo: Zoo, data: list, steps: int, seed: int, autocast: str | None = None) -> list[float]:
    """Seconds of each of `steps` training steps of the 8 adapters (fresh ones, the same each time)."""
    for t in TASKS:
        if zoo.find_adapter(t) is not None:
            zoo.remove_adapter(t)
        zoo.add_adapter(t, "lora", seed=0, **CONFIG)
    stamps = []
    start = time.perf_counter()
    zoo.train(
        TASKS,
        data,
        max_steps=steps,
        batch_size=8,
        lr=5e-3,
        seed=seed,
        progress=False,
        on_step=lambda info: stamps.append(time.perf_counter()),
        autocast=autocast,
    )
    return [b - a for a, b in zip([start] + stamps, stamps)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", default="1", help="torch threads; a list (1,2) also compares thread counts")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--ways", default=",".join(WAYS), help="Comma-separated subset of: " + ", ".join(WAYS))
    args = parser.parse_args()
    thread_counts = [int(t) for t in args.threads.split(",")]
    torch.set_num_threads(thread_counts[0])
    zoo = Zoo.from_pretrained("smollm2")
    data = [instructed_examples(t, 8 * args.steps, "train", seed=0) for t in TASKS]
    ways = {
        (f"{way}, threads={t}" if len(thread_counts) > 1 else way): (*WAYS[way], t)
        for way in args.ways.split(",")
        for t in thread_counts
    }
    times: dict[str, list[float]] = {way: [] for way in ways}
    step_seconds(zoo, data, 1, 0)  # warm-up
    for r in range(args.rounds):
        for way, (answers_only, overhead, threads) in ways.items():
            torch.set_num_threads(threads)
            loop.LOGITS_AT_ANSWERS_ONLY, loop.FORWARD_OVERHEAD_TOKENS = answers_only, overhead
            times[way] += step_seconds(zoo, data, args.steps, r, "bfloat16" if "bf16" in way else None)
        print(f"round {r + 1}: " + ", ".join(f"{w} {statistics.median(t):.2f}s" for w, t in times.items()), flush=True)
    base = statistics.median(next(iter(times.values())))
    print(f"threads {args.threads}, load average {os.getloadavg()[0]:.2f}; median seconds per step of 8 x 8 rows:")
    for way, t in times.items():
        print(f"  {way:24} {statistics.median(t):6.2f} s  ({base / statistics.median(t):.2f}x)")


if __name__ == "__main__":
    main()
