"""Bad input: a documented exception whose message names the problem and the fix, and a zoo
left exactly as it was (same adapters, same pool contents, same outputs)."""

from __future__ import annotations

import ast
import builtins
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import adapterzoo
from adapterzoo import (
    AdapterExistsError,
    AdapterFileError,
    BaseMismatchError,
    BatchError,
    InvalidConfigError,
    InvalidNameError,
    PoolFullError,
    PoolLimitError,
    ShapeMismatchError,
    UnknownAdapterError,
    UnknownAdapterTypeError,
)
from adapterzoo.formats.native import CONFIG_FILE, WEIGHTS_FILE
from adapterzoo.testing.models import output, perturb, tiny_zoo

IDS = torch.randint(4, 100, (2, 5), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def zoo():
    zoo = tiny_zoo("llama", slots=2, pool_limits={"r": 16, "num_virtual_tokens": 8})
    zoo.add_adapter("good", "lora", r=4, init_lora_weights=False)
    with torch.inference_mode():
        zoo(IDS, None, ["good", None])  # resident in a slot
    assert zoo.adapters["good"].where == "device"
    return zoo


@pytest.fixture
def saved(zoo, tmp_path):
    perturb(zoo, "good")
    return zoo.save_adapter("good", tmp_path / "good")


def snapshot(zoo):
    with torch.inference_mode():
        out = output(zoo(IDS, None, ["good", None])).clone()
    pools = {
        key: (dict(p.lru), {s: {k: t.clone() for k, t in ts.items()} for s, ts in p.tensors.items()})
        for key, p in zoo.pools.items()
    }
    return zoo.adapters, pools, out


def assert_unchanged(zoo, before):
    adapters, pools, out = before
    assert zoo.adapters.keys() == adapters.keys()
    for key, (lru, tensors) in pools.items():
        assert dict(zoo.pools[key].lru) == lru
        for site, ts in tensors.items():
            for k, t in ts.items():
                assert torch.equal(zoo.pools[key].tensors[site][k], t)
    assert set(zoo.pools) == set(pools)
    with torch.inference_mode():
        assert torch.equal(output(zoo(IDS, None, ["good", None])), out)


def check(zoo, exc_type, fn, *needles):
    before = snapshot(zoo)
    with pytest.raises(exc_type) as info:
        fn()
    message = str(info.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    assert isinstance(info.value, adapterzoo.AdapterZooError)
    assert_unchanged(zoo, before)
    return message


def test_unknown_adapter_type(zoo):
    check(zoo, UnknownAdapterTypeError, lambda: zoo.add_adapter("x", "lorra"), "lorra", "installed types", "lora")


def test_unknown_config_key(zoo):
    check(zoo, InvalidConfigError, lambda: zoo.add_adapter("x", "lora", rank=8), "'rank'", "valid keys", "r")


@pytest.mark.parametrize("config", [{"r": 0}, {"r": "8"}, {"lora_alpha": -1}, {"target_modules": ["nope"]}])
def test_invalid_config_value(zoo, config):
    check(zoo, InvalidConfigError, lambda: zoo.add_adapter("x", "lora", **config))


def test_truncated_safetensors(zoo, saved):
    data = (saved / WEIGHTS_FILE).read_bytes()
    (saved / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    check(zoo, AdapterFileError, lambda: zoo.load_adapter("x", saved), "truncated", "again")


def test_corrupt_safetensors(zoo, saved):
    data = bytearray((saved / WEIGHTS_FILE).read_bytes())
    data[-10:] = b"\xff" * 10
    (saved / WEIGHTS_FILE).write_bytes(bytes(data))
    check(zoo, AdapterFileError, lambda: zoo.load_adapter("x", saved), "corrupt")


def test_garbage_safetensors_without_checksum(zoo, saved):
    record = json.loads((saved / CONFIG_FILE).read_text())
    del record["weights"]
    (saved / CONFIG_FILE).write_text(json.dumps(record))
    (saved / WEIGHTS_FILE).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    check(zoo, AdapterFileError, lambda: zoo.load_adapter("x", saved), "safetensors")


def test_truncated_config_json(zoo, saved):
    text = (saved / CONFIG_FILE).read_text()
    (saved / CONFIG_FILE).write_text(text[: len(text) // 2])
    check(zoo, AdapterFileError, lambda: zoo.load_adapter("x", saved), "not valid JSON")


def test_wrong_shapes(zoo, saved):
    record = json.loads((saved / CONFIG_FILE).read_text())
    del record["weights"]  # a hand-edited file: no checksum to catch it first
    (saved / CONFIG_FILE).write_text(json.dumps(record))
    state = {k: torch.zeros(3, 3) for k in zoo.get_adapter("good").state_dict()}
    save_file(state, saved / WEIGHTS_FILE)
    check(zoo, ShapeMismatchError, lambda: zoo.load_adapter("x", saved), "wrong shape", "(3, 3)")


def test_config_and_weights_disagree(zoo, saved):
    record = json.loads((saved / CONFIG_FILE).read_text())
    record["config"]["r"] = 8  # weights are r=4
    del record["weights"]
    (saved / CONFIG_FILE).write_text(json.dumps(record))
    check(zoo, ShapeMismatchError, lambda: zoo.load_adapter("x", saved), "wrong shape")


def test_adapter_for_another_base(zoo, tmp_path):
    other = tiny_zoo("llama", seed=7)  # same architecture, other weights
    other.add_adapter("theirs", "lora", r=4)
    other.save_adapter("theirs", tmp_path / "theirs")
    message = check(
        zoo,
        BaseMismatchError,
        lambda: zoo.load_adapter("x", tmp_path / "theirs"),
        "another base",
        "ignore_base_mismatch=True",
    )
    assert other.fingerprint.id in message and zoo.fingerprint.id in message
    zoo.load_adapter("x", tmp_path / "theirs", ignore_base_mismatch=True)  # the explicit override
    assert "x" in zoo.adapters


def test_adapter_for_another_architecture(zoo, tmp_path):
    gpt2 = tiny_zoo("gpt2")
    gpt2.add_adapter("g", "lora", r=4)
    gpt2.save_adapter("g", tmp_path / "g")
    check(zoo, BaseMismatchError, lambda: zoo.load_adapter("x", tmp_path / "g"), "architecture")


def test_pickle_file_is_refused(zoo, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    check(zoo, AdapterFileError, lambda: zoo.load_adapter("x", folder), "pickle", "safetensors")


def test_missing_folder(zoo, tmp_path):
    check(zoo, AdapterFileError, lambda: zoo.load_adapter("x", tmp_path / "nowhere"), "does not exist")


@pytest.mark.parametrize("name", ["", "a/b", "..", "../up", "a..b", "/abs", "back\\slash", ".hidden", "x" * 200, None])
def test_bad_names(zoo, saved, name):
    check(zoo, InvalidNameError, lambda: zoo.add_adapter(name, "lora"), "name")
    check(zoo, InvalidNameError, lambda: zoo.load_adapter(name, saved), "name")


def test_rank_over_the_pool_limit(zoo):
    check(zoo, PoolLimitError, lambda: zoo.add_adapter("big", "lora", r=32), "r=32", "pool_limits")


def test_prefix_over_the_pool_limit(zoo):
    check(zoo, PoolLimitError, lambda: zoo.add_adapter("long", "prefix", num_virtual_tokens=9), "num_virtual_tokens=9")


def test_load_over_the_pool_limit(zoo, tmp_path):
    big = tiny_zoo("llama")
    big.add_adapter("big", "lora", r=32)
    big.save_adapter("big", tmp_path / "big")
    check(zoo, PoolLimitError, lambda: zoo.load_adapter("big", tmp_path / "big"), "pool limit")


def test_unknown_adapter_in_batch(zoo):
    check(zoo, UnknownAdapterError, lambda: zoo(IDS, None, ["good", "nope"]), "'nope'", "load_adapter")


def test_adapters_list_of_the_wrong_length(zoo):
    check(zoo, BatchError, lambda: zoo(IDS, None, ["good"]), "1 entries", "2 rows")
    check(zoo, BatchError, lambda: zoo(IDS, None, "good"), "list")


def test_mask_of_the_wrong_shape(zoo):
    check(zoo, BatchError, lambda: zoo(IDS, torch.ones(2, 3), ["good", None]), "attention_mask")


def test_duplicate_name(zoo):
    check(zoo, AdapterExistsError, lambda: zoo.add_adapter("good", "lora"), "already", "remove_adapter")


def test_batch_needs_more_slots_than_the_pool_has(zoo):
    for i in range(3):
        zoo.add_adapter(f"l{i}", "lora", r=4, seed=i)
    ids = torch.randint(4, 100, (3, 4))
    with torch.inference_mode():
        check(zoo, PoolFullError, lambda: zoo(ids, None, ["l0", "l1", "l2"]), "slots")


def test_remove_unknown(zoo):
    check(zoo, UnknownAdapterError, lambda: zoo.remove_adapter("nope"), "nope")


# ----------------------------------------------------------------------------- one home for every error

PACKAGE = Path(adapterzoo.__file__).parent


def _exception_classes() -> dict[str, list[tuple[str, str]]]:
    """Every class under adapterzoo/ that is an exception: name -> [(file, base names)]. A class is
    one when a base is a built-in exception, or (transitively) another class found here. Warning
    categories (`PluginLoadWarning`) are not errors: nothing raises them, they stay by their module."""
    classes: list[tuple[str, str, list[str]]] = []  # (file, name, base names)
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ClassDef):
                bases = [ast.unparse(b).rsplit(".", 1)[-1] for b in node.bases]
                classes.append((str(path.relative_to(PACKAGE.parent)), node.name, bases))
    builtin = {
        n
        for n, v in vars(builtins).items()
        if isinstance(v, type) and issubclass(v, BaseException) and not issubclass(v, Warning)
    }
    found: dict[str, list[tuple[str, str]]] = {}
    grew = True
    while grew:
        grew = False
        for file, name, bases in classes:
            if (file, name) not in {(f, n) for n, rows in found.items() for f, _ in rows} and any(
                b in builtin or b in found for b in bases
            ):
                found.setdefault(name, []).append((file, ", ".join(bases)))
                grew = True
    return found


def test_every_exception_class_in_adapterzoo_lives_in_errors_py():
    """A module-private signal (a leading `_`: raised and caught in its own module, e.g. routing's
    `_Stop`) is not an error a caller sees; it must not be named in any other module."""
    misplaced, leaked = [], []
    for name, rows in _exception_classes().items():
        for file, bases in rows:
            if file == "adapterzoo/errors.py":
                continue
            if name.startswith("_"):
                others = [
                    p
                    for p in PACKAGE.rglob("*.py")
                    if str(p.relative_to(PACKAGE.parent)) != file
                    and re.search(rf"\b{re.escape(name)}\b", p.read_text())
                ]
                leaked += [f"{name} ({file}) is named in {p.relative_to(PACKAGE.parent)}" for p in others]
            else:
                misplaced.append(f"{file}: class {name}({bases})")
    fix = "move these into adapterzoo/errors.py (deriving from AdapterZooError):\n"
    assert not misplaced, fix + "\n".join(misplaced)
    assert not leaked, "\n".join(leaked)


def test_every_error_in_errors_py_derives_from_adapterzoo_error():
    from adapterzoo import errors

    classes = [v for v in vars(errors).values() if isinstance(v, type) and v.__module__ == errors.__name__]
    assert len(classes) > 20
    assert [c.__name__ for c in classes if not issubclass(c, adapterzoo.AdapterZooError)] == []


def test_moved_errors_are_still_importable_from_their_old_modules():
    from adapterzoo import errors
    from adapterzoo.serve import engine
    from adapterzoo.tasks import UnknownTaskError, get_task

    for name in [
        "EngineError",
        "QueueFullError",
        "EngineClosedError",
        "ContextLengthError",
        "MaxTokensError",
        "RequestFailedError",
        "AdapterLoadError",
    ]:
        assert getattr(engine, name) is getattr(errors, name) is getattr(adapterzoo, name)
    with pytest.raises(adapterzoo.AdapterZooError) as info:
        get_task("reverze")
    assert isinstance(info.value, UnknownTaskError) and isinstance(info.value, KeyError)
    assert str(info.value).startswith("unknown task 'reverze'")  # not KeyError's quoted repr
