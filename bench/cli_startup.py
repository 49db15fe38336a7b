"""How long ``tiu`` takes to print its help: the whole process, interpreter start included.

Each command runs ``--runs`` times in a fresh process (after one untimed warm-up run, so
the page cache holds the files); the table shows the median, min and max wall time.
Target (issue #20): ``tiu --help`` within 0.3 s.

    python -m bench.cli_startup              # median of 10
    python -m bench.cli_startup --runs 30
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

TIU = str(Path(sys.executable).with_name("tiu"))
COMMANDS: dict[str, list[str]] = {
    "tiu --help": [TIU, "--help"],
    "tiu replay --help": [TIU, "replay", "--help"],
    "tiu audit --help": [TIU, "audit", "--help"],
    "python -c 'import tiu'": [sys.executable, "-c", "import tiu"],
    "python -c 'pass' (floor)": [sys.executable, "-c", "pass"],
}


def timed(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    print(f"{'command':<28} {'median':>8} {'min':>8} {'max':>8}  (seconds, {args.runs} runs)")
    for label, argv in COMMANDS.items():
        timed(argv)
        times = [timed(argv) for _ in range(args.runs)]
        print(f"{label:<28} {statistics.median(times):8.3f} {min(times):8.3f} {max(times):8.3f}")


if __name__ == "__main__":
    main()
