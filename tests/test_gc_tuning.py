"""The collector tuning `ssegate serve` applies once it listens (server.gc_gen0_threshold)."""
from __future__ import annotations

import gc

import pytest

from proxy.web_app import tune_gc


@pytest.fixture
def restore_gc():
    before = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*before)


def test_serving_freezes_startup_objects_and_raises_the_young_threshold(restore_gc):
    gc.set_threshold(700, 10, 10)
    tune_gc(10000)
    # Young collections 14x further apart; the middle generation collected every third one, so it stays small.
    assert gc.get_threshold() == (10000, 2, 10)
    assert gc.get_freeze_count() > 1000  # modules, config, plugins: out of every later collection


def test_zero_keeps_pythons_defaults(restore_gc):
    gc.set_threshold(700, 10, 10)
    tune_gc(0)
    assert gc.get_threshold() == (700, 10, 10)
    assert gc.get_freeze_count() == 0
