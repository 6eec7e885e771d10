"""PEFT LoRA config fields beyond r / lora_alpha / target_modules, each checked against PEFT itself.

rank_pattern and alpha_pattern (per-site rank and alpha), layers_to_transform / layers_pattern /
exclude_modules (which modules are sites), bias="lora_only" / "all" and lora_bias (trained
biases), modules_to_save (replaced heads, norms, embeddings) and trainable_token_indices
(replaced embedding rows): made and saved by PEFT (with every trained tensor randomised), loaded
here, compared with PeftModel.from_pretrained to 1e-4,
alone and mixed in one padded batch; written back with save_adapter(format="peft") and run by
PEFT again.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from adapterzoo.errors import InvalidConfigError, ShapeMismatchError, UnsupportedFormatError
from adapterzoo.testing.models import FAMILIES, output, perturb, tiny_model, tiny_zoo

from .helpers import assert_rows_match_alone, inputs, make_peft_adapter, peft_config, peft_output

ATOL = 1e-4

# family -> value, where a field names modules of one family
CASES = {
    "rank-and-alpha-pattern": {
        "r": 4,
        "lora_alpha": 8,
        "rank_pattern": {
            "llama": {"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 6},
            "gpt2": {r"h\.0\.attn\.c_attn": 2},
            "bert": {"value": 6, r"layer\.0\.attention\.self\.query": 1},
        },
        "alpha_pattern": {"llama": {"q_proj": 3}, "gpt2": {r"h\.1\.attn\.c_attn": 20}, "bert": {"query": 5}},
    },
    "rank-pattern-rslora-all-linear": {
        "r": 3,
        "lora_alpha": 5,
        "use_rslora": True,
        "target_modules": "all-linear",
        "rank_pattern": {"llama": {"down_proj": 5}, "gpt2": {"c_fc": 5}, "bert": {"intermediate.dense": 5}},
    },
    "layers-to-transform": {
        "r": 2,
        "layers_to_transform": [1],
        "target_modules": {"llama": ["q_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"], "bert": ["query", "dense"]},
    },
    "layers-pattern": {
        "r": 3,
        "layers_to_transform": 0,
        "layers_pattern": {"llama": "layers", "gpt2": "h", "bert": "layer"},
        "target_modules": {"llama": ["k_proj", "up_proj"], "gpt2": ["c_proj"], "bert": ["key", "output.dense"]},
    },
    "exclude-modules": {
        "r": 2,
        "target_modules": "all-linear",
        "exclude_modules": {
            "llama": ["model.layers.0.self_attn.q_proj", "down_proj"],
            "gpt2": ["c_fc"],
            "bert": r".*\.attention\.self\.(query|key)",
        },
    },
    "bias-lora-only-and-lora-bias": {"r": 2, "bias": "lora_only", "lora_bias": True},
    "bias-all": {"r": 2, "lora_alpha": 4, "bias": "all"},
    "lora-bias": {
        "r": 3,
        "lora_bias": True,
        "alpha_pattern": {"llama": {"q_proj": 9}, "gpt2": {"c_attn": 9}, "bert": {"query": 9}},
    },
    # PEFT's rule is a plain `endswith`: Llama's "norm" is every RMSNorm (input_layernorm, ..., model.norm)
    "modules-to-save-head-and-norms": {
        "r": 2,
        "modules_to_save": {
            "llama": ["lm_head", "norm"],
            "gpt2": ["lm_head", "ln_f"],
            "bert": ["layer.1.output.dense", "attention.output.LayerNorm"],
        },
    },
    "modules-to-save-embedding": {
        "r": 2,
        "modules_to_save": {"llama": ["embed_tokens"], "gpt2": ["wte"], "bert": ["word_embeddings"]},
    },
    "trainable-tokens": {"r": 2, "trainable_token_indices": list(range(4, 100, 3))},
    "combined": {
        "r": 2,
        "bias": "all",
        "rank_pattern": {"q_proj|c_attn|query": 5},
        "modules_to_save": {"llama": ["lm_head"], "gpt2": ["ln_f"], "bert": ["layer.0.output.dense"]},
        "trainable_token_indices": {
            "llama": {"embed_tokens": list(range(4, 100, 2))},
            "gpt2": {"wte": list(range(4, 100, 2))},
            "bert": {"word_embeddings": list(range(4, 100, 2))},
        },
    },
}


def case(family: str, name: str) -> dict:
    return {k: (v[family] if isinstance(v, dict) and family in v else v) for k, v in CASES[name].items()}


def peft_lora_modules(family: str, **kw) -> dict[str, int]:
    """The modules PEFT itself puts a LoRA on for this config, with their rank."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = __import__("peft").get_peft_model(tiny_model(family), peft_config(family, "lora", **kw))
    return {
        name.removeprefix("base_model.model."): module.r["default"]
        for name, module in model.named_modules()
        if hasattr(module, "lora_A") and "default" in module.lora_A
    }


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", CASES)
def test_peft_lora_field_loads_exactly(tmp_path: Path, family: str, name: str) -> None:
    kw = case(family, name)
    folder = make_peft_adapter(tmp_path / name, family, "lora", **kw)
    ids = inputs()
    expected = peft_output(family, folder, ids)

    zoo = tiny_zoo(family)
    info = zoo.load_adapter("a", folder)
    with torch.no_grad():
        got = output(zoo(ids, adapters=["a", "a"]))
        bare = output(zoo(ids))
    assert (expected - bare).abs().max() > 1e-2, "the PEFT adapter should change the output"
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)

    # the same sites and ranks as PEFT's own model
    adapter = zoo.get_adapter("a")
    ranks = {site: adapter.config.site_rank(site) for site, ts in adapter.tensors.items() if "A" in ts}
    assert ranks == peft_lora_modules(family, **kw)
    for key in (
        "rank_pattern",
        "alpha_pattern",
        "layers_to_transform",
        "layers_pattern",
        "bias",
        "lora_bias",
        "modules_to_save",
        "trainable_token_indices",
    ):
        if key in kw:
            got = info.config[key]
            assert (sorted(got) == sorted(kw[key])) if isinstance(kw[key], list) else got == kw[key]


def test_biases_are_stored_as_changes_to_the_base(tmp_path: Path) -> None:
    """bias='all' reaches the norms' biases too, and a row without the adapter keeps the base's biases."""
    folder = make_peft_adapter(tmp_path / "all", "gpt2", "lora", r=2, bias="all")
    zoo = tiny_zoo("gpt2")
    zoo.load_adapter("a", folder)
    adapter = zoo.get_adapter("a")
    assert "transformer.ln_f" in adapter.tensors and set(adapter.tensors["transformer.ln_f"]) == {"bias"}
    assert set(adapter.tensors["transformer.h.0.attn.c_attn"]) == {"A", "B", "bias"}
    base = dict(zoo.model.named_parameters())["transformer.ln_f.bias"]
    saved = __import__("safetensors.torch").torch.load_file(folder / "adapter_model.safetensors")
    torch.testing.assert_close(
        adapter.tensors["transformer.ln_f"]["bias"] + base,
        saved["base_model.model.transformer.ln_f.bias"],
        atol=1e-7,
        rtol=0,
    )
    ids = inputs()
    with torch.no_grad():
        mixed = output(zoo(ids, adapters=["a", None]))
    torch.testing.assert_close(mixed[1], output(tiny_zoo("gpt2")(ids[1:]))[0], atol=0, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_padded_batch_of_every_field_plain_lora_native_and_bare_base(tmp_path: Path, family: str) -> None:
    """Every case in one left-padded batch with a plain PEFT LoRA, a native type and the bare base: each row
    equals PEFT's output for that row alone. The bias adapters share one pool although their sites differ
    (a site holds only a bias for one and A, B and a bias for another)."""
    zoo = tiny_zoo(family)
    folders = {}
    for i, name in enumerate(["bias-all", *[n for n in CASES if n != "bias-all"]]):  # bias-only sites placed first
        folders[name] = make_peft_adapter(tmp_path / name, family, "lora", seed=i, **case(family, name))
        zoo.load_adapter(name, folders[name])
    folders["plain"] = make_peft_adapter(tmp_path / "plain", family, "lora", seed=9, r=4, lora_alpha=8)
    zoo.load_adapter("plain", folders["plain"])
    zoo.add_adapter("houlsby", "houlsby", bottleneck=4, trainable=False)
    perturb(zoo, "houlsby")

    rows = [*CASES, "plain", None, "houlsby", "bias-all", "layers-to-transform"]
    gen = torch.Generator().manual_seed(5)
    lengths = torch.randint(2, 8, (len(rows),), generator=gen).tolist()
    seqs = [torch.randint(4, 100, (n,), generator=gen) for n in lengths]
    assert_rows_match_alone(zoo, family, rows, seqs, folders, ATOL, base=tiny_zoo(family))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", CASES)
def test_loaded_peft_lora_fields_are_written_back_and_peft_runs_them_the_same(
    tmp_path: Path, family: str, name: str
) -> None:
    kw = case(family, name)
    folder = make_peft_adapter(tmp_path / "theirs", family, "lora", **kw)
    zoo = tiny_zoo(family)
    zoo.load_adapter("a", folder)
    ours = zoo.save_adapter("a", tmp_path / "ours", format="peft")

    written = json.loads((ours / "adapter_config.json").read_text())
    for key, value in kw.items():
        if key not in ("init_lora_weights", "target_modules"):
            same = sorted(written[key]) == sorted(value) if isinstance(value, list) else written[key] == value
            assert same, key
    ids = inputs()
    torch.testing.assert_close(peft_output(family, ours, ids), peft_output(family, folder, ids), atol=ATOL, rtol=0)
    zoo.load_adapter("back", ours)
    with torch.no_grad():
        torch.testing.assert_close(
            output(zoo(ids, adapters=["back", "a"])), output(zoo(ids, adapters=["a", "a"])), atol=1e-5, rtol=0
        )  # replaced weights go through base + change - base


@pytest.mark.parametrize("family", FAMILIES)
def test_new_adapter_with_per_site_ranks_and_biases_saves_for_peft_and_natively(tmp_path: Path, family: str) -> None:
    """Made here (not by PEFT): the smaller-rank sites stay zero-padded through training-style edits'
    init, and PEFT runs the written folder the same; the native format keeps every field."""
    pattern = {"llama": {"q_proj": 2}, "gpt2": {r"h\.1\.attn\.c_attn": 2}, "bert": {"query": 2}}[family]
    zoo = tiny_zoo(family)
    zoo.add_adapter(
        "a",
        "lora",
        r=4,
        lora_alpha=6,
        rank_pattern=pattern,
        alpha_pattern={"v_proj": 2, "value": 2},
        bias="lora_only",
        lora_bias=True,
        init_lora_weights=False,
        trainable=False,
    )
    adapter = zoo.get_adapter("a")
    for site, ts in adapter.tensors.items():
        r = adapter.config.site_rank(site)
        assert ts["A"][:, r:].abs().sum() == 0 and ts["B"][r:].abs().sum() == 0
        if "lora_bias" in ts:
            ts["lora_bias"].normal_(0, 0.3)
        if "bias" in ts:
            ts["bias"].normal_(0, 0.3)
    adapter.mark_edited()
    ids = inputs()
    with torch.no_grad():
        ours = output(zoo(ids, adapters=["a", "a"]))
    assert (ours - output(zoo(ids))).abs().max() > 1e-2
    folder = zoo.save_adapter("a", tmp_path / "peft", format="peft")
    torch.testing.assert_close(peft_output(family, folder, ids), ours, atol=ATOL, rtol=0)

    zoo.save_adapter("a", tmp_path / "native")
    zoo.load_adapter("n", tmp_path / "native")
    assert zoo.adapters["n"].config == zoo.adapters["a"].config
    with torch.no_grad():
        expected = torch.stack([ours[0], output(zoo(ids[1:]))[0]])
        torch.testing.assert_close(output(zoo(ids, adapters=["n", None])), expected, atol=0, rtol=0)


MERGED = {
    "patterns-and-biases": {**CASES["rank-and-alpha-pattern"], "bias": "all", "lora_bias": True},
    "head-and-norms": CASES["modules-to-save-head-and-norms"],
    "embedding": CASES["modules-to-save-embedding"],
    "tokens": CASES["trainable-tokens"],
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", MERGED)
def test_merged_model_and_native_round_trip_equal_the_zoo(tmp_path: Path, family: str, name: str) -> None:
    """merged_model folds every field into a copy of the base (a tied GPT-2 head and embedding are untied
    where PEFT's copy would be, and stay tied for replaced token rows); the native format keeps them all."""
    kw = {k: (v[family] if isinstance(v, dict) and family in v else v) for k, v in MERGED[name].items()}
    folder = make_peft_adapter(tmp_path / "a", family, "lora", **kw)
    zoo = tiny_zoo(family)
    zoo.load_adapter("a", folder)
    ids = inputs()
    with torch.no_grad():
        ours = output(zoo(ids, adapters=["a", "a"]))
        plain = zoo.merged_model("a")(input_ids=ids)
        merged = plain.logits if family != "bert" else plain.last_hidden_state
        torch.testing.assert_close(merged, ours, atol=ATOL, rtol=0)
        torch.testing.assert_close(output(zoo(ids)), output(tiny_zoo(family)(ids)), atol=0, rtol=0)  # base untouched
        zoo.save_adapter("a", tmp_path / "native")
        zoo.load_adapter("n", tmp_path / "native")
        torch.testing.assert_close(output(zoo(ids, adapters=["n", "n"])), ours, atol=0, rtol=0)


def test_a_replaced_lm_head_is_counted_in_the_adapters_size(tmp_path: Path) -> None:
    """A replaced lm_head is vocab x hidden floats per adapter; the adapter's reported size says so."""
    small = make_peft_adapter(tmp_path / "small", "llama", "lora", r=2)
    head = make_peft_adapter(tmp_path / "head", "llama", "lora", r=2, modules_to_save=["lm_head"])
    zoo = tiny_zoo("llama")
    lora_only = zoo.load_adapter("small", small).parameters
    info = zoo.load_adapter("head", head)
    vocab, hidden = zoo.model.lm_head.weight.shape
    assert info.parameters == lora_only + vocab * hidden


def test_training_replaced_token_rows_changes_only_the_listed_rows() -> None:
    zoo = tiny_zoo("gpt2")
    zoo.add_adapter("t", "lora", r=2, trainable_token_indices=[5, 9])
    adapter = zoo.get_adapter("t")
    ids = torch.tensor([[5, 6, 9, 10, 11]])
    out = zoo(ids, adapters=["t"], labels=ids)
    out.loss.backward()
    rows = adapter.tensors["transformer.wte"]["token_delta"].grad.abs().sum(-1)
    assert rows.nonzero().flatten().tolist() == [5, 9]
    columns = adapter.tensors["lm_head"]["tied_weight_delta"].grad.abs().sum(0)  # GPT-2's head is tied to wte
    assert columns.nonzero().flatten().tolist() == [5, 9]
    assert adapter.tensors["transformer.wte"]["token_mask"].grad is None


@pytest.mark.parametrize("family", FAMILIES)
def test_new_adapter_with_replaced_modules_and_token_rows_runs_the_same_in_peft(tmp_path: Path, family: str) -> None:
    saved = {"llama": ["lm_head", "model.norm"], "gpt2": ["ln_f"], "bert": ["layer.0.output.dense"]}[family]
    zoo = tiny_zoo(family)
    zoo.add_adapter(
        "a",
        "lora",
        r=2,
        modules_to_save=saved,
        trainable_token_indices=[4, 8, 15],
        init_lora_weights=False,
        trainable=False,
    )
    adapter = zoo.get_adapter("a")
    g = torch.Generator().manual_seed(1)
    embedding = next(site for site, ts in adapter.tensors.items() if "token_delta" in ts)
    with torch.no_grad():
        for ts in adapter.tensors.values():
            for key, t in ts.items():
                if key in ("weight_delta", "norm_weight", "bias"):
                    t.add_(torch.randn(t.shape, generator=g) * 0.3)
        rows = adapter.tensors[embedding]["token_delta"]
        rows[[4, 8, 15]] = torch.randn(3, rows.shape[1], generator=g)  # only the listed rows
        for ts in adapter.tensors.values():
            if "tied_weight_delta" in ts:  # GPT-2's head is tied to wte: the same rows
                ts["tied_weight_delta"].copy_(rows.T)
    adapter.mark_edited()
    ids = torch.tensor([[4, 5, 8, 9, 15, 16, 3]])
    with torch.no_grad():
        ours = output(zoo(ids, adapters=["a"]))
    assert (ours - output(zoo(ids))).abs().max() > 1e-2
    folder = zoo.save_adapter("a", tmp_path / "peft", format="peft")
    torch.testing.assert_close(peft_output(family, folder, ids), ours, atol=ATOL, rtol=0)


# ------------------------------------------------------------------- PEFT's selection rule, exactly

SELECTIONS = [
    {"target_modules": ["q_proj", "model.layers.0.mlp.up_proj"], "layers_to_transform": [1]},  # an exact path skips it
    {"target_modules": ["q_proj", "v_proj", "gate_proj"], "layers_to_transform": 0, "layers_pattern": "layers"},
    {"target_modules": ["q_proj"], "layers_to_transform": [0, 1], "layers_pattern": ["h", "layers"]},
    {"target_modules": ["proj", "q_proj"], "layers_to_transform": [1]},  # only full name segments match
    {"target_modules": ["self_attn.o_proj", "k_proj"], "exclude_modules": ["model.layers.1.self_attn.k_proj"]},
    {"target_modules": r".*\.layers\.\d\.mlp\.\w+_proj", "exclude_modules": r".*\.layers\.1\..*"},
    {"target_modules": "all-linear", "exclude_modules": ["mlp.up_proj", "o_proj"]},
]


@pytest.mark.parametrize("selection", SELECTIONS, ids=range(len(SELECTIONS)))
def test_sites_are_the_modules_peft_adapts(selection: dict) -> None:
    from adapterzoo_lora.lora import LoraConfig, lora_sites

    model = tiny_model("llama")
    expected = peft_lora_modules("llama", r=2, **selection)
    assert sorted(lora_sites(model, LoraConfig(r=2, **selection))) == sorted(expected)


# ------------------------------------------------------------------- bad input, named


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"rank_pattern": {"q_proj": 0}}, "rank_pattern"),
        ({"alpha_pattern": {"q_proj": "big"}}, "alpha_pattern"),
        ({"rank_pattern": {"q_proj(": 2}}, "not a valid regular expression"),
        ({"target_modules": ".*q_proj", "layers_to_transform": [0]}, "layers_to_transform works only"),
        ({"layers_pattern": "layers"}, "layers_pattern needs layers_to_transform"),
        ({"layers_to_transform": [-1]}, "layers_to_transform"),
        ({"bias": "some"}, "bias must be one of"),
        ({"exclude_modules": ["q_proj", "v_proj"]}, "matches no linear layer"),
        ({"layers_to_transform": [7]}, "matches no linear layer"),
    ],
)
def test_bad_lora_selection_or_pattern_is_refused_by_name(fields: dict, named: str) -> None:
    zoo = tiny_zoo("llama")
    with pytest.raises(InvalidConfigError, match=named):
        zoo.add_adapter("a", "lora", r=2, **fields)
    assert zoo.adapters == {}


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"modules_to_save": ["self_attn", "o_proj"]}, "inside it"),
        ({"modules_to_save": ["lm_head("]}, "not a valid regular expression"),
        ({"modules_to_save": ["rotary_emb"]}, "LlamaRotaryEmbedding"),
        ({"trainable_token_indices": [3, 100]}, "vocabulary has 100 tokens"),
        ({"trainable_token_indices": [3, 3]}, "twice"),
        ({"trainable_token_indices": {"lm_head": [3]}}, "embedding layers only"),
        ({"trainable_token_indices": {"wte": [3]}}, "no module"),
        ({"trainable_token_indices": {"embed_tokens": [3]}, "modules_to_save": ["embed_tokens"]}, "both"),
    ],
)
def test_bad_modules_to_save_or_token_rows_are_refused_by_name(fields: dict, named: str) -> None:
    zoo = tiny_zoo("llama")
    with pytest.raises(InvalidConfigError, match=named):
        zoo.add_adapter("a", "lora", r=2, **fields)
    assert zoo.adapters == {}


def test_peft_modules_to_save_tied_by_ensure_weight_tying_is_refused(tmp_path: Path) -> None:
    folder = make_peft_adapter(tmp_path / "a", "gpt2", "lora", r=2, modules_to_save=["lm_head"])
    config = json.loads((folder / "adapter_config.json").read_text())
    config["ensure_weight_tying"] = True
    (folder / "adapter_config.json").write_text(json.dumps(config))
    zoo = tiny_zoo("gpt2")
    with pytest.raises(UnsupportedFormatError, match="ensure_weight_tying"):
        zoo.load_adapter("a", folder)
    assert zoo.adapters == {}


def test_peft_weights_that_disagree_with_rank_pattern_are_refused(tmp_path: Path) -> None:
    folder = make_peft_adapter(tmp_path / "a", "llama", "lora", r=4, rank_pattern={"v_proj": 2})
    config = json.loads((folder / "adapter_config.json").read_text())
    config["rank_pattern"] = {"v_proj": 3}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    zoo = tiny_zoo("llama")
    with pytest.raises(ShapeMismatchError, match=r"lora_(A|B).weight.*rank 3"):
        zoo.load_adapter("a", folder)
    assert zoo.adapters == {}


def test_peft_bias_for_another_base_is_refused(tmp_path: Path) -> None:
    """A trained bias must fit the base's bias at that module (GPT-2's c_attn has one of 96; Llama's q_proj none)."""
    folder = make_peft_adapter(tmp_path / "a", "llama", "lora", r=2, lora_bias=True)
    config = json.loads((folder / "adapter_config.json").read_text())
    from safetensors.torch import load_file, save_file

    state = load_file(folder / "adapter_model.safetensors")
    state["base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias"] = torch.zeros(32)
    save_file(state, folder / "adapter_model.safetensors")
    config["bias"] = "lora_only"
    (folder / "adapter_config.json").write_text(json.dumps(config))
    zoo = tiny_zoo("llama")
    with pytest.raises(ShapeMismatchError, match="has no bias"):
        zoo.load_adapter("a", folder)
    assert zoo.adapters == {}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_mixed_generation_with_replaced_heads_embeddings_and_rows_equals_each_row_alone(
    tmp_path: Path, family: str
) -> None:
    """Decoding (one token per row, KV cache) reads the replaced lm_head, embedding and token rows per row too."""
    zoo = tiny_zoo(family)
    for i, name in enumerate(
        ["modules-to-save-head-and-norms", "modules-to-save-embedding", "trainable-tokens", "bias-all"]
    ):
        zoo.load_adapter(name, make_peft_adapter(tmp_path / name, family, "lora", seed=i, **case(family, name)))
    rows = ["modules-to-save-head-and-norms", None, "modules-to-save-embedding", "trainable-tokens", "bias-all"]
    prompts = ["abc", "hello", "xyz q", "tokens", "b"]
    with torch.no_grad():
        mixed = zoo.generate(prompts, adapters=rows, max_new_tokens=6)
        alone = [zoo.generate([p], adapters=[name], max_new_tokens=6)[0] for p, name in zip(prompts, rows)]
    assert mixed == alone
    assert len(set(mixed)) > 1


def test_peft_folder_whose_saved_module_weights_are_missing_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    folder = make_peft_adapter(tmp_path / "a", "llama", "lora", r=2, modules_to_save=["lm_head"])
    state = load_file(folder / "adapter_model.safetensors")
    del state["base_model.model.lm_head.weight"]
    save_file(state, folder / "adapter_model.safetensors")
    zoo = tiny_zoo("llama")
    with pytest.raises(ShapeMismatchError, match="missing"):
        zoo.load_adapter("a", folder)
    assert zoo.adapters == {}
