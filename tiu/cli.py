"""The ``tiu`` command: migrate, health, stats, demo, replay, worker, publish, audit, verify,
checkpoint, prove.

Every subcommand takes ``--database-url`` (default ``TIU_DATABASE_URL``, else the
embedded ``sqlite+aiosqlite:///./tiu.db``) and ``--schema`` (PostgreSQL search path,
``TIU_SEARCH_PATH``). Expected failures print ``error: <reason>`` on stderr and exit
1; data goes to stdout (``--json`` where a command prints data). The CLI acts as the
system actor: operators have database access anyway. See docs/cli.md.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

# Only typer and rich's console at the top: `tiu --help` must not pay for SQLAlchemy,
# pydantic, the store or OpenTelemetry (issue #20); each command imports what it runs.
import typer
from rich.console import Console
from typer.core import TyperGroup

if TYPE_CHECKING:
    import asyncio

    from rich.progress import Progress
    from rich.table import Table
    from sqlalchemy.ext.asyncio import AsyncEngine

    from eventstore import EventStore, retention, transparency
    from eventstore.offline_verify import Checkpoint, VerifierKey
    from projections import parking
    from projections import replay as replay_mod
    from projections.projector import Projector
    from tiu import audit as audit_queries
    from tiu.settings import Settings

T = TypeVar("T")


class _OneLineErrors(TyperGroup):
    """Where every failure of ``tiu`` becomes one ``error: <reason>`` line on stderr and
    exit 1 (130 when interrupted), whichever command it comes from: usage errors too
    (click's default is a box and exit 2) and anything unexpected (no traceback)."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        own = (args, prog_name, complete_var, False, windows_expand_args)
        if not standalone_mode:
            return super().main(*own, **extra)
        try:
            code = super().main(*own, **extra)
        except typer.TyperException as error:  # a usage error: bad option, missing value
            message = error.format_message()
            if message:  # (none when the help was printed instead: `tiu` alone)
                context = getattr(error, "ctx", None)
                hint = f" (see `{context.command_path} --help`)" if context is not None else ""
                _print_error(f"{message}{hint}")
            sys.exit(1)
        except typer.Abort:
            _print_error("interrupted")
            sys.exit(130)
        except Exception as error:
            from eventstore.translate import describe

            expected = isinstance(error, _expected())
            _print_error(
                _one_line(error)
                if expected
                else f"unexpected {type(error).__name__}: {describe(error)}"
            )
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    name="tiu",
    cls=_OneLineErrors,
    help="tiu-core operations: migrations, health, replay, projection worker, audit, verify.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
audit_app = typer.Typer(
    help="Query the audit trail straight off the event log (or an archive file).",
    invoke_without_command=True,
    pretty_exceptions_enable=False,
)
app.add_typer(audit_app, name="audit")


def _print_version(value: bool) -> None:
    if value:
        from tiu import __version__

        typer.echo(f"tiu {__version__}")
        raise typer.Exit


@app.callback()
def _options(
    _version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version."
        ),
    ] = False,
) -> None:
    """tiu-core operations: migrations, health, replay, projection worker, audit, verify."""


out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

#: The only category retention may archive: nothing is rebuilt from it.
ARCHIVABLE_CATEGORY = "security"

DatabaseUrl = Annotated[
    str | None,
    typer.Option(
        "--database-url",
        envvar="TIU_DATABASE_URL",
        help="SQLAlchemy URL (default: sqlite+aiosqlite:///./tiu.db).",
        show_default=False,
    ),
]
Schema = Annotated[
    str | None,
    typer.Option("--schema", envvar="TIU_SEARCH_PATH", help="PostgreSQL search_path (schema)."),
]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]
VerifierKeyOption = Annotated[
    str | None,
    typer.Option(
        "--key",
        help="Verifier key (name+hash+base64); default: derived from the signing key.",
    ),
]


class CliError(Exception):
    """An expected failure of the CLI itself (bad input); printed as one line."""


class OutputFormat(StrEnum):
    TABLE = "table"
    JSON = "json"
    JSONL = "jsonl"


# -- plumbing ----------------------------------------------------------------------------


def _settings(database_url: str | None, schema: str | None, **extra: Any) -> Settings:
    overrides: dict[str, Any] = dict(extra)
    if database_url:
        overrides["database_url"] = database_url
    if schema:
        overrides["search_path"] = schema
    from tiu.settings import Settings

    return Settings(**overrides)


def _require_existing(settings: Settings) -> None:
    """A SQLite file that does not exist is an error, not a new empty database."""
    from sqlalchemy.engine import make_url

    url = make_url(settings.database_url)
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        path = Path(str(url.database))
        if not path.exists():
            raise CliError(f"database file {path} does not exist; run `tiu migrate` first")


def _engine(settings: Settings, *, must_exist: bool = True) -> AsyncEngine:
    if must_exist:
        _require_existing(settings)
    from eventstore import create_engine

    return create_engine(settings.database_url, settings.engine_options())


def _store(engine: AsyncEngine) -> EventStore:
    """The CLI's store: it accepts the service's categories plus retention records."""
    from eventstore import EventStore, retention
    from tiu.service import CATEGORIES

    return EventStore(engine, categories=CATEGORIES | {retention.RETENTION_CATEGORY})


def _one_line(error: BaseException) -> str:
    from pydantic import ValidationError
    from sqlalchemy.exc import SQLAlchemyError

    from eventstore.translate import describe

    if isinstance(error, ValidationError):
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "settings"
        return f"invalid setting {where}: {first['msg']}"
    if isinstance(error, OverflowError):
        return f"a number, time or duration is out of range ({error})"
    if isinstance(error, SQLAlchemyError):
        return f"database error: {describe(error)}"
    return describe(error)


def _print_error(reason: str) -> None:
    err.print(f"error: {reason}", markup=False, highlight=False)


def fail(reason: str, code: int = 1) -> NoReturn:
    _print_error(reason)
    raise typer.Exit(code)


def _expected() -> tuple[type[Exception], ...]:
    """The failures printed as one line (imported only once something failed)."""
    from pydantic import ValidationError
    from sqlalchemy.exc import SQLAlchemyError

    from domain.errors import DomainError
    from eventstore.errors import EventStoreError
    from projections.errors import ProjectionError
    from tiu.audit import InvalidTime

    return (
        CliError,
        EventStoreError,
        DomainError,
        ProjectionError,
        ValidationError,
        InvalidTime,
        SQLAlchemyError,
        OSError,
        ValueError,
        OverflowError,
    )


def run(factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine; typed failures become ``error: <reason>`` and exit 1."""
    import asyncio

    try:
        return asyncio.run(_translated(factory))
    except _expected() as error:
        fail(_one_line(error))
    except KeyboardInterrupt:
        fail("interrupted", 130)


async def _translated(factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    from eventstore.translate import translate_errors

    with translate_errors():
        return await factory()


def emit_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str, sort_keys=False))


def _table(title: str | None, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> Table:
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*("-" if v is None else str(v) for v in row))
    return table


async def _with_engine(settings: Settings, work: Callable[[AsyncEngine], Awaitable[T]]) -> T:
    engine = _engine(settings)
    try:
        return await work(engine)
    finally:
        await engine.dispose()


# -- migrate, health, stats --------------------------------------------------------------


@app.command()
def migrate(
    database_url: DatabaseUrl = None,
    schema: Schema = None,
    check: Annotated[
        bool, typer.Option("--check", help="Only report; exit 1 if migrations are pending.")
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Upgrade the schema to the head revision (or --check whether that is needed)."""
    settings = _settings(database_url, schema)

    from migrations import runner as migrations

    async def work() -> dict[str, Any]:
        if check:
            _require_existing(settings)
        engine = _engine(settings, must_exist=False)
        try:
            current = await migrations.current_revision(engine)
            head = migrations.head_revision()
            if not check and current != head:
                await migrations.upgrade(engine)
            after = await migrations.current_revision(engine)
        finally:
            await engine.dispose()
        return {"from": current, "current": after, "head": head, "pending": after != head}

    result = run(work)
    if as_json:
        emit_json(result)
    elif check:
        state = "pending" if result["pending"] else "up to date"
        out.print(f"migrations {state}: current {result['current']}, head {result['head']}")
    elif result["from"] == result["head"]:
        out.print(f"already at head {result['head']}")
    else:
        out.print(f"migrated {result['from'] or 'empty'} -> {result['current']}")
    if check and result["pending"]:
        raise typer.Exit(1)


@app.command()
def health(
    database_url: DatabaseUrl = None, schema: Schema = None, as_json: JsonFlag = False
) -> None:
    """Connect, time a query, report the schema revision and the pool."""
    from tiu.service import DatabaseService

    settings = _settings(database_url, schema)

    async def work() -> dict[str, Any]:
        _require_existing(settings)
        service = DatabaseService(settings)
        try:
            report = await service.health_check()
            report["pool"] = service.get_pool_status()
            return report
        finally:
            await service.aclose()

    report = run(work)
    if as_json:
        emit_json(report)
    else:
        rows = [[k, v] for k, v in report.items() if k not in ("details", "pool", "publishers")]
        rows += [[f"pool.{k}", v] for k, v in report["pool"].items()]
        for n, p in report.get("publishers", {}).items():
            rows += [[f"publisher.{n}.{k}", p.get(k)] for k in ("lag_events", "lag_seconds")]
        out.print(_table("health", ["check", "value"], rows))
    if not report["healthy"]:
        fail(str(report["error"]))


@app.command()
def stats(
    database_url: DatabaseUrl = None, schema: Schema = None, as_json: JsonFlag = False
) -> None:
    """Events by category and type, read-model rows, projector lag and needs_rebuild."""
    from tiu.service import DatabaseService

    settings = _settings(database_url, schema)

    async def work() -> dict[str, Any]:
        _require_existing(settings)
        service = DatabaseService(settings)
        try:
            return await service.get_statistics()
        finally:
            await service.aclose()

    data = run(work)
    if as_json:
        emit_json(data)
        return
    out.print(f"head position {data['head_position']}, max lag {data['max_lag']}")
    tree = data["transparency"]
    out.print(
        f"merkle tree size {tree['tree_size']} (lag {tree['tree_lag']}), newest checkpoint "
        f"size {tree['checkpoint_size']} (lag {tree['checkpoint_lag']}) at {tree['checkpoint_at']}"
    )
    out.print(
        _table(
            "events by category", ["category", "events"], sorted(data["events_by_category"].items())
        )
    )
    out.print(_table("events by type", ["type", "events"], sorted(data["events_by_type"].items())))
    out.print(_table("read-model rows", ["table", "rows"], sorted(data["read_model_rows"].items())))
    out.print(
        _table(
            "projectors",
            ["projector", "code version", "live version", "position", "lag", "needs_rebuild"],
            [
                [
                    n,
                    p["code_version"],
                    p["active_version"],
                    p["position"],
                    p["lag"],
                    p["needs_rebuild"],
                ]
                for n, p in data["projectors"].items()
            ],
        )
    )
    if data["publishers"]:
        out.print(
            _table(
                "publishers",
                ["publisher", "position", "lag (events)", "lag (s)"],
                [
                    [n, p["position"], p["lag_events"], p["lag_seconds"]]
                    for n, p in data["publishers"].items()
                ],
            )
        )
    parked = [
        [n, p["parked"]["position"], p["parked"]["event_type"], p["parked"]["error"]]
        for n, p in data["projectors"].items()
        if p["parked"] is not None
    ]
    if parked:
        out.print(
            _table(
                "parked projectors (tiu projections retry NAME | skip NAME POSITION)",
                ["projector", "position", "event type", "error"],
                parked,
            )
        )


# -- demo --------------------------------------------------------------------------------


@app.command()
def demo(
    database_url: DatabaseUrl = None,
    as_json: JsonFlag = False,
) -> None:
    """Play a realistic scenario on a fresh SQLite file (deleted first on every run)."""
    from tiu.demo import run_demo  # keeps other commands' start-up light

    settings = _settings(database_url, None)
    console = err if as_json else out
    summary = run(lambda: run_demo(settings.database_url, console))
    if as_json:
        emit_json(summary)
    if not summary.get("verified", False):
        fail("the demo log did not verify")


# -- replay ------------------------------------------------------------------------------


def _select(names: Sequence[str]) -> list[Projector]:
    from projections.readmodels import by_name

    try:
        return [by_name(n) for n in dict.fromkeys(names)]
    except KeyError as error:
        raise CliError(str(error.args[0])) from None


@dataclass
class _Bar:
    progress: Progress
    tasks: dict[str, Any]

    def __call__(self, p: replay_mod.RebuildProgress) -> None:
        task = self.tasks[p.projector]
        self.progress.update(
            task, completed=p.position, total=max(p.head, 1), rate=f"{p.rate:,.0f} ev/s"
        )


@app.command()
def replay(  # noqa: PLR0917  # typer maps each parameter to an option
    projections: Annotated[
        list[str] | None,
        typer.Argument(help="Projector names or module:Class (default: the stale ones)."),
    ] = None,
    rebuild_all: Annotated[bool, typer.Option("--all", help="Rebuild every projector.")] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Only say what would be rebuilt.")
    ] = False,
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, help="Events applied per transaction.")
    ] = 10_000,  # projections.replay.DEFAULT_BATCH_SIZE (a test keeps them equal)
    database_url: DatabaseUrl = None,
    schema: Schema = None,
    as_json: JsonFlag = False,
) -> None:
    """Rebuild projections into shadow tables from position 0, then swap them in.

    The live tables serve reads until the one-transaction swap. Interrupted, the
    next run resumes from the rebuild's own checkpoint.
    """
    from rich.progress import (
        BarColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from projections import replay as replay_mod
    from projections.readmodels import ALL_PROJECTORS

    settings = _settings(database_url, schema)

    async def work() -> dict[str, Any]:
        engine = _engine(settings)
        store = _store(engine)
        try:
            if projections and rebuild_all:
                raise CliError("name projections or pass --all, not both")
            if rebuild_all:
                chosen = list(ALL_PROJECTORS)
            elif projections:
                chosen = _select(projections)
            else:
                async with engine.connect() as conn:
                    chosen = await replay_mod.stale_projectors(conn, ALL_PROJECTORS)
            async with engine.connect() as conn:
                plans = [await replay_mod.plan(conn, p) for p in chosen]
            result: dict[str, Any] = {
                "dry_run": dry_run,
                "plans": [_plan_dict(p) for p in plans],
                "rebuilt": [],
            }
            if not chosen:
                return result
            if not as_json:
                out.print(
                    _table(
                        "replay plan" + (" (dry run)" if dry_run else ""),
                        [
                            "projector",
                            "version",
                            "live version",
                            "stale",
                            "resume from",
                            "head",
                            "events",
                        ],
                        [
                            [
                                p.projector,
                                p.version,
                                p.active_version,
                                p.stale,
                                p.resume_from,
                                p.head,
                                p.events_to_apply,
                            ]
                            for p in plans
                        ],
                    )
                )
            if dry_run:
                return result
            columns = (
                TextColumn("{task.description}"),
                BarColumn(),
                TaskProgressColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
            )
            with Progress(*columns, console=err, transient=False, disable=as_json) as progress:
                bar = _Bar(progress, {})
                for plan in plans:
                    bar.tasks[plan.projector] = progress.add_task(
                        plan.projector, total=max(plan.head, 1), completed=plan.resume_from, rate=""
                    )
                for projector, plan in zip(chosen, plans, strict=True):
                    if plan.resume_from:
                        err.print(f"resuming {projector.name} from position {plan.resume_from}")
                    report = await replay_mod.rebuild(
                        store, projector, batch_size=batch_size, on_progress=bar, freeze_heap=True
                    )
                    result["rebuilt"].append(
                        {
                            "projector": report.projector,
                            "version": report.version,
                            "position": report.position,
                            "applied": report.applied,
                            "seconds": round(report.seconds, 3),
                            "resumed_from": report.resumed_from,
                        }
                    )
            return result
        finally:
            await store.aclose()
            await engine.dispose()

    result = _run_interruptible(work, "replay interrupted; run it again to resume")
    if as_json:
        emit_json(result)
    elif not result["plans"]:
        out.print("nothing to rebuild: every projector is at its code version (use --all)")
    elif not dry_run:
        for r in result["rebuilt"]:
            out.print(
                f"rebuilt {r['projector']} v{r['version']}: {r['applied']} events "
                f"to position {r['position']} in {r['seconds']}s"
            )


def _plan_dict(p: replay_mod.RebuildPlan) -> dict[str, Any]:
    return {
        "projector": p.projector,
        "version": p.version,
        "active_version": p.active_version,
        "stale": p.stale,
        "resume_from": p.resume_from,
        "head": p.head,
        "events_to_apply": p.events_to_apply,
    }


def _run_interruptible(factory: Callable[[], Coroutine[Any, Any, T]], message: str) -> T:
    """Like :func:`run`, but SIGTERM/SIGINT cancel the work so its transaction rolls
    back cleanly (committed batches stay), then exit 130 with ``message``."""
    import asyncio

    async def main() -> T:
        task = asyncio.ensure_future(_translated(factory))
        loop = asyncio.get_running_loop()
        handled = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            # Only the main thread receives signals (the CLI run from a thread, as by a
            # test harness, has none to catch); failing here would orphan the task.
            with contextlib.suppress(ValueError, RuntimeError):
                loop.add_signal_handler(sig, task.cancel)
                handled.append(sig)
        try:
            return await task
        finally:
            for sig in handled:
                loop.remove_signal_handler(sig)

    try:
        return asyncio.run(main())
    except (asyncio.CancelledError, KeyboardInterrupt):
        fail(message, 130)
    except _expected() as error:
        fail(_one_line(error))


# -- worker ------------------------------------------------------------------------------


@app.command()
def worker(  # noqa: PLR0917  # typer maps each parameter to an option
    projections: Annotated[
        list[str] | None, typer.Argument(help="Projector names (default: all).")
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 500,
    poll_interval: Annotated[float, typer.Option("--poll-interval", min=0.01)] = 1.0,
    log_interval: Annotated[
        float, typer.Option("--log-interval", min=0.1, help="Seconds between lag reports.")
    ] = 10.0,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            "--metrics-port",
            min=1,
            max=65535,
            help="Serve Prometheus metrics on 127.0.0.1:PORT/metrics (needs the otel extra).",
        ),
    ] = None,
    log_json: Annotated[
        bool, typer.Option("--log-json", help="Log JSON lines with trace and correlation ids.")
    ] = False,
    database_url: DatabaseUrl = None,
    schema: Schema = None,
) -> None:
    """Project the log until SIGTERM/SIGINT; the batch in progress finishes and commits."""
    import asyncio

    from eventstore import telemetry, transparency
    from projections.readmodels import ALL_PROJECTORS
    from projections.runner import Worker, lowest_position

    settings = _settings(database_url, schema)
    telemetry.configure_logging(json_lines=log_json)
    log = logging.getLogger("tiu.worker")
    server = _serve_metrics(metrics_port) if metrics_port is not None else None

    async def work() -> dict[str, Any]:
        engine = _engine(settings)
        store = _store(engine)
        chosen = _select(projections) if projections else list(ALL_PROJECTORS)
        runner = Worker(store, chosen, batch_size=batch_size, poll_interval=poll_interval)

        async def report() -> None:
            while True:
                async with engine.connect() as conn:
                    head = await store.head_position(conn)
                    low = await lowest_position(conn, chosen)
                log.info(
                    "head %d lag %d events %d rate %.0f ev/s",
                    head,
                    head - low,
                    runner.stats.events,
                    runner.stats.rate,
                )
                await asyncio.sleep(log_interval)

        log.info("worker started: %s", ", ".join(p.name for p in chosen))
        text_ = settings.signing_key_text()
        key = transparency.SigningKey.parse(text_) if text_ is not None else None
        try:
            async with (
                _until_signalled() as stop,
                _alongside(report(), _keep_tree(engine, key, settings, stop)),
            ):
                await runner.run(stop)
        finally:
            await store.aclose()
            await engine.dispose()
        log.info(
            "worker stopped: %d events in %d batches", runner.stats.events, runner.stats.batches
        )
        return {"events": runner.stats.events, "batches": runner.stats.batches}

    try:
        run(work)
    finally:
        if server is not None:
            server.shutdown()


def _serve_metrics(port: int) -> Any:
    from eventstore import telemetry

    if not telemetry.ENABLED:
        fail("--metrics-port needs the otel extra: pip install 'tiu-core[otel]'")
    try:
        return telemetry.serve_prometheus(port)
    except OSError as error:
        fail(f"cannot serve metrics on port {port}: {error.strerror or error}")


# -- publish -----------------------------------------------------------------------------


@app.command()
def publish(  # noqa: PLR0917  # typer maps each parameter to an option
    nats_url: Annotated[
        str | None, typer.Option("--nats-url", envvar="TIU_NATS_URL", show_default=False)
    ] = None,
    stream: Annotated[
        str | None, typer.Option("--stream", help="JetStream stream (created if missing).")
    ] = None,
    subject_prefix: Annotated[str | None, typer.Option("--subject-prefix")] = None,
    name: Annotated[
        str | None, typer.Option("--name", help="Publisher name (its checkpoint).")
    ] = None,
    category: Annotated[
        list[str] | None, typer.Option("--category", help="Only this category (repeatable).")
    ] = None,
    event_type: Annotated[
        list[str] | None, typer.Option("--type", help="Only this event type (repeatable).")
    ] = None,
    personal_data: Annotated[
        str | None, typer.Option("--personal-data", help="encrypted (default) or omit.")
    ] = None,
    log_interval: Annotated[
        float, typer.Option("--log-interval", min=0.1, help="Seconds between status lines.")
    ] = 10.0,
    database_url: DatabaseUrl = None,
    schema: Schema = None,
) -> None:
    """Publish the log to NATS JetStream until SIGTERM/SIGINT; acknowledgements in
    flight are awaited and the checkpoint written before exiting (docs/publishing.md)."""
    import asyncio

    from tiu.publishing import build_publisher

    overrides = {
        key: value
        for key, value in {
            "nats_url": nats_url,
            "publish_stream": stream,
            "publish_subject_prefix": subject_prefix,
            "publish_name": name,
            "publish_categories": frozenset(category) if category else None,
            "publish_types": frozenset(event_type) if event_type else None,
            "publish_personal_data": personal_data,
        }.items()
        if value is not None
    }
    settings = _settings(database_url, schema, **overrides)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s"
    )
    log = logging.getLogger("tiu.publish")

    async def work() -> dict[str, Any]:
        engine = _engine(settings)
        store = _store(engine)
        publisher = build_publisher(store, settings)

        async def report() -> None:
            while True:
                status = publisher.status
                log.info(
                    "publisher %s: acknowledged %d, checkpoint %d, published %d, %s",
                    status.name,
                    status.acknowledged,
                    status.checkpoint,
                    status.published,
                    "connected" if status.connected else f"not connected ({status.last_error})",
                )
                await asyncio.sleep(log_interval)

        log.info("publishing to %s, stream %s", settings.nats_url, settings.publish_stream)
        try:
            async with _until_signalled() as stop, _alongside(report()):
                await publisher.run(stop)
        finally:
            await store.aclose()
            await engine.dispose()
        status = publisher.status
        log.info("publisher stopped: checkpoint %d, %d published", status.checkpoint,
                 status.published)  # fmt: skip
        return status.as_dict()

    run(work)


# -- projections: parked projectors ------------------------------------------------------

projections_app = typer.Typer(
    help="Projectors parked at an event they cannot apply: retry, or skip the event.",
    no_args_is_help=True,
)
app.add_typer(projections_app, name="projections")
Actor = Annotated[
    str | None,
    typer.Option("--actor", help="Who acts (recorded in the log as the event's actor)."),
]


@projections_app.command("retry")
def projections_retry(
    name: Annotated[str, typer.Argument(help="Projector name.")],
    actor: Actor = None,
    database_url: DatabaseUrl = None,
    schema: Schema = None,
) -> None:
    """Unpark NAME: workers apply it again from its checkpoint (recorded in the log)."""
    from projections import parking

    settings = _settings(database_url, schema)

    async def work() -> parking.Parked | None:
        projector = _select([name])[0]
        engine = _engine(settings)
        store = _store(engine)
        try:
            return await parking.retry(store, projector.name, actor_id=actor)
        finally:
            await store.aclose()
            await engine.dispose()

    found = run(work)
    if found is None:
        out.print(f"{name} is not parked", markup=False, highlight=False)
    else:
        out.print(
            f"{name} unparked (was parked at position {found.position}, {found.event_type})",
            markup=False,
            highlight=False,
        )


@projections_app.command("skip")
def projections_skip(  # noqa: PLR0917  # typer maps each parameter to an option
    name: Annotated[str, typer.Argument(help="Projector name.")],
    position: Annotated[int, typer.Argument(help="Position of the event to skip.", min=1)],
    reason: Annotated[str, typer.Option("--reason", help="Why (recorded in the log).")],
    actor: Actor = None,
    database_url: DatabaseUrl = None,
    schema: Schema = None,
) -> None:
    """Skip the event at POSITION for NAME, for good (replays too), and unpark NAME
    if it was parked there; the skip and its reason are recorded in the log."""
    from projections import parking

    settings = _settings(database_url, schema)

    async def work() -> int:
        projector = _select([name])[0]
        engine = _engine(settings)
        store = _store(engine)
        try:
            return await parking.skip(store, projector, position, reason=reason, actor_id=actor)
        finally:
            await store.aclose()
            await engine.dispose()

    recorded = run(work)
    out.print(
        f"{name}: position {position} skipped; recorded at position {recorded}",
        markup=False,
        highlight=False,
    )


# -- tenants -----------------------------------------------------------------------------

tenants_app = typer.Typer(
    help="Tenants: one schema each in one PostgreSQL database (docs/scaling.md).",
    no_args_is_help=True,
)
app.add_typer(tenants_app, name="tenants")


@tenants_app.command("list")
def tenants_list(database_url: DatabaseUrl = None, as_json: JsonFlag = False) -> None:
    """Every schema of the database that holds a tiu store."""
    from tiu.tenants import TenantRegistry

    async def listed() -> list[str]:
        async with TenantRegistry(_settings(database_url, None)) as registry:
            return await registry.tenants()

    names = run(listed)
    if as_json:
        emit_json(names)
        return
    for name in names:
        out.print(name, markup=False, highlight=False)


@tenants_app.command("create")
def tenants_create(
    names: Annotated[list[str], typer.Argument(help="Tenant (schema) names.")],
    database_url: DatabaseUrl = None,
) -> None:
    """Create each tenant's schema if absent and migrate it to head (also brings an
    existing tenant up to date)."""
    from tiu.tenants import TenantRegistry

    async def work() -> None:
        async with TenantRegistry(_settings(database_url, None)) as registry:
            for name in names:
                await registry.create_tenant(name)
                out.print(f"tenant {name}: at head", markup=False, highlight=False)

    run(work)


async def _keep_tree(
    engine: AsyncEngine,
    key: transparency.SigningKey | None,
    settings: Settings,
    stop: asyncio.Event,
) -> None:
    """The worker's Merkle step: grow the tree and sign checkpoints (given a key) every
    ``checkpoint_every`` events or ``checkpoint_interval``; a failure is logged and retried."""
    import asyncio

    from sqlalchemy.exc import SQLAlchemyError

    from eventstore import transparency
    from eventstore.errors import EventStoreError

    log = logging.getLogger("tiu.worker")
    while not stop.is_set():
        try:
            await transparency.keep_up(
                engine,
                key,
                stop,
                every=settings.checkpoint_every,
                interval=settings.checkpoint_interval.total_seconds(),
            )
        except (EventStoreError, SQLAlchemyError) as error:
            log.error("merkle tree not extended: %s", _one_line(error))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), settings.checkpoint_interval.total_seconds())


@contextlib.asynccontextmanager
async def _until_signalled() -> AsyncIterator[asyncio.Event]:
    """An event that SIGTERM and SIGINT set while the block runs: how the commands that
    run until stopped (``worker``, ``publish``, ``tenants worker``) end cleanly."""
    import asyncio

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        yield stop
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


@contextlib.asynccontextmanager
async def _alongside(*jobs: Coroutine[Any, Any, None]) -> AsyncIterator[None]:
    """Run ``jobs`` (progress logging, the tree keeper) as tasks while the block runs;
    cancel them and wait for them when it ends."""
    import asyncio

    tasks = [asyncio.create_task(job) for job in jobs]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


@tenants_app.command("worker")
def tenants_worker(
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 500,
    poll_interval: Annotated[float, typer.Option("--poll-interval", min=0.01)] = 1.0,
    rescan: Annotated[
        float, typer.Option("--rescan", min=0.1, help="Seconds between looks for new tenants.")
    ] = 5.0,
    database_url: DatabaseUrl = None,
) -> None:
    """Project every tenant's log until SIGTERM/SIGINT (one worker per tenant)."""
    from tiu.tenants import TenantRegistry

    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s"
    )

    async def work() -> None:
        async with (
            _until_signalled() as stop,
            TenantRegistry(_settings(database_url, None)) as registry,
        ):
            await registry.run_workers_until(
                stop, batch_size=batch_size, poll_interval=poll_interval, rescan=rescan
            )

    run(work)


# -- verify ------------------------------------------------------------------------------


@app.command()
def forget(
    user: Annotated[str, typer.Argument(help="User id, or the email they registered with.")],
    database_url: DatabaseUrl = None,
    schema: Schema = None,
    json_output: JsonFlag = False,
    vacuum: Annotated[
        bool,
        typer.Option(
            "--vacuum",
            help="Then remove the old row versions: VACUUM FULL of the tables forgetting "
            "overwrote (PostgreSQL; locks them meanwhile), a WAL checkpoint (SQLite).",
        ),
    ] = False,
) -> None:
    """Erase a person's personal data (crypto-shredding; the audit chain stays intact)."""
    from tiu import privacy

    settings = _settings(database_url, schema)
    report = run(
        lambda: privacy.forget_with_settings(
            settings, user, engine=_engine(settings), vacuum=vacuum
        )
    )
    if json_output:
        emit_json(report.as_dict())
    else:
        typer.echo(report.describe())


@app.command(name="verify")
def verify_command(
    checkpoint_file: Annotated[
        Path | None,
        typer.Option(
            "--checkpoint",
            help="A kept checkpoint: prove the log is an append-only extension of it.",
        ),
    ] = None,
    key: VerifierKeyOption = None,
    database_url: DatabaseUrl = None,
    schema: Schema = None,
    as_json: JsonFlag = False,
) -> None:
    """Recheck every event hash, stream chain, position and Merkle leaf (and, with
    --checkpoint, the log against a kept signed checkpoint); name the first position
    affected."""
    from eventstore import transparency, verify

    settings = _settings(database_url, schema)

    async def work(engine: AsyncEngine) -> Any:
        kept = None
        if checkpoint_file is not None:
            note = _read_note(checkpoint_file)
            kept = transparency.read_checkpoint(note, _verifier(settings, key))
        async with engine.connect() as conn:
            # One child process per CPU: the CLI owns its process (a library call
            # checks in its host's process by default).
            return await verify(conn, checkpoint=kept, processes=None)

    report = run(lambda: _with_engine(settings, work))
    data = {
        "ok": report.ok,
        "streams": report.streams,
        "events": report.events,
        "head_position": report.head_position,
        "archives": report.archives,
        "archived_events": report.archived_events,
        "tree_size": report.tree_size,
        "checkpoint_size": report.checkpoint_size,
        "placeholder_leaves": report.placeholder_leaves,
        "first_position": report.first_position,
        "broken": str(report.broken) if report.broken else None,
    }
    if as_json:
        emit_json(data)
    else:
        against = ""
        if report.checkpoint_size is not None:
            against = f", against checkpoint size {report.checkpoint_size}"
        if report.placeholder_leaves:
            against += (
                f" ({report.placeholder_leaves} archived before the tree existed: "
                "placeholder leaves, not provable one by one)"
            )
        out.print(
            f"{report.streams} streams, {report.events} events, head position "
            f"{report.head_position}, {report.archived_events} archived in "
            f"{report.archives} archives, tree size {report.tree_size}{against}: "
            + ("ok" if report.ok else f"BROKEN at position {report.first_position}")
        )
    if report.broken is not None:
        fail(str(report.broken))


# -- checkpoint, prove ------------------------------------------------------------------

checkpoint_app = typer.Typer(
    help="Signed checkpoints of the log's Merkle tree (see docs/transparency.md).",
    invoke_without_command=True,
    pretty_exceptions_enable=False,
)
app.add_typer(checkpoint_app, name="checkpoint")


def _signing_key(settings: Settings) -> transparency.SigningKey:
    from eventstore import transparency

    text_ = settings.signing_key_text()
    if text_ is None:
        raise CliError("no checkpoint key: set TIU_CHECKPOINT_KEY or TIU_CHECKPOINT_KEY_FILE")
    return transparency.SigningKey.parse(text_)


def _verifier(settings: Settings, key: str | None) -> VerifierKey:
    from eventstore.offline_verify import ProofError, VerifierKey

    if key is not None:
        try:
            return VerifierKey.parse(key)
        except ProofError as error:
            raise CliError(str(error)) from None
    return _signing_key(settings).verifier_key()


def _read_note(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as error:
        raise CliError(f"cannot read {path}: {error.strerror}") from None


def _checkpoint_dict(cp: Checkpoint) -> dict[str, Any]:
    return {"origin": cp.origin, "size": cp.size, "root": cp.root_hex, "time": cp.time}


@checkpoint_app.callback()
def checkpoint(
    ctx: typer.Context,
    database_url: DatabaseUrl = None,
    schema: Schema = None,
    as_json: JsonFlag = False,
) -> None:
    """Grow the Merkle tree to the head and write a signed checkpoint of it."""
    if ctx.invoked_subcommand is not None:
        return
    from eventstore import transparency

    settings = _settings(database_url, schema)

    async def work(engine: AsyncEngine) -> Checkpoint:
        _require_existing(settings)
        return await transparency.write_checkpoint(engine, _signing_key(settings))

    cp = run(lambda: _with_engine(settings, work))
    if as_json:
        emit_json(_checkpoint_dict(cp))
    else:
        out.print(f"checkpoint {cp.origin} size {cp.size} root {cp.root_hex} at {cp.time}")


@checkpoint_app.command("export")
def checkpoint_export(database_url: DatabaseUrl = None, schema: Schema = None) -> None:
    """Print the newest checkpoint as a signed note, for an auditor to keep elsewhere."""
    from eventstore import transparency

    settings = _settings(database_url, schema)

    async def work(engine: AsyncEngine) -> str | None:
        _require_existing(settings)
        async with engine.connect() as conn:
            return await transparency.latest_note(conn)

    note = run(lambda: _with_engine(settings, work))
    if note is None:
        fail("no checkpoint yet: run `tiu checkpoint`")
    typer.echo(note, nl=False)


@checkpoint_app.command("keygen")
def checkpoint_keygen(
    name: Annotated[str, typer.Option("--name", help="The log's name (the checkpoints' origin).")],
    output: Annotated[Path, typer.Option("--output", help="File for the signing key (0600).")],
) -> None:
    """Make an Ed25519 signing key in a new file; print the verifier key for auditors."""
    from eventstore import transparency

    try:
        key = transparency.SigningKey.generate(name)
        with open(output, "x", encoding="utf-8", opener=_private_opener) as handle:
            handle.write(key.encoded() + "\n")
    except transparency.TransparencyError as error:
        fail(str(error))
    except OSError as error:
        fail(f"cannot write {output}: {error.strerror}")
    typer.echo(key.verifier())


def _private_opener(path: str, flags: int) -> int:
    return os.open(path, flags, 0o600)


def _uncovered(position: int | None, note: str | None, verifier: VerifierKey) -> bool:
    from eventstore import transparency

    if position is None:
        return False
    return note is None or transparency.read_checkpoint(note, verifier).size < position


@app.command()
def prove(  # noqa: PLR0917  # typer maps each parameter to an option
    position: Annotated[
        int | None, typer.Argument(help="Position of the event to prove.", min=1)
    ] = None,
    checkpoint_file: Annotated[
        Path | None,
        typer.Option("--checkpoint", help="Prove against this kept checkpoint (default: newest)."),
    ] = None,
    since: Annotated[
        Path | None,
        typer.Option("--since", help="Prove the newest checkpoint extends this kept one."),
    ] = None,
    archive: Annotated[
        Path | None,
        typer.Option("--archive", help="Archive file holding POSITION, if it was archived."),
    ] = None,
    key: VerifierKeyOption = None,
    database_url: DatabaseUrl = None,
    schema: Schema = None,
) -> None:
    """Print an inclusion proof of POSITION, or (--since) a consistency proof, as JSON
    that eventstore/offline_verify.py checks without tiu-core or the database."""
    from eventstore import transparency

    if (position is None) == (since is None):
        fail("give a POSITION or --since KEPT_CHECKPOINT")
    settings = _settings(database_url, schema)

    async def work(engine: AsyncEngine) -> dict[str, Any]:
        _require_existing(settings)
        verifier = _verifier(settings, key)
        async with engine.connect() as conn:
            newest = await transparency.latest_note(conn)
        if checkpoint_file is not None:
            newest = _read_note(checkpoint_file)
        elif _uncovered(position, newest, verifier) and settings.signing_key_text() is not None:
            # Lazily: an event newer than the newest checkpoint gets a checkpoint first.
            newest = (await transparency.write_checkpoint(engine, _signing_key(settings))).note
        if newest is None:
            raise CliError("no checkpoint yet: run `tiu checkpoint`")
        against = transparency.read_checkpoint(newest, verifier)
        if since is not None:
            kept = transparency.read_checkpoint(_read_note(since), verifier)
            return await transparency.prove_consistency(engine, kept, against)
        assert position is not None
        return await transparency.prove_inclusion(engine, position, against, archive=archive)

    emit_json(run(lambda: _with_engine(settings, work)))


# -- audit -------------------------------------------------------------------------------


@audit_app.callback()
def audit(  # noqa: PLR0917  # typer maps each parameter to an option
    ctx: typer.Context,
    actor: Annotated[str | None, typer.Option("--actor", help="Actor id.")] = None,
    stream: Annotated[str | None, typer.Option("--stream", help="Stream id.")] = None,
    category: Annotated[str | None, typer.Option("--category")] = None,
    event_type: Annotated[
        list[str] | None, typer.Option("--type", help="Event type (repeatable).")
    ] = None,
    since: Annotated[
        str | None, typer.Option("--since", help="ISO time or relative: 30m, 2h, 7d.")
    ] = None,
    until: Annotated[str | None, typer.Option("--until", help="ISO time or relative.")] = None,
    correlation: Annotated[str | None, typer.Option("--correlation")] = None,
    failed: Annotated[bool, typer.Option("--failed", help="Security failures only.")] = False,
    suspicious: Annotated[
        bool, typer.Option("--suspicious", help="Apply the suspicious-login rules.")
    ] = False,
    show_stats: Annotated[bool, typer.Option("--stats", help="Counts by type and by day.")] = False,
    threshold: Annotated[
        int, typer.Option("--threshold", min=1, help="Failed logins per account that flag it.")
    ] = 5,
    ip_threshold: Annotated[
        int, typer.Option("--ip-threshold", min=1, help="Failed logins per IP that flag it.")
    ] = 10,
    window: Annotated[str, typer.Option("--window", help="Window of the failure rules.")] = "15m",
    lockout_lookback: Annotated[
        str, typer.Option("--lockout-lookback", help="How long after a lockout a new IP counts.")
    ] = "1d",
    limit: Annotated[int, typer.Option("--limit", min=1)] = 100,
    output: Annotated[OutputFormat, typer.Option("--format")] = OutputFormat.TABLE,
    archive_file: Annotated[
        Path | None, typer.Option("--archive", help="Query this archive file instead of the log.")
    ] = None,
    database_url: DatabaseUrl = None,
    schema: Schema = None,
) -> None:
    """Query the log. ``tiu audit archive --before DATE`` moves old security events out."""
    if ctx.invoked_subcommand is not None:
        return
    if sum((failed, suspicious, show_stats)) > 1:
        fail("choose one of --failed, --suspicious, --stats")
    from domain.permissions import SYSTEM_ACTOR
    from tiu import audit as audit_queries
    from tiu.service import DatabaseService

    def build() -> tuple[audit_queries.AuditFilter, audit_queries.SuspiciousRules]:
        now = datetime.now(UTC)
        where = audit_queries.AuditFilter(
            actor,
            stream,
            category,
            tuple(event_type or ()),
            audit_queries.parse_time(since, now) if since else None,
            audit_queries.parse_time(until, now) if until else None,
            correlation,
        )
        if failed:
            where = where.narrowed(audit_queries.FAILED_TYPES)
        rules = audit_queries.SuspiciousRules(
            threshold,
            ip_threshold,
            audit_queries.parse_duration(window),
            audit_queries.parse_duration(lockout_lookback),
        )
        return where, rules

    async def from_log() -> Any:
        where, rules = build()
        settings = _settings(database_url, schema)
        _require_existing(settings)
        service = DatabaseService(settings)
        try:
            async with service.get_repositories(actor_id=SYSTEM_ACTOR) as repos:
                if suspicious:
                    return await repos.audit.suspicious(
                        since=where.since, until=where.until, rules=rules
                    )
                filters: dict[str, Any] = {
                    "actor_id": where.actor_id,
                    "stream_id": where.stream_id,
                    "category": where.category,
                    "event_types": where.event_types,
                    "since": where.since,
                    "until": where.until,
                    "correlation_id": where.correlation_id,
                }
                if show_stats:
                    return await repos.audit.stats(**filters)
                return await repos.audit.get_events(**filters, limit=limit)
        finally:
            await service.aclose()

    async def from_archive() -> Any:
        assert archive_file is not None
        if not archive_file.exists():
            raise CliError(f"archive file {archive_file} does not exist")
        where, rules = build()
        if suspicious:
            return audit_queries.suspicious_archive(archive_file, where, rules)
        if show_stats:
            return audit_queries.stats_archive(archive_file, where)
        return audit_queries.query_archive(archive_file, where, limit=limit)

    result = run(from_archive if archive_file is not None else from_log)
    _print_audit(result, output, suspicious=suspicious, show_stats=show_stats)


def _print_audit(result: Any, output: OutputFormat, *, suspicious: bool, show_stats: bool) -> None:
    if show_stats:
        data = result.as_dict()
        if output is OutputFormat.TABLE:
            out.print(f"{data['total']} events")
            out.print(_table("by type", ["type", "events"], list(data["by_type"].items())))
            out.print(_table("by day (UTC)", ["day", "events"], list(data["by_day"].items())))
        elif output is OutputFormat.JSON:
            emit_json(data)
        else:
            typer.echo(json.dumps(data, default=str))
        return
    if suspicious:
        items = [f.as_dict() for f in result]
        if output is OutputFormat.TABLE:
            from tiu.demo import findings_table

            if not result:
                out.print("no suspicious activity found")
            else:
                out.print(findings_table(result))
    else:
        items = [e.model_dump(mode="json") for e in result]
        if output is OutputFormat.TABLE:
            from tiu.demo import audit_table

            out.print(audit_table(f"{len(result)} events", result))
    if output is OutputFormat.JSON:
        emit_json(items)
    elif output is OutputFormat.JSONL:
        for item in items:
            typer.echo(json.dumps(item, default=str))


@audit_app.command("archive")
def audit_archive(
    before: Annotated[
        str, typer.Option("--before", help="Archive security events recorded before this.")
    ],
    output: Annotated[
        Path | None, typer.Option("--output", help="Archive file (.jsonl.gz).")
    ] = None,
    database_url: DatabaseUrl = None,
    schema: Schema = None,
    as_json: JsonFlag = False,
) -> None:
    """Move security events older than --before into a gzip JSONL file, then remove
    them from the log in one audited transaction (an AuditArchived record)."""
    from domain.permissions import SYSTEM_ACTOR
    from eventstore import retention
    from tiu import audit as audit_queries

    settings = _settings(database_url, schema)

    async def work(engine: AsyncEngine) -> retention.ArchiveReport:
        cutoff = audit_queries.parse_time(before)
        store = _store(engine)
        try:
            return await retention.archive(
                store,
                before=cutoff,
                output=output,
                category=ARCHIVABLE_CATEGORY,
                actor_id=SYSTEM_ACTOR,
            )
        finally:
            await store.aclose()

    report = run(lambda: _with_engine(settings, work))
    if as_json:
        emit_json(report.as_dict())
    elif report.count == 0:
        out.print("nothing to archive before the cutoff")
    else:
        out.print(
            f"archived {report.count} events of {report.streams} streams to {report.path} "
            f"(sha256 {report.sha256}); record at position {report.record_position}"
        )
