"""N adapters trained at once in one mixed batch vs the same N trained one after another.

Same adapters (same init), same data, same data order, same number of steps; the only difference
is whether step t of every adapter runs in one mixed batch (`zoo.train([a, b, ...], ...)`) or
each adapter runs its steps alone (`zoo.train(a, ...)`, then `zoo.train(b, ...)`, ...). PEFT has
no equivalent: its mixed batches (`adapter_names=`) are inference-only.

Reports the wall-time ratio for each N (median of `--rounds` runs of each, interleaved), and the
largest difference between the adapters the two ways produce (float noise only). Writes
benchmarks/results/train_many.{json,png}.

    python benchmarks/train_many.py [--n 1,2,4,8] [--steps 6] [--batch 4] [--types lora,houlsby,...]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import TRAINED_TYPES as TYPES  # noqa: E402
from common import machine, save_json

from adapterzoo import Zoo  # noqa: E402
from adapterzoo.tasks import all_tasks  # noqa: E402


def setup(zoo: Zoo, n: int, types: list[str], steps: int, batch: int, tag: str):
    """n fresh adapters (types cycled), each on its own word task."""
    tasks = [t for t in all_tasks().values() if t.kind == "word"][:n]
    names, data = [], []
    for i, task in enumerate(tasks):
        type_name = types[i % len(types)]
        name = f"{tag}-{i}-{type_name}"
        zoo.add_adapter(name, type_name, seed=i, **TYPES[type_name])
        names.append(name)
        data.append(task.examples(steps * batch, "train", seed=i))
    return names, data


def run(zoo: Zoo, n: int, types: list[str], steps: int, batch: int, together: bool, tag: str):
    names, data = setup(zoo, n, types, steps, batch, tag)
    options = dict(max_steps=steps, batch_size=batch, lr=1e-3, progress=False)
    start = time.perf_counter()
    if together:
        zoo.train(names, data, **options)
    else:
        for name, exs in zip(names, data):
            zoo.train(name, exs, **options)
    seconds = time.perf_counter() - start
    state = {name: [p.detach().clone() for p in zoo.get_adapter(name).parameters()] for name in names}
    for name in names:
        zoo.remove_adapter(name)
    return seconds, state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", default="1,2,4,8", help="numbers of adapters to compare")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4, help="rows per adapter per step")
    parser.add_argument("--types", default=",".join(TYPES), help="adapter types, cycled over the N adapters")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--base", default="smollm2")
    parser.add_argument("--out", default="train_many", help="results file name under benchmarks/results/")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    types = [t for t in args.types.split(",") if t]
    ns = [int(x) for x in args.n.split(",")]
    zoo = Zoo.from_pretrained(args.base, device="cpu", dtype=torch.float32, slots=max(16, max(ns)))
    run(zoo, 1, types, 2, args.batch, True, "warmup")  # first-call costs out of the way
    results = {}
    for n in ns:
        times = {"together": [], "one_by_one": []}
        diff = 0.0
        for r in range(args.rounds):
            for mode in ("together", "one_by_one"):  # interleaved, so a noisy neighbour hits both alike
                seconds, state = run(zoo, n, types, args.steps, args.batch, mode == "together", f"{mode}{r}")
                times[mode].append(seconds)
                if mode == "together":
                    joint = state
                else:
                    for (_a, xs), (_b, ys) in zip(joint.items(), state.items()):
                        diff = max(diff, max(float((x - y).abs().max()) for x, y in zip(xs, ys)))
        together, alone = statistics.median(times["together"]), statistics.median(times["one_by_one"])
        results[n] = {
            "together_s": together,
            "one_by_one_s": alone,
            "speedup": alone / together,
            "max_abs_diff": diff,
            "times": times,
        }
        print(
            f"N={n:3}: together {together:7.1f}s  one by one {alone:7.1f}s  speedup {alone / together:5.2f}x  "
            f"max |difference| {diff:.1e}",
            flush=True,
        )
    payload = {
        "machine": machine(),
        "base": args.base,
        "types": types,
        "steps": args.steps,
        "batch_per_adapter": args.batch,
        "results": results,
        "command": "python benchmarks/train_many.py " + " ".join(sys.argv[1:]),
    }
    path = save_json(args.out, payload)
    plot(results, path.with_suffix(".png"), args)
    print(f"wrote {path} and {path.with_suffix('.png')}")


def plot(results: dict, path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = list(results)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(ns, [results[n]["one_by_one_s"] for n in ns], "o-", color="#c55", label="one after another")
    ax.plot(ns, [results[n]["together_s"] for n in ns], "o-", color="#37a", label="all at once (one mixed batch)")
    for n in ns:
        ax.annotate(
            f"{results[n]['speedup']:.1f}x",
            (n, results[n]["together_s"]),
            textcoords="offset points",
            xytext=(0, -14),
            ha="center",
            fontsize=8,
        )
    ax.set_xlabel("adapters trained")
    ax.set_ylabel("wall time (s)")
    ax.set_title(f"{args.steps} steps x {args.batch} rows per adapter, SmolLM2-135M (CPU)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
