"""Stop signals and crashes under the DeepSpeed launcher (2 CPU ranks): a SIGUSR1 to one rank, a
SIGTERM to the `deepspeed` command alone and to the job's process group, a rank SIGKILLed in the
middle of a save."""
import ctypes
import os
import signal
import time
from contextlib import contextmanager

import psutil
import pytest
import torch

from dsclip.model.run_folder import is_complete, read_pointer, tag_step
from dsclip_testutils import ds_config, launch, read_metrics
from test_checkpoint import RUN, losses_by_step, start_launcher, wait_for

pytestmark = pytest.mark.multiprocess


def rank_processes(proc, world: int = 2, timeout: float = 240) -> dict[int, psutil.Process]:
    """The launcher's rank processes by local rank (its descendants started with --local_rank=N)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ranks = {}
        for child in psutil.Process(proc.pid).children(recursive=True):
            try:
                ranks.update((int(arg.split("=")[1]), child) for arg in child.cmdline() if arg.startswith("--local_rank="))
            except psutil.NoSuchProcess:
                pass
        if len(ranks) == world:
            return ranks
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.05)
    raise AssertionError("the launcher started no ranks")


@contextmanager
def launcher(out, tmp_path, *extra: str, via_runner: bool = False):
    """start_launcher's run; whatever is left of its process group is SIGKILLed at the end."""
    proc = start_launcher(out, tmp_path, *extra, via_runner=via_runner)
    try:
        yield proc
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the group outlives its leader
        except ProcessLookupError:
            pass
        proc.wait()
        proc.stdout.close()


def exited(process: psutil.Process) -> bool:
    try:
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def logged_step(run_dir) -> int:
    return max(losses_by_step(run_dir), default=0) if (run_dir / "metrics.jsonl").is_file() else 0


def resume(out, tmp_path, *extra: str):
    result = launch(["--deepspeed_config", str(ds_config(3, tmp_path)), "--output-dir", str(out), *RUN, *extra,
                     "--resume", "latest"])
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_sigusr1_to_one_rank_stops_every_rank_at_the_same_step_and_resume_continues(tmp_path):
    """SLURM's early warning may reach one process only: rank 1 gets it, rank 0 (which writes
    COMPLETE and `latest`) learns it from the per-step all-reduce; both save the same step."""
    out, run_dir = tmp_path / "warned", tmp_path / "warned" / "default"
    steps = ("--set", "train.max_steps=20")
    with launcher(out, tmp_path, *steps) as proc:
        ranks = rank_processes(proc)
        wait_for(lambda: logged_step(run_dir) >= 3, proc)
        os.kill(ranks[1].pid, signal.SIGUSR1)
        output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output[-3000:]  # every rank exited 0, so the launcher did
    assert all(exited(rank) for rank in ranks.values())
    assert output.count("stop signal: saved step") == 1, output[-3000:]  # rank 0 logs it
    tag = read_pointer(run_dir / "checkpoints" / "latest")
    stopped_at = int(tag.split("-")[1])
    assert 3 <= stopped_at < 20 and logged_step(run_dir) == stopped_at
    folder = run_dir / "checkpoints" / tag
    assert is_complete(folder) and f"saved step {stopped_at};" in output
    states = [torch.load(folder / f"rank-{rank}.pt", weights_only=False) for rank in (0, 1)]
    assert states[0]["data"] == states[1]["data"] and states[0]["epoch"] == states[1]["epoch"]  # the same step
    for rank in (0, 1):
        assert (folder / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").is_file()
    result = resume(out, tmp_path, *steps)
    assert f"resumed step-{stopped_at}" in result.stdout
    assert sorted(losses_by_step(run_dir)) == list(range(1, 21))
    assert read_pointer(run_dir / "checkpoints" / "latest") == "step-20"


PR_SET_CHILD_SUBREAPER = 36


def test_sigterm_under_the_deepspeed_launcher_saves_but_the_launcher_exits_non_zero(tmp_path):
    """Who gets a SIGTERM under `deepspeed` (deepspeed.launcher.runner -> deepspeed.launcher.launch
    -> ranks), DeepSpeed 0.19.8, one node:
    - the `deepspeed` command installs no SIGTERM handler (it forwards signals only for multi-node
      pdsh runs): a SIGTERM to it alone kills it at once, status -SIGTERM (143 in a shell), and
      reaches no rank: they train on, unsaved. (The docs' "a SIGTERM sent to the launcher is
      forwarded to the ranks" holds for deepspeed.launcher.launch, not for the command users run.)
    - a SIGTERM to the job's process group (what a scheduler does on preemption) reaches the
      ranks directly, and deepspeed.launcher.launch forwards it once more, waits up to 30 s for the
      ranks (then SIGKILLs the rest: terminate_process_tree) and exits 1, whatever their status;
    - the ranks finish their step, save it together and exit 0 (test_checkpoint.py checks a rank's
      status alone), well inside those 30 s here.
    So the launcher's status cannot tell a clean preemption from a failure, and `deepspeed` itself
    returns before the save is done: the checkpoint's COMPLETE marker and `latest` say what was
    saved. One run covers both signals: the command's own death is the same either way."""
    out, run_dir = tmp_path / "preempted", tmp_path / "preempted" / "default"
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0  # the orphaned launch.py becomes our child
    try:
        with launcher(out, tmp_path, "--set", "train.max_steps=100000", via_runner=True) as proc:
            ranks = rank_processes(proc)
            node_launcher = psutil.Process(ranks[0].ppid())
            assert "deepspeed.launcher.launch" in node_launcher.cmdline()
            wait_for(lambda: logged_step(run_dir) >= 3, proc)
            proc.send_signal(signal.SIGTERM)  # the `deepspeed` command alone
            assert proc.wait(timeout=30) == -signal.SIGTERM
            at_signal, deadline = logged_step(run_dir), time.monotonic() + 120
            while logged_step(run_dir) < at_signal + 3 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert logged_step(run_dir) >= at_signal + 3, "the ranks train on"
            assert not any(exited(rank) for rank in ranks.values())
            sent = time.monotonic()
            os.killpg(proc.pid, signal.SIGTERM)  # the rest of the job: launch.py and the ranks
            _, status = os.waitpid(node_launcher.pid, 0)
            gone = time.monotonic() - sent
            output = proc.stdout.read()
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
    assert os.waitstatus_to_exitcode(status) == 1
    assert all(exited(rank) for rank in ranks.values())
    assert gone < 30, "the ranks left on their own, before launch.py's 30 s grace ran out"
    assert output.count("stop signal: saved step") == 1, output[-3000:]
    stopped_at = int(read_pointer(run_dir / "checkpoints" / "latest").split("-")[1])
    assert stopped_at >= at_signal + 3 and is_complete(run_dir / "checkpoints" / f"step-{stopped_at}")


def test_a_rank_sigkilled_mid_save_leaves_latest_on_the_previous_checkpoint_and_resume_works(tmp_path):
    """A real crash inside CheckpointManager.save, timed from outside: rank 1 is SIGKILLed once
    step-N exists but before rank 1 has written its train state there (rank-1.pt, written after
    DeepSpeed's files and before the barrier that rank 0's COMPLETE waits for), so COMPLETE can
    never be written. A save takes ~0.1-1 s here and the folder is polled in a tight loop; if the
    kill lands after rank-1.pt appears anyway, the run is repeated (at most 3 times)."""
    for attempt in range(3):
        out = tmp_path / f"crashed-{attempt}"
        caught = crash_mid_save(out, tmp_path)
        if caught is not None:
            break
    else:
        pytest.fail("3 runs: the kill never landed inside a save")
    run_dir, (step, previous) = out / "default", caught
    checkpoints = run_dir / "checkpoints"
    assert read_pointer(checkpoints / "latest") == f"step-{previous}"
    assert (checkpoints / f"step-{step}").is_dir() and not is_complete(checkpoints / f"step-{step}")
    before_crash = {}
    for record in read_metrics(run_dir):  # the first loss logged for each step, as the crashed run had it
        if "train/loss" in record:
            before_crash.setdefault(record["step"], record["train/loss"])
    result = resume(out, tmp_path, "--set", "train.max_steps=16")
    assert f"resumed step-{previous}" in result.stdout
    resumed = losses_by_step(run_dir)
    assert sorted(resumed) == list(range(1, 17)) and read_pointer(checkpoints / "latest") == "step-16"
    # step-N was saved again, then pruned with the rest (keep_last=2)
    assert sorted(f.name for f in checkpoints.glob("step-*")) == ["step-15", "step-16"]
    for s in range(previous + 1, step + 1):  # the steps between the last complete save and the crash, again
        assert abs(resumed[s] - before_crash[s]) <= 1e-6, (s, resumed[s], before_crash[s])


def crash_mid_save(out, tmp_path) -> tuple[int, int] | None:
    """Run to 16 steps (saves at 4, 8, 12 and at the epoch ends 5, 10, 15), SIGKILL rank 1 inside a
    save after the first two; (that step, the newest complete step before it), or None when the
    kill came too late to be sure COMPLETE cannot be written."""
    checkpoints = out / "default" / "checkpoints"
    with launcher(out, tmp_path, "--set", "train.max_steps=16") as proc:
        ranks = rank_processes(proc)
        deadline = time.monotonic() + 300
        caught = None
        while caught is None:
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before a save was caught"
            for step in (8, 10, 12):
                folder = checkpoints / f"step-{step}"
                if folder.is_dir() and not (folder / "rank-1.pt").exists():
                    ranks[1].kill()
                    caught = step
                    break
            time.sleep(0.002)
        ranks[1].wait(timeout=10)
        if (checkpoints / f"step-{caught}" / "rank-1.pt").exists():
            return None  # rank 1 got past its train state before the kill
        proc.communicate(timeout=120)  # launch.py sees rank 1's -9 and terminates rank 0
        assert proc.returncode != 0
    complete = [tag_step(f.name) for f in checkpoints.glob("step-*") if is_complete(f)]
    return caught, max(s for s in complete if s < caught)
