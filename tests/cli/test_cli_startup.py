"""`tiu --help` starts without the service stack (issue #20): what is imported, not how
long it takes (bench/cli_startup.py times it)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

import tiu
from projections.replay import DEFAULT_BATCH_SIZE
from tiu.cli import app

#: What the help must not import: the database stack, settings, telemetry, messaging.
#: (Not pydantic: typer itself imports it to parse some options, `replay --help` among them.)
HEAVY = (
    "sqlalchemy",
    "asyncpg",
    "aiosqlite",
    "alembic",
    "pydantic_settings",
    "opentelemetry",
    "nats",
    "redis",
    "bcrypt",
    "cryptography",
    "rich.progress",
    "domain",
    "eventstore",
    "projections",
    "migrations",
    "tiu.service",
    "tiu.settings",
)


def _imported_after(code: str, names: tuple[str, ...] = HEAVY) -> set[str]:
    """Which of ``names`` a fresh interpreter holds after running ``code``."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    loaded = set(json.loads(done.stdout.splitlines()[-1]))
    return {name for name in names if name in loaded}


def test_importing_tiu_imports_none_of_the_service_stack():
    assert _imported_after("import tiu", (*HEAVY, "pydantic")) == set()


def test_importing_the_cli_imports_none_of_the_service_stack():
    assert _imported_after("import tiu.cli", (*HEAVY, "pydantic")) == set()


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["replay", "--help"], ["audit", "--help"], ["checkpoint", "keygen", "--help"]],
    ids=" ".join,
)
def test_help_prints_without_importing_the_service_stack(argv):
    code = (
        "import contextlib, io, sys\n"
        "from tiu.cli import app\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        f"    app({argv!r}, prog_name='tiu')\n"
    )
    assert _imported_after(code) == set()


def test_the_probe_sees_what_a_command_imports():
    # The control: the same probe run through a real command finds the stack loaded.
    code = (
        "import contextlib, io, sys\n"
        "from tiu.cli import app\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "    app(['health', '--database-url', 'sqlite+aiosqlite:///no/such/dir/x.db'])\n"
    )
    assert {"sqlalchemy", "pydantic_settings", "tiu.settings"} <= _imported_after(code)


def test_a_lazily_exported_name_is_the_defining_modules_own():
    from tiu.service import DatabaseService

    assert tiu.DatabaseService is DatabaseService
    assert tiu.__version__ == tiu.__getattr__("__version__")
    with pytest.raises(AttributeError, match="no_such_name"):
        _ = tiu.no_such_name


def test_replay_defaults_to_the_replay_modules_batch_size():
    # The CLI spells the default out (importing projections.replay for it would load the
    # whole stack at start-up); this keeps the two equal.
    result = CliRunner().invoke(app, ["replay", "--help"], env={"COLUMNS": "200"})
    assert f"[default: {DEFAULT_BATCH_SIZE}]" in result.output
