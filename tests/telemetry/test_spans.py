"""Spans of commands, queries and projector batches, on both backends, read back from
the SDK's in-memory exporter."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from opentelemetry.trace import StatusCode
from pydantic import SecretStr
from sqlalchemy.ext.asyncio import AsyncEngine

from domain import CommandContext, projects, users
from domain.passwords import BcryptHasher
from domain.permissions import SYSTEM_ACTOR
from projections.runner import Worker
from tests.conftest import PASSWORD, Clock
from tests.telemetry.support import in_memory
from tiu import DatabaseService, InvalidCredentials, Settings

HASHER = BcryptHasher(rounds=4)


def ctx(service: DatabaseService, actor: str | None) -> CommandContext:
    return CommandContext(now=service.now(), actor_id=actor, correlation_id="corr-7")


async def register(service: DatabaseService, user_id: str) -> None:
    await service.dispatcher.dispatch(
        users.RegisterUser(
            user_id=user_id,
            email=f"{user_id}@example.com",
            username=user_id,
            password=SecretStr(PASSWORD),
        ),
        ctx(service, SYSTEM_ACTOR),
    )


def create_project(project_id: str, owner: str) -> projects.CreateProject:
    del owner  # the acting user becomes the owner
    return projects.CreateProject(project_id=project_id, name=f"P {project_id}")


STAGES = ("load", "decide", "write", "begin", "project", "lock", "append", "commit")


async def test_a_command_is_one_span_under_the_active_one_timing_each_of_its_stages(service, otel):
    await register(service, "ada")
    otel.spans.clear()
    tracer = otel.tracer_provider.get_tracer("host")
    with tracer.start_as_current_span("POST /projects") as request:
        await service.dispatcher.dispatch(create_project("p1", "ada"), ctx(service, "ada"))

    (command,) = otel.named("tiu.command CreateProject")
    assert command.parent is not None
    assert command.parent.span_id == request.get_span_context().span_id
    assert command.context.trace_id == request.get_span_context().trace_id
    attributes = dict(command.attributes)
    assert attributes["tiu.command.type"] == "CreateProject"
    assert attributes["tiu.command.outcome"] == "ok"
    assert attributes["tiu.stream.ids"] == ("project-p1",)
    assert attributes["tiu.correlation_id"] == "corr-7"
    assert otel.descendants(command) == [], "stages are durations, not spans, by default"
    durations = {stage: attributes[f"tiu.duration.{stage}"] for stage in STAGES}
    assert all(seconds >= 0 for seconds in durations.values())
    # the write's stages happen inside it; on PostgreSQL the lock is taken in the append
    inside = ("begin", "project", "append", "commit")
    assert sum(durations[stage] for stage in inside) <= durations["write"]
    assert durations["lock"] <= durations["append"]


async def test_with_stage_spans_load_decide_and_write_are_children_and_the_write_has_its_stages(
    service, otel_stages
):
    otel = otel_stages
    await register(service, "ada")
    otel.spans.clear()
    tracer = otel.tracer_provider.get_tracer("host")
    with tracer.start_as_current_span("POST /projects"):
        await service.dispatcher.dispatch(create_project("p1", "ada"), ctx(service, "ada"))

    (command,) = otel.named("tiu.command CreateProject")
    below = otel.descendants(command)
    assert {s.name for s in below} == {f"tiu.{stage}" for stage in STAGES}
    (write,) = [s for s in below if s.name == "tiu.write"]
    stages = sorted(otel.children(write), key=lambda s: s.start_time)
    assert [s.name for s in stages if s.name.startswith(("tiu.load", "tiu.decide"))] in (
        [],  # prepared before the write began (group commit)
        ["tiu.load", "tiu.decide"],  # prepared in its transaction
    )
    written = [s.name for s in stages if s.name not in ("tiu.load", "tiu.decide")]
    assert written == ["tiu.begin", "tiu.project", "tiu.append", "tiu.commit"]
    (append,) = [s for s in stages if s.name == "tiu.append"]
    assert [s.name for s in otel.children(append)] == ["tiu.lock"]
    assert "tiu.duration.write" not in command.attributes


async def test_a_refused_command_says_its_outcome_and_counts_it(service, otel):
    await register(service, "ada")
    with pytest.raises(Exception, match="already"):
        await register(service, "ada")
    (refused,) = [
        s
        for s in otel.named("tiu.command RegisterUser")
        if s.attributes["tiu.command.outcome"] != "ok"
    ]
    assert refused.status.status_code is StatusCode.ERROR
    outcomes = {
        p.attributes["tiu.command.outcome"]: p.count for p in otel.points("tiu.command.duration")
    }
    assert outcomes["ok"] == 1
    assert sum(outcomes.values()) == 2
    (duration,) = [
        p
        for p in otel.points("tiu.command.duration")
        if p.attributes["tiu.command.outcome"] == "ok"
    ]
    assert duration.count == 1
    assert duration.sum > 0


async def test_events_carry_the_trace_of_the_command_that_appended_them(service, otel):
    await register(service, "ada")
    (command,) = otel.named("tiu.command RegisterUser")
    async with service.engine.connect() as conn:
        records = await service.store.read_all(conn)
    parents = {r.metadata.get("traceparent") for r in records if r.stream_id == "user-ada"}
    (parent,) = parents
    assert parent.split("-")[1] == f"{command.context.trace_id:032x}"
    assert parent.split("-")[2] == f"{command.context.span_id:016x}"


@pytest.mark.parametrize("stage_spans", [False, True], ids=["durations", "stage-spans"])
async def test_concurrent_commands_share_a_group_and_each_keeps_its_own_trace(service, stage_spans):
    with in_memory(stage_spans=stage_spans) as otel:
        await _share_a_group(service, otel, stage_spans=stage_spans)


async def _share_a_group(service, otel, *, stage_spans: bool) -> None:
    for name in ("ada", "bob", "cyd", "dan"):
        await register(service, name)
    otel.spans.clear()
    tracer = otel.tracer_provider.get_tracer("host")

    async def issue(name: str) -> None:
        with tracer.start_as_current_span(f"request {name}"):
            await service.dispatcher.dispatch(create_project(f"p-{name}", name), ctx(service, name))

    commits: list[object] = []
    holding = asyncio.Event()

    queue = service.dispatcher.group._queue

    async def hold_the_first(streams: object) -> None:
        # Callers prepare in tasks of their own: holding the first commit until the
        # others are queued makes them one group however slowly a loaded machine runs
        # their preparation.
        commits.append(streams)
        if len(commits) == 1:
            holding.set()
            async with asyncio.timeout(10):
                while len(queue._queue) < 3:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)

    service.store.before_commit = hold_the_first
    # No CPU budget for the group: with stage spans, on a busy machine, one command
    # could spend it alone and leave the others to groups of their own.
    assert service.dispatcher.group is not None
    service.dispatcher.group.budget = None
    # The first command alone, then the rest while its commit is held: they form one
    # group (started together, the first two could form a group of their own).
    first = asyncio.create_task(issue("ada"))
    await asyncio.wait_for(holding.wait(), 5)
    await asyncio.gather(first, *(issue(n) for n in ("bob", "cyd", "dan")))
    service.store.before_commit = None
    commands = otel.named("tiu.command CreateProject")
    assert len(commands) == 4
    assert max(c.attributes.get("tiu.command.group_size", 1) for c in commands) > 1
    grouped = [c for c in commands if c.attributes.get("tiu.command.group_size", 1) > 1]
    for command in commands:
        if stage_spans:
            decides = [s for s in otel.descendants(command) if s.name == "tiu.decide"]
            assert len(decides) == 1, "each command's decision sits under its own span"
        else:
            assert command.attributes["tiu.duration.decide"] >= 0
            assert command.attributes["tiu.duration.write"] > 0
    if not stage_spans:  # one transaction wrote the group: its commands report its commit
        assert len({c.attributes["tiu.duration.commit"] for c in grouped}) == 1
    sizes = [
        p for p in otel.points("tiu.group.size") if p.attributes["tiu.group.kind"] == "command"
    ]
    assert sizes and sizes[0].max > 1


async def test_one_command_object_dispatched_twice_at_once_keeps_each_span_its_own(service, otel):
    await register(service, "ada")
    otel.spans.clear()
    command = create_project("p-twice", "ada")
    await asyncio.gather(
        service.dispatcher.dispatch(command, ctx(service, "ada")),
        service.dispatcher.dispatch(command, ctx(service, "ada")),
    )
    spans = otel.named("tiu.command CreateProject")
    (wrote,) = [s for s in spans if s.attributes["tiu.command.outcome"] == "ok"]
    assert wrote.attributes["tiu.duration.write"] > 0
    async with service.engine.connect() as conn:
        records = await service.store.read_all(conn)
    (parent,) = {r.metadata["traceparent"] for r in records if r.stream_id == "project-p-twice"}
    assert parent.split("-")[2] == f"{wrote.context.span_id:016x}"


async def test_the_dispatch_that_writes_is_credited_though_one_of_the_same_object_began_first(
    service, otel, monkeypatch
):
    # The first dispatch of the object opens its span, then waits in its preparation;
    # the second writes, the first then finds the command done (a duplicate). The
    # group writer must credit the second's span with the write, not the first's. The
    # command id is the caller's (an idempotency key): one minted for the command would
    # send the first to the write too, to find the duplicate there.
    await register(service, "ada")
    otel.spans.clear()
    command = projects.CreateProject(command_id="late", project_id="p-late", name="P late")
    prepare = service.dispatcher.prepare
    first_waits, go_on = asyncio.Event(), asyncio.Event()

    async def prepare_the_first_late(*args, **kwargs):
        if not first_waits.is_set():
            first_waits.set()
            await go_on.wait()
        return await prepare(*args, **kwargs)

    monkeypatch.setattr(service.dispatcher, "prepare", prepare_the_first_late)
    first = asyncio.create_task(service.dispatcher.dispatch(command, ctx(service, "ada")))
    await first_waits.wait()
    await service.dispatcher.dispatch(command, ctx(service, "ada"))
    go_on.set()
    await first
    spans = otel.named("tiu.command CreateProject")
    (wrote,) = [s for s in spans if s.attributes["tiu.command.outcome"] == "ok"]
    (late,) = [s for s in spans if s.attributes["tiu.command.outcome"] == "duplicate"]
    assert wrote.attributes["tiu.duration.write"] > 0
    assert "tiu.duration.write" not in late.attributes


async def test_repository_and_audit_queries_are_database_client_spans(service, otel):
    await register(service, "ada")
    async with service.get_repositories(actor_id="ada") as repos:
        project = await repos.get_project_repository().create_project("Secret plan", "x")
        otel.spans.clear()
        await repos.get_task_repository().list_tasks(
            {"project_id": project.id, "title__contains": "needle-value"}
        )
    async with service.get_repositories(actor_id=SYSTEM_ACTOR) as repos:
        await repos.get_audit_repository().get_events(actor_id="ada", limit=5)
    system = service.engine.dialect.name
    (tasks,) = otel.named("SELECT tasks")
    assert tasks.attributes["db.system.name"] == system
    assert tasks.attributes["db.operation.name"] == "SELECT"
    assert tasks.attributes["db.collection.name"] == "tasks"
    (audit,) = otel.named("SELECT events")
    assert audit.attributes["db.collection.name"] == "events"
    assert audit.attributes["tiu.audit.kind"] == "query"
    for span in otel.finished():
        for value in span.attributes.values():
            assert "needle-value" not in str(value), "a parameter value reached a span"
            assert project.id not in str(value)


async def test_reads_outside_the_query_layer_are_database_client_spans_without_values(
    service, otel
):
    await register(service, "ada")
    async with service.get_repositories() as repos:
        started = await repos.get_session_repository().create_session("ada@example.com", PASSWORD)
    async with service.get_repositories(actor_id="ada") as repos:
        project = await repos.get_project_repository().create_project("Plan", "x")
        otel.spans.clear()
        assert (await repos.get_session_repository().validate_session(started.token)).valid
        assert await repos.get_user_repository().user_id_for_email("ada@example.com") == "ada"
        await repos.get_project_repository().get_project_statistics(project.id)
        with pytest.raises(Exception, match="task"):
            await repos.get_task_repository().assign_task("no-such-task", "ada")
    async with service.get_repositories() as repos:
        await repos.get_session_repository().cleanup_expired_sessions()
    system = service.engine.dialect.name
    seen = {}
    for span in otel.finished():
        if span.name.startswith("SELECT "):
            attributes = dict(span.attributes)
            assert attributes["db.system.name"] == system
            assert attributes["db.operation.name"] == "SELECT"
            assert span.name == f"SELECT {attributes['db.collection.name']}"
            kind = attributes.get("tiu.query.kind") or attributes.get("tiu.audit.kind")
            seen.setdefault(attributes["db.collection.name"], set()).add(kind)
    assert {"get_with_user", "expired"} <= seen["sessions"]
    assert "permissions" in seen["user_permissions"]
    assert "list" in seen["user_roles"]
    assert "get" in seen["unique_keys"]
    assert "get" in seen["project_stats"]
    assert {"get", "count"} <= seen["tasks"]
    assert "stream" in seen["events"]
    for span in otel.finished():
        for value in span.attributes.values():
            for secret in (started.token, "ada@example.com", project.id, "no-such-task"):
                assert secret not in str(value), f"a parameter value reached {span.name}"


@pytest.fixture
async def worker_service(engine: AsyncEngine, clock: Clock):
    """Projections left to a worker (none runs until the test drives it)."""
    svc = DatabaseService(
        Settings(database_url=str(engine.url), bcrypt_rounds=4),
        engine=engine,
        hasher=HASHER,
        clock=clock,
        projection_mode="worker",
    )
    await svc.start(migrate=False)
    yield svc
    await svc.store.aclose()


async def test_a_worker_batch_links_back_to_the_commands_whose_events_it_applies(
    worker_service, otel
):
    await register(worker_service, "ada")
    await register(worker_service, "bob")
    commands = otel.named("tiu.command RegisterUser")
    assert len(commands) == 2
    otel.spans.clear()
    tracer = otel.tracer_provider.get_tracer("host")
    with tracer.start_as_current_span("unrelated"):
        await Worker(worker_service.store, worker_service.projectors).catch_up()

    batches = [s for s in otel.finished() if s.name == "tiu.project users"]
    assert batches, [s.name for s in otel.finished()]
    batch = batches[0]
    assert batch.parent is None, "a batch is caused by the log, not by the current span"
    linked = {(link.context.trace_id, link.context.span_id) for link in batch.links}
    for command in commands:
        assert (command.context.trace_id, command.context.span_id) in linked
    attributes = dict(batch.attributes)
    assert attributes["tiu.projector"] == "users"
    assert attributes["tiu.projector.replay"] is False
    assert attributes["tiu.batch.events"] >= 2
    assert attributes["tiu.batch.first_position"] <= attributes["tiu.batch.last_position"]
    assert otel.value("tiu.projector.events", **{"tiu.projector": "users"}) >= 2


async def test_projector_lag_metrics_fall_to_zero_as_the_worker_catches_up(
    worker_service, otel, clock
):
    for n in range(5):
        await register(worker_service, f"user{n}")
    worker = Worker(worker_service.store, worker_service.projectors, batch_size=2)
    await worker.catch_up([p for p in worker.projectors if p.name != "users"])
    users_projector = next(p for p in worker.projectors if p.name == "users")
    seen = []
    while True:
        result = await worker.run_batch(users_projector)
        seen.append(
            (
                otel.value("tiu.projector.lag.events", **{"tiu.projector": "users"}),
                otel.value("tiu.projector.lag.seconds", **{"tiu.projector": "users"}),
            )
        )
        if result.applied == 0:
            break
    lags = [events for events, _ in seen]
    assert lags[0] > 0
    assert lags == sorted(lags, reverse=True) and lags[-1] == 0
    assert all(seconds > 0 for events, seconds in seen if events > 0)
    assert seen[-1][1] == 0


async def test_a_rebuild_reports_its_progress(service, otel):
    from projections import replay

    await register(service, "ada")
    users_projector = next(p for p in service.projectors if p.name == "users")
    report = await replay.rebuild(service.store, users_projector, batch_size=1)
    assert report.applied >= 1
    assert otel.value("tiu.replay.progress", **{"tiu.projector": "users"}) == 1.0
    batches = [s for s in otel.named("tiu.project users") if s.attributes["tiu.projector.replay"]]
    assert batches


async def test_failed_logins_and_lockouts_are_counted(service, otel):
    await register(service, "ada")
    async with service.get_repositories(ip="203.0.113.9") as repos:
        users_repo = repos.get_user_repository()
        for _ in range(6):
            with pytest.raises(Exception):  # InvalidCredentials, then AccountLocked
                await users_repo.authenticate("ada@example.com", "not-the-password-1")
    failed = {p.attributes["tiu.login.reason"]: p.value for p in otel.points("tiu.logins.failed")}
    assert failed["invalid_credentials"] == 5
    assert failed["account_locked"] == 1
    (lockouts,) = otel.points("tiu.lockouts")
    assert lockouts.value == 1


async def test_lock_wait_append_duration_and_pool_gauges_are_reported(service, otel):
    await register(service, "ada")
    system = service.engine.dialect.name
    (lock,) = otel.points("tiu.lock.wait")
    assert lock.attributes["db.system.name"] == system and lock.count >= 1
    assert sum(p.count for p in otel.points("tiu.append.duration")) >= 1
    states = {
        p.attributes["db.client.connection.state"]
        for p in otel.points("db.client.connection.count")
    }
    assert states == {"used", "idle"}


@pytest.mark.postgres
async def test_requests_that_gave_up_waiting_for_the_pool_are_counted(pg_schema, otel):
    from eventstore import EngineOptions, EventStore, NewEvent, PoolExhausted, create_engine
    from tests.conftest import PG_URL

    options = EngineOptions(pool_size=1, max_overflow=0, pool_timeout=0.2, search_path=pg_schema)
    engine = create_engine(PG_URL, options)
    store = EventStore(engine, group_appends=False)  # one checkout per append, no retry
    try:
        holder = await engine.connect()  # the only connection
        for _ in range(2):
            with pytest.raises(PoolExhausted):
                await store.append("pool-x", "pool", [NewEvent("Happened", {})])
        await holder.close()
    finally:
        await store.aclose()
        await engine.dispose()
    (exhausted,) = otel.points("tiu.pool.exhausted")
    assert exhausted.value == 2


async def test_a_store_append_is_an_insert_span_and_records_its_duration(store, otel):
    from eventstore import NewEvent

    await store.append("audit-1", "audit", [NewEvent("Happened", {})])
    (span,) = otel.named("INSERT events")
    system = store.engine.dialect.name
    assert span.attributes["db.system.name"] == system
    assert span.attributes["db.collection.name"] == "events"
    (point,) = otel.points("tiu.append.duration")
    assert point.count == 1 and point.attributes["db.system.name"] == system


async def test_without_a_tracer_a_store_append_still_records_its_duration(store):
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from eventstore import NewEvent, telemetry

    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    telemetry.configure(meter_provider=meter_provider)  # the global tracer: the API's no-op
    try:
        await store.append("audit-1", "audit", [NewEvent("Happened", {})])
        data = reader.get_metrics_data()
    finally:
        telemetry.configure()
        meter_provider.shutdown()
    points = [
        point
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == "tiu.append.duration"
        for point in metric.data.data_points
    ]
    assert [p.count for p in points] == [1]


async def test_without_an_sdk_nothing_records_and_events_carry_no_trace(service):
    await register(service, "ada")
    async with service.engine.connect() as conn:
        records = await service.store.read_all(conn)
    assert records
    assert all("traceparent" not in r.metadata for r in records)


async def test_an_unsampled_command_records_no_span_and_no_traceparent_but_is_counted(service):
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

    from eventstore import telemetry

    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider(sampler=ALWAYS_OFF)
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    telemetry.configure(
        tracer_provider=tracer_provider, meter_provider=meter_provider, stage_spans=True
    )
    try:
        await register(service, "ada")
    finally:
        telemetry.configure()
    assert spans.get_finished_spans() == ()
    async with service.engine.connect() as conn:
        records = await service.store.read_all(conn)
    assert records and all("traceparent" not in r.metadata for r in records)
    counted = [
        point.count
        for resource in reader.get_metrics_data().resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == "tiu.command.duration"
        for point in metric.data.data_points
    ]
    assert counted == [1]


async def test_an_audit_archive_is_a_database_client_span_counting_what_left_the_log(
    service, clock, otel, tmp_path
):
    await register(service, "ada")
    async with service.get_repositories(ip="203.0.113.9") as repos:
        for _ in range(3):
            with pytest.raises(InvalidCredentials):
                await repos.get_user_repository().authenticate("ada@example.com", "wrong-pass-1")
    clock.advance(days=2)
    otel.spans.clear()
    report = await service.archive_audit_log(
        before=clock.now - timedelta(days=1), output=tmp_path / "security.jsonl.gz"
    )
    assert report.count == 2  # the stream keeps its newest event
    (archived,) = otel.named("DELETE events")
    assert archived.attributes["db.system.name"] == service.engine.dialect.name
    assert archived.attributes["db.operation.name"] == "DELETE"
    assert archived.attributes["tiu.audit.kind"] == "archive"
    assert archived.attributes["tiu.archive.category"] == "security"
    assert archived.attributes["tiu.archive.events"] == 2


async def test_a_command_put_back_by_a_spent_group_reports_the_group_that_wrote_it(
    engine: AsyncEngine, clock: Clock, otel
):
    if engine.dialect.name != "sqlite":
        pytest.skip("the group budget bounds SQLite's groups only")
    svc = DatabaseService(
        Settings(database_url=str(engine.url), bcrypt_rounds=4, group_budget=0.0),
        engine=engine,
        hasher=HASHER,
        clock=clock,
    )
    await svc.start(migrate=False)
    try:
        names = ("ada", "bob", "cyd", "dan")
        for name in names:
            await register(svc, name)
        otel.spans.clear()
        held: list[object] = []

        async def hold_the_first(streams: object) -> None:
            if not held:  # the others queue meanwhile, into a group spent at once
                held.append(streams)
                await asyncio.sleep(0.2)

        svc.store.before_commit = hold_the_first
        await asyncio.gather(
            *(svc.dispatcher.dispatch(create_project(f"p-{n}", n), ctx(svc, n)) for n in names)
        )
    finally:
        await svc.store.aclose()
    commands = otel.named("tiu.command CreateProject")
    assert [c.attributes.get("tiu.command.group_size", 1) for c in commands] == [1] * 4
    # Each command's write duration is that of its own transaction only.
    assert len({c.attributes["tiu.duration.commit"] for c in commands}) == 4
    sizes = [
        p for p in otel.points("tiu.group.size") if p.attributes["tiu.group.kind"] == "command"
    ]
    assert sizes[0].max == 1
    assert sizes[0].sum == sizes[0].count
