"""The benchmark's reading of its own windows: the paired ratio, its bootstrap interval, and the target verdict.

``python -m bench`` is a command, not a test; these check only the arithmetic that turns its saved windows into the
table's ratio and verdict, on windows written out here."""
from __future__ import annotations

from typing import Any

from bench.run import CI_MIN_ROUNDS, TARGET_RATIO, paired_interval, paired_ratio, verdict


def _windows(values: list[float]) -> dict[str, Any]:
    return {"rounds": [{"us_per_request": v} for v in values]}


def test_paired_ratio_is_the_median_of_the_rounds_ratios() -> None:
    passthrough = _windows([100, 200, 100, 400, 100])
    gateway = _windows([120, 220, 150, 440, 110])  # ratios 1.2, 1.1, 1.5, 1.1, 1.1
    assert paired_ratio(passthrough, gateway, "us_per_request") == 1.1
    assert paired_ratio(_windows([100]), _windows([120]), "us_per_request") is None  # one round: no pairing


def test_interval_needs_enough_rounds_and_brackets_the_median() -> None:
    few = CI_MIN_ROUNDS - 1
    assert paired_interval(_windows([100] * few), _windows([120] * few), "us_per_request") is None
    ratios = [1.05, 1.10, 1.12, 1.15, 1.18, 1.20, 1.22, 1.25, 1.40, 1.60]
    passthrough = _windows([100.0] * len(ratios))
    gateway = _windows([100.0 * r for r in ratios])
    interval = paired_interval(passthrough, gateway, "us_per_request")
    assert interval is not None
    low, high = interval
    median = paired_ratio(passthrough, gateway, "us_per_request")
    assert median is not None
    assert 1.05 <= low <= median <= high <= 1.60
    assert high - low < 0.3  # ten rounds pin the median down, not to a single value
    assert paired_interval(passthrough, gateway, "us_per_request") == interval  # seeded: a saved run reads the same


def test_verdict_uses_the_interval_where_there_is_one() -> None:
    assert verdict(1.4, (1.1, 1.25)) == "ok"  # the paired interval wins over a ratio of two unlucky medians
    assert verdict(1.2, (1.31, 1.5)) == "MISS"
    assert verdict(1.2, (1.2, 1.35)) == "open"
    assert verdict(1.2, (1.1, TARGET_RATIO)) == "ok"  # "at most 1.3x": the target itself is met
    assert verdict(1.29, None) == "ok"
    assert verdict(1.31, None) == "MISS"
    assert verdict(None, None) == ""


def test_summarize_shows_each_runs_paired_ratio_interval_and_verdict(tmp_path, capsys) -> None:
    """Across runs, the cell is what each run judged on (the paired ratio), not its ratio of medians; runs from
    before the paired ratio show their ratio of medians."""
    import json

    from bench.summarize import main

    def run(name: str, row: dict[str, Any]) -> str:
        path = tmp_path / name
        path.write_text(json.dumps({"mode": "full", "started": name, "machine": {"git_commit": "abc"},
                                    "table": [{"scenario": "non-stream c=16: CPU us/request", "passthrough": "200",
                                               "gateway": "260", "is_cpu": True, **row}]}))
        return str(path)

    new = run("new.json", {"ratio_value": 1.30, "paired_value": 1.26, "paired_interval": [1.24, 1.28],
                           "target": "ok"})
    old = run("old.json", {"ratio_value": 1.40})
    assert main([new, old]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("| non-stream c=16"))
    assert "1.26 (1.24-1.28) ok / 1.40 |" in line and "| 1.33x |" in line
