"""Benchmarks for dynembed; run ``python -m benchmarks.core --help``."""
