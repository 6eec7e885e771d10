"""A library of specialists: one adapter per generated task, trained many at once, scored, routable.

    adapterzoo library build --tasks all --type lora --out library/ --steps 100
    adapterzoo library build --tasks reverse,upper,digits-sort --out lib --push my-org --endpoint http://...

For each group of `--group-size` tasks, one mixed-batch training run (`zoo.train([...], [...])`)
trains their adapters together on instructed prompts (`adapterzoo.tasks.instructed_examples`,
the tasks' training phrasings). Each adapter is then scored on held-out test inputs whose
instructions are *paraphrased* (never seen in training), next to the bare base on the same inputs,
given routing examples (its training phrasings and five more ways to ask, `tasks.routing_examples`; see
adapterzoo/routing.py) and saved to
`OUT/<task>/`, its card metadata recording the task, its exact match and the base's.

Resumable: a task whose folder already holds a finished adapter is skipped, and a group cut off
mid-training resumes from its last checkpoint (`OUT/.checkpoints/`). `OUT/library.json` holds
the score table, rewritten (atomically) after every group.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import AdapterZooError
from .formats.native import CONFIG_FILE
from .storage import atomic_write, read_json

if TYPE_CHECKING:  # pragma: no cover
    from .zoo import Zoo

TABLE_FILE = "library.json"
DEFAULT_CONFIG = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}


@dataclass
class LibraryEntry:
    """One row of the score table."""

    task: str
    exact_match: float
    base_exact_match: float
    n_test: int
    steps: int
    seconds: float  # the group's training time, shared by its tasks


def select_tasks(spec: str) -> list[str]:
    """Task names from "all", "family:NAME", or a comma-separated list (checked)."""
    from .tasks import all_tasks, get_task

    spec = spec.strip()
    if spec == "all":
        return list(all_tasks())
    if spec.startswith("family:"):
        family = spec.split(":", 1)[1]
        names = [t.name for t in all_tasks().values() if t.family == family]
        if not names:
            families = sorted({t.family for t in all_tasks().values()})
            raise AdapterZooError(f"no tasks of family {family!r}; families: {', '.join(families)}")
        return names
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise AdapterZooError("no tasks given; use --tasks all, --tasks family:caesar or --tasks reverse,upper")
    for name in names:
        get_task(name)  # UnknownTaskError names the near misses
    return list(dict.fromkeys(names))


def finished(folder: Path) -> dict[str, Any] | None:
    """The library metrics of a finished adapter saved in `folder`, else None."""
    try:
        record = read_json(folder / CONFIG_FILE)
    except Exception:
        return None
    metrics = (record.get("metadata") or {}).get("metrics") or {}
    return metrics if "exact_match" in metrics and "base_exact_match" in metrics else None


def exact_match(zoo: Zoo, rows: Sequence[tuple[str | None, Any, list]], *, batch_size: int = 32) -> list[float]:
    """Exact match of each (adapter, task, examples), every row of every adapter in shared mixed batches."""
    flat = [(k, name, ex) for k, (name, _, exs) in enumerate(rows) for ex in exs]
    longest = max(len(zoo.tokenizer(ex.answer, add_special_tokens=False)["input_ids"]) for _, _, ex in flat)
    outputs: list[str] = []
    for start in range(0, len(flat), batch_size):
        chunk = flat[start : start + batch_size]
        outputs += zoo.generate(
            [ex.prompt for _, _, ex in chunk], [name for _, name, _ in chunk], max_new_tokens=longest + 2, stop=["\n"]
        )
    scores = []
    for k, (_, task, exs) in enumerate(rows):
        mine = [out for (j, _, _), out in zip(flat, outputs) if j == k]
        scores.append(float(task.score(mine, exs)))
    return scores


def build_library(
    zoo: Zoo,
    tasks: Sequence[str],
    out: str | Path,
    *,
    adapter_type: str = "lora",
    config: dict[str, Any] | None = None,
    steps: int = 100,
    batch_size: int = 8,
    group_size: int = 8,
    n_test: int = 50,
    lr: float | None = None,
    seed: int = 0,
    autocast: str | None = None,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> list[LibraryEntry]:
    """Train, score and save one adapter per task under `out`; returns the score table.

    `autocast="bfloat16"` trains under torch.autocast (`TrainOptions.autocast`; faster on a CPU
    with AMX, not the same loss to the last bit); scoring always runs in the base's own dtype."""
    from .routing import MAX_EXAMPLES
    from .tasks import get_task, instructed_examples, routing_examples
    from .training import save_final

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = dict(DEFAULT_CONFIG if config is None and adapter_type == "lora" else config or {})
    table = _read_table(out)
    todo = [t for t in tasks if finished(out / t) is None]
    for t in tasks:
        if t not in todo and t not in table:
            metrics = finished(out / t)
            table[t] = LibraryEntry(
                t,
                metrics["exact_match"],
                metrics["base_exact_match"],
                metrics.get("n_test", 0),
                metrics.get("steps", 0),
                metrics.get("seconds", 0.0),
            )
    if len(todo) < len(tasks):
        echo(f"{len(tasks) - len(todo)} of {len(tasks)} tasks already built in {out}; resuming with {len(todo)}")
    groups = [todo[i : i + group_size] for i in range(0, len(todo), group_size)]
    for g, group in enumerate(groups, 1):
        echo(f"group {g}/{len(groups)}: training {', '.join(group)} together ({steps} steps x {batch_size} rows each)")
        for name in group:
            if zoo.find_adapter(name) is not None:
                zoo.remove_adapter(name)
            zoo.add_adapter(name, adapter_type, seed=seed, **config)
        train = [instructed_examples(t, steps * batch_size, "train", seed=seed) for t in group]
        checkpoints = out / ".checkpoints" / group[0]
        start = time.perf_counter()
        zoo.train(
            list(group),
            train,
            max_steps=steps,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
            checkpoint_dir=checkpoints,
            checkpoint_every=max(1, steps // 4),
            resume=checkpoints.exists(),
            autocast=autocast,
            progress=progress,
        )
        seconds = time.perf_counter() - start
        tests = [instructed_examples(t, n_test, "test", seed=seed, held_out=True) for t in group]
        rows = [(name, get_task(name), exs) for name, exs in zip(group, tests)]
        rows += [(None, get_task(name), exs) for name, exs in zip(group, tests)]
        scores = exact_match(zoo, rows)
        for k, name in enumerate(group):
            entry = LibraryEntry(name, scores[k], scores[len(group) + k], n_test, steps, round(seconds, 1))
            zoo.add_routing_examples(name, routing_examples(name, MAX_EXAMPLES, seed=seed))
            task = get_task(name)
            metadata = {
                "task": name,
                "description": task.description,
                "metrics": {
                    "task": name,
                    "exact_match": entry.exact_match,
                    "base_exact_match": entry.base_exact_match,
                    "n_test": n_test,
                    "eval": "greedy exact match, held-out inputs, paraphrased instructions",
                    "steps": steps,
                    "batch_size": batch_size,
                    "autocast": autocast,
                    "seconds": entry.seconds,
                },
            }
            save_final(zoo, name, out / name, metadata)
            table[name] = entry
            echo(f"  {name:16} exact match {entry.exact_match:.2f} (base {entry.base_exact_match:.2f})")
        for name in group:
            zoo.remove_adapter(name)
        _write_table(out, table)
        _remove_tree(checkpoints)
    _write_table(out, table)
    return [table[t] for t in tasks if t in table]


def summary(entries: Sequence[LibraryEntry]) -> dict[str, float]:
    """min / median / max exact match over tasks, for the adapters and for the base."""
    if not entries:
        return {}
    ours = [e.exact_match for e in entries]
    base = [e.base_exact_match for e in entries]
    return {
        "tasks": len(entries),
        "min": min(ours),
        "median": statistics.median(ours),
        "max": max(ours),
        "base_min": min(base),
        "base_median": statistics.median(base),
        "base_max": max(base),
    }


def push_library(
    out: str | Path,
    org: str,
    *,
    endpoint: str | None = None,
    token: str | None = None,
    tasks: Sequence[str] | None = None,
    echo: Callable[[str], None] = print,
) -> list[str]:
    """Push every finished adapter under `out` to `ORG/<task>` (one commit each, with its card)."""
    from .hub import push_adapter_folder

    out = Path(out)
    names = list(tasks) if tasks is not None else sorted(p.parent.name for p in out.glob(f"*/{CONFIG_FILE}"))
    pushed = []
    for name in names:
        if finished(out / name) is None:
            continue
        info = push_adapter_folder(
            out / name, f"{org}/{name}", endpoint=endpoint, token=token, commit_message=f"adapterzoo library: {name}"
        )
        echo(f"pushed {name} to {org}/{name}: {info.oid}")
        pushed.append(f"{org}/{name}")
    return pushed


def _read_table(out: Path) -> dict[str, LibraryEntry]:
    try:
        rows = json.loads((out / TABLE_FILE).read_text())["tasks"]
        return {r["task"]: LibraryEntry(**r) for r in rows}
    except Exception:  # absent or from an older build: rebuilt from the adapters' cards
        return {}


def _write_table(out: Path, table: dict[str, LibraryEntry]) -> None:
    entries = list(table.values())
    data = {"summary": summary(entries), "tasks": [asdict(e) for e in entries]}
    atomic_write(out / TABLE_FILE, (json.dumps(data, indent=2) + "\n").encode())


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
