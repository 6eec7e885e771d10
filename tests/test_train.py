"""Training: one adapter or many at once, on tiny seeded bases.

What is checked: adapters learn (loss falls a lot, exact match rises on a trivially learnable
mapping); only the trained adapter's tensors change (base checksum, other adapters); N adapters of
mixed types trained in one mixed batch end where each ends trained alone; a resumed run is bit
for bit the uninterrupted one; early stopping; nan handling; every bad input; classification
heads (save/load/swap, mixed heads in one batch, a classifier trained on a tiny BERT).
"""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch

from adapterzoo import (
    AdapterFileError,
    InvalidConfigError,
    ShapeMismatchError,
    TrainingDivergedError,
    TrainingError,
    UnknownAdapterError,
    Zoo,
)
from adapterzoo.base import base_state_checksum
from adapterzoo.errors import UnsupportedFormatError
from adapterzoo.formats.native import CONFIG_FILE
from adapterzoo.tasks import Example, LabeledExample
from adapterzoo.testing.models import char_tokenizer, tiny_model
from adapterzoo.training import CHECKPOINT_VERSION, TrainOptions, latest_checkpoint, lr_factor

TYPES = {
    "lora": {"r": 4, "target_modules": "all-linear", "lora_alpha": 8},
    "houlsby": {"bottleneck": 8},
    "bitfit": {},
    "adapterbias": {},
    "prefix": {"num_virtual_tokens": 3},
    "soft_prompt": {"num_virtual_tokens": 3},
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest, and reproducibly, on one thread (the box's cores are shared)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def learnable_zoo(family: str = "llama", **kwargs) -> Zoo:
    """A tiny random base whose output head is scaled up: with the usual 0.02 init, a 32-wide
    model can barely move its logits, and nothing would learn in a few steps."""
    model = tiny_model(family)
    head = model.get_output_embeddings()
    if head is not None:
        with torch.no_grad():
            head.weight.mul_(20)
    kwargs.setdefault("device", "cpu")
    return Zoo(model, char_tokenizer(), **kwargs)


def words(n: int, seed: int = 0, letters: str = "abcdefgh") -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(letters) for _ in range(3)) for _ in range(n)]


def const_examples(answer: str, n: int = 48, seed: int = 0) -> list[Example]:
    return [Example(f"{w} ->", f" {answer}\n") for w in words(n, seed)]


def first_letter_examples(n: int = 48, seed: int = 0) -> list[Example]:
    return [Example(f"{w} ->", f" {w[0].upper()}\n") for w in words(n, seed)]


def state(zoo: Zoo, name: str) -> list[torch.Tensor]:
    return [p.detach().clone() for p in zoo.get_adapter(name).parameters()]


QUIET = {"progress": False}


# ----------------------------------------------------------------------------- learning


def test_lora_learns_a_mapping_and_only_its_tensors_change():
    zoo = learnable_zoo()
    checksum = base_state_checksum(zoo.model)
    zoo.add_adapter("ok", "lora", **TYPES["lora"])
    zoo.add_adapter("other", "houlsby", bottleneck=4)
    other = state(zoo, "other")
    before = state(zoo, "ok")
    examples = const_examples("ok")
    report = zoo.train("ok", examples[:40], eval_examples=examples[40:], max_steps=30, lr=1e-2, batch_size=8, **QUIET)
    r = report["ok"]
    history = [h for h in r.history if "train_loss" in h]
    assert history[0]["train_loss"] > 5 and r.final_train_loss < 0.1  # the loss falls a lot
    assert r.best_eval == 1.0 and r.metric == "exact_match"
    assert zoo.generate(["xyz ->"], ["ok"], max_new_tokens=4, stop=["\n"])[0].strip() == "ok"
    assert zoo.generate(["xyz ->"], [None], max_new_tokens=4)[0].strip() != "ok"  # the base does not
    assert base_state_checksum(zoo.model) == checksum  # the base is bit for bit unchanged
    assert all(torch.equal(a, b) for a, b in zip(other, state(zoo, "other")))  # and so is every other adapter
    assert not all(torch.equal(a, b) for a, b in zip(before, state(zoo, "ok")))
    assert r.steps == 30 and r.tokens > 0 and r.tokens_per_s > 0 and report.steps == 30
    assert "ok" in str(report) and "exact_match" in str(report)


# (lr, fraction of the first loss the last must be under); virtual tokens have little grip on a
# random 2-layer, 32-wide model (its attention is near uniform), so they are held to less
LOWERS = {
    "houlsby": (3e-2, 0.6),
    "bitfit": (3e-2, 0.6),
    "adapterbias": (3e-2, 0.6),
    "prefix": (0.1, 0.6),
    "soft_prompt": (0.1, 0.9),
}


@pytest.mark.parametrize("type_name", list(LOWERS))
def test_every_type_lowers_the_loss(type_name):
    zoo = learnable_zoo()
    checksum = base_state_checksum(zoo.model)
    zoo.add_adapter("a", type_name, **TYPES[type_name])
    lr, fraction = LOWERS[type_name]
    report = zoo.train("a", const_examples("ok"), max_steps=25, lr=lr, batch_size=8, **QUIET)
    losses = [h["train_loss"] for h in report["a"].history]
    assert losses[-1] < fraction * losses[0], losses
    assert base_state_checksum(zoo.model) == checksum


def test_lr_schedule_warmup_then_decay():
    assert lr_factor(0, 10, 2, "linear") == pytest.approx(1 / 3)
    assert lr_factor(1, 10, 2, "linear") == pytest.approx(2 / 3)
    assert lr_factor(2, 10, 2, "linear") == 1.0
    assert lr_factor(9, 10, 2, "linear") == pytest.approx(1 / 8)
    assert lr_factor(6, 10, 2, "cosine") == pytest.approx(0.5)
    assert lr_factor(9, 10, 0, "constant") == 1.0


def test_default_learning_rate_comes_from_the_type():
    zoo = learnable_zoo()
    zoo.add_adapter("p", "soft_prompt", num_virtual_tokens=2)
    zoo.add_adapter("l", "lora", r=2)
    report = zoo.train(["p", "l"], [const_examples("a", 8), const_examples("b", 8)], max_steps=1, **QUIET)
    assert report["p"].lr == zoo.adapter_type("soft_prompt").default_lr
    assert report["l"].lr == zoo.adapter_type("lora").default_lr
    assert report["p"].lr > report["l"].lr


# ----------------------------------------------------------------------------- many at once


MIXED = ["lora", "houlsby", "prefix", "soft_prompt", "bitfit", "adapterbias"]


def _mixed_run(together: bool):
    zoo = learnable_zoo()
    data = {}
    for i, t in enumerate(MIXED):
        zoo.add_adapter(f"{t}-x", t, seed=i, **TYPES[t])
        # different sizes, so adapters run out of data at different steps and drop out
        data[f"{t}-x"] = (
            first_letter_examples(10 + 4 * i, seed=i) if i % 2 else const_examples(t[:2], 10 + 4 * i, seed=i)
        )
    options = dict(epochs=2, lr=1e-2, batch_size=4, grad_accum=2, seed=[3, 1, 4, 1, 5, 9], **QUIET)
    if together:
        report = zoo.train(list(data), list(data.values()), **options)
    else:
        seeds = options.pop("seed")
        report = {}
        for k, (name, exs) in enumerate(data.items()):
            report[name] = zoo.train(name, exs, seed=seeds[k], **options)[name]
    return zoo, data, report


def test_many_at_once_equals_each_alone():
    """Six adapters of six types in one mixed batch end where each ends when trained alone."""
    joint, data, joint_report = _mixed_run(together=True)
    solo, _, solo_report = _mixed_run(together=False)
    steps = {n: joint_report[n].steps for n in data}
    assert len(set(steps.values())) > 1  # data ran out at different steps
    for name in data:
        assert joint_report[name].steps == solo_report[name].steps
        assert joint_report[name].tokens == solo_report[name].tokens
        a, b = state(joint, name), state(solo, name)
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, atol=2e-5, rtol=1e-4)  # the stated tolerance: float noise only
        losses_joint = [h["train_loss"] for h in joint_report[name].history]
        losses_solo = [h["train_loss"] for h in solo_report[name].history]
        assert losses_joint == pytest.approx(losses_solo, rel=1e-4, abs=1e-5)


def test_many_at_once_examples_as_a_dict_and_per_adapter_lr():
    zoo = learnable_zoo()
    zoo.add_adapter("a", "lora", r=2)
    zoo.add_adapter("b", "bitfit")
    report = zoo.train(
        ["a", "b"],
        {"b": const_examples("b", 8), "a": const_examples("a", 8)},
        lr={"a": 1e-3, "b": 2e-2},
        max_steps=2,
        **QUIET,
    )
    assert report["a"].lr == 1e-3 and report["b"].lr == 2e-2 and report.steps == 2


# ----------------------------------------------------------------------------- checkpoints


def _resumable(zoo: Zoo):
    zoo.add_adapter("l", "lora", seed=1, **TYPES["lora"])
    zoo.add_adapter("p", "prefix", seed=2, num_virtual_tokens=2)
    return (
        ["l", "p"],
        [first_letter_examples(24, 0), const_examples("pp", 20, 1)],
        dict(max_steps=8, lr=1e-2, batch_size=4, grad_accum=2, eval_every=3, checkpoint_every=2, **QUIET),
        [first_letter_examples(6, 9), const_examples("pp", 6, 9)],
    )


def test_resume_is_bit_identical(tmp_path):
    torch.manual_seed(0)
    full = learnable_zoo()
    names, data, options, held = _resumable(full)
    expected = full.train(names, data, eval_examples=held, checkpoint_dir=tmp_path / "a", **options)

    class Stop(Exception):
        pass

    def crash(info):
        if info.step == 4:
            raise Stop

    torch.manual_seed(0)
    first = learnable_zoo()
    names, data, options, held = _resumable(first)
    with pytest.raises(Stop):
        first.train(names, data, eval_examples=held, checkpoint_dir=tmp_path / "b", on_step=crash, **options)
    assert latest_checkpoint(tmp_path / "b").name == "step-00000004"
    assert len(list((tmp_path / "b").glob("step-*"))) == 2  # keep_checkpoints=2; no temporary folders left
    assert not list((tmp_path / "b").glob(".*"))

    torch.manual_seed(123)  # the checkpoint brings back the RNG state too
    resumed = learnable_zoo()  # a fresh process, as far as the adapters are concerned
    names, data, options, held = _resumable(resumed)
    report = resumed.train(names, data, eval_examples=held, checkpoint_dir=tmp_path / "b", resume=True, **options)
    assert report.resumed_from == 4 and report.steps == 8
    for name in names:
        for x, y in zip(state(full, name), state(resumed, name)):
            assert torch.equal(x, y), name
        assert report[name].history == expected[name].history
        assert report[name].best_eval == expected[name].best_eval


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path):
    zoo = learnable_zoo()
    zoo.add_adapter("l", "lora", r=2)
    zoo.train("l", const_examples("a", 8), max_steps=2, checkpoint_dir=tmp_path, checkpoint_every=1, **QUIET)
    other = learnable_zoo()
    other.add_adapter("l", "lora", r=2)
    with pytest.raises(TrainingError, match="different training run"):
        other.train(
            "l", const_examples("a", 8), max_steps=2, batch_size=4, checkpoint_dir=tmp_path, resume=True, **QUIET
        )


def test_resume_refuses_other_examples_of_the_same_count(tmp_path):
    zoo = learnable_zoo()
    zoo.add_adapter("l", "lora", r=2)
    zoo.train("l", const_examples("a", 8), max_steps=2, checkpoint_dir=tmp_path, checkpoint_every=1, **QUIET)
    other = learnable_zoo()
    other.add_adapter("l", "lora", r=2)
    before = state(other, "l")
    with pytest.raises(TrainingError, match="different training run") as info:
        other.train("l", const_examples("b", 8), max_steps=4, checkpoint_dir=tmp_path, resume=True, **QUIET)
    assert "examples_sha256 of 'l'" in str(info.value)  # says what differs: the data, not its size
    assert all(torch.equal(x, y) for x, y in zip(before, state(other, "l")))
    # the same examples resume
    report = other.train("l", const_examples("a", 8), max_steps=4, checkpoint_dir=tmp_path, resume=True, **QUIET)
    assert report.resumed_from == 2


def _resume_with_weight_decay(folder, weight_decay: float) -> list[torch.Tensor]:
    zoo = learnable_zoo()
    zoo.add_adapter("l", "lora", seed=1, **TYPES["lora"])
    zoo.train(
        "l",
        const_examples("a", 16),
        max_steps=6,
        lr=1e-2,
        batch_size=4,
        checkpoint_dir=folder,
        resume=True,
        weight_decay=weight_decay,
        **QUIET,
    )
    return state(zoo, "l")


def test_resume_applies_the_resuming_calls_weight_decay(tmp_path):
    """The checkpoint brings back the optimizer's moments, not its options: a weight_decay given
    on resume is the one used (as the lr is), not the interrupted run's."""
    import shutil

    class Stop(Exception):
        pass

    def crash(info):
        if info.step == 2:
            raise Stop

    zoo = learnable_zoo()
    zoo.add_adapter("l", "lora", seed=1, **TYPES["lora"])
    with pytest.raises(Stop):
        zoo.train(
            "l",
            const_examples("a", 16),
            max_steps=6,
            lr=1e-2,
            batch_size=4,
            checkpoint_dir=tmp_path / "a",
            checkpoint_every=1,
            weight_decay=0.0,
            on_step=crash,
            **QUIET,
        )
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    plain = _resume_with_weight_decay(tmp_path / "a", 0.0)
    decayed = _resume_with_weight_decay(tmp_path / "b", 50.0)
    size = lambda ts: sum(float(t.abs().sum()) for t in ts)  # noqa: E731
    assert size(decayed) < 0.5 * size(plain)  # decoupled decay shrinks every tensor by (1 - lr * wd) = 0.5 a step


def test_checkpoint_files_are_synced_and_a_truncated_one_is_a_clear_error(tmp_path, monkeypatch):
    import os

    synced = []
    real_fsync = os.fsync

    def spy(fd):
        synced.append(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    if not os.path.exists("/proc/self/fd"):
        pytest.skip("needs /proc to name the synced files")
    monkeypatch.setattr(os, "fsync", spy)
    zoo = learnable_zoo()
    zoo.add_adapter("l", "lora", r=2)
    zoo.train("l", const_examples("a", 8), max_steps=2, checkpoint_dir=tmp_path, checkpoint_every=1, **QUIET)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert any("state.safetensors" in name for name in synced) and any("trainer.json" in name for name in synced)

    weights = latest_checkpoint(tmp_path) / "state.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    other = learnable_zoo()
    other.add_adapter("l", "lora", r=2)
    with pytest.raises(AdapterFileError, match="not a readable safetensors file"):
        other.train("l", const_examples("a", 8), max_steps=4, checkpoint_dir=tmp_path, resume=True, **QUIET)


def test_early_stopping_restores_the_best_state():
    zoo = learnable_zoo()
    zoo.add_adapter("a", "lora", **TYPES["lora"])
    rng = random.Random(5)
    noise = [Example(f"{w} ->", " " + "".join(rng.choice("xyz") for _ in range(4)) + "\n") for w in words(40)]
    seen = {}

    def keep(info):
        seen[info.step] = state(zoo, "a")

    report = zoo.train(
        "a",
        noise[:32],
        eval_examples=noise[32:],
        max_steps=50,
        eval_every=2,
        patience=2,
        eval_metric="loss",
        lr=0.3,
        batch_size=8,
        on_step=keep,
        **QUIET,
    )
    r = report["a"]
    assert r.stopped_early and r.steps < 50
    assert r.best_step is not None and r.best_step < r.steps
    for x, y in zip(seen[r.best_step], state(zoo, "a")):
        assert torch.equal(x, y)


def test_nan_loss_stops_and_nothing_is_saved(tmp_path):
    zoo = learnable_zoo()
    zoo.add_adapter("a", "lora", init_lora_weights=False, **TYPES["lora"])
    out = tmp_path / "final"
    with pytest.raises(TrainingDivergedError) as info:
        zoo.train("a", const_examples("ok"), max_steps=20, lr=1e30, max_grad_norm=None, warmup=0, save_to=out, **QUIET)
    message = str(info.value)
    assert "'a'" in message and "nan/inf at step 2" in message and "lower learning rate" in message
    assert not out.exists() and not list(tmp_path.glob(".final*"))  # nothing under the final name
    assert all(bool(torch.isfinite(t).all()) for t in state(zoo, "a"))  # back to the last good state
    zoo.train("a", const_examples("ok", 8), max_steps=1, lr=1e-3, **QUIET)  # and still trainable


def test_nan_keeps_the_last_good_checkpoint_and_resume_continues_from_it(tmp_path):
    zoo = learnable_zoo()
    zoo.add_adapter("a", "lora", **TYPES["lora"])
    zoo.add_adapter("b", "bitfit")
    seen = {}

    def poison(info):  # as if step 3's update had overflowed
        seen[info.step] = state(zoo, "a")
        if info.step == 3:
            with torch.no_grad():
                zoo.get_adapter("a").parameters()[0].fill_(float("inf"))

    data = [const_examples("ok", 16), const_examples("no", 16)]
    options = dict(max_steps=8, lr=1e-2, batch_size=4, checkpoint_dir=tmp_path, checkpoint_every=1, **QUIET)
    with pytest.raises(TrainingDivergedError) as info:
        zoo.train(["a", "b"], data, on_step=poison, **options)
    message = str(info.value)
    assert "'a'" in message and "'b'" not in message and "at step 4" in message and "after step 2" in message
    assert all(torch.equal(x, y) for x, y in zip(seen[2], state(zoo, "a")))  # restored in memory
    latest = latest_checkpoint(tmp_path)
    assert latest.name == "step-00000002" and str(latest) in message  # the checkpoint of the bad state is gone
    report = zoo.train(["a", "b"], data, resume=True, **{**options, "lr": 5e-3})  # a lower lr may resume
    assert report.resumed_from == 2 and report.steps == 8
    assert all(bool(torch.isfinite(t).all()) for t in state(zoo, "a"))


def test_save_to_writes_only_at_the_end(tmp_path):
    zoo = learnable_zoo()
    zoo.add_adapter("a", "lora", r=2)
    zoo.add_adapter("b", "prefix", num_virtual_tokens=2)
    seen = []
    zoo.train(
        ["a", "b"],
        [const_examples("a", 8), const_examples("b", 8)],
        max_steps=3,
        save_to=tmp_path / "out",
        on_step=lambda info: seen.append((tmp_path / "out").exists()),
        metadata={"task": "demo"},
        **QUIET,
    )
    assert seen == [False, False, False]
    record = json.loads((tmp_path / "out" / "a" / CONFIG_FILE).read_text())
    assert record["metadata"]["training"]["steps"] == 3 and record["metadata"]["task"] == "demo"
    other = learnable_zoo()
    other.load_adapter("b", tmp_path / "out" / "b")
    for x, y in zip(state(zoo, "b"), state(other, "b")):
        assert torch.equal(x, y)


def test_an_update_that_overflows_is_caught_at_its_own_step(tmp_path):
    """Parameters are checked right after every optimizer step, not only through the next step's
    loss: the step whose update overflowed is named, and its state is never kept or saved."""
    zoo = learnable_zoo()
    zoo.add_adapter("a", "lora", init_lora_weights=False, **TYPES["lora"])
    before = state(zoo, "a")
    out = tmp_path / "final"
    with pytest.raises(TrainingDivergedError) as info:  # decay by (1 - lr * wd) = -1e40 overflows float32 at once
        zoo.train(
            "a",
            const_examples("ok", 8),
            max_steps=3,
            lr=1e20,
            weight_decay=1e20,
            warmup=0,
            save_to=out,
            checkpoint_dir=tmp_path / "ck",
            checkpoint_every=1,
            **QUIET,
        )
    message = str(info.value)
    assert "parameters of 'a' became nan/inf at step 1" in message and "after step 0" in message
    assert not out.exists() and not list(tmp_path.glob(".final*"))
    assert latest_checkpoint(tmp_path / "ck") is None and "no checkpoint" in message
    assert all(torch.equal(x, y) for x, y in zip(before, state(zoo, "a")))  # the state before the bad update


def test_nan_parameters_after_the_last_step_are_never_saved(tmp_path):
    """Nothing checks the parameters after the last step through a later loss: they are checked
    before saving, and nan/inf ones are put back and refused, never written under the final name."""
    zoo = learnable_zoo()
    zoo.add_adapter("a", "lora", **TYPES["lora"])
    seen = {}

    def poison(info):  # as if the last step's update had overflowed
        seen[info.step] = state(zoo, "a")
        if info.step == 3:
            with torch.no_grad():
                zoo.get_adapter("a").parameters()[0].fill_(float("inf"))

    out = tmp_path / "final"
    with pytest.raises(TrainingDivergedError) as info:
        zoo.train("a", const_examples("ok", 8), max_steps=3, batch_size=8, save_to=out, on_step=poison, **QUIET)
    message = str(info.value)
    assert "parameters of 'a' became nan/inf at step 3" in message and "after step 2" in message
    assert not out.exists() and not list(tmp_path.glob(".final*"))
    assert all(torch.equal(x, y) for x, y in zip(seen[2], state(zoo, "a")))  # back to the last good state


def test_save_to_replaces_an_old_folder_and_a_failed_save_keeps_it(tmp_path, monkeypatch):
    zoo = learnable_zoo()
    zoo.add_adapter("a", "lora", r=2)
    out = tmp_path / "out"
    zoo.train("a", const_examples("a", 8), max_steps=1, save_to=out, **QUIET)
    (out / "stale.txt").write_text("from an older save")
    zoo.train("a", const_examples("a", 8), max_steps=2, save_to=out, **QUIET)
    assert not (out / "stale.txt").exists()  # replaced as a whole
    assert json.loads((out / CONFIG_FILE).read_text())["metadata"]["training"]["steps"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary or old folders left

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(zoo, "save_adapter", broken)
    with pytest.raises(OSError, match="disk full"):
        zoo.train("a", const_examples("a", 8), max_steps=3, save_to=out, **QUIET)
    assert json.loads((out / CONFIG_FILE).read_text())["metadata"]["training"]["steps"] == 2  # the old one stays
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ----------------------------------------------------------------------------- bad input


@pytest.fixture
def zoo():
    zoo = learnable_zoo()
    zoo.add_adapter("a", "lora", r=2)
    zoo.add_adapter("c", "lora", r=2, head={"num_labels": 3})
    return zoo


BAD = [
    ("empty", lambda z: z.train("a", [], **QUIET), TrainingError, "empty"),
    ("not a list", lambda z: z.train("a", "abc -> d", **QUIET), TrainingError, "list"),
    ("malformed", lambda z: z.train("a", [("p", "a"), 42], **QUIET), TrainingError, "examples[1] is malformed"),
    ("wrong keys", lambda z: z.train("a", [{"question": "q", "answer": "a"}], **QUIET), TrainingError, "'prompt'"),
    ("empty answer", lambda z: z.train("a", [("p ->", "")], **QUIET), TrainingError, "empty answer"),
    ("not strings", lambda z: z.train("a", [("p ->", 3)], **QUIET), TrainingError, "two strings"),
    (
        "label out of range",
        lambda z: z.train("c", [("abc", 1), ("abd", 3)], **QUIET),
        TrainingError,
        "outside the 3 classes",
    ),
    ("label not an int", lambda z: z.train("c", [("abc", 1.5)], **QUIET), TrainingError, "label 1.5"),
    ("too long", lambda z: z.train("a", [("x" * 300, " y")], **QUIET), TrainingError, "positions this base allows"),
    ("unknown adapter", lambda z: z.train("nope", [("p", " a")], **QUIET), UnknownAdapterError, "nope"),
    (
        "another type",
        lambda z: z.train("a", [("p", " a")], adapter_type="houlsby", **QUIET),
        TrainingError,
        "lora adapter, not houlsby",
    ),
    ("bad lr", lambda z: z.train("a", [("p", " a")], lr=-1, **QUIET), TrainingError, "learning rate"),
    ("nan lr", lambda z: z.train("a", [("p", " a")], lr=float("nan"), **QUIET), TrainingError, "learning rate"),
    ("bad batch", lambda z: z.train("a", [("p", " a")], batch_size=0, **QUIET), TrainingError, "batch_size"),
    ("bad schedule", lambda z: z.train("a", [("p", " a")], schedule="step", **QUIET), TrainingError, "schedule"),
    ("patience alone", lambda z: z.train("a", [("p", " a")], patience=2, **QUIET), TrainingError, "eval_every"),
    ("resume alone", lambda z: z.train("a", [("p", " a")], resume=True, **QUIET), TrainingError, "checkpoint_dir"),
    ("twice", lambda z: z.train(["a", "a"], [[("p", " a")], [("p", " a")]], **QUIET), TrainingError, "twice"),
    ("count", lambda z: z.train(["a", "c"], [[("p", " a")]], **QUIET), TrainingError, "1 entries for 2 adapters"),
    (
        "bad eval",
        lambda z: z.train("a", [("p", " a")], eval_examples=[("p", "")], **QUIET),
        TrainingError,
        "eval_examples[0]",
    ),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_is_refused_before_anything_changes(zoo, tmp_path, case):
    _, fn, exc, needle = case
    before = {n: state(zoo, n) for n in ("a", "c")}
    with pytest.raises(exc) as info:
        fn(zoo)
    assert needle in str(info.value)
    for n in ("a", "c"):
        assert all(torch.equal(x, y) for x, y in zip(before[n], state(zoo, n)))


def test_encoder_adapter_without_a_head_cannot_train():
    zoo = Zoo(tiny_model("bert"), char_tokenizer(), device="cpu")
    zoo.add_adapter("a", "houlsby", bottleneck=4)
    with pytest.raises(TrainingError, match="head"):
        zoo.train("a", [("abc", 1)], **QUIET)


# ----------------------------------------------------------------------------- heads


def test_head_config_is_validated(zoo):
    with pytest.raises(InvalidConfigError, match="num_labels"):
        zoo.add_adapter("h1", "lora", head={"num_labels": 1})
    with pytest.raises(InvalidConfigError, match="pooling"):
        zoo.add_adapter("h2", "lora", head={"num_labels": 2, "pooling": "max"})
    with pytest.raises(InvalidConfigError, match="unknown head key"):
        zoo.add_adapter("h3", "lora", head={"num_labels": 2, "classes": 2})
    with pytest.raises(InvalidConfigError, match="labels"):
        zoo.add_adapter("h4", "lora", head={"num_labels": 2, "labels": ["a"]})
    assert "h1" not in zoo.adapters


def bert_zoo() -> Zoo:
    return Zoo(tiny_model("bert"), char_tokenizer(), device="cpu")


def test_mixed_heads_in_one_batch_equal_each_row_alone():
    zoo = bert_zoo()
    zoo.add_adapter("two", "houlsby", bottleneck=4, head={"num_labels": 2, "pooling": "cls"})
    zoo.add_adapter("four", "bitfit", head={"num_labels": 4, "pooling": "mean"}, seed=1)
    zoo.add_adapter("three", "adapterbias", head={"num_labels": 3, "pooling": "last"}, seed=2)
    zoo.add_adapter("plain", "lora", r=2)
    for name in ("two", "four", "three"):
        with torch.no_grad():
            for t in zoo.get_adapter(name).parameters():
                t.add_(torch.randn(t.shape, generator=torch.Generator().manual_seed(3)) * 0.1)
    enc = zoo.tokenizer(["abc", "hello there", "xy", "some text", "q"], return_tensors="pt", padding=True)
    names = ["two", "four", "three", "plain", None]
    with torch.inference_mode():
        mixed = zoo(enc["input_ids"], enc["attention_mask"], names).class_logits
    assert mixed.shape == (5, 4)
    assert torch.isinf(mixed[0, 2:]).all() and torch.isinf(mixed[2, 3:]).all()  # classes a head does not have
    assert torch.isnan(mixed[3]).all() and torch.isnan(mixed[4]).all()  # no head
    for i, name in enumerate(names[:3]):
        L = int(enc["attention_mask"][i].sum())
        with torch.inference_mode():
            alone = zoo(enc["input_ids"][i : i + 1, :L], None, [name]).class_logits
        k = alone.shape[1]
        torch.testing.assert_close(mixed[i, :k], alone[0], atol=1e-5, rtol=1e-4)
    assert zoo.adapters["four"].head["num_labels"] == 4 and zoo.adapters["plain"].head is None


def test_head_is_saved_loaded_and_swapped_with_its_adapter(tmp_path):
    zoo = bert_zoo()
    zoo.add_adapter("h", "houlsby", bottleneck=4, head={"num_labels": 3, "labels": ["x", "y", "z"]})
    with torch.no_grad():
        zoo.get_adapter("h").head.tensors["weight"].normal_()
    n = zoo.get_adapter("h").num_parameters()
    assert n == zoo.adapters["h"].parameters and n > 3 * 32  # the head counts
    zoo.save_adapter("h", tmp_path / "h")
    record = json.loads((tmp_path / "h" / CONFIG_FILE).read_text())
    assert record["head"] == {"num_labels": 3, "pooling": "mean", "labels": ["x", "y", "z"]}
    ids = torch.randint(4, 100, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = zoo(ids, None, ["h", "h"]).class_logits
    other = bert_zoo()
    other.load_adapter("h", tmp_path / "h")
    with torch.inference_mode():
        torch.testing.assert_close(other(ids, None, ["h", "h"]).class_logits, want, atol=0, rtol=0)
    # swapped with it: a replaced adapter brings its own head
    other.remove_adapter("h")
    other.add_adapter("h", "houlsby", bottleneck=4, head={"num_labels": 2})
    with torch.inference_mode():
        assert other(ids, None, ["h", "h"]).class_logits.shape == (2, 2)
    with pytest.raises(UnsupportedFormatError, match="native"):
        zoo.save_adapter("h", tmp_path / "peft", format="peft")
    # a head whose tensors do not fit is refused
    from safetensors.torch import load_file, save_file

    state_ = load_file(tmp_path / "h" / "adapterzoo_model.safetensors")
    state_["adapterzoo_head.weight"] = torch.zeros(3, 7)
    save_file(state_, tmp_path / "h" / "adapterzoo_model.safetensors")
    del record["weights"]
    (tmp_path / "h" / CONFIG_FILE).write_text(json.dumps(record))
    with pytest.raises(ShapeMismatchError, match="head"):
        bert_zoo().load_adapter("h", tmp_path / "h")


def vowel_examples(n: int, seed: int) -> list[LabeledExample]:
    """Label = does the word contain an 'a' (2 classes): trivially learnable from tokens."""
    out = []
    for w in words(n, seed, letters="abcdefghij"):
        out.append(LabeledExample(" ".join(w), int("a" in w)))
    return out


def test_a_classifier_learns_on_a_tiny_bert_and_mixes_with_another():
    zoo = bert_zoo()
    checksum = base_state_checksum(zoo.model)
    zoo.add_adapter("has-a", "houlsby", bottleneck=8, head={"num_labels": 2, "labels": ["no", "yes"]})
    zoo.add_adapter("len", "bitfit", head={"num_labels": 3})
    train = vowel_examples(96, 0)
    held = vowel_examples(32, 1)
    length = [(" ".join(w[: 1 + i % 3]), i % 3) for i, w in enumerate(words(48, 2))]
    report = zoo.train(
        ["has-a", "len"], [train, length], eval_examples=[held, length[:16]], epochs=15, lr=3e-2, batch_size=16, **QUIET
    )
    assert report["has-a"].metric == "accuracy"
    assert report["has-a"].best_eval >= 0.85, report["has-a"].history
    assert report["len"].best_eval >= 0.6
    assert base_state_checksum(zoo.model) == checksum


def test_labels_by_name_and_a_causal_lm_head():
    zoo = learnable_zoo()
    zoo.add_adapter("cls", "lora", r=2, head={"num_labels": 2, "labels": ["no", "yes"], "pooling": "last"})
    data = [(f"{w} ?", "yes" if "a" in w else "no") for w in words(32)]
    report = zoo.train("cls", data, eval_examples=data[:8], max_steps=4, lr=1e-2, **QUIET)
    assert report["cls"].metric == "accuracy"
    ids = torch.tensor([[10, 11, 12]])
    with torch.inference_mode():
        out = zoo(ids, None, ["cls"])
    assert out.class_logits.shape == (1, 2) and out.logits.shape == (1, 3, 100)


def test_missing_head_tensors_in_a_file_are_an_error(tmp_path):
    zoo = bert_zoo()
    zoo.add_adapter("h", "bitfit", head=2)
    zoo.save_adapter("h", tmp_path / "h")
    record = json.loads((tmp_path / "h" / CONFIG_FILE).read_text())
    del record["head"]
    del record["weights"]
    (tmp_path / "h" / CONFIG_FILE).write_text(json.dumps(record))
    with pytest.raises((ShapeMismatchError, AdapterFileError), match="head"):
        bert_zoo().load_adapter("h", tmp_path / "h")


# ----------------------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def tiny_bases(tmp_path_factory):
    """A learnable tiny Llama and a tiny BERT, saved as folders a CLI user would pass as --base."""
    root = tmp_path_factory.mktemp("bases")
    llama = learnable_zoo().model
    llama.save_pretrained(root / "llama")
    char_tokenizer().save_pretrained(root / "llama")
    bert = tiny_model("bert")
    bert.save_pretrained(root / "bert")
    char_tokenizer().save_pretrained(root / "bert")
    return root


def cli(*args):
    from click.testing import CliRunner

    from adapterzoo.cli import cli as group

    return CliRunner().invoke(group, [str(a) for a in args], catch_exceptions=False)


def test_cli_tasks_lists_every_task_with_an_example():
    result = cli("tasks", "--json")
    assert result.exit_code == 0
    rows = json.loads(result.output)
    names = {r["name"] for r in rows}
    assert len(names) >= 100 + 4 and {"caesar-3", "reverse", "digits-words", "addmod-7", "vowel-bins"} <= names
    caesar = next(r for r in rows if r["name"] == "caesar-3")
    assert caesar["family"] == "caesar" and caesar["prompt"].endswith("->") and caesar["expected"]
    table = cli("tasks", "--family", "reorder")
    assert table.exit_code == 0 and "sort-desc" in table.output and "caesar" not in table.output


def test_cli_train_then_eval(tiny_bases, tmp_path):
    out = tmp_path / "caesar"
    result = cli(
        "train",
        "--base",
        tiny_bases / "llama",
        "--type",
        "lora",
        "--task",
        "caesar-1",
        "--out",
        out,
        "--steps",
        4,
        "--batch-size",
        4,
        "--n-train",
        16,
        "--n-eval",
        4,
        "--lr",
        1e-2,
        "--quiet",
        "-c",
        "r=4",
        "-c",
        'target_modules=["q_proj","v_proj"]',
        "--checkpoint-dir",
        tmp_path / "ck",
        "--checkpoint-every",
        2,
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 4 and summary["type"] == "lora" and summary["metric"] == "exact_match"
    assert summary["base"] is not None and summary["trained"] is not None
    record = json.loads((out / CONFIG_FILE).read_text())
    assert record["config"]["r"] == 4 and record["metadata"]["task"] == "caesar-1"
    assert latest_checkpoint(tmp_path / "ck").name == "step-00000004"

    scored = cli("eval", "--base", tiny_bases / "llama", "--adapter", out, "--task", "caesar-1", "--n", 4, "--json")
    assert scored.exit_code == 0, scored.output
    assert 0.0 <= json.loads(scored.stdout)["exact_match"] <= 1.0
    bare = cli("eval", "--base", tiny_bases / "llama", "--task", "caesar-1", "--n", 4)
    assert bare.exit_code == 0 and "base: exact_match on caesar-1" in bare.output

    # continuing a saved adapter of another type is refused, and nothing is written
    wrong = cli(
        "train",
        "--base",
        tiny_bases / "llama",
        "--type",
        "houlsby",
        "--task",
        "caesar-1",
        "--init-from",
        out,
        "--out",
        tmp_path / "wrong",
        "--steps",
        1,
        "--quiet",
    )
    assert wrong.exit_code != 0 and "lora adapter, not houlsby" in wrong.output
    assert not (tmp_path / "wrong").exists()
    unknown = cli(
        "train", "--base", tiny_bases / "llama", "--type", "lora", "--task", "caesar-99", "--out", tmp_path / "x"
    )
    assert unknown.exit_code != 0 and "caesar-" in unknown.output


def test_cli_trains_a_classifier_on_an_encoder(tiny_bases, tmp_path):
    out = tmp_path / "even"
    result = cli(
        "train",
        "--base",
        tiny_bases / "bert",
        "--type",
        "bitfit",
        "--task",
        "even",
        "--out",
        out,
        "--steps",
        3,
        "--batch-size",
        8,
        "--n-train",
        24,
        "--n-eval",
        8,
        "--quiet",
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1])["metric"] == "accuracy"
    assert json.loads((out / CONFIG_FILE).read_text())["head"]["labels"] == ["odd", "even"]
    scored = cli("eval", "--base", tiny_bases / "bert", "--adapter", out, "--task", "even", "--n", 8)
    assert scored.exit_code == 0 and "accuracy on even" in scored.output


# ----------------------------------------------------------------------------- options


def test_options_as_a_train_options_train_exactly_as_the_same_keywords():
    runs = []
    for how in ("keywords", "options"):
        torch.manual_seed(0)
        zoo = learnable_zoo()
        zoo.add_adapter("a", "lora", seed=1, **TYPES["lora"])
        keywords = dict(max_steps=4, lr=1e-2, batch_size=4, schedule="cosine", progress=False)
        if how == "keywords":
            report = zoo.train("a", const_examples("ok", 16), **keywords)
        else:
            report = zoo.train("a", const_examples("ok", 16), options=TrainOptions(**keywords))
        runs.append((report["a"].history, state(zoo, "a")))
    (history_k, state_k), (history_o, state_o) = runs
    assert history_k == history_o
    assert all(torch.equal(x, y) for x, y in zip(state_k, state_o))


def test_keywords_given_with_options_replace_its_fields_and_leave_it_unchanged():
    zoo = learnable_zoo()
    zoo.add_adapter("a", "lora", r=2)
    options = TrainOptions(max_steps=5, batch_size=4, progress=False)
    report = zoo.train("a", const_examples("ok", 8), options=options, max_steps=2)
    assert report.steps == 2 and options.max_steps == 5


def test_an_unknown_option_is_a_type_error_that_names_it_and_the_known_ones():
    zoo = learnable_zoo()
    zoo.add_adapter("a", "lora", r=2)
    with pytest.raises(TypeError, match="'max_step'") as info:
        zoo.train("a", const_examples("ok", 8), max_step=2)
    assert "max_steps" in str(info.value)
    with pytest.raises(TypeError, match="TrainOptions"):
        zoo.train("a", const_examples("ok", 8), options={"max_steps": 2})


BAD_OPTIONS = [
    (dict(batch_size=0), "batch_size=1 or more"),
    (dict(max_steps=-3), "max_steps must be a positive integer or None"),
    (dict(epochs=0), "epochs"),
    (dict(schedule="step"), "schedule must be one of linear, cosine, constant"),
    (dict(eval_metric="f1"), "eval_metric"),
    (dict(warmup=-1), "warmup"),
    (dict(max_grad_norm=0), "max_grad_norm"),
    (dict(patience=2, eval_every=5), "needs eval_examples and eval_every"),
    (dict(resume=True), "resume=True needs checkpoint_dir"),
]


@pytest.mark.parametrize("fields,needle", BAD_OPTIONS, ids=[next(iter(f)) for f, _ in BAD_OPTIONS])
def test_train_options_check_names_the_bad_option(fields, needle):
    options = TrainOptions(**fields)  # building one checks nothing: it can still be changed
    with pytest.raises(TrainingError) as info:
        options.check()
    assert needle in str(info.value)
    TrainOptions().check()
    dataclasses.replace(options, **{k: getattr(TrainOptions(), k) for k in fields}).check()


def test_train_options_spread_seeds_lrs_and_folders_over_the_adapters(tmp_path):
    zoo = learnable_zoo()
    zoo.add_adapter("a", "lora", r=2)
    zoo.add_adapter("b", "bitfit")
    adapters = [zoo.get_adapter("a"), zoo.get_adapter("b")]
    options = TrainOptions(seed=[3, 4], lr={"a": 1e-3}, save_to=tmp_path, warmup=0.25)
    assert options.seeds(["a", "b"]) == [3, 4]
    assert options.lrs(adapters) == [1e-3, zoo.get_adapter("b").atype.default_lr]
    assert options.targets(["a", "b"], single=False) == {"a": tmp_path / "a", "b": tmp_path / "b"}
    assert options.total_steps(7) == 7 and options.warmup_steps(8) == 2 and options.warmup_steps(1) == 0


def test_a_checkpoint_keeps_its_version_1_layout(tmp_path):
    """What `resume` reads: a checkpoint written before (or after) a refactor of the trainer resumes."""
    from safetensors import safe_open

    zoo = learnable_zoo()
    zoo.add_adapter("a", "lora", r=2)
    examples = const_examples("ok", 8)
    zoo.train(
        "a",
        examples[:6],
        eval_examples=examples[6:],
        max_steps=2,
        batch_size=4,
        eval_every=1,
        checkpoint_dir=tmp_path,
        **QUIET,
    )
    path = latest_checkpoint(tmp_path)
    assert path == tmp_path / "step-00000002" and (tmp_path / "LATEST").read_text() == "step-00000002"
    record = json.loads((path / "trainer.json").read_text())
    assert CHECKPOINT_VERSION == 1 and record["version"] == 1 and record["step"] == 2
    assert sorted(record) == ["jobs", "signature", "step", "version"]
    assert sorted(record["signature"]) == ["adapters", "batch_size", "grad_accum"]
    assert sorted(record["signature"]["adapters"][0]) == [
        "config",
        "examples",
        "examples_sha256",
        "name",
        "parameters",
        "seed",
        "type",
    ]
    job = record["jobs"][0]
    assert sorted(job) == ["active", "bad_evals", "name", "non_tensor_state", "param_groups", "report", "step"]
    assert sorted(job["report"]) == [
        "best_eval",
        "best_step",
        "examples",
        "final_eval_loss",
        "final_train_loss",
        "history",
        "seconds",
        "stopped_early",
        "tokens",
    ]
    with safe_open(str(path / "state.safetensors"), "pt") as f:
        keys = set(f.keys())
    n = len(zoo.get_adapter("a").parameters())
    assert {"rng.torch"} | {f"param.0.{i}" for i in range(n)} | {f"best.0.{i}" for i in range(n)} <= keys
    assert {f"opt.0.{i}.{k}" for i in range(n) for k in ("exp_avg", "exp_avg_sq")} <= keys


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_a_lora_forward_in_training_draws_a_dropout_mask_only_when_some_row_has_dropout(dropout):
    # PEFT's lora_dropout=0 is an nn.Identity: no random numbers drawn, so nothing else's draws move
    from adapterzoo.testing.models import tiny_zoo

    zoo = tiny_zoo("llama", slots=4)
    zoo.add_adapter("a", "lora", r=4, lora_dropout=dropout, init_lora_weights=False)
    ids = torch.randint(3, 40, (2, 5), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    before = torch.get_rng_state()
    zoo.forward(ids, None, ["a", None], plan=zoo.plan(["a", None], training=True))
    assert torch.equal(torch.get_rng_state(), before) == (dropout == 0.0)
