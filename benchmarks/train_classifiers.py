"""Encoders too: Houlsby, AdapterBias and BitFit (and LoRA) classifiers on all-MiniLM-L6-v2.

Each adapter carries its own classification head (`head={"num_labels": k}`), trained with it.
Trains one adapter per type on a generated classification task (default `vowel-bins`: how many
vowels a spaced word has, 4 balanced classes, so chance is 0.25), then scores the accuracy of all
of them on held-out test inputs in one mixed batch (each row through its own adapter and head).
Writes benchmarks/results/train_classifiers.{json,png}.

    python benchmarks/train_classifiers.py [--task vowel-bins] [--steps 150] [--types houlsby,bitfit,...]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, save_json  # noqa: E402

from adapterzoo import Zoo  # noqa: E402
from adapterzoo.tasks import get_classification_task  # noqa: E402
from adapterzoo.training import score_task  # noqa: E402

TYPES = {"houlsby": {"bottleneck": 32}, "adapterbias": {}, "bitfit": {}, "lora": {"r": 8, "lora_alpha": 16}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="vowel-bins")
    parser.add_argument("--types", default=",".join(TYPES))
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=None, help="default: each type's default_lr")
    parser.add_argument("--pooling", default="mean", choices=["mean", "cls"])
    parser.add_argument("--n-test", type=int, default=200)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--base", default="minilm")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    task = get_classification_task(args.task)
    types = [t for t in args.types.split(",") if t]
    zoo = Zoo.from_pretrained(args.base, device="cpu", dtype=torch.float32)
    head = {"num_labels": len(task.labels), "labels": list(task.labels), "pooling": args.pooling}
    train = task.examples(args.steps * args.batch_size, "train", seed=0)
    val = task.examples(64, "val", seed=0)
    test = task.examples(args.n_test, "test", seed=0)
    rows = {}
    names = []
    for i, type_name in enumerate(types):
        name = f"{type_name}-{args.task}"
        zoo.add_adapter(name, type_name, seed=i, head=head, **TYPES[type_name])
        before = score_task(zoo, [name], task, test)[name]  # a new adapter and its untrained head
        start = time.perf_counter()
        report = zoo.train(
            name,
            train,
            eval_examples=val,
            max_steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            eval_every=max(1, args.steps // 5),
            progress=not args.quiet,
        )
        seconds = time.perf_counter() - start
        r = report[name]
        rows[type_name] = {
            "adapter": name,
            "parameters": zoo.get_adapter(name).num_parameters(),
            "lr": r.lr,
            "before": before,
            "steps": r.steps,
            "seconds": round(seconds, 1),
            "tokens_per_s": round(r.tokens_per_s, 1),
            "val_best": r.best_eval,
            "final_train_loss": r.final_train_loss,
            "history": r.history,
        }
        names.append(name)
        print(
            f"{type_name:12} {rows[type_name]['parameters']:>8,} params (head included)  lr {r.lr:g}  "
            f"{r.steps} steps in {seconds:.0f}s  val accuracy {r.best_eval:.3f}",
            flush=True,
        )
    scores = score_task(zoo, names, task, test)  # every adapter, every test input: one mixed batch at a time
    for type_name, name in zip(types, names):
        rows[type_name]["test_accuracy"] = scores[name]
    chance = 1 / len(task.labels)
    print(
        f"\n{args.task} ({len(task.labels)} balanced classes, chance {chance:.2f}), test accuracy on {len(test)} "
        "inputs, all adapters scored in mixed batches:"
    )
    print(f"\n| type | params (with head) | lr | steps (batch {args.batch_size}) | time | before | trained |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for type_name, r in rows.items():
        print(
            f"| {type_name} | {r['parameters']:,} | {r['lr']:g} | {r['steps']} | {r['seconds']:.0f} s | "
            f"{r['before']:.2f} | **{r['test_accuracy']:.2f}** |"
        )
    payload = {
        "machine": machine(),
        "base": args.base,
        "task": args.task,
        "labels": list(task.labels),
        "chance": chance,
        "pooling": args.pooling,
        "batch_size": args.batch_size,
        "n_test": len(test),
        "types": rows,
        "command": "python benchmarks/train_classifiers.py " + " ".join(sys.argv[1:]),
    }
    path = save_json("train_classifiers", payload)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.4))
    ax.bar(types, [rows[t]["test_accuracy"] for t in types], color="#37a")
    ax.axhline(chance, color="k", ls="--", lw=0.8, label=f"chance ({chance:.2f})")
    for x, t in enumerate(types):
        ax.text(x, rows[t]["test_accuracy"] + 0.02, f"{rows[t]['test_accuracy']:.2f}", ha="center", fontsize=8)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("test accuracy")
    ax.set_title(f"all-MiniLM-L6-v2 + adapter + head, task '{args.task}'")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "train_classifiers.png", dpi=110)
    print(f"\nwrote {path} and {RESULTS / 'train_classifiers.png'}")


if __name__ == "__main__":
    main()
