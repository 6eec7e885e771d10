"""The in-memory cache shared by the commit reader and the model-card reader."""

from __future__ import annotations

from adapterzoo_registry.storage import BoundedCache


def test_a_value_is_computed_once_then_served_from_memory() -> None:
    cache: BoundedCache[str, int] = BoundedCache()
    calls: list[str] = []

    def compute() -> int:
        calls.append("a")
        return 1

    assert cache.get_or_compute("a", compute) == 1
    assert cache.get_or_compute("a", compute) == 1
    assert calls == ["a"]


def test_the_cache_is_emptied_once_it_grows_past_its_bound() -> None:
    cache: BoundedCache[int, int] = BoundedCache(max_entries=2)
    for key in range(3):
        cache.get_or_compute(key, lambda key=key: key)
    assert len(cache) == 3  # up to max_entries + 1 are kept, as before the cache was shared
    cache.get_or_compute(3, lambda: 3)
    assert len(cache) == 1
    recomputed: list[int] = []
    assert cache.get_or_compute(0, lambda: recomputed.append(0) or 0) == 0
    assert recomputed == [0]
