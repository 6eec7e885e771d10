"""`GET /api/models` over 10,000 repos: this registry vs the one before the listing index.

Each repo has a README with tags. Both servers serve the same root, as real subprocesses on
127.0.0.1; every round times each query on each server in turn (interleaved), and the report
gives medians and the ratio. The old server is the registry as of commit `--baseline`
(exported from git into a temporary folder), which read every repo from disk per request.

    python benchmarks/registry_listing.py --repos 10000 --rounds 5

Setup makes the repos through the registry's own Store, with fsync turned off in the setup
process only (10,000 durable creations would take minutes and measure the disk, not listing).
Writes results/registry_listing.json.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
TOKEN = "hf_bench_reader"
QUERIES = {
    "limit=10": {"limit": 10},
    "limit=10, cursor=5000": {"limit": 10, "cursor": 5000},
    "filter=tag, limit=10": {"filter": "topic-3", "limit": 10},
    "search, limit=10": {"search": "repo-09", "limit": 10},
    "sort=lastModified, limit=10": {"sort": "lastModified", "limit": 10},
}


def build_root(root: Path, repos: int) -> None:
    sys.path.insert(0, str(REPO_ROOT / "registry"))
    from adapterzoo_registry.storage import RepoId, Store

    real_fsync = os.fsync
    os.fsync = lambda fd: None  # setup only: see the module docstring
    try:
        store = Store(root)
        body = root / "body.ndjson"
        for index in range(repos):
            repo = RepoId(f"team{index % 50}", f"repo-{index:05d}")
            store.create_repo(repo, private=index % 7 == 0, author="bench")
            readme = f"---\nlibrary_name: adapterzoo\ntags: [adapterzoo, topic-{index % 10}]\n---\n# {repo}\n"
            lines = [
                {"key": "header", "value": {"summary": "card"}},
                {"key": "file", "value": {"path": "README.md", "content": base64.b64encode(readme.encode()).decode()}},
            ]
            body.write_bytes(b"".join(json.dumps(line).encode() + b"\n" for line in lines))
            store.commit(repo, "main", body, author="bench")
        body.unlink()
    finally:
        os.fsync = real_fsync


def export_baseline(commit: str, target: Path) -> Path:
    package = target / "adapterzoo_registry"
    package.mkdir(parents=True)
    names = subprocess.run(
        ["git", "ls-tree", "--name-only", commit, "registry/adapterzoo_registry/"],
        cwd=REPO_ROOT, check=True, capture_output=True, text=True,
    ).stdout.split()  # fmt: skip
    for name in names:
        source = subprocess.run(["git", "show", f"{commit}:{name}"], cwd=REPO_ROOT, check=True, capture_output=True)
        (package / Path(name).name).write_bytes(source.stdout)
    return target


def start(source: Path, root: Path, tokens: Path, port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(source)}
    args = [sys.executable, "-m", "adapterzoo_registry.cli", "serve", "--root", str(root), "--port", str(port),
            "--tokens", str(tokens), "--log-level", "warning"]  # fmt: skip
    with open(log, "ab") as out:
        process = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/models?limit=1", timeout=60).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError(log.read_text())


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repos", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=10, help="requests per query per round")
    parser.add_argument("--baseline", default="32e7949", help="git commit of the registry to compare with")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="registry-bench-") as tmp:
        tmp_path = Path(tmp)
        root = tmp_path / "root"
        started = time.perf_counter()
        build_root(root, args.repos)
        print(f"built {args.repos} repos in {time.perf_counter() - started:.0f} s", flush=True)
        tokens = tmp_path / "tokens.json"
        tokens.write_text(json.dumps({"tokens": {TOKEN: {"user": "reader", "namespaces": {"team1": "read"}}}}))
        systems = {"now": REPO_ROOT / "registry", "before": export_baseline(args.baseline, tmp_path / "baseline")}
        ports = {name: free_port() for name in systems}
        processes = {
            name: start(source, root, tokens, ports[name], tmp_path / f"{name}.log") for name, source in systems.items()
        }
        times: dict[str, dict[str, list[float]]] = {name: {query: [] for query in QUERIES} for name in systems}
        try:
            auth = {"authorization": f"Bearer {TOKEN}"}
            clients = {
                name: httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=auth, timeout=120)
                for name, port in ports.items()
            }
            for client in clients.values():  # warm: cards parsed once, index built once
                for params in QUERIES.values():
                    assert client.get("/api/models", params=params).status_code == 200
            for round_index in range(args.rounds):
                for query, params in QUERIES.items():
                    for name, client in clients.items():
                        for _ in range(args.requests):
                            begin = time.perf_counter()
                            reply = client.get("/api/models", params=params)
                            times[name][query].append(time.perf_counter() - begin)
                            assert reply.status_code == 200 and len(reply.json()) == 10, reply.text[:200]
                print(f"round {round_index + 1}/{args.rounds}", flush=True)
        finally:
            for process in processes.values():
                process.kill()
                process.wait()

    rows = []
    for query in QUERIES:
        now_ms = statistics.median(times["now"][query]) * 1000
        before_ms = statistics.median(times["before"][query]) * 1000
        rows.append({"query": query, "now_ms": round(now_ms, 2), "before_ms": round(before_ms, 2),
                     "speedup": round(before_ms / now_ms, 1)})  # fmt: skip
    print(f"\n{args.repos} repos, median of {args.rounds * args.requests} requests each (HTTP round trip included)")
    print(f"{'query':32} {'now (ms)':>10} {'before (ms)':>12} {'speedup':>8}")
    for row in rows:
        print(f"{row['query']:32} {row['now_ms']:>10} {row['before_ms']:>12} {row['speedup']:>7}x")
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    (results / "registry_listing.json").write_text(json.dumps({
        "command": "python benchmarks/registry_listing.py " + " ".join(sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "repos": args.repos, "rounds": args.rounds, "requests_per_round": args.requests, "baseline": args.baseline,
        "rows": rows,
    }, indent=2) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
