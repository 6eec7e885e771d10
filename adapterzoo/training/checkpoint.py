"""Checkpoints of a training run, and the final save.

A checkpoint folder `step-NNNNNNNN/` holds `state.safetensors` (the adapters' tensors, the
optimizers' tensor state, best-so-far tensors, the torch RNG state) and `trainer.json` (the
version, the step, the run's signature, and per adapter its step, patience counter, optimizer
options and report). It is written into a temporary folder (each file synced) and renamed, then
`LATEST` names it; the last `keep` are kept. A run resumes only from a checkpoint whose signature
(adapters, examples by sha256, seeds, batch_size, grad_accum) equals its own.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import TrainingError
from ..storage import atomic_dir, atomic_write, read_json, read_safetensors, tensors_to_bytes
from .data import Item
from .job import Job, finite

if TYPE_CHECKING:  # pragma: no cover
    from ..zoo import Zoo

CHECKPOINT_VERSION = 1
_REPORT_FIELDS = (
    "examples",
    "tokens",
    "seconds",
    "best_eval",
    "best_step",
    "final_train_loss",
    "final_eval_loss",
    "stopped_early",
    "history",
)


def examples_sha256(items: list[Item]) -> str:
    """What the examples are, as trained on (token ids, token labels, class labels), in order."""
    data = json.dumps([[it.ids, it.labels, it.label] for it in items], separators=(",", ":"))
    return hashlib.sha256(data.encode()).hexdigest()


def signature(jobs: list[Job], **options: Any) -> dict[str, Any]:
    """What a resumed run must share with the run that wrote the checkpoint."""
    return {
        "adapters": [
            {
                "name": j.name,
                "type": j.adapter.type_name,
                "config": j.adapter.config.to_dict(),
                "examples": len(j.items),
                "examples_sha256": examples_sha256(j.items),
                "seed": j.seed,
                "parameters": [list(p.shape) for p in j.adapter.parameters()],
            }
            for j in jobs
        ],
        **{k: v for k, v in options.items()},
    }


def save_checkpoint(folder: Path, jobs: list[Job], signature: dict, keep: int) -> Path:
    """Write the jobs' state as `folder/step-NNNNNNNN` (never a nan/inf one), point `LATEST` at it,
    and keep the newest `keep` checkpoints."""
    step = max(j.step for j in jobs)
    if not all(finite(j.params) for j in jobs):  # never write a bad state
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {"rng.torch": torch.get_rng_state()}
    meta_jobs = []
    for k, j in enumerate(jobs):
        for i, p in enumerate(j.params):
            tensors[f"param.{k}.{i}"] = p.detach().cpu().contiguous()
            if j.best_state is not None:
                tensors[f"best.{k}.{i}"] = j.best_state[i].cpu().contiguous()
        opt = j.optimizer.state_dict()
        for i, state in opt["state"].items():
            for key, value in state.items():
                if torch.is_tensor(value):
                    tensors[f"opt.{k}.{i}.{key}"] = value.detach().cpu().contiguous().clone()
        meta_jobs.append(
            {
                "name": j.name,
                "step": j.step,
                "active": j.active,
                "bad_evals": j.bad_evals,
                "param_groups": opt["param_groups"],
                "non_tensor_state": {
                    str(i): {key: v for key, v in s.items() if not torch.is_tensor(v)} for i, s in opt["state"].items()
                },
                "report": {key: getattr(j.report, key) for key in _REPORT_FIELDS},
            }
        )
    record = {"version": CHECKPOINT_VERSION, "step": step, "signature": signature, "jobs": meta_jobs}
    name = f"step-{step:08d}"
    with atomic_dir(folder / name, replace=True) as tmp:  # each file synced before the rename and LATEST
        atomic_write(tmp / "state.safetensors", tensors_to_bytes(tensors))
        atomic_write(tmp / "trainer.json", json.dumps(record, indent=1, sort_keys=True).encode())
    atomic_write(folder / "LATEST", name.encode())
    for old in sorted(folder.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return folder / name


def latest_checkpoint(folder: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint in `folder` (what `LATEST` names), or None."""
    folder = Path(folder)
    pointer = folder / "LATEST"
    if not pointer.exists():
        return None
    path = folder / pointer.read_text().strip()
    return path if (path / "trainer.json").exists() else None


def _signature_diffs(saved: Any, current: dict) -> list[str]:
    """What differs between two signatures: top-level options by name, adapters' fields as
    "<field> of '<name>'" (so different examples of the same count are named as such)."""
    saved = saved if isinstance(saved, dict) else {}
    diffs = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if a == b:
            continue
        if (
            key == "adapters"
            and isinstance(a, list)
            and isinstance(b, list)
            and len(a) == len(b)
            and all(
                isinstance(x, dict) and isinstance(y, dict) and x.get("name") == y.get("name") for x, y in zip(a, b)
            )
        ):
            diffs += [
                f"{field_name} of {y['name']!r}"
                for x, y in zip(a, b)
                for field_name in sorted(set(x) | set(y))
                if x.get(field_name) != y.get(field_name)
            ]
        else:
            diffs.append(key)
    return diffs


def load_checkpoint(folder: Path, jobs: list[Job], signature: dict) -> int | None:
    """Put the latest checkpoint in `folder` into `jobs` (and the torch RNG); its step, or None when
    there is none. A checkpoint of another run is a `TrainingError` naming what differs."""
    path = latest_checkpoint(folder)
    if path is None:
        return None  # nothing to resume: start from the beginning
    record = read_json(path / "trainer.json")
    saved = json.loads(json.dumps(record.get("signature")))
    current = json.loads(json.dumps(signature))
    if saved != current:
        diffs = _signature_diffs(saved, current)
        raise TrainingError(
            f"the checkpoint in {path} was written by a different training run (it differs in: {', '.join(diffs)}); "
            "resume with the same adapters, data and options, or use another checkpoint_dir"
        )
    tensors = read_safetensors(path / "state.safetensors")
    with torch.no_grad():
        for k, (j, meta) in enumerate(zip(jobs, record["jobs"])):
            for i, p in enumerate(j.params):
                p.copy_(tensors[f"param.{k}.{i}"])
            j.adapter.mark_edited()
            if f"best.{k}.0" in tensors:
                j.best_state = [tensors[f"best.{k}.{i}"].clone() for i in range(len(j.params))]
            _load_optimizer(j, k, meta, tensors)
            j.step, j.active, j.bad_evals = meta["step"], meta["active"], meta["bad_evals"]
            r = meta["report"]
            for key in _REPORT_FIELDS:
                setattr(j.report, key, r[key])
            j.last_good = [p.detach().clone() for p in j.params]
    torch.set_rng_state(tensors["rng.torch"])
    return int(record["step"])


def _load_optimizer(j: Job, k: int, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for i_str, rest in meta["non_tensor_state"].items():
        state[int(i_str)] = dict(rest)
    prefix = f"opt.{k}."
    for key, value in tensors.items():
        if key.startswith(prefix):
            i_str, field_name = key[len(prefix) :].split(".", 1)
            state.setdefault(int(i_str), {})[field_name] = value
    # the state (moments, step counts) is the checkpoint's; the options (lr, weight_decay, betas,
    # ...) are this call's, as the optimizer was just made with them: a checkpoint's would override them
    j.optimizer.load_state_dict({"state": state, "param_groups": j.optimizer.state_dict()["param_groups"]})


def drop_checkpoint_of_step(folder: Path, step: int) -> Path | None:
    """Remove the latest checkpoint if it is the one of `step` (it holds a state that diverged), point
    `LATEST` at the one before it; returns the latest checkpoint left (or None)."""
    latest = latest_checkpoint(folder)
    if latest is not None and latest.name == f"step-{step:08d}":
        shutil.rmtree(latest, ignore_errors=True)
        older = sorted(p for p in folder.glob("step-*") if (p / "trainer.json").exists())
        if older:
            atomic_write(folder / "LATEST", older[-1].name.encode())
        else:
            (folder / "LATEST").unlink(missing_ok=True)
    return latest_checkpoint(folder)


def save_final(zoo: Zoo, name: str, target: Path, metadata: dict) -> Path:
    """Save to a temporary folder beside `target`, then rename it into place (replacing an old one)."""
    target = Path(target)
    with atomic_dir(target, replace=True) as tmp:
        zoo.save_adapter(name, tmp, metadata=metadata)
    return target
