"""Zoo: the one object users hold. A frozen base, its adapters, their slot pools.

zoo = Zoo.from_pretrained("smollm2")                    # the base, loaded once and frozen
zoo.add_adapter("sql", "lora", r=8)                      # new, trainable
zoo.load_adapter("chat", "out/chat")                     # saved earlier (or PEFT, or a Hub id)
out = zoo(input_ids=ids, attention_mask=mask, adapters=["sql", None, "chat"])
texts = zoo.generate(["...", "..."], adapters=["sql", "chat"])
"""

from __future__ import annotations

import copy
import functools
import inspect
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import plugins
from .adapter import Adapter, check_name, check_sizes, new_adapter
from .base import Fingerprint, fingerprint, freeze, load_base
from .contract import check_adapter
from .errors import (
    AdapterExistsError,
    AdapterZooError,
    BatchError,
    InvalidConfigError,
    PoolFullError,
    UnknownAdapterError,
)
from .formats import FormatContext, detect_format, format_named
from .heads import HeadConfig, class_logits, new_head
from .plan import BatchPlan, build_plan, fit_tokens, place_rows, virtual_columns
from .pool import LivePool, SlotPool
from .runtime import Runtime, active, attention_by, prefix_columns, strip_delta_sites
from .sites import hidden_size
from .types import AdapterType


@dataclass(frozen=True)
class AdapterInfo:
    """What `zoo.adapters[name]` tells: type, config, and where the adapter lives now."""

    name: str
    type: str
    config: dict[str, Any]
    where: str  # "device" (in a slot pool) or "host"
    parameters: int
    trainable: bool
    head: dict[str, Any] | None = None  # the classification head's config, if the adapter has one


@dataclass
class ZooOutput:
    """Logits (causal LMs) or last hidden states (encoders), aligned with the caller's tokens."""

    logits: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    cache: Any = None
    attention_mask: torch.Tensor | None = None  # the full mask the base saw (virtual tokens included)
    plan: BatchPlan | None = None
    loss: torch.Tensor | None = None
    class_logits: torch.Tensor | None = None  # (B, max num_labels) through each row's head (heads.py)


class Zoo:
    """One frozen base model serving many adapters of many types in one mixed batch."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any = None,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        slots: int = 16,
        pool_limits: dict[str, int] | None = None,
        max_size: int = 256,
    ):
        if slots < 1:
            raise InvalidConfigError(f"slots must be at least 1, got {slots}")
        device = (
            torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        )
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        self.model = freeze(model.to(device=device, dtype=dtype))
        self.tokenizer = tokenizer
        self.device, self.dtype = device, dtype
        self.slots = slots
        self.pool_limits = dict(pool_limits or {})
        self.max_size = max_size
        self.fingerprint: Fingerprint = fingerprint(self.model)
        self.is_causal_lm = (
            hasattr(self.model, "get_output_embeddings") and self.model.get_output_embeddings() is not None
        )
        self.runtime = Runtime(self.model)
        self.pools: dict[tuple, SlotPool] = {}
        self._adapters: dict[str, Adapter] = {}
        self._types: dict[str, AdapterType] = {}
        self._lock = threading.RLock()  # residency changes and forwards of concurrent callers
        self._cache_kw = _cache_keyword(self.model)
        self._keeps_logits = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        self._checked_pools: set[tuple] = set()  # pool keys whose type ran once on a tiny input

    @classmethod
    def from_pretrained(
        cls,
        source: str | os.PathLike | None = None,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        task: str | None = None,
        **kwargs: Any,
    ) -> Zoo:
        """Load a base (folder, Hub id, .gguf file, or "smollm2" / "minilm") and freeze it."""
        model, tokenizer = load_base(source, task=task)
        return cls(model, tokenizer, device=device, dtype=dtype, **kwargs)

    # ------------------------------------------------------------------ adapters

    def adapter_type(self, name: str) -> AdapterType:
        if name not in self._types:
            self._types[name] = plugins.get_adapter_type(name)()
        return self._types[name]

    @property
    def adapters(self) -> dict[str, AdapterInfo]:
        return {name: self._info(a) for name, a in self._adapters.items()}

    def find_adapter(self, name: str) -> Adapter | None:
        """The adapter `name` if this zoo holds it, else None (a cheap residency check: servers
        ask it per request; `adapters` builds every adapter's info)."""
        return self._adapters.get(name)

    def adapter_names(self) -> list[str]:
        """The names of the adapters this zoo holds, in the order they were added."""
        return list(self._adapters)

    # -- residency: what a server asks (serve/tiers.py, serve/engine.py), never the zoo's own state

    def where(self, name: str) -> str | None:
        """Where adapter `name` lives now: "device" (current in a slot pool), "host" (only in
        memory), or None (this zoo does not hold it)."""
        adapter = self._adapters.get(name)
        if adapter is None:
            return None
        pool = self.pools.get(adapter.pool_key)
        return "device" if pool is not None and pool.is_current(adapter) else "host"

    def slots_in_use(self) -> int:
        """How many device slots hold an adapter, over every slot pool."""
        return sum(len(pool.lru) for pool in self.pools.values())

    def token_lengths(self, name: str) -> tuple[int, int]:
        """(virtual, prefix): the soft-prompt tokens adapter `name` puts before a prompt, and the
        prefix tokens its attention sees first; both count against the base's context length."""
        adapter = self.get_adapter(name)
        return adapter.prompt_length(), adapter.prefix_length()

    def exclusive(self) -> threading.RLock:
        """`with zoo.exclusive():` no forward, plan, add or remove of another thread runs meanwhile
        (the lock every residency change and forward takes; re-entrant)."""
        return self._lock

    def get_adapter(self, name: str) -> Adapter:
        try:
            return self._adapters[name]
        except KeyError:
            known = ", ".join(sorted(self._adapters)) or "none"
            raise UnknownAdapterError(
                f"no adapter named {name!r} in this zoo (it has: {known}); add_adapter or load_adapter it first"
            ) from None

    def add_adapter(
        self,
        name: str,
        adapter_type: str,
        *,
        seed: int = 0,
        trainable: bool = True,
        head: dict | int | None = None,
        **config: Any,
    ) -> AdapterInfo:
        """Create a new adapter, initialised near identity, and make it trainable.

        `head={"num_labels": k, "pooling": "mean" | "cls" | "last", "labels": [...]}` gives it a
        classification head (adapterzoo/heads.py), part of the adapter from then on.
        """
        check_name(name)
        atype = self.adapter_type(adapter_type)
        cfg = atype.Config.from_dict(config)
        head_config = HeadConfig.parse(head) if head is not None else None
        sizes = check_sizes(atype, cfg, self.pool_limits, self.max_size, self.model)
        adapter = new_adapter(name, atype, cfg, self.model, sizes, seed)
        if head_config is not None:
            adapter.head = new_head(head_config, hidden_size(self.model), torch.Generator().manual_seed(seed + 7919))
        if trainable:
            adapter.set_trainable(True)
        self._register(adapter)
        return self._info(adapter)

    def load_adapter(
        self,
        name: str,
        source: str | os.PathLike,
        *,
        revision: str | None = None,
        token: str | None = None,
        endpoint: str | None = None,
        ignore_base_mismatch: bool = False,
        trainable: bool = False,
    ) -> AdapterInfo:
        """Load a saved adapter (native, PEFT or AdapterHub layout) from a folder or a Hub repo id.

        Everything is read and checked before the zoo changes: a bad file leaves it as it was.
        """
        adapter = self.read_adapter(
            name, source, revision=revision, token=token, endpoint=endpoint, ignore_base_mismatch=ignore_base_mismatch
        )
        if trainable:
            adapter.set_trainable(True)
        return self.add_loaded_adapter(adapter)

    def read_adapter(
        self,
        name: str,
        source: str | os.PathLike,
        *,
        revision: str | None = None,
        token: str | None = None,
        endpoint: str | None = None,
        ignore_base_mismatch: bool = False,
    ) -> Adapter:
        """Read and check an adapter (as `load_adapter` does) without adding it to the zoo.

        A server reads in a background thread, then adds the result between two forwards with
        `add_loaded_adapter`, so that hooks and pools never change under a running batch.
        """
        check_name(name)
        folder = Path(source)
        if not folder.exists() and _looks_like_repo_id(str(source)):
            from .hub import download_adapter

            folder = download_adapter(str(source), revision=revision, token=token, endpoint=endpoint)
        fmt = detect_format(folder)
        return fmt.read(self._format_context(), name, folder, ignore_base_mismatch=ignore_base_mismatch)

    def add_loaded_adapter(self, adapter: Adapter) -> AdapterInfo:
        """Add an adapter from `read_adapter` (its name must be free)."""
        self._register(adapter)
        return self._info(adapter)

    def _format_context(self) -> FormatContext:
        """What a file format may know of this zoo (adapterzoo/formats/): the base and the limits."""
        return FormatContext(
            model=self.model,
            fingerprint=self.fingerprint,
            adapter_type=self.adapter_type,
            is_causal_lm=self.is_causal_lm,
            pool_limits=self.pool_limits,
            max_size=self.max_size,
        )

    def save_adapter(
        self, name: str, path: str | os.PathLike, *, format: str = "native", metadata: dict | None = None
    ) -> Path:
        """Save as safetensors + JSON (format="native"), or in PEFT's or AdapterHub's layout."""
        adapter = self.get_adapter(name)
        fmt = format_named(format)
        return fmt.write(self._format_context(), adapter, Path(path), metadata=metadata)

    def push_to_hub(
        self,
        name: str,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | None = None,
        endpoint: str | None = None,
        revision: str | None = None,
        commit_message: str | None = None,
        format: str = "native",
        metadata: dict | None = None,
    ):
        """Push an adapter, with a model card, to the Hub or a registry (endpoint: argument, else HF_ENDPOINT).

        Saves it to a temporary folder in `format`, then pushes that folder. Returns huggingface_hub's
        `CommitInfo`. See adapterzoo/hub.py.
        """
        import tempfile

        from .hub import push_adapter_folder

        with tempfile.TemporaryDirectory(prefix="adapterzoo-push-") as tmp:
            folder = self.save_adapter(name, Path(tmp) / name, format=format, metadata=metadata)
            return push_adapter_folder(
                folder,
                repo_id,
                private=private,
                token=token,
                endpoint=endpoint,
                revision=revision,
                commit_message=commit_message,
            )

    def merged_model(self, name: str) -> nn.Module:
        """A copy of the base with adapter `name` folded into its weights, for deploying one
        specialist alone (e.g. `.save_pretrained(...)`); the zoo's own base stays untouched.

        Only types with a `merge` (LoRA: W + scale * (A B)^T; BitFit: b + delta) can be merged.
        """
        adapter = self.get_adapter(name)
        if not adapter.atype.mergeable:
            raise AdapterZooError(
                f"adapter {name!r} is a {adapter.type_name} adapter, which cannot be merged into the base weights; "
                "serve it from the zoo instead (only types with a merge, such as lora and bitfit, can be)"
            )
        model = copy.deepcopy(self.model)
        strip_delta_sites(model)  # the copy must not answer to this zoo's batch plans
        model.config._attn_implementation = "sdpa"
        modules = dict(model.named_modules())
        try:
            for site, tensors in adapter.tensors.items():
                adapter.atype.merge(modules[site], {k: t.detach() for k, t in tensors.items()}, adapter.config)
        except NotImplementedError as exc:
            raise AdapterZooError(f"adapter {name!r} cannot be merged into this base: {exc}") from exc
        return model

    def remove_adapter(self, name: str) -> None:
        with self._lock:
            adapter = self.get_adapter(name)
            pool = self.pools.get(adapter.pool_key)
            if pool is not None and pool.slot_of(name) is not None:
                pool.evict(name)
            del self._adapters[name]

    def _register(self, adapter: Adapter) -> None:
        with self._lock:
            if adapter.name in self._adapters:
                raise AdapterExistsError(
                    f"an adapter named {adapter.name!r} is already in the zoo; "
                    "remove_adapter it first or pick another name"
                )
            if adapter.pool_key not in self._checked_pools:  # the type run once per pool (adapterzoo.contract)
                check_adapter(self.model, adapter, self.device, self.dtype)
                self._checked_pools.add(adapter.pool_key)
            attaches = adapter.atype.facts.attaches
            for site in adapter.tensors:
                if attaches == "module":
                    self.runtime.hook_delta_site(site)
                elif attaches == "attention":
                    self.runtime.hook_prefix_site(site)
            self._adapters[adapter.name] = adapter

    def _info(self, adapter: Adapter) -> AdapterInfo:
        return AdapterInfo(
            adapter.name,
            adapter.type_name,
            adapter.config.to_dict(),
            self.where(adapter.name),
            adapter.num_parameters(),
            adapter.trainable,
            adapter.head.config.to_dict() if adapter.head is not None else None,
        )

    # ------------------------------------------------------------------ batches

    def plan(self, adapters: Sequence[str | None], *, training: bool | None = None) -> BatchPlan:
        """Resolve adapter names per row to (pool, slot), loading adapters into slots as needed.

        Trainable adapters run from their own tensors (a `LivePool`) while gradients are on, so
        the loss reaches them; otherwise every adapter runs from a slot pool.
        """
        if training is None:
            training = torch.is_grad_enabled()
        with self._lock:
            distinct = {n: self.get_adapter(n) for n in adapters if n is not None}
            live = {n: a for n, a in distinct.items() if training and a.trainable}
            live_pools: dict[tuple, LivePool] = {}
            groups: dict[tuple, list[Adapter]] = {}
            for a in live.values():
                groups.setdefault(a.pool_key, []).append(a)
            for key, group in groups.items():
                live_pools[key] = LivePool(
                    group[0].atype, group[0].variant, group[0].bucket, group, self.model, self.device, self.dtype
                )
            resident: dict[tuple, list[Adapter]] = {}
            for n, a in distinct.items():
                if n not in live:
                    resident.setdefault(a.pool_key, []).append(a)
            for group in resident.values():  # fail before any slot changes hands
                if len(group) > self.slots:
                    raise PoolFullError(
                        f"this batch uses {len(group)} distinct {group[0].type_name} adapters of size "
                        f"{group[0].bucket}, but a pool has {self.slots} slots; split the batch, or create the "
                        f"zoo with more slots (Zoo.from_pretrained(..., slots={len(group)}))"
                    )
            placed: dict[str, tuple[object, int]] = {}
            pinned = set(distinct)
            for n, a in distinct.items():
                if n in live:
                    pool = live_pools[a.pool_key]
                    placed[n] = (pool, pool.index[n])
                else:
                    placed[n] = self._resident(a, pinned)
            assignments = [None if n is None else (*placed[n], distinct[n].length()) for n in adapters]
            plan = build_plan(assignments, self.device, training=bool(live))
            plan.names = list(adapters)
            plan.adapters = [None if n is None else distinct[n] for n in adapters]
            plan.residents = [
                (pool, slot, pool.stamps[slot], distinct[n]) for n, (pool, slot) in placed.items() if n not in live
            ]
            return plan

    def _resident(self, adapter: Adapter, pinned: set[str]) -> tuple[SlotPool, int]:
        pool = self.pools.get(adapter.pool_key)
        if pool is None:
            pool = SlotPool(
                adapter.atype, adapter.variant, adapter.bucket, self.slots, self.model, self.device, self.dtype
            )
            self.pools[adapter.pool_key] = pool
        if pool.is_current(adapter):
            pool.touch(adapter.name)
            return pool, pool.slot_of(adapter.name)
        slot, _ = pool.place(adapter, pinned)
        return pool, slot

    def __call__(self, *args: Any, **kwargs: Any) -> ZooOutput:
        return self.forward(*args, **kwargs)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        adapters: Sequence[str | None] | None = None,
        *,
        plan: BatchPlan | None = None,
        cache: Any = None,
        labels: torch.Tensor | None = None,
        logits_to_keep: int = 0,
    ) -> ZooOutput:
        """Run a mixed batch: row i uses `adapters[i]` (a name, or None for the bare base).

        With a `cache` (from a previous call's output), the mask covers past and new tokens and
        virtual prompt tokens are not added again. `logits_to_keep=k` > 0 computes the LM logits
        of the last k positions only (a prefill that samples one token skips the vocabulary
        projection of every other prompt position; it dominates long prompts).
        """
        input_ids = torch.as_tensor(input_ids)
        if input_ids.dim() != 2:
            raise BatchError(f"input_ids must be 2-D (batch, tokens), got shape {tuple(input_ids.shape)}")
        batch, length = input_ids.shape
        input_ids = input_ids.to(self.device)
        past = _cache_length(cache)
        if attention_mask is None:
            attention_mask = torch.ones(batch, past + length, dtype=torch.long, device=self.device)
        attention_mask = torch.as_tensor(attention_mask).to(self.device)
        if attention_mask.shape[0] != batch or attention_mask.shape[1] < length:
            raise BatchError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, which does not fit input_ids "
                f"{tuple(input_ids.shape)}; pass one mask value per token"
            )
        with self._lock:  # no other thread's plan may rewrite a slot while this forward reads it
            plan = self._plan_for(batch, adapters, plan)
            return self._run(input_ids, attention_mask, plan, cache, labels, past, logits_to_keep)

    def _plan_for(self, batch: int, adapters: Sequence[str | None] | None, plan: BatchPlan | None) -> BatchPlan:
        """The caller's plan if it still holds (else the same names planned again), or a new one."""
        if plan is None:
            if adapters is None:
                adapters = [None] * batch
            if isinstance(adapters, str):
                raise BatchError("adapters must be a list with one adapter name (or None) per row, not a string")
            if len(adapters) != batch:
                raise BatchError(
                    f"adapters has {len(adapters)} entries but the batch has {batch} rows; give one adapter "
                    "name (or None for the bare base) per row"
                )
            plan = self.plan(list(adapters))
        elif plan.batch_size != batch:
            raise BatchError(
                f"the plan is for {plan.batch_size} rows but input_ids has {batch}; build it with zoo.plan(names)"
            )
        elif not plan.is_current():  # a later plan took one of its slots
            plan = self.plan(plan.names, training=plan.training)
        return plan

    def _run(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        plan: BatchPlan,
        cache: Any,
        labels: torch.Tensor | None,
        past: int,
        logits_to_keep: int = 0,
    ) -> ZooOutput:
        batch, length = input_ids.shape
        with active(plan, None):  # a delta site at the input embedding (a LoRA's replaced rows) sees the plan
            embeds = self.model.get_input_embeddings()(input_ids)
        width = 0
        if plan.prompts and past == 0:
            embeds, attention_mask, width = self._prepend_prompts(plan, embeds, attention_mask)
        # With a cache, prefixes are written into it once (at prefill) and masked like past tokens;
        # without one, the attention wrapper puts them in front of every layer's keys and values.
        prefix_in_cache = cache is not None and self.runtime.prefix_fits_cache()
        if prefix_in_cache and past == 0 and plan.prefixes:
            self.runtime.write_prefixes(plan, cache, embeds)
            attention_mask = torch.cat([prefix_columns(plan).to(attention_mask.dtype), attention_mask], 1)
        positions = attention_mask.long().cumsum(-1)[:, -embeds.shape[1] :] - 1  # as if run alone
        if plan.prefix_lengths is not None and not prefix_in_cache:
            positions = positions + plan.prefix_lengths[:, None]  # real tokens start after the prefix
        positions = positions.clamp(min=0)
        kwargs = {self._cache_kw: cache, "use_cache": cache is not None} if cache is not None else {}
        head_rows = None
        if past == 0 and any(a is not None and a.head is not None for a in plan.adapters):
            head_rows = plan.adapters
            if self.is_causal_lm:
                kwargs["output_hidden_states"] = True
        caller_mask = attention_mask[:, -length:]
        # the last k positions are real tokens (virtual ones come first), so no width to cut then
        keep = 0 < logits_to_keep <= length and labels is None and self.is_causal_lm and self._keeps_logits
        if keep:
            kwargs["logits_to_keep"] = logits_to_keep
        with active(plan, None if prefix_in_cache else self.runtime.attention_sites):
            out = self.model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=positions, **kwargs)
        result = ZooOutput(attention_mask=attention_mask, plan=plan, cache=getattr(out, self._cache_kw, None))
        if getattr(out, "logits", None) is not None:
            result.logits = out.logits if keep else out.logits[:, width:]
        else:
            result.last_hidden_state = out.last_hidden_state[:, width:]
        if head_rows is not None:
            hidden = result.last_hidden_state if result.logits is None else out.hidden_states[-1][:, width:]
            result.class_logits = class_logits(head_rows, hidden, caller_mask)
        if labels is not None:
            result.loss = causal_lm_loss(result.logits, labels.to(self.device))
        return result

    def runs_token_rows(self, plan: BatchPlan | None = None) -> bool:
        """Whether `forward_tokens` can run on this base (and `plan`): a causal LM of
        `TOKEN_ROWS_MODELS`, whose LM head no adapter hooks, and whose prefix adapters, if the
        plan has any, keep their prefixes in the KV cache (every attention layer a prefix site)."""
        if not self.is_causal_lm or getattr(self.model.config, "model_type", None) not in TOKEN_ROWS_MODELS:
            return False
        head = self.model.get_output_embeddings()
        if head is None or any(self.runtime.modules.get(p) is head for p in self.runtime.delta_sites):
            return False
        return plan is None or not plan.prefixes or self.runtime.prefix_fits_cache()

    def forward_tokens(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        plan: BatchPlan,
        cache: Any,
        attention: Any,
        keep: torch.Tensor,
        embeds: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> ZooOutput:
        """One token per row: row i feeds `tokens[i]` at position `positions[i]` through `plan`
        (one entry per row), and the caller decides what each row attends to. Every attention
        layer hands its new keys and values to `cache.update(keys, values, layer_idx)`, then
        `attention.attend(module, query, key, value)` computes its output (runtime.attention_by).

        Why rows of one token: every linear layer, norm and adapter delta works token by token,
        so tokens of different requests (one a running request's next token, twenty a joining
        prompt's) can share one forward, and read the base's weights once (serve/ragged.py).
        `embeds` = (rows, vectors): those rows take these input embeddings instead of their
        token's (a soft prompt's virtual tokens, `virtual_tokens`). Returns the LM logits of rows
        `keep` only, (len(keep), vocab); only where `runs_token_rows(plan)`."""
        if not self.runs_token_rows(plan):
            raise BatchError(
                "forward_tokens needs a causal LM of a supported family whose LM head no adapter hooks "
                "(Zoo.runs_token_rows); use forward"
            )
        tokens, positions = tokens.to(self.device), positions.to(self.device)
        rows = tokens.shape[0]
        with self._lock:
            plan = self._plan_for(rows, None, plan)
            with active(plan, None), attention_by(attention):
                inputs = self.model.get_input_embeddings()(tokens[:, None])
                if embeds is not None:
                    rows_of, vectors = embeds
                    # index_copy, not index_put: advanced indexing wakes every OpenMP thread for a few
                    # rows (~75 us against ~5 us with two threads at the PASSIVE wait policy)
                    inputs = inputs.index_copy(0, rows_of.to(self.device), vectors.to(inputs)[:, None])
                # a 4-D mask goes to the layers as it is (no mask is built): `attention` ignores it
                unused_mask = torch.ones(rows, 1, 1, 1, dtype=torch.bool, device=self.device)
                out = self.model.get_decoder()(
                    inputs_embeds=inputs,
                    attention_mask=unused_mask,
                    position_ids=positions[:, None],
                    use_cache=True,
                    **{self._cache_kw: cache},
                )
                hidden = out.last_hidden_state.index_select(0, keep.to(self.device))[:, 0]
            logits = self.model.get_output_embeddings()(hidden)
        return ZooOutput(logits=logits, plan=plan)

    def _prepend_prompts(self, plan: BatchPlan, embeds: torch.Tensor, mask: torch.Tensor):
        """Lester et al. (2021): [P_e; X_e], the virtual token embeddings before the input's.

        Virtual tokens go in the first `width` columns, left-aligned; a row with fewer (or none)
        masks the rest, so its real tokens see exactly what they would see alone.
        """
        virtual, virtual_mask = self.virtual_tokens(plan, embeds.dtype)
        return torch.cat([virtual, embeds], 1), torch.cat([virtual_mask.to(mask.dtype), mask], 1), plan.prompt_width

    def virtual_tokens(self, plan: BatchPlan, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The soft-prompt rows' virtual token embeddings, (B, plan.prompt_width, d) left-aligned
        (zeros past a row's own count, and for rows without one), and which columns each row uses
        (B, width) bool: what `forward` puts before the input's embeddings."""
        with self._lock:
            plan = self._plan_for(plan.batch_size, None, plan)  # a stale one would read another adapter's vectors
            width = plan.prompt_width
            dim = self.model.get_input_embeddings().weight.shape[-1]
            virtual = torch.zeros(plan.batch_size, width, dim, dtype=dtype or self.dtype, device=self.device)
            for use in plan.prompts:
                site = self.runtime.embedding_path
                tokens = use.pool.atype.virtual_tokens(use.gather(use.pool.site(site), site))  # (n, P, d)
                virtual = place_rows(virtual, use, fit_tokens(tokens, width, 1).to(virtual.dtype))
            if plan.prompts and plan.prompts[0].rows is None:  # place_rows gave a view of the slot: copy it,
                virtual = virtual.clone()  # else a later plan taking the slot turns it into another adapter's
            lengths = plan.prompt_lengths
            if lengths is None:
                lengths = torch.zeros(plan.batch_size, dtype=torch.long, device=self.device)
            return virtual, virtual_columns(lengths, width)

    def new_cache(self) -> Any:
        """An empty KV cache for `forward(..., cache=...)`: transformers' `DynamicCache`, whose
        layers append each step into spare room instead of copying the whole cache (`roomy_cache`)."""
        return roomy_cache(self.model.config)

    # ------------------------------------------------------------------ generation

    def generate(
        self, prompts: Sequence[str], adapters: Sequence[str | None] | str | None = None, **kwargs: Any
    ) -> list[str]:
        """Greedy or sampled continuations of `prompts`, row i with `adapters[i]`. See generate.py.

        `adapters="auto"` (or "auto" in a row) routes that row to the adapter that fits its prompt,
        or the bare base (routing.py)."""
        from .generate import generate
        from .routing import AUTO, resolve

        if isinstance(prompts, str):
            prompts = [prompts]
        if isinstance(adapters, str) or (adapters is not None and AUTO in list(adapters)):
            adapters = resolve(self, prompts, adapters)  # "auto" rows: the adapter that fits, or the base
        return generate(self, prompts, adapters, **kwargs)

    # ------------------------------------------------------------------ routing

    def add_routing_examples(self, name: str, prompts: Sequence[str], **options: Any) -> dict[str, Any]:
        """Prompts adapter `name` should answer: stored (with their features) in its metadata, so
        `adapters="auto"` can route to it. See routing.py."""
        from .routing import add_routing_examples

        return add_routing_examples(self, name, prompts, **options)

    def route(self, prompts: Sequence[str], **options: Any):
        """Which adapter (or None: the base) each prompt would be routed to; see routing.route."""
        from .routing import route

        return route(self, prompts, **options)

    # ------------------------------------------------------------------ training

    def train(self, names: str | Sequence[str], examples: Any, **options: Any):
        """Train one adapter, or many at once in one mixed batch; returns a `TrainReport`.

        `zoo.train("a", examples)` or `zoo.train(["a", "b"], [examples_a, examples_b])`. Only the
        adapters' tensors (and heads) change; the base never does. Options and their defaults:
        `adapterzoo.training.TrainOptions` (epochs, lr, batch_size, eval_examples, patience, checkpoints...).
        """
        from .training import train

        return train(self, names, examples, **options)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy; label -100 is ignored (the HF convention)."""
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shift_labels = labels[:, 1:].reshape(-1)
    return torch.nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=-100)


def _cache_keyword(model: nn.Module) -> str:
    """transformers 5.24 renamed `past_key_values` to `cache`; accept either."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


#: Model types whose causal LM is decoder -> final norm -> LM head, with every attention layer
#: calling `cache.update(keys, values, layer_idx)` and then the attention function named in its
#: config, full (no sliding window): what `Zoo.forward_tokens` relies on (checked in transformers 5;
#: Mistral's and Qwen's sliding windows would need the attention runner to apply them)
TOKEN_ROWS_MODELS = ("llama",)


def _cache_length(cache: Any) -> int:
    return int(cache.get_seq_length()) if cache is not None else 0


# ------------------------------------------------------------------ the KV cache

ROOM = 64  # spare columns a layer allocates past what it holds: appends copy nothing until they are used


def roomy_cache(config: Any) -> Any:
    """A `DynamicCache` for `config` whose layers append into spare room (`RoomyLayer`).

    transformers' `DynamicLayer` appends a step's keys and values by concatenation, copying the
    whole cache at every layer and step. Measured (a decode step of 16 rows, SmolLM2-135M,
    1 thread, CPU time): with 500-token histories 211 ms -> 166 ms; with 20 no difference.
    The values are the same either way: only where they are stored differs."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache(config=config)
    cache.layers = [roomy_layer_class()() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


@functools.cache
def roomy_layer_class() -> type:
    """`RoomyLayer`, built on first use (transformers loads lazily)."""
    from transformers.cache_utils import DynamicLayer

    class RoomyLayer(DynamicLayer):
        """A `DynamicLayer` that keeps `keys`/`values` as views of larger tensors with spare columns,
        and writes a step's keys and values into them in place.

        Anything else may still replace `keys`/`values` (a merge pads them, a trim or a row's
        departure cuts them): `update` sees that they are no longer its own views and moves them
        into new room first. A view handed out is never written again: writes go past its end,
        and room is never shared with a replaced tensor."""

        def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            super().lazy_initialization(key_states, value_states)
            self.room: tuple[torch.Tensor, torch.Tensor] | None = None  # (keys, values), ROOM columns longer
            self.views: tuple[torch.Tensor, torch.Tensor] | None = None  # what this layer last set keys/values to

        def update(
            self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
        ) -> tuple[torch.Tensor, torch.Tensor]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            held, adding = self.get_seq_length(), key_states.shape[-2]
            own = self.views is not None and self.keys is self.views[0] and self.values is self.views[1]
            if not own or self.room[0].shape[-2] < held + adding or self.room[0].shape[0] != key_states.shape[0]:
                self.move_into_room(key_states, value_states, held + adding)
            room_k, room_v = self.room
            room_k[..., held : held + adding, :].copy_(key_states)
            room_v[..., held : held + adding, :].copy_(value_states)
            self.keys, self.values = room_k[..., : held + adding, :], room_v[..., : held + adding, :]
            self.views = (self.keys, self.values)
            return self.keys, self.values

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            """Only the rows at `indices` stay (a request left the batch). index_select, not
            transformers' `keys[indices, ...]`: advanced indexing ran a parallel kernel that woke every
            OpenMP thread, at each layer for keys and values (the next `update` moves them into room)."""
            if self.get_seq_length() > 0:
                self.keys = self.keys.index_select(0, indices)
                self.values = self.values.index_select(0, indices)

        def move_into_room(self, key_states: torch.Tensor, value_states: torch.Tensor, needed: int) -> None:
            """New room for `needed` columns plus ROOM, holding what the layer holds now."""
            held = self.get_seq_length()
            rooms = []
            for now, like in ((self.keys, key_states), (self.values, value_states)):
                room = like.new_empty((*like.shape[:-2], needed + ROOM, like.shape[-1]))
                if held:
                    room[..., :held, :].copy_(now)
                rooms.append(room)
            self.room = (rooms[0], rooms[1])

    return RoomyLayer


def _looks_like_repo_id(source: str) -> bool:
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not source.startswith((".", "/", "~"))
