"""Training: one adapter, or many at once in one mixed batch.

    report = zoo.train("caesar", examples, epochs=3, lr=2e-3, eval_examples=held_out, patience=2)
    report = zoo.train(["a", "b", "c"], [examples_a, examples_b, examples_c], max_steps=200)
    report = zoo.train("caesar", examples, options=TrainOptions(epochs=3, lr=2e-3))

One idea per module, read in this order:

- `options`: `TrainOptions`, every option with its default and its check;
- `data`: examples to token ids (`tokenize`), and token ids to mixed batches (`collate`);
- `job`: one adapter in a run (its data order, optimizer, best state, report) and its own loss;
- `loop`: `train()` and one optimizer step of every adapter;
- `evaluate`: `evaluate`, `score_task` and the metric (exact match, accuracy, eval loss);
- `checkpoint`: save, load, the latest one, the run's signature, and the final save;
- `report`: `TrainReport`, `AdapterReport`, `StepInfo` and the progress bar;
- `cli`: the `adapterzoo train | eval | tasks | library` commands.

Checkpoints (`checkpoint_dir`) let `resume=True` continue bit for bit as if the run had never
stopped; `save_to` writes the final adapters only at the very end, and only finite ones, so
nothing half-trained or diverged ever sits under the final name (docs/training.md).
"""

from ..lazy import lazy_names

# Loaded on first use (PEP 562), so `adapterzoo.training.cli` imports without torch: the
# `adapterzoo` command sets OpenMP's wait policy before torch loads (adapterzoo/cli.py).
_LAZY = {
    "CHECKPOINT_VERSION": ".checkpoint",
    "latest_checkpoint": ".checkpoint",
    "save_final": ".checkpoint",
    "evaluate": ".evaluate",
    "score_task": ".evaluate",
    "lr_factor": ".loop",
    "train": ".loop",
    "FALLBACK_LR": ".options",
    "METRICS": ".options",
    "SCHEDULES": ".options",
    "TrainOptions": ".options",
    "default_lr": ".options",
    "AdapterReport": ".report",
    "StepInfo": ".report",
    "TrainReport": ".report",
}


__getattr__, __dir__ = lazy_names(__name__, _LAZY)


__all__ = [
    "CHECKPOINT_VERSION",
    "FALLBACK_LR",
    "METRICS",
    "SCHEDULES",
    "AdapterReport",
    "StepInfo",
    "TrainOptions",
    "TrainReport",
    "default_lr",
    "evaluate",
    "latest_checkpoint",
    "lr_factor",
    "save_final",
    "score_task",
    "train",
]
