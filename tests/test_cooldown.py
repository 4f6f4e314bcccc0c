"""The cooldown table on its own: pauses per (provider, model), a longer pause kept, and the bound on pairs
(a wildcard provider takes any model name a client sends). The forwarder's use of it crosses sockets in
``test_upstream_refusals.py``."""
from __future__ import annotations

from proxy.cooldown import Cooldowns


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_pause_is_per_provider_and_model_and_ends_when_due() -> None:
    clock = Clock()
    table = Cooldowns(clock)
    table.start("p", "a", 2.0)
    assert table.left("p", "a") == 2.0 and table.left("p", "b") == 0.0 and table.left("q", "a") == 0.0
    assert table.of("p") == {"a": 2.0} and table.of("q") == {}
    clock.now += 2.0
    assert table.left("p", "a") == 0.0 and table.until == {}  # an ended pause is dropped when read


def test_a_shorter_pause_does_not_cut_a_longer_one_and_zero_rests_nothing() -> None:
    clock = Clock()
    table = Cooldowns(clock)
    table.start("p", "a", 10.0)
    table.start("p", "a", 1.0)
    assert table.left("p", "a") == 10.0
    table.start("p", "a", 20.0)
    assert table.left("p", "a") == 20.0
    table.start("p", "b", 0.0)
    assert table.left("p", "b") == 0.0 and ("p", "b") not in table.until


def test_ended_pauses_are_dropped_before_the_table_grows_past_its_bound() -> None:
    clock = Clock()
    table = Cooldowns(clock)
    for i in range(1024):
        table.start("p", f"m{i}", 1.0)
    clock.now += 1.0  # all over, none read since
    table.start("p", "late", 5.0)
    assert table.until == {("p", "late"): 106.0}
