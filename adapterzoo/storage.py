"""Safe files: safetensors for tensors, JSON for the rest, never pickle; every write atomic.

These helpers know no adapter format: the layouts (adapterzoo's own, PEFT's, AdapterHub's) are in
adapterzoo/formats/, one module each, and use these to read and write their files. A file is
written to a temporary name in the same folder and then renamed over the old one, so a crash never
leaves a half-written file.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from .errors import AdapterFileError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temporary file and a rename: all or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(target: Path, *, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary folder beside `target` to fill; when the block succeeds, rename it to
    `target`, so `target` is either the whole new folder or what it was before.

    replace=True: an existing `target` is moved aside first, put back if the rename fails, and
    removed once the new folder is in place. replace=False: only an absent or empty `target` gives
    way; a non-empty one raises `OSError` (as when another process got there first) and is kept.
    On any error the temporary folder is removed.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        yield tmp
        _swap_in(tmp, target, replace)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_in(tmp: Path, target: Path, replace: bool) -> None:
    if not replace:
        if target.exists():
            target.rmdir()  # only an empty folder gives way; a full one raises OSError
        os.replace(tmp, target)
        return
    old = None
    try:
        if target.exists():
            old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
            os.replace(target, old / "x")
        os.replace(tmp, target)
    except BaseException:
        if old is not None and not target.exists() and (old / "x").exists():
            os.replace(old / "x", target)  # put the old folder back
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def tensors_to_bytes(state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    return save_safetensors_bytes({k: v.detach().to("cpu").contiguous() for k, v in state.items()}, metadata=metadata)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, or an `AdapterFileError` saying it is broken."""
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise AdapterFileError(f"{path} does not exist") from exc
    return parse_safetensors(data, path)


def parse_safetensors(data: bytes, path: Path) -> dict[str, torch.Tensor]:
    """The tensors in `data` (read from `path`), or an `AdapterFileError` saying it is broken."""
    try:
        return load_safetensors_bytes(data)
    except (SafetensorError, ValueError, RuntimeError, OSError) as exc:
        raise AdapterFileError(
            f"{path} is not a readable safetensors file ({exc}); it is probably truncated or corrupt: "
            "save or download it again"
        ) from exc


def read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise AdapterFileError(f"{path} does not exist") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterFileError(f"{path} is not valid JSON ({exc}); it is probably truncated: save it again") from exc
    if not isinstance(value, dict):
        raise AdapterFileError(f"{path} should hold a JSON object, not {type(value).__name__}")
    return value


def refuse_pickles(folder: Path, *, wanted: str = "safetensors", hint: str | None = None) -> None:
    """Refuse a folder holding pickle weights; `wanted` names the safetensors file it lacks and
    `hint` (a format's own way out) replaces the generic conversion advice."""
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES) if folder.is_dir() else []
    if pickles:
        hint = hint or (
            "Convert them with safetensors.torch.save_file(torch.load(path, weights_only=True), "
            "'adapter_model.safetensors') where you trust the file, and load the result."
        )
        raise AdapterFileError(
            f"{folder} holds pickle weights ({', '.join(pickles)}) and no {wanted}; adapterzoo refuses "
            f"pickle files because loading them can run arbitrary code. {hint}"
        )
