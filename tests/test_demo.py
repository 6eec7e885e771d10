"""`adapterzoo demo`: the shipped specialists (small, scored, routable), and the demo's checks run
on a tiny base with a tiny library built by `adapterzoo library build`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapterzoo.demo import SPECIALISTS, run_demo
from adapterzoo.formats.native import CONFIG_FILE
from adapterzoo.library import build_library, finished
from adapterzoo.testing.models import char_tokenizer, tiny_model
from adapterzoo.zoo import Zoo


def test_the_shipped_specialists_are_small_scored_loras_that_beat_the_base():
    folders = sorted(p.parent for p in SPECIALISTS.glob(f"*/{CONFIG_FILE}"))
    assert len(folders) >= 6
    total = sum(f.stat().st_size for folder in folders for f in folder.iterdir())
    assert total < 10 * 2**20
    for folder in folders:
        record = json.loads((folder / CONFIG_FILE).read_text())
        metrics = finished(folder)
        assert record["adapter_type"] == "lora" and record["config"]["r"] == 4
        assert metrics is not None and metrics["task"] == folder.name
        assert metrics["exact_match"] > metrics["base_exact_match"]
        assert record["metadata"]["routing"]["examples"]


@pytest.fixture(scope="module")
def tiny_base_and_library(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    tiny_model("llama").save_pretrained(root / "base")
    char_tokenizer().save_pretrained(root / "base")
    zoo = Zoo.from_pretrained(root / "base", device="cpu")
    build_library(
        zoo, ["reverse", "upper", "digits-sort"], root / "lib", steps=2, batch_size=2, n_test=2, progress=False
    )
    return root / "base", root / "lib"


def test_the_demo_passes_its_checks_on_a_tiny_library(tiny_base_and_library, capsys):
    base, lib = tiny_base_and_library
    assert run_demo(str(base), max_new_tokens=6, specialists=lib) == 0
    out = capsys.readouterr().out
    assert "every row equals its solo run: True; base unchanged: True" in out
    assert "adapters='auto' chose" in out and "reverse" in out


def test_the_demo_without_specialists_says_how_to_build_them(tmp_path: Path, capsys):
    assert run_demo("unused", specialists=tmp_path) == 1
    assert "adapterzoo library build" in capsys.readouterr().out
