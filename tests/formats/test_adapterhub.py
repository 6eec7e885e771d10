"""AdapterHub (the `adapters` library) bottleneck adapters, both ways.

`adapters` 1.3 requires transformers ~=4.57 and cannot be installed beside our transformers 5.x, so
the reference adapters and outputs in data/adapterhub/ were made with the real library in a
separate environment (data/make_adapterhub_fixtures.py says how) on the same tiny bases, saved by
`model.save_adapter(..., use_safetensors=True)`. Here they are loaded into a Zoo and must give the
library's outputs; and adapters we write must have the library's exact layout (config fields,
weight names), checked against those files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from adapterzoo.errors import AdapterFileError, BaseMismatchError, UnsupportedFormatError
from adapterzoo.testing.models import FAMILIES, output, perturb, tiny_zoo

DATA = Path(__file__).parent / "data" / "adapterhub"
CASES = sorted(p.name for p in DATA.iterdir() if p.is_dir())


@pytest.mark.parametrize("case", CASES)
def test_adapterhub_adapter_gives_the_libraries_outputs(case: str) -> None:
    folder = DATA / case
    family = case.split("-")[0]
    reference = load_file(folder / "reference.safetensors")
    zoo = tiny_zoo(family)
    info = zoo.load_adapter("ah", folder)
    with torch.no_grad():
        bare = output(zoo(reference["input_ids"]))
        adapted = output(zoo(reference["input_ids"], adapters=["ah", "ah"]))
    torch.testing.assert_close(bare, reference["base"], atol=1e-5, rtol=0)  # same base in both libraries
    torch.testing.assert_close(adapted, reference["adapted"], atol=1e-4, rtol=0)
    assert info.type == "houlsby"
    ah = json.loads((folder / "adapter_config.json").read_text())["config"]
    assert info.config["bottleneck"] == 32 // ah["reduction_factor"]
    assert info.config["locations"] == [p for p, f in (("attention", "mh_adapter"), ("ffn", "output_adapter")) if ah[f]]


@pytest.mark.parametrize("family", FAMILIES)
def test_written_adapter_has_the_libraries_layout(tmp_path: Path, family: str) -> None:
    """Same config fields and values, same weight names and shapes as the library's own save."""
    reference = DATA / f"{family}-double_seq_bn"
    zoo = tiny_zoo(family)
    zoo.add_adapter("ah", "houlsby", bottleneck=4, activation="swish")
    perturb(zoo, "ah")
    folder = zoo.save_adapter("ah", tmp_path / "out", format="adapterhub")
    assert {p.name for p in folder.iterdir()} == {"adapter_config.json", "adapter.safetensors"}

    ours = json.loads((folder / "adapter_config.json").read_text())
    theirs = json.loads((reference / "adapter_config.json").read_text())
    for key in ("hidden_size", "model_class", "model_type", "name"):
        assert ours[key] == theirs[key], key
    assert set(ours["config"]) <= set(theirs["config"])
    for key in (
        "mh_adapter",
        "output_adapter",
        "non_linearity",
        "original_ln_before",
        "original_ln_after",
        "residual_before_ln",
        "ln_before",
        "ln_after",
        "is_parallel",
        "scaling",
        "use_gating",
        "leave_out",
    ):
        assert ours["config"][key] == theirs["config"][key], key
    assert int(32 // ours["config"]["reduction_factor"]) == 4

    mine, library = load_file(folder / "adapter.safetensors"), load_file(reference / "adapter.safetensors")
    assert {k: tuple(v.shape) for k, v in mine.items()} == {k: tuple(v.shape) for k, v in library.items()}

    zoo.load_adapter("back", folder)
    ids = torch.randint(4, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(
            output(zoo(ids, adapters=["back", "ah"]))[0], output(zoo(ids, adapters=["ah", "ah"]))[0]
        )


@pytest.mark.parametrize("bottleneck", [1, 3, 5, 7, 11, 31])
def test_odd_bottlenecks_survive_the_reduction_factor(tmp_path: Path, bottleneck: int) -> None:
    zoo = tiny_zoo("bert")
    zoo.add_adapter("ah", "houlsby", bottleneck=bottleneck, activation="relu", locations=["ffn"])
    folder = zoo.save_adapter("ah", tmp_path / "out", format="adapterhub")
    rf = json.loads((folder / "adapter_config.json").read_text())["config"]["reduction_factor"]
    assert int(32 // rf) == bottleneck  # what the adapters library computes
    assert zoo.load_adapter("back", folder).config["bottleneck"] == bottleneck


def _edited(tmp_path: Path, case: str = "bert-double_seq_bn", **fields) -> Path:
    folder = tmp_path / "edited"
    shutil.copytree(DATA / case, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["config"].update(fields)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"original_ln_before": True}, "original_ln_before"),  # seq_bn (Pfeiffer) as the library defines it
        ({"ln_after": True}, "ln_after"),
        ({"ln_before": True}, "ln_before"),
        ({"use_gating": True}, "use_gating"),
        ({"scaling": 0.5}, "scaling"),
        ({"scaling": "learned"}, "scaling"),
        ({"residual_before_ln": False}, "residual_before_ln"),
        ({"is_parallel": True}, "is_parallel"),
        ({"leave_out": [0]}, "leave_out"),
        ({"phm_layer": True}, "phm_layer"),
        ({"inv_adapter": "nice"}, "inv_adapter"),
        ({"non_linearity": "gelu_new"}, "non_linearity"),
        ({"reduction_factor": {"0": 8, "default": 16}}, "reduction_factor"),
        ({"a_future_option": True}, "a_future_option"),
    ],
)
def test_unsupported_adapterhub_options_are_refused_by_name(tmp_path: Path, fields: dict, named: str) -> None:
    zoo = tiny_zoo("bert")
    with pytest.raises(UnsupportedFormatError, match=named):
        zoo.load_adapter("ah", _edited(tmp_path, **fields))
    assert zoo.adapters == {}


def test_other_adapterhub_methods_are_refused(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedFormatError, match="'lora' adapter.*bottleneck"):
        tiny_zoo("bert").load_adapter("ah", _edited(tmp_path, architecture="lora"))


def test_pickle_only_adapterhub_adapter_is_refused(tmp_path: Path) -> None:
    folder = _edited(tmp_path)
    (folder / "adapter.safetensors").unlink()
    (folder / "pytorch_adapter.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(AdapterFileError, match="pickle.*use_safetensors=True"):
        tiny_zoo("bert").load_adapter("ah", folder)


def test_adapter_for_another_model_type_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BaseMismatchError, match="bert"):
        tiny_zoo("llama").load_adapter("ah", DATA / "bert-double_seq_bn")


def test_trained_prediction_head_is_refused(tmp_path: Path) -> None:
    folder = _edited(tmp_path, case="llama-double_seq_bn")
    head = json.loads((folder / "head_config.json").read_text())
    (folder / "head_config.json").write_text(
        json.dumps({**head, "config": {"head_type": "classification", "num_labels": 2}})
    )
    with pytest.raises(UnsupportedFormatError, match="prediction head"):
        tiny_zoo("llama").load_adapter("ah", folder)


def test_type_without_adapterhub_mapping_cannot_be_written(tmp_path: Path) -> None:
    zoo = tiny_zoo("bert")
    zoo.add_adapter("l", "lora", r=2)
    with pytest.raises(UnsupportedFormatError, match="no AdapterHub mapping"):
        zoo.save_adapter("l", tmp_path / "l", format="adapterhub")
