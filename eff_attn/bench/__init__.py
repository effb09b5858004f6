"""Benchmarks: input regimes, the runner behind ``eff-attn compare``, reports and plots."""
