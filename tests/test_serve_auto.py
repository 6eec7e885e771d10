"""`model="auto"` on the HTTP server, with the official `openai` client: the router picks the
adapter that fits the prompt among those the tenant may use (read from the adapters folder, not
yet loaded), or the base; the response names it (`model` field, `X-Adapterzoo-Adapter`)."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from adapterzoo.tasks import instructed_examples
from adapterzoo.testing.models import perturb, tiny_zoo
from tests.serve.conftest import save_base, serve_factory, write_keys  # noqa: F401 - fixture

KEYS = {
    "tenants": {
        "acme": {"keys": ["k-acme"], "adapters": ["reverse", "upper", "digits-sort"]},
        "beta": {"keys": ["k-beta"], "adapters": ["digits-sort"]},
    }
}


def prompt(task: str, i: int = 0) -> str:
    return instructed_examples(task, i + 1, "test", seed=3)[i].prompt


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("auto")
    base = save_base(root / "base")
    zoo = tiny_zoo("llama")
    for i, task in enumerate(("reverse", "upper", "digits-sort")):
        zoo.add_adapter(task, "lora", r=4, seed=i, trainable=False)
        perturb(zoo, task, seed=i)
        zoo.add_routing_examples(task, [ex.prompt for ex in instructed_examples(task, 12, "train")])
        zoo.save_adapter(task, root / "adapters" / task)
    write_keys(root / "keys.json", KEYS)
    return base, root


def test_auto_answers_with_the_specialist_that_fits_and_names_it(library, serve_factory):  # noqa: F811
    base, root = library
    server = serve_factory(base, "--adapters", str(root / "adapters"), "--keys", str(root / "keys.json"))
    client = server.client("k-acme")
    for task in ("reverse", "upper", "digits-sort"):
        raw = client.completions.with_raw_response.create(
            model="auto", prompt=prompt(task), max_tokens=4, temperature=0
        )
        completion = raw.parse()
        assert completion.model == task and raw.headers["x-adapterzoo-adapter"] == task
        named = client.completions.create(model=task, prompt=prompt(task), max_tokens=4, temperature=0)
        assert completion.choices[0].text == named.choices[0].text  # the same as naming it

    # a chat prompt that fits no specialist: the base answers, and says so
    raw = client.completions.with_raw_response.create(model="auto", prompt="Why is the sky blue?", max_tokens=4)
    assert raw.parse().model == "tiny" and raw.headers["x-adapterzoo-adapter"] == "tiny"
    chat = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": prompt("upper")}], max_tokens=4
    )
    assert chat.parse().model == "upper" and chat.headers["x-adapterzoo-adapter"] == "upper"

    # a tenant routes only among the adapters it may use
    beta = server.client("k-beta")
    for task in ("reverse", "upper"):
        chosen = beta.completions.create(model="auto", prompt=prompt(task), max_tokens=2).model
        assert chosen in ("digits-sort", "tiny")

    # several prompts in one request cannot share one routing decision: a clear 400
    with pytest.raises(openai.BadRequestError, match="one prompt"):
        client.completions.create(model="auto", prompt=[prompt("upper"), prompt("reverse")], max_tokens=2)
