"""The engine's thread count follows the cores neighbours leave free (serve/cpu.py)."""

from __future__ import annotations

import types

import pytest
import torch

from adapterzoo.serve import Engine, SamplingParams, cpu
from adapterzoo.serve.cpu import ThreadGovernor
from adapterzoo.testing.models import tiny_zoo


@pytest.fixture(autouse=True)
def keep_torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


class Machine:
    """A fake clock and CPU counters: `run(seconds, ours=cores, others=cores)` advances them."""

    def __init__(self, monkeypatch, cores: int, quota: float | None = None):
        self.now, self.ours, self.busy = 100.0, 0.0, 0.0
        clock = types.SimpleNamespace(monotonic=lambda: self.now, process_time=lambda: self.ours)
        monkeypatch.setattr(cpu, "time", clock)
        monkeypatch.setattr(cpu, "_busy_seconds", lambda cpus: self.busy)
        monkeypatch.setattr(cpu, "_cgroup_usage_seconds", lambda: self.busy)
        monkeypatch.setattr(cpu.os, "sched_getaffinity", lambda pid: set(range(cores)))
        monkeypatch.setattr(cpu, "cgroup_quota", lambda: quota)
        monkeypatch.delenv("ADAPTERZOO_THREADS", raising=False)

    def run(self, seconds: float, ours: float, others: float) -> None:
        self.now += seconds
        self.ours += seconds * ours
        self.busy += seconds * (ours + others)


def test_a_busy_neighbour_takes_one_thread_and_gives_it_back_when_it_stops(monkeypatch):
    machine = Machine(monkeypatch, cores=2)
    governor = ThreadGovernor(period=0.5)
    assert governor.start() == 2
    machine.run(0.6, ours=2.0, others=0.0)
    assert governor.tick() == 2 and torch.get_num_threads() == 2
    # a `while True: pass` beside us: while we oversubscribe, it shows as about half a core
    machine.run(0.6, ours=1.5, others=0.5)
    assert governor.tick() == 1 and torch.get_num_threads() == 1
    machine.run(0.6, ours=1.0, others=1.0)
    assert governor.tick() == 1
    machine.run(0.6, ours=1.0, others=0.05)  # it stopped; background noise takes no core
    assert governor.tick() == 2 and torch.get_num_threads() == 2


def test_heavy_load_leaves_one_thread_never_none(monkeypatch):
    machine = Machine(monkeypatch, cores=4)
    governor = ThreadGovernor(period=0.5)
    governor.start()
    machine.run(1.0, ours=0.5, others=3.5)
    assert governor.tick() == 1
    machine.run(1.0, ours=1.0, others=1.8)
    assert governor.tick() == 2


def test_the_count_is_resampled_only_once_a_period_has_passed(monkeypatch):
    machine = Machine(monkeypatch, cores=2)
    governor = ThreadGovernor(period=0.5)
    governor.start()
    machine.run(0.2, ours=1.0, others=1.0)
    assert governor.tick() == 2  # too soon to judge
    machine.run(0.4, ours=1.0, others=1.0)
    assert governor.tick() == 1


def test_a_cgroup_quota_caps_the_threads_below_the_affinity(monkeypatch):
    Machine(monkeypatch, cores=8, quota=2.5)
    assert cpu.usable_cores() == 2
    assert ThreadGovernor().start() == 2


def test_the_caller_thread_count_is_an_upper_bound(monkeypatch):
    Machine(monkeypatch, cores=8)
    assert ThreadGovernor(max_threads=3).start() == 3


def test_ADAPTERZOO_THREADS_fixes_the_count_and_a_bad_value_names_the_knob(monkeypatch):
    machine = Machine(monkeypatch, cores=2)
    monkeypatch.setenv("ADAPTERZOO_THREADS", "1")
    governor = ThreadGovernor()
    assert governor.start() == 1
    machine.run(1.0, ours=1.0, others=0.0)
    assert governor.tick() == 1  # fixed: load does not move it
    monkeypatch.setenv("ADAPTERZOO_THREADS", "many")
    with pytest.raises(ValueError, match="ADAPTERZOO_THREADS must be 'auto' or a positive integer"):
        ThreadGovernor()


def test_the_real_counters_read_on_this_machine():
    assert cpu.usable_cores() >= 1
    busy = cpu._busy_seconds(cpu.os.sched_getaffinity(0))
    assert busy is None or busy > 0


def test_the_engine_thread_runs_its_forwards_with_the_governors_count():
    zoo = tiny_zoo("llama")
    with Engine(zoo, max_batch=4) as engine:
        assert engine.generate("hello", max_tokens=3, timeout=60)
        seen = engine.call_between_steps(torch.get_num_threads).result(30)
        assert seen == engine.threads.threads >= 1
        assert engine.submit("abc", None, SamplingParams(max_tokens=2)).result(60).completion_tokens == 2
