"""Benchmarks: each prints its ratios side by side and writes bench/results/<name>.json.

Timing lives here, never in tests. Run one with ``python -m bench.<name>``.
"""
