"""Shared bits of the benchmarks: timing by interleaved rounds and medians, result files."""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"

# the configs the training benchmarks give each type (LoRA on every linear layer)
TRAINED_TYPES = {
    "lora": {"r": 8, "lora_alpha": 16, "target_modules": "all-linear"},
    "houlsby": {"bottleneck": 32},
    "bitfit": {},
    "adapterbias": {},
    "prefix": {"num_virtual_tokens": 16},
    "soft_prompt": {"num_virtual_tokens": 16},
}


def interleaved_medians(
    cases: dict[str, Callable[[], object]],
    rounds: int,
    warmup: int = 1,
    setup: dict[str, Callable[[], object]] | None = None,
) -> dict[str, float]:
    """Median seconds per case. Cases run round-robin, so a noisy neighbour hits them all alike.

    `setup[name]`, when given, runs before each timed call of that case, outside the timing
    (e.g. cropping a KV cache back to its starting length).
    """
    setup = setup or {}
    times: dict[str, list[float]] = {name: [] for name in cases}
    for r in range(warmup + rounds):
        for name, fn in cases.items():
            if name in setup:
                setup[name]()
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            if r >= warmup:
                times[name].append(elapsed)
    return {name: statistics.median(ts) for name, ts in times.items()}


def machine() -> dict[str, object]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }


def save_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, sort_keys=True))
    return path
