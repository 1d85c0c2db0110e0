"""Benchmark and report scripts of dimba_jax (run as `python -m benchmarks.NAME`; see README.md)."""
