"""A base by Hub id: `Zoo.from_pretrained("ns/name")` through transformers and huggingface_hub,
against our own registry (HF_ENDPOINT), so no public hub is needed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from adapterzoo import Zoo
from adapterzoo.testing.models import char_tokenizer, tiny_model

from .conftest import ALICE_TOKEN


def test_base_from_a_hub_id(registry, alice, unique: str, tmp_path: Path) -> None:
    folder = tmp_path / "base"
    tiny_model("llama").save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    repo = f"alice/base-{unique}"
    alice.create_repo(repo, private=True)
    alice.upload_folder(repo_id=repo, folder_path=folder)
    local = Zoo.from_pretrained(folder, device="cpu")
    script = (
        "from adapterzoo import Zoo\n"
        f"zoo = Zoo.from_pretrained({repo!r}, device='cpu')\n"
        "print(zoo.fingerprint.id, zoo.tokenizer('ab')['input_ids'])\n"
    )
    env = dict(
        os.environ,
        HF_ENDPOINT=registry.url,
        HF_TOKEN=ALICE_TOKEN,
        HF_HOME=str(tmp_path / "hf"),
        HF_HUB_DISABLE_TELEMETRY="1",
    )
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    fingerprint_id, ids = result.stdout.split(maxsplit=1)
    assert fingerprint_id == local.fingerprint.id
    assert ids.strip() == str(local.tokenizer("ab")["input_ids"])
