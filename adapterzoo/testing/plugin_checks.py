"""End-to-end checks a plugin's own tests call: its type trains on a real task through the public
API, and is served through the OpenAI-compatible HTTP server (driven with the `openai` client).

    from adapterzoo.testing.plugin_checks import served_completions, train_on_reverse

    def test_my_type_learns_reverse():
        zoo, report = train_on_reverse("loha", {"r": 8, "target_modules": "all-linear"})
        first, last = first_and_last_losses(report)
        assert last < first - 0.1

    def test_my_type_is_served(tmp_path):
        served, expected = served_completions(tmp_path, "loha", {"r": 4})
        assert served == expected

Both run on the tiny seeded Llama of adapterzoo.testing.models, in seconds; they check the
plumbing (hooks, pools, training, serving), not the method's quality.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .models import char_tokenizer, perturb, tiny_model, tiny_zoo
from .serving import start_serve


def random_ids(rows: int = 2, length: int = 7, seed: int = 0) -> torch.Tensor:
    """Seeded token ids inside every tiny base's vocabulary (ids 0-3 are the special tokens)."""
    return torch.randint(4, 100, (rows, length), generator=torch.Generator().manual_seed(seed))


def peft_output(family: str, folder: Path, ids: torch.Tensor) -> torch.Tensor:
    """What PEFT itself gives for `ids` with the adapter in `folder` on a fresh tiny base: the
    reference a PEFT-compatible plugin's parity test compares against (logits; BERT: hidden states)."""
    import warnings

    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(tiny_model(family, 0), folder).eval()
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return out.logits if family != "bert" else out.last_hidden_state


def train_on_reverse(
    type_name: str,
    config: dict | None = None,
    *,
    steps: int = 40,
    lr: float = 3e-2,
    family: str = "llama",
    seed: int = 0,
):
    """Train a fresh adapter of `type_name` on the `reverse` task with `zoo.train`; returns
    (zoo, the `TrainReport`). Its per-step losses are in `report[name].history`."""
    from adapterzoo.tasks import get_task

    zoo = tiny_zoo(family)
    zoo.add_adapter("reverse", type_name, seed=seed, **(config or {}))
    examples = get_task("reverse").examples(64, seed=seed)
    report = zoo.train("reverse", examples, max_steps=steps, lr=lr, batch_size=8, progress=False, seed=seed)
    return zoo, report


def first_and_last_losses(report, name: str = "reverse", window: int = 5) -> tuple[float, float]:
    """Mean training loss of the first and of the last `window` steps (single steps are noisy)."""
    losses = [row["train_loss"] for row in report[name].history if "train_loss" in row]
    return sum(losses[:window]) / len(losses[:window]), sum(losses[-window:]) / len(losses[-window:])


def served_completions(
    folder: Path,
    type_name: str,
    config: dict | None = None,
    *,
    prompts=("hello", "abc"),
    max_tokens: int = 6,
    timeout: float = 90,
) -> tuple[list[str], list[str]]:
    """Serve an adapter of `type_name` (perturbed off identity) with `adapterzoo serve` on
    127.0.0.1 and ask for greedy completions of `prompts` with the `openai` client; returns
    (served texts, the same zoo's own `generate` texts). The server is stopped before returning."""
    base = folder / "base"
    tiny_model("llama").save_pretrained(base)
    char_tokenizer().save_pretrained(base)
    zoo = tiny_zoo("llama")
    zoo.add_adapter("plugin-adapter", type_name, seed=3, trainable=False, **(config or {}))
    perturb(zoo, "plugin-adapter", scale=0.5, seed=3)
    zoo.save_adapter("plugin-adapter", folder / "adapters" / "plugin-adapter")
    with torch.no_grad():
        expected = zoo.generate(list(prompts), ["plugin-adapter"] * len(prompts), max_new_tokens=max_tokens)

    server = start_serve(base, folder / "serve.log", "--adapters", str(folder / "adapters"), timeout=timeout)
    try:
        client = server.client()
        served = [
            client.completions.create(model="plugin-adapter", prompt=p, max_tokens=max_tokens, temperature=0)
            .choices[0]
            .text
            for p in prompts
        ]
    finally:
        server.stop()
    return served, expected
