"""`adapterzoo library build` (adapterzoo/library.py) on a tiny seeded base: one scored, routable
adapter per task, a score table, resuming, the command line and `--push` to a real registry."""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub
import pytest
import torch

from adapterzoo import Zoo
from adapterzoo.formats.native import CONFIG_FILE, WEIGHTS_FILE
from adapterzoo.hub import card_record
from adapterzoo.library import TABLE_FILE, build_library, finished, select_tasks
from adapterzoo.storage import read_json
from adapterzoo.testing.models import char_tokenizer, tiny_model
from tests.hub.conftest import _fresh_hf_cache, _online_hub_client_with_xet_on  # noqa: F401 - autouse fixtures
from tests.registry.conftest import ALICE_TOKEN, registry, tokens_file  # noqa: F401 - fixtures

FAST = {"steps": 2, "batch_size": 2, "group_size": 2, "n_test": 3, "progress": False}


def tiny() -> Zoo:
    return Zoo(tiny_model("llama"), char_tokenizer(), device="cpu")


def test_build_saves_one_scored_routable_adapter_per_task_and_a_score_table(tmp_path):
    lines: list[str] = []
    entries = build_library(tiny(), ["reverse", "upper", "digits-sort"], tmp_path, echo=lines.append, **FAST)
    assert [e.task for e in entries] == ["reverse", "upper", "digits-sort"]
    assert sum("training" in line for line in lines) == 2  # two groups of at most two
    for task in ("reverse", "upper", "digits-sort"):
        record = read_json(tmp_path / task / CONFIG_FILE)
        metrics = record["metadata"]["metrics"]
        assert metrics["task"] == task and metrics["n_test"] == 3
        assert 0 <= metrics["exact_match"] <= 1 and 0 <= metrics["base_exact_match"] <= 1
        assert record["config"]["r"] == 4  # the library's small default
        assert len(record["metadata"]["routing"]["examples"]) > 0  # routable once loaded
        assert card_record(tmp_path / task)["metrics"]["task"] == task  # the pushed card shows it
    table = json.loads((tmp_path / TABLE_FILE).read_text())
    assert [row["task"] for row in table["tasks"]] == ["reverse", "upper", "digits-sort"]
    assert table["summary"]["tasks"] == 3 and table["summary"]["min"] <= table["summary"]["max"]
    assert not (tmp_path / ".checkpoints" / "reverse").exists()


def test_a_built_library_routes_auto_requests_once_loaded(tmp_path):
    build_library(tiny(), ["reverse", "digits-sort"], tmp_path, **FAST)
    zoo = tiny()
    for task in ("reverse", "digits-sort"):
        zoo.load_adapter(task, tmp_path / task)
    decisions = zoo.route(["Reverse the word: q w e ->", "Sort the digits: 9134 ->"])
    assert [d.adapter for d in decisions] == ["reverse", "digits-sort"]


def test_build_resumes_skipping_the_tasks_already_finished(tmp_path):
    build_library(tiny(), ["reverse"], tmp_path, **FAST)
    weights = tmp_path / "reverse" / WEIGHTS_FILE
    before = weights.read_bytes()
    lines: list[str] = []
    entries = build_library(tiny(), ["reverse", "upper"], tmp_path, echo=lines.append, **FAST)
    assert any("1 of 2 tasks already built" in line for line in lines)
    assert not any("training reverse" in line for line in lines)
    assert [e.task for e in entries] == ["reverse", "upper"]
    assert weights.read_bytes() == before


def test_a_build_cut_off_after_training_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    import adapterzoo.library as library

    def cut(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(library, "exact_match", cut)
    with pytest.raises(KeyboardInterrupt):
        build_library(tiny(), ["reverse"], tmp_path, **FAST)
    assert (tmp_path / ".checkpoints" / "reverse").exists() and finished(tmp_path / "reverse") is None
    monkeypatch.undo()
    steps: list[int] = []
    zoo = tiny()
    original = zoo.train
    monkeypatch.setattr(zoo, "train", lambda *a, **k: original(*a, **k, on_step=lambda info: steps.append(info.step)))
    build_library(zoo, ["reverse"], tmp_path, **FAST)
    assert steps == []  # every step was in the checkpoint; nothing trained twice
    assert finished(tmp_path / "reverse") is not None


def test_tasks_are_chosen_by_all_family_or_list_and_unknown_names_are_named():
    assert len(select_tasks("all")) == 116
    assert select_tasks("family:dshift") == [f"dshift-{k}" for k in range(1, 10)]
    assert select_tasks("upper, reverse,upper") == ["upper", "reverse"]
    with pytest.raises(KeyError, match="did you mean"):
        select_tasks("revers")
    with pytest.raises(Exception, match="families"):
        select_tasks("family:nope")


# ----------------------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("base") / "llama"
    tiny_model("llama").save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


def cli(*args):
    from click.testing import CliRunner

    from adapterzoo.cli import cli as group

    return CliRunner().invoke(group, [str(a) for a in args])


def test_cli_builds_and_prints_the_score_table(tiny_base, tmp_path):
    result = cli(
        "library",
        "build",
        "--base",
        tiny_base,
        "--tasks",
        "reverse,upper",
        "--out",
        tmp_path / "lib",
        "--steps",
        2,
        "--batch-size",
        2,
        "--n-test",
        2,
        "--threads",
        1,
        "--quiet",
    )
    assert result.exit_code == 0, result.output
    assert "exact match" in result.output and "2 tasks in" in result.output and "median" in result.output
    assert finished(tmp_path / "lib" / "upper") is not None


def test_cli_names_an_unknown_task_and_a_bad_count(tiny_base, tmp_path):
    result = cli("library", "build", "--base", tiny_base, "--tasks", "revers", "--out", tmp_path)
    assert result.exit_code == 2 and "did you mean" in result.output
    result = cli("library", "build", "--base", tiny_base, "--tasks", "reverse", "--out", tmp_path, "--steps", 0)
    assert result.exit_code == 2 and "--steps" in result.output


def test_cli_push_publishes_every_adapter_with_its_card(tiny_base, tmp_path, registry):  # noqa: F811
    out = tmp_path / "lib"
    result = cli(
        "library",
        "build",
        "--base",
        tiny_base,
        "--tasks",
        "upper,digits-reverse",
        "--out",
        out,
        "--steps",
        2,
        "--batch-size",
        2,
        "--n-test",
        2,
        "--quiet",
        "--push",
        "alice",
        "--endpoint",
        registry.url,
        "--token",
        ALICE_TOKEN,
    )
    assert result.exit_code == 0, result.output
    assert "pushed 2 adapters to alice" in result.output
    api = huggingface_hub.HfApi(endpoint=registry.url, token=ALICE_TOKEN)
    for task in ("upper", "digits-reverse"):
        card = api.hf_hub_download(f"alice/{task}", "README.md")
        text = Path(card).read_text()
        assert "exact_match" in text and "base_exact_match" in text and task in text
        pulled = Zoo(tiny_model("llama"), char_tokenizer(), device="cpu")
        pulled.load_adapter(task, f"alice/{task}", endpoint=registry.url, token=ALICE_TOKEN)
        assert torch.equal(
            next(iter(pulled.find_adapter(task).parameters())).float(),
            next(iter(_saved(out / task).find_adapter(task).parameters())).float(),
        )


def _saved(folder: Path) -> Zoo:
    zoo = Zoo(tiny_model("llama"), char_tokenizer(), device="cpu")
    zoo.load_adapter(folder.name, folder)
    return zoo


def test_every_task_has_three_training_phrasings_and_two_held_out_paraphrases_never_trained_on():
    from adapterzoo.tasks import all_tasks, instructed_examples, phrasings

    seen = set()
    for task in all_tasks().values():
        train, held_out = phrasings(task), phrasings(task, held_out=True)
        assert len(set(train)) == 3 and len(set(held_out)) == 2
        assert not set(train) & set(held_out)
        assert not set(train) & seen  # no two tasks share an instruction
        seen |= set(train)
        for ex in instructed_examples(task, 4, "test", held_out=True):
            instruction, _, rest = ex.prompt.partition(": ")
            assert instruction in held_out and task.example_for(_raw(task, rest)).answer == ex.answer


def test_routing_examples_ask_in_more_ways_but_never_in_a_held_out_paraphrase():
    from adapterzoo.tasks import all_tasks, phrasings, routing_examples, routing_phrasings

    seen: set[str] = set()
    for task in all_tasks().values():
        lines = routing_phrasings(task)
        assert lines[:3] == phrasings(task) and len(set(lines)) == 8
        assert not set(lines) & set(phrasings(task, held_out=True))
        assert not set(lines) & seen  # no two tasks share a routing phrasing
        seen |= set(lines)
        assert {p.partition(": ")[0] for p in routing_examples(task, 24)} == set(lines)


def _raw(task, rendered_prompt: str) -> str:
    """The raw input back from a rendered prompt ("h e l l o ->" -> "hello")."""
    text = rendered_prompt.removesuffix(" ->")
    return text.replace(" ", "") if task.kind == "word" else text
