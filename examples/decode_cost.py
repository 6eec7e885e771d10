"""Decode-step cost of the example plugins' types against LoRA and the base, in the decode shape
of benchmarks/mixed_batch.py: 64 rows x 1 new token, a KV cache of 32 tokens, 16 distinct
adapters of the type in the batch, SmolLM2-135M in float32 on the CPU (one thread). Cases run
round-robin; each is its best time over the base's (adapterzoo.testing.speed).

    python examples/decode_cost.py [--rounds 7] [--base smollm2]
"""

from __future__ import annotations

import argparse
import json

import torch

from adapterzoo import Zoo
from adapterzoo.testing.speed import decode_costs

QV = {"target_modules": ["q_proj", "v_proj"]}
CASES = {
    "lora r=8": ("lora", {"r": 8, "init_lora_weights": False, **QV}),
    "dora r=8": ("dora", {"r": 8, "init_lora_weights": False, **QV}),
    "loha r=8": ("loha", {"r": 8, "init_weights": False, **QV}),
    "lora r=32": ("lora", {"r": 32, "init_lora_weights": False, **QV}),
    "loha r=32": ("loha", {"r": 32, "init_weights": False, **QV}),
    "vera r=256": ("vera", {"r": 256, **QV}),
    "soft_prompt P=16": ("soft_prompt", {"num_virtual_tokens": 16}),
    "p_tuning MLP P=16": ("p_tuning", {"num_virtual_tokens": 16}),
    "p_tuning LSTM P=16": ("p_tuning", {"num_virtual_tokens": 16, "encoder_reparameterization_type": "LSTM"}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--base", default="smollm2")
    args = parser.parse_args()
    zoo = Zoo.from_pretrained(args.base, device="cpu", dtype=torch.float32, slots=16)
    costs = decode_costs(CASES, rows=64, distinct=16, context=32, rounds=args.rounds, zoo=zoo)
    print(f"decode step, 64 rows x 1 token, 16 adapters, {args.base} float32 CPU (best of {args.rounds} rounds)")
    print(f"  {'case':22} {'vs base':>8} {'vs LoRA r=8':>12}")
    for label, ratio in costs.items():
        print(f"  {label:22} {ratio:7.2f}x {ratio / costs['lora r=8']:11.2f}x")
    print(json.dumps({k: round(v, 3) for k, v in costs.items()}))


if __name__ == "__main__":
    main()
