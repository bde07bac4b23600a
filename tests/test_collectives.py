"""Shared-memory collectives (2 CPU ranks): same results as gloo, fallback where they cannot run."""
import os
import time

import pytest
import torch
import torch.distributed as dist

from dsclip_testutils import init_single_rank, run_on_ranks

WORLD = 2


def _compare(rank: int) -> dict:
    from deepspeed import comm

    from dsclip.loss.collectives import SharedExchange, SharedMemoryCollectives
    backend = comm.comm.cdb
    generator = torch.Generator().manual_seed(rank)
    n = 2_500_003  # odd, and larger than one chunk of the shared-memory kernel
    results = {"routed": isinstance(backend, SharedMemoryCollectives),
               "dtypes": sorted(str(d) for d in getattr(backend, "dtypes", ()))}

    x = torch.randn(n, generator=generator)
    shared, gloo = x.clone(), x.clone()
    comm.all_reduce(shared)
    dist.all_reduce(gloo)
    results["all_reduce"] = torch.equal(shared, gloo)

    biggest, gloo_max = x.clone(), x.clone()
    comm.all_reduce(biggest, op=comm.ReduceOp.MAX)  # too big for one exchange round: gloo
    dist.all_reduce(gloo_max, op=dist.ReduceOp.MAX)
    results["all_reduce_max"] = torch.equal(biggest, gloo_max)

    # small all-reduces the kernel cannot sum (ZeRO's fp64 gradient norm, overflow flags) use the exchange
    for name, small, op, gloo_op in [("all_reduce_fp64", x[:5].double(), comm.ReduceOp.SUM, dist.ReduceOp.SUM),
                                     ("all_reduce_small_max", x[:7], comm.ReduceOp.MAX, dist.ReduceOp.MAX),
                                     ("all_reduce_small_min_int", (x[:3] * 100).long(), dist.ReduceOp.MIN,
                                      dist.ReduceOp.MIN)]:
        shared_small, gloo_small = small.clone(), small.clone()
        rounds_before = backend.exchange.turn
        comm.all_reduce(shared_small, op=op)
        dist.all_reduce(gloo_small, op=gloo_op)
        results[name] = torch.equal(shared_small, gloo_small) and backend.exchange.turn != rounds_before

    full = torch.randn(2 * 1_000_001, generator=generator)
    expected = torch.empty(1_000_001)
    dist.reduce_scatter_tensor(expected, full.clone())
    separate = torch.empty(1_000_001)
    source = full.clone()
    comm.reduce_scatter_fn(separate, source, async_op=True).wait()
    results["reduce_scatter"] = torch.equal(separate, expected)
    results["reduce_scatter_keeps_input"] = torch.equal(source, full)
    aliased = full.clone()
    mine = aliased.narrow(0, rank * 1_000_001, 1_000_001)
    comm.reduce_scatter_fn(mine, aliased)
    results["reduce_scatter_in_place"] = torch.equal(mine, expected)

    shard = torch.randn(777_777, generator=generator)
    gathered, gloo_gathered = torch.full((WORLD * 777_777,), float("nan")), torch.empty(WORLD * 777_777)
    comm.allgather_fn(gathered, shard, async_op=True).wait()
    dist.all_gather_into_tensor(gloo_gathered, shard)
    results["all_gather"] = torch.equal(gathered, gloo_gathered)

    small = SharedExchange.open_on_all_ranks(total_bytes=1 << 16)  # 16 KB per rank: hundreds of rounds
    in_rounds = torch.empty(1_000_001)
    small.reduce_scatter(in_rounds, full.clone())
    results["reduce_scatter_rounds"] = torch.equal(in_rounds, expected)
    in_rounds = torch.empty(WORLD * 777_777)
    small.all_gather(in_rounds, shard)
    results["all_gather_rounds"] = torch.equal(in_rounds, gloo_gathered)

    from dsclip.loss import collectives
    try:  # rank 1 brings one element more: every rank must see both sizes and raise
        small.all_gather(torch.empty(WORLD * (10 + rank)), torch.zeros(10 + rank))
        results["unequal_shards"] = "no error"
    except collectives.UnequalShards as e:
        results["unequal_shards"] = e.shard_bytes
    in_rounds = torch.empty(WORLD * 777_777)
    small.all_gather(in_rounds, shard)  # and the exchange goes on working
    results["all_gather_after_unequal"] = torch.equal(in_rounds, gloo_gathered)
    create_file = collectives._create_file
    collectives._create_file = lambda path, size: False  # as when /dev/shm is too small (rank 0 decides)
    try:
        results["no_room_no_exchange_on_any_rank"] = SharedExchange.open_on_all_ranks() is None
    finally:
        collectives._create_file = create_file

    results.update(_loss_through_shared_memory(rank, backend))

    if torch.bfloat16 in getattr(backend, "dtypes", ()):
        half, gloo_half = x.bfloat16(), x.bfloat16()
        comm.all_reduce(half)
        dist.all_reduce(gloo_half)
        results["all_reduce_bf16"] = torch.equal(half, gloo_half)
        half_full, half_mine = full.bfloat16(), torch.empty(1_000_001, dtype=torch.bfloat16)
        gloo_mine = torch.empty_like(half_mine)
        dist.reduce_scatter_tensor(gloo_mine, half_full.clone())
        comm.reduce_scatter_fn(half_mine, half_full)
        results["reduce_scatter_bf16"] = torch.equal(half_mine, gloo_mine)

    # Code paths that diverged: in the same round rank 0 gathers while rank 1 sums.
    try:
        if rank == 0:
            backend.exchange.all_gather(torch.empty(WORLD * 4), torch.zeros(4))
        else:
            backend.exchange.all_reduce(torch.zeros(4), dist.ReduceOp.SUM)
        results["mismatch"] = "no error"
    except collectives.CollectiveMismatch as e:
        results["mismatch"] = str(e)

    # Last, since it leaves the two ranks' arrival counts apart: rank 1 never comes to a gather.
    bounded = SharedExchange.open_on_all_ranks(total_bytes=1 << 16, timeout_s=1.0)
    if rank == 0:
        start = time.monotonic()
        try:
            bounded.all_gather(torch.empty(WORLD * 10), torch.zeros(10))
            results["timeout"] = "no error"
        except collectives.CollectiveTimeout as e:
            results["timeout"] = str(e)
        results["timeout_after_s"] = time.monotonic() - start
    dist.barrier()  # gloo: rank 1 waits here meanwhile
    return results


def _loss_through_shared_memory(rank: int, backend) -> dict:
    """dsclip's tiled loss with its collectives on shared memory, then on gloo: same loss and gradients."""
    import torch.nn.functional as F
    from deepspeed import comm

    from dsclip.loss import collectives
    from dsclip.loss.config import LossConfig
    from dsclip.loss.contrastive import build_loss
    loss_fn = build_loss(LossConfig(kind="clip", impl="torch_tiled"))

    def loss_and_grads() -> list[torch.Tensor]:
        generator = torch.Generator().manual_seed(rank)
        leaves = [F.normalize(torch.randn(8, 16, generator=generator), dim=-1).requires_grad_() for _ in range(2)]
        leaves.append(torch.tensor([10.0], requires_grad=True))
        loss = loss_fn(*leaves)
        (loss * (1 + rank)).backward()  # ranks weigh their losses differently
        return [loss.detach()] + [leaf.grad for leaf in leaves]

    sums, arrive = [], collectives.SharedExchange.arrive
    collectives.SharedExchange.arrive = lambda self, kind: (sums.append(1), arrive(self, kind))  # once per collective here
    shared = loss_and_grads()
    comm.comm.cdb = backend.backend
    try:
        gloo = loss_and_grads()
    finally:
        comm.comm.cdb = backend
        collectives.SharedExchange.arrive = arrive
    return {"loss_collectives_on_shared_memory": len(sums),
            "loss_equals_gloo": all(torch.equal(a, b) for a, b in zip(shared, gloo))}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    return run_on_ranks(_compare, WORLD, tmp_path_factory.mktemp("collectives"))


@pytest.mark.multiprocess
def test_ranks_on_one_host_route_through_shared_memory(results):
    assert all(r["routed"] and "torch.float32" in r["dtypes"] for r in results)


@pytest.mark.parametrize("op", ["all_reduce", "all_reduce_max", "all_reduce_fp64", "all_reduce_small_max",
                                "all_reduce_small_min_int", "reduce_scatter", "reduce_scatter_keeps_input",
                                "reduce_scatter_in_place", "all_gather", "reduce_scatter_rounds",
                                "all_gather_rounds"])
@pytest.mark.multiprocess
def test_results_equal_gloo_bit_for_bit(results, op):
    assert all(r[op] for r in results)


@pytest.mark.multiprocess
def test_unequal_shards_raise_on_every_rank_and_the_exchange_goes_on(results):
    for rank_results in results:
        assert rank_results["unequal_shards"] == [40, 44]
        assert rank_results["all_gather_after_unequal"]


@pytest.mark.multiprocess
def test_ranks_meeting_from_different_collectives_fail_on_every_rank_naming_them(results):
    for rank_results in results:
        assert "from different collectives (rank 0: all-gather, rank 1: all-reduce)" in rank_results["mismatch"]


@pytest.mark.multiprocess
def test_a_rank_that_never_comes_ends_the_wait_after_the_timeout_naming_it(results):
    assert "rank 0 waited 1 s in a shared-memory all-gather" in results[0]["timeout"]
    assert "for rank(s) [1]" in results[0]["timeout"]
    assert 1.0 <= results[0]["timeout_after_s"] < 5.0


@pytest.mark.multiprocess
def test_without_room_in_dev_shm_no_rank_uses_the_exchange(results):
    assert all(r["no_room_no_exchange_on_any_rank"] for r in results)


@pytest.mark.multiprocess
def test_tiled_loss_runs_its_collectives_through_shared_memory(results):
    for r in results:
        assert r["loss_collectives_on_shared_memory"] == 4  # texts, column stats, loss gradients, text gradients
        assert r["loss_equals_gloo"]


@pytest.mark.multiprocess
def test_bf16_sums_equal_gloo_where_the_kernel_supports_it(results):
    if "all_reduce_bf16" not in results[0]:
        pytest.skip("this CPU lacks AVX-512BW: bf16 stays on gloo")
    assert all(r["all_reduce_bf16"] and r["reduce_scatter_bf16"] for r in results)


@pytest.mark.parametrize("env, wanted", [
    ({"WORLD_SIZE": "2", "LOCAL_SIZE": "2"}, True),
    ({"WORLD_SIZE": "1", "LOCAL_SIZE": "1"}, False),  # one rank: nothing to reduce
    ({"WORLD_SIZE": "4", "LOCAL_SIZE": "2"}, False),  # two hosts: the kernel only spans one
    ({"WORLD_SIZE": "2"}, False),  # no LOCAL_SIZE: the kernel would not map its buffers
    ({"WORLD_SIZE": "2", "LOCAL_SIZE": "2", "DSCLIP_SHM_COLLECTIVES": "0"}, False),
])
def test_the_shared_memory_kernel_is_wanted_only_for_several_ranks_on_one_host(monkeypatch, env, wanted):
    from dsclip.training.bootstrap import shared_memory_wanted
    for name in ("WORLD_SIZE", "LOCAL_SIZE", "DSCLIP_SHM_COLLECTIVES"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert shared_memory_wanted() is wanted


def test_an_unwanted_kernel_is_not_built_and_the_builder_comes_back():
    import importlib

    from dsclip.training.bootstrap import _shared_memory_kernel
    torch_backend = importlib.import_module("deepspeed.comm.torch")
    build = torch_backend.build_shm_op
    with _shared_memory_kernel(built=False):
        assert torch_backend.build_shm_op() is None  # returns at once: no compiler runs
    assert torch_backend.build_shm_op is build
    with _shared_memory_kernel(built=True):
        assert torch_backend.build_shm_op is build


def test_the_kernel_is_cached_per_python_environment(monkeypatch):
    import sys

    from dsclip.training.bootstrap import extension_cache
    here = extension_cache()
    monkeypatch.setattr(sys, "prefix", "/some/other/venv")
    assert extension_cache() != here
    monkeypatch.undo()
    if os.environ.get("TORCH_EXTENSIONS_DIR") not in (None, str(here)):
        pytest.skip("TORCH_EXTENSIONS_DIR is the caller's own: init_distributed keeps it")
    init_single_rank()  # init_distributed chose the folder for every op DeepSpeed compiles
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(here)
