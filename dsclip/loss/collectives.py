"""Shared-memory collectives for CPU ranks on one host.

DeepSpeed ships a shared-memory all-reduce for CPU ranks of one host (`inference_all_reduce`,
built at start-up), but its training collectives on CPU go through gloo, which moves every byte
through the TCP loopback. `use_shared_memory()` puts a proxy in front of DeepSpeed's
communication backend that runs the world group's collectives on shared memory:

  all-reduce         sums of the dtypes it supports: DeepSpeed's kernel; other small ones (an
                     fp64 norm, a max) through the exchange below
  all-gather         each rank copies its shard into a region every rank maps, then all copy
                     the whole out (`SharedExchange`)
  reduce-scatter     each rank copies its input into the mapped regions, then each sums its
                     own block from every rank's copy

Everything else (other groups, large all-reduces the kernel cannot sum, GPU tensors) goes to
gloo unchanged. Measured here, 2 ranks, 12.6 MB fp32 (ms):

                  gloo   kernel all-reduce (of a zeroed buffer / a copy)   exchange
  all-reduce      12.4   3.1                                                -
  all-gather       9.5   4.7                                                2.9
  reduce-scatter  19.5   6.4                                                3.4
  4-byte sum       0.35  0.01-0.03                                          -
"""
import mmap
import os
import platform
import sys
import time
import uuid
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

# Bytes of /dev/shm the exchange maps (two halves, one region per rank in each); larger
# collectives run in rounds of (this / 2 / world) bytes per rank.
EXCHANGE_BYTES = 64 << 20
HEADER_BYTES = 64  # per region: an all-gather's shard size (int64), padded to keep the data aligned
ARRIVAL_STRIDE = 8  # int64s per rank (one cache line): arrival count, pid, the collective's kind by parity
COLLECTIVE_KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-reduce (DeepSpeed's kernel)")
DEFAULT_TIMEOUT_S = 600.0  # the bound on a wait for peers; the run passes train.collective_timeout_s


PEER_LOOK_S = 0.2  # how often a waiting rank looks whether the late ones are still alive


def _alive(pid: int) -> bool:
    """Whether process `pid` runs (not gone, not a zombie waiting to be reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: only whether the pid exists
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False


def exchange_file_bytes(world: int, region_bytes: int) -> int:
    """Two halves of one region per rank, then one arrival counter (cache line) per rank."""
    return 2 * world * region_bytes + world * ARRIVAL_STRIDE * 8


class _Done:
    """The handle of a collective that already finished (the shared-memory paths are synchronous)."""

    def wait(self, *args: Any, **kwargs: Any) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


def _handle(async_op: bool) -> Optional[_Done]:
    return _Done() if async_op else None


def _kernel_sum(tensor: torch.Tensor) -> None:
    torch.ops.deepspeed.inference_all_reduce_(tensor)


class CollectiveTimeout(RuntimeError):
    """A rank waited longer than the timeout for its peers to reach a shared-memory collective."""


class CollectiveMismatch(RuntimeError):
    """Ranks met in the same round of the exchange from different collectives: their code paths
    diverged (a dsclip bug or rank-dependent settings), and their data would be mixed up."""


class UnequalShards(ValueError):
    """Ranks came to one all-gather with shards of different sizes."""

    def __init__(self, shard_bytes: list[int]):
        self.shard_bytes = shard_bytes
        super().__init__("ranks came to one all-gather with different shard sizes (bytes per rank: "
                         f"{shard_bytes})")


class SharedExchange:
    """All-gather, reduce-scatter and small all-reduces through one /dev/shm file that every
    local rank maps.

    The file holds two halves, each with one region per rank; collectives alternate halves. Each
    region starts with a header where an all-gather states its shard size: every rank reads every
    rank's size after the meeting, so unequal shards (a rank with a smaller batch) raise the same
    error on all ranks instead of gathering garbage, at no extra collective.

    A round is: write into this rank's region, meet the other ranks, read. A rank can only write
    a half again after the next round's meeting, which every rank reaches after it has finished
    reading that half, so one meeting per round suffices.

    The meeting is dsclip's own barrier: a counter per rank at the end of the file, which each
    rank raises after writing and polls until every rank's is as high. (On x86 stores become
    visible in program order: a rank that sees a peer's count sees the data the peer wrote
    before it; elsewhere shared_memory_dtypes() turns the exchange off.) It replaces a 1-float
    sum through DeepSpeed's kernel, which waits for its peers in C++ without a timeout, holding
    the GIL: a peer that died or hangs pinned the others at 100% CPU forever, deaf to SIGTERM. A waiting rank looks every 0.2 s
    whether the late ones are still alive, and gives up after `timeout_s`: CollectiveTimeout
    names the ranks it waited for. The kernel's own sums (large fp32 / bf16 all-reduces) are
    entered only after the same barrier, so only a peer that dies inside one can still stall them
    (until the launcher ends the job)."""

    def __init__(self, path: str, region_bytes: int, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.rank, self.world, self.timeout_s = dist.get_rank(), dist.get_world_size(), timeout_s
        self.region_bytes = region_bytes - HEADER_BYTES
        with open(path, "r+b") as f:
            self._map = mmap.mmap(f.fileno(), exchange_file_bytes(self.world, region_bytes))
        regions_bytes = 2 * self.world * region_bytes
        self.arrivals = memoryview(self._map)[regions_bytes:].cast("q")  # rank r: [r * 8] its count, [r * 8 + 1] its pid
        self.arrivals[self.rank * ARRIVAL_STRIDE + 1] = os.getpid()  # read once every rank has mapped (a barrier)
        self.arrived = 0
        regions = torch.frombuffer(self._map, dtype=torch.uint8, count=regions_bytes).view(2, self.world, region_bytes)
        self.headers = regions[:, :, :HEADER_BYTES].view(torch.int64)  # [half, rank, 8]
        self.halves = regions[:, :, HEADER_BYTES:]
        self.turn = 0

    @classmethod
    def open_on_all_ranks(cls, total_bytes: int = EXCHANGE_BYTES,
                          timeout_s: float = DEFAULT_TIMEOUT_S) -> Optional["SharedExchange"]:
        """Rank 0 creates the file, every rank maps it, the name goes; None on every rank when
        /dev/shm cannot hold it."""
        world = dist.get_world_size()
        region_bytes = total_bytes // (2 * world) // 64 * 64  # a multiple of every dtype's size
        path, ok = f"/dev/shm/dsclip_exchange_{uuid.uuid4().hex}", True
        if dist.get_rank() == 0:
            ok = _create_file(path, exchange_file_bytes(world, region_bytes))
        decision = [path, ok]
        dist.broadcast_object_list(decision, src=0)
        if not decision[1]:
            return None
        exchange = cls(decision[0], region_bytes, timeout_s)
        dist.barrier()
        if dist.get_rank() == 0:
            os.unlink(decision[0])  # the mappings outlive the name: nothing is left behind after a crash
        return exchange

    def _next_half(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(the data regions, the headers) of the half whose turn it is."""
        turn = self.turn
        self.turn ^= 1
        return self.halves[turn], self.headers[turn]

    def kernel_sum(self, tensor: torch.Tensor) -> None:
        """DeepSpeed's shared-memory sum, entered only once every rank has arrived (see the class)."""
        self.arrive("all-reduce (DeepSpeed's kernel)")
        _kernel_sum(tensor)

    def arrive(self, collective: str) -> None:
        """Count this rank in and wait, at most timeout_s, until every rank has counted in as often;
        then check that every rank came from the same kind of `collective`."""
        self.arrived += 1
        # A peer can be one round ahead, never two (it waits for this rank there): the kind goes
        # in the slot of this round's parity, written before the count.
        kind_slot = 2 + self.arrived % 2
        self.arrivals[self.rank * ARRIVAL_STRIDE + kind_slot] = COLLECTIVE_KINDS.index(collective)
        self.arrivals[self.rank * ARRIVAL_STRIDE] = self.arrived
        self._wait_for_peers(collective)
        kinds = [self.arrivals[r * ARRIVAL_STRIDE + kind_slot] for r in range(self.world)]
        if len(set(kinds)) > 1:
            named = ", ".join(f"rank {r}: {COLLECTIVE_KINDS[k]}" for r, k in enumerate(kinds))
            raise CollectiveMismatch(f"ranks met in shared-memory collective number {self.arrived} from different "
                                     f"collectives ({named})")

    def _wait_for_peers(self, collective: str) -> None:
        if all(self.arrivals[r * ARRIVAL_STRIDE] >= self.arrived for r in range(self.world)):
            return
        start = time.monotonic()
        next_look = start + PEER_LOOK_S
        while True:
            late = [r for r in range(self.world) if self.arrivals[r * ARRIVAL_STRIDE] < self.arrived]
            if not late:
                return
            now = time.monotonic()
            if now > next_look:  # a peer that died will never come: no need to wait out the timeout
                gone = [r for r in late if not _alive(self.arrivals[r * ARRIVAL_STRIDE + 1])]
                if gone:
                    raise CollectiveTimeout(f"rank {self.rank} waited in a shared-memory {collective} (number "
                                            f"{self.arrived}) for rank(s) {gone}, whose process is gone")
                next_look = now + PEER_LOOK_S
            if now - start > self.timeout_s:
                raise CollectiveTimeout(f"rank {self.rank} waited {self.timeout_s:.0f} s in a shared-memory {collective} "
                                        f"(number {self.arrived}) for rank(s) {late}, which hang")
            os.sched_yield()

    def all_gather(self, output: torch.Tensor, shard: torch.Tensor) -> None:
        """output (world x shard, rank-major) = every rank's shard; both contiguous, one dtype."""
        mine = shard.reshape(-1).view(torch.uint8)
        out = output.reshape(self.world, -1).view(torch.uint8)
        n = mine.numel()
        for start in range(0, max(n, 1), self.region_bytes):  # an empty shard still meets (and is compared)
            size = min(self.region_bytes, n - start)
            half, headers = self._next_half()
            half[self.rank, :size].copy_(mine[start:start + size])
            headers[self.rank, 0] = n
            self.arrive("all-gather")
            if start == 0 and bool((headers[:, 0] != n).any()):
                raise UnequalShards(headers[:, 0].tolist())
            out[:, start:start + size].copy_(half[:, :size])

    def can_reduce(self, tensor: torch.Tensor, op: dist.ReduceOp) -> bool:
        return _reduction(op) is not None and tensor.numel() * tensor.element_size() <= self.region_bytes

    def all_reduce(self, tensor: torch.Tensor, op: dist.ReduceOp) -> None:
        """A small tensor (can_reduce): every rank reduces all ranks' copies in rank order, so
        every rank gets the same bits, for any dtype and op."""
        flat = tensor.reshape(-1)
        n = flat.numel() * flat.element_size()
        half, _ = self._next_half()
        half[self.rank, :n].copy_(flat.view(torch.uint8))
        self.arrive("all-reduce")
        flat.copy_(_reduction(op)(half[:, :n].view(tensor.dtype)))

    def reduce_scatter(self, output: torch.Tensor, full: torch.Tensor) -> None:
        """output = this rank's block (1/world of full along its flat order) of the sum over ranks
        of full. output may alias full: each round reads full before writing output."""
        blocks = full.reshape(self.world, -1)
        out = output.reshape(-1)
        per_block = self.region_bytes // self.world // full.element_size()
        n = blocks.shape[1]
        for start in range(0, n, per_block):
            size = min(per_block, n - start)
            used = self._next_half()[0][:, :self.world * per_block * full.element_size()]
            half = used.view(full.dtype).view(self.world, self.world, per_block)  # [source, block, :]
            half[self.rank, :, :size].copy_(blocks[:, start:start + size])
            self.arrive("reduce-scatter")
            torch.sum(half[:, self.rank, :size], dim=0, out=out[start:start + size])


_REDUCTIONS = [(dist.ReduceOp.SUM, lambda every: every.sum(0)), (dist.ReduceOp.MAX, lambda every: every.amax(0)),
               (dist.ReduceOp.MIN, lambda every: every.amin(0)), (dist.ReduceOp.PRODUCT, lambda every: every.prod(0))]


def _reduction(op: dist.ReduceOp) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """The local reduction over a (world, n) stack for a ReduceOp (compared by value: ReduceOp
    members and instances hash differently)."""
    return next((reduce for member, reduce in _REDUCTIONS if member == op), None)


def _create_file(path: str, size: int) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    except OSError:
        return False
    try:
        os.posix_fallocate(fd, 0, size)  # fails here when /dev/shm is too small, not later with SIGBUS
        return True
    except OSError:
        os.unlink(path)
        return False
    finally:
        os.close(fd)


class SharedMemoryCollectives:
    """Proxy for DeepSpeed's TorchBackend (`deepspeed.comm.comm.cdb`); see the module docstring."""

    def __init__(self, backend: Any, dtypes: frozenset[torch.dtype], exchange: Optional[SharedExchange]) -> None:
        self.backend = backend
        self.dtypes = dtypes
        self.exchange = exchange
        self.world_size = dist.get_world_size()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.backend, name)

    def _local(self, group: Any, *tensors: torch.Tensor) -> bool:
        """What every shared-memory path needs: the world group, contiguous CPU tensors."""
        if group is not None and group is not dist.group.WORLD and dist.get_world_size(group) != self.world_size:
            return False
        return all(t.device.type == "cpu" and t.is_contiguous() for t in tensors)

    def all_reduce(self, tensor: torch.Tensor, op: Any = dist.ReduceOp.SUM, group: Any = None,
                   async_op: bool = False) -> Any:
        op = self.backend._reduce_op(op)
        if self._local(group, tensor):
            if op == dist.ReduceOp.SUM and tensor.dtype in self.dtypes:
                if self.exchange is None:  # no room in /dev/shm for the exchange: the kernel's wait is unbounded
                    _kernel_sum(tensor)
                else:
                    self.exchange.kernel_sum(tensor)
                return _handle(async_op)
            if self.exchange and self.exchange.can_reduce(tensor, op):  # e.g. ZeRO's fp64 gradient norm
                self.exchange.all_reduce(tensor, op)
                return _handle(async_op)
        return self.backend.all_reduce(tensor, op, group, async_op)

    def reduce_scatter_tensor(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor,
                              op: Any = dist.ReduceOp.SUM, group: Any = None, async_op: bool = False) -> Any:
        if not (self.exchange and self._local(group, input_tensor, output_tensor)
                and self.backend._reduce_op(op) == dist.ReduceOp.SUM and input_tensor.dtype == output_tensor.dtype):
            return self.backend.reduce_scatter_tensor(output_tensor, input_tensor, op, group, async_op)
        self.exchange.reduce_scatter(output_tensor, input_tensor)
        return _handle(async_op)

    def all_gather_into_tensor(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor,
                               group: Any = None, async_op: bool = False) -> Any:
        if not (self.exchange and self._local(group, input_tensor, output_tensor)
                and input_tensor.dtype == output_tensor.dtype):
            return self.backend.all_gather_into_tensor(output_tensor, input_tensor, group, async_op)
        self.exchange.all_gather(output_tensor, input_tensor)
        return _handle(async_op)


# torch 2.14 renamed these two (the old names warn); older torch has only the old names.
_torch_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_torch_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _shared_memory_backend() -> Optional[SharedMemoryCollectives]:
    ds_comm = sys.modules.get("deepspeed.comm.comm")  # not imported: DeepSpeed never started here
    backend = getattr(ds_comm, "cdb", None)
    return backend if isinstance(backend, SharedMemoryCollectives) else None


def all_reduce(tensor: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> None:
    """World all-reduce for dsclip's own per-step collectives (the stop flag, the logged loss, the
    batch-size check): through shared memory once use_shared_memory() is in effect, so a hung peer
    is named there as in every other collective of a step, else torch.distributed."""
    shared = _shared_memory_backend()
    if shared is not None:
        shared.all_reduce(tensor, op)
    else:
        dist.all_reduce(tensor, op=op)


def all_gather_into_tensor(output: torch.Tensor, input: torch.Tensor) -> None:
    """World all-gather, rank-major along dim 0, for dsclip's own collectives (the contrastive
    loss): through shared memory once use_shared_memory() is in effect, else torch.distributed."""
    shared = _shared_memory_backend()
    if shared is not None:
        shared.all_gather_into_tensor(output, input)
    else:
        _torch_all_gather(output, input)


def gather_checks_sizes(tensor: torch.Tensor) -> bool:
    """Whether all_gather_into_tensor of `tensor` goes through the exchange, which checks that
    every rank's shard has the same size (gloo and NCCL do not: they abort or hang)."""
    shared = _shared_memory_backend()
    return shared is not None and shared.exchange is not None and shared._local(None, tensor)


def reduce_scatter_tensor(output: torch.Tensor, input: torch.Tensor) -> None:
    """World sum reduce-scatter along dim 0 (this rank's block of the sum); see all_gather_into_tensor."""
    shared = _shared_memory_backend()
    if shared is not None:
        shared.reduce_scatter_tensor(output, input)
    else:
        _torch_reduce_scatter(output, input)


def shared_memory_dtypes() -> frozenset[torch.dtype]:
    """The dtypes DeepSpeed's shared-memory kernel sums on this CPU (fp32 needs AVX2, bf16/fp16
    AVX-512BW); empty when it was not built or did not set up its shared memory."""
    from deepspeed import comm

    if not hasattr(torch.ops, "deepspeed") or not hasattr(torch.ops.deepspeed, "inference_all_reduce_"):
        return frozenset()
    # The kernel maps its buffers only when LOCAL_SIZE equals the world size at start-up (all ranks
    # on one host); called without them it crashes the process, so check its own condition.
    if os.environ.get("LOCAL_SIZE") != str(dist.get_world_size()):
        return frozenset()
    if platform.machine() not in ("x86_64", "AMD64"):  # the exchange's barrier relies on x86's store order
        return frozenset()
    level = getattr(comm.comm.cdb, "shm_vector_kernel_level", 0)
    if level < 1:
        return frozenset()
    return frozenset({torch.float32} | ({torch.bfloat16, torch.float16} if level >= 2 else set()))


def use_shared_memory(timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Route DeepSpeed's CPU collectives through its shared-memory all-reduce where it can run;
    call once after deepspeed.init_distributed on every rank; a wait for peers ends after
    `timeout_s`. Returns whether it is in use."""
    from deepspeed import comm

    backend = comm.comm.cdb
    if isinstance(backend, SharedMemoryCollectives) or dist.get_backend() != "gloo" or dist.get_world_size() < 2:
        return isinstance(backend, SharedMemoryCollectives)
    dtypes = shared_memory_dtypes()  # the same on every rank: one host, one build
    if dtypes:
        comm.comm.cdb = SharedMemoryCollectives(backend, dtypes, SharedExchange.open_on_all_ranks(timeout_s=timeout_s))
    return bool(dtypes)
