"""Helpers for testing adapterzoo and its plugins: tiny seeded bases and the conformance suite.

A plugin author runs the conformance suite against their type with

    ADAPTERZOO_CONFORMANCE_TYPES=ia3 python -m pytest --pyargs adapterzoo.testing.conformance
"""
