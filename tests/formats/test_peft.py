"""PEFT's format, both ways, checked against PEFT itself (PeftModel.from_pretrained) on tiny bases.

Adapters are made and saved by PEFT, reference outputs computed by PEFT; ours must agree to 1e-4
in float32, alone and in mixed batches with each other and with native adapter types.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from adapterzoo.errors import AdapterFileError, BaseMismatchError, ShapeMismatchError, UnsupportedFormatError
from adapterzoo.testing.models import FAMILIES, output, perturb, tiny_zoo

from .helpers import assert_rows_match_alone, inputs, make_peft_adapter, peft_output

ATOL = 1e-4

LORA_CASES = {
    "lora-r4": {"r": 4, "lora_alpha": 8},
    "lora-rslora-all-linear": {"r": 3, "lora_alpha": 5, "use_rslora": True, "target_modules": "all-linear"},
    "lora-regex": {
        "r": 2,
        "lora_alpha": 4,
        "target_modules": {
            "llama": r".*\.(k_proj|down_proj)",
            "gpt2": r".*\.(c_attn|c_fc)",
            "bert": r".*\.(key|intermediate\.dense)",
        },
    },
    "lora-list": {
        "r": 5,
        "lora_alpha": 16,
        "target_modules": {"llama": ["o_proj", "up_proj"], "gpt2": ["c_proj"], "bert": ["value", "output.dense"]},
    },
}
PROMPT_CASES = {
    "prefix": ("prefix", {"num_virtual_tokens": 3}),
    "prefix-projection": ("prefix", {"num_virtual_tokens": 4, "prefix_projection": True, "encoder_hidden_size": 16}),
    "prompt": ("prompt", {"num_virtual_tokens": 3}),
}


def _case(family: str, name: str) -> tuple[str, dict]:
    if name in LORA_CASES:
        kw = {k: (v[family] if isinstance(v, dict) else v) for k, v in LORA_CASES[name].items()}
        return "lora", kw
    return PROMPT_CASES[name]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", [*LORA_CASES, *PROMPT_CASES])
def test_peft_adapter_loads_exactly(tmp_path: Path, family: str, case: str) -> None:
    kind, kw = _case(family, case)
    folder = make_peft_adapter(tmp_path / case, family, kind, **kw)
    ids = inputs()
    expected = peft_output(family, folder, ids)

    zoo = tiny_zoo(family)
    info = zoo.load_adapter("a", folder)
    with torch.no_grad():
        got = output(zoo(ids, adapters=["a", "a"]))
        bare = output(zoo(ids))
    assert (expected - bare).abs().max() > 1e-2, "the PEFT adapter should change the output"
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    assert info.type == {"lora": "lora", "prefix": "prefix", "prompt": "soft_prompt"}[kind]
    if kind == "lora":
        assert info.config["r"] == kw["r"] and info.config["use_rslora"] == kw.get("use_rslora", False)


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_batch_of_peft_and_native_adapters(tmp_path: Path, family: str) -> None:
    """Several PEFT adapters (ranks, targets, rsLoRA, prefix, prompt) and native types in one padded batch:
    each row equals PEFT's (or our own) output for that row alone, unpadded."""
    peft_adapters = {
        "l2": ("lora", {"r": 2, "lora_alpha": 4}),
        "l6": ("lora", {"r": 6, "lora_alpha": 3, "use_rslora": True, "target_modules": "all-linear"}),
        "pre": ("prefix", {"num_virtual_tokens": 3}),
        "pro": ("prompt", {"num_virtual_tokens": 2}),
    }
    zoo = tiny_zoo(family)
    folders = {}
    for i, (name, (kind, kw)) in enumerate(peft_adapters.items()):
        folders[name] = make_peft_adapter(tmp_path / name, family, kind, seed=i, **kw)
        zoo.load_adapter(name, folders[name])
    zoo.add_adapter("houlsby", "houlsby", bottleneck=4, trainable=False)
    perturb(zoo, "houlsby")
    zoo.add_adapter("nl", "lora", r=4, init_lora_weights=False, trainable=False)

    rows = ["l2", "houlsby", "pre", None, "l6", "pro", "nl", "l2"]
    lengths = [5, 7, 3, 6, 7, 4, 2, 7]
    gen = torch.Generator().manual_seed(3)
    seqs = [torch.randint(4, 100, (n,), generator=gen) for n in lengths]
    assert_rows_match_alone(zoo, family, rows, seqs, folders, ATOL)


WRITE_CASES = {
    "lora": ("lora", {"r": 3, "lora_alpha": 6}),
    "lora-all-linear-rslora": ("lora", {"r": 5, "lora_alpha": 2, "use_rslora": True, "target_modules": "all-linear"}),
    "prefix": ("prefix", {"num_virtual_tokens": 4}),
    "soft_prompt": ("soft_prompt", {"num_virtual_tokens": 3}),
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", WRITE_CASES)
def test_written_peft_folder_runs_the_same_in_peft(tmp_path: Path, family: str, case: str) -> None:
    type_name, kw = WRITE_CASES[case]
    zoo = tiny_zoo(family)
    zoo.add_adapter("a", type_name, **kw)
    perturb(zoo, "a", scale=0.3)
    folder = zoo.save_adapter("a", tmp_path / "peft", format="peft")
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]

    ids = inputs()
    with torch.no_grad():
        ours = output(zoo(ids, adapters=["a", "a"]))
    torch.testing.assert_close(peft_output(family, folder, ids), ours, atol=ATOL, rtol=0)

    zoo.load_adapter("back", folder)  # and it reads back into adapterzoo unchanged
    assert zoo.adapters["back"].config["num_virtual_tokens" if "r" not in kw else "r"] == kw.get(
        "num_virtual_tokens", kw.get("r")
    )
    with torch.no_grad():
        torch.testing.assert_close(output(zoo(ids, adapters=["back", "back"])), ours, atol=0, rtol=0)


def test_written_peft_folder_keeps_the_base_fingerprint(tmp_path: Path) -> None:
    zoo = tiny_zoo("llama", seed=0)
    zoo.add_adapter("a", "lora", r=2)
    folder = zoo.save_adapter("a", tmp_path / "peft", format="peft")
    other = tiny_zoo("llama", seed=1)
    with pytest.raises(BaseMismatchError, match="another base"):
        other.load_adapter("a", folder)
    assert "a" not in other.adapters
    other.load_adapter("a", folder, ignore_base_mismatch=True)


def test_peft_adapter_for_another_architecture_is_refused(tmp_path: Path) -> None:
    folder = make_peft_adapter(tmp_path / "gpt2", "gpt2", "prefix", num_virtual_tokens=2)
    zoo = tiny_zoo("llama")
    with pytest.raises(UnsupportedFormatError, match="another base"):
        zoo.load_adapter("p", folder)
    lora = make_peft_adapter(tmp_path / "bert-lora", "bert", "lora", r=2, target_modules=["query"])
    with pytest.raises((ShapeMismatchError, ValueError)):
        zoo.load_adapter("l", lora)
    assert zoo.adapters == {}


# ----------------------------------------------------------------------------- refused, clearly


@pytest.fixture(scope="module")
def lora_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_peft_adapter(tmp_path_factory.mktemp("peft") / "lora", "llama", "lora", r=2)


def _edited(lora_folder: Path, tmp_path: Path, **fields) -> Path:
    folder = tmp_path / "edited"
    folder.mkdir()
    config = json.loads((lora_folder / "adapter_config.json").read_text())
    config.update(fields)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    (folder / "adapter_model.safetensors").write_bytes((lora_folder / "adapter_model.safetensors").read_bytes())
    return folder


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"use_dora": True}, "use_dora"),
        ({"target_parameters": ["model.layers.0.mlp.down_proj.weight"]}, "target_parameters"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights"),
        ({"use_qalora": True}, "use_qalora"),
        ({"layer_replication": [[0, 2]]}, "layer_replication"),
        ({"some_future_option": {"on": True}}, "some_future_option"),
    ],
)
def test_unsupported_lora_fields_are_refused_by_name(
    lora_folder: Path, tmp_path: Path, fields: dict, named: str
) -> None:
    zoo = tiny_zoo("llama")
    with pytest.raises(UnsupportedFormatError, match=named) as caught:
        zoo.load_adapter("a", _edited(lora_folder, tmp_path, **fields))
    assert "not supported" in str(caught.value)
    assert zoo.adapters == {}


def test_harmless_lora_fields_are_accepted(lora_folder: Path, tmp_path: Path) -> None:
    folder = _edited(
        lora_folder,
        tmp_path,
        rank_pattern={},
        alpha_pattern={},
        bias="none",
        lora_dropout=0.1,
        init_lora_weights="gaussian",
        revision="main",
        layers_pattern=None,
    )
    tiny_zoo("llama").load_adapter("a", folder)


def _dora_reader() -> str | None:
    """The installed type that claims PEFT LORA folders with use_dora=True (a plugin's peft_when), if any."""
    from adapterzoo import plugins

    return next(
        (
            n
            for n, i in plugins.adapter_types().items()
            if (getattr(i.cls, "peft_when", None) or {}).get("use_dora") is True
        ),
        None,
    )


def test_real_dora_adapter_is_refused_unless_a_plugin_claims_it(tmp_path: Path) -> None:
    folder = make_peft_adapter(tmp_path / "dora", "llama", "lora", r=2, use_dora=True)
    if _dora_reader() is not None:  # e.g. examples/adapterzoo-dora installed: it reads the folder, lora does not
        assert tiny_zoo("llama").load_adapter("a", folder).type == _dora_reader()
        return
    with pytest.raises(UnsupportedFormatError, match="use_dora.*DoRA"):
        tiny_zoo("llama").load_adapter("a", folder)


def _claimed_peft_types() -> list[str]:
    from adapterzoo.formats._common import claimed

    return claimed("peft_types")


# only the methods no installed plugin claims (a plugin may read LOHA or P_TUNING)
@pytest.mark.parametrize("peft_type", [t for t in ["IA3", "LOHA", "P_TUNING"] if t not in _claimed_peft_types()])
def test_other_peft_methods_are_refused(lora_folder: Path, tmp_path: Path, peft_type: str) -> None:
    readable = ", ".join(_claimed_peft_types())
    with pytest.raises(UnsupportedFormatError, match=f"PEFT {peft_type} adapter.*{readable}"):
        tiny_zoo("llama").load_adapter("a", _edited(lora_folder, tmp_path, peft_type=peft_type))


def test_real_ia3_adapter_is_refused(tmp_path: Path) -> None:
    from peft import IA3Config, TaskType, get_peft_model

    from adapterzoo.testing.models import tiny_model

    get_peft_model(tiny_model("llama"), IA3Config(task_type=TaskType.CAUSAL_LM)).save_pretrained(tmp_path / "ia3")
    with pytest.raises(UnsupportedFormatError, match="IA3"):
        tiny_zoo("llama").load_adapter("a", tmp_path / "ia3")


def test_pickle_only_peft_adapter_is_refused(lora_folder: Path, tmp_path: Path) -> None:
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "adapter_config.json").write_bytes((lora_folder / "adapter_config.json").read_bytes())
    (folder / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(AdapterFileError, match="pickle"):
        tiny_zoo("llama").load_adapter("a", folder)


def test_truncated_peft_weights_are_refused(lora_folder: Path, tmp_path: Path) -> None:
    folder = _edited(lora_folder, tmp_path)
    data = (folder / "adapter_model.safetensors").read_bytes()
    (folder / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterFileError, match="truncated or corrupt"):
        tiny_zoo("llama").load_adapter("a", folder)


def test_type_without_peft_mapping_cannot_be_written(tmp_path: Path) -> None:
    zoo = tiny_zoo("gpt2")
    zoo.add_adapter("b", "bitfit")
    with pytest.raises(UnsupportedFormatError, match="bitfit.*no PEFT mapping.*native"):
        zoo.save_adapter("b", tmp_path / "b", format="peft")
    assert not (tmp_path / "b").exists()
    with pytest.raises(UnsupportedFormatError, match="unknown format"):
        zoo.save_adapter("b", tmp_path / "b", format="onnx")


# ----------------------------------------------------------------------------- base_model_name_or_path


def test_peft_folder_from_an_in_memory_base_says_it_has_no_hub_id(tmp_path: Path) -> None:
    """null made AutoPeftModelForCausalLM report a connection error; the field now says what is true, and
    PEFT's auto class refuses it quoting that, without going to the network."""
    from peft import AutoPeftModelForCausalLM

    zoo = tiny_zoo("llama")
    zoo.add_adapter("a", "lora", r=2)
    folder = zoo.save_adapter("a", tmp_path / "peft", format="peft")
    name = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert "no Hub id" in name and "PeftModel.from_pretrained(base, this_folder)" in name
    assert zoo.fingerprint.id in name
    with pytest.raises(Exception, match="no Hub id") as caught:
        AutoPeftModelForCausalLM.from_pretrained(folder)
    assert "connect" not in str(caught.value)


def test_peft_folder_names_the_hub_id_of_a_hub_base_and_never_a_local_path(tmp_path: Path) -> None:
    zoo = tiny_zoo("gpt2")
    zoo.add_adapter("a", "lora", r=2)
    zoo.model.config._name_or_path = "openai-community/gpt2"
    folder = zoo.save_adapter("a", tmp_path / "hub", format="peft")
    assert (
        json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == "openai-community/gpt2"
    )

    local = tmp_path / "bases" / "my-gpt2"
    local.mkdir(parents=True)
    zoo.model.config._name_or_path = str(local)
    folder = zoo.save_adapter("a", tmp_path / "local", format="peft")
    text = (folder / "adapter_config.json").read_text()
    assert str(tmp_path) not in text and "no Hub id" in json.loads(text)["base_model_name_or_path"]
