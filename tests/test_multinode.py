"""Multi-node launch scripts (launch/), with two nodes simulated on this machine.

Each "node" is a separate launcher process with one CPU rank; they meet at 127.0.0.1 like two
hosts meet at the master's address. The runs must train to completion and log the same
per-step losses as one node with 2 ranks running the same recipe, since the global ranks,
the data shards and the reductions are the same.
"""
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from dsclip_testutils import REPO, ds_config, free_port, launch, read_metrics
from test_recipes import tiny_overrides

RECIPE = "medical.yaml"  # a full fine-tune with layer-wise lr decay: every parameter sharded and updated
STEPS = 4
BIN = str(Path(sys.executable).parent)  # deepspeed, torchrun


def train_args(tmp_path: Path, out: Path) -> list[str]:
    args = ["--recipe", str(REPO / "launch" / "recipes" / RECIPE), "--output-dir", str(out)]
    for item in tiny_overrides(RECIPE, tmp_path / "data") + [f"train.max_steps={STEPS}"]:
        args += ["--set", item]
    return args


def losses(out: Path) -> list[float]:
    records = [r for r in read_metrics(out / Path(RECIPE).stem) if "train/loss" in r]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    return [r["train/loss"] for r in records]


@pytest.fixture(scope="module")
def single_node_losses(tmp_path_factory) -> list[float]:
    """One node, 2 ranks: the reference every multi-node launch must reproduce."""
    tmp_path = tmp_path_factory.mktemp("single")
    out = tmp_path / "out"
    result = launch(["--deepspeed_config", str(ds_config(3, tmp_path)), *train_args(tmp_path, out)], nproc=2)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return losses(out)


def script_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "DS_CONFIG": str(ds_config(3, tmp_path))}
    env.update(extra)
    return env


def run_nodes(commands: list[list[str]], envs: list[dict[str, str]], timeout: int = 300) -> None:
    """Start one process per simulated node at once (they rendezvous), wait for all."""
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for cmd, env in zip(commands, envs)]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=timeout)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for i, (proc, output) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"node {i} failed:\n{output[-3000:]}"


def two_node_hostfile(tmp_path: Path) -> Path:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two simulated nodes, one rank each\nnodeA slots=1\nnodeB slots=1\n")
    return hostfile


def fake_command(folder: Path, name: str, body: str) -> None:
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.mark.multiprocess
def test_multinode_sh_without_ssh_reproduces_the_single_node_losses(single_node_losses, tmp_path):
    """Two `launch/multinode.sh` copies, NODE_RANK 0 and 1 (--no_ssh), on a 2-node hostfile."""
    out = tmp_path / "out"
    args = train_args(tmp_path, out)
    hostfile = two_node_hostfile(tmp_path)
    env = script_env(tmp_path, HOSTFILE=str(hostfile))
    run_nodes([[str(REPO / "launch" / "multinode.sh"), *args]] * 2,
              [{**env, "NODE_RANK": str(rank)} for rank in range(2)])
    assert losses(out) == pytest.approx(single_node_losses, abs=1e-6)


@pytest.mark.multiprocess
def test_multinode_sh_fails_clearly_without_a_hostfile(tmp_path):
    result = subprocess.run([str(REPO / "launch" / "multinode.sh")], cwd=tmp_path, capture_output=True, text=True,
                            env=script_env(tmp_path, HOSTFILE=str(tmp_path / "missing")))
    assert result.returncode == 2
    assert "hostfile" in result.stderr and "launch/hostfile.example" in result.stderr


@pytest.mark.multiprocess
def test_multinode_sh_keeps_tokens_off_the_command_line_in_a_private_file_it_removes(tmp_path):
    """A stand-in `deepspeed` records what the launcher would see: .deepspeed_env without the
    token, the token in a file only this user can read, both gone after the launch."""
    fakes, log = tmp_path / "bin", tmp_path / "launcher.log"
    fake_command(fakes, "deepspeed", 'stat -c "%a %n" "$DS_ENV_FILE" "$DS_ENV_FILE.secrets" > "$LOG"\n'
                                     'cat "$DS_ENV_FILE" "$DS_ENV_FILE.secrets" >> "$LOG"\n')
    env = script_env(tmp_path, HOSTFILE=str(two_node_hostfile(tmp_path)), LOG=str(log),
                     DS_ENV_FILE=str(tmp_path / ".deepspeed_env"), WANDB_API_KEY="wandb-secret", HF_HUB_OFFLINE="1",
                     PATH=f"{fakes}:{os.environ['PATH']}")
    subprocess.run([str(REPO / "launch" / "multinode.sh")], cwd=tmp_path, env=env, check=True, timeout=60)
    lines = log.read_text().splitlines()
    assert [line.split()[0] for line in lines[:2]] == ["600", "600"]
    public = lines[2:lines.index("WANDB_API_KEY=wandb-secret")]
    assert "HF_HUB_OFFLINE=1" in public and not any("wandb-secret" in line for line in public)
    assert f"DSCLIP_SECRETS_FILE={tmp_path}/.deepspeed_env.secrets" in public
    assert not list(tmp_path.glob(".deepspeed_env*"))


def test_a_rank_reads_the_secrets_file_without_overriding_what_is_set(tmp_path, monkeypatch):
    from dsclip.training.bootstrap import load_secrets
    (tmp_path / "secrets").write_text("WANDB_API_KEY=from-file\nHF_TOKEN=hf-from-file\n")
    monkeypatch.setenv("DSCLIP_SECRETS_FILE", str(tmp_path / "secrets"))
    monkeypatch.setenv("HF_TOKEN", "already-set")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    load_secrets()
    assert os.environ["WANDB_API_KEY"] == "from-file" and os.environ["HF_TOKEN"] == "already-set"


@pytest.mark.slow
def test_multinode_sh_over_ssh_propagates_the_environment(single_node_losses, tmp_path):
    """The pdsh path: a stand-in pdsh runs each node's command in a fresh environment holding only
    HOME and PATH, as an ssh login would; only what .deepspeed_env and the launcher export reach
    the ranks."""
    fakes = tmp_path / "bin"
    fake_command(fakes, "ssh", "exit 0\n")  # the launcher's reachability check
    fake_command(fakes, "pdsh", (
        'while [[ $1 == -* ]]; do case $1 in -w) hosts=$2; shift 2;; -f) shift 2;; *) shift;; esac; done\n'
        'printf "%s\\n" "$*" > "$PDSH_LOG"\n'
        'IFS=, read -ra nodes <<< "$hosts"; pids=()\n'
        'for i in "${!nodes[@]}"; do env -i HOME="$HOME" PATH="$PATH" bash -c "${*//%n/$i}" & pids+=($!); done\n'
        'rc=0; for p in "${pids[@]}"; do wait "$p" || rc=1; done; exit $rc\n'))
    out = tmp_path / "out"
    env = script_env(tmp_path, HOSTFILE=str(two_node_hostfile(tmp_path)), PDSH_LOG=str(tmp_path / "pdsh.log"),
                     DS_ENV_FILE=str(tmp_path / ".deepspeed_env"), HF_HUB_OFFLINE="1", HF_TOKEN="hf_secret42",
                     PATH=f"{fakes}:{BIN}:{os.environ['PATH']}")
    run_nodes([[str(REPO / "launch" / "multinode.sh"), *train_args(tmp_path, out)]], [env])
    remote_command = (tmp_path / "pdsh.log").read_text()
    assert "export OMP_NUM_THREADS=1;" in remote_command and "export HF_HUB_OFFLINE=1;" in remote_command
    assert "hf_secret42" not in remote_command and "DSCLIP_SECRETS_FILE=" in remote_command  # the token: in a file
    assert not list(tmp_path.glob(".deepspeed_env*"))  # both files removed when the launch ended
    assert losses(out) == pytest.approx(single_node_losses, abs=1e-6)


@pytest.mark.slow
def test_torchrun_sh_with_two_nodes_reproduces_the_single_node_losses(single_node_losses, tmp_path):
    out = tmp_path / "out"
    env = script_env(tmp_path, NNODES="2", NPROC_PER_NODE="1")
    run_nodes([[str(REPO / "launch" / "torchrun.sh"), *train_args(tmp_path, out)]] * 2,
              [{**env, "NODE_RANK": str(rank)} for rank in range(2)])
    assert losses(out) == pytest.approx(single_node_losses, abs=1e-6)


@pytest.mark.slow
def test_slurm_sbatch_with_two_nodes_reproduces_the_single_node_losses(single_node_losses, tmp_path):
    """launch/slurm.sbatch run as its batch step, with stand-ins for scontrol and srun that start
    one task per simulated node on this machine (SLURM_NODEID 0 and 1)."""
    fakes = tmp_path / "bin"
    # the second host comes late, as from a slow scontrol: a reader that stops after the first
    # line must not fail the job (SIGPIPE under pipefail)
    fake_command(fakes, "scontrol", 'echo 127.0.0.1; sleep 0.2; echo 127.0.0.1\n')
    fake_command(fakes, "srun", (
        'while [[ $1 == --* ]]; do shift; done; pids=()\n'
        'for ((i = 0; i < SLURM_NNODES; i++)); do SLURM_NODEID=$i SLURM_PROCID=$i "$@" & pids+=($!); done\n'
        'rc=0; for p in "${pids[@]}"; do wait "$p" || rc=1; done; exit $rc\n'))
    out = tmp_path / "out"
    env = script_env(tmp_path, PATH=f"{fakes}:{BIN}:{os.environ['PATH']}", SLURM_JOB_NODELIST="node[1-2]",
                     SLURM_NNODES="2", SLURM_JOB_ID="4242", SLURM_SUBMIT_DIR=str(REPO), NPROC_PER_NODE="1")
    run_nodes([["bash", str(REPO / "launch" / "slurm.sbatch"), *train_args(tmp_path, out)]], [env])
    assert losses(out) == pytest.approx(single_node_losses, abs=1e-6)
