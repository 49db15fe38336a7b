"""tiu checkpoint / checkpoint export / prove / verify --checkpoint, and the standalone
offline verifier an auditor runs without tiu-core or the database."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tiu.cli import app

from .conftest import Cli, sql

VERIFIER = Path(__file__).resolve().parents[2] / "eventstore" / "offline_verify.py"


@pytest.fixture
def key(cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A signing key in a file named by TIU_CHECKPOINT_KEY_FILE; returns the verifier key."""
    path = tmp_path / "log.key"
    made = cli.runner.invoke(
        app, ["checkpoint", "keygen", "--name", "audit.example/tiu", "--output", str(path)]
    )
    assert made.exit_code == 0, made.output
    assert path.stat().st_mode & 0o077 == 0
    monkeypatch.setenv("TIU_CHECKPOINT_KEY_FILE", str(path))
    return made.stdout.strip()


def offline(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run a copy of the verifier with tiu-core's packages made unimportable."""
    copy = tmp_path / "offline_verify.py"
    copy.write_text(VERIFIER.read_text())
    blocker = (
        "import runpy, sys\n"
        "for name in ('eventstore', 'tiu', 'projections', 'domain', 'sqlalchemy'):\n"
        "    sys.modules[name] = None\n"
        f"sys.argv = {[str(copy), *args]!r}\n"
        f"runpy.run_path({str(copy)!r}, run_name='__main__')\n"
    )
    return subprocess.run(
        [sys.executable, "-I", "-c", blocker], capture_output=True, text=True, check=False,
        cwd=tmp_path,
    )  # fmt: skip


def test_checkpoint_export_prove_and_check_offline(cli: Cli, key: str, tmp_path: Path):
    written = cli("checkpoint", "--json")
    assert written.exit_code == 0, written.output
    size = json.loads(written.stdout)["size"]
    exported = cli("checkpoint", "export")
    assert exported.exit_code == 0
    kept = tmp_path / "kept.note"
    kept.write_text(exported.stdout)
    assert exported.stdout.splitlines()[1] == str(size)
    assert "\n\n\u2014 audit.example/tiu " in exported.stdout

    proof = cli("prove", "3")
    assert proof.exit_code == 0, proof.output
    (tmp_path / "p.json").write_text(proof.stdout)
    checked = offline(tmp_path, "inclusion", "p.json", "--key", key)
    assert checked.returncode == 0, checked.stderr
    assert f"position 3 is in audit.example/tiu at size {size}" in checked.stdout

    # A forged event in the proof, or another key, fails offline.
    document = json.loads(proof.stdout)
    document["event"]["actor_id"] = "mallory"
    (tmp_path / "forged.json").write_text(json.dumps(document))
    assert offline(tmp_path, "inclusion", "forged.json", "--key", key).returncode == 1
    document = json.loads(proof.stdout)
    document["event"]["position"] = 4
    (tmp_path / "moved.json").write_text(json.dumps(document))
    assert offline(tmp_path, "inclusion", "moved.json", "--key", key).returncode == 1

    assert cli("forget", "linus@example.com").exit_code == 0  # appends, changes no hash
    assert cli("checkpoint").exit_code == 0
    consistency = cli("prove", "--since", str(kept))
    assert consistency.exit_code == 0, consistency.output
    (tmp_path / "c.json").write_text(consistency.stdout)
    checked = offline(tmp_path, "consistency", "c.json", "--key", key, "--old", "kept.note")
    assert checked.returncode == 0, checked.stderr
    assert f"extends size {size}" in checked.stdout
    verified = cli("verify", "--checkpoint", str(kept))
    assert verified.exit_code == 0, verified.output
    assert f"against checkpoint size {size}: ok" in verified.stdout


def test_verify_against_a_kept_checkpoint_names_the_first_position_changed(
    cli: Cli, key: str, tmp_path: Path
):
    assert cli("checkpoint").exit_code == 0
    kept = tmp_path / "kept.note"
    kept.write_text(cli("checkpoint", "export").stdout)
    a, b = sql(
        cli,
        "SELECT position FROM events WHERE stream_category = 'task' ORDER BY position LIMIT 2",
    )
    sql(cli, f"UPDATE events SET position = -1 WHERE position = {a[0]}", superuser_bypass=True)
    sql(cli, f"UPDATE events SET position = {a[0]} WHERE position = {b[0]}", superuser_bypass=True)
    sql(cli, f"UPDATE events SET position = {b[0]} WHERE position = -1", superuser_bypass=True)
    result = cli("verify", "--checkpoint", str(kept), "--key", key, "--json")
    assert result.exit_code == 1
    assert json.loads(result.stdout)["first_position"] == a[0]
    assert result.stderr.startswith("error: ")


def test_a_checkpoint_signed_by_another_key_is_refused(cli: Cli, key: str, tmp_path: Path):
    assert cli("checkpoint").exit_code == 0
    kept = tmp_path / "kept.note"
    kept.write_text(cli("checkpoint", "export").stdout)
    other = cli.runner.invoke(
        app,
        ["checkpoint", "keygen", "--name", "audit.example/tiu", "--output", str(tmp_path / "k2")],
    ).stdout.strip()
    result = cli("verify", "--checkpoint", str(kept), "--key", other)
    assert result.exit_code == 1
    assert "checkpoint refused" in result.stderr


def test_prove_signs_a_checkpoint_first_when_the_newest_does_not_cover_the_event(
    cli: Cli, key: str, tmp_path: Path
):
    head = sql(cli, "SELECT max(position) FROM events")[0][0]
    proof = cli("prove", str(head))
    assert proof.exit_code == 0, proof.output
    (tmp_path / "p.json").write_text(proof.stdout)
    assert offline(tmp_path, "inclusion", "p.json", "--key", key).returncode == 0
    assert json.loads(cli("stats", "--json").stdout)["transparency"]["checkpoint_size"] == head


def test_stats_show_how_far_the_tree_is_behind(cli: Cli, key: str):
    before = json.loads(cli("stats", "--json").stdout)["transparency"]
    assert before["tree_size"] <= before["tree_size"] + before["tree_lag"]
    assert cli("checkpoint").exit_code == 0
    after = json.loads(cli("stats", "--json").stdout)["transparency"]
    assert after["tree_lag"] == 0
    assert after["checkpoint_lag"] == 0


def test_checkpoint_without_a_key_says_how_to_set_one(cli: Cli, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("TIU_CHECKPOINT_KEY_FILE", raising=False)
    monkeypatch.delenv("TIU_CHECKPOINT_KEY", raising=False)
    result = cli("checkpoint")
    assert result.exit_code == 1
    assert "TIU_CHECKPOINT_KEY" in result.stderr
