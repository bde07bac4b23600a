"""bench/gpu_check.sh on a machine without a GPU, and what it carries: the wheels bench/gpu_wheels.py
builds install offline into a fresh --target folder for CPython 3.12 and, with the GPU image's own
packages, satisfy every requirement they declare; bench/kernel_roofline.py runs (interpreted)."""
import email
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from dsclip_testutils import REPO

sys.path.insert(0, str(REPO / "bench"))
import gpu_wheels  # noqa: E402

GPU_PYTHON = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
              "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
              "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}


def installed(site: Path) -> dict[str, email.message.Message]:
    return {canonicalize_name(meta["Name"]): meta for meta in
            (email.message_from_string((info / "METADATA").read_text()) for info in site.glob("*.dist-info"))}


def gpu_check(tmp_path: Path, wheels: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WHEELS": str(wheels), "OUT": str(tmp_path / "out"), "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh")], env=env, capture_output=True, text=True,
                          timeout=120)


def test_gpu_check_without_wheels_says_how_to_build_them(tmp_path):
    result = gpu_check(tmp_path, tmp_path / "none")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"gpu_check: error: no wheels in {tmp_path / 'none'}/: run 'python bench/gpu_wheels.py' where pip can "
        f"reach an index, and bring {tmp_path / 'none'}/ along"]


def test_gpu_check_without_a_gpu_stops_at_once_after_finding_the_wheels(tmp_path):
    (tmp_path / "whl").mkdir()
    (tmp_path / "whl" / "dsclip_probe-0-py3-none-any.whl").write_bytes(b"")
    began = time.perf_counter()
    result = gpu_check(tmp_path, tmp_path / "whl")
    assert result.returncode == 1
    assert "gpu_check: error: no CUDA device (torch sees none)" in result.stderr
    assert "1 wheels ready" in result.stderr
    assert time.perf_counter() - began < 30, "nothing installed or run before the device check"
    assert not (tmp_path / "out" / "gpu_check.json").exists()


@pytest.mark.multiprocess  # pip fetches from the package index
def test_the_gpu_wheels_install_offline_and_cover_their_requirements(tmp_path):
    wheels, site = tmp_path / "whl", tmp_path / "site"
    subprocess.run([sys.executable, str(REPO / "bench" / "gpu_wheels.py"), "--out", str(wheels)], check=True)
    platforms = [arg for p in gpu_wheels.PLATFORMS for arg in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--only-binary=:all:", "--python-version", gpu_wheels.PYTHON, "--implementation", "cp",
                    *platforms, "--target", str(site), *map(str, sorted(wheels.glob("*.whl")))], check=True)
    dists = installed(site)
    assert set(map(canonicalize_name, [*gpu_wheels.MISSING, "dsclip"])) <= dists.keys()
    assert (site / "dsclip_kernels" / "contrastive.py").is_file()
    assert len(list(wheels.glob("*.whl"))) == len(dists), "one wheel per distribution, one version each"
    available = dists.keys() | gpu_wheels.GPU_IMAGE_HAS
    unmet = {f"{name} needs {req}" for name, meta in dists.items() for req in map(Requirement, meta.get_all("Requires-Dist") or [])
             if (req.marker is None or req.marker.evaluate(GPU_PYTHON)) and canonicalize_name(req.name) not in available}
    assert not unmet, sorted(unmet)


@pytest.mark.multiprocess
def test_the_roofline_benchmark_runs_interpreted_and_writes_json(tmp_path):
    out = tmp_path / "roofline.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    subprocess.run([sys.executable, str(REPO / "bench" / "kernel_roofline.py"), "--device", "cpu", "--rows", "16",
                    "--batches", "40", "--dim", "32", "--json", str(out)], env=env, check=True, timeout=300)
    rows = json.loads(out.read_text())["rows"]
    assert [r["pass"] for r in rows] == ["torch.matmul", "clip_stats", "image_grads", "text_grads"]
    assert all(r["seconds"] > 0 and r["batch"] == 40 and r["rows"] == 16 for r in rows)
