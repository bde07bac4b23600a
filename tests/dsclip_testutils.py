"""Shared helpers for dsclip tests: single-process DeepSpeed world, tiny configs, launcher runs."""
import base64
import importlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Optional

import pytest

from dsclip.training.bootstrap import free_port

REPO = Path(__file__).resolve().parents[1]
IN_CI = bool(os.environ.get("CI"))  # .ci/run sets it


def require_data(path: str | Path, package: str) -> None:
    """Skip a test whose Debian data package is missing; under CI fail it instead: .ci/run installs
    every package the tests read, so a missing one there is a broken install, not a reason to skip."""
    if not Path(path).exists():
        _missing(f"{path} is missing: apt-get install {package}")


def require_module(name: str, install: str = "pip install -e '.[dev]'") -> ModuleType:
    """The module `name`, or a skip (outside CI) / failure (under CI) naming how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError:
        _missing(f"module {name} is not installed: {install}")


def _missing(message: str) -> None:
    if IN_CI:
        pytest.fail(f"{message} (.ci/run installs it)", pytrace=False)
    pytest.skip(message)


def init_single_rank() -> None:
    """A one-rank gloo world inside the test process (idempotent)."""
    import torch.distributed as dist

    from dsclip.training.bootstrap import init_distributed
    if dist.is_initialized():
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    init_distributed()  # also releases the /dev/shm names


def make_trainer(cfg, ds: dict[str, Any], resume: Optional[str] = None):
    """A Trainer over the parts of run `cfg`, built as dsclip/train.py builds them."""
    from dsclip.training.components import build_run
    from dsclip.training.loop import Trainer
    return Trainer(build_run(cfg, ds, resume))


def ds_config(stage: int, tmp_path: Path) -> Path:
    """The shipped config for `stage`, with every parameter partitioned so ZeRO-3 bugs show."""
    config = json.loads((REPO / "ds_configs" / f"zero{stage}.json").read_text())
    if stage == 3:
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = tmp_path / f"zero{stage}.json"
    staged = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
    staged.write_text(json.dumps(config))
    staged.replace(path)  # atomic: a run started meanwhile (tests/faults runs two at a time) reads a whole file
    return path


DIST_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def subprocess_env(**extra: str) -> dict[str, str]:
    """This environment without the in-process test world's rendezvous, so a child starts its own."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARIABLES}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def node_launcher(nproc: int = 2) -> list[str]:
    """DeepSpeed's per-node launcher for `nproc` local ranks, the command `deepspeed --num_gpus N`
    runs for a one-node job, called directly: the `deepspeed` command in front of it costs an
    interpreter start-up (5 s here). What it changes on one node is only how a signal sent to it
    alone is handled, which tests/test_signals.py tests through `runner_launcher`."""
    world = base64.urlsafe_b64encode(json.dumps({"localhost": list(range(nproc))}).encode()).decode()
    return [sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={world}",
            "--master_addr=127.0.0.1", f"--master_port={free_port()}"]


def runner_launcher(nproc: int = 2) -> list[str]:
    """The `deepspeed --num_gpus N` command users run."""
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc), "--master_port",
            str(free_port())]


def launch(args: list[str], nproc: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run dsclip/train.py under the DeepSpeed launcher with `nproc` CPU ranks."""
    cmd = [*node_launcher(nproc), str(REPO / "dsclip" / "train.py"), *args]
    return subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _rank_entry(rank: int, worker: Callable[[int], dict], world: int, port: int, out_dir: str) -> None:
    import torch

    from dsclip.training.bootstrap import end_process_group, init_distributed
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    init_distributed()  # also releases the /dev/shm names
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(worker(rank)))
    end_process_group()  # before interpreter shutdown, which gloo's pending work can abort


def run_on_ranks(worker: Callable[[int], dict], world: int, out_dir: Path) -> list[dict]:
    """`worker(rank)` on `world` spawned CPU ranks joined in dsclip's process group (one thread
    each); returns what each rank's worker returned (JSON-able), in rank order."""
    import torch.multiprocessing as mp
    mp.spawn(_rank_entry, args=(worker, world, free_port(), str(out_dir)), nprocs=world, join=True)
    return [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(world)]
