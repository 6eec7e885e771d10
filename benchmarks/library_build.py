"""The library build before and after the faster training step: same specialists, less time.

Builds the 8 shipped specialists' group (adapterzoo/specialists/README.md: LoRA r=4 on q/k/v/o of
layers 20-29, 8 rows per adapter per step, lr 5e-3, seed 0) once per way, into temporary folders,
and prints each task's held-out exact match and each build's wall time:

- "old step": one right-padded forward per step, logits at every position (as before);
- "new step": the default (answer-column logits, forwards of similar length): the same loss;
- "new + bf16": and `autocast="bfloat16"` (opt-in; not the same loss to the last bit).

    python benchmarks/library_build.py [--steps 20] [--n-test 30] [--ways "old step,new step,new + bf16"]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch

from adapterzoo import Zoo
from adapterzoo.library import build_library
from adapterzoo.training import loop

TASKS = "reverse,upper,double,rotate-left,rotate-right,pair-swap,digits-reverse,digits-sort".split(",")
CONFIG = {
    "r": 4,
    "lora_alpha": 8,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "layers_to_transform": list(range(20, 30)),
}
WAYS = {  # (LOGITS_AT_ANSWERS_ONLY, FORWARD_OVERHEAD_TOKENS, autocast)
    "old step": (False, 10**9, None),
    "new step": (True, loop.FORWARD_OVERHEAD_TOKENS, None),
    "new + bf16": (True, loop.FORWARD_OVERHEAD_TOKENS, "bfloat16"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--n-test", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ways", default=",".join(WAYS), help="Comma-separated subset of: " + ", ".join(WAYS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    zoo = Zoo.from_pretrained("smollm2")
    results = {}
    for way in args.ways.split(","):
        answers_only, overhead, autocast = WAYS[way]
        loop.LOGITS_AT_ANSWERS_ONLY, loop.FORWARD_OVERHEAD_TOKENS = answers_only, overhead
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            entries = build_library(
                zoo,
                TASKS,
                out,
                config=CONFIG,
                steps=args.steps,
                n_test=args.n_test,
                lr=5e-3,
                autocast=autocast,
                progress=False,
                echo=lambda _: None,
            )
            seconds = time.perf_counter() - start
        train_seconds = entries[0].seconds
        results[way] = {
            "seconds": seconds,
            "train_seconds": train_seconds,
            "exact_match": {e.task: e.exact_match for e in entries},
        }
        print(
            f"{way}: {seconds:.0f} s ({train_seconds:.0f} s training), load average {os.getloadavg()[0]:.2f}",
            flush=True,
        )
    print("\n| task | " + " | ".join(results) + " |\n|---|" + "---:|" * len(results))
    for task in TASKS:
        print(f"| {task} | " + " | ".join(f"{r['exact_match'][task]:.2f}" for r in results.values()) + " |")
    print(
        "| mean | " + " | ".join(f"{statistics.mean(r['exact_match'].values()):.3f}" for r in results.values()) + " |"
    )
    print(
        "| build s (training s) | "
        + " | ".join(f"{r['seconds']:.0f} ({r['train_seconds']:.0f})" for r in results.values())
        + " |"
    )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
