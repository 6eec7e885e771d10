"""Fused delta kernels (adapterzoo/kernels) vs the eager deltas, in one process, alternating.

SmolLM2-135M (float32), 16 rows, 1 thread, CPU time; 4 adapters of each delta type. Batches: each
type alone (row i with adapter i % 4) and the six types mixed (row i with type i % 6). Two figures:

  deltas  every `apply_delta` call of one decode step recorded, then replayed, eager and fused
          alternately (the deltas' own time a step, without the base's ~120 ms of matmuls)
  steps   whole decode steps of a kept plan, eager and fused alternately, and base-only steps

ADAPTERZOO_KERNELS is switched between the two (kernels read it at every call). Medians over
--reps rounds; prints a table (docs/serving.md, "Fused delta kernels").

    python benchmarks/fused_deltas.py [--reps 9] [--no-steps]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from adapterzoo import Zoo
from adapterzoo import runtime as R

TYPES = {
    "lora": {"r": 8, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False},
    "houlsby": {},
    "bitfit": {},
    "adapterbias": {},
    "prefix": {"num_virtual_tokens": 16},
    "soft_prompt": {"num_virtual_tokens": 16},
}
ROWS = 16


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--no-steps", action="store_true", help="only the replayed deltas")
    args = ap.parse_args()
    torch.set_num_threads(1)
    zoo = Zoo.from_pretrained("smollm2", device="cpu", dtype=torch.float32, slots=16)
    for t, config in TYPES.items():
        for i in range(4):
            zoo.add_adapter(f"{t}-{i}", t, seed=i + 1, trainable=False, **config)
    kinds = list(TYPES)
    batches = {
        "base": [None] * ROWS,
        "mixed": [f"{kinds[i % 6]}-{(i // 6) % 4}" for i in range(ROWS)],
        **{t: [f"{t}-{i % 4}" for i in range(ROWS)] for t in ("lora", "houlsby", "bitfit", "adapterbias")},
    }
    ids = torch.randint(0, 40000, (ROWS, 24), generator=torch.Generator().manual_seed(0))
    states = {}
    for name, names in batches.items():
        with torch.inference_mode():
            out = zoo.forward(ids, adapters=names, cache=zoo.new_cache())
        states[name] = (out.plan, out.cache, out.attention_mask)

    def step(name):
        plan, cache, mask = states[name]
        mask = torch.cat([mask, torch.ones(ROWS, 1, dtype=mask.dtype)], 1)
        with torch.inference_mode():
            zoo.forward(torch.randint(0, 40000, (ROWS, 1)), mask, plan=plan, cache=cache)
        cache.crop(-1)  # the same cache length at every step
        for layer in cache.layers:
            layer.views = (layer.keys, layer.values)  # still its room: no copy into new room next step (zoo.py)

    original = R.apply_delta
    calls: dict[str, list] = {}

    def recording(name):
        def apply(use, tensors, x, y, *a, **k):
            calls[name].append((use, tensors, x.clone(), y.clone(), a, k))
            return original(use, tensors, x, y, *a, **k)

        return apply

    delta_batches = [b for b in batches if b != "base"]
    for name in delta_batches:
        step(name)
        step(name)  # the plan's second step on: the kept-plan path
        calls[name] = []
        R.apply_delta = recording(name)
        step(name)
        R.apply_delta = original

    def replay(name):
        with torch.inference_mode():
            for use, tensors, x, y, a, k in calls[name]:
                original(use, tensors, x, y, *a, **k)

    def timed(fn, name, repeat=5):
        fn(name)
        start = time.process_time()
        for _ in range(repeat):
            fn(name)
        return (time.process_time() - start) / repeat * 1000

    deltas = {(b, k): [] for b in delta_batches for k in "01"}
    steps = {(b, k): [] for b in batches for k in "01"}
    for r in range(args.reps):
        for name in batches:
            for k in "01" if r % 2 == 0 else "10":
                os.environ["ADAPTERZOO_KERNELS"] = k
                if name != "base":
                    deltas[(name, k)].append(timed(replay, name))
                if not args.no_steps:
                    steps[(name, k)].append(timed(step, name))
    os.environ.pop("ADAPTERZOO_KERNELS")

    def med(d, key):
        return statistics.median(d[key])

    print(f"{'batch':12s} {'calls':>5s} {'deltas eager':>12s} {'fused ms':>9s}", end="")
    print("" if args.no_steps else f" {'step eager/base':>15s} {'fused/base':>10s}")
    for name in delta_batches:
        print(
            f"{name:12s} {len(calls[name]):5d} {med(deltas, (name, '0')):12.2f} {med(deltas, (name, '1')):9.2f}", end=""
        )
        if not args.no_steps:
            ratios = [med(steps, (name, k)) / med(steps, ("base", k)) for k in "01"]
            print(f" {ratios[0]:15.3f} {ratios[1]:10.3f}", end="")
        print()
    if not args.no_steps:
        print(f"base step {med(steps, ('base', '0')):.1f} / {med(steps, ('base', '1')):.1f} ms (eager / fused runs)")


if __name__ == "__main__":
    main()
