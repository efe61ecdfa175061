"""Benchmarks of nerbatch, run from the repository root as modules: `python -m benchmarks.bench --help`."""
