"""Build, on this (CPU) machine, the wheels bench/gpu_check.sh installs on a bare GPU machine.

    python bench/gpu_wheels.py                 # writes .whl/ (git-ignored), lists what it holds

The GPU machines this project is lent have Python 3.12, torch and triton preinstalled, no
package registry, and none of deepspeed, open_clip_torch, webdataset, ftfy or what those need
beyond the image's own packages (GPU_IMAGE_HAS). This script fetches those wheels for CPython
3.12 on manylinux x86-64, in the versions installed here (what the tests ran with), and builds
the two that ship only as source (deepspeed, with its C++/CUDA ops left to compile at first use,
and fairscale), and dsclip's own wheel (its kernels/ folder imports as dsclip_kernels only once
installed). gpu_check.sh installs them with `pip install --no-index --no-deps --target`.
"""
import argparse
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYTHON = "3.12"
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64"]

# What dsclip needs that the GPU image lacks, its dependencies' dependencies included.
MISSING = ["deepspeed", "hjson", "pydantic", "pydantic_core", "annotated_types", "typing_inspection",
           "open_clip_torch", "ftfy", "wcwidth", "webdataset", "braceexpand", "fairscale"]
# Source-only distributions, built here with these environment settings.
BUILT_FROM_SOURCE = {"deepspeed": {"DS_BUILD_OPS": "0"}, "fairscale": {}}
# The GPU image's own packages (as its maintainers list them, normalised names), that the
# wheels above may rely on without carrying them.
GPU_IMAGE_HAS = frozenset("""
accelerate certifi charset-normalizer cuda-bindings einops filelock fsspec huggingface-hub idna jinja2
markupsafe matplotlib ml-dtypes mpmath msgpack networkx ninja numpy nvidia-ml-py packaging pandas peft pillow
protobuf psutil py-cpuinfo pyyaml regex requests safetensors scipy setuptools sympy timm tokenizers torch
torchvision tqdm transformers triton typing-extensions urllib3 wheel
""".split())


def pinned(name: str) -> str:
    """name==version as installed in this environment."""
    return f"{name}=={importlib.metadata.version(name)}"


def fetch_binary(names: list[str], out: Path) -> None:
    platform_args = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", PYTHON, "--implementation", "cp", *platform_args, "-d", str(out),
                    *map(pinned, names)], check=True)


def build_from_source(name: str, env: dict[str, str], out: Path) -> None:
    # no build isolation: both import torch in setup.py, and the one installed here is the one to build against
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(out), pinned(name)], check=True, env={**os.environ, **env})


def build_project(out: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                    str(REPO)], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / ".whl"), help="folder for the wheels (default: .whl)")
    out = Path(parser.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    fetch_binary([n for n in MISSING if n not in BUILT_FROM_SOURCE], out)
    for name, env in BUILT_FROM_SOURCE.items():
        build_from_source(name, env, out)
    build_project(out)
    wheels = sorted(out.glob("*.whl"))
    for wheel in wheels:
        print(f"{wheel.stat().st_size / 2**20:7.2f} MiB  {wheel.name}")
    print(f"{len(wheels)} wheels, {sum(w.stat().st_size for w in wheels) / 2**20:.1f} MiB in {out}")


if __name__ == "__main__":
    main()
