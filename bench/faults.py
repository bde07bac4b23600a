"""Run the fault-injection suite (tests/faults/) once and record what each case measured.

    python bench/faults.py              # writes bench/results/faults.json

One pytest process over `tests/faults -m multiprocess`; each case adds a row (the fault, what
must hold, what happened, seconds) through the suite's `record` fixture. README's "Reliability"
table renders from the JSON (bench/doc_tables.py). Exits non-zero when a case fails.
"""
import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=str(REPO / "bench" / "results" / "faults.json"))
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        rows_file = Path(tmp) / "rows.json"
        began = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "multiprocess", "tests/faults"], cwd=REPO,
                                env={**os.environ, "DSCLIP_FAULT_REPORT": str(rows_file)}, capture_output=True,
                                text=True)
        seconds = time.perf_counter() - began
        rows = json.loads(rows_file.read_text())["rows"] if rows_file.is_file() else []
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    if result.returncode:
        sys.stdout.write(result.stdout[-5000:])
    for row in rows:
        print(f"{row['seconds']:6.1f} s  {row['fault'][:60]:<60}  {row['result']}")
    report = {"date": datetime.date.today().isoformat(), "commit": commit, "cpus": os.cpu_count(),
              "wall_s": round(seconds, 1), "returncode": result.returncode, "summary": summary, "rows": rows}
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(f"{summary} in {seconds / 60:.1f} min; wrote {args.json}")
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
