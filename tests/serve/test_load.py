"""Load test: 16 concurrent clients, 1,000 requests over 100 adapters of all six types with Zipf
popularity, a device pool of 16 slots per type, 32 adapters in host memory. No errors; every
response equals its adapter's solo generation; memory stays bounded."""

from __future__ import annotations

import random
import threading
import time

import httpx
import pytest

from adapterzoo import Zoo

from .conftest import make_adapters, start_serve

N_ADAPTERS, N_REQUESTS, CLIENTS, MAX_TOKENS = 100, 1000, 16, 6
PROMPTS = ["hello", "abc ->", "x y z", "the quick brown"]


def zipf_names(n_requests: int, names: list[str], s: float = 1.1, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    ranked = names[:]
    rng.shuffle(ranked)  # popularity does not follow the type
    weights = [1 / (k + 1) ** s for k in range(len(ranked))]
    return rng.choices(ranked, weights=weights, k=n_requests)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_zipf_load_over_100_adapters(tiny_base, tmp_path):
    names = [f"z{i:03d}" for i in range(N_ADAPTERS)]
    zoo = Zoo.from_pretrained(tiny_base, device="cpu", slots=16)
    make_adapters(zoo, tmp_path / "adapters", names)
    rng = random.Random(1)
    jobs = [(name, rng.choice(PROMPTS)) for name in zipf_names(N_REQUESTS, names)]
    expected = {}
    for name, prompt in sorted(set(jobs)):
        expected[name, prompt] = zoo.generate([prompt], [name], max_new_tokens=MAX_TOKENS)[0]
    server = start_serve(
        tiny_base,
        tmp_path / "server.log",
        "--adapters",
        str(tmp_path / "adapters"),
        "--slots",
        "16",
        "--max-host",
        "32",
        "--max-batch",
        "16",
        "--max-queue",
        "64",
    )
    try:
        rss_start = server.rss_kb()
        results: list[tuple[str, str, str]] = []
        errors: list[str] = []
        lock = threading.Lock()
        queue = list(enumerate(jobs))

        def client_loop():
            client = server.client("any", timeout=120)
            while True:
                with lock:
                    if not queue:
                        return
                    _, (name, prompt) = queue.pop()
                try:
                    r = client.completions.create(model=name, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
                    with lock:
                        results.append((name, prompt, r.choices[0].text))
                except Exception as exc:  # noqa: BLE001 - collected and reported
                    with lock:
                        errors.append(f"{name}: {type(exc).__name__}: {exc}")

        t0 = time.monotonic()
        threads = [threading.Thread(target=client_loop) for _ in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        elapsed = time.monotonic() - t0
        health = httpx.get(f"{server.url}/health").json()
        rss_end = server.rss_kb()
        metrics = httpx.get(f"{server.url}/metrics").text
    finally:
        server.stop()
    assert not errors, errors[:5]
    assert len(results) == N_REQUESTS
    wrong = [(n, p, t, expected[n, p]) for n, p, t in results if t != expected[n, p]]
    assert not wrong, wrong[:5]
    assert len({n for n, _, _ in results}) > 40  # many adapters really were asked for
    assert health["adapters"]["host"] <= 32
    assert health["adapters"]["device"] <= 16 * 6
    assert rss_end - rss_start < 400_000, (rss_start, rss_end)  # kB: bounded, no leak of caches or adapters
    assert "adapterzoo_adapter_evictions_total" in metrics
    print(
        f"\n{N_REQUESTS} requests, {CLIENTS} clients, {len({n for n, _, _ in results})} adapters: {elapsed:.1f}s "
        f"({N_REQUESTS / elapsed:.1f} req/s), RSS {rss_start // 1024} -> {rss_end // 1024} MiB"
    )
