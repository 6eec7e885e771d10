"""Helpers for testing adapterzoo and its plugins (docs/plugins.md, "Test helpers").

- `models`: tiny seeded Llama, GPT-2 and BERT bases, a character tokenizer, `perturb`, `output`.
- `conformance`: the suite every adapter type must pass, run against some types with

      ADAPTERZOO_CONFORMANCE_TYPES=ia3 python -m pytest --pyargs adapterzoo.testing.conformance

- `plugin_checks`: a type trained on the `reverse` task through `zoo.train`, and served through
  `adapterzoo serve` with the `openai` client; `peft_output`, PEFT's own result, for parity tests.
- `speed`: a type's decode-step cost against the base's (and other types').
"""
