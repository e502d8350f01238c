"""Benchmarks of SALA kernels and models (GPU timing, JSON results)."""
