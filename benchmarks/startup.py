"""How quickly `hirescam` answers what needs no model: help, version, usage errors, a locked OUT, a report.

    python benchmarks/startup.py [--runs 5] [--images 2000]

Each command runs as a user runs it (`python -m hirescam_cli ...`, a new process: imports included);
prints the median wall time and the largest peak memory (RSS of the process and what it waited for)
over `--runs` runs, against the goals of issue 14: help, version and usage errors <= 0.5 s; a run into
a locked OUT refused (exit 4) <= 1 s; `report` on an unchanged run of `--images` inputs <= 1.5 s and
<= 250 MB.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from report import base_run, synthetic_out  # the report benchmark's synthetic run

ROOT = Path(__file__).resolve().parent.parent


def measure(args: list[object], runs: int, expect: int) -> tuple[float, float]:
    """Median wall seconds and largest peak RSS (MB) of `python -m hirescam_cli ARGS` over `runs` runs."""
    walls, peaks = [], []
    for _ in range(runs):
        start = time.perf_counter()
        process = subprocess.Popen(
            [sys.executable, "-m", "hirescam_cli", *map(str, args)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _, status, usage = os.wait4(process.pid, 0)
        walls.append(time.perf_counter() - start)
        peaks.append(usage.ru_maxrss / 1024)
        code = os.waitstatus_to_exitcode(status)
        if code != expect:
            raise SystemExit(f"hirescam {' '.join(map(str, args))} exited {code}, expected {expect}")
    return statistics.median(walls), max(peaks)


def hold_lock(out: Path) -> subprocess.Popen:
    """A process holding OUT's lock, as a long run would, until it is killed."""
    code = (
        "import sys, time; from hirescam_cli.lock import OutLock; "
        "OutLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(3600)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--images", type=int, default=2000)
    args = parser.parse_args()
    samples = ROOT / "sample_images"
    with tempfile.TemporaryDirectory() as temp:
        work = Path(temp)
        report_out = synthetic_out(base_run(work, 0), work, args.images)
        measure(["report", report_out], 1, 0)  # thumbnails made once; the runs below change nothing
        locked = work / "locked"
        holder = hold_lock(locked)
        try:
            rows = [
                ("hirescam --help", ["--help"], 0, 0.5, None),
                ("hirescam --version", ["--version"], 0, 0.5, None),
                (
                    "usage error (unknown flag)",
                    ["explain", samples, "-o", work / "x", "--bogus"],
                    2,
                    0.5,
                    None,
                ),
                (
                    "config error (--top-k 0)",
                    ["explain", samples, "-o", work / "x", "--top-k", "0"],
                    2,
                    0.5,
                    None,
                ),
                ("run into a locked OUT (exit 4)", ["explain", samples, "-o", locked], 4, 1.0, None),
                (f"report, {args.images} inputs, unchanged", ["report", report_out], 0, 1.5, 250),
            ]
            print(
                f"{'command':40s} {'wall s':>7s} {'goal':>6s} {'peak MB':>8s} {'goal':>6s} ({args.runs} runs)"
            )
            for name, command, expect, wall_goal, memory_goal in rows:
                wall, peak = measure(command, args.runs, expect)
                memory = f"{memory_goal:6d}" if memory_goal else "     -"
                print(f"{name:40s} {wall:7.3f} {wall_goal:6.1f} {peak:8.1f} {memory}")
        finally:
            holder.kill()
            holder.wait()


if __name__ == "__main__":
    main()
