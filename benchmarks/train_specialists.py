"""Proof of learning: specialists of every type on tasks the base cannot do, scored exactly.

On SmolLM2-135M-Instruct (float32, CPU):

1. types: one adapter of each of the six built-in types trained on the same task (default
   `reverse`), a fixed number of steps each, at the type's default learning rate; exact match of
   greedy generations on held-out test inputs, for the bare base and for the trained adapter;
2. routing: 8 LoRA specialists on 8 word tasks that disagree on every input, trained all at once
   in one mixed batch (`zoo.train([...8 names...], [...8 datasets...])`), then every specialist
   scored on every task in mixed batches: an 8 x 8 matrix whose diagonal should be high and
   everything else low.

Writes benchmarks/results/train_specialists.json, train_specialists.png (base vs trained per type)
and routing.png (the matrix), and prints the markdown tables that go in the README.

    python benchmarks/train_specialists.py                 # both parts
    python benchmarks/train_specialists.py --skip-routing --types lora,prefix --steps 30
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, save_json  # noqa: E402
from common import TRAINED_TYPES as TYPES

from adapterzoo import Zoo  # noqa: E402
from adapterzoo.tasks import get_task  # noqa: E402
from adapterzoo.training import score_task  # noqa: E402

ROUTING_TASKS = ["reverse", "sort", "sort-desc", "rotate-left", "rotate-right", "pair-swap", "double", "upper"]


def train_types(zoo: Zoo, args) -> dict:
    task = get_task(args.task)
    train = task.examples(args.steps * args.batch_size, "train", seed=0)
    val = task.examples(args.n_val, "val", seed=0)
    test = task.examples(args.n_test, "test", seed=0)
    base = score_task(zoo, [None], task, test)[None]
    print(f"\n{args.task}: bare base exact match {base:.3f} on {len(test)} test inputs", flush=True)
    rows = {}
    for type_name in args.types:
        name = f"{type_name}-{args.task}"
        zoo.add_adapter(name, type_name, seed=0, **TYPES[type_name])
        step_times: list[float] = []
        last = [time.perf_counter()]

        def tick(info, step_times=step_times, last=last):
            now = time.perf_counter()
            step_times.append(now - last[0])
            last[0] = now

        start = time.perf_counter()
        report = zoo.train(
            name,
            train,
            eval_examples=val,
            max_steps=args.steps,
            batch_size=args.batch_size,
            eval_every=args.eval_every,
            progress=not args.quiet,
            on_step=tick,
        )
        seconds = time.perf_counter() - start
        r = report[name]
        trained = score_task(zoo, [name], task, test)[name]
        rows[type_name] = {
            "adapter": name,
            "config": TYPES[type_name],
            "parameters": zoo.get_adapter(name).num_parameters(),
            "lr": r.lr,
            "steps": r.steps,
            "seconds": round(seconds, 1),
            "median_step_s": round(statistics.median(step_times[1:] or step_times), 3),
            "tokens_per_s": round(r.tokens_per_s, 1),
            "final_train_loss": r.final_train_loss,
            "val_best": r.best_eval,
            "val_best_step": r.best_step,
            "base": base,
            "trained": trained,
            "history": r.history,
        }
        print(
            f"{type_name:12} {rows[type_name]['parameters']:>9,} params  lr {r.lr:g}  {r.steps} steps in "
            f"{seconds:.0f}s (median {rows[type_name]['median_step_s']}s/step)  base {base:.3f} -> {trained:.3f}",
            flush=True,
        )
    return {"task": args.task, "batch_size": args.batch_size, "n_test": len(test), "base": base, "types": rows}


def routing(zoo: Zoo, args) -> dict:
    tasks = [get_task(t) for t in args.routing_tasks]
    names = [f"r-{t.name}" for t in tasks]
    for i, name in enumerate(names):
        zoo.add_adapter(name, "lora", seed=i, **TYPES["lora"])
    data = [t.examples(args.routing_steps * args.routing_batch, "train", seed=1) for t in tasks]
    val = [t.examples(args.n_val, "val", seed=1) for t in tasks]
    start = time.perf_counter()
    report = zoo.train(
        names,
        data,
        eval_examples=val,
        max_steps=args.routing_steps,
        batch_size=args.routing_batch,
        progress=not args.quiet,
    )
    seconds = time.perf_counter() - start
    print(
        f"\nrouting: {len(names)} LoRA specialists trained at once, {args.routing_steps} steps of "
        f"{len(names)} x {args.routing_batch} rows, in {seconds:.0f}s",
        flush=True,
    )
    matrix = []
    base_row = []
    for task in tasks:  # one task at a time; every specialist (and the base) on its test inputs, mixed
        test = task.examples(args.n_routing_test, "test", seed=0)
        scores = score_task(zoo, [*names, None], task, test)
        matrix.append([scores[n] for n in names])
        base_row.append(scores[None])
    # matrix[j][k]: specialist k on task j -> transpose so rows are specialists
    by_adapter = [[matrix[j][k] for j in range(len(tasks))] for k in range(len(names))]
    diagonal = [by_adapter[k][k] for k in range(len(names))]
    off = [by_adapter[k][j] for k in range(len(names)) for j in range(len(tasks)) if j != k]
    print(
        f"diagonal mean {statistics.mean(diagonal):.3f} (min {min(diagonal):.3f}); off-diagonal mean "
        f"{statistics.mean(off):.3f} (max {max(off):.3f}); base mean {statistics.mean(base_row):.3f}",
        flush=True,
    )
    return {
        "tasks": args.routing_tasks,
        "adapters": names,
        "steps": args.routing_steps,
        "batch_per_adapter": args.routing_batch,
        "seconds": round(seconds, 1),
        "n_test": args.n_routing_test,
        "matrix": by_adapter,
        "base": base_row,
        "diagonal_mean": statistics.mean(diagonal),
        "off_diagonal_mean": statistics.mean(off),
        "off_diagonal_max": max(off),
        "val_best": {n: report[n].best_eval for n in names},
    }


def markdown(results: dict) -> str:
    lines = []
    if "types" in results:
        t = results["types"]
        lines += [
            f"Task `{t['task']}` (SmolLM2-135M-Instruct, float32, this CPU), exact match on {t['n_test']} "
            "held-out test inputs:",
            "",
            f"| type | trainable params | lr | steps (batch {t['batch_size']}) | time | base | trained |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for type_name, r in t["types"].items():
            lines.append(
                f"| {type_name} | {r['parameters']:,} | {r['lr']:g} | {r['steps']} | {r['seconds']:.0f} s | "
                f"{r['base']:.2f} | **{r['trained']:.2f}** |"
            )
    if "routing" in results:
        r = results["routing"]
        short = [n.removeprefix("r-") for n in r["adapters"]]
        lines += [
            "",
            f"Routing: {len(short)} LoRA specialists trained at once in one mixed batch "
            f"({r['steps']} steps of {len(short)} x {r['batch_per_adapter']} rows, {r['seconds']:.0f} s); "
            f"exact match of specialist (row) on task (column), {r['n_test']} test inputs each:",
            "",
            "| specialist \\ task | " + " | ".join(short) + " |",
            "|---|" + "---:|" * len(short),
        ]
        for k, name in enumerate(short):
            cells = [f"**{v:.2f}**" if j == k else f"{v:.2f}" for j, v in enumerate(r["matrix"][k])]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("| (base) | " + " | ".join(f"{v:.2f}" for v in r["base"]) + " |")
    return "\n".join(lines)


def plot(results: dict) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    if "types" in results:
        t = results["types"]
        names = list(t["types"])
        fig, ax = plt.subplots(figsize=(7, 3.6))
        xs = range(len(names))
        ax.bar([x - 0.2 for x in xs], [t["types"][n]["base"] for n in names], 0.4, label="bare base", color="#999")
        ax.bar([x + 0.2 for x in xs], [t["types"][n]["trained"] for n in names], 0.4, label="trained", color="#37a")
        for x, n in zip(xs, names):
            ax.text(
                x + 0.2, t["types"][n]["trained"] + 0.02, f"{t['types'][n]['trained']:.2f}", ha="center", fontsize=8
            )
        ax.set_xticks(list(xs), names)
        ax.set_ylim(0, 1.1)
        ax.set_ylabel("exact match (test)")
        ax.set_title(f"SmolLM2-135M, task '{t['task']}': one adapter of each type")
        ax.legend(loc="upper right", fontsize=8)
        fig.tight_layout()
        path = RESULTS / "train_specialists.png"
        fig.savefig(path, dpi=110)
        paths.append(path)
    if "routing" in results:
        r = results["routing"]
        short = [n.removeprefix("r-") for n in r["adapters"]]
        fig, ax = plt.subplots(figsize=(6.5, 5.5))
        im = ax.imshow(r["matrix"], vmin=0, vmax=1, cmap="viridis")
        for k in range(len(short)):
            for j in range(len(short)):
                v = r["matrix"][k][j]
                ax.text(j, k, f"{v:.2f}", ha="center", va="center", color="w" if v < 0.6 else "k", fontsize=8)
        ax.set_xticks(range(len(short)), short, rotation=45, ha="right")
        ax.set_yticks(range(len(short)), short)
        ax.set_xlabel("task")
        ax.set_ylabel("specialist (LoRA)")
        ax.set_title("exact match: specialist x task")
        fig.colorbar(im, ax=ax, fraction=0.046)
        fig.tight_layout()
        path = RESULTS / "routing.png"
        fig.savefig(path, dpi=110)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="reverse")
    parser.add_argument("--types", default=",".join(TYPES))
    parser.add_argument("--steps", type=int, default=80, help="optimizer steps per type")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--eval-every", type=int, default=None)
    parser.add_argument("--n-val", type=int, default=32)
    parser.add_argument("--n-test", type=int, default=100)
    parser.add_argument("--skip-types", action="store_true")
    parser.add_argument("--skip-routing", action="store_true")
    parser.add_argument("--routing-tasks", default=",".join(ROUTING_TASKS))
    parser.add_argument("--routing-steps", type=int, default=80)
    parser.add_argument("--routing-batch", type=int, default=4, help="rows per specialist per step")
    parser.add_argument("--n-routing-test", type=int, default=50)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--base", default="smollm2", help="base model (a folder works too, e.g. for a quick check)")
    args = parser.parse_args()
    args.types = [t for t in args.types.split(",") if t]
    args.routing_tasks = [t for t in args.routing_tasks.split(",") if t]
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    zoo = Zoo.from_pretrained(args.base, device="cpu", dtype=torch.float32, slots=16)
    results: dict = {
        "machine": machine(),
        "base": args.base,
        "command": "python benchmarks/train_specialists.py " + " ".join(sys.argv[1:]),
    }
    previous = RESULTS / "train_specialists.json"
    if previous.exists() and (args.skip_types or args.skip_routing):  # keep the part not re-run
        import json

        old = json.loads(previous.read_text())
        for key in ("types", "routing"):
            if key in old:
                results[key] = old[key]
    if not args.skip_types:
        results["types"] = train_types(zoo, args)
    if not args.skip_routing:
        results["routing"] = routing(zoo, args)
    path = save_json("train_specialists", results)
    pngs = plot(results)
    print("\n" + markdown(results))
    print(f"\nwrote {path} and {', '.join(str(p) for p in pngs)}")


if __name__ == "__main__":
    main()
