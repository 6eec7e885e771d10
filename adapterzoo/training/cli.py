"""`adapterzoo train | eval | tasks`: train a specialist on a generated task, score it, list tasks.

    adapterzoo tasks
    adapterzoo train --base smollm2 --type lora --task caesar-3 --out out/caesar-3 --steps 150
    adapterzoo eval --base smollm2 --adapter out/caesar-3 --task caesar-3 --n 100
    adapterzoo eval --base smollm2 --task caesar-3           # the bare base, for comparison

Classification tasks (`adapterzoo tasks` lists them too) train an adapter with a head of as many
labels as the task has, e.g. `--base minilm --type houlsby --task vowel-bins`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from ..errors import AdapterZooError

TASK_HELP = "A task from `adapterzoo tasks` (generative, or classification for an adapter with a head)."


def _lookup_task(name: str):
    from ..tasks import UnknownTaskError, all_classification_tasks, get_task

    classification = all_classification_tasks()
    if name in classification:
        return classification[name], True
    try:
        return get_task(name), False
    except UnknownTaskError as exc:
        raise click.BadParameter(str(exc), param_hint="--task") from None


def _parse_config(pairs: tuple[str, ...]) -> dict[str, Any]:
    config: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not key=value (e.g. r=8)", param_hint="--config")
        try:
            config[key] = json.loads(value)
        except json.JSONDecodeError:
            config[key] = value  # a bare string, e.g. activation=relu
    return config


def _load_zoo(base: str, device: str | None, dtype: str | None):
    import torch

    from ..zoo import Zoo

    kwargs: dict[str, Any] = {}
    if device:
        kwargs["device"] = device
    if dtype:
        kwargs["dtype"] = getattr(torch, dtype)
    return Zoo.from_pretrained(base, **kwargs)


@click.command(name="tasks")
@click.option("--family", default=None, help="Only tasks of this family (e.g. caesar, perm, reorder).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def tasks_command(family: str | None, as_json: bool) -> None:
    """List the generated specialist tasks (and the classification tasks), with an example each."""
    from ..tasks import all_classification_tasks, all_tasks

    rows = []
    for task in all_tasks().values():
        if family and task.family != family:
            continue
        ex = task.examples(1, "train", seed=0)[0]
        rows.append(
            {
                "name": task.name,
                "family": task.family,
                "kind": task.kind,
                "description": task.description,
                "prompt": ex.prompt,
                "expected": ex.expected,
            }
        )
    for task in all_classification_tasks().values():
        if family and family != "classification":
            continue
        ex = task.examples(1, "train", seed=0)[0]
        rows.append(
            {
                "name": task.name,
                "family": "classification",
                "kind": task.kind,
                "description": task.description,
                "prompt": ex.text,
                "expected": task.labels[ex.label],
                "labels": list(task.labels),
            }
        )
    if not rows:
        raise click.ClickException(f"no tasks of family {family!r}")
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("task", "family", "input", "example", "description", title=f"{len(rows)} tasks")
    for r in rows:
        example = f"{r['prompt']}{' =>' if 'labels' in r else ''} {r['expected']}"
        table.add_row(r["name"], r["family"], r["kind"], example, r["description"])
    Console(width=160).print(table)


@click.command(name="train")
@click.option(
    "--base", default="smollm2", show_default=True, help="Base model: folder, Hub id, .gguf, 'smollm2' or 'minilm'."
)
@click.option("--type", "adapter_type", required=True, help="Adapter type (see `adapterzoo plugins`).")
@click.option("--task", required=True, help=TASK_HELP)
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder to save the trained adapter to (written only when training has finished).",
)
@click.option("--name", default=None, help="Adapter name (default: the task's name).")
@click.option(
    "--config",
    "-c",
    "config_pairs",
    multiple=True,
    metavar="KEY=VALUE",
    help="Adapter config, repeatable; values are JSON (r=8, target_modules='[\"q_proj\"]').",
)
@click.option(
    "--init-from",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Continue training a saved adapter (it must be of --type) instead of a new one.",
)
@click.option("--steps", type=int, default=None, help="Optimizer steps (default: --epochs over the data).")
@click.option("--epochs", type=int, default=1, show_default=True)
@click.option("--lr", type=float, default=None, help="Learning rate (default: the type's default_lr).")
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--grad-accum", type=int, default=1, show_default=True, help="Micro-batches per optimizer step.")
@click.option("--warmup", type=float, default=0.06, show_default=True, help="Warmup: fraction of steps (<1) or steps.")
@click.option("--schedule", type=click.Choice(["linear", "cosine", "constant"]), default="linear", show_default=True)
@click.option("--n-train", type=int, default=2000, show_default=True, help="Training examples generated from the task.")
@click.option("--n-eval", type=int, default=64, show_default=True, help="Held-out (val split) examples to evaluate on.")
@click.option("--eval-every", type=int, default=None, help="Evaluate every N steps (default: only at the end).")
@click.option("--patience", type=int, default=None, help="Early stopping: evaluations without improvement.")
@click.option("--checkpoint-dir", type=click.Path(file_okay=False, path_type=Path), default=None)
@click.option("--checkpoint-every", type=int, default=None, help="Steps between checkpoints (default: --eval-every).")
@click.option("--resume", is_flag=True, help="Continue from the latest checkpoint in --checkpoint-dir.")
@click.option("--seed", type=int, default=0, show_default=True, help="Adapter init, data and data order.")
@click.option(
    "--pooling",
    type=click.Choice(["mean", "cls", "last"]),
    default=None,
    help="Head pooling for classification tasks (default: mean; last on causal LMs).",
)
@click.option("--device", default=None, help="cpu, cuda, ... (default: cuda if available).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train_command(
    base: str,
    adapter_type: str,
    task: str,
    out: Path,
    name: str | None,
    config_pairs: tuple[str, ...],
    init_from: Path | None,
    steps: int | None,
    epochs: int,
    lr: float | None,
    batch_size: int,
    grad_accum: int,
    warmup: float,
    schedule: str,
    n_train: int,
    n_eval: int,
    eval_every: int | None,
    patience: int | None,
    checkpoint_dir: Path | None,
    checkpoint_every: int | None,
    resume: bool,
    seed: int,
    pooling: str | None,
    device: str | None,
    dtype: str | None,
    quiet: bool,
) -> None:
    """Train one adapter of --type on --task and save it to --out; prints base vs trained scores."""
    from rich.console import Console

    from .evaluate import score_task

    the_task, classify = _lookup_task(task)
    config = _parse_config(config_pairs)
    name = name or task
    console = Console(stderr=True, quiet=quiet, width=None if sys.stderr.isatty() else 120)
    try:
        zoo = _load_zoo(base, device, dtype)
        if init_from is not None:
            if config:
                raise click.UsageError("--config describes a new adapter; --init-from brings its own config")
            zoo.load_adapter(name, init_from, trainable=True)
        else:
            head = None
            if classify:
                head = {
                    "num_labels": len(the_task.labels),
                    "labels": list(the_task.labels),
                    "pooling": pooling or ("last" if zoo.is_causal_lm else "mean"),
                }
            zoo.add_adapter(name, adapter_type, seed=seed, head=head, **config)
        train_examples = the_task.examples(n_train, "train", seed=seed)
        eval_examples = the_task.examples(n_eval, "val", seed=seed) if n_eval > 0 else None
        before = None
        if eval_examples is not None and not classify:
            before = score_task(zoo, [None], the_task, eval_examples)[None]
        report = zoo.train(
            name,
            train_examples,
            eval_examples=eval_examples,
            epochs=epochs,
            max_steps=steps,
            lr=lr,
            batch_size=batch_size,
            grad_accum=grad_accum,
            warmup=warmup,
            schedule=schedule,
            eval_every=eval_every,
            patience=patience,
            checkpoint_dir=checkpoint_dir,
            checkpoint_every=checkpoint_every,
            resume=resume,
            seed=seed,
            adapter_type=adapter_type,
            save_to=out,
            progress=not quiet,
            metadata={"task": task, "base": base},
        )
    except AdapterZooError as exc:
        raise click.ClickException(str(exc)) from exc
    console.print(report.table())
    r = report[name]
    summary = {
        "adapter": name,
        "type": r.type,
        "task": task,
        "steps": r.steps,
        "tokens": r.tokens,
        "seconds": round(r.seconds, 2),
        "tokens_per_s": round(r.tokens_per_s, 1),
        "metric": r.metric,
        "base": before,
        "trained": r.best_eval,
        "saved": report.saved.get(name),
    }
    line = f"{task}: {r.metric} "
    line += f"base {before:.3f} -> " if before is not None else ""
    line += f"trained {r.best_eval:.3f}" if r.best_eval is not None else "trained (no eval)"
    click.echo(f"{line}; {r.steps} steps, {r.tokens_per_s:,.0f} tokens/s; saved to {report.saved.get(name)}")
    click.echo(json.dumps(summary))


@click.command(name="eval")
@click.option(
    "--base", default="smollm2", show_default=True, help="Base model: folder, Hub id, .gguf, 'smollm2' or 'minilm'."
)
@click.option(
    "--adapter",
    "adapter_dirs",
    multiple=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Saved adapter folder; repeat to score several in one mixed batch. None: the bare base.",
)
@click.option("--task", required=True, help=TASK_HELP)
@click.option("--n", type=int, default=100, show_default=True, help="Examples to score.")
@click.option("--split", type=click.Choice(["train", "val", "test"]), default="test", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--device", default=None)
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None)
@click.option("--json", "as_json", is_flag=True, help="Print JSON only.")
def eval_command(
    base: str,
    adapter_dirs: tuple[Path, ...],
    task: str,
    n: int,
    split: str,
    seed: int,
    batch_size: int,
    device: str | None,
    dtype: str | None,
    as_json: bool,
) -> None:
    """Score adapters (or the bare base) on a task: exact match, or accuracy for classification."""
    from .evaluate import score_task

    the_task, classify = _lookup_task(task)
    if n < 1:
        raise click.BadParameter("must be at least 1", param_hint="--n")
    try:
        zoo = _load_zoo(base, device, dtype)
        names: list[str | None] = []
        for folder in adapter_dirs:
            name = folder.resolve().name
            while name in zoo.adapters:
                name += "_"
            zoo.load_adapter(name, folder)
            names.append(name)
        examples = the_task.examples(n, split, seed=seed)
        scores = score_task(zoo, names or [None], the_task, examples, batch_size=batch_size)
    except AdapterZooError as exc:
        raise click.ClickException(str(exc)) from exc
    metric = "accuracy" if classify else "exact_match"
    rows = [
        {"adapter": str(folder) if folder else None, "task": task, "split": split, "n": n, metric: scores[name]}
        for folder, name in zip(adapter_dirs or (None,), names or [None])
    ]
    if as_json:
        click.echo(json.dumps(rows if len(rows) > 1 else rows[0]))
        return
    for row in rows:
        who = row["adapter"] or "base"
        click.echo(f"{who}: {metric} on {task} ({split}, n={n}) = {row[metric]:.3f}")


@click.group(name="library")
def library_command() -> None:
    """A library of specialists: one adapter per generated task (adapterzoo/library.py)."""


@library_command.command(name="build")
@click.option("--base", default="smollm2", show_default=True, help="Base model: folder, Hub id, .gguf, 'smollm2'.")
@click.option(
    "--tasks",
    "tasks_spec",
    default="all",
    show_default=True,
    help="'all', 'family:NAME' (e.g. family:caesar) or a comma-separated list of task names.",
)
@click.option("--type", "adapter_type", default="lora", show_default=True, help="Adapter type.")
@click.option(
    "--config",
    "-c",
    "config_pairs",
    multiple=True,
    metavar="KEY=VALUE",
    help="Adapter config, repeatable (default for lora: r=4, lora_alpha=8, q_proj and v_proj).",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder of the library: one sub-folder per task, plus library.json (the score table).",
)
@click.option("--steps", type=int, default=100, show_default=True, help="Optimizer steps per adapter.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Rows per adapter per step.")
@click.option("--group-size", type=int, default=8, show_default=True, help="Adapters trained together in one batch.")
@click.option("--n-test", type=int, default=50, show_default=True, help="Held-out test inputs scored per task.")
@click.option("--lr", type=float, default=None, help="Learning rate (default: the type's default_lr).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=int, default=None, help="torch threads (e.g. 1 to leave cores to others).")
@click.option(
    "--autocast",
    type=click.Choice(["bfloat16"]),
    default=None,
    help="Train under torch.autocast (faster on a CPU with AMX; not the same loss to the last bit).",
)
@click.option("--push", "push_org", default=None, help="After building, push every adapter to ORG/<task>.")
@click.option("--endpoint", default=None, help="Hub or registry URL for --push (default: $HF_ENDPOINT).")
@click.option("--token", default=None, help="Token for --push (default: $HF_TOKEN or the stored login).")
@click.option("--device", default=None, help="cpu, cuda, ... (default: cuda if available).")
@click.option("--dtype", default=None, type=click.Choice(["float32", "bfloat16", "float16"]))
@click.option("--quiet", is_flag=True, help="No progress bar.")
def library_build_command(
    base: str,
    tasks_spec: str,
    adapter_type: str,
    config_pairs: tuple[str, ...],
    out: Path,
    steps: int,
    batch_size: int,
    group_size: int,
    n_test: int,
    lr: float | None,
    seed: int,
    threads: int | None,
    autocast: str | None,
    push_org: str | None,
    endpoint: str | None,
    token: str | None,
    device: str | None,
    dtype: str | None,
    quiet: bool,
) -> None:
    """Train, score and save one specialist per task (resumable); print the score table."""
    import time

    from ..library import build_library, push_library, select_tasks, summary
    from ..tasks import UnknownTaskError

    if threads:
        import torch

        torch.set_num_threads(threads)
    try:
        names = select_tasks(tasks_spec)
    except (AdapterZooError, UnknownTaskError) as exc:
        raise click.BadParameter(str(exc), param_hint="--tasks") from None
    for key, value in (
        ("--steps", steps),
        ("--batch-size", batch_size),
        ("--group-size", group_size),
        ("--n-test", n_test),
    ):
        if value < 1:
            raise click.BadParameter(f"must be at least 1, got {value}", param_hint=key)
    config = _parse_config(config_pairs) if config_pairs else None
    start = time.perf_counter()
    try:
        zoo = _load_zoo(base, device, dtype)
        entries = build_library(
            zoo,
            names,
            out,
            adapter_type=adapter_type,
            config=config,
            steps=steps,
            batch_size=batch_size,
            group_size=group_size,
            n_test=n_test,
            lr=lr,
            seed=seed,
            autocast=autocast,
            progress=not quiet,
            echo=click.echo,
        )
    except AdapterZooError as exc:
        raise click.ClickException(str(exc)) from exc
    from rich.console import Console
    from rich.table import Table

    table = Table("task", "exact match", "base", "test inputs", title=f"library in {out}")
    for e in entries:
        table.add_row(e.task, f"{e.exact_match:.2f}", f"{e.base_exact_match:.2f}", str(e.n_test))
    Console(width=100).print(table)
    s = summary(entries)
    click.echo(
        f"{s['tasks']} tasks in {time.perf_counter() - start:.0f}s; exact match min {s['min']:.2f} / median "
        f"{s['median']:.2f} / max {s['max']:.2f} (base: {s['base_min']:.2f} / {s['base_median']:.2f} / "
        f"{s['base_max']:.2f})"
    )
    if push_org:
        try:
            pushed = push_library(out, push_org, endpoint=endpoint, token=token, tasks=names, echo=click.echo)
        except AdapterZooError as exc:
            raise click.ClickException(str(exc)) from exc
        click.echo(f"pushed {len(pushed)} adapters to {push_org}")
