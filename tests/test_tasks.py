"""Tests for adapterzoo.tasks: the generated task suite must be large, seeded,
split-disjoint, mutually disagreeing (so routing is checkable) and exactly scored.

Pure Python and fast on purpose: no model or tokenizer is loaded here.
"""

from __future__ import annotations

import importlib.util
import itertools
import pickle
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapterzoo.tasks import (
    ARROW,
    END_MARKER,
    SPLITS,
    ClassificationTask,
    Example,
    LabeledExample,
    Task,
    UnknownTaskError,
    all_classification_tasks,
    all_tasks,
    get_classification_task,
    get_task,
    normalize,
    sample_inputs,
    split_of,
)

TASKS = all_tasks()
TASK_NAMES = list(TASKS)
CLS_TASKS = all_classification_tasks()
KINDS = sorted({t.kind for t in TASKS.values()})

PROMPT_PATTERNS = {
    "word": re.compile(r"[a-z]( [a-z]){2,5} ->"),
    "number": re.compile(r"[1-9][0-9]{2,5} ->"),
    "sum": re.compile(r"[1-9][0-9]\+[1-9][0-9] ->"),
}


# --------------------------------------------------------------------------- #
# The suite
# --------------------------------------------------------------------------- #


def test_at_least_100_tasks_with_unique_stable_names() -> None:
    assert len(TASKS) >= 100
    assert all(name == task.name for name, task in TASKS.items())
    assert len({t.name for t in TASKS.values()}) == len(TASKS)
    assert list(all_tasks()) == TASK_NAMES  # stable order across calls
    all_tasks().clear()  # callers get a copy; the registry is untouched
    assert list(all_tasks()) == TASK_NAMES


def test_expected_families_and_counts() -> None:
    families = Counter(t.family for t in TASKS.values())
    assert families["caesar"] == 25
    assert families["perm"] == 50
    for name in ["caesar-1", "caesar-25", "perm-00", "perm-49", "reverse", "sort", "digits-words", "addmod-7"]:
        assert name in TASKS


def test_at_least_100_easy_tasks_and_hard_ones_are_marked() -> None:
    """Tests that need a working adapter pick easy tasks; there must be plenty."""
    difficulties = Counter(t.difficulty for t in TASKS.values())
    assert set(difficulties) <= {"easy", "hard"}
    assert difficulties["easy"] >= 100
    assert get_task("caesar-3").difficulty == "easy"
    assert get_task("digits-words").difficulty == get_task("addmod-7").difficulty == "hard"
    assert set(KINDS) == set(PROMPT_PATTERNS)


@pytest.mark.parametrize(
    ("name", "raw", "expected"),
    [
        ("caesar-3", "hello", "k h o o r"),
        ("caesar-1", "xyz", "y z a"),
        ("caesar-25", "abc", "z a b"),
        ("atbash", "abz", "z y a"),
        ("reverse", "hello", "o l l e h"),
        ("sort", "hello", "e h l l o"),
        ("sort-desc", "hello", "o l l h e"),
        ("rotate-left", "hello", "e l l o h"),
        ("rotate-right", "hello", "o h e l l"),
        ("pair-swap", "hello", "e h l l o"),
        ("double", "abc", "a a b b c c"),
        ("upper", "abc", "A B C"),
        ("digits-words", "407", "four zero seven"),
        ("digits-reverse", "407", "704"),
        ("digits-sort", "407", "047"),
        ("dshift-3", "407", "730"),
        ("addmod-7", "12+34", "4"),
        ("addmod-19", "99+99", "8"),
        # seeded ciphers are pinned: trained adapters depend on them never changing
        ("perm-00", "hello", "c o u u n"),
        ("perm-39", "hello", "w g y y k"),
        ("perm-49", "hello", "u y k k g"),
        ("dperm-00", "407", "083"),
        ("dperm-14", "407", "375"),
    ],
)
def test_known_answers(name: str, raw: str, expected: str) -> None:
    example = get_task(name).example_for(raw)
    assert example.expected == expected
    assert example.answer == f" {expected}{END_MARKER}"


def test_prompt_and_answer_format() -> None:
    ex = get_task("caesar-3").example_for("hello")
    assert ex == Example(prompt="h e l l o ->", answer=" k h o o r\n")
    assert ex.text == "h e l l o -> k h o o r\n"
    assert get_task("dshift-3").example_for("407").text == "407 -> 730\n"
    assert get_task("digits-words").example_for("407").text == "407 -> four zero seven\n"
    assert get_task("addmod-7").example_for("12+34").text == "12+34 -> 4\n"


def test_tasks_of_one_kind_share_prompts_so_the_prompt_never_names_the_task() -> None:
    for kind in KINDS:
        prompts = {tuple(e.prompt for e in t.examples(5, "test", 3)) for t in TASKS.values() if t.kind == kind}
        assert len(prompts) == 1, kind


# --------------------------------------------------------------------------- #
# Well-formedness, determinism, splits
# --------------------------------------------------------------------------- #


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(TASK_NAMES),
    split=st.sampled_from(SPLITS),
    seed=st.integers(min_value=-(2**40), max_value=2**40),
    n=st.integers(min_value=0, max_value=12),
)
def test_examples_are_well_formed_for_any_seed(name: str, split: str, seed: int, n: int) -> None:
    task = TASKS[name]
    examples = task.examples(n, split, seed)
    assert len(examples) == n
    assert len({e.prompt for e in examples}) == n  # distinct inputs
    for ex in examples:
        assert PROMPT_PATTERNS[task.kind].fullmatch(ex.prompt), ex.prompt
        assert ex.prompt.endswith(ARROW)
        assert ex.answer.startswith(" ") and not ex.answer.startswith("  ")
        assert ex.answer.endswith(END_MARKER) and ex.text.count("\n") == 1
        assert ex.expected and ex.expected == ex.expected.strip()
        assert task.name not in ex.prompt
        raw = ex.prompt[: -len(ARROW)].replace(" ", "")
        assert split_of(raw) == split
        assert task.example_for(raw) == ex
    assert task.score([e.answer for e in examples], examples) == (1.0 if n else 0.0)


def test_same_seed_same_examples_different_seed_different_examples() -> None:
    for task in TASKS.values():
        first = task.examples(8, "train", seed=5)
        assert task.examples(8, "train", seed=5) == first
        assert task.examples(8, "train", seed=6) != first
        assert task.examples(8, "test", seed=5) != first


@pytest.mark.parametrize("kind", KINDS)
def test_splits_are_disjoint(kind: str) -> None:
    by_split = {split: {raw for seed in range(3) for raw in sample_inputs(kind, 200, split, seed)} for split in SPLITS}
    for a, b in itertools.combinations(SPLITS, 2):
        assert not by_split[a] & by_split[b], (a, b)
    for split, raws in by_split.items():
        assert all(split_of(raw) == split for raw in raws)


def test_split_shares_are_roughly_80_10_10() -> None:
    counts = Counter(split_of(f"w{i}") for i in range(5000))
    assert 0.75 < counts["train"] / 5000 < 0.85
    assert 0.07 < counts["test"] / 5000 < 0.13
    assert 0.07 < counts["val"] / 5000 < 0.13


def test_bad_arguments_are_rejected() -> None:
    task = get_task("reverse")
    with pytest.raises(ValueError, match="split"):
        task.examples(3, "dev")
    with pytest.raises(ValueError):
        task.examples(-1)
    with pytest.raises(ValueError, match="kind"):
        sample_inputs("sentence", 3)
    with pytest.raises(ValueError, match="inputs"):
        get_task("addmod-7").examples(5000, "test")  # only ~800 "a+b" test inputs exist


# --------------------------------------------------------------------------- #
# Tasks must disagree (routing is checkable) and the base must not get them free
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("kind", KINDS)
def test_every_pair_of_tasks_disagrees_on_most_shared_inputs(kind: str) -> None:
    raws = sample_inputs(kind, 50, "test", seed=0)
    answers = {t.name: [t.transform(r) for r in raws] for t in TASKS.values() if t.kind == kind}
    worst = []
    for a, b in itertools.combinations(answers, 2):
        same = sum(x == y for x, y in zip(answers[a], answers[b]))
        if same > 0.2 * len(raws):
            worst.append((a, b, same))
    assert not worst


def test_no_task_is_a_copy_of_its_input() -> None:
    """A copy is the base model's easiest guess, so it must be wrong nearly always.

    (Only the sorting tasks come close: ~5% of random words are already sorted.)
    """
    raws = {kind: sample_inputs(kind, 200, "test", seed=1) for kind in KINDS}
    for task in TASKS.values():
        examples = [task.example_for(raw) for raw in raws[task.kind]]
        copies = sum(e.expected == e.prompt[: -len(ARROW)] for e in examples)
        assert copies <= 20, (task.name, copies)


# --------------------------------------------------------------------------- #
# Scoring
# --------------------------------------------------------------------------- #


def test_normalize_strips_and_cuts_at_end_marker() -> None:
    assert normalize(" k h o o r\n") == "k h o o r"
    assert normalize("  k h o o r   ") == "k h o o r"
    assert normalize(" k h o o r\nh e l l o -> x y") == "k h o o r"
    assert normalize(" k h o o r<|im_end|>junk") == "k h o o r"
    assert normalize(" k h o o r</s>") == "k h o o r"
    assert normalize("\n k h o o r") == ""
    assert normalize("") == ""


def test_score_is_exact_match_after_normalising() -> None:
    task = get_task("caesar-3")
    examples = [task.example_for("hello"), task.example_for("abc")]  # "k h o o r", "d e f"
    assert task.score([" k h o o r\n", " d e f\n"], examples) == 1.0
    assert task.score(["k h o o r", "  d e f  \n\nmore"], examples) == 1.0
    assert task.score([" k h o o r\n", " d e g\n"], examples) == 0.5
    assert task.score(["khoor", "D E F"], examples) == 0.0  # spacing and case matter
    assert task.score(["k h o o r -> x", "d  e f"], examples) == 0.0
    assert task.score([], []) == 0.0
    with pytest.raises(ValueError):
        task.score(["k h o o r"], examples)


def test_a_task_scores_zero_on_another_tasks_answers() -> None:
    examples = get_task("caesar-3").examples(50, "test")
    for other in ["caesar-4", "perm-00", "reverse", "sort", "atbash"]:
        answers = [e.answer for e in get_task(other).examples(50, "test")]
        assert get_task("caesar-3").score(answers, examples) <= 0.1


# --------------------------------------------------------------------------- #
# Lookup
# --------------------------------------------------------------------------- #


def test_unknown_task_name_lists_close_names() -> None:
    with pytest.raises(KeyError) as info:
        get_task("caesar-30")
    assert isinstance(info.value, UnknownTaskError)
    message = str(info.value)
    assert message.startswith("unknown task 'caesar-30'")
    assert "caesar-3" in message
    with pytest.raises(UnknownTaskError, match="known:"):
        get_task("qqqqqqqqqq")
    with pytest.raises(UnknownTaskError, match="even"):
        get_classification_task("evne")


def test_get_task_returns_registered_task() -> None:
    assert get_task("perm-07") is TASKS["perm-07"]
    assert isinstance(get_task("perm-07"), Task)


def test_tasks_pickle_by_name() -> None:
    """Transforms are lambdas; pickling by name keeps tasks usable in worker processes."""
    for task in [get_task("reverse"), get_task("perm-03"), get_classification_task("even")]:
        assert pickle.loads(pickle.dumps(task)) is task


def test_module_is_pure_python() -> None:
    """Import the file alone (not via the package) and check no ML library came with it."""
    path = Path(__file__).resolve().parents[1] / "adapterzoo" / "tasks.py"
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('tasks_alone', {str(path)!r})\n"
        "mod = importlib.util.module_from_spec(spec); sys.modules['tasks_alone'] = mod\n"
        "spec.loader.exec_module(mod)\n"
        "assert len(mod.all_tasks()) >= 100\n"
        "bad = [m for m in ('torch', 'transformers', 'numpy') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    assert importlib.util.find_spec("adapterzoo.tasks") is not None
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# --------------------------------------------------------------------------- #
# Classification tasks
# --------------------------------------------------------------------------- #


def test_at_least_three_classification_tasks() -> None:
    assert len(CLS_TASKS) >= 3
    for name, task in CLS_TASKS.items():
        assert isinstance(task, ClassificationTask) and task.name == name
        assert len(task.labels) >= 2 and len(set(task.labels)) == len(task.labels)


@pytest.mark.parametrize("name", list(CLS_TASKS))
@pytest.mark.parametrize("n", [0, 1, 10, 41])
def test_classification_is_balanced_and_correctly_labelled(name: str, n: int) -> None:
    task = CLS_TASKS[name]
    examples = task.examples(n, "train", seed=2)
    assert len(examples) == n and len({e.text for e in examples}) == n
    counts = Counter(e.label for e in examples)
    if n >= len(task.labels):
        assert set(counts) == set(range(len(task.labels)))
    assert max(counts.values(), default=0) - min(counts.values(), default=0) <= 1
    for ex in examples:
        assert isinstance(ex, LabeledExample)
        assert task.label_of(ex.text.replace(" ", "")) == ex.label


@pytest.mark.parametrize("name", list(CLS_TASKS))
def test_classification_is_seeded_and_split_disjoint(name: str) -> None:
    task = CLS_TASKS[name]
    first = task.examples(40, "train", seed=1)
    assert task.examples(40, "train", seed=1) == first
    assert task.examples(40, "train", seed=2) != first
    texts = {split: {e.text for e in task.examples(200, split, seed=0)} for split in SPLITS}
    for a, b in itertools.combinations(SPLITS, 2):
        assert not texts[a] & texts[b]


def test_classification_labels_are_meaningful() -> None:
    has_qxz = get_classification_task("has-qxz")
    assert [has_qxz.label_of(w) for w in ["hello", "quiz", "box"]] == [0, 1, 1]
    even = get_classification_task("even")
    assert [even.labels[even.label_of(n)] for n in ["407", "408"]] == ["odd", "even"]
    bins = get_classification_task("vowel-bins")
    assert [bins.labels[bins.label_of(w)] for w in ["xyz", "hello", "audio", "aei"]] == ["0", "2", "3+", "3+"]


def test_classification_score() -> None:
    task = get_classification_task("even")
    examples = task.examples(10, "test")
    truth = [e.label for e in examples]
    assert task.score(truth, examples) == 1.0
    assert task.score([1 - t for t in truth], examples) == 0.0
    assert task.score([], []) == 0.0
    with pytest.raises(ValueError):
        task.score(truth[:-1], examples)


# --------------------------------------------------------------------------- #
# Instructions: the fresh held-out set (held_out="fresh") and the first one (held_out=True)
# --------------------------------------------------------------------------- #


def _raw_of(task: Task, rendered: str) -> str:
    """The raw input back from a rendered prompt ("h e l l o ->" -> "hello")."""
    text = rendered.removesuffix(ARROW)
    return text.replace(" ", "") if task.kind == "word" else text


def test_every_task_has_three_distinct_fresh_held_out_phrasings() -> None:
    from adapterzoo.tasks import phrasings

    for task in TASKS.values():
        fresh = phrasings(task, held_out="fresh")
        assert isinstance(fresh, tuple) and len(fresh) == 3
        assert len({p.lower() for p in fresh}) == 3, task.name


def test_no_fresh_phrasing_equals_any_other_phrasing_of_any_task_ignoring_case() -> None:
    from adapterzoo.tasks import phrasings, routing_phrasings

    existing: set[str] = set()
    for task in TASKS.values():  # training + routing-only + the first held-out set, of every task
        existing |= {p.lower() for p in (*routing_phrasings(task), *phrasings(task, held_out=True))}
    fresh = [p.lower() for task in TASKS.values() for p in phrasings(task, held_out="fresh")]
    assert len(set(fresh)) == len(fresh) == 3 * len(TASKS)  # no two tasks (or one task twice) share one
    assert not set(fresh) & existing


def test_fresh_phrasings_are_single_lines_without_the_instruction_separator() -> None:
    from adapterzoo.tasks import phrasings

    for task in TASKS.values():
        for line in phrasings(task, held_out="fresh"):
            assert ": " not in line and "\n" not in line and "\r" not in line, (task.name, line)
            assert line == line.strip() and line


def test_numbered_tasks_fresh_phrasings_name_their_own_number() -> None:
    from adapterzoo.tasks import phrasings

    for task in TASKS.values():
        if task.family in {"caesar", "perm", "dshift", "dperm", "addmod"}:
            number = task.name.rsplit("-", 1)[-1]
            assert all(re.search(rf"(?<!\d){number}(?!\d)", p) for p in phrasings(task, held_out="fresh"))


def test_fresh_instructed_examples_start_with_a_fresh_phrasing_and_keep_the_answers() -> None:
    from adapterzoo.tasks import instructed_examples, phrasings

    for task in TASKS.values():
        fresh = phrasings(task, held_out="fresh")
        examples = instructed_examples(task, 6, "test", seed=3, held_out="fresh")
        plain = task.examples(6, "test", seed=3)
        instructions = []
        for ex, bare in zip(examples, plain):
            instruction, _, rest = ex.prompt.partition(": ")
            assert instruction in fresh and rest == bare.prompt and ex.answer == bare.answer
            assert task.example_for(_raw_of(task, rest)).answer == ex.answer
            instructions.append(instruction)
        assert set(instructions) == set(fresh)  # cycles through all three


def test_held_out_true_is_unchanged_by_the_fresh_set() -> None:
    """The first held-out set (phrasings and the examples built on it) is pinned to what it was
    before the fresh set was added: benchmarks measured on it stay comparable."""
    import hashlib
    import json

    from adapterzoo.tasks import instructed_examples, phrasings

    assert phrasings("reverse", held_out=True) == (
        "Flip the order of the letters",
        "Read these letters from right to left",
    )
    held = {name: list(phrasings(task, held_out=True)) for name, task in TASKS.items()}
    assert (
        hashlib.sha256(json.dumps(held).encode()).hexdigest()
        == "7da3206920d7a6136b92c92a30c508a8febe25ed790f5c9eebe315fb28e4749e"
    )
    prompts = {
        name: [e.prompt + e.answer for e in instructed_examples(task, 4, "test", seed=3, held_out=True)]
        for name, task in TASKS.items()
    }
    assert (
        hashlib.sha256(json.dumps(prompts).encode()).hexdigest()
        == "7fa2d794188651fe3d3e7ca738f44f3b27c2e219b024a88b9189a7997b33b9a8"
    )
    for task in TASKS.values():
        assert phrasings(task, held_out=False) == phrasings(task)
        assert not set(phrasings(task, held_out=True)) & set(phrasings(task, held_out="fresh"))


def test_an_unknown_held_out_set_is_rejected() -> None:
    from adapterzoo.tasks import instructed_examples, phrasings

    with pytest.raises(ValueError, match="fresh"):
        phrasings("reverse", held_out="paraphrases")
    with pytest.raises(ValueError):
        instructed_examples("reverse", 2, "test", held_out="Fresh")
