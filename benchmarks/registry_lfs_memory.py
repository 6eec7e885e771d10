"""Server and client memory for big uploads, with the official client and hf_xet installed and on.

1. One file of `--file-mib` (default 1024) through Git LFS the way `adapterzoo push` sends it: a
   client declaring LFS (`X-Adapterzoo-Transfer: lfs`) passing an open binary file, which makes
   huggingface_hub fall back from Xet to HTTP LFS for that call. The server's peak RSS (VmHWM)
   before and after, and the client's.
2. `HfApi.upload_folder` of `--folder-files` x `--folder-file-mib` (default 5 x 100 MiB) by a
   declared client with Xet off (HF_HUB_DISABLE_XET=1, as the docs say): how many commits it made
   (one: LFS objects are uploaded first, then one commit names them).
3. A plain client (no header, Xet on) uploading one file of `--inline-mib` (default 256): it is
   told "regular" and sends the file inline in the commit body; what that costs both sides.
   Runs last, since it raises both peaks.

    python benchmarks/registry_lfs_memory.py --file-mib 1024

Writes results/registry_lfs_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.pop("HF_HUB_DISABLE_XET", None)
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

import httpx  # noqa: E402
from huggingface_hub import HfApi, constants  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
TOKEN = "hf_bench_writer"
MIB = 1024 * 1024
DECLARE_LFS = {"X-Adapterzoo-Transfer": "lfs"}


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def random_file(path: Path, mib: int) -> Path:
    with open(path, "wb") as out:
        for _ in range(mib):
            out.write(os.urandom(MIB))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--file-mib", type=int, default=1024)
    parser.add_argument("--folder-files", type=int, default=5)
    parser.add_argument("--folder-file-mib", type=int, default=100)
    parser.add_argument("--inline-mib", type=int, default=256)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="registry-lfs-bench-") as tmp:
        tmp_path = Path(tmp)
        tokens = tmp_path / "tokens.json"
        tokens.write_text(json.dumps({"tokens": {TOKEN: {"user": "bench", "namespaces": {"bench": "write"}}}}))
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "registry")}
        server = subprocess.Popen(
            [sys.executable, "-m", "adapterzoo_registry.cli", "serve", "--root", str(tmp_path / "root"),
             "--port", str(port), "--tokens", str(tokens), "--log-level", "warning"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(200):
                try:
                    if httpx.get(f"{url}/api/models").status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.1)
            assert not constants.HF_HUB_DISABLE_XET, "run without HF_HUB_DISABLE_XET: this measures Xet on"
            api = HfApi(endpoint=url, token=TOKEN, headers=DECLARE_LFS)
            api.create_repo("bench/big")
            big = random_file(tmp_path / "big.bin", args.file_mib)
            server_before, client_before = peak_rss(server.pid), peak_rss(os.getpid())
            started = time.perf_counter()
            with open(big, "rb") as weights:  # a binary file object: HTTP LFS for this call, Xet stays on
                api.upload_file(path_or_fileobj=weights, path_in_repo="adapter_model.safetensors", repo_id="bench/big")
            upload_s = time.perf_counter() - started
            server_growth = peak_rss(server.pid) - server_before
            client_growth = peak_rss(os.getpid()) - client_before
            size = api.model_info("bench/big", files_metadata=True).siblings[0].size
            assert size == args.file_mib * MIB
            assert (tmp_path / "root" / "models" / "bench" / "big" / "lfs").is_dir(), "it did not go through LFS"
            big.unlink()

            folder = tmp_path / "folder"
            folder.mkdir()
            for index in range(args.folder_files):
                random_file(folder / f"shard-{index}.safetensors", args.folder_file_mib)
            api.create_repo("bench/folder")
            before = len(api.list_repo_commits("bench/folder"))
            server_before = peak_rss(server.pid)
            constants.HF_HUB_DISABLE_XET = True  # what HF_HUB_DISABLE_XET=1 does; this script is one thread
            try:
                api.upload_folder(folder_path=folder, repo_id="bench/folder")
            finally:
                constants.HF_HUB_DISABLE_XET = False
            folder_commits = len(api.list_repo_commits("bench/folder")) - before
            folder_growth = peak_rss(server.pid) - server_before
            for shard in folder.iterdir():
                shard.unlink()

            plain = HfApi(endpoint=url, token=TOKEN)  # no header, Xet on: what a user has
            plain.create_repo("bench/inline")
            inline = random_file(tmp_path / "inline.bin", args.inline_mib)
            server_before, client_before = peak_rss(server.pid), peak_rss(os.getpid())
            started = time.perf_counter()
            plain.upload_file(path_or_fileobj=str(inline), path_in_repo="adapter_model.safetensors",
                              repo_id="bench/inline")  # fmt: skip
            inline_s = time.perf_counter() - started
            inline_server_growth = peak_rss(server.pid) - server_before
            inline_client_growth = peak_rss(os.getpid()) - client_before
        finally:
            server.kill()
            server.wait()

    result = {
        "command": "python benchmarks/registry_lfs_memory.py " + " ".join(sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "file_mib": args.file_mib,
        "upload_seconds": round(upload_s, 1),
        "server_peak_rss_growth_mib": round(server_growth / MIB, 1),
        "client_peak_rss_growth_mib": round(client_growth / MIB, 1),
        "folder": f"{args.folder_files} x {args.folder_file_mib} MiB",
        "folder_commits": folder_commits,
        "folder_server_peak_rss_growth_mib": round(folder_growth / MIB, 1),
        "plain_client_inline_mib": args.inline_mib,
        "inline_upload_seconds": round(inline_s, 1),
        "inline_server_peak_rss_growth_mib": round(inline_server_growth / MIB, 1),
        "inline_client_peak_rss_growth_mib": round(inline_client_growth / MIB, 1),
        "client_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    print(json.dumps(result, indent=2))
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "registry_lfs_memory.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
