"""Benchmark of the ssegate gateway against a bare aiohttp passthrough and a direct connection.

Run ``python -m bench`` (full, < 10 min) or ``python -m bench --quick`` (< 2 min). See docs/performance.md.
"""
