"""Measurement scripts (run as `python -m bird_jax.benchmarks.<name>`)."""
