"""Serving throughput and time to first token: adapterzoo's engine vs the base vs PEFT, one run.

A mixed workload on SmolLM2-135M (float32): R requests, each for one of 100 LoRA adapters
(r=8 on q_proj,v_proj; Zipf popularity), short prompts, each asking for its own number of new
tokens, uniform in [T/4, 7T/4] (mean T; `--fixed-length` gives every request exactly T), EOS
ignored, all arriving at once (an offline burst), at most B rows decoded together. Only the
tokens a request asked for count; static batching has to run each batch to its longest request,
which is the waste continuous batching removes. Systems, measured in the same process,
round-robin over the rounds:

  zoo              adapterzoo's continuous-batching engine, every request with its adapter
  zoo (base)       the same engine and workload with no adapters: the ceiling we aim for
  hf base          plain transformers `generate` on the base, static batches of B in arrival order
  peft set_adapter PEFT: group the requests by adapter, `set_adapter`, `generate` each group
  peft mixed       PEFT's mixed batch: static batches of B in arrival order, `generate(adapter_names=...)`

Throughput is generated tokens per second of wall time; time to first token (TTFT) is measured
from the burst's start (for static batching, when the request's batch produced its first token).
Reports medians over rounds; writes benchmarks/results/serve.{json,png}.

    python benchmarks/serve.py [--requests 48] [--adapters 100] [--max-tokens 16] [--batch 16] [--rounds 3] \
        [--threads 1]

Two more scenarios, each against the HTTP server, rounds interleaved:

    python benchmarks/serve.py --scenario mixed-types --adapters 320 --clients 16 --max-tokens 16 [--per-type]
        all six adapter types (Zipf over --adapters) vs base-only; writes results/serve_mixed_types.json.
        The server runs in a process of its own, as an operator runs it (uvicorn on 127.0.0.1, stopped
        by its pid at the end), the HTTP clients in this one; --in-process serves from this process
        instead (clients, tokenizers and engine then share one interpreter, which the clients slow)
    python benchmarks/serve.py --scenario fairness --batch 32 --max-tokens 16
        a 4-token request idle vs during another tenant's 256-prompt flood; writes results/serve_fairness.json

Medians over interleaved rounds; the numbers in README.md were taken on a quiet machine.
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, save_json  # noqa: E402
from prompts import PROMPTS  # noqa: E402

from adapterzoo import Zoo  # noqa: E402
from adapterzoo.serve import Engine, SamplingParams  # noqa: E402


def workload(
    n: int, adapters: int, max_tokens: int = 16, fixed_length: bool = False, seed: int = 0
) -> list[tuple[str, str, int]]:
    """(prompt, adapter, new tokens wanted) per request."""
    rng = random.Random(seed)
    names = [f"a{i}" for i in range(adapters)]
    rng.shuffle(names)
    weights = [1 / (k + 1) ** 1.1 for k in range(adapters)]
    chosen = rng.choices(names, weights=weights, k=n)
    lo, hi = (max_tokens, max_tokens) if fixed_length else (max(1, max_tokens // 4), max_tokens * 7 // 4)
    return [(rng.choice(PROMPTS), name, rng.randint(lo, hi)) for name in chosen]


def build(adapters: int):
    """The zoo, a PEFT model with the same 100 LoRA adapters (weights copied through PEFT's files),
    and a plain HF copy of the base."""
    from peft import LoraConfig, get_peft_model

    zoo = Zoo.from_pretrained("smollm2", device="cpu", dtype=torch.float32, slots=16)
    base = copy.deepcopy(zoo.model)
    base.config._attn_implementation = "sdpa"
    hf_base = copy.deepcopy(base)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(0)
    peft = get_peft_model(base, config, adapter_name="a0")
    for i in range(1, adapters):
        peft.add_adapter(f"a{i}", config)
    peft.eval()
    with tempfile.TemporaryDirectory() as tmp:
        peft.save_pretrained(tmp, selected_adapters=[f"a{i}" for i in range(adapters)])
        for i in range(adapters):
            folder = Path(tmp) / f"a{i}"  # PEFT saves non-"default" adapters in sub-folders
            zoo.load_adapter(f"a{i}", folder)
    return zoo, peft, hf_base


class FirstToken:
    """A logits processor that notes when generate produced its first token."""

    def __init__(self):
        self.at: float | None = None

    def __call__(self, input_ids, scores):
        if self.at is None:
            self.at = time.perf_counter()
        return scores


def run_zoo(zoo: Zoo, jobs, batch: int, with_adapters: bool) -> dict:
    engine = Engine(zoo, max_batch=batch, max_queue=len(jobs) + 1).start()
    try:
        t0 = time.perf_counter()
        handles = [
            engine.submit(p, a if with_adapters else None, SamplingParams(max_tokens=n, ignore_eos=True))
            for p, a, n in jobs
        ]
        results = [h.result(3600) for h in handles]
        wall = time.perf_counter() - t0
    finally:
        engine.stop()
    return {
        "wall": wall,
        "tokens": sum(r.completion_tokens for r in results),
        "ttft": [r.ttft for r in results],
        "texts": [r.text for r in results],
    }


def _hf_generate(model, tok, prompts, wanted: list[int], **kwargs):
    """One static batch: it runs to its longest request; each row keeps the tokens it asked for."""
    from transformers import LogitsProcessorList

    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    first = FirstToken()
    steps = max(wanted)
    out = model.generate(
        **enc,
        max_new_tokens=steps,
        min_new_tokens=steps,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
        logits_processor=LogitsProcessorList([first]),
        **kwargs,
    )
    new = out[:, enc["input_ids"].shape[1] :]
    texts = [tok.decode(row[:n], skip_special_tokens=True) for row, n in zip(new, wanted)]
    return texts, first.at, sum(wanted)


def run_static(model, tok, jobs, batch: int, mixed: bool | None) -> dict:
    """mixed=None: the plain base; True: PEFT adapter_names; static batches in arrival order."""
    t0 = time.perf_counter()
    ttft, texts, tokens = [0.0] * len(jobs), [""] * len(jobs), 0
    for start in range(0, len(jobs), batch):
        chunk = jobs[start : start + batch]
        kwargs = {"adapter_names": [a for _, a, _ in chunk]} if mixed else {}
        out, first, n = _hf_generate(model, tok, [p for p, _, _ in chunk], [w for _, _, w in chunk], **kwargs)
        tokens += n
        for i, text in enumerate(out):
            ttft[start + i], texts[start + i] = first - t0, text
    return {"wall": time.perf_counter() - t0, "tokens": tokens, "ttft": ttft, "texts": texts}


def run_set_adapter(peft, tok, jobs, batch: int) -> dict:
    """PEFT without mixed batches: one adapter at a time (groups in order of first arrival)."""
    t0 = time.perf_counter()
    groups: dict[str, list[int]] = {}
    for i, (_, a, _) in enumerate(jobs):
        groups.setdefault(a, []).append(i)
    ttft, texts, tokens = [0.0] * len(jobs), [""] * len(jobs), 0
    for name, idx in groups.items():
        peft.set_adapter(name)
        for start in range(0, len(idx), batch):
            part = idx[start : start + batch]
            out, first, n = _hf_generate(peft, tok, [jobs[i][0] for i in part], [jobs[i][2] for i in part])
            tokens += n
            for i, text in zip(part, out):
                ttft[i], texts[i] = first - t0, text
    return {"wall": time.perf_counter() - t0, "tokens": tokens, "ttft": ttft, "texts": texts}


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--adapters", type=int, default=100)
    ap.add_argument("--max-tokens", type=int, default=16, help="mean new tokens per request")
    ap.add_argument("--fixed-length", action="store_true", help="every request asks for exactly --max-tokens")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads for every system (1 is steadier on a CPU shared with other jobs)",
    )
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument(
        "--scenario",
        choices=["throughput", "mixed-types", "fairness"],
        default="throughput",
        help="throughput: engine vs HF/PEFT (above); mixed-types: all six types vs base-only over HTTP; "
        "fairness: a 4-token request during another tenant's 256-prompt flood",
    )
    ap.add_argument("--clients", type=int, default=16, help="mixed-types: closed-loop HTTP clients")
    ap.add_argument("--per-client", type=int, default=2, help="mixed-types: requests per client per round")
    ap.add_argument("--per-type", action="store_true", help="mixed-types: also each type alone")
    ap.add_argument(
        "--in-process",
        action="store_true",
        help="mixed-types: serve from the benchmark's own process (as before: its clients then slow the server)",
    )
    ap.add_argument("--serve-port", type=int, default=None, help=argparse.SUPPRESS)  # the server process's port
    ap.add_argument("--samples", type=int, default=3, help="fairness: 4-token requests per phase (median)")
    ap.add_argument(
        "--no-shares", action="store_true", help="fairness: no queue or row shares (as before them), to compare"
    )
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.serve_port is not None:  # the server process that mixed_types starts
        serve_mixed(args)
        return {}
    if args.scenario != "throughput":
        command = "python benchmarks/serve.py " + " ".join(argv if argv is not None else sys.argv[1:])
        with torch.inference_mode():
            result = mixed_types(args) if args.scenario == "mixed-types" else fairness(args)
        payload = {"config": vars(args), "machine": machine(), "result": result, "command": command}
        name = "serve_" + args.scenario.replace("-", "_") + ("_no_shares" if args.no_shares else "")
        print(f"wrote {save_json(name, payload)}")
        return payload

    t_build = time.perf_counter()
    zoo, peft, hf_base = build(args.adapters)
    tok = copy.deepcopy(zoo.tokenizer)
    tok.padding_side = "left"
    jobs = workload(args.requests, args.adapters, args.max_tokens, args.fixed_length)
    print(
        f"built base + {args.adapters} adapters (zoo and PEFT) in {time.perf_counter() - t_build:.0f}s; "
        f"{args.requests} requests over {len({a for _, a, _ in jobs})} distinct adapters, "
        f"{min(n for *_, n in jobs)}-{max(n for *_, n in jobs)} new tokens each, "
        f"batch {args.batch}, {args.rounds} rounds"
    )
    systems = {
        "zoo": lambda: run_zoo(zoo, jobs, args.batch, True),
        "zoo (base)": lambda: run_zoo(zoo, jobs, args.batch, False),
        "hf base": lambda: run_static(hf_base, tok, jobs, args.batch, None),
        "peft set_adapter": lambda: run_set_adapter(peft, tok, jobs, args.batch),
        "peft mixed": lambda: run_static(peft, tok, jobs, args.batch, True),
    }
    runs: dict[str, list[dict]] = {name: [] for name in systems}
    with torch.inference_mode():
        run_zoo(zoo, [(p, a, 2) for p, a, _ in jobs[:4]], args.batch, True)  # warm-up: pools, hooks, allocator
        for r in range(args.rounds):
            for name, fn in systems.items():
                runs[name].append(fn())
                last = runs[name][-1]
                print(
                    f"  round {r + 1} {name:17} {last['tokens'] / last['wall']:7.1f} tok/s  wall {last['wall']:.1f}s",
                    flush=True,
                )
    summary = {}
    for name, rs in runs.items():
        summary[name] = {
            "tokens_per_s": statistics.median(x["tokens"] / x["wall"] for x in rs),
            "wall_s": statistics.median(x["wall"] for x in rs),
            "ttft_p50_s": statistics.median(pct(x["ttft"], 0.5) for x in rs),
            "ttft_p99_s": statistics.median(pct(x["ttft"], 0.99) for x in rs),
            "tokens": rs[0]["tokens"],
        }
    ours = summary["zoo"]["tokens_per_s"]
    ratios = {
        "zoo_vs_zoo_base_throughput": summary["zoo (base)"]["tokens_per_s"] / ours,
        "zoo_vs_hf_base_throughput": summary["hf base"]["tokens_per_s"] / ours,
        "zoo_over_peft_set_adapter": ours / summary["peft set_adapter"]["tokens_per_s"],
        "zoo_over_peft_mixed": ours / summary["peft mixed"]["tokens_per_s"],
    }
    agree = sum(a == b for a, b in zip(runs["zoo"][0]["texts"], runs["peft mixed"][0]["texts"])) / len(jobs)
    print(f"\n{'system':18} {'tok/s':>8} {'wall s':>8} {'TTFT p50':>9} {'TTFT p99':>9}   (median of {args.rounds})")
    for name, m in summary.items():
        print(f"{name:18} {m['tokens_per_s']:8.1f} {m['wall_s']:8.2f} {m['ttft_p50_s']:9.2f} {m['ttft_p99_s']:9.2f}")
    print(f"\nbase engine / zoo engine throughput: {ratios['zoo_vs_zoo_base_throughput']:.2f}x (aim: <= 1.3x)")
    print(f"hf base / zoo engine throughput:     {ratios['zoo_vs_hf_base_throughput']:.2f}x")
    print(f"zoo / PEFT set_adapter:              {ratios['zoo_over_peft_set_adapter']:.2f}x")
    print(f"zoo / PEFT mixed adapter_names:      {ratios['zoo_over_peft_mixed']:.2f}x")
    print(f"same text as PEFT mixed (greedy):    {agree:.0%} of requests")
    payload = {
        "config": vars(args),
        "distinct_adapters": len({a for _, a, _ in jobs}),
        "machine": machine(),
        "summary": summary,
        "ratios": ratios,
        "agreement_with_peft": agree,
        "command": "python benchmarks/serve.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    path = save_json("serve", payload)
    print(f"wrote {path}")
    if not args.no_plot:
        plot(summary, RESULTS / "serve.png", args)
    return payload


def plot(summary: dict, path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.bar(names, [summary[n]["tokens_per_s"] for n in names], color=["C0", "C1", "C2", "C3", "C4"])
    a.set_ylabel("generated tokens / s")
    a.set_title(f"throughput ({args.requests} requests, {args.adapters} LoRA adapters)")
    x = range(len(names))
    b.bar([i - 0.2 for i in x], [summary[n]["ttft_p50_s"] for n in names], width=0.4, label="p50")
    b.bar([i + 0.2 for i in x], [summary[n]["ttft_p99_s"] for n in names], width=0.4, label="p99")
    b.set_xticks(list(x), names)
    b.set_ylabel("seconds")
    b.set_title("time to first token (burst arrival)")
    b.legend()
    for ax in (a, b):
        ax.tick_params(axis="x", rotation=25)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


# ----------------------------------------------------------------------------- scenario: mixed types


def _running_app():
    """The tests' in-process uvicorn helper (a server in a thread, stopped on exit)."""
    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.append(root)
    from tests.serve.conftest import running_app

    return running_app


def mixed_names(adapters: int) -> dict[str, list[str]]:
    """The mixed-types adapters' names by type: adapter i is of the i-th type in turn, "<type>-<i>"."""
    from mixed_batch import TYPES

    types = list(TYPES)
    return {t: [f"{t}-{i}" for i in range(k, adapters, len(types))] for k, t in enumerate(types)}


def build_mixed(adapters: int) -> tuple[Zoo, dict[str, list[str]]]:
    """SmolLM2 with `adapters` adapters, the six types in turn (the mixed-batch benchmark's
    configs: LoRA r=8 on q,v; Houlsby bottleneck 32; prefix and soft prompt of 16 tokens)."""
    from mixed_batch import TYPES

    zoo = Zoo.from_pretrained("smollm2", device="cpu", dtype=torch.float32, slots=16)
    by_type = mixed_names(adapters)
    for i in range(adapters):
        t = list(TYPES)[i % len(TYPES)]
        zoo.add_adapter(f"{t}-{i}", t, seed=i, trainable=False, **TYPES[t])
    return zoo, by_type


def closed_loop(url: str, names: list[str | None], clients: int, per_client: int, max_tokens: int, seed: int) -> dict:
    """`clients` HTTP clients, each sending `per_client` requests one after another (a closed
    loop, as users do), adapters drawn Zipf-popular from `names`. Tokens/s over the wall time."""
    import threading

    import httpx

    rng = random.Random(seed)
    weights = [1 / (k + 1) ** 1.1 for k in range(len(names))]
    plans = [[(rng.choice(PROMPTS), rng.choices(names, weights)[0]) for _ in range(per_client)] for _ in range(clients)]
    tokens: list[int] = []
    errors: list[str] = []

    def client(plan):
        with httpx.Client(base_url=url, timeout=600) as http:
            for prompt, name in plan:
                r = http.post(
                    "/v1/completions",
                    json={
                        "model": name or "smollm2",
                        "prompt": prompt,
                        "temperature": 0,
                        "max_tokens": max_tokens,
                        "ignore_eos": True,
                    },
                )
                if r.status_code != 200:
                    errors.append(r.text)
                    continue
                tokens.append(r.json()["usage"]["completion_tokens"])

    threads = [threading.Thread(target=client, args=(plan,)) for plan in plans]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, e.g. {errors[0]}")
    return {"wall": wall, "tokens": sum(tokens), "tokens_per_s": sum(tokens) / wall}


def mixed_server(adapters: int, batch: int):
    """The mixed-types scenario's server: `build_mixed(adapters)` behind the HTTP API, open."""
    from adapterzoo.serve.http import build_server
    from adapterzoo.serve.tenants import Tenants

    zoo, by_type = build_mixed(adapters)
    return build_server(zoo, base_name="smollm2", tenants=Tenants.open(), max_batch=batch, max_queue=256), by_type


def serve_mixed(args) -> None:
    """Run the mixed-types server on 127.0.0.1:--serve-port until SIGTERM (the process that
    `server_process` starts)."""
    from adapterzoo.serve.http import create_app, serve

    server, _ = mixed_server(args.adapters, args.batch)
    serve(create_app(server), host="127.0.0.1", port=args.serve_port)


@contextmanager
def server_process(args) -> Iterator[str]:
    """The mixed-types server in a process of its own (same zoo, same options), as an operator runs
    it; yields its URL once it answers, and stops it by its pid (SIGTERM, then SIGKILL) on exit.
    Its output goes to a log file, named if it fails to start and removed if it started."""
    import socket

    import httpx

    with socket.socket() as probe:  # a free port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, str(Path(__file__).resolve()), "--scenario", "mixed-types", "--serve-port", str(port)]
    command += ["--adapters", str(args.adapters), "--batch", str(args.batch)]
    command += ["--threads", str(args.threads)] if args.threads else []
    log = tempfile.NamedTemporaryFile("w+", prefix="serve_mixed_", suffix=".log", delete=False)
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    started = False
    try:
        deadline = time.monotonic() + 600
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the mixed-types server did not start; its log: {log.name}")
            try:
                if httpx.get(url + "/v1/models", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(1)
        started = True
        yield url
    finally:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        if started:
            Path(log.name).unlink()


def mixed_types(args) -> dict:
    """Mixed-type serving vs base-only over HTTP (the issue's workload, scaled to --adapters):
    Zipf over adapters of all six types, `--clients` closed-loop clients, `--max-tokens` each.
    With --per-type, each type alone too. Systems interleaved round by round."""
    if args.in_process:
        server, by_type = mixed_server(args.adapters, args.batch)
        serving = _running_app()(server)
    else:
        by_type = mixed_names(args.adapters)
        serving = server_process(args)
    everything = [n for names in by_type.values() for n in names]
    systems: dict[str, list[str | None]] = {"mixed types": everything, "base only": [None]}
    if args.per_type:
        systems.update({t: names for t, names in by_type.items()})
    runs: dict[str, list[dict]] = {name: [] for name in systems}
    with serving as url:
        closed_loop(url, everything, args.clients, 1, 2, seed=99)  # warm-up: pools, hooks
        for r in range(args.rounds):
            for name, names in systems.items():
                runs[name].append(closed_loop(url, names, args.clients, args.per_client, args.max_tokens, seed=r))
                print(f"  round {r + 1} {name:12} {runs[name][-1]['tokens_per_s']:7.1f} tok/s", flush=True)
    summary = {name: statistics.median(x["tokens_per_s"] for x in rs) for name, rs in runs.items()}
    base = summary["base only"]
    print(f"\n{'system':14} {'tok/s':>8} {'x base':>7}   (median of {args.rounds} interleaved rounds)")
    for name, tps in summary.items():
        print(f"{name:14} {tps:8.1f} {tps / base:7.2f}")
    where = "in the benchmark's process" if args.in_process else "in a process of its own"
    print(f"mixed / base: {summary['mixed types'] / base:.2f}x (aim: >= 0.87x, i.e. within 1.15x); server {where}")
    return {"tokens_per_s": summary, "mixed_over_base": summary["mixed types"] / base, "server": where}


# ----------------------------------------------------------------------------- scenario: fairness


def fairness(args) -> dict:
    """One tenant floods (256-prompt requests back to back); another sends 4-token requests.
    Their latency against the same request on an idle server, rounds interleaved (idle, flooded)."""
    import json
    import socket
    import threading

    import httpx

    from adapterzoo.serve.http import build_server
    from adapterzoo.serve.tenants import Tenants

    running_app = _running_app()

    zoo = Zoo.from_pretrained("smollm2", device="cpu", dtype=torch.float32, slots=16)
    tenants = Tenants.from_dict({"tenants": {"flood": {"keys": ["k-flood"]}, "small": {"keys": ["k-small"]}}})
    shares = {} if not args.no_shares else {"max_rows_per_tenant": args.batch, "max_queue_per_tenant": 1024}
    server = build_server(zoo, base_name="smollm2", tenants=tenants, max_batch=args.batch, max_queue=1024, **shares)
    body = {
        "model": "smollm2",
        "prompt": "The capital of France is",
        "max_tokens": 4,
        "temperature": 0,
        "ignore_eos": True,
    }
    flood_body = {
        "model": "smollm2",
        "prompt": PROMPTS * (256 // len(PROMPTS)) + PROMPTS[: 256 % len(PROMPTS)],
        "max_tokens": args.max_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }

    def small(http) -> float:
        t0 = time.perf_counter()
        r = http.post("/v1/completions", json=body, headers={"Authorization": "Bearer k-small"})
        assert r.status_code == 200, r.text
        return time.perf_counter() - t0

    payload = json.dumps(flood_body).encode()
    idle, flooded = [], []
    with running_app(server) as url, httpx.Client(base_url=url, timeout=600) as http:
        port = int(url.rsplit(":", 1)[1])
        flood_request = (
            f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer k-flood\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
        ).encode() + payload
        small(http)  # warm-up
        for r in range(args.rounds):
            idle.append(statistics.median(small(http) for _ in range(args.samples)))
            stop = threading.Event()
            sockets: list[socket.socket] = []

            # raw sockets: shutting one down is a disconnect, which cancels the flood at once
            def flood(stop=stop, sockets=sockets):
                while not stop.is_set():
                    sock = socket.create_connection(("127.0.0.1", port))
                    sockets.append(sock)
                    try:
                        sock.sendall(flood_request)
                        while sock.recv(65536):
                            pass
                    except OSError:
                        pass
                    finally:
                        sock.close()

            flooder = threading.Thread(target=flood)
            flooder.start()
            while server.engine.stats()["running"] < args.batch // 2:
                time.sleep(0.01)
            flooded.append(statistics.median(small(http) for _ in range(args.samples)))
            stop.set()
            for sock in sockets:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            flooder.join()
            while server.engine.stats()["running"] or server.engine.stats()["waiting"]:
                time.sleep(0.05)  # the flood's rows leave before the next idle measurement
            print(
                f"  round {r + 1}: 4-token request idle {idle[-1]:.2f}s, during the flood {flooded[-1]:.2f}s",
                flush=True,
            )
    result = {"idle_s": statistics.median(idle), "flooded_s": statistics.median(flooded)}
    result["ratio"] = result["flooded_s"] / result["idle_s"]
    print(
        f"\n4-token request: idle {result['idle_s']:.2f}s, during a 256-prompt flood {result['flooded_s']:.2f}s "
        f"({result['ratio']:.2f}x; aim < 2x)"
    )
    return result


if __name__ == "__main__":
    main()
