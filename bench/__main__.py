"""``python -m bench``: tiu-core vs eventsourcing vs the raw drivers, on SQLite and PostgreSQL.

    python -m bench                 # the full run (well under an hour on 2 cores)
    python -m bench --quick         # a smoke run (a few minutes)
    python -m bench --cases 1,4 --backends postgresql --runs 5
    python -m bench --profile --cases 1,5   # pyinstrument reports in bench/results/

Prints one table and writes ``bench/results/<timestamp>.json`` (one record per case,
backend and system), ``bench/results/latest.json`` and ``bench/results/latest.md``.
Ratios are times: tiu's median divided by the other system's median from the same
run (2.0 = tiu takes twice as long; below 1 = tiu is faster).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from rich.console import Console
from rich.table import Table

from bench import es
from bench.cases import command, publish, queries, read, replay, service, store, telemetry
from bench.common import (
    BACKENDS,
    Config,
    Result,
    Workspace,
    machine_info,
    pg_create_database,
    pg_drop_database,
    pg_version,
    raw_label,
    raw_systems,
)
from bench.context import RESULTS, Context

CASES: dict[str, Callable[[Context], Awaitable[list[Result]]]] = {
    "1": store.case1,
    "2": store.case2,
    "3": command.case3,
    "4": read.case4,
    "5": replay.case5,  # also case 7 (growth): it measures on the log case 5 grows
    "6": queries.case6,
    "8": publish.case8,
    "9": service.case9,  # the embedded service under a loop probe
    "10": telemetry.case10,
}


def _ratio(tiu: Result, other: Result | None) -> str:
    if other is None or other.median <= 0:
        return ""
    return f"{tiu.median / other.median:.2f}"


def _raw_ratios(tiu: Result, raws: list[Result]) -> str:
    """tiu's ratio to each raw baseline of its case, named where there are several."""
    if len(raws) == 1:
        return _ratio(tiu, raws[0])
    return " / ".join(f"{_ratio(tiu, raw)} ({raw_label(raw.system)})" for raw in raws)


def _rows(results: list[Result]) -> list[list[str]]:
    by_key = {(r.case, r.backend, r.system): r for r in results}
    rows = []
    for r in results:
        es_ratio = raw_ratio = ""
        if r.system == "tiu":
            es_ratio = _ratio(r, by_key.get((r.case, r.backend, "eventsourcing")))
            raws = raw_systems(
                [o.system for o in results if (o.case, o.backend) == (r.case, r.backend)]
            )
            raw_ratio = _raw_ratios(r, [by_key[(r.case, r.backend, s)] for s in raws])
        rows.append(
            [
                r.case,
                r.backend,
                r.system,
                f"{r.median:.3f}",
                f"{r.min:.3f}",
                f"{r.max:.3f}",
                f"{r.rate:,.0f} {r.rate_unit}",
                es_ratio,
                raw_ratio,
                r.note,
            ]
        )
    return rows


HEADERS = [
    "case",
    "backend",
    "system",
    "median s",
    "min s",
    "max s",
    "rate (median)",
    "tiu/es",
    "tiu/raw",
    "note",
]


def print_table(results: list[Result]) -> None:
    table = Table(title="tiu-core benchmarks (times per run; ratios = tiu time / other time)")
    for h in HEADERS:
        table.add_column(h, justify="right" if h not in ("case", "note") else "left")
    for row in _rows(results):
        table.add_row(*row)
    Console(width=220).print(table)


def write_markdown(results: list[Result], machine: dict[str, str], cfg: Config, secs: float) -> str:
    lines = [
        "# tiu-core benchmark results",
        "",
        f"Run {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {'quick' if cfg.quick else 'full'} run, "
        f"{cfg.runs} runs per measurement, {secs / 60:.1f} minutes in all.",
        "",
        "Machine: "
        + ", ".join(f"{k} {v}" for k, v in machine.items() if k != "os")
        + f"; {machine.get('os', '')}.",
        "",
        f"Durability: PostgreSQL `synchronous_commit=on` (default) for all three systems; "
        f"SQLite WAL with `synchronous={cfg.sqlite_synchronous}` for all three (tiu's default "
        "is NORMAL; eventsourcing's connections get the same pragma from the bench, its own "
        "default would be SQLite's FULL).",
        "",
        "Times are seconds per run (median, min, max); the rate is items per second at the "
        "median; ratios divide tiu's median time by the other system's (above 1: tiu slower).",
        "",
        "| " + " | ".join(HEADERS) + " |",
        "|" + "---|" * len(HEADERS),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in _rows(results)]
    return "\n".join(lines) + "\n"


async def main_async(cfg: Config, cases: list[str], results: list[Result]) -> None:
    """Run ``cases``, adding to ``results`` as each case ends (kept if a later one fails)."""
    ws = Workspace(cfg)
    try:
        if "postgresql" in cfg.backends:
            await pg_create_database()
        for backend in cfg.backends:
            ctx = Context(cfg, ws, backend)
            for case in cases:
                started = time.monotonic()
                print(f"[{backend}] case {case} ...", flush=True)
                got = await CASES[case](ctx)
                results += got
                for r in got:
                    print(
                        f"    {r.system:18} {r.case}: {r.median:.3f}s, {r.rate:,.0f} {r.rate_unit}"
                    )
                print(
                    f"[{backend}] case {case} done in {time.monotonic() - started:.0f}s", flush=True
                )
    finally:
        if "postgresql" in cfg.backends and not cfg.keep:
            await pg_drop_database()
        ws.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--cases", default=",".join(CASES), help="e.g. 1,2,5 (5 includes 7)")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--sqlite-synchronous", default="NORMAL", choices=["NORMAL", "FULL"])
    parser.add_argument("--profile", action="store_true", help="pyinstrument the tiu runs")
    parser.add_argument("--keep", action="store_true", help="keep the run's database")
    args = parser.parse_args()
    cases = [c.strip().replace("7", "5") for c in args.cases.split(",") if c.strip()]
    cases = list(dict.fromkeys(cases))
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"unknown cases {unknown}; known: {', '.join(CASES)} (7 runs with 5)")
    cfg = Config(
        quick=args.quick,
        runs=args.runs,
        backends=tuple(b.strip() for b in args.backends.split(",")),
        sqlite_synchronous=args.sqlite_synchronous,
        profile=args.profile,
        keep=args.keep,
    )
    es.set_sqlite_synchronous(cfg.sqlite_synchronous)
    started = time.monotonic()
    results: list[Result] = []
    try:
        asyncio.run(main_async(cfg, cases, results))
    finally:
        if results:
            _write(cfg, results, time.monotonic() - started)


def _write(cfg: Config, results: list[Result], secs: float) -> None:
    pg = asyncio.run(pg_version()) if "postgresql" in cfg.backends else None
    machine = machine_info(pg)
    print_table(results)
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    payload = {
        "machine": machine,
        "quick": cfg.quick,
        "runs": cfg.runs,
        "sqlite_synchronous": cfg.sqlite_synchronous,
        "seconds": round(secs, 1),
        "results": [r.record() for r in results],
    }
    text = json.dumps(payload, indent=2, default=str)
    (RESULTS / f"{stamp}{'-quick' if cfg.quick else ''}.json").write_text(text)
    (RESULTS / "latest.json").write_text(text)
    (RESULTS / "latest.md").write_text(write_markdown(results, machine, cfg, secs))
    print(f"wrote {RESULTS / 'latest.md'} and JSON in {RESULTS} ({secs / 60:.1f} min)")


if __name__ == "__main__":
    main()
