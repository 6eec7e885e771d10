"""The plugin conformance suite (adapterzoo.testing.conformance), run on every installed type."""

from adapterzoo.testing.conformance import *  # noqa: F401,F403
