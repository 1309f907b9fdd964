"""Benchmarks run by ``scripts/bench.py`` (outside the test run: timings are not tests)."""
