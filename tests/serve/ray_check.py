"""Run inside a loopback-only network namespace by test_ray.py: start `adapterzoo serve --ray`,
drive it with the openai client, print a JSON report on the last line, stop everything started."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx


def leftovers(marker: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if marker in (proc / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(proc.name))
            except OSError:
                pass
    return pids


def main() -> int:
    base, adapters, keys, expected_path, port, log_path, tmpdir = sys.argv[1:8]
    expected = json.loads(Path(expected_path).read_text())
    url = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable,
        "-m",
        "adapterzoo.cli",
        "serve",
        base,
        "--ray",
        "--replicas",
        "2",
        "--adapters",
        adapters,
        "--keys",
        keys,
        "--host",
        "127.0.0.1",
        "--port",
        port,
        "--name",
        "tiny",
        "--device",
        "cpu",
        "--slots",
        "4",
    ]
    env = dict(os.environ, RAY_TMPDIR=tmpdir, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    report: dict = {"ok": False}
    with open(log_path, "ab") as log:
        server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if server.poll() is not None:
                raise RuntimeError(f"server exited with {server.returncode}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            raise RuntimeError("Ray Serve did not come up")
        from openai import NotFoundError, OpenAI

        acme = OpenAI(base_url=f"{url}/v1", api_key="k-acme", max_retries=0, timeout=120)
        beta = OpenAI(base_url=f"{url}/v1", api_key="k-beta", max_retries=0, timeout=120)
        report["models"] = sorted(m.id for m in acme.models.list())
        replicas: dict[str, list[str]] = {}
        wrong = []
        for round_ in range(3):
            for name, text in expected.items():
                r = acme.completions.create(model=name, prompt="hello", max_tokens=6, temperature=0)
                if r.choices[0].text != text:
                    wrong.append((name, r.choices[0].text, text))
                replicas.setdefault(name, []).append(r.system_fingerprint)
                if round_ == 0:  # Serve puts a new adapter on the replica with the fewest loaded, as
                    time.sleep(1.0)  # its routers last heard (pushed every 0.1 s): let them hear
        report["wrong"] = wrong
        report["replicas"] = replicas
        stream = acme.completions.create(
            model=next(iter(expected)), prompt="hello", max_tokens=6, temperature=0, stream=True
        )
        report["stream_ok"] = "".join(c.choices[0].text for c in stream) == next(iter(expected.values()))
        try:
            beta.completions.create(model=next(iter(expected)), prompt="hello", max_tokens=2)
            report["isolation"] = False
        except NotFoundError:
            report["isolation"] = True
        report["ok"] = True
    except Exception as exc:  # noqa: BLE001 - reported
        report["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                report["exit"] = server.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                report["exit"] = "killed"
        time.sleep(1)
        left = leftovers(tmpdir)
        report["leftover_processes"] = len(left)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
