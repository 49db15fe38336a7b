"""``tiu worker --metrics-port``: Prometheus text over a real socket, and JSON log lines."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from .conftest import Cli, sql
from .test_cli_basics import SCRIPT

CAUGHT_UP = re.compile(
    r'^tiu_projector_lag_events\{[^}]*tiu_projector="user_activity"[^}]*\} 0(\.0)?$', re.M
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        return response.read().decode()


@pytest.mark.sqlite
def test_worker_serves_prometheus_metrics_and_logs_json_lines(sqlite_db: Path):
    url = f"sqlite+aiosqlite:///{sqlite_db}"
    cli = Cli(["--database-url", url])
    sql(cli, "DELETE FROM user_activity")
    sql(cli, "UPDATE projection_checkpoints SET position = 0 WHERE name = 'user_activity'")
    port = free_port()
    proc = subprocess.Popen(
        [
            str(SCRIPT),
            "worker",
            "user_activity",
            "--batch-size",
            "3",
            "--poll-interval",
            "0.1",
            "--log-interval",
            "0.2",
            "--metrics-port",
            str(port),
            "--log-json",
            "--database-url",
            url,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    text = ""
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                text = scrape(port)
            except OSError:
                time.sleep(0.1)
                continue
            if CAUGHT_UP.search(text):
                break
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    assert "# TYPE tiu_projector_lag_events gauge" in text, text[:2000]
    assert CAUGHT_UP.search(text)
    assert "tiu_projector_events_total" in text
    assert "tiu_projector_batch_duration_seconds_bucket" in text
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    assert {"time", "level", "logger", "message"} <= set(lines[0])
    assert any(line["message"].startswith("worker started") for line in lines)


@pytest.mark.sqlite
def test_worker_refuses_a_metrics_port_it_cannot_bind(sqlite_db: Path):
    url = f"sqlite+aiosqlite:///{sqlite_db}"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [str(SCRIPT), "worker", "--metrics-port", str(port), "--database-url", url],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, "COLUMNS": "200"},
            check=False,
        )
    assert done.returncode == 1
    assert f"error: cannot serve metrics on port {port}" in done.stdout + done.stderr
