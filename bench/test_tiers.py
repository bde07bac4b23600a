"""Time the three test tiers as CI runs them (.ci/run), one after the other, in this checkout.

    python bench/test_tiers.py                       # writes bench/results/test_tiers.json

Each tier is one pytest process; the JSON holds its command, wall seconds, exit status and
pytest's summary counts, with the date, CPU count and load average. README's Tests section renders
its sentence from this file (bench/doc_tables.py). Exits non-zero when a tier fails.
"""
import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TIERS = {  # as .ci/run and README's Tests table run them
    "quick": [],
    "multiprocess": ["-m", "multiprocess and not slow and not gpu"],
    "slow": ["-m", "slow and not gpu"],
}
COUNTS = re.compile(r"(\d+) (passed|failed|skipped|deselected|errors?)")


def run_tier(marker_args: list[str]) -> dict:
    command = [sys.executable, "-m", "pytest", "-q", *marker_args]
    began = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - began
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    counts = {kind.rstrip("s") if kind.startswith("error") else kind: int(n) for n, kind in COUNTS.findall(summary)}
    if result.returncode:
        sys.stdout.write(result.stdout[-5000:])
    return {"command": " ".join(["pytest", "-q", *(f'"{a}"' if " " in a else a for a in marker_args)]),
            "wall_s": round(seconds, 1), "returncode": result.returncode, "counts": counts, "summary": summary}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiers", nargs="+", choices=list(TIERS), default=list(TIERS))
    parser.add_argument("--json", default=str(REPO / "bench" / "results" / "test_tiers.json"))
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    report = {"date": datetime.date.today().isoformat(), "commit": commit, "cpus": os.cpu_count(),
              "load_before": os.getloadavg()[0], "ci": bool(os.environ.get("CI")), "tiers": {}}
    for tier in args.tiers:
        report["tiers"][tier] = row = run_tier(TIERS[tier])
        print(f"{tier:>12}  {row['wall_s'] / 60:5.1f} min  {row['summary']}", flush=True)
    report["load_after"] = os.getloadavg()[0]
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")
    return int(any(row["returncode"] for row in report["tiers"].values()))


if __name__ == "__main__":
    sys.exit(main())
