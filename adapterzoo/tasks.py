"""Generated, seeded text tasks for training and checking many small adapters.

Why this module exists: routing tests, demos and benchmarks need *many* tasks
that the frozen base model fails, that a small adapter learns in minutes, and
that disagree with each other on the same input -- so "adapter k scores high on
task k and low on task j" is a real check. Every task here is a pure function
of a short random input, generated from a seeded :class:`random.Random`, and
scored by exact match.

Format (see ``docs/tasks.md``)::

    prompt  = "h e l l o ->"        # the input, never the task's name
    answer  = " k h o o r\\n"        # leading space, output, END_MARKER

A trainer trains on ``prompt + answer`` (:attr:`Example.text`) and masks the
prompt; an evaluator decodes greedily from ``prompt``, stops at a newline and
calls :meth:`Task.score`. Letters are space-separated so that each letter is
exactly one token for SmolLM2's BPE (and most others), which turns the cipher
tasks into per-token maps; digits are left unspaced because SmolLM2 already
splits every digit into its own token.

Train, validation and test inputs never overlap: the split of an input is a
stable hash of the input alone (not of the task), so a test input of one task
is never a training input of any task of the same input kind.

Pure standard library on purpose: it must import anywhere (CI, docs, encoders
without torch).
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import itertools
import random
import string
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from adapterzoo.errors import UnknownTaskError  # plain Python: no torch comes with it (adapterzoo/__init__.py)

__all__ = [
    "END_MARKER",
    "STOP_STRINGS",
    "SPLITS",
    "ARROW",
    "Example",
    "Task",
    "LabeledExample",
    "ClassificationTask",
    "UnknownTaskError",
    "normalize",
    "split_of",
    "sample_inputs",
    "all_tasks",
    "get_task",
    "all_classification_tasks",
    "get_classification_task",
    "phrasings",
    "instructed_examples",
]

#: What every answer ends with; the model learns to emit it, so generation can
#: stop on it. A newline is one token for SmolLM2 and never merges with the
#: letter, digit or number-word before it.
END_MARKER = "\n"

#: Strings that end a prediction: the end marker plus common EOS texts, in case
#: a decoder keeps special tokens.
STOP_STRINGS: tuple[str, ...] = (END_MARKER, "<|im_end|>", "<|endoftext|>", "</s>")

#: Separates input from answer in a prompt; one token (" ->") for SmolLM2.
ARROW = " ->"

#: Known splits and the share of the input space each gets (out of 10 hash buckets).
SPLITS: tuple[str, ...] = ("train", "val", "test")
_TEST_BUCKETS = frozenset({0})
_VAL_BUCKETS = frozenset({1})

_LETTERS = string.ascii_lowercase
_DIGITS = string.digits
_VOWELS = frozenset("aeiou")
_DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


# --------------------------------------------------------------------------- #
# Examples and scoring
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class Example:
    """One prompt and the exact continuation the model should produce.

    ``answer`` starts with a space (BPE attaches spaces to the following token,
    so the prompt tokenizes to a prefix of ``prompt + answer``) and ends with
    :data:`END_MARKER`.
    """

    prompt: str
    answer: str

    @property
    def text(self) -> str:
        """The full training string: ``prompt + answer``."""
        return self.prompt + self.answer

    @property
    def expected(self) -> str:
        """The answer as :func:`normalize` sees it; what a prediction must equal."""
        return normalize(self.answer)


def normalize(prediction: str) -> str:
    """Cut a decoded continuation at the first stop string, then strip it.

    Why not more lenient: the tasks are exact-match by design, so internal
    spacing and case must be right; only what surrounds the answer (the
    leading space, the end marker, whatever the model babbles after it) is
    forgiven.
    """
    cut = len(prediction)
    for stop in STOP_STRINGS:
        at = prediction.find(stop)
        if at != -1:
            cut = min(cut, at)
    return prediction[:cut].strip()


def _exact_match_rate(predictions: Sequence[str], examples: Sequence[Example]) -> float:
    if len(predictions) != len(examples):
        raise ValueError(f"{len(predictions)} predictions for {len(examples)} examples")
    if not examples:
        return 0.0
    hits = sum(normalize(p) == ex.expected for p, ex in zip(predictions, examples))
    return hits / len(examples)


# --------------------------------------------------------------------------- #
# Inputs: kinds, splits, seeded sampling
# --------------------------------------------------------------------------- #


def split_of(raw: str) -> str:
    """The split an input belongs to: a stable hash of the input alone.

    Hashing the input (rather than sampling each split from its own seed) makes
    the splits disjoint by construction and shared by every task of a kind, so
    evaluation inputs are unseen by *all* adapters, not just the one under test.
    ``hashlib`` rather than ``hash()``, which is salted per process.
    """
    digest = hashlib.blake2b(f"adapterzoo-split|{raw}".encode(), digest_size=8).digest()
    bucket = int.from_bytes(digest, "big") % 10
    if bucket in _TEST_BUCKETS:
        return "test"
    if bucket in _VAL_BUCKETS:
        return "val"
    return "train"


@dataclass(frozen=True)
class _InputKind:
    """How raw inputs of one kind are drawn and shown to the model."""

    name: str
    draw: Callable[[random.Random], str]
    render: Callable[[str], str]  # raw input -> prompt text before the arrow
    universe: Callable[[], list[str]] | None = None  # set for small, finite kinds


def _draw_word(rng: random.Random) -> str:
    return "".join(rng.choice(_LETTERS) for _ in range(rng.randint(3, 6)))


def _draw_number(rng: random.Random) -> str:
    length = rng.randint(3, 6)
    return rng.choice(_DIGITS[1:]) + "".join(rng.choice(_DIGITS) for _ in range(length - 1))


def _sum_universe() -> list[str]:
    return [f"{a}+{b}" for a in range(10, 100) for b in range(10, 100)]


def _draw_sum(rng: random.Random) -> str:
    return f"{rng.randint(10, 99)}+{rng.randint(10, 99)}"


def _spaced(text: str) -> str:
    """``"hello" -> "h e l l o"``: one token per letter for SmolLM2's BPE."""
    return " ".join(text)


def _identity(text: str) -> str:
    return text


_KINDS: dict[str, _InputKind] = {
    # random lowercase "words" of 3-6 letters, shown letter by letter
    "word": _InputKind("word", _draw_word, _spaced),
    # 3-6 digit numbers without a leading zero; SmolLM2 splits digits already
    "number": _InputKind("number", _draw_number, _identity),
    # "a+b" with two-digit operands (8100 inputs): sums are >= 20, so the plain
    # sum is never the answer of a mod-k task with k < 20
    "sum": _InputKind("sum", _draw_sum, _identity, _sum_universe),
}


def _rng(*parts: object) -> random.Random:
    """A Random seeded from a string (hashed with sha512, so independent of PYTHONHASHSEED)."""
    return random.Random("|".join(["adapterzoo", *map(str, parts)]))


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


@functools.cache
def _split_pool(kind: str, split: str) -> tuple[str, ...]:
    """All inputs of a finite kind that fall in ``split`` (cached: hashing them is the cost)."""
    universe = _KINDS[kind].universe
    assert universe is not None
    return tuple(raw for raw in universe() if split_of(raw) == split)


def _input_stream(kind: str, split: str, rng: random.Random) -> Iterator[str]:
    """Distinct inputs of ``kind`` in ``split``, in a seeded random order."""
    spec = _KINDS[kind]
    if spec.universe is not None:  # small space: shuffle it, so it can be exhausted exactly
        pool = list(_split_pool(kind, split))
        rng.shuffle(pool)
        yield from pool
        return
    seen: set[str] = set()
    misses = 0
    while misses < 100_000:  # only reached if a kind's space is nearly exhausted
        raw = spec.draw(rng)
        if raw in seen or split_of(raw) != split:
            misses += 1
            continue
        misses = 0
        seen.add(raw)
        yield raw


def sample_inputs(kind: str, n: int, split: str = "train", seed: int = 0) -> list[str]:
    """``n`` distinct raw inputs of ``kind`` from ``split``.

    Seeded by (kind, split, seed) and *not* by task, so every task of one kind
    gets the same inputs for the same seed: one batch of prompts can be sent to
    every adapter and the answers compared (that is what routing checks need).
    """
    _check_split(split)
    if kind not in _KINDS:
        raise ValueError(f"unknown input kind {kind!r}; expected one of {sorted(_KINDS)}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    out = list(itertools.islice(_input_stream(kind, split, _rng("inputs", kind, split, seed)), n))
    if len(out) < n:
        raise ValueError(f"only {len(out)} distinct {kind!r} inputs in split {split!r}, asked for {n}")
    return out


# --------------------------------------------------------------------------- #
# Generative tasks
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class Task:
    """A deterministic map from a raw input to an answer, with a neutral prompt.

    ``kind`` names the input kind ("word", "number" or "sum"); tasks of the same
    kind share prompts and differ only in their answers. ``difficulty`` is
    "easy" for tasks a LoRA r=8 learns in a few hundred CPU steps and "hard"
    for those that did not learn in that budget (see ``docs/tasks.md``): pick
    easy ones where a test needs an adapter that works.
    """

    name: str
    family: str
    description: str
    kind: str
    transform: Callable[[str], str] = field(repr=False, compare=False)
    difficulty: str = "easy"

    def __reduce__(self) -> tuple[Callable[[str], Task], tuple[str]]:
        """Pickle by name (the transform is often a lambda), e.g. for DataLoader workers."""
        return get_task, (self.name,)

    def example_for(self, raw: str) -> Example:
        """The example for one raw input (``"hello"``, ``"407"`` or ``"12+34"``)."""
        prompt = _KINDS[self.kind].render(raw) + ARROW
        return Example(prompt=prompt, answer=" " + self.transform(raw) + END_MARKER)

    def examples(self, n: int, split: str = "train", seed: int = 0) -> list[Example]:
        """``n`` examples with distinct inputs; same (split, seed) -> same examples."""
        return [self.example_for(raw) for raw in sample_inputs(self.kind, n, split, seed)]

    def score(self, predictions: Sequence[str], examples: Sequence[Example]) -> float:
        """Exact-match rate of ``normalize(prediction)`` against each example's answer."""
        return _exact_match_rate(predictions, examples)


# Output helpers: the answer text for a transformed letter string is spaced like
# the prompt, so input and output letters are the same kind of token.


def _letter_map(mapping: str) -> Callable[[str], str]:
    """A substitution cipher given as the images of a..z."""
    table = str.maketrans(_LETTERS, mapping)
    return lambda raw: _spaced(raw.translate(table))


def _digit_map(mapping: str) -> Callable[[str], str]:
    table = str.maketrans(_DIGITS, mapping)
    return lambda raw: raw.translate(table)


def _shifted(alphabet: str, k: int) -> str:
    return alphabet[k:] + alphabet[:k]


def _agreements(a: str, b: str) -> int:
    return sum(x == y for x, y in zip(a, b))


def _seeded_derangements(alphabet: str, count: int, avoid: Sequence[str], max_agree: int, salt: str) -> list[str]:
    """``count`` fixed-point-free permutations of ``alphabet``, generated in order.

    Each one agrees with every earlier one and with every map in ``avoid`` on at
    most ``max_agree`` symbols, so no two cipher tasks give the same answer on
    more than a sliver of inputs, and none copies a symbol (the base model's
    favourite guess). Generated sequentially from one seed, so perm ``i`` stays
    the same if ``count`` grows.
    """
    rng = _rng("derangements", salt)
    chosen: list[str] = []
    while len(chosen) < count:
        symbols = list(alphabet)
        rng.shuffle(symbols)
        candidate = "".join(symbols)
        if _agreements(candidate, alphabet) == 0 and all(
            _agreements(candidate, other) <= max_agree for other in [*avoid, *chosen]
        ):
            chosen.append(candidate)
    return chosen


def _pair_swap(raw: str) -> str:
    chars = list(raw)
    for i in range(0, len(chars) - 1, 2):
        chars[i], chars[i + 1] = chars[i + 1], chars[i]
    return "".join(chars)


N_CAESAR = 25
N_LETTER_PERMS = 50
N_DIGIT_PERMS = 15
ADD_MODULI: tuple[int, ...] = (7, 11, 13, 17, 19)


def _word_tasks() -> list[Task]:
    tasks = [
        Task(
            f"caesar-{k}",
            "caesar",
            f"shift each letter {k} places forward (z wraps to a)",
            "word",
            _letter_map(_shifted(_LETTERS, k)),
        )
        for k in range(1, N_CAESAR + 1)
    ]
    atbash = _LETTERS[::-1]
    avoid = [_shifted(_LETTERS, k) for k in range(1, 26)] + [atbash]
    perms = _seeded_derangements(_LETTERS, N_LETTER_PERMS, avoid, max_agree=3, salt="letters-v1")
    tasks += [
        Task(f"perm-{i:02d}", "perm", f"fixed seeded substitution cipher a..z -> {p}", "word", _letter_map(p))
        for i, p in enumerate(perms)
    ]
    tasks += [
        Task("atbash", "atbash", "mirror the alphabet (a<->z, b<->y, ...)", "word", _letter_map(atbash)),
        Task("reverse", "reorder", "reverse the word", "word", lambda raw: _spaced(raw[::-1])),
        Task("sort", "reorder", "sort the letters a..z", "word", lambda raw: _spaced("".join(sorted(raw)))),
        Task(
            "sort-desc",
            "reorder",
            "sort the letters z..a",
            "word",
            lambda raw: _spaced("".join(sorted(raw, reverse=True))),
        ),
        Task(
            "rotate-left", "reorder", "move the first letter to the end", "word", lambda raw: _spaced(raw[1:] + raw[:1])
        ),
        Task(
            "rotate-right",
            "reorder",
            "move the last letter to the front",
            "word",
            lambda raw: _spaced(raw[-1:] + raw[:-1]),
        ),
        Task(
            "pair-swap",
            "reorder",
            "swap letters 1-2, 3-4, 5-6 (an odd last letter stays)",
            "word",
            lambda raw: _spaced(_pair_swap(raw)),
        ),
        Task("double", "double", "write every letter twice", "word", lambda raw: _spaced("".join(c + c for c in raw))),
        Task("upper", "upper", "uppercase every letter", "word", lambda raw: _spaced(raw.upper())),
    ]
    return tasks


def _number_tasks() -> list[Task]:
    tasks = [
        Task(
            "digits-words",
            "digits-words",
            "spell each digit as an English word",
            "number",
            lambda raw: " ".join(_DIGIT_WORDS[int(d)] for d in raw),
            difficulty="hard",
        ),
        Task("digits-reverse", "digits-reorder", "reverse the digits", "number", lambda raw: raw[::-1]),
        Task("digits-sort", "digits-reorder", "sort the digits 0..9", "number", lambda raw: "".join(sorted(raw))),
    ]
    tasks += [
        Task(f"dshift-{k}", "dshift", f"add {k} to every digit, mod 10", "number", _digit_map(_shifted(_DIGITS, k)))
        for k in range(1, 10)
    ]
    avoid = [_shifted(_DIGITS, k) for k in range(1, 10)]
    perms = _seeded_derangements(_DIGITS, N_DIGIT_PERMS, avoid, max_agree=2, salt="digits-v1")
    tasks += [
        Task(f"dperm-{i:02d}", "dperm", f"fixed seeded digit substitution 0..9 -> {p}", "number", _digit_map(p))
        for i, p in enumerate(perms)
    ]
    return tasks


def _add_mod(k: int) -> Callable[[str], str]:
    def answer(raw: str) -> str:
        a, b = raw.split("+")
        return str((int(a) + int(b)) % k)

    return answer


def _sum_tasks() -> list[Task]:
    return [
        Task(f"addmod-{k}", "addmod", f"(a + b) mod {k}", "sum", _add_mod(k), difficulty="hard") for k in ADD_MODULI
    ]


@functools.lru_cache(maxsize=1)
def _task_registry() -> dict[str, Task]:
    tasks = [*_word_tasks(), *_number_tasks(), *_sum_tasks()]
    registry = {t.name: t for t in tasks}
    assert len(registry) == len(tasks), "duplicate task names"
    return registry


def all_tasks() -> dict[str, Task]:
    """Every generative task by name, in a stable order (a fresh dict each call)."""
    return dict(_task_registry())


def _lookup(name: str, registry: dict[str, object], what: str) -> object:
    try:
        return registry[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(registry), n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(list(registry)[:10])}, ..."
        raise UnknownTaskError(f"unknown {what} {name!r}{hint}") from None


def get_task(name: str) -> Task:
    """The task called ``name``; :class:`UnknownTaskError` (a KeyError) lists near misses."""
    task = _lookup(name, _task_registry(), "task")
    assert isinstance(task, Task)
    return task


# --------------------------------------------------------------------------- #
# Classification tasks (for encoders)
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class LabeledExample:
    """A text and the index of its label in :attr:`ClassificationTask.labels`."""

    text: str
    label: int


@dataclass(frozen=True)
class ClassificationTask:
    """Label a raw input; texts are rendered like generative prompts, minus the arrow.

    ``labels`` is a tuple (not a list) so the task stays hashable.
    """

    name: str
    description: str
    kind: str
    labels: tuple[str, ...]
    label_of: Callable[[str], int] = field(repr=False, compare=False)

    def __reduce__(self) -> tuple[Callable[[str], ClassificationTask], tuple[str]]:
        """Pickle by name, like :class:`Task`."""
        return get_classification_task, (self.name,)

    def examples(self, n: int, split: str = "train", seed: int = 0) -> list[LabeledExample]:
        """``n`` distinct inputs with balanced labels (class counts differ by at most 1).

        Balanced by drawing a label schedule first and then, for each slot, the
        next input of that class, so rare classes are not drowned out.
        """
        _check_split(split)
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        rng = _rng("classification", self.name, split, seed)
        schedule = [i % len(self.labels) for i in range(n)]
        rng.shuffle(schedule)
        waiting: dict[int, list[str]] = {i: [] for i in range(len(self.labels))}
        stream = _input_stream(self.kind, split, rng)
        render = _KINDS[self.kind].render
        out: list[LabeledExample] = []
        for label in schedule:
            while not waiting[label]:
                raw = next(stream, None)
                if raw is None:
                    raise ValueError(f"ran out of {self.kind!r} inputs for label {self.labels[label]!r}")
                waiting[self.label_of(raw)].append(raw)
            out.append(LabeledExample(render(waiting[label].pop(0)), label))
        return out

    def score(self, pred_labels: Sequence[int], examples: Sequence[LabeledExample]) -> float:
        """Accuracy of predicted label indices."""
        if len(pred_labels) != len(examples):
            raise ValueError(f"{len(pred_labels)} predictions for {len(examples)} examples")
        if not examples:
            return 0.0
        return sum(int(p) == ex.label for p, ex in zip(pred_labels, examples)) / len(examples)


def _vowel_bin(raw: str) -> int:
    return min(sum(c in _VOWELS for c in raw), 3)


@functools.lru_cache(maxsize=1)
def _classification_registry() -> dict[str, ClassificationTask]:
    tasks = [
        ClassificationTask(
            "has-qxz",
            "does the word contain q, x or z",
            "word",
            ("no", "yes"),
            lambda raw: int(any(c in "qxz" for c in raw)),
        ),
        ClassificationTask(
            "even", "is the number even", "number", ("odd", "even"), lambda raw: int(int(raw[-1]) % 2 == 0)
        ),
        ClassificationTask(
            "vowel-bins", "how many vowels (a e i o u) the word has", "word", ("0", "1", "2", "3+"), _vowel_bin
        ),
        ClassificationTask(
            "word-length", "how many letters the word has", "word", ("3", "4", "5", "6"), lambda raw: len(raw) - 3
        ),
    ]
    return {t.name: t for t in tasks}


def all_classification_tasks() -> dict[str, ClassificationTask]:
    """Every classification task by name, in a stable order (a fresh dict each call)."""
    return dict(_classification_registry())


def get_classification_task(name: str) -> ClassificationTask:
    """The classification task called ``name``; :class:`UnknownTaskError` lists near misses."""
    task = _lookup(name, _classification_registry(), "classification task")
    assert isinstance(task, ClassificationTask)
    return task


# --------------------------------------------------------------------------- #
# Instructions: what a user types before the input, for routing by prompt
# --------------------------------------------------------------------------- #
#
# The bare prompts above never name the task: only the adapter decides the answer. A router must
# instead pick the adapter from the prompt, so a request needs an instruction ("Reverse the word:
# h e l l o ->"). Each task has TRAIN_PHRASINGS (used to train the specialist and to build its
# routing prototypes) and HELD_OUT_PHRASINGS (worded differently, never seen in training: the
# routing benchmark measures on these, so a router that memorised the training wording fails).

_REORDER_PHRASINGS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "reverse": (
        ("Reverse the word", "Write the word backwards", "Spell it in reverse"),
        ("Flip the order of the letters", "Read these letters from right to left"),
    ),
    "sort": (
        ("Sort the letters alphabetically", "Put the letters in a to z order", "Alphabetize the letters"),
        ("Arrange these letters from a to z", "Order the characters alphabetically"),
    ),
    "sort-desc": (
        (
            "Sort the letters in reverse alphabetical order",
            "Put the letters in z to a order",
            "Sort the letters descending",
        ),
        ("Arrange these letters from z down to a", "Order the characters from last letter to first"),
    ),
    "rotate-left": (
        ("Move the first letter to the end", "Rotate the word left by one", "Shift the letters left once"),
        ("Take the leading letter and put it last", "Cycle the word one place to the left"),
    ),
    "rotate-right": (
        ("Move the last letter to the front", "Rotate the word right by one", "Shift the letters right once"),
        ("Take the final letter and put it first", "Cycle the word one place to the right"),
    ),
    "pair-swap": (
        ("Swap each pair of letters", "Exchange neighbouring letters in pairs", "Pairwise swap the letters"),
        ("Trade places within every couple of letters", "Switch letters one and two, three and four"),
    ),
    "double": (
        ("Write every letter twice", "Double each letter", "Repeat each letter two times"),
        ("Say each character two times in a row", "Duplicate all the letters"),
    ),
    "upper": (
        ("Uppercase the letters", "Write the word in capital letters", "Convert to upper case"),
        ("Make every letter a capital", "Shout this word in caps"),
    ),
    "atbash": (
        ("Apply the atbash cipher", "Mirror the alphabet on each letter", "Encode with atbash"),
        ("Swap a with z, b with y and so on", "Use the reversed-alphabet cipher"),
    ),
    "digits-words": (
        ("Spell each digit as a word", "Write the digits in English words", "Name each digit"),
        ("Say every digit out loud in words", "Turn the number into digit names"),
    ),
    "digits-reverse": (
        ("Reverse the digits", "Write the number backwards", "Flip the digits"),
        ("Read this number from right to left", "Put the digits in the opposite order"),
    ),
    "digits-sort": (
        ("Sort the digits ascending", "Put the digits in increasing order", "Sort the digits"),
        ("Arrange these digits from smallest to largest", "Order the numerals low to high"),
    ),
}


#: More ways to ask for each task, used only as routing examples (never trained on, and disjoint from
#: the held-out paraphrases the benchmarks test with): users word an instruction in more ways than
#: three training phrasings cover, and every phrasing a router has seen is one fewer it must guess
#: (on the 116 tasks' held-out paraphrases: right adapter 0.90 -> 0.93; among the 8 shipped: 0.72 -> 0.88).
_ROUTING_PHRASINGS: dict[str, tuple[str, ...]] = {
    "reverse": (
        "Write the letters in reverse order",
        "Backwards, please",
        "Mirror the word",
        "Reverse these letters",
        "Spell the word starting from its end",
    ),
    "sort": (
        "Sort these letters",
        "Alphabetical order, please",
        "Put the letters in alphabetical order",
        "Letters sorted a-z",
        "Order the letters by the alphabet",
    ),
    "sort-desc": (
        "Sort these letters from z to a",
        "Reverse alphabetical order, please",
        "Letters sorted z-a",
        "Put the letters in descending alphabetical order",
        "Order the letters by the alphabet, backwards",
    ),
    "rotate-left": (
        "Move the first character to the back",
        "Rotate left by one letter",
        "Send the first letter to the end of the word",
        "Left rotation of the letters",
        "Shift the word one step left",
    ),
    "rotate-right": (
        "Move the last character to the start",
        "Rotate right by one letter",
        "Bring the last letter to the beginning of the word",
        "Right rotation of the letters",
        "Shift the word one step right",
    ),
    "pair-swap": (
        "Swap adjacent letters two by two",
        "Exchange each letter with its neighbour",
        "Swap letters in pairs",
        "Pair up the letters and swap each pair",
        "Swap the 1st and 2nd letter, the 3rd and 4th, and so on",
    ),
    "double": (
        "Double the letters",
        "Repeat every letter",
        "Each letter two times",
        "Write each character twice",
        "Letters doubled",
    ),
    "upper": (
        "Capitalize every letter",
        "Make it uppercase",
        "All caps",
        "Turn the letters into capitals",
        "Write it in upper case",
    ),
    "atbash": (
        "Atbash the letters",
        "Replace each letter with its mirror in the alphabet",
        "Atbash encode",
        "Mirror cipher on the letters",
        "Atbash substitution",
    ),
    "digits-words": (
        "Write out each digit in words",
        "Digits as English words",
        "Spell out the digits",
        "Read the digits as words",
        "Convert each digit to its name",
    ),
    "digits-reverse": (
        "Reverse the number",
        "Digits in reverse order",
        "Write the digits backwards",
        "Mirror the number",
        "Flip the number around",
    ),
    "digits-sort": (
        "Sort the number's digits",
        "Digits in ascending order",
        "Ascending digits, please",
        "Sort these digits smallest first",
        "Put the digits in sorted order",
    ),
}


def _numbered_routing_phrasings(family: str, n: str) -> tuple[str, ...]:
    return {
        "caesar": (
            f"Rotate each letter forward by {n}",
            f"ROT{n} the letters",
            f"Caesar cipher with shift {n}",
            f"Advance every letter by {n} in the alphabet",
            f"Letter shift of {n} positions",
        ),
        "perm": (
            f"Substitute each letter per table {n}",
            f"Letter substitution number {n}",
            f"Map the letters through cipher {n}",
            f"Scramble letters with key {n}",
            f"Letter cipher no. {n}",
        ),
        "dshift": (
            f"Increment every digit by {n}",
            f"Each digit plus {n}, keeping the last digit",
            f"Push every digit {n} higher",
            f"Digit rotation by {n}",
            f"Bump the digits up by {n}",
        ),
        "dperm": (
            f"Substitute each digit per table {n}",
            f"Digit substitution number {n}",
            f"Map the digits through cipher {n}",
            f"Scramble digits with key {n}",
            f"Digit cipher no. {n}",
        ),
        "addmod": (
            f"Add the two numbers modulo {n}",
            f"The sum mod {n}",
            f"What is the sum modulo {n}",
            f"Add and reduce mod {n}",
            f"Modular addition, modulus {n}",
        ),
    }[family]


# A second, fresh held-out set, written on 2026-12-02 by someone not tuning the router: by then the
# router had been tuned while reading the held-out paraphrases above, so they were no longer an unseen
# test. These are disjoint from (and not one-word edits of) every training, held-out and routing
# phrasing of every task. Measure on them (``held_out="fresh"``, `benchmarks/routing.py --held-out
# fresh`); no router change may be tuned on them, or they stop being an honest test too.
_FRESH_PHRASINGS: dict[str, tuple[str, ...]] = {
    "reverse": (
        "Start from the final letter and spell the word back to the beginning",
        "Could you write this word out in the opposite direction?",
        "Turn the word around so it reads end to start",
    ),
    "sort": (
        "Rearrange the letters so they follow the alphabet, the one nearest a first",
        "Could you put these letters in the order they come in the alphabet?",
        "Give me the letters in dictionary order, earliest letter first",
    ),
    "sort-desc": (
        "Rearrange the letters so the one latest in the alphabet comes first",
        "Could you order these letters going backwards through the alphabet, z end first?",
        "List the letters from the end of the alphabet toward its start",
    ),
    "rotate-left": (
        "Take the opening letter off and stick it on after the rest",
        "Shift everything one position toward the front, wrapping the first letter around to the back",
        "Could you cut the initial character and append it after the last one?",
    ),
    "rotate-right": (
        "Take the closing letter off and stick it on before the rest",
        "Shift everything one position toward the back, wrapping the last letter around to the front",
        "Could you cut the final character and prepend it before the first one?",
    ),
    "pair-swap": (
        "Go through the letters two at a time and switch the two in each twosome, leaving any odd one out alone",
        "Could you flip every consecutive pair of letters (1st with 2nd, 3rd with 4th, and onward)?",
        "Interchange the letters in positions one-two, three-four, five-six",
    ),
    "double": (
        "Type each letter a second time right after itself",
        "Could you echo every character so it shows up twice?",
        "Put a copy of every letter right next to it",
    ),
    "upper": (
        "Change all the lowercase letters to capitals",
        "Could you write this in block capitals?",
        "Switch every letter to its upper-case form",
    ),
    "atbash": (
        "Replace every letter with the one the same distance from the other end of the alphabet",
        "Could you encode this by flipping the alphabet, so a becomes z and z becomes a?",
        "Use the cipher that reads the alphabet backwards, a for z, b for y",
    ),
    "digits-words": (
        "Write out the English name of every digit, one by one",
        "Could you replace each numeral with its English word?",
        "Read this number aloud one digit at a time as English words",
    ),
    "digits-reverse": (
        "Write the digits of this number starting from the last one",
        "Could you turn this number around so it reads back to front?",
        "Give me the number with its digit order reversed end to end",
    ),
    "digits-sort": (
        "Rearrange the digits from lowest to highest",
        "Could you list the digits of this number in ascending numeric order?",
        "Order all the digits so they go up from smallest to biggest",
    ),
}


def _fresh_family_phrasings(family: str, n: str) -> tuple[str, ...]:
    """The fresh held-out phrasings of a numbered family, for the task numbered ``n`` (see `_FRESH_PHRASINGS`)."""
    return {
        "caesar": (
            f"Replace every letter with whatever letter sits {n} after it in the alphabet, wrapping from z to a",
            f"Could you Caesar-encrypt this, shifting forward {n}?",
            f"Step each letter forward {n} in the alphabet, looping past z back to a",
        ),
        "perm": (
            f"Run the letters through substitution key number {n}",
            f"Could you scramble this with letter cipher #{n}?",
            f"Look up every letter in letter-substitution table {n}",
        ),
        "dshift": (
            f"Replace each digit d with (d + {n}) mod 10",
            f"Could you raise every single digit by {n}, looping back to 0 after 9?",
            f"Count {n} up from each digit, wrapping around after nine",
        ),
        "dperm": (
            f"Run the digits through substitution key number {n}",
            f"Could you scramble this number with digit cipher #{n}?",
            f"Look up every digit in digit-substitution table {n}",
        ),
        "addmod": (
            f"What do the two numbers add up to, modulo {n}?",
            f"Add these two numbers and give the remainder when divided by {n}",
            f"Compute (a + b) mod {n} for this pair of numbers",
        ),
    }[family]


def _family_phrasings(task: Task) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Phrasings for the numbered families, built from the number that tells the tasks apart."""
    n = task.name.rsplit("-", 1)[-1]
    if task.family == "caesar":
        return (
            (f"Caesar shift by {n}", f"Shift each letter {n} places forward", f"Encode with Caesar key {n}"),
            (f"Move every letter {n} steps along the alphabet", f"Apply a rotation of {n} to the letters"),
        )
    if task.family == "perm":
        return (
            (f"Apply letter cipher {n}", f"Encode with substitution cipher {n}", f"Letter code {n}"),
            (f"Use secret letter code number {n}", f"Encrypt the letters with cipher {n}"),
        )
    if task.family == "dshift":
        return (
            (f"Add {n} to each digit", f"Shift every digit up by {n}", f"Digit shift {n}"),
            (f"Increase all digits by {n}, wrapping past nine", f"Raise each numeral by {n} modulo ten"),
        )
    if task.family == "dperm":
        return (
            (f"Apply digit cipher {n}", f"Encode with digit substitution {n}", f"Digit code {n}"),
            (f"Use secret digit code number {n}", f"Encrypt the digits with cipher {n}"),
        )
    if task.family == "addmod":
        return (
            (f"Add modulo {n}", f"Sum the numbers mod {n}", f"Compute the sum modulo {n}"),
            (f"Find the remainder of the sum after dividing by {n}", f"Add them, then take mod {n}"),
        )
    return _REORDER_PHRASINGS[task.name]


def phrasings(task: Task | str, held_out: bool | str = False) -> tuple[str, ...]:
    """The instructions of a task: its training phrasings (``held_out=False``), the held-out
    paraphrases (``held_out=True``) or the fresh held-out set written later (``held_out="fresh"``,
    see `_FRESH_PHRASINGS`: the one to measure a tuned router on)."""
    task = get_task(task) if isinstance(task, str) else task
    if isinstance(held_out, str):
        if held_out != "fresh":
            raise ValueError(f"held_out must be False, True or 'fresh', got {held_out!r}")
        if task.name in _FRESH_PHRASINGS:
            return _FRESH_PHRASINGS[task.name]
        return _fresh_family_phrasings(task.family, task.name.rsplit("-", 1)[-1])
    train, test = _family_phrasings(task)
    return test if held_out else train


def routing_phrasings(task: Task | str) -> tuple[str, ...]:
    """The training phrasings and more ways to ask for the task: what its routing examples say."""
    task = get_task(task) if isinstance(task, str) else task
    extra = (
        _ROUTING_PHRASINGS[task.name]
        if task.name in _ROUTING_PHRASINGS
        else _numbered_routing_phrasings(task.family, task.name.rsplit("-", 1)[-1])
    )
    return phrasings(task) + extra


def routing_examples(task: Task | str, n: int = 24, seed: int = 0) -> list[str]:
    """``n`` routing-example prompts: training inputs under every phrasing of `routing_phrasings`, in turn."""
    task = get_task(task) if isinstance(task, str) else task
    lines = routing_phrasings(task)
    return [f"{lines[i % len(lines)]}: {ex.prompt}" for i, ex in enumerate(task.examples(n, "train", seed))]


def instructed_examples(
    task: Task | str, n: int, split: str = "train", seed: int = 0, held_out: bool | str = False
) -> list[Example]:
    """``n`` examples whose prompts start with an instruction: ``"Reverse the word: h e l l o ->"``.

    The phrasing cycles through the task's training phrasings (or, with ``held_out=True``, its
    held-out paraphrases; with ``held_out="fresh"``, its fresh held-out set: see `phrasings`), so
    every phrasing is seen equally often. Inputs, splits and answers are those of :meth:`Task.examples`.
    """
    task = get_task(task) if isinstance(task, str) else task
    lines = phrasings(task, held_out)
    out = []
    for i, ex in enumerate(task.examples(n, split, seed)):
        out.append(Example(prompt=f"{lines[i % len(lines)]}: {ex.prompt}", answer=ex.answer))
    return out
