"""Helpers of the fault suite: dsclip commands in fresh processes, a tiny run to damage, and the
tools of a hostile user (a pickle that creates a file, a re-sealed manifest)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import torch

from dsclip_testutils import REPO, ds_config, node_launcher, subprocess_env

TINY = ["--set", "optim.warmup_steps=1", "--set", "data.batch_size=8", "--set", "data.synthetic.train_samples=40",
        "--set", "eval.at_start=false", "--set", "eval.at_end=false", "--set", "logging.log_every=1"]


class Finished:
    def __init__(self, proc: subprocess.CompletedProcess, seconds: float):
        self.returncode, self.stdout, self.stderr, self.seconds = proc.returncode, proc.stdout, proc.stderr, seconds

    def error_line(self, case: str = "") -> str:
        """The one `dsclip: error:` line of stderr (asserting there is exactly one, and no traceback)."""
        lines = [line for line in self.stderr.splitlines() if line.startswith("dsclip: error:")]
        assert len(lines) == 1 and "Traceback" not in self.stderr, (case, self.stderr[-3000:])
        return lines[0]


INJECT = Path(__file__).parent / "inject"


def dsclip(*args: str, fault: str = "", timeout: float = 300) -> Finished:
    """`dsclip ARGS` (a command, or `train` for dsclip/train.py) in one fresh process, with the
    injected `fault` (inject/sitecustomize.py) if one is named."""
    command = [str(REPO / "dsclip" / "train.py"), *args[1:]] if args[0] == "train" else ["-m", "dsclip.cli", *args]
    env = subprocess_env(**({"DSCLIP_FAULT": fault, "PYTHONPATH": str(INJECT)} if fault else {}))
    start = time.monotonic()
    proc = subprocess.run([sys.executable, *command], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    return Finished(proc, time.monotonic() - start)


def together(*commands: Callable[[], Finished]) -> list[Finished]:
    """Run independent single-process `commands` two at a time, their results in order: each is
    mostly one interpreter's start-up on one core, and CI has two."""
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda command: command(), commands))


def train(out: Path, *extra: str, fault: str = "", timeout: float = 300) -> Finished:
    """A tiny single-process run under ZeRO-3 into `out`/default."""
    return dsclip("train", "--deepspeed_config", str(ds_config(3, out.parent)), "--output-dir", str(out), *TINY,
                  *extra, fault=fault, timeout=timeout)


def start_ranks(out: Path, *args: str, fault: str = "", ranks: int = 2) -> subprocess.Popen:
    """dsclip/train.py under the DeepSpeed launcher with `ranks` CPU ranks into `out`/default, in
    its own process group (output merged into proc.stdout)."""
    env = subprocess_env(**({"DSCLIP_FAULT": fault, "PYTHONPATH": str(INJECT)} if fault else {}))
    command = [*node_launcher(ranks), str(REPO / "dsclip" / "train.py"), "--deepspeed_config",
               str(ds_config(3, out.parent)), "--output-dir", str(out), *args]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def ended_within(proc: subprocess.Popen, timeout: float) -> tuple[float, str]:
    """(seconds until the whole process group is gone, its output); fails after `timeout`."""
    start = time.monotonic()
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"still running {timeout:.0f} s later: {proc.stdout.read()[-3000:]}") from None
    while time.monotonic() - start < timeout:  # the launcher may go before its ranks
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return time.monotonic() - start, output
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError(f"processes of the run were still alive {timeout:.0f} s later")


def wait_until(condition, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early: {proc.stdout.read()[-3000:]}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.01)


def metrics_lines(run_dir: Path) -> list[str]:
    return (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").is_file() else []


def logged_steps(run_dir: Path, since: int = 0) -> dict[int, float]:
    """Per-step loss from metrics.jsonl lines `since` on (a step logged twice keeps its last value)."""
    steps = {}
    for line in metrics_lines(run_dir)[since:]:
        try:
            record = json.loads(line)
        except ValueError:  # the line being written right now
            continue
        if "train/loss" in record:
            steps[record["step"]] = record["train/loss"]
    return steps


def copy_run(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


class CreatesFile:
    """Unpickling this calls open(path, 'w'): the file appears only if the pickle was executed."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def plant(file: Path, sentinel: Path) -> None:
    """Rewrite a checkpoint file with the payload beside its content, and re-seal COMPLETE's
    manifest as a hostile uploader would (so the sha256 check passes and the unpickler is tested)."""
    content = torch.load(file, weights_only=False)
    torch.save({**content, "payload": CreatesFile(sentinel)} if isinstance(content, dict) else CreatesFile(sentinel),
               file)
    reseal(file)


def reseal(file: Path) -> None:
    from dsclip.model.safe_files import sha256_of
    marker = file.parent / "COMPLETE"
    record = json.loads(marker.read_text())
    record["files"][file.name] = sha256_of(file)
    marker.write_text(json.dumps(record))
