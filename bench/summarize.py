"""Ratios (gateway / passthrough) across several benchmark runs, to see how much they move between runs.

    python -m bench.summarize                       # every bench/results/*.json of the full mode
    python -m bench.summarize bench/results/A.json bench/results/B.json
    python -m bench.summarize --quick               # the --quick runs instead

Runs are grouped by gateway commit. Each run's cell is its paired ratio (the median of the per-round
gateway/passthrough ratios) with its 90% bootstrap interval and the run's verdict against the target (ok,
open, MISS), as the run printed them; runs written before the paired ratio existed show their ratio of
medians instead. A cell marked † had more than 0.1 core of foreign load (see docs/performance.md); "clean"
columns use only the cells without that mark.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def load(paths: list[Path], mode: str) -> list[dict[str, Any]]:
    runs = []
    for p in paths:
        try:
            d = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if d.get("mode") != mode or "table" not in d or "error" in d:
            continue
        d["_path"] = p
        runs.append(d)
    return runs


def commit_of(run: dict[str, Any]) -> str:
    src = run.get("gateway_source") or {}
    if src.get("commit"):
        return str(src["commit"])[:12]
    m = run.get("machine", {})
    return f"{m.get('git_commit')}{'+dirty' if m.get('proxy_tree_dirty') else ''} (work tree)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.summarize", description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", type=Path)
    parser.add_argument("--quick", action="store_true", help="summarize --quick runs")
    args = parser.parse_args(argv)
    files = args.files or sorted(RESULTS_DIR.glob("*.json"))
    runs = load(files, "quick" if args.quick else "full")
    if not runs:
        print("no complete runs found", file=sys.stderr)
        return 1
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault(commit_of(r), []).append(r)
    for commit, rs in groups.items():
        print(f"\n### gateway {commit}: {len(rs)} run(s): " + ", ".join(r["started"] for r in rs))
        print()
        print("| scenario | paired ratio per run (90% interval, verdict) | median | median of clean runs |")
        print("|---|---|---:|---:|")
        scenarios = [row["scenario"] for row in rs[0]["table"] if row.get("is_cpu")]
        for sc in scenarios:
            cells, all_v, clean_v = [], [], []
            for r in rs:
                row = next((x for x in r["table"] if x["scenario"] == sc), None)
                if row is None or (row.get("paired_value") or row.get("ratio_value")) is None:
                    cells.append("n/a")
                    continue
                v = row.get("paired_value") or row["ratio_value"]
                noisy = "†" in row["passthrough"] + row["gateway"]
                interval = row.get("paired_interval")
                cell = f"{v:.2f}"
                if interval:
                    cell += f" ({interval[0]:.2f}-{interval[1]:.2f})"
                if row.get("target"):
                    cell += f" {row['target']}"
                cells.append(f"{cell}{' †' if noisy else ''}")
                all_v.append(v)
                if not noisy:
                    clean_v.append(v)
            med = f"{statistics.median(all_v):.2f}x" if all_v else "n/a"
            cmed = f"{statistics.median(clean_v):.2f}x ({len(clean_v)})" if clean_v else "none"
            print(f"| {sc} | {' / '.join(cells)} | {med} | {cmed} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
