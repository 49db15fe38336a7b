"""``python -m bench.summary [results.json]``: the README's benchmark table from a run.

Reads ``bench/results/latest.json`` (or the file given) and prints markdown: one row
per case and backend with each system's rate, tiu's ratios as rates (above 1: tiu
faster) and issue #20's target for the row, then the query, growth and replay-scaling
lines. The README's table is this output, pasted; nothing in it is typed by hand.
"""

from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench.common import raw_systems
from bench.context import RESULTS

SYSTEMS = ("tiu", "eventsourcing", "raw")
BACKEND_NAMES = {"sqlite": "SQLite", "postgresql": "PostgreSQL"}

#: Issue #20's targets, as ratios of rates: (case prefix, backend or None for both,
#: the raw baseline the target is stated against) -> what the row should reach.
TARGETS: dict[tuple[str, str | None], str] = {
    ("1a ", "sqlite"): "raw 0.8",
    ("1b ", "sqlite"): "raw 1.0",
    ("1a ", "postgresql"): "es 1.5, raw 1.0",
    ("1b ", "postgresql"): "es 1.5, raw 1.0",
    ("2 ", "sqlite"): "es 2.5",
    ("2 ", "postgresql"): "es 3",
    ("3 command CreateTask: 2000 commands, 1 ", None): "raw 0.5",
    ("3 command CreateTask: 2000 commands, 8 ", None): "raw 1.0, es 1.5",
    ("4c ", None): "es 1.0",
    ("4b ", None): "es 2",
    ("4d ", None): "es 1.0",
    ("5 replay tasks read model, log 100,000", "sqlite"): "raw 0.4",
    ("5 replay tasks read model, log 100,000", "postgresql"): "raw 0.4, es 10",
    ("5 replay tasks read model, log 1,000,000", None): "raw 0.4",
    ("6", None): "raw 0.8",
}
#: Case 3's targets are stated against this raw; its other raw row is a floor.
TARGET_RAW = "raw (tiu's writes)"


def target(case: str, backend: str, raw: str = "raw") -> str:
    """Issue #20's target for a row, or "" where it sets none."""
    if raw not in ("raw", TARGET_RAW):
        return ""
    for (prefix, on), wanted in TARGETS.items():
        if case.startswith(prefix) and on in (None, backend):
            return wanted
    return ""


def _rate(record: dict[str, Any] | None) -> float | None:
    return None if record is None else float(record["rate"])


def _ratio(tiu: float | None, other: float | None) -> str:
    return "-" if tiu is None or not other else f"{tiu / other:.2f}"


def _fmt(rate: float | None) -> str:
    return "-" if rate is None else f"{rate:,.0f}"


def _change(small: float, big: float) -> str:
    return f"{(big / small - 1) * 100:+.0f}%"


def table(records: list[dict[str, Any]]) -> str:
    by_case: dict[tuple[str, str], dict[str, dict[str, Any]]] = defaultdict(dict)
    for r in records:
        by_case[(r["case"], r["backend"])][r["system"]] = r
    lines = [
        "| case | backend | tiu | eventsourcing | raw | tiu/es | tiu/raw | target |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    queries: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
    growth: dict[tuple[str, str], list[tuple[int, float]]] = defaultdict(list)
    replays: dict[str, list[tuple[int, dict[str, Any]]]] = defaultdict(list)
    for (case, backend), systems in by_case.items():
        name = BACKEND_NAMES.get(backend, backend)
        tiu = _rate(systems.get("tiu"))
        if case.startswith(("9 ", "10 ")):
            continue  # a service's loop lag and telemetry's CPU: not rates, listed apart
        if case.startswith("6"):
            queries[(name, backend)].append((tiu or 0.0, _rate(systems.get("raw")) or 0.0))
            continue
        if case.startswith("7"):
            ids = re.search(r", (\w+) ids,", case)
            size = re.search(r"([\d,]+) events in log", case)
            if ids and size and tiu is not None:
                growth[(ids.group(1), name)].append((int(size.group(1).replace(",", "")), tiu))
            continue
        if case.startswith("5 replay tasks"):
            size = re.search(r"log ([\d,]+)", case)
            if size:
                replays[name].append((int(size.group(1).replace(",", "")), systems))
        e = _rate(systems.get("eventsourcing"))
        raws = raw_systems(list(systems)) or ["raw"]
        for system in raws:  # a row per raw baseline, named where there are several
            raw = _rate(systems.get(system))
            label = f"{case} [{system}]" if len(raws) > 1 else case
            lines.append(
                f"| {label} | {name} | {_fmt(tiu)} | {_fmt(e)} | {_fmt(raw)} "
                f"| {_ratio(tiu, e)} | {_ratio(tiu, raw)} | {target(case, backend, system)} |"
            )
    for (name, backend), pairs in queries.items():
        rates = " / ".join(f"{t:,.0f}" for t, _ in pairs)
        core = " / ".join(f"{c:,.0f}" for _, c in pairs)
        ratios = " / ".join(_ratio(t, c) for t, c in pairs)
        lines.append(
            f"| 6a-6d queries vs hand-written Core: list, pages, count, session (ops/s) "
            f"| {name} | {rates} | - | {core} | - | {ratios} | {target('6', backend)} |"
        )
    for (ids, name), points in growth.items():
        points.sort()
        (small, at_small), (big, at_big) = points[0], points[-1]
        lines.append(
            f"| 7 append rate with {small:,} / {big:,} events in the log, {ids} ids (paired) "
            f"| {name} | {at_small:,.0f} / {at_big:,.0f} ({_change(at_small, at_big)}) "
            "| - | - | - | - | |"
        )
    notes = []
    for name, points in replays.items():
        points.sort(key=lambda p: p[0])
        (small, first), (big, last) = points[0], points[-1]
        if small == big or "tiu" not in first or "tiu" not in last:
            continue
        events = last["tiu"]["items"] / first["tiu"]["items"]  # the logs' real sizes
        parts = [f"{name}: {events:.1f}x the events"]
        for system in ("tiu", "raw"):
            if system in first and system in last:
                grew = last[system]["median"] / first[system]["median"]
                parts.append(f"{system} time {grew:.1f}x")
        rss = [p[1]["tiu"].get("extra", {}).get("peak_rss_mb") for p in (points[0], points[-1])]
        if all(rss):
            parts.append(f"tiu peak RSS {rss[0]:.0f} -> {rss[1]:.0f} MB")
        notes.append(", ".join(parts))
    out = "\n".join(lines) + "\n"
    if notes:
        out += "\nTasks replay from the smallest to the largest log: " + "; ".join(notes) + ".\n"
    return out


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS / "latest.json"
    data = json.loads(path.read_text())
    records = data["results"] if isinstance(data, dict) else data
    print(table(records), end="")


if __name__ == "__main__":
    main()
