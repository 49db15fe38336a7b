"""The library without the otel extra, and the JSON log lines."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

from eventstore import telemetry

ROOT = Path(__file__).resolve().parents[2]

# Runs in a fresh interpreter where importing opentelemetry fails, as it does when
# the extra is not installed.
WITHOUT_OTEL = textwrap.dedent(
    """
    import asyncio, sys

    class NoOtel:
        def find_spec(self, name, path=None, target=None):
            if name == "opentelemetry" or name.startswith("opentelemetry."):
                raise ImportError(f"no module named {name!r}")
            return None

    sys.meta_path.insert(0, NoOtel())

    from eventstore import telemetry
    from tiu import create_database_service

    async def main():
        service = await create_database_service(sys.argv[1], bcrypt_rounds=4)
        async with service:
            async with service.get_repositories() as repos:
                user = await repos.get_user_repository().create_user(
                    email="ada@example.com", username="ada", password="analytical-engine-1843"
                )
            async with service.get_repositories(actor_id=user.id) as repos:
                project = await repos.get_project_repository().create_project("Engine")
                tasks = await repos.get_task_repository().list_tasks({"project_id": project.id})
        loaded = [m for m in sys.modules if m.startswith("opentelemetry")]
        print(telemetry.ENABLED, len(tasks), loaded)

    asyncio.run(main())
    """
)


def test_the_library_imports_and_runs_without_opentelemetry(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_OTEL, f"sqlite+aiosqlite:///{tmp_path / 'plain.db'}"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "0", "[]"]


def test_json_log_lines_carry_trace_and_correlation_ids(otel):
    tracer = otel.tracer_provider.get_tracer("host")
    formatter = telemetry.JsonFormatter()
    record = logging.LogRecord(
        "tiu.dispatch", logging.WARNING, __file__, 1, "hello %s", ("x",), None
    )
    token = telemetry.correlation_id.set("corr-42")
    try:
        with tracer.start_as_current_span("request") as span:
            line = json.loads(formatter.format(record))
    finally:
        telemetry.correlation_id.reset(token)
    context = span.get_span_context()
    assert line["message"] == "hello x"
    assert line["level"] == "WARNING"
    assert line["logger"] == "tiu.dispatch"
    assert line["trace_id"] == f"{context.trace_id:032x}"
    assert line["span_id"] == f"{context.span_id:016x}"
    assert line["correlation_id"] == "corr-42"
    outside = json.loads(formatter.format(record))
    assert "trace_id" not in outside and "correlation_id" not in outside
