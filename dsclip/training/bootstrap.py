"""The process side of a run: the process group (with or without a launcher), threads per rank,
shared-memory collectives and the host allocator on CPU, and quiet libraries.
`start_process_group()` is the one sequence every command that trains or evaluates runs."""
import contextlib
import ctypes
import hashlib
import importlib
import logging
import os
import socket
import sys
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from dsclip.errors import RankError
from dsclip.logs import debug_enabled, prints_as_debug
from dsclip.loss.collectives import use_shared_memory
from dsclip.training.config import DEFAULT_COLLECTIVE_TIMEOUT_S

log = logging.getLogger(__name__)

# mallopt parameters (glibc malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_HEAP_UP_TO = 1 << 30  # allocations served from the heap once keep_freed_host_memory is in effect
_keeps_freed_memory = False  # whether it is (it is process-wide)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_process_defaults() -> None:
    """Let `dsclip train` run without a launcher: a world of one rank on a free local port."""
    if "RANK" in os.environ:
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))


def load_secrets() -> None:
    """Variables launch/multinode.sh kept off the launcher's command line (tokens, keys): read
    from the file DSCLIP_SECRETS_FILE names, one KEY=VALUE per line; set ones are left alone."""
    path = os.environ.get("DSCLIP_SECRETS_FILE")
    if not path:
        return
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise RankError(f"DSCLIP_SECRETS_FILE={path} cannot be read ({e.strerror}): launch/multinode.sh writes it in "
                        "the working directory, which every node must share") from None
    for line in lines:
        name, sep, value = line.partition("=")
        if sep:
            os.environ.setdefault(name, value)


def local_ranks() -> int:
    """Ranks on this host: torchrun sets LOCAL_WORLD_SIZE, the DeepSpeed launcher LOCAL_SIZE."""
    return int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or "1")


def configure_threads() -> None:
    """One rank per core share: on CPU, ranks' thread pools otherwise fight over the cores (two
    ranks of two threads each on two cores ran the default run at a third of its speed)."""
    # DeepSpeed's CPU accelerator runs `numactl --hardware` at every ZeRO-3 gradient reduction unless
    # LOCAL_SIZE is set; its launcher sets it, torchrun and `dsclip train` do not.
    os.environ.setdefault("LOCAL_SIZE", str(local_ranks()))
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_ranks()))


def quiet_libraries() -> None:
    """torch warns on each reduce-scatter and all-gather call of DeepSpeed's (deprecated names)."""
    warnings.filterwarnings("ignore", message=".*reduce_scatter_tensor.*", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*all_gather.*deprecated.*", category=FutureWarning)


def _glibc() -> Optional[ctypes.CDLL]:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def keep_freed_host_memory() -> bool:
    """Have glibc serve allocations up to 1 GB from its heap and keep freed memory for reuse.

    By default it maps each large block afresh and hands freed memory back to the OS once the free
    top of the heap passes a threshold it raises only as it goes; a CPU training step, which frees
    and re-allocates the same large activations and gathered parameters every step, then pays page
    faults for them again and again. Measured (2 CPU ranks, dsclip-tiny, 256 per rank): ZeRO-3 ~145
    -> ~122 ms per step; open_clip's loop ~126 either way. The cost: freed memory stays resident up
    to the peak, as in PyTorch's CUDA caching allocator. False where there is no glibc."""
    global _keeps_freed_memory
    libc = _glibc()
    _keeps_freed_memory = bool(libc and libc.mallopt(_M_MMAP_THRESHOLD, _HEAP_UP_TO)
                               and libc.mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1))
    return _keeps_freed_memory


@contextlib.contextmanager
def freed_host_memory_returned() -> Iterator[None]:
    """Inside, glibc maps each block of 1 MB or more on its own and returns it when freed, undoing
    keep_freed_host_memory for the while. For building the model: under zero.Init each module's
    parameters are allocated whole and freed once partitioned, and in the heap those holes were
    mostly not reused (ViT-B-32 built partitioned on 2 ranks: 501 MB peak, 341 MB after a
    malloc_trim; with this, 437 MB)."""
    if not _keeps_freed_memory:
        yield
        return
    libc = _glibc()
    libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_THRESHOLD, _HEAP_UP_TO)


def init_distributed(collective_timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S) -> None:
    """DeepSpeed's process group, the shared-memory names of its CPU all-reduce released; on CPU,
    glibc keeps freed host memory for reuse, and the collectives run on shared memory when all
    ranks are on one host. Every collective wait ends after `collective_timeout_s` (the process
    group's timeout, and the shared-memory exchange's bound)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    from deepspeed.utils import set_log_level_from_string
    if debug_enabled():  # DeepSpeed set its own logger to WARNING when it was imported
        set_log_level_from_string("info")
    # Every op DeepSpeed compiles (the CPU all-reduce here, DeepSpeedCPUAdam under offload) goes there.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(extension_cache()))  # a user's own choice stays
    on_cpu = get_accelerator().device_name() == "cpu"
    with prints_as_debug("DeepSpeed"), _shared_memory_kernel(built=not on_cpu or shared_memory_wanted()):
        deepspeed.init_distributed(verbose=False, timeout=timedelta(seconds=collective_timeout_s))  # prints per rank
    dist.barrier()  # every local rank has mapped every peer's buffer
    # DeepSpeed never unlinks these /dev/shm files (~69 MB per rank): each run would leak them.
    # The mappings stay valid after the names go.
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ['MASTER_ADDR']}_{os.environ['MASTER_PORT']}"
    Path(f"/dev/shm/{name}_{dist.get_rank()}").unlink(missing_ok=True)
    if on_cpu:
        keep_freed_host_memory()
        if shared_memory_wanted():
            use_shared_memory(collective_timeout_s)


def shared_memory_wanted() -> bool:
    """Whether the CPU collectives should run on shared memory (loss/collectives.py): several
    ranks, all on this host as the DeepSpeed launcher reports it (LOCAL_SIZE, the kernel's own
    condition), and not switched off with DSCLIP_SHM_COLLECTIVES=0."""
    world = os.environ.get("WORLD_SIZE", "1")
    return (os.environ.get("DSCLIP_SHM_COLLECTIVES", "1") != "0" and world != "1"
            and os.environ.get("LOCAL_SIZE") == world)


def extension_cache() -> Path:
    """Where this Python environment keeps the kernels DeepSpeed compiles (unless TORCH_EXTENSIONS_DIR
    says otherwise). torch's default folder is keyed by the kernel's name only, so two environments
    sharing a home (two venvs; nodes with their own installs) rebuild it over each other at every
    start-up, a minute each, with the other's ranks waiting on the build lock."""
    environment = hashlib.sha256(sys.prefix.encode()).hexdigest()[:16]
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "torch_extensions" / f"env-{environment}"


@contextlib.contextmanager
def _shared_memory_kernel(built: bool) -> Iterator[None]:
    """DeepSpeed compiles its CPU shared-memory all-reduce at every start-up, whether or not a
    collective will use it: about a minute on 2 cores the first time on a machine. With
    built=False it is skipped for the start-up inside this block."""
    if built:
        yield
        return
    # `import deepspeed.comm.torch as ...` would give torch itself, which deepspeed.comm imports.
    torch_backend = importlib.import_module("deepspeed.comm.torch")
    build = torch_backend.build_shm_op
    torch_backend.build_shm_op = lambda: None
    try:
        yield
    finally:
        torch_backend.build_shm_op = build


def start_process_group(collective_timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S) -> None:
    """Everything a process needs before it builds a model: the one start-up sequence."""
    quiet_libraries()
    load_secrets()
    single_process_defaults()
    configure_threads()
    init_distributed(collective_timeout_s)
    log.debug("rank %d of %d, %d threads", dist.get_rank(), dist.get_world_size(), torch.get_num_threads())


def end_process_group() -> None:
    """Leave the process group once every rank is done, while the interpreter is whole. Left to
    interpreter shutdown, gloo's worker threads may still hold the work of an asynchronous
    collective (ZeRO-3 issues them), whose tensors then need the GIL of a finalizing interpreter:
    the process aborts ("terminate called without an active exception", exit 250) after a run that
    succeeded, now and then (pytorch/pytorch#190489; it failed a CI run here)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
