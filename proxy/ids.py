"""Identifiers made on the hot path: request ids, W3C trace and span ids.

``os.urandom`` is a system call per id (three per request); these come from a per-process generator seeded
from the OS once (and again after a fork), which is what tracing ids need: unique, not secret.
"""
from __future__ import annotations

import os
import random

__all__ = ["request_id", "trace_id", "span_id"]

_rng = random.Random(os.urandom(32))


def _reseed() -> None:
    _rng.seed(os.urandom(32))


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reseed)


# ``bits.to_bytes(n).hex()`` gives the same zero-padded lowercase hex as ``f"{bits:032x}"`` in half the time.

def request_id() -> str:
    return _rng.getrandbits(128).to_bytes(16, "big").hex()


def trace_id() -> str:
    return _rng.getrandbits(128).to_bytes(16, "big").hex()


def span_id() -> str:
    return _rng.getrandbits(64).to_bytes(8, "big").hex()
