"""Mixed-batch speed: adapterzoo vs the base alone vs PEFT's mixed batch, in one run.

On SmolLM2-135M (float32), two shapes:
  prefill: 16 rows x 32 tokens, 16 distinct adapters
  decode:  one step of 64 rows x 1 token (KV cache of 32 tokens), 64 distinct adapters
for LoRA r=8 on q_proj,v_proj (PEFT's `adapter_names=` mixed batch measured beside it) and for
each other type. Prefix and soft-prompt rows carry P virtual tokens, so they are also compared
with the base on the same total tokens (the base with P more tokens per row; in decode, P more
cached tokens). Prints ratios; writes benchmarks/results/mixed_batch.{json,png}.

    python benchmarks/mixed_batch.py [--rounds 5] [--types lora,houlsby,...] [--no-peft]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved_medians, machine, save_json  # noqa: E402

from adapterzoo import Zoo  # noqa: E402

TYPES = {
    "lora": {"r": 8, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False},
    "houlsby": {},  # default: bottleneck 32
    "bitfit": {},
    "adapterbias": {},
    "prefix": {"num_virtual_tokens": 16},
    "soft_prompt": {"num_virtual_tokens": 16},
}
SHAPES = {"prefill": (16, 32, 16), "decode": (64, 1, 64)}  # rows, new tokens, distinct adapters
CONTEXT = 32  # cached tokens before the decode step


def crop_to(cache, length: int) -> None:
    """Drop the tokens a timed decode step appended, so every step sees the same context."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


def build_zoo(types: list[str], max_adapters: int) -> Zoo:
    zoo = Zoo.from_pretrained("smollm2", device="cpu", dtype=torch.float32, slots=max_adapters)
    for type_name in types:
        for i in range(max_adapters):
            zoo.add_adapter(f"{type_name}-{i}", type_name, seed=i, trainable=False, **TYPES[type_name])
    return zoo


def build_peft(zoo: Zoo, n: int):
    from peft import LoraConfig, get_peft_model

    base = copy.deepcopy(zoo.model)
    base.config._attn_implementation = "sdpa"
    config = LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(base, config, adapter_name="p0")
    for i in range(1, n):
        model.add_adapter(f"p{i}", config)
    return model.eval()


def measure(zoo: Zoo, types: list[str], rounds: int, with_peft: bool) -> dict:
    from transformers import DynamicCache

    torch.manual_seed(0)
    results: dict = {}
    peft = build_peft(zoo, max(s[2] for s in SHAPES.values())) if with_peft else None
    base_model = copy.deepcopy(zoo.model)  # a plain HF model: what users would run without adapters
    base_model.config._attn_implementation = "sdpa"
    for shape, (rows, new, distinct) in SHAPES.items():
        ids = torch.randint(0, zoo.model.config.vocab_size, (rows, new))
        names = lambda t: [f"{t}-{i % distinct}" for i in range(rows)]  # noqa: E731
        cases, setup = {}, {}
        virtual = max((TYPES[t].get("num_virtual_tokens", 0) for t in types), default=0)

        if shape == "prefill":
            long_ids = torch.randint(0, zoo.model.config.vocab_size, (rows, new + virtual))
            cases["base"] = lambda: base_model(input_ids=ids)
            cases["base+P"] = lambda: base_model(input_ids=long_ids)
            cases["zoo(no adapter)"] = lambda: zoo(ids, None, [None] * rows)
            for t in types:
                cases[f"zoo {t}"] = lambda t=t: zoo(ids, None, names(t))
            if peft is not None:
                peft_names = [f"p{i % distinct}" for i in range(rows)]
                cases["peft lora"] = lambda: peft(input_ids=ids, adapter_names=peft_names)
        else:
            ctx = torch.randint(0, zoo.model.config.vocab_size, (rows, CONTEXT))
            ctx_long = torch.randint(0, zoo.model.config.vocab_size, (rows, CONTEXT + virtual))

            def cached(run_prefill, length):
                cache = DynamicCache(config=zoo.model.config)
                run_prefill(cache)
                return cache, length

            def plain_prefill(model, tokens, cache):
                model(input_ids=tokens, cache=cache, use_cache=True)

            base_cache, _ = cached(lambda c: plain_prefill(base_model, ctx, c), CONTEXT)
            base_long_cache, _ = cached(lambda c: plain_prefill(base_model, ctx_long, c), CONTEXT + virtual)
            pos = torch.full((rows, 1), CONTEXT)
            cases["base"] = lambda: base_model(input_ids=ids, cache=base_cache, use_cache=True, position_ids=pos)
            setup["base"] = lambda: crop_to(base_cache, CONTEXT)
            pos_long = torch.full((rows, 1), CONTEXT + virtual)
            cases["base+P"] = lambda: base_model(
                input_ids=ids, cache=base_long_cache, use_cache=True, position_ids=pos_long
            )
            setup["base+P"] = lambda: crop_to(base_long_cache, CONTEXT + virtual)
            for t in [None, *types]:
                label = "zoo(no adapter)" if t is None else f"zoo {t}"
                row_names = [None] * rows if t is None else names(t)
                plan = zoo.plan(row_names, training=False)
                cache = DynamicCache(config=zoo.model.config)
                prefill = zoo(ctx, None, plan=plan, cache=cache)
                mask = torch.cat([prefill.attention_mask, torch.ones(rows, 1, dtype=torch.long)], 1)
                length = prefill.attention_mask.shape[1]
                cases[label] = lambda plan=plan, cache=cache, mask=mask: zoo(ids, mask, plan=plan, cache=cache)
                setup[label] = lambda cache=cache, length=length: crop_to(cache, length)
            if peft is not None:
                peft_names = [f"p{i % distinct}" for i in range(rows)]
                peft_cache = DynamicCache(config=zoo.model.config)
                peft(input_ids=ctx, cache=peft_cache, use_cache=True, adapter_names=peft_names)
                cases["peft lora"] = lambda: peft(
                    input_ids=ids, cache=peft_cache, use_cache=True, position_ids=pos, adapter_names=peft_names
                )
                setup["peft lora"] = lambda: crop_to(peft_cache, CONTEXT)

        with torch.inference_mode():
            medians = interleaved_medians(cases, rounds=rounds, setup=setup)
        base = medians["base"]
        shape_result = {
            "rows": rows,
            "new_tokens": new,
            "distinct_adapters": distinct,
            "seconds": medians,
            "ratios": {},
        }
        print(f"\n{shape}: {rows} rows x {new} tokens, {distinct} distinct adapters (median of {rounds})")
        print(f"  {'case':22} {'seconds':>9} {'vs base':>8} {'vs base+P':>10} {'vs PEFT':>8}")
        for name, secs in medians.items():
            ratio = {"base": secs / base, "base+P": secs / medians["base+P"]}
            if "peft lora" in medians:
                ratio["peft"] = secs / medians["peft lora"]
            shape_result["ratios"][name] = ratio
            vs_peft = f"{ratio['peft']:.2f}x" if "peft" in ratio else ""
            print(f"  {name:22} {secs:9.4f} {ratio['base']:7.2f}x {ratio['base+P']:9.2f}x {vs_peft:>8}")
        results[shape] = shape_result
    return results


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4))
    for ax, (shape, r) in zip(axes, results.items()):
        names = list(r["ratios"])
        values = [r["ratios"][n]["base"] for n in names]
        colors = ["#888" if n.startswith("base") else "#c55" if n.startswith("peft") else "#37a" for n in names]
        ax.barh(names, values, color=colors)
        ax.axvline(1.0, color="k", lw=0.8)
        ax.axvline(1.1, color="k", lw=0.8, ls="--")
        ax.set_title(f"{shape}: {r['rows']} rows x {r['new_tokens']} tok, {r['distinct_adapters']} adapters")
        ax.set_xlabel("time / base model alone")
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--types", default=",".join(TYPES))
    parser.add_argument("--no-peft", action="store_true")
    args = parser.parse_args()
    types = [t for t in args.types.split(",") if t]
    zoo = build_zoo(types, max(s[2] for s in SHAPES.values()))
    results = measure(zoo, types, args.rounds, not args.no_peft)
    payload = {
        "machine": machine(),
        "base": "SmolLM2-135M-Instruct (float32)",
        "types": {t: TYPES[t] for t in types},
        "shapes": results,
        "command": "python benchmarks/mixed_batch.py " + " ".join(sys.argv[1:]),
    }
    json_path = save_json("mixed_batch", payload)
    plot(results, json_path.with_suffix(".png"))
    print(f"\nwrote {json_path} and {json_path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
