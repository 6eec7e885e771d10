"""Joins inside the decode step (serve/ragged.py) against joins in a prefill of their own, A/B.

The same engine code either way: `Engine(join_in_step=...)`, a fresh engine per burst, the two
interleaved round by round in one process. Two workloads:

- `burst`: benchmarks/vs_vllm.py's main shape (64 requests at once over 64 LoRA adapters or none,
  `max_tokens` 8-56, batch 16);
- `mixed`: issue 9's mixed-types workload at the engine (no HTTP): `--adapters` adapters of all six
  types (benchmarks/serve.py's configs), Zipf, `--clients` closed-loop clients, 16 tokens each,
  against the same clients asking for the base.

Reports tokens per second of wall time and per CPU second of this process (with one thread,
`ADAPTERZOO_THREADS=1`, CPU time is the work done, whatever else the box runs), TTFT p50, and
the ratios. Writes results/join_in_step.json. Not part of CI.

    .venv/bin/python benchmarks/join_in_step.py --workload burst --rounds 3
    ADAPTERZOO_THREADS=1 .venv/bin/python benchmarks/join_in_step.py --workload mixed --rounds 3
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `adapterzoo serve` does
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def burst(zoo, jobs, names, join_in_step: bool) -> dict:
    from adapterzoo.serve import Engine, SamplingParams

    engine = Engine(
        zoo, max_batch=16, max_queue=len(jobs) + 1, prefix_cache_bytes=256 * 2**20, join_in_step=join_in_step
    )
    engine.start()
    try:
        wall, cpu = time.perf_counter(), time.process_time()
        handles = [
            engine.submit(ids, names[a] if names else None, SamplingParams(max_tokens=n, ignore_eos=True))
            for ids, a, n in jobs
        ]
        results = [h.result(3600) for h in handles]
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        stats = engine.stats()
    finally:
        engine.stop()
    return _summary(results, wall, cpu, stats)


def closed_loop(zoo, names, clients: int, per_client: int, seed: int, join_in_step: bool) -> dict:
    from serve import PROMPTS

    from adapterzoo.serve import Engine, SamplingParams

    rng = random.Random(seed)
    weights = [1 / (k + 1) ** 1.1 for k in range(len(names))]
    plans = [[(rng.choice(PROMPTS), rng.choices(names, weights)[0]) for _ in range(per_client)] for _ in range(clients)]
    engine = Engine(zoo, max_batch=16, max_queue=256, join_in_step=join_in_step).start()
    results = []

    def client(plan):
        for prompt, name in plan:
            results.append(engine.submit(prompt, name, SamplingParams(max_tokens=16, ignore_eos=True)).result(600))

    threads = [threading.Thread(target=client, args=(plan,)) for plan in plans]
    try:
        wall, cpu = time.perf_counter(), time.process_time()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        stats = engine.stats()
    finally:
        engine.stop()
    return _summary(results, wall, cpu, stats)


def _summary(results, wall: float, cpu: float, stats: dict) -> dict:
    failed = [r.error for r in results if r.error is not None]
    if failed:
        raise SystemExit(f"{len(failed)} requests failed, the first: {failed[0]}")
    tokens = sum(r.completion_tokens for r in results)
    return {
        "tok_per_s": tokens / wall,
        "tok_per_cpu_s": tokens / cpu,
        "ttft_p50": statistics.median(r.ttft for r in results),
        "joined_in_step": stats["joined_in_step"],
        "steps": stats["steps"],
        "ids": [list(r.token_ids) for r in results],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", choices=["burst", "mixed"], default="burst")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--adapters", type=int, default=320, help="mixed: adapters of the six types")
    ap.add_argument("--clients", type=int, default=16, help="mixed: closed-loop clients")
    ap.add_argument("--per-client", type=int, default=2, help="mixed: requests per client per round")
    args = ap.parse_args()
    import torch
    from common import machine, save_json

    from adapterzoo import Zoo
    from adapterzoo.base import gguf_as_safetensors, resolve_source

    systems: dict[str, callable] = {}
    if args.workload == "burst":
        import tempfile

        import vs_vllm

        folder = gguf_as_safetensors(Path(resolve_source("smollm2")))
        zoo = Zoo.from_pretrained(str(folder), dtype=torch.float32, slots=16)
        tmp = tempfile.TemporaryDirectory()
        vs_vllm.make_peft_adapters(folder, 64, Path(tmp.name))
        for i in range(64):
            zoo.load_adapter(f"a{i}", Path(tmp.name) / f"a{i}")
        jobs = vs_vllm.workload(zoo.tokenizer, 64, 64)
        lora = [f"a{i}" for i in range(64)]
        for case, names in (("lora", lora), ("base", None)):
            for flag in (True, False):
                systems[f"{case} {'in step' if flag else 'apart'}"] = lambda n=names, f=flag, r=0: burst(
                    zoo, jobs, n, f
                )
    else:
        import serve

        zoo, by_type = serve.build_mixed(args.adapters)
        everything = [n for names in by_type.values() for n in names]
        for case, names in (("mixed", everything), ("base", [None])):
            for flag in (True, False):
                systems[f"{case} {'in step' if flag else 'apart'}"] = lambda r, n=names, f=flag: closed_loop(
                    zoo, n, args.clients, args.per_client, r, f
                )
    runs: dict[str, list[dict]] = {s: [] for s in systems}
    next(iter(systems.values()))(r=99)  # warm-up: pools, hooks, packed weights
    for r in range(args.rounds):
        for name, fn in systems.items():
            out = fn(r=r)
            runs[name].append(out)
            print(
                f"round {r + 1} {name:14} {out['tok_per_s']:6.1f} tok/s  {out['tok_per_cpu_s']:6.1f} tok/CPU-s  "
                f"TTFT p50 {out['ttft_p50']:.2f}s  joined in step {out['joined_in_step']}  "
                f"load {os.getloadavg()[0]:.1f}",
                flush=True,
            )
    summary = {
        name: {k: statistics.median(x[k] for x in rs) for k in ("tok_per_s", "tok_per_cpu_s", "ttft_p50")}
        for name, rs in runs.items()
    }
    print(f"\n{'system':16} {'tok/s':>7} {'tok/CPU-s':>10} {'TTFT p50':>9}   (medians of {args.rounds} rounds)")
    for name, m in summary.items():
        print(f"{name:16} {m['tok_per_s']:7.1f} {m['tok_per_cpu_s']:10.1f} {m['ttft_p50']:8.2f}s")
    cases = sorted({name.split()[0] for name in summary})
    ratios = {}
    for case in cases:
        on, off = summary[f"{case} in step"], summary[f"{case} apart"]
        ratios[case] = {k: on[k] / off[k] for k in on}
        same = all(a["ids"] == b["ids"] for a, b in zip(runs[f"{case} in step"], runs[f"{case} apart"]))
        ratios[case]["same_tokens"] = same if args.workload == "burst" else None
        print(
            f"{case}: in step / apart  tok/s {ratios[case]['tok_per_s']:.2f}x  tok/CPU-s "
            f"{ratios[case]['tok_per_cpu_s']:.2f}x  TTFT p50 {ratios[case]['ttft_p50']:.2f}x"
            + (f"  same tokens: {same}" if args.workload == "burst" else "")
        )
    if "mixed" in cases:
        for flag in ("in step", "apart"):
            m, b = summary[f"mixed {flag}"], summary[f"base {flag}"]
            print(
                f"mixed / base, joins {flag}: {m['tok_per_s'] / b['tok_per_s']:.2f}x wall, "
                f"{m['tok_per_cpu_s'] / b['tok_per_cpu_s']:.2f}x CPU"
            )
    for rs in runs.values():
        for x in rs:
            x.pop("ids")
    payload = {"command": " ".join(sys.argv), "machine": machine(), "summary": summary, "ratios": ratios, "runs": runs}
    print(f"wrote {save_json('join_in_step' + ('' if args.workload == 'burst' else '_mixed'), payload)}")


if __name__ == "__main__":
    main()
