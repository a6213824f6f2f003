"""Fuzzers of our own (plain random.Random, no framework): long runs from
the command line, bounded runs from the functional tests."""
