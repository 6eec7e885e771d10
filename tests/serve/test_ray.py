"""Ray Serve, opt-in (ADAPTERZOO_RAY_TESTS=1): two replicas on a local Ray inside a loopback-only
network namespace (`unshare -n`), token auth on; Serve's multiplexing routes adapters to replicas."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from adapterzoo import Zoo

from .conftest import free_port, make_adapters, write_keys

pytestmark = [
    pytest.mark.ray,
    pytest.mark.skipif(os.environ.get("ADAPTERZOO_RAY_TESTS") != "1", reason="opt-in: set ADAPTERZOO_RAY_TESTS=1"),
]


@pytest.mark.timeout(600)
def test_ray_serve_replicas_with_multiplexing(tiny_base, tmp_path):
    pytest.importorskip("ray.serve")
    if subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode != 0:
        pytest.fail("unshare -n does not work here; the Ray test needs a loopback-only network namespace")
    names = [f"acme-{i}" for i in range(6)]
    zoo = Zoo.from_pretrained(tiny_base, device="cpu")
    make_adapters(zoo, tmp_path / "adapters", names)
    expected = {n: zoo.generate(["hello"], [n], max_new_tokens=6)[0] for n in names}
    (tmp_path / "expected.json").write_text(json.dumps(expected))
    keys = write_keys(
        tmp_path / "keys.json",
        {"tenants": {"acme": {"keys": ["k-acme"], "adapters": ["acme-*"]}, "beta": {"keys": ["k-beta"]}}},
    )
    ray_tmp = tempfile.mkdtemp(prefix="rz", dir="/tmp")  # short: Ray's unix socket paths are length-limited
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16), RAY_USAGE_STATS_ENABLED="0")
    script = Path(__file__).with_name("ray_check.py")
    inner = (
        f"ip link set lo up && exec {sys.executable} {script} {tiny_base} {tmp_path / 'adapters'} {keys} "
        f"{tmp_path / 'expected.json'} {free_port()} {tmp_path / 'ray-serve.log'} {ray_tmp}"
    )
    try:
        done = subprocess.run(
            ["unshare", "-n", "bash", "-c", inner],
            capture_output=True,
            text=True,
            env=env,
            timeout=560,
            cwd=Path(__file__).resolve().parents[2],
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    log = (tmp_path / "ray-serve.log").read_text(errors="replace") if (tmp_path / "ray-serve.log").exists() else ""
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no report:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}\n{log[-3000:]}"
    report = json.loads(lines[-1])
    assert report["ok"], (report, log[-4000:])
    assert not report["wrong"], report["wrong"]
    assert report["models"] == sorted(["tiny", *names])
    assert report["stream_ok"] and report["isolation"]
    used = {r for rs in report["replicas"].values() for r in rs}
    assert len(used) == 2, report["replicas"]  # both replicas served
    sticky = sum(len(set(rs)) == 1 for rs in report["replicas"].values())
    assert sticky >= len(names) // 2, report["replicas"]  # multiplexing keeps most adapters on one replica
    assert report["exit"] == 0 and report["leftover_processes"] == 0, report
