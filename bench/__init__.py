"""Benchmarks that print tables: `python -m bench.run` (see bench/README.md)."""
