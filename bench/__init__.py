"""Benchmark suite: broadcast_history side by side with encode/broadcaster 0.3.1.

Run it with ``scripts/bench`` (``--quick`` for a smoke run). Each scenario runs in its
own process (:mod:`bench.worker`) so that one scenario's garbage, caches and threads do
not slow the next; :mod:`bench.run` starts them, takes medians and writes the table.
"""
