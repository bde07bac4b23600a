"""Fault cases of a running multi-rank job (2 CPU ranks under the DeepSpeed launcher, or two
simulated nodes): a rank or a node killed, a crash inside each phase of a save, a stop signal
during an evaluation, unequal batches, a failing data-loader worker, a shard that fails once, a
temperature at its cap, credentials in a data URL. Each measures how long the processes took to
end and whether the resumed run matches an uninterrupted one."""
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch

from dsclip.model.run_folder import is_complete, read_pointer
from dsclip_testutils import REPO, ds_config, free_port, launch, read_metrics
from faultlib import TINY, ended_within, logged_steps, metrics_lines, start_ranks, train, wait_until
from generated_data import write_pairs_csv, write_shards
from test_multinode import script_env, two_node_hostfile
from test_signals import rank_processes

pytestmark = pytest.mark.multiprocess

# 2 ranks x 8, 80 samples: 5 steps an epoch; saves at 4, 5 (epoch end), 8, 10, 12.
RUN = [*TINY, "--set", "data.synthetic.train_samples=80", "--set", "train.max_steps=12", "--set", "train.save_every=4",
       "--set", "train.export=false"]
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> dict[int, float]:
    """The uninterrupted run's loss per step."""
    out = tmp_path_factory.mktemp("straight") / "out"
    result = launch(["--deepspeed_config", str(ds_config(3, out.parent)), "--output-dir", str(out), *RUN])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return logged_steps(out / "default")


def losses_match(losses: dict[int, float], straight: dict[int, float], steps: range) -> None:
    for step in steps:
        assert abs(losses[step] - straight[step]) <= TOLERANCE, (step, losses[step], straight[step])


def resume_matches(out: Path, straight: dict[int, float]) -> tuple[int, str]:
    """Resume `out` from latest to the end; asserts every later step's loss matches; returns the
    step it resumed and its output."""
    resumed_from = int(read_pointer(out / "default" / "checkpoints" / "latest").split("-")[1])
    result = launch(["--deepspeed_config", str(ds_config(3, out.parent)), "--output-dir", str(out), *RUN,
                     "--resume", "latest"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    losses_match(logged_steps(out / "default"), straight, range(resumed_from + 1, 13))
    return resumed_from, result.stdout + result.stderr


SAVE_PHASES = {  # where the process dies in the step-8 save -> (the kill-at fault, whether step-8 is left complete)
    "before its shards are written (rank 1)": ("step-8/zero_pp_rank_1_mp_rank_00_optim_states.pt", False),
    "between the shards and COMPLETE (rank 0)": ("step-8/COMPLETE", False),
    # a resume rewrites `latest` (to the step it resumes) before the step-8 save does
    "while `latest` is written (rank 0)": ("checkpoints/latest:2", True),
}


def test_a_run_killed_mid_step_and_in_each_phase_of_a_save_resumes_to_the_uninterrupted_losses(
        straight, tmp_path, record):
    """One run dies four times: rank 1 SIGKILLed mid-step, then each `--resume latest` (step-5) is
    killed in a later phase of the step-8 save, meeting what the crash before left (set aside with
    a warning); the last resume runs to the end. Every resumed step matches the uninterrupted run."""
    out = tmp_path / "out"
    root = out / "default" / "checkpoints"
    proc = start_ranks(out, *RUN)
    ranks = rank_processes(proc)
    wait_until(lambda: max(logged_steps(out / "default"), default=0) >= 6, proc)
    ranks[1].kill()
    seconds, output = ended_within(proc, 60)
    assert proc.returncode != 0 and all(not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
                                        for p in ranks.values())
    # The shared-memory exchange notices the dead peer, or gloo does when the kill lands in one of its
    # collectives: either way a one-line error within seconds, not the launcher's 30 s.
    lost = "whose process is gone; the run stops here", "a peer rank's process is gone or its node is down"
    assert seconds < 10 and any(line in output for line in lost), output[-3000:]
    assert read_pointer(root / "latest") == "step-5"
    rows = [("SIGKILL rank 1 mid-step (2 ranks, one node)", "all processes gone within 60 s, exit non-zero; "
             "`--resume latest` matches an uninterrupted run (1e-5)",
             f"gone in {seconds:.0f} s, exit {proc.returncode}; resumed step-5, losses match", seconds)]
    after_a_save_crash = False
    for phase, (kill_at, left_complete) in SAVE_PHASES.items():
        lines_before = len(metrics_lines(out / "default"))
        proc = start_ranks(out, *RUN, "--resume", "latest", fault=f"kill-at:{kill_at}")
        seconds, output = ended_within(proc, 240)
        assert proc.returncode != 0 and read_pointer(root / "latest") == "step-5", (phase, output[-3000:])
        assert (root / "step-8").is_dir() and is_complete(root / "step-8") == left_complete, (phase, output[-3000:])
        assert after_a_save_crash == ("resuming step-5 of a run that went on to step-8" in output), output[-3000:]
        this_run = logged_steps(out / "default", since=lines_before)
        assert sorted(this_run) == [6, 7, 8], (phase, this_run)  # it resumed, trained to the save, died in it
        losses_match(this_run, straight, range(6, 9))
        rows.append((f"SIGKILL during a save, {phase}", "`latest` names the previous complete checkpoint; resume "
                     "works; the partial folder is ignored with a warning", "latest stayed step-5; the next resume "
                     "set step-8 aside with a warning and matched", seconds))
        after_a_save_crash = True
    resumed, output = resume_matches(out, straight)
    assert resumed == 5 and "resuming step-5 of a run that went on to step-8" in output, output[-3000:]
    for fault, expected, result, seconds in rows:  # each row's resume checked
        record(fault, expected, result, seconds=seconds)


def test_sigterm_during_a_scheduled_evaluation_saves_first(tmp_path, record):
    out = tmp_path / "out"
    slow_eval = ["--set", "eval.every_steps=4", "--set", "eval.batch_size=2", "--set",
                 "data.synthetic.eval_samples=4096"]
    proc = start_ranks(out, *RUN, *slow_eval)
    wait_until(lambda: 4 in logged_steps(out / "default"), proc)  # logged just before the evaluation starts
    time.sleep(0.5)
    signalled = time.monotonic()
    os.killpg(proc.pid, signal.SIGTERM)  # as SLURM does: every process of the job
    step_4 = out / "default" / "checkpoints" / "step-4"
    while not is_complete(step_4) and time.monotonic() - signalled < 60:
        time.sleep(0.01)
    seconds = time.monotonic() - signalled
    _, output = ended_within(proc, 60)
    assert seconds < 10 and "stop signal: saved step 4" in output, output[-3000:]
    assert "stop signal during eval synthetic: the evaluation is left unfinished" in output
    assert not [r for r in read_metrics(out / "default") if any(k.startswith("eval/") for k in r)]
    record("SIGTERM during a scheduled evaluation", "the save happens first, within 10 s of the signal",
           f"evaluation abandoned, step-4 saved {seconds:.1f} s after the signal", seconds=seconds)


def test_a_smaller_batch_on_rank_1_is_a_clear_error_on_every_rank(tmp_path, record):
    out = tmp_path / "out"
    proc = start_ranks(out, *RUN, fault="small-batch:7:1")
    seconds, output = ended_within(proc, 60)
    errors = [line for line in output.splitlines() if "batches of different sizes" in line]
    assert proc.returncode != 0 and any("(rank 0: 8;" in e for e in errors), output[-3000:]
    assert any("(rank 1: 4;" in e for e in errors), output[-3000:]
    assert max(logged_steps(out / "default")) == 6, output[-3000:]
    record("rank 1 gets a smaller batch at step 7", "clear error on all ranks, no hang",
           f"both ranks: 'batches of different sizes', gone in {seconds:.0f} s", seconds=seconds)


def test_an_exception_in_a_data_loader_worker_ends_every_rank_with_it_printed_once(tmp_path, record):
    csv = write_pairs_csv(tmp_path / "data" / "pairs.csv", 96)
    out = tmp_path / "out"
    proc = start_ranks(out, *RUN, "--set", "data.kind=csv", "--set", f"data.csv.path={csv}", "--set",
                       "data.num_workers=2", fault="worker-error:1:10")
    seconds, output = ended_within(proc, 90)
    assert proc.returncode != 0 and seconds < 60, output[-3000:]
    assert output.count("RuntimeError: injected failure in a data-loader worker of rank 1") == 1, output[-3000:]
    record("an exception in one rank's data-loader worker", "every rank exits within 60 s, the error printed once",
           f"gone in {seconds:.0f} s, printed once", seconds=seconds)


def test_a_pipe_shard_failing_once_a_temperature_at_its_cap_and_a_token_in_the_url(tmp_path, record):
    """One single-process run meets three faults: its only shard is a pipe: command that fails the
    first time and carries a token, and the temperature starts at float32(ln 100), whose exp
    (100.0000076) was above the old forward clamp, with a random-init loss that wants it lower."""
    write_shards(tmp_path / "d", n_shards=1, per_shard=40)
    shard, flag = tmp_path / "d" / "00000.tar", tmp_path / "failed-once"
    url = f"pipe:SECRET_TOKEN=tok-abc123 bash -c 'if [ -e {flag} ]; then cat {shard}; else touch {flag}; exit 3; fi'"
    at_cap = float(torch.tensor(math.log(100.0)))
    finished = train(tmp_path / "out", "--set", "data.kind=webdataset", "--set", f'data.webdataset.urls=["{url}"]',
                     "--set", "data.webdataset.train_num_samples=40", "--set", "train.max_steps=8",
                     "--set", f"model.init_logit_scale={at_cap}", "--set", "logging.report_to=[jsonl,tensorboard]")
    assert finished.returncode == 0, finished.stderr[-3000:]
    output = finished.stdout + finished.stderr
    assert "reading it again in 1 s (retry 1 of 3)" in output and max(logged_steps(tmp_path / "out" / "default")) == 8
    record("a `pipe:` shard that fails once", "retried and the run completes", "retried after 1 s; completed",
           seconds=finished.seconds)
    scales = [r["train/logit_scale"] for r in read_metrics(tmp_path / "out" / "default") if "train/logit_scale" in r]
    assert scales[0] == pytest.approx(100.0) and scales[-1] < 99.5, scales
    record("logit scale at the cap with a loss that wants it lower", "the temperature comes down within a few steps",
           f"{scales[0]:.2f} -> {scales[-1]:.2f} in {len(scales)} steps", seconds=finished.seconds)
    files = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert len(files) > 10 and not [p for p in files if b"tok-abc123" in p.read_bytes()]
    assert "tok-abc123" not in output  # the retry's warning names the shard, redacted
    record("a token in a data URL (`pipe:SECRET_TOKEN=...`)", "redacted everywhere a config is written",
           f"in none of the run's {len(files)} files nor its log", seconds=finished.seconds)


def test_a_hung_rank_ends_the_others_after_the_collective_timeout(tmp_path, record):
    """Rank 1 is stopped (SIGSTOP: alive, never coming); rank 0 must give up after
    train.collective_timeout_s with one line naming the step, the collective and the rank it
    waited for. Stopped between the saves at 5 and 8, where every collective of a step is a
    shared-memory one; inside a save, gloo's timeout would fire, whose message names no rank."""
    out = tmp_path / "out"
    proc = start_ranks(out, *RUN, "--set", "train.collective_timeout_s=5")
    ranks = rank_processes(proc)
    wait_until(lambda: max(logged_steps(out / "default"), default=0) >= 6, proc)
    ranks[1].suspend()
    stopped = time.monotonic()
    try:
        ranks[0].wait(timeout=60)
        seconds = time.monotonic() - stopped
    finally:
        ranks[1].resume()  # it meets rank 0's absence at its next collective, and the launcher's SIGTERM
    _, output = ended_within(proc, 60)
    errors = [line for line in output.splitlines() if line.startswith("dsclip: error: rank 0 at step")]
    assert len(errors) == 1 and "for rank(s) [1], which hang" in errors[0] and 5 <= seconds < 15, \
        (seconds, errors, output[-3000:])
    record("rank 1 hangs (SIGSTOP; collective timeout 5 s)", "the other ranks exit after the timeout with the "
           "one-line message", f"rank 0 gone {seconds:.0f} s after the hang: ...{errors[0][35:120]}...",
           seconds=seconds)


def test_sigkill_of_one_node_ends_the_other_within_the_collective_timeout(tmp_path, record):
    """Two `launch/multinode.sh` copies (NODE_RANK 0 and 1, one rank each) on this machine; node 1's
    whole process group is SIGKILLed mid-run; node 0 must end with dsclip's one-line message."""
    env = script_env(tmp_path, HOSTFILE=str(two_node_hostfile(tmp_path)), MASTER_PORT=str(free_port()))
    args = ["--output-dir", str(tmp_path / "out"), *RUN, "--set", "train.max_steps=200",
            "--set", "data.synthetic.train_samples=3200", "--set", "train.collective_timeout_s=30"]
    nodes = [subprocess.Popen([str(REPO / "launch" / "multinode.sh"), *args], cwd=REPO, env={**env, "NODE_RANK": str(n)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
             for n in range(2)]
    try:
        wait_until(lambda: max(logged_steps(tmp_path / "out" / "default"), default=0) >= 3, nodes[0])
        os.killpg(nodes[1].pid, signal.SIGKILL)
        seconds, output = ended_within(nodes[0], 60)
    finally:
        for node in nodes:
            try:
                os.killpg(node.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    errors = [line for line in output.splitlines() if "dsclip: error: rank 0 at step" in line]
    assert nodes[0].returncode != 0 and seconds < 30 and len(errors) == 1, output[-3000:]
    record("SIGKILL one node of a simulated 2-node run (launch/multinode.sh)", "the other node's ranks exit within "
           "the collective timeout (30 s) with the one-line message", f"gone in {seconds:.0f} s: {errors[0][15:90]}...",
           seconds=seconds)
