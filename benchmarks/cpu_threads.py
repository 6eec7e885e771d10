"""A decode step beside a busy process: OpenMP's wait policy and the thread count, compared.

Each configuration runs in a fresh process (OpenMP reads OMP_WAIT_POLICY once, when torch
loads) in a session of its own, as is the neighbour (`while True: pass`): under autogroup
scheduling CPU time is shared per session. Per configuration: the median wall time of a decode
step (16 rows, SmolLM2-135M float32, packed linears) quiet and beside the neighbour, alternating
over 3 rounds. Writes benchmarks/results/cpu_threads.json. Not part of CI.

    .venv/bin/python benchmarks/cpu_threads.py          # about 2 minutes
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = [(2, None), (2, "PASSIVE"), (1, None)]  # threads, OMP_WAIT_POLICY (None: OpenMP's default)


def measure(threads: int) -> dict:
    """In the child: decode steps quiet and beside the neighbour."""
    import torch  # before adapterzoo: with OMP_WAIT_POLICY unset, OpenMP keeps its own default

    torch.set_num_threads(threads)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from transformers import DynamicCache

    from adapterzoo import Zoo
    from adapterzoo.serve.packed import pack_linears

    zoo = Zoo.from_pretrained("smollm2", device="cpu", dtype=torch.float32, slots=16)
    pack_linears(zoo.model)
    ids = torch.randint(0, 1000, (16, 10))
    mask = torch.ones_like(ids)

    def step_seconds(n: int = 12) -> float:
        out = zoo.forward(ids, mask, cache=DynamicCache(config=zoo.model.config))
        m, nxt = mask, torch.randint(0, 1000, (16, 1))
        start = time.perf_counter()
        for _ in range(n):
            m = torch.cat([m, torch.ones_like(m[:, :1])], 1)
            out = zoo.forward(nxt, m, cache=out.cache)
        return (time.perf_counter() - start) / n

    times: dict[str, list[float]] = {"quiet": [], "busy": []}
    with torch.inference_mode():
        step_seconds(2)
        for _ in range(3):
            times["quiet"].append(step_seconds())
            neighbour = subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
            try:
                time.sleep(0.3)
                times["busy"].append(step_seconds())
            finally:
                neighbour.kill()
                neighbour.wait()
    quiet, busy = statistics.median(times["quiet"]), statistics.median(times["busy"])
    return {"quiet_ms": quiet * 1e3, "busy_ms": busy * 1e3, "busy_over_quiet_throughput": quiet / busy}


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        print("@@" + json.dumps(measure(int(sys.argv[2]))), flush=True)
        return
    rows = []
    for threads, policy in CONFIGS:
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        if policy:  # else unset: the child imports torch before adapterzoo, so OpenMP keeps its default
            env["OMP_WAIT_POLICY"] = policy
        out = subprocess.run(
            [sys.executable, __file__, "--child", str(threads)],
            env=env,
            capture_output=True,
            text=True,
            start_new_session=True,
            check=True,
        ).stdout
        result = json.loads(next(line[2:] for line in out.splitlines() if line.startswith("@@")))
        rows.append({"threads": threads, "omp_wait_policy": policy or "default", **result})
        r = rows[-1]
        print(
            f"threads {threads}, wait policy {r['omp_wait_policy']:8}: quiet {r['quiet_ms']:6.0f} ms/step, "
            f"beside a busy process {r['busy_ms']:6.0f} ms/step, throughput {r['busy_over_quiet_throughput']:.2f}x",
            flush=True,
        )
    path = Path(__file__).resolve().parent / "results" / "cpu_threads.json"
    path.write_text(json.dumps({"load_average": os.getloadavg()[0], "rows": rows}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
