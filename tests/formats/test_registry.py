"""The format registry: every format has the same shape, round-trips through its own files, and
is handed a FormatContext (the base and its limits), never the zoo."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import torch

import adapterzoo.formats
from adapterzoo.errors import AdapterFileError, UnsupportedFormatError
from adapterzoo.formats import FORMATS, Format, FormatContext, detect_format, format_named, looks_like_adapter
from adapterzoo.testing.models import output, perturb, tiny_zoo

IDS = torch.randint(4, 100, (1, 6), generator=torch.Generator().manual_seed(0))
# an adapter type each format can hold (a new format must add its case here)
CASES = {
    "native": ("houlsby", {"bottleneck": 4}),
    "peft": ("lora", {"r": 4, "init_lora_weights": False}),
    "adapterhub": ("houlsby", {"bottleneck": 4}),
}


def context_of(zoo) -> FormatContext:
    """A format's whole view of a zoo, built from the zoo's public attributes."""
    return FormatContext(
        model=zoo.model,
        fingerprint=zoo.fingerprint,
        adapter_type=zoo.adapter_type,
        is_causal_lm=zoo.is_causal_lm,
        pool_limits=zoo.pool_limits,
        max_size=zoo.max_size,
    )


def run(zoo, name):
    with torch.inference_mode():
        return output(zoo(IDS, None, [name]))


def test_every_registered_format_has_a_round_trip_case_here() -> None:
    assert set(CASES) == set(FORMATS)


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_format_round_trips_write_then_detect_then_read(tmp_path: Path, name: str) -> None:
    fmt = format_named(name)
    atype, config = CASES[name]
    zoo = tiny_zoo("llama")
    zoo.add_adapter("a", atype, **config)
    perturb(zoo, "a")
    ctx = context_of(zoo)

    folder = fmt.write(ctx, zoo.get_adapter("a"), tmp_path / name, metadata={"metrics": {"acc": 0.5}})
    assert detect_format(folder) is fmt
    assert {p.name for p in folder.iterdir()} <= set(fmt.FILES)
    assert looks_like_adapter(folder)

    zoo.add_loaded_adapter(fmt.read(ctx, "b", folder))
    torch.testing.assert_close(run(zoo, "b"), run(zoo, "a"))
    facts = fmt.card_facts(folder)
    assert facts["format"] == name and facts["type"] == atype
    assert facts["base_fingerprint"] == zoo.fingerprint.id and facts["metrics"] == {"acc": 0.5}


def test_every_format_has_the_shape_the_format_protocol_names() -> None:
    functions = [n for n, v in vars(Format).items() if inspect.isfunction(v) and not n.startswith("_")]
    assert set(functions) == {"detect", "read", "write", "card_facts"}
    for name, fmt in FORMATS.items():
        assert fmt.NAME == name
        assert all(hasattr(fmt, attribute) for attribute in Format.__annotations__), name
        assert fmt.CONFIG_FILE in fmt.FILES and fmt.WEIGHTS_FILE in fmt.FILES
        assert isinstance(fmt.DESCRIPTION, str) and isinstance(fmt.CARD_TAGS, tuple)
        for function in functions:
            own = list(inspect.signature(getattr(fmt, function)).parameters)
            assert own == list(inspect.signature(getattr(Format, function)).parameters)[1:], (name, function)


def test_detect_format_on_a_folder_without_an_adapter_names_every_known_format(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not an adapter")
    with pytest.raises(AdapterFileError, match="holds no adapter") as caught:
        detect_format(tmp_path)
    for fmt in FORMATS.values():
        assert fmt.NAME in str(caught.value) and fmt.CONFIG_FILE in str(caught.value)
    assert not looks_like_adapter(tmp_path)


def test_format_named_refuses_an_unknown_name_and_lists_the_known_ones() -> None:
    with pytest.raises(UnsupportedFormatError, match="unknown format 'onnx'.*'native', 'peft', 'adapterhub'"):
        format_named("onnx")


@pytest.mark.parametrize("name", ["peft", "adapterhub"])
def test_a_foreign_format_refuses_an_adapter_with_a_classification_head(tmp_path: Path, name: str) -> None:
    zoo = tiny_zoo("llama")
    zoo.add_adapter("a", CASES[name][0], head={"num_labels": 2}, **CASES[name][1])
    with pytest.raises(UnsupportedFormatError, match="classification head.*format='native'"):
        zoo.save_adapter("a", tmp_path / "a", format=name)
    assert not (tmp_path / "a").exists()


def test_formats_import_nothing_from_the_zoo() -> None:
    """A format sees a FormatContext; importing the zoo (even for type hints) would close a cycle."""
    package = Path(adapterzoo.formats.__file__).parent
    for path in sorted(package.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.module not in ("zoo", "adapterzoo.zoo"), path
                assert not (node.module is None and any(a.name == "zoo" for a in node.names)), path
            elif isinstance(node, ast.Import):
                assert all(a.name != "adapterzoo.zoo" for a in node.names), path
