"""The README's "Fine-tune a real model" path, run as written: its shell blocks in order, in a folder
laid out like the repository root, with fewer steps and images (SHRINK), CPU ranks, and the
offline random-weight file instead of the two downloads. Each shrink must match the README exactly
as often as stated, so a README edit that this test no longer covers fails here."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from dsclip_testutils import REPO, free_port, require_data, subprocess_env

SECTION = "## Fine-tune a real model"
DOWNLOADS = ("huggingface-cli download", "pretrained='laion2b_s34b_b79k'")  # no network on test machines
SHRINK = [  # (README text, what the test runs instead, times it occurs)
    ("--per-shard 5000", "--per-shard 64 --limit 768", 1),  # still 12 train shards: the recipe's urls hold
    ("--limit 2000 --per-shard 2000", "--limit 64 --per-shard 64", 1),
    ("batch_size: 64 ", "batch_size: 8  ", 1),
    ("warmup_steps: 100", "warmup_steps: 1", 1),
    ("max_steps: 1000", "max_steps: 2", 1),
    ("save_every: 250", "save_every: 0", 1),  # the final save only: each ViT-B-32 checkpoint is ~1.8 GB
    ("every_steps: 250", "every_steps: 1", 1),
    ("--num_gpus 8", "--num_gpus 2", 1),
    ("deepspeed --num_gpus", "deepspeed --master_port {port} --num_gpus", 2),
]


def readme_commands() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    lines = [line for block in blocks for line in block.splitlines(keepends=True)
             if not any(marker in line for marker in DOWNLOADS)]
    return "".join(lines)


def shrunk(script: str) -> str:
    for before, after, times in SHRINK:
        assert script.count(before) == times, f"README no longer has {before!r} {times} time(s): update SHRINK"
        for _ in range(times):
            script = script.replace(before, after.format(port=free_port()), 1)
    return script


def repository_root_copy(folder: Path) -> None:
    """The README runs from the repository root; the test runs in a scratch folder that looks like one."""
    for name in ("dsclip", "ds_configs", "launch", "kernels"):
        (folder / name).symlink_to(REPO / name)


@pytest.mark.slow
def test_readme_fine_tune_path_runs_as_written(tmp_path):
    require_data("/usr/share/datasets/fashion-mnist", "dataset-fashion-mnist")
    repository_root_copy(tmp_path)
    script = shrunk(readme_commands())
    env = subprocess_env(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])

    one_gpu, eight_gpu = tmp_path / "outputs" / "vit-b-32-fashion", tmp_path / "outputs" / "vit-b-32-fashion-8gpu"
    for run in (one_gpu, eight_gpu):
        steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert max(steps) == 2, run
        assert (run / "export" / "open_clip_config.json").is_file()
    evaluated = json.loads((one_gpu / "eval.json").read_text())
    assert 0 <= evaluated["eval/shard-000000/top1"] <= 100, evaluated
    with safe_open(tmp_path / "vit-b-32-fashion-bf16" / "open_clip_model.safetensors", "pt") as weights:
        assert {str(weights.get_slice(name).get_dtype()) for name in weights.keys()} == {"BF16"}


def test_readme_fine_tune_commands_are_the_ones_the_slow_test_runs():
    script = shrunk(readme_commands())
    assert "dsclip make-shards fashion-mnist" in script and "dsclip export" in script
    assert not any(marker in script for marker in DOWNLOADS)
