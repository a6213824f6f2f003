"""Benchmark harness: real boots, trace record/replay, multi-host runs."""
