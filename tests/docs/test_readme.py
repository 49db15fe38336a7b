"""Every Python block in the README runs as written (on a temporary SQLite file)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def python_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def test_the_readme_has_python_examples():
    assert python_blocks()


def test_every_readme_python_example_runs(tmp_path):
    for block in python_blocks():
        script = tmp_path / "example.py"
        script.write_text(block)
        done = subprocess.run(
            [sys.executable, str(script)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
            check=False,
        )
        assert done.returncode == 0, done.stderr
        if "refused, and the attempt is in the audit trail" in block:
            assert "refused, and the attempt is in the audit trail" in done.stdout
