"""Importing adapterzoo changes nothing in the process, and a zoo leaves no trace it cannot undo.

The environment checks run in a fresh interpreter: this one has torch loaded already (and the root
conftest.py sets OpenMP's wait policy for the test processes, as the `adapterzoo` command does)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import torch

from adapterzoo import Zoo
from adapterzoo.runtime import ATTENTION_NAME, DeltaSite, register_attention
from adapterzoo.testing.models import tiny_model


def run_fresh(code: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_importing_adapterzoo_leaves_the_environment_unchanged_and_loads_no_torch():
    out = run_fresh("""
        import os, sys
        before = dict(os.environ)
        import adapterzoo
        from adapterzoo import AdapterZooError, hookimpl, UnknownTaskError
        import adapterzoo.tasks
        assert "torch" not in sys.modules, "torch came with the import"
        assert dict(os.environ) == before
        from adapterzoo import Zoo  # the names that need torch load on first use
        assert "torch" in sys.modules and dict(os.environ) == before
        print("ok")
    """)
    assert out == "ok"


def test_the_adapterzoo_command_sets_a_passive_openmp_wait_policy_before_torch_loads():
    out = run_fresh("""
        import os, sys

        class SeeTorch:  # records the wait policy at the moment torch is first imported
            seen = []
            def find_spec(self, name, path=None, target=None):
                if name == "torch" and not self.seen:
                    self.seen.append(os.environ.get("OMP_WAIT_POLICY"))
                return None

        sys.meta_path.insert(0, SeeTorch())
        from adapterzoo.cli import main
        assert "OMP_WAIT_POLICY" not in os.environ  # importing the command's module sets nothing
        sys.argv = ["adapterzoo", "serve", "--help"]
        try:
            main()
        except SystemExit:
            pass
        import torch
        print(os.environ.get("OMP_WAIT_POLICY"), SeeTorch.seen)
    """)
    assert out.splitlines()[-1] == "PASSIVE ['PASSIVE']"


def test_a_zoo_records_the_callers_attention_implementation_and_detach_restores_it():
    model = tiny_model("llama")
    model.config._attn_implementation = "eager"
    ids = torch.randint(4, 100, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        before = model(ids).logits.clone()
    zoo = Zoo(model, dtype=torch.float32, device="cpu")
    assert model.config._attn_implementation == ATTENTION_NAME
    assert zoo.runtime.base_attention == "eager"
    zoo.add_adapter("a", "lora", r=4, init_lora_weights=False)
    with torch.inference_mode():
        zoo(ids, None, ["a", None])
    zoo.runtime.detach()
    assert model.config._attn_implementation == "eager"
    assert not any(m._forward_hooks or m._forward_hooks_with_kwargs for m in model.modules())
    assert not any(isinstance(m.__dict__.get("forward"), DeltaSite) for m in model.modules())
    with torch.inference_mode():
        assert torch.allclose(model(ids).logits, before, atol=1e-5)


def test_registering_the_attention_twice_changes_nothing():
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    register_attention()
    first = (ALL_ATTENTION_FUNCTIONS[ATTENTION_NAME], ALL_MASK_ATTENTION_FUNCTIONS[ATTENTION_NAME])
    register_attention()
    assert (ALL_ATTENTION_FUNCTIONS[ATTENTION_NAME], ALL_MASK_ATTENTION_FUNCTIONS[ATTENTION_NAME]) == first
