"""What PEFT LoRA's extra config fields cost in a mixed batch, and what a replaced lm_head weighs.

On SmolLM2-135M (float32, CPU), 8 rows cycling over 2 adapters of one kind, each kind against the
bare base and plain LoRA (r=8 on q_proj, v_proj), interleaved round by round, medians:

  plain         LoRA r=8
  patterns      rank_pattern (v_proj r=4) + alpha_pattern: the plain pools, no extra work
  layers        layers_to_transform: the first half of the layers only
  lm_head       modules_to_save=["lm_head"]: one more (576 x 49152) matmul per row
  embed_tokens  modules_to_save=["embed_tokens"]: a lookup in each row's own table
  tokens        trainable_token_indices (100 tokens; SmolLM2's head is tied, so the head too)

for a prefill (8 rows x 16 tokens) and a one-token step (8 rows x 1 token, no cache: the
decode-shaped kernels). Also the memory: parameters per adapter and the bytes of each kind's pool
(slots + 1 copies of every tensor, allocated when the first adapter is placed). Writes
benchmarks/results/peft_lora_fields.json.

    python benchmarks/peft_lora_fields.py [--rounds 3] [--slots 4]
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved_medians, machine, save_json  # noqa: E402

from adapterzoo import Zoo  # noqa: E402

BASE = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False}
KINDS = {
    "plain": {},
    "patterns": {"rank_pattern": {"v_proj": 4}, "alpha_pattern": {"q_proj": 32}},
    "layers": {"layers_to_transform": list(range(15))},
    "lm_head": {"modules_to_save": ["lm_head"]},
    "embed_tokens": {"modules_to_save": ["embed_tokens"]},
    "tokens": {"trainable_token_indices": list(range(100))},
}
ROWS, TOKENS, DISTINCT = 8, 16, 2  # plain and patterns share a pool: 4 adapters, 4 slots


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--slots", type=int, default=2 * DISTINCT)
    args = parser.parse_args()
    torch.manual_seed(0)
    zoo = Zoo.from_pretrained("smollm2", slots=args.slots)
    for kind, extra in KINDS.items():
        for i in range(DISTINCT):
            zoo.add_adapter(f"{kind}{i}", "lora", seed=i, trainable=False, **BASE, **extra)
    prefill = torch.randint(10, 40000, (ROWS, TOKENS))
    step = prefill[:, :1]
    cases = {}
    for shape, ids in (("prefill", prefill), ("step", step)):
        cases[f"{shape}/base"] = lambda ids=ids: zoo(ids)
        for kind in KINDS:
            rows = [f"{kind}{i % DISTINCT}" for i in range(ROWS)]
            cases[f"{shape}/{kind}"] = lambda ids=ids, rows=rows: zoo(ids, adapters=rows)
    # garbage from the previous case (a replaced head's gathered weights are hundreds of MB) is
    # collected before each timed call, not inside the next one
    with torch.inference_mode():
        seconds = interleaved_medians(cases, rounds=args.rounds, setup={name: gc.collect for name in cases})
    memory = {}
    for kind in KINDS:
        adapter = zoo.get_adapter(f"{kind}0")
        pool = zoo.pools[adapter.pool_key]
        pool_bytes = sum(t.numel() * t.element_size() for ts in pool.tensors.values() for t in ts.values())
        memory[kind] = {"parameters": adapter.num_parameters(), "pool_mib": round(pool_bytes / 2**20, 1)}
    print(f"{'case':<24}{'ms':>9}{'x base':>9}{'x plain':>9}")
    for name, s in seconds.items():
        shape = name.split("/")[0]
        print(f"{name:<24}{s * 1e3:>9.1f}{s / seconds[f'{shape}/base']:>9.2f}{s / seconds[f'{shape}/plain']:>9.2f}")
    print(f"\n{'kind':<14}{'parameters':>12}{'pool MiB':>10}   (slots={args.slots})")
    for kind, m in memory.items():
        print(f"{kind:<14}{m['parameters']:>12,}{m['pool_mib']:>10}")
    path = save_json(
        "peft_lora_fields",
        {
            "machine": machine(),
            "rounds": args.rounds,
            "slots": args.slots,
            "rows": ROWS,
            "tokens": TOKENS,
            "distinct": DISTINCT,
            "seconds": seconds,
            "memory": memory,
        },
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
