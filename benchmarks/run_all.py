"""`make bench`: every benchmark in turn, each in its own process (so one's threads and memory don't skew the next).

    python benchmarks/run_all.py [--quick] [--only codec train ...]

--quick runs each at toy size: it checks that the benchmarks run (CI does this), not their numbers.
Results land in bench_out/ (tables, JSON, PNG charts); BENCHMARKS.md records the measured numbers and commands.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import BENCH_OUT  # noqa: E402

BENCHES = {
    "codec": ["bench_codec.py", "--json", "{out}/codec.json"],
    "capture": ["bench_capture.py"],
    "train": ["bench_train.py", "--json", "{out}/train.json"],
    "fidelity": ["bench_fidelity.py"],
    "quality": ["bench_quality.py"],
    "targets": ["bench_targets.py"],
    "bytes": ["bench_bytes.py"],
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", nargs="*", choices=sorted(BENCHES), default=None)
    args = ap.parse_args()
    failed = []
    BENCH_OUT.mkdir(parents=True, exist_ok=True)
    for name, cmd in BENCHES.items():
        if args.only and name not in args.only:
            continue
        extra = [a.format(out=BENCH_OUT) for a in cmd[1:]]
        argv = [sys.executable, str(HERE / cmd[0]), *extra, *(["--quick"] if args.quick else [])]
        print(f"\n=== {name}: {' '.join(argv[1:])}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.run(argv, check=False).returncode
        print(f"=== {name}: exit {rc} in {time.perf_counter() - t0:.0f}s", flush=True)
        if rc != 0:
            failed.append(name)
    if failed:
        print(f"benchmarks failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
