"""The fault-injection suite: each case a real run (or command) in its own processes on CPU. A
case records what it measured with the `record` fixture; with DSCLIP_FAULT_REPORT=FILE set
(bench/faults.py sets it) the rows are written there as JSON when the session ends, for the
README's "Reliability" table."""
import json
import os
from pathlib import Path

import pytest

ROWS: list[dict] = []


@pytest.fixture
def record(request):
    """record(fault, expected, result, **measured): one row of the reliability table."""
    def add(fault: str, expected: str, result: str, **measured) -> None:
        ROWS.append({"test": request.node.name, "fault": fault, "expected": expected, "result": result, **measured})
    return add


def pytest_sessionfinish(session, exitstatus):
    target = os.environ.get("DSCLIP_FAULT_REPORT")
    if target and ROWS:
        Path(target).write_text(json.dumps({"rows": ROWS, "exitstatus": int(exitstatus)}, indent=1))
